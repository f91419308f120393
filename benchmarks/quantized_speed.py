"""One layer with quantized factors: bf16 dense vs bf16 BLAST vs BLAST with int8, int4 or float8 factors.

    python benchmarks/quantized_speed.py                       # Llama-2-7B shapes, budget 0.5, b = 4, T = 1
    python benchmarks/quantized_speed.py --tokens 1 8 1024 --factor-dtype int4

Every call is replayed from a CUDA graph that runs it once per weight copy, with enough copies to
stream from HBM (``common.graph_ms``), as in a CUDA-graph decode loop. The quantized layer is what
``torch.ops.blastfx.blast_matmul_quantized`` runs by default: the autotuner's pick of the paths
reading the codes (the GEMV kernel at T <= 4, the one-launch decode kernel up to T = 16, the fused
tensor-core kernels) and a float copy (the path is a column). Speed is dense time over the layer's
time, measured in the same process; rows go to ``benchmarks/results/quantized_speed.csv``.
Where torchao is installed, its weight-only dense layers of ``--torchao`` (int8: ``Int8WeightOnlyConfig``,
half of bf16's bytes; int4: group size 128 in the tinygemm layout, about a quarter) are timed beside
them, the equal-bytes baselines for quantized factors, their linear compiled by inductor as a
compiled model runs it (eager, torchao's tensor subclass dispatches in Python on every call).
"""
from __future__ import annotations

import argparse

import torch

from blastfx.kernels import forward
from blastfx.structures.blast.layout import BlastShape
from blastfx.structures.blast.ops import blast_matmul
from blastfx.structures.blast.quant import formats
from blastfx.structures.blast.quant.ops import blast_matmul_quantized
from common import copies_for, graph_ms, torchao_compile_settings, torchao_weight_only, versions
from layer_speed import SHAPES, rank_at
from rows import add_arguments, measurements, record



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1])
    ap.add_argument("--shapes", nargs="+", default=None, help="OUTxIN")
    ap.add_argument("--factor-dtype", default="int8", choices=list(formats.FORMATS))
    ap.add_argument("--rank-multiple", type=int, default=None,
                    help="round the rank down to a multiple of this (32: int4 rows of whole 16-byte vectors)")
    ap.add_argument("--torchao", nargs="*", default=["int8"], choices=("int8", "int4"),
                    help="torchao weight-only dense baselines to time (where torchao is installed)")
    add_arguments(ap)
    args = ap.parse_args()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else SHAPES
    dt, dev, fmt = torch.bfloat16, "cuda", formats.get(args.factor_dtype)
    print(versions())
    print(f"\n| out x in | b | r | T | dense ms | bf16 BLAST ms | {fmt.name} BLAST ms | bf16 BLAST x | {fmt.name} x | "
          f"{fmt.name} path |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for m, n in shapes:
        r = rank_at(m, n, args.blocks, args.budget)
        if args.rank_multiple:
            r -= r % args.rank_multiple     # e.g. 32: a row of int4 codes in whole 16-byte vectors
        shape = BlastShape.make(m, n, r, args.blocks)
        dense = [torch.randn(m, n, device=dev, dtype=dt) / n ** 0.5 for _ in range(copies_for(m * n * 2))]
        fac = [tuple(torch.randn(*shape.factor_shapes[k], device=dev, dtype=dt) * 0.05 for k in "USV")
               for _ in range(copies_for(shape.num_params * 2))]
        quant = [(*formats.quantize_u(U.float(), fmt), S, *formats.quantize_v(V.float(), fmt)) for U, S, V in
                 fac[:copies_for(shape.num_params)]]
        for T in args.tokens:
            x = torch.randn(T, n, device=dev, dtype=dt)
            blast_matmul(x, *fac[0], None, m)      # autotune outside the graph capture
            t_dense = graph_ms(lambda k: torch.nn.functional.linear(x, dense[k % len(dense)]), len(dense))
            t_blast = graph_ms(lambda k: blast_matmul(x, *fac[k % len(fac)], None, m), len(fac))

            def q(k):
                Uc, su, S, Vc, sv = quant[k % len(quant)]
                return blast_matmul_quantized(x, Uc, su, S, Vc, sv, None, m)

            q(0)                                   # autotune outside the graph capture
            torch.cuda.synchronize()
            t_q = graph_ms(q, len(quant))
            path = forward.quantized_path(T, quant[0][0], shape, dt, False, x.device)
            extra = torchao_metrics(x, dense, t_dense, t_q, fmt.name, args.torchao)
            print(f"| {m}x{n} | {args.blocks} | {r} | {T} | {t_dense:.4f} | {t_blast:.4f} | {t_q:.4f} | "
                  f"{t_dense / t_blast:.2f} | {t_dense / t_q:.2f} | {path} |", flush=True)
            record("quantized_speed", measurements(
                f"{m}x{n} b={args.blocks} T={T} {fmt.name}"
                + (f" rank multiple {args.rank_multiple}" if args.rank_multiple else ""),
                {"out": m, "in": n, "b": args.blocks, "r": r, "T": T, "budget": args.budget, "factor_dtype": fmt.name},
                [("dense time", round(t_dense, 5), "ms"), ("bf16 BLAST time", round(t_blast, 5), "ms"),
                 (f"{fmt.name} BLAST time", round(t_q, 5), "ms"), ("bf16 BLAST vs dense", round(t_dense / t_blast, 3), "x"),
                 (f"{fmt.name} BLAST vs dense", round(t_dense / t_q, 3), "x"), (f"{fmt.name} path", path, "")]
                + extra),
                directory=args.results_dir)


def torchao_metrics(x, dense, t_dense, t_q, name, kinds) -> list:
    """torchao's weight-only dense layers of ``kinds`` on the same weights (copies enough to stream
    their bytes from HBM), ``F.linear`` compiled by inductor with torchao's recommended settings;
    nothing where torchao is not installed."""
    try:
        import torchao  # noqa: F401
    except ImportError:
        print("  (torchao not installed: its weight-only baselines are left out)", flush=True)
        return []
    m, n = dense[0].shape
    linear = torch.compile(torch.nn.functional.linear, dynamic=False)
    metrics = []
    for kind in kinds:
        weights = []
        for w in dense[:copies_for(m * n // (1 if kind == "int8" else 2))]:
            lin = torch.nn.Linear(n, m, bias=False, device=w.device, dtype=w.dtype)
            lin.weight.data.copy_(w)
            weights.append(torchao_weight_only(lin, kind).weight)
        with torchao_compile_settings():                        # compiled at its first call, inside
            t_ao = graph_ms(lambda k: linear(x, weights[k % len(weights)]), len(weights))
        print(f"  torchao {kind} weight-only, compiled: {t_ao:.4f} ms ({t_dense / t_ao:.2f}x dense; {name} BLAST "
              f"{t_ao / t_q:.2f}x it)", flush=True)
        metrics += [(f"torchao {kind} compiled time", round(t_ao, 5), "ms"),
                    (f"torchao {kind} compiled vs dense", round(t_dense / t_ao, 3), "x"),
                    (f"{name} BLAST vs torchao {kind} compiled", round(t_ao / t_q, 3), "x")]
    return metrics


if __name__ == "__main__":
    main()
