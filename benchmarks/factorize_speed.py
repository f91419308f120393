"""Factorization speed: time for blastfx's default ("als") to reach the error of 300 reference
PrecGD iterations (the BLAST paper's algorithm), on the same device in the same process.

    python benchmarks/factorize_speed.py                      # GPU shapes if CUDA, else CPU 1024x1024
    python benchmarks/factorize_speed.py --shapes 1024x1024 --blocks 16 --rank-frac 0.25

The weights are synthetic with a power-law spectrum (sigma_k ~ k^-0.5, random singular vectors), the
shape of trained transformer weights. Prints a markdown table and records each shape's rows in
benchmarks/results/factorize_speed.csv.
"""
from __future__ import annotations

import argparse
import time

import torch

from blastfx import factorize
from rows import add_arguments, measurements, record


def weight(m: int, n: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    k = min(m, n)
    P, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    Q, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    sigma = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5
    return ((P * sigma) @ Q.T).to(device)


def case_name(m: int, n: int, blocks: int, rank: int, ref_iters: int = 300) -> str:
    return f"{m}x{n} b={blocks} r={rank}" + (f" ref={ref_iters}" if ref_iters != 300 else "")


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=None, help="MxN, e.g. 4096x4096")
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--rank", type=int, default=None, help="absolute rank (default: rank-frac * min dim)")
    ap.add_argument("--rank-frac", type=float, default=0.25)
    ap.add_argument("--ref-iters", type=int, default=300)
    add_arguments(ap)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = args.shapes or (["4096x4096", "4096x11008"] if device == "cuda" else ["1024x1024"])
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}\n")
    print("| shape | b | r | precgd iters | precgd s | precgd rel err | als iters | als s | als rel err "
          "| speedup | als (converged) iters | s | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in shapes:
        m, n = map(int, s.split("x"))
        r = args.rank or int(args.rank_frac * min(m, n))
        W = weight(m, n, device)
        factorize(W[:256, :256], 8, args.blocks)  # warm up kernels / allocator
        ref, t_ref = timed(lambda: factorize(W, r, args.blocks, method="precgd", iters=args.ref_iters))
        target = ref.rel_error.item()
        fast, t_fast = timed(lambda: factorize(W, r, args.blocks, method="als", target_error=target))
        full, t_full = timed(lambda: factorize(W, r, args.blocks, method="als"))
        print(f"| {m}x{n} | {args.blocks} | {r} | {ref.iterations} | {t_ref:.2f} | {target:.4f} | "
              f"{fast.iterations} | {t_fast:.2f} | {fast.rel_error.item():.4f} | {t_ref / t_fast:.1f}x | "
              f"{full.iterations} | {t_full:.2f} | {full.rel_error.item():.4f} |", flush=True)
        record("factorize_speed", measurements(
            case_name(m, n, args.blocks, r, args.ref_iters),
            {"m": m, "n": n, "b": args.blocks, "r": r, "ref_iters": args.ref_iters},
            [("precgd iterations", ref.iterations, ""), ("precgd time", round(t_ref, 3), "s"),
             ("precgd rel error", round(target, 4), ""),
             ("als iterations", fast.iterations, ""), ("als time", round(t_fast, 3), "s"),
             ("als rel error", round(fast.rel_error.item(), 4), ""),
             ("als speedup", round(t_ref / t_fast, 2), "x"),
             ("als converged iterations", full.iterations, ""), ("als converged time", round(t_full, 3), "s"),
             ("als converged rel error", round(full.rel_error.item(), 4), "")]), directory=args.results_dir)


if __name__ == "__main__":
    main()
