"""Sibling layers that read the same input, at 50% of their parameters: dense vs blastfx one call per
layer vs blastfx's grouped call (what ``backend="blast"`` runs for them at decode sizes); and gated
MLPs, ``down(silu(gate(x)) * up(x))``: dense vs blastfx per layer, with gate/up grouped, and chained
(``blastfx::blast_mlp_chain``, what ``backend="blast"`` runs for them: the autotuner's pick of the
chain's three launches and the grouped form).

    python benchmarks/group_speed.py                         # Llama-2-7B's and -3-8B's groups and MLPs, T = 1
    python benchmarks/group_speed.py --groups "llama2-7b mlp"

Every variant is replayed from a CUDA graph over enough weight copies to stream from HBM, dense in
the same process; records rows in ``benchmarks/results/group_speed.csv``.
"""
from __future__ import annotations

import argparse

import torch

import blastfx
from blastfx.compiler.grouping import blast_matmul_group
from blastfx.compiler.mlp_chain import blast_mlp_chain
from blastfx.kernels import autotune
from blastfx.structures.blast.layout import BlastShape
from common import copies_for, graph_ms, versions
from layer_speed import rank_at
from rows import add_arguments, measurements, record

GROUPS = {"llama2-7b q/k/v": [(4096, 4096)] * 3, "llama2-7b gate/up": [(11008, 4096)] * 2,
          "llama3-8b q/k/v": [(4096, 4096), (1024, 4096), (1024, 4096)], "llama3-8b gate/up": [(14336, 4096)] * 2}
MLPS = {"llama2-7b mlp": (4096, 11008), "llama3-8b mlp": (4096, 14336)}        # (hidden, intermediate)


