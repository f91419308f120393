"""How far calibrated ALS is from converged at its default 30 iterations, on real SmolLM2 layers.

    python benchmarks/als_iterations.py [--layers NAME ...] [--blocks 4 8] [--iters 30 100 300]

Prints the relative output error ||(W - What) C^1/2|| / ||W C^1/2|| on the calibration covariance
(8192 tokens) after each iteration count (tol=0: no early stop), at 80% of each layer's parameters,
and records each in benchmarks/results/als_iterations.csv. CPU: minutes per (layer, b, iterations).
"""
from __future__ import annotations

import argparse
import time

import blastfx
from blastfx.plan.allocation import rank_for
from blastfx.statistics.collect import collect_covariances
from common import smollm2_setup
from rows import add_arguments, measurements, record


def case_name(layer: str, blocks: int, iters: int, budget: float = 0.8) -> str:
    return f"{layer} b={blocks} iters={iters}" + (f" budget={budget:g}" if budget != 0.8 else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", nargs="+", default=["model.layers.10.mlp.up_proj", "model.layers.10.self_attn.q_proj"])
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--iters", type=int, nargs="+", default=[30, 100, 300])
    ap.add_argument("--budget", type=float, default=0.8)
    add_arguments(ap)
    args = ap.parse_args()
    dense, _, _, _, calib = smollm2_setup(None, 4, 8192)
    covs = collect_covariances(dense, args.layers, calib)
    print("| layer | b | rank | iterations | output error | s |\n|---|---|---|---|---|---|", flush=True)
    for name in args.layers:
        W = dense.get_submodule(name).weight.detach().float()
        m, n = W.shape
        for b in args.blocks:
            r = rank_for(m, n, (b, b), args.budget, 8)      # as a plan sizes the layer
            for it in args.iters:
                t = time.perf_counter()
                f = blastfx.factorize(W, r, (b, b), iters=it, tol=0, calibration=covs[name])
                secs = time.perf_counter() - t
                print(f"| {name} | {b} | {r} | {it} | {f.output_error.item():.4f} | {secs:.0f} |", flush=True)
                record("als_iterations", measurements(
                    case_name(name, b, it, args.budget),
                    {"layer": name, "shape": [m, n], "b": b, "rank": r, "iters": it, "budget": args.budget,
                     "calib_tokens": 8192},
                    [("output error", round(f.output_error.item(), 4), ""), ("time", round(secs, 1), "s")]),
                    directory=args.results_dir)


if __name__ == "__main__":
    main()
