"""Compress time and GPU memory of a Llama-shaped model, per pipeline stage, resident or streamed.

    python benchmarks/compress_speed.py                                   # Llama-2-7B shape, 4 blocks
    python benchmarks/compress_speed.py --model llama2-13b --layers 4 --stream
    python benchmarks/compress_speed.py --recipes loss --iters 100 --sequential
    python benchmarks/compress_speed.py --recipes loss --fit-precision tf32 --profile
    python benchmarks/compress_speed.py --model tiny --results-dir /tmp/rows      # a quick check on a CPU
    torchrun --nproc-per-node 2 benchmarks/compress_speed.py --recipes loss        # the fit split over 2 GPUs

A ``--model``-shaped LlamaForCausalLM (random weights, bf16) with ``--layers`` of its decoder
blocks is compressed at ``--budget`` with each ``--recipes`` entry: ``weight`` (no calibration) or
``loss`` (``--calib-tokens`` random tokens, the loss-aware objective and allocation that token ids
select). ``--stream`` keeps the model on the CPU and streams it through the GPU one block at a
time (``compute_device="cuda"``, sequential calibration). Rows: wall time per stage
(:func:`blastfx.stage_times`), the total, seconds per block and the whole model's time scaled by its
block count, peak GPU memory beyond the model's weights on the GPU and one block's weight bytes
(the streaming bound; memory on CUDA only), and the relative error of the final hidden states on held-out tokens, so
that a faster recipe can be compared at equal error. ``--fit-precision tf32`` runs the fit's large
products on TF32 tensor cores instead of the default IEEE fp32 (``BlastConfig(fit_precision=...)``).
``--profile`` runs compress under ``torch.profiler`` (GPU kernels only on a GPU: recording every CPU
operator of a 7B compress makes the profile itself take minutes) and records the kernels with the
most time instead of the timings, which the profiler inflates.

Under ``torchrun --nproc-per-node N`` every process joins one process group (NCCL for GPU tensors,
one GPU per local rank; gloo for CPU tensors) and ``compress`` splits the factorization over the ranks
(:mod:`blastfx.build.distributed`); the time is the slowest rank's, the memory rank 0's, and rank 0
records the rows, their case ending in "N ranks".
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

import blastfx
from blastfx import BlastConfig
from blastfx.build import distributed
from blastfx.structures.blast.factorize.precision import PRECISIONS
from llama_e2e import SHAPES as E2E_SHAPES, build
from rows import add_arguments, measurements, record

SHAPES = {**E2E_SHAPES, "llama2-13b": dict(hidden=5120, inter=13824, heads=40, kv_heads=40, vocab=32000),
          "tiny": dict(hidden=256, inter=512, heads=4, kv_heads=4, vocab=1000)}     # tiny: a quick check anywhere
BLOCKS = {"llama2-7b": 32, "llama3-8b": 32, "llama2-13b": 40, "tiny": 4}     # decoder blocks of the full model
CUDA = torch.cuda.is_available()
GIB = 2 ** 30


def weight_bytes(module: torch.nn.Module, device_type: str | None = None) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()
               if device_type is None or p.device.type == device_type)


def final_hidden(model, ids) -> torch.Tensor:
    """The last decoder block's normed output on ``ids``, in fp32 on the CPU."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return model.model(input_ids=ids.to(device)).last_hidden_state.float().cpu()


def barrier(world: int):
    if world > 1:
        torch.distributed.barrier()
    if CUDA:
        torch.cuda.synchronize()


