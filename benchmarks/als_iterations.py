"""How far calibrated ALS is from converged at its default 30 iterations, on real SmolLM2 layers.

    python benchmarks/als_iterations.py [--layers NAME ...] [--blocks 4 8] [--iters 30 100 300]

Prints the relative output error ||(W - What) C^1/2|| / ||W C^1/2|| on the calibration covariance
(8192 tokens) after each iteration count (tol=0: no early stop), at 80% of each layer's parameters.
CPU: minutes per (layer, b, iterations).
"""
from __future__ import annotations

import argparse
import time

import blastfx
from blastfx.calibrate import collect_covariances
from common import smollm2_setup


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", nargs="+", default=["model.layers.10.mlp.up_proj", "model.layers.10.self_attn.q_proj"])
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--iters", type=int, nargs="+", default=[30, 100, 300])
    ap.add_argument("--budget", type=float, default=0.8)
    args = ap.parse_args()
    dense, _, _, _, calib = smollm2_setup(None, 4, 8192)
    covs = collect_covariances(dense, args.layers, calib)
    print("| layer | b | rank | iterations | output error | s |\n|---|---|---|---|---|---|", flush=True)
    for name in args.layers:
        W = dense.get_submodule(name).weight.detach().float()
        m, n = W.shape
        for b in args.blocks:
            r = int(args.budget * m * n // (m + n + b * b)) // 8 * 8
            for it in args.iters:
                t = time.perf_counter()
                f = blastfx.factorize(W, r, (b, b), iters=it, tol=0, calibration=covs[name])
                print(f"| {name} | {b} | {r} | {it} | {f.output_error.item():.4f} | {time.perf_counter() - t:.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
