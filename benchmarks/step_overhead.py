"""CPU time of one compiled decode step, dense vs blastfx, with and without ``blastfx.inference_options()``.

    python benchmarks/step_overhead.py [--layers 8] [--model llama2-7b] [--variants dense blastfx "blastfx, inference options"]

Why: a CUDA-graph replay costs the GPU nothing extra, but before it dynamo checks its guards and the
compiled wrapper takes every parameter; where each step waits for its result (HF ``generate`` syncs
on its stopping checks every token) that CPU time adds to every token. Per variant, over the decode
steps of one greedy generation (the benchmark's ``Decoder``: an eager prefill, then one compiled step
replayed as a CUDA graph): the step's CPU time (the call returns before the GPU finishes), the step
followed by a sync (CPU and GPU in series, what ``generate`` pays), the step in a loop without syncs
(the whole loop over its step count: the larger of the two), and dynamo's guard check alone.
Medians; dense runs in the same process.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import blastfx
from blastfx import BlastConfig
from llama_e2e import DEVICE, SHAPES, Decoder, build, sync
from rows import add_arguments, measurements, record

WARM_STEPS = 4       # steps left out of the medians (the first replays after a reset cache)
VARIANTS = {"dense": ("inductor", False), "dense, inference options": ("inductor", True),
            "blastfx": ("blast", False), "blastfx, inference options": ("blast", True)}


def step_times(decoder: Decoder) -> dict[str, float]:
    """ms per decode step of ``decoder`` (compiled, graph recorded): "cpu" and "sync", medians over
    the steps each timed alone; "loop", the whole loop of steps without syncs and one at its end,
    over the step count (the GPU's time or the CPU's, whichever is larger)."""
    times = {}
    with torch.no_grad():
        for mode in ("cpu", "sync", "loop"):
            decoder.cache.reset()
            tok = decoder.step(decoder.ids, decoder.positions[:decoder.prompt])
            steps = range(decoder.prompt, decoder.prompt + decoder.new_tokens - 1)
            samples = []
            sync()
            loop_start = time.perf_counter()
            for k in steps:
                pos = decoder.positions[k:k + 1]
                if mode == "cpu":
                    sync()
                start = time.perf_counter()
                torch.compiler.cudagraph_mark_step_begin()
                tok = decoder.compiled(tok, pos).clone()
                if mode == "sync":
                    sync()
                samples.append(time.perf_counter() - start)
            sync()
            loop = (time.perf_counter() - loop_start) / len(steps)
            times[mode] = (loop if mode == "loop" else statistics.median(samples[WARM_STEPS:])) * 1e3
    return times


def guard_check_us(decoder: Decoder, repeats: int = 200) -> float | None:
    """µs for dynamo to check the compiled step's guards once (its first cache entry), with the
    step's own frame locals; None where this torch cannot say (the cache-entry API is private)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        entries = _debug_get_cache_entry_list(decoder.step.__code__)
    except (ImportError, AttributeError, TypeError):
        return None
    if not entries:
        return None
    frame_locals = {}

    def capture(frame, event, arg):
        if event == "call" and frame.f_code is decoder.step.__code__ and not frame_locals:
            frame_locals.update(frame.f_locals)
    tok = torch.zeros(decoder.batch, 1, dtype=torch.long, device=DEVICE)
    decoder.cache.reset()
    with torch.no_grad():
        sys.setprofile(capture)
        try:
            decoder.step(tok, decoder.positions[decoder.prompt:decoder.prompt + 1])
        finally:
            sys.setprofile(None)
        guards = entries[0].guard_manager
        if not guards.check(frame_locals):
            return None
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            guards.check(frame_locals)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    add_arguments(ap)
    args = ap.parse_args()
    if "dense" not in args.variants:
        raise SystemExit("--variants: include dense (the other variants are read against it, in the same process)")
    if args.new_tokens < 2 * WARM_STEPS:
        raise SystemExit(f"--new-tokens {args.new_tokens}: time at least {2 * WARM_STEPS} steps")
    dims = SHAPES[args.model]
    models = {"dense": build(args.layers, **dims)}
    if any(v.startswith("blastfx") for v in args.variants):
        models["blastfx"] = build(args.layers, **dims)
        blastfx.compress(models["blastfx"], args.budget, config=BlastConfig(init="random", progress=False))
    case = f"{args.model}, {args.layers} layers, decode step at batch 1"
    config = dict(layers=args.layers, budget=args.budget, new_tokens=args.new_tokens, **dims)
    print("| variant | step CPU ms | step + sync ms | loop ms | guard check µs |\n|---|---|---|---|---|", flush=True)
    for variant in args.variants:
        backend, inference = VARIANTS[variant]
        torch._dynamo.reset()
        decoder = Decoder(models["blastfx" if backend == "blast" else "dense"], backend, 16, args.new_tokens,
                          compile_options=blastfx.inference_options() if inference else None)
        decoder.tokens_per_s()                                  # tune, compile, record the graph
        times = step_times(decoder)
        guards = guard_check_us(decoder)
        metrics = [(f"{variant} step CPU time", round(times["cpu"], 4), "ms"),
                   (f"{variant} step with sync", round(times["sync"], 4), "ms"),
                   (f"{variant} step in a loop", round(times["loop"], 4), "ms")]
        if guards is not None:
            metrics.append((f"{variant} guard check", round(guards, 1), "µs"))
        record("step_overhead", measurements(case, config, metrics), directory=args.results_dir)
        print(f"| {variant} | {times['cpu']:.3f} | {times['sync']:.3f} | {times['loop']:.3f} | "
              f"{'' if guards is None else f'{guards:.1f}'} |", flush=True)


if __name__ == "__main__":
    main()
