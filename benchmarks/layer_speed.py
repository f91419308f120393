"""One layer at 50% of its parameters: dense cuBLAS vs low-rank (two cuBLAS GEMMs, equal params) vs blastfx.

    python benchmarks/layer_speed.py                    # bf16; Llama-2-7B layer shapes, b = 4 and 16, T = 1 to 4096
    python benchmarks/layer_speed.py --paths            # also time every kernel path (a profile)
    python benchmarks/layer_speed.py --structures blast ss1 --blocks 4   # SS1 layers beside BLAST
    python benchmarks/layer_speed.py --structures ss1 --paths    # ... and each SS1 path's best config

Every call is replayed from a CUDA graph that runs it once per weight copy, with enough copies to
come from HBM, not L2 (as in a CUDA-graph decode loop; CPU launch cost excluded for every column).
"blastfx" is what the op runs by default: the autotuned best path for that shape and token bucket.
Prints a markdown table of medians and speedups vs dense measured in the same process, and records
each case's rows in ``benchmarks/results/layer_speed.csv``; ``--paths`` also records each kernel
path's best time (for the decode kernels, ``decode:<mode>``) so the per-stage trade-offs stay visible.
An SS1 layer at the same budget (reduction factor 1 / budget, the layer's default hash tiles) is one
GEMM over the shared weight; its rows also give its speed against BLAST's (the first ``--blocks``)
at the same T.
"""
from __future__ import annotations

import argparse

import torch

import blastfx
from blastfx.kernels import autotune, forward
from blastfx.structures.blast.layout import BlastShape
from blastfx.structures.ss1 import SS1Layout, ss1_matmul
from blastfx.structures.ss1 import kernel as ss1_kernel
from common import copies_for, graph_ms, versions
from rows import add_arguments, measurements, record

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]       # (out, in)


def rank_at(m, n, b, frac):
    r = int(frac * m * n / (m + n + b * b))
    return r - r % 16


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 1024, 4096])
    ap.add_argument("--shapes", nargs="+", default=None, help="OUTxIN")
    ap.add_argument("--paths", action="store_true", help="also time each path (its best config)")
    ap.add_argument("--structures", nargs="+", choices=("blast", "ss1"), default=["blast"])
    add_arguments(ap)
    args = ap.parse_args()
    if "ss1" in args.structures and ss1_reduction(args.budget) is None:
        ap.error(f"--structures ss1 needs a budget of 1 / (a power of two >= 2), got --budget {args.budget}: "
                 f"an SS1 layer keeps 1 / reduction of the parameters")
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else SHAPES
    dt, dev = torch.bfloat16, "cuda"
    print(versions())
    names = ["bmm_mix_bmm", "fused", "fused_bmm", "decode:persistent", "decode:pdl", "decode:two"] if args.paths else []
    head = "| out x in | b | r | T | dense ms | low-rank ms | blastfx ms | low-rank x | blastfx x | chosen |"
    head += "".join(f" {p} x |" for p in names)
    print("\n" + head + "\n" + "|---" * (10 + len(names)) + "|", flush=True)
    for m, n in shapes:
        nc = copies_for(m * n * 2)
        dense = [torch.randn(m, n, device=dev, dtype=dt) / n ** 0.5 for _ in range(nc)]
        blast_ms = {}
        for b in args.blocks if "blast" in args.structures else ():
            r = rank_at(m, n, b, args.budget)
            shape = BlastShape.make(m, n, r, b)
            r_lr = int(args.budget * m * n / (m + n))
            lr = [(torch.randn(n, r_lr, device=dev, dtype=dt), torch.randn(r_lr, m, device=dev, dtype=dt))
                  for _ in range(copies_for((m + n) * r_lr * 2))]
            fac = [tuple(torch.randn(*shape.factor_shapes[k], device=dev, dtype=dt) * 0.05 for k in "USV")
                   for _ in range(copies_for(shape.num_params * 2))]
            for T in args.tokens:
                x = torch.randn(T, n, device=dev, dtype=dt)
                t_dense = graph_ms(lambda k: torch.nn.functional.linear(x, dense[k]), nc)
                t_lr = graph_ms(lambda k: (x @ lr[k][0]) @ lr[k][1], len(lr))
                blastfx.blast_matmul(x, *fac[0])                  # autotune outside the graph
                chosen = autotune.report().get(forward.tuning_key(T, shape, dt, False, x.device), "default")
                t_blast = graph_ms(lambda k: blastfx.blast_matmul(x, *fac[k]), len(fac))
                if b == args.blocks[0]:
                    blast_ms[T] = (b, t_blast)
                row = (f"| {m}x{n} | {b} | {r} | {T} | {t_dense:.4f} | {t_lr:.4f} | {t_blast:.4f} | "
                       f"{t_dense / t_lr:.2f} | {t_dense / t_blast:.2f} | {chosen} |")
                metrics = [("dense time", t_dense, "ms"), ("low-rank time", t_lr, "ms"), ("blastfx time", t_blast, "ms"),
                           ("low-rank vs dense", round(t_dense / t_lr, 3), "x"),
                           ("blastfx vs dense", round(t_dense / t_blast, 3), "x"), ("chosen path", str(chosen), "")]
                for name in names:
                    t = _best_of_path(name, x, fac, shape)
                    row += f" {t_dense / t:.2f} |" if t == t else " n/a |"
                    if t == t:
                        metrics.append((f"{name} vs dense", round(t_dense / t, 3), "x"))
                print(row, flush=True)
                record("layer_speed", measurements(
                    f"{m}x{n} b={b} T={T}", dict(out=m, b=b, r=r, T=T, budget=args.budget, dtype="bfloat16", **{"in": n}),
                    metrics), directory=args.results_dir)
            del lr, fac
        if "ss1" in args.structures:
            ss1_rows(m, n, args, dense, blast_ms)
        del dense


