"""Where a decode-sized BLAST call spends its time: each stage of the decode kernels alone, both, and
each launch mode, against dense cuBLAS and the measured streaming bandwidth of the GPU.

    python benchmarks/decode_stages.py                  # Llama-2-7B layer shapes, b = 4, T = 1

Stage 1 streams V (x·V into partial sums, the last partial of each r-tile mixes it into w), stage 2
streams U (w·Uᵀ). Each time is a CUDA-graph replay over weight copies rotated out of L2; the
bandwidths are the factor bytes over that time, beside the "stream" bandwidth (a dense GEMV's, the
best a read of the same bytes reaches on this GPU) so the gap per stage is explicit.
"""
from __future__ import annotations

import argparse

import torch

from blastfx.kernels import decode, forward
from blastfx.structures.blast.layout import BlastShape
from common import copies_for, graph_ms, versions
from rows import add_arguments, measurements, record


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "4096x11008"], help="OUTxIN")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1])
    ap.add_argument("--budget", type=float, default=0.5)
    add_arguments(ap)
    args = ap.parse_args()
    dt, dev = torch.bfloat16, "cuda"
    print(versions(), flush=True)
    modes = {c["mode"]: c for c in reversed(decode.CANDIDATES)}     # the first config of each mode
    for text in args.shapes:
        m, n = map(int, text.split("x"))
        r = int(args.budget * m * n / (m + n + args.blocks ** 2)) // 16 * 16
        shape = BlastShape.make(m, n, r, args.blocks)
        nd = copies_for(m * n * 2)
        dense = [torch.randn(m, n, device=dev, dtype=dt) / n ** 0.5 for _ in range(nd)]
        fac = [tuple(torch.randn(*shape.factor_shapes[k], device=dev, dtype=dt) * 0.05 for k in "USV")
               for _ in range(copies_for(shape.num_params * 2))]
        v_bytes, u_bytes = V_bytes(shape), U_bytes(shape)
        for T in args.tokens:
            x = torch.randn(T, n, device=dev, dtype=dt)
            t_dense = graph_ms(lambda k: torch.nn.functional.linear(x, dense[k]), nd)
            stream = m * n * 2 / t_dense / 1e6                                   # GB/s
            metrics = [("dense time", t_dense, "ms"), ("dense stream bandwidth", round(stream), "GB/s")]
            two = {**modes["pdl"], "mode": "two"}
            for stage, nbytes in ((1, v_bytes), (2, u_bytes)):
                t = graph_ms(lambda k: decode.blast_decode(x, *fac[k], None, shape, two, only_stage=stage), len(fac))
                metrics += [(f"stage {stage} time", t, "ms"), (f"stage {stage} bandwidth", round(nbytes / t / 1e6), "GB/s")]
            for mode, cfg in modes.items():
                if mode == "pdl" and not decode.pdl_supported(x.device):
                    continue
                t = graph_ms(lambda k: decode.blast_decode(x, *fac[k], None, shape, cfg), len(fac))
                metrics += [(f"{mode} time", t, "ms"), (f"{mode} vs dense", round(t_dense / t, 3), "x")]
            t_best = graph_ms(lambda k: forward.blast_matmul_triton(x, *fac[k]), len(fac))
            metrics += [("blastfx vs dense", round(t_dense / t_best, 3), "x"),
                        ("ideal vs dense", round(m * n / shape.num_params, 3), "x")]
            print(f"{m}x{n} b={args.blocks} r={r} T={T}: " + ", ".join(
                f"{k} {v:.4g}{u}" for k, v, u in metrics), flush=True)
            record("decode_stages", measurements(f"{m}x{n} b={args.blocks} T={T}", dict(
                out=m, b=args.blocks, r=r, T=T, budget=args.budget, dtype="bfloat16", **{"in": n}), metrics),
                directory=args.results_dir)
        del dense, fac


def V_bytes(shape):
    """Bytes of V as stored (padded), bf16."""
    return shape.b_in * shape.q * shape.rank * 2


def U_bytes(shape):
    """Bytes of U as stored (padded), bf16."""
    return shape.b_out * shape.p * shape.rank * 2


if __name__ == "__main__":
    main()
