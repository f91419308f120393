"""``blastfx`` command line: analyze, compress and evaluate a causal LM (a GGUF file or HF folder)."""
from __future__ import annotations

import argparse
import sys
import time

import torch


def _load(source):
    from .hf import load_causal_lm
    return load_causal_lm(source)


def cmd_analyze(args) -> int:
    from .passes.analyze import analyze
    model, _ = _load(args.model)
    print(analyze(model))
    return 0


def _config(args):
    from .config import BlastConfig
    return BlastConfig(blocks=args.blocks, strategy=args.strategy, objective=args.objective, method=args.method,
                       iters=args.iters, include=tuple(args.include or ()), exclude=tuple(args.exclude or ()),
                       block_choices=tuple(args.block_choices or ()), allow_dense=not args.blast_only)


def cmd_compress(args) -> int:
    from pathlib import Path

    from .api import compress
    from .io import save

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"error: {out} exists and is not empty (pass --overwrite)", file=sys.stderr)
        return 2
    config = _config(args)
    if config.needs_loss and not args.calibrate:
        print("error: --strategy loss / --objective loss take loss gradients on calibration text: "
              "pass --calibrate TOKENS", file=sys.stderr)
        return 2
    model, tok = _load(args.model)
    before = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    calibration = None
    if args.calibrate:
        from .calibrate import text_batches
        calibration = text_batches(tok, tokens=args.calibrate)
    compress(model, args.budget, config=config, calibration=calibration)
    print(model.blastfx_plan.summary())
    after = sum(p.numel() for p in model.parameters())
    print(f"parameters: {before:,} -> {after:,} ({after / before:.1%}) in {time.perf_counter() - t0:.1f}s")
    tmp = out.with_name(out.name + ".partial")
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"saved to {out}")
    return 0


def cmd_eval(args) -> int:
    from .data import split_articles
    from .evaluate import generate_text, perplexity, token_windows, tokens_per_second

    rows = []
    for source in args.models:
        model, tok = _load(source)
        windows = token_windows(tok, split_articles()[1], args.window, args.max_windows)
        ppl = perplexity(model, windows, progress=True)
        tps = tokens_per_second(model, tok)
        sample = generate_text(model, tok, args.prompt, args.new_tokens)
        rows.append((source, sum(p.numel() for p in model.parameters()), ppl, tps, sample))
    print(f"\nheld-out Wikipedia perplexity ({args.max_windows} x {args.window}-token windows), greedy decode")
    print("| model | params | perplexity | tokens/s | sample |\n|---|---|---|---|---|")
    for source, params, ppl, tps, sample in rows:
        print(f"| {source} | {params:,} | {ppl:.2f} | {tps:.1f} | {sample[:80]!r} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import OBJECTIVES, STRATEGIES
    p = argparse.ArgumentParser(prog="blastfx", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="list the linear call sites of a model")
    a.add_argument("model", help="a .gguf file or a local HF folder")
    a.set_defaults(fn=cmd_analyze)
    c = sub.add_parser("compress", help="compress a model and save it as an HF folder")
    c.add_argument("model")
    c.add_argument("--budget", type=float, required=True, help="fraction of compressible parameters kept, in (0, 1)")
    c.add_argument("--out", required=True)
    c.add_argument("--blocks", type=int, default=4)
    c.add_argument("--block-choices", type=int, nargs="+", metavar="B",
                   help="let each layer take the block count of least measured error among these (e.g. 4 8)")
    c.add_argument("--strategy", choices=STRATEGIES, default="uniform",
                   help="how the budget is spread over layers (error, loss: need --calibrate)")
    c.add_argument("--blast-only", action="store_true",
                   help="with --strategy error/loss: never keep a layer dense, even where that buys more")
    c.add_argument("--objective", choices=OBJECTIVES, default="output",
                   help="what the calibrated factorization preserves: each layer's outputs, or those weighted "
                        "by their loss Fisher (needs --calibrate)")
    c.add_argument("--method", default="als")
    c.add_argument("--iters", type=int, default=None)
    c.add_argument("--include", nargs="*")
    c.add_argument("--exclude", nargs="*")
    c.add_argument("--calibrate", type=int, default=0, metavar="TOKENS",
                   help="calibrate on this many tokens of (non-held-out) Wikipedia text")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(fn=cmd_compress)
    e = sub.add_parser("eval", help="perplexity, speed and a sample of one or more models")
    e.add_argument("models", nargs="+")
    e.add_argument("--window", type=int, default=512)
    e.add_argument("--max-windows", type=int, default=32)
    e.add_argument("--prompt", default="What is the capital of France?")
    e.add_argument("--new-tokens", type=int, default=30)
    e.set_defaults(fn=cmd_eval)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