def run(args, recipe: str, rank: int = 0, world: int = 1):
    dims = SHAPES[args.model]
    torch.manual_seed(0)
    model = build(args.layers, **dims)
    if args.stream:
        model = model.to("cpu")
    torch.cuda.empty_cache()
    rows = max(1, args.calib_tokens // args.seq)
    calibration = torch.randint(0, dims["vocab"], (rows, args.seq)) if recipe == "loss" else None
    held_out = torch.randint(0, dims["vocab"], (1, args.seq), generator=torch.Generator().manual_seed(1))
    reference = final_hidden(model, held_out)
    config = BlastConfig(progress=False, iters=args.iters, sequential=args.sequential or args.stream,
                         compute_device="cuda" if args.stream else None, fit_precision=args.fit_precision)
    on_gpu = weight_bytes(model, "cuda")
    block = weight_bytes(model.model.layers[0])
    barrier(world)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    activities = [ProfilerActivity.CUDA] if CUDA else [ProfilerActivity.CPU]
    profiler = profile(activities=activities) if args.profile else None
    start = time.perf_counter()
    with blastfx.stage_times() as times, warnings.catch_warnings():
        warnings.simplefilter("ignore", blastfx.WeightOnlyWarning)      # the weight recipe is weight-only on purpose
        if profiler is not None:
            with profiler:
                blastfx.compress(model, args.budget, calibration=calibration, config=config)
        else:
            blastfx.compress(model, args.budget, calibration=calibration, config=config)
    barrier(world)                                # the slowest rank's time (and every stage waited for the GPU)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if CUDA else 0
    error = ((final_hidden(model, held_out) - reference).norm() / reference.norm()).item()
    if rank != 0:
        return
    full = BLOCKS[args.model]
    ranks = f", {world} ranks" if world > 1 else ""
    print(f"{args.model} x{args.layers} {recipe}{ranks}{' streamed' if args.stream else ''}: {seconds:.1f} s "
          f"({seconds / args.layers:.1f} s/block, ~{seconds * full / args.layers / 60:.1f} min for {full} blocks), "
          + (f"peak GPU memory {peak / GIB:.1f} GiB (model {on_gpu / GIB:.1f} GiB), " if CUDA else "")
          + f"one block {block / GIB:.2f} GiB, hidden-state error {error:.4f}\n  {times}", flush=True)
    metrics = [("total time", round(seconds, 2), "s"), ("time per block", round(seconds / args.layers, 2), "s"),
               (f"{full}-block model time (scaled)", round(seconds * full / args.layers / 60, 2), "min"),
               ("one block's weights", round(block / GIB, 3), "GiB"), ("hidden-state rel error", round(error, 5), "")]
    if CUDA:
        metrics += [("peak GPU memory", round(peak / GIB, 2), "GiB"),
                    ("peak GPU memory beyond the model", round((peak - on_gpu) / GIB, 2), "GiB")]
    metrics += [(f"stage {path}", round(s, 2), "s") for path, s in times.seconds.items()]
    mode = "streamed" if args.stream else ("sequential" if args.sequential else "resident")
    case = (f"{args.model} {args.layers} blocks {recipe} {mode}" + (" tf32" if args.fit_precision == "tf32" else "")
            + (f" {args.iters} iters" if args.iters is not None else "") + (f" {world} ranks" if world > 1 else ""))
    config_row = {"model": args.model, "layers": args.layers, "recipe": recipe, "mode": mode, "budget": args.budget,
                  "iters": args.iters, "calib_tokens": rows * args.seq if calibration is not None else 0,
                  "fit_precision": args.fit_precision, "ranks": world}
    if profiler is not None:        # profiled times are inflated: record where the time goes, not how much
        metrics = profile_metrics(profiler, seconds)
        case += " profiled"
    record("compress_speed", measurements(case, config_row, metrics), directory=args.results_dir)


def profile_metrics(profiler, seconds: float, top: int = 12) -> list:
    """Print the operators with the most self GPU time (on a CPU: self CPU time) and return them as
    rows: seconds in all and per call count, besides the profiled wall time."""
    key = "self_device_time_total" if CUDA else "self_cpu_time_total"
    averages = profiler.key_averages()
    print(averages.table(sort_by=key, row_limit=top), flush=True)
    ranked = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:top]
    metrics = [("profiled wall time", round(seconds, 2), "s")]
    for e in ranked:
        metrics.append((f"{'GPU' if CUDA else 'CPU'} time in {e.key} ({e.count} calls)",
                        round(getattr(e, key) / 1e6, 3), "s"))
    return metrics


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--layers", type=int, default=4, help="decoder blocks built (the full model's time is scaled)")
    ap.add_argument("--recipes", nargs="+", choices=("weight", "loss"), default=["weight", "loss"])
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--iters", type=int, default=None, help="ALS iterations (default: the method's)")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=512, help="tokens per calibration row")
    ap.add_argument("--sequential", action="store_true", help="sequential calibration (block by block)")
    ap.add_argument("--stream", action="store_true", help="model on the CPU, streamed through the GPU")
    ap.add_argument("--fit-precision", choices=PRECISIONS, default=BlastConfig.fit_precision,
                    help="the BLAST fit's large products on TF32 tensor cores or in IEEE fp32")
    ap.add_argument("--profile", action="store_true", help="record the operators with the most GPU time")
    add_arguments(ap)
    args = ap.parse_args()
    if args.stream and not CUDA:
        ap.error("--stream streams the model through a GPU: it needs CUDA")
    if (args.stream or args.sequential) and "weight" in args.recipes:
        ap.error("--stream and --sequential walk the model through sequential calibration, which needs "
                 "--recipes loss (the weight recipe has no calibration data)")
    if args.layers < 2:         # compress selects the linears repeated over the blocks: one block has none
        ap.error(f"--layers must be at least 2, got {args.layers}")
    if not 0 < args.budget <= 1:
        ap.error(f"--budget must be in (0, 1], got {args.budget}")
    # GPU tensors over NCCL, CPU ones (a streamed model's blocks) over gloo
    with distributed.launched_group("cpu:gloo,cuda:nccl" if CUDA else "gloo"):
        rank, world = distributed.world()
        for recipe in args.recipes:
            run(args, recipe, rank, world)


if __name__ == "__main__":
    main()