def ss1_reduction(budget: float) -> int | None:
    """The reduction factor that keeps ``budget`` of the parameters, or None where none does (SS1
    reductions are powers of two, so rounding 1 / 0.8 to 1 would time a layer as large as dense)."""
    r = round(1 / budget)
    return r if r >= 2 and r & (r - 1) == 0 and abs(r * budget - 1) < 1e-6 else None


def ss1_rows(m, n, args, dense, blast_ms):
    """SS1 at the same budget: dense and SS1 timed in this process, BLAST's time from the rows above."""
    dev, dt = dense[0].device, dense[0].dtype
    reduction = ss1_reduction(args.budget)
    layout = SS1Layout(m, n, reduction)
    shifts = layout.shifts(dev)
    ws = [torch.randn(*layout.weight_shape, device=dev, dtype=dt) / n ** 0.5
          for _ in range(copies_for(layout.num_params * 2))]
    for T in args.tokens:
        x = torch.randn(T, n, device=dev, dtype=dt)
        t_dense = graph_ms(lambda k: torch.nn.functional.linear(x, dense[k]), len(dense))
        ss1_matmul(x, ws[0], layout, shifts=shifts)             # autotune outside the graph
        t_ss1 = graph_ms(lambda k: ss1_matmul(x, ws[k], layout, shifts=shifts), len(ws))
        chosen = autotune.report().get(ss1_kernel.tuning_key(
            T, ws[0], n, reduction, layout.block_k, layout.block_n, layout.vec, dt, False, dev), "default")
        metrics = [("dense time", t_dense, "ms"), ("ss1 time", t_ss1, "ms"),
                   ("ss1 vs dense", round(t_dense / t_ss1, 3), "x"), ("ss1 chosen path", str(chosen), "")]
        line = (f"| {m}x{n} | ss1 R={reduction} | | {T} | {t_dense:.4f} | | {t_ss1:.4f} | | {t_dense / t_ss1:.2f} "
                f"| {chosen} |")
        if T in blast_ms:
            b, t_blast = blast_ms[T]
            metrics.append((f"ss1 vs blastfx b={b}", round(t_blast / t_ss1, 3), "x"))
            line += f" vs BLAST b={b}: {t_blast / t_ss1:.2f}x |"
        if args.paths:
            for path, t in ss1_path_times(x, ws, layout, shifts).items():
                metrics.append((f"ss1 {path} vs dense", round(t_dense / t, 3), "x"))
                line += f" {path} {t_dense / t:.2f}x |"
        print(line, flush=True)
        record("layer_speed", measurements(
            f"{m}x{n} ss1 R={reduction} T={T}",
            dict(out=m, structure="ss1", reduction=reduction, T=T, budget=args.budget, dtype="bfloat16",
                 **{"in": n}), metrics), directory=args.results_dir)


def ss1_path_times(x, ws, layout, shifts, timer=graph_ms) -> dict[str, float]:
    """Each SS1 path's best time (ms) over its candidate configs at this T, in the order the
    autotuner lists them; a path with no config that runs here is left out. ``timer(fn, copies)``
    times ``fn(k)`` over the weight copies (the benchmark's graph replay)."""
    T, reduction = x.shape[0], layout.reduction
    best: dict[str, float] = {}
    for cfg in ss1_kernel.candidates(T, layout.block_n, layout.block_k, reduction, layout.vec):
        path = cfg.get("path", "kernel")
        t = _time_if_it_runs(timer, lambda k: ss1_kernel.ss1_matmul_triton(
            x, ws[k], shifts, None, reduction, layout.block_k, layout.block_n, config=cfg, vec=layout.vec), len(ws))
        if t is not None:
            best[path] = min(best.get(path, t), t)
    return best


def _time_if_it_runs(timer, fn, copies: int) -> float | None:
    """``timer(fn, copies)``, or None for a config this GPU cannot run (e.g. out of shared memory)."""
    try:
        return timer(fn, copies)
    except Exception:       # noqa: BLE001 -- any launch failure means "not runnable here"
        return None


def _best_of_path(name, x, fac, shape) -> float:
    """Fastest time of one path over its candidate configs (``decode:<mode>`` selects the decode
    kernel's configs of that launch mode); NaN when no candidate runs at this size."""
    path, _, mode = name.partition(":")
    best = float("nan")
    for p, cfg in forward.candidates(x.shape[0], shape, x.device):
        if p != path or (mode and cfg.get("mode") != mode):
            continue
        t = _time_if_it_runs(graph_ms, lambda k: forward.blast_matmul_triton(x, *fac[k], path=p, config=cfg),
                             len(fac))
        if t is not None:
            best = t if best != best else min(best, t)
    return best


if __name__ == "__main__":
    main()