def mlp_rows(name, T_values, args):
    """Dense vs blastfx per layer, grouped and chained for one gated MLP."""
    hidden, inter = MLPS[name]
    dt, dev = torch.bfloat16, "cuda"
    shapes = [(inter, hidden), (inter, hidden), (hidden, inter)]            # gate, up, down
    dense = [[torch.randn(m, n, device=dev, dtype=dt) / n ** 0.5 for m, n in shapes]
             for _ in range(copies_for(sum(m * n * 2 for m, n in shapes)))]
    blast_shapes = [BlastShape.make(m, n, rank_at(m, n, args.blocks, args.budget), args.blocks) for m, n in shapes]
    fac = [[tuple(torch.randn(*s.factor_shapes[k], device=dev, dtype=dt) * 0.05 for k in "USV") for s in blast_shapes]
           for _ in range(copies_for(sum(s.num_params * 2 for s in blast_shapes)))]
    outs = [s.out_features for s in blast_shapes]
    F = torch.nn.functional
    for T in T_values:
        x = torch.randn(T, hidden, device=dev, dtype=dt)

        def per_layer(k):
            g, u, d = fac[k]
            return blastfx.blast_matmul(F.silu(blastfx.blast_matmul(x, *g)) * blastfx.blast_matmul(x, *u), *d)

        def grouped(k):
            g, u, d = fac[k]
            gu = blast_matmul_group(x, [g[0], u[0]], [g[1], u[1]], [g[2], u[2]], [None, None], outs[:2])
            a, b = gu.split(outs[:2], dim=-1)
            return blastfx.blast_matmul(F.silu(a) * b, *d)

        def chained(k):
            U, S, V = (list(t) for t in zip(*fac[k]))
            return blast_mlp_chain(x, U, S, V, [None] * 3, outs)

        t_dense = graph_ms(lambda k: F.linear(F.silu(F.linear(x, dense[k][0])) * F.linear(x, dense[k][1]),
                                              dense[k][2]), len(dense))
        times = {}
        for label, fn in (("per-layer", per_layer), ("grouped", grouped), ("chained", chained)):
            fn(0)                                                   # autotune outside the graph
            times[label] = graph_ms(fn, len(fac))
        chosen = next((v[0] for key, v in autotune._cache.items() if key[0] == "mlp_chain"
                       and key[2] == tuple(blast_shapes)), "default")
        print(f"| {name} | {T} | {t_dense:.4f} | {times['per-layer']:.4f} | {times['grouped']:.4f} | "
              f"{times['chained']:.4f} | {t_dense / times['grouped']:.2f} | {t_dense / times['chained']:.2f} | "
              f"{chosen} |", flush=True)
        record("group_speed", measurements(
            f"{name} T={T}", dict(group=name, T=T, b=args.blocks, budget=args.budget, dtype="bfloat16",
                                  shapes=[f"{m}x{n}" for m, n in shapes], ranks=[s.rank for s in blast_shapes]),
            [("dense time", t_dense, "ms"), ("blastfx per-layer time", times["per-layer"], "ms"),
             ("blastfx grouped time", times["grouped"], "ms"), ("blastfx chained time", times["chained"], "ms"),
             ("per-layer vs dense", round(t_dense / times["per-layer"], 3), "x"),
             ("grouped vs dense", round(t_dense / times["grouped"], 3), "x"),
             ("chained vs dense", round(t_dense / times["chained"], 3), "x"), ("chained path", str(chosen), "")]),
            directory=args.results_dir)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", nargs="+", default=list(GROUPS) + list(MLPS), choices=list(GROUPS) + list(MLPS))
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1])
    ap.add_argument("--budget", type=float, default=0.5)
    add_arguments(ap)
    args = ap.parse_args()
    dt, dev = torch.bfloat16, "cuda"
    print(versions())
    print("\n| group | T | dense ms | blastfx per layer ms | blastfx grouped ms | per layer x | grouped x | chosen |"
          "\n|---|---|---|---|---|---|---|---|", flush=True)
    for name in (g for g in args.groups if g in GROUPS):
        shapes = GROUPS[name]
        n = shapes[0][1]
        dense_bytes = sum(m * n * 2 for m, _ in shapes)
        dense = [[torch.randn(m, n, device=dev, dtype=dt) / n ** 0.5 for m, _ in shapes]
                 for _ in range(copies_for(dense_bytes))]
        blast_shapes = [BlastShape.make(m, n, rank_at(m, n, args.blocks, args.budget), args.blocks) for m, _ in shapes]
        fac = [[tuple(torch.randn(*s.factor_shapes[k], device=dev, dtype=dt) * 0.05 for k in "USV") for s in blast_shapes]
               for _ in range(copies_for(sum(s.num_params * 2 for s in blast_shapes)))]
        for T in args.tokens:
            x = torch.randn(T, n, device=dev, dtype=dt)
            t_dense = graph_ms(lambda k: [torch.nn.functional.linear(x, w) for w in dense[k]], len(dense))
            for f in fac[0]:
                blastfx.blast_matmul(x, *f)                        # autotune outside the graph
            t_layers = graph_ms(lambda k: [blastfx.blast_matmul(x, *f) for f in fac[k]], len(fac))

            def grouped(k):
                U, S, V = (list(t) for t in zip(*fac[k]))
                return blast_matmul_group(x, U, S, V, [None] * len(U), [s.out_features for s in blast_shapes])

            grouped(0)
            chosen = next((v[0] for key, v in autotune._cache.items() if key[0] == "group"
                           and key[2] == tuple(blast_shapes)), "default")
            t_group = graph_ms(grouped, len(fac))
            print(f"| {name} | {T} | {t_dense:.4f} | {t_layers:.4f} | {t_group:.4f} | {t_dense / t_layers:.2f} | "
                  f"{t_dense / t_group:.2f} | {chosen} |", flush=True)
            record("group_speed", measurements(
                f"{name} T={T}", dict(group=name, T=T, b=args.blocks, budget=args.budget, dtype="bfloat16",
                                      shapes=[f"{m}x{n}" for m, n in shapes], ranks=[s.rank for s in blast_shapes]),
                [("dense time", t_dense, "ms"), ("blastfx per-layer time", t_layers, "ms"),
                 ("blastfx grouped time", t_group, "ms"), ("per-layer vs dense", round(t_dense / t_layers, 3), "x"),
                 ("grouped vs dense", round(t_dense / t_group, 3), "x"), ("grouped path", str(chosen), "")]),
                directory=args.results_dir)
        del dense, fac
    mlps = [g for g in args.groups if g in MLPS]
    if mlps:
        print("\n| MLP | T | dense ms | blastfx per layer ms | grouped ms | chained ms | grouped x | chained x | "
              "chained path |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in mlps:
        mlp_rows(name, args.tokens, args)


if __name__ == "__main__":
    main()
