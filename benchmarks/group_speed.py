"""Sibling layers that read the same input, at 50% of their parameters: dense vs blastfx one call per
layer vs blastfx's grouped call (what ``backend="blast"`` runs for them at decode sizes); and gated
MLPs, ``down(silu(gate(x)) * up(x))``: dense vs blastfx per layer, with gate/up grouped, and chained
(``blastfx::blast_mlp_chain``, what ``backend="blast"`` runs for them: the autotuner's pick of the
chain's three launches and the grouped form).

    python benchmarks/group_speed.py                         # Llama-2-7B's and -3-8B's groups and MLPs, T = 1
    python benchmarks/group_speed.py --groups "llama2-7b mlp"
    python benchmarks/group_speed.py --factor-dtype int8 int4  # q/k/v and gate/up with quantized factors too
    python benchmarks/group_speed.py --groups "llama2-7b tail"  # o, residual add, RMSNorm and MLP
    python benchmarks/group_speed.py --groups "llama2-7b seam"  # ... and the next block's norm and q/k/v

A block's tail (``"... tail"``): o_proj, the residual add, the RMSNorm and the gated MLP, dense vs
blastfx as its parts run (o's call, the add and norm, the MLP chain op) vs one
``blastfx::blast_block_tail`` call (what ``backend="blast"`` runs for it: the autotuner's pick of the
four-launch tail and its parts). A block seam (``"... seam"``): the tail, the residual add, the next
block's RMSNorm and its q/k/v, dense vs the tail op, add, norm and grouped q/k/v vs one
``blastfx::blast_block_seam`` call. The parts are the ops' own (``_parts`` of
:mod:`blastfx.compiler.block_tail` and :mod:`~blastfx.compiler.block_seam`): exactly what each op's
autotuner times against its one call. Dense and the parts run each residual add with the norm after
it as one launch (:func:`blastfx.kernels.add_norm.add_rms_norm`), as Inductor fuses them in a graph;
dense leaves its outputs as separate tensors.

Every variant is replayed from a CUDA graph over enough weight copies to stream from HBM, dense in
the same process; records rows in ``benchmarks/results/group_speed.csv``.
"""
from __future__ import annotations

import argparse

import torch

import blastfx
from blastfx.compiler import block_seam, block_tail
from blastfx.compiler.block_seam import blast_block_seam
from blastfx.compiler.block_tail import blast_block_tail
from blastfx.compiler.grouping import blast_matmul_group, blast_matmul_quantized_group
from blastfx.compiler.mlp_chain import blast_mlp_chain
from blastfx.kernels import autotune
from blastfx.kernels.add_norm import add_rms_norm
from blastfx.structures.blast.layout import BlastShape
from blastfx.structures.blast.quant import formats
from blastfx.structures.blast.quant.ops import blast_matmul_quantized
from common import copies_for, graph_ms, versions
from layer_speed import rank_at
from rows import add_arguments, measurements, record

GROUPS = {"llama2-7b q/k/v": [(4096, 4096)] * 3, "llama2-7b gate/up": [(11008, 4096)] * 2,
          "llama3-8b q/k/v": [(4096, 4096), (1024, 4096), (1024, 4096)], "llama3-8b gate/up": [(14336, 4096)] * 2}
MLPS = {"llama2-7b mlp": (4096, 11008), "llama3-8b mlp": (4096, 14336)}        # (hidden, intermediate)
# block tails and seams: (hidden, intermediate, the next block's q/k/v heights for a seam)
BLOCKS = {"llama2-7b tail": (4096, 11008, []), "llama3-8b tail": (4096, 14336, []),
          "llama2-7b seam": (4096, 11008, [4096, 4096, 4096]), "llama3-8b seam": (4096, 14336, [4096, 1024, 1024])}


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


EPS = 1e-5


def dense_tail(a, residual, weights, norm_weight):
    """o, the residual add, the RMSNorm and the gated MLP, dense: ``weights`` = (o, gate, up, down).
    The add and norm run as one launch (:func:`add_rms_norm`), as Inductor fuses them in a graph."""
    h, mlp = _dense_tail_halves(a, residual, weights, norm_weight)
    return h + mlp


def _dense_tail_halves(a, residual, weights, norm_weight):
    F = torch.nn.functional
    o, g, u, d = weights
    h, n = add_rms_norm(residual, F.linear(a, o), norm_weight, EPS)
    return h, F.linear(F.silu(F.linear(n, g)) * F.linear(n, u), d)


def _op_lists(layers) -> tuple[list, ...]:
    """(U, S, V, bias, out_features) lists, the block ops' arguments, of ``layers`` ((U, S, V, bias, shape) each)."""
    U, S, V, bias, shapes = (list(t) for t in zip(*layers))
    return U, S, V, bias, [s.out_features for s in shapes]


def _tail_sum(both, layers):
    """h + the MLP's output: the final residual add of a tail op's ``[h | mlp]``."""
    H = layers[0][4].out_features
    return both[:, :H] + both[:, H:]


def tail_in_parts(a, residual, layers, norm_weight):
    """The same with BLAST layers as the parts run without the block-tail rewrite (o's call, the add
    and norm in one launch, the MLP chain op): the op's own parts, which its autotuner times against
    the one call. ``layers``: (U, S, V, bias, shape) each."""
    return _tail_sum(block_tail._parts(a, residual, layers, norm_weight, EPS), layers)


def tail_in_one_call(a, residual, layers, norm_weight):
    """The same as one ``blastfx::blast_block_tail`` call (and the final residual add)."""
    return _tail_sum(blast_block_tail(a, residual, *_op_lists(layers), norm_weight, EPS), layers)


def dense_seam(a, residual, weights, norm_weight, next_norm_weight):
    """The dense tail, then its final add with the next block's norm (one launch) and q/k/v:
    ``weights`` = (o, gate, up, down, *heads). Returns ``[h2, *heads]``, separate tensors as a graph
    leaves them (no concatenation to pay for)."""
    h, mlp = _dense_tail_halves(a, residual, weights[:4], norm_weight)
    h2, n = add_rms_norm(h, mlp, next_norm_weight, EPS)
    return [h2] + [torch.nn.functional.linear(n, w) for w in weights[4:]]


def seam_in_parts(a, residual, layers, norm_weight, next_norm_weight):
    """The same as it runs without the seam rewrite (the tail op, the add and norm in one launch, the
    grouped heads): the op's own parts, which its autotuner times against the one call."""
    return block_seam._parts(a, residual, layers, norm_weight, EPS, next_norm_weight, EPS)


def seam_in_one_call(a, residual, layers, norm_weight, next_norm_weight):
    """The same as one ``blastfx::blast_block_seam`` call."""
    return blast_block_seam(a, residual, *_op_lists(layers), norm_weight, EPS, next_norm_weight, EPS)


# each block form: (dense, as its parts run, as one call, the autotuner key's name, norms it reads)
FORMS = {"tail": (dense_tail, tail_in_parts, tail_in_one_call, "block_tail", 1),
         "seam": (dense_seam, seam_in_parts, seam_in_one_call, "block_seam", 2)}


def block_rows(name, T_values, args):
    """Dense vs blastfx's parts vs one call of a block tail (o, the residual add, the norm, the MLP)
    or a block seam (the tail, the add, the next norm and q/k/v)."""
    kind = name.rsplit(" ", 1)[1]
    hidden, inter, heads = BLOCKS[name]
    dense_form, parts_form, one_call, key_name, norms = FORMS[kind]
    dt, dev = torch.bfloat16, "cuda"
    shapes = [(hidden, hidden), (inter, hidden), (inter, hidden), (hidden, inter)] + [(m, hidden) for m in heads]
    dense = [[torch.randn(m, n, device=dev, dtype=dt) / n ** 0.5 for m, n in shapes]
             for _ in range(copies_for(sum(m * n * 2 for m, n in shapes)))]
    blast_shapes = [BlastShape.make(m, n, rank_at(m, n, args.blocks, args.budget), args.blocks) for m, n in shapes]
    fac = [[(U, S, V, None, s) for (U, S, V), s in zip(_factors(blast_shapes, None, dev, dt), blast_shapes)]
           for _ in range(copies_for(sum(s.num_params * 2 for s in blast_shapes)))]
    weights = [1 + 0.1 * torch.randn(hidden, device=dev, dtype=dt) for _ in range(norms)]
    for T in T_values:
        a = torch.randn(T, hidden, device=dev, dtype=dt)
        residual = torch.randn(T, hidden, device=dev, dtype=dt)
        t_dense = graph_ms(lambda k: dense_form(a, residual, dense[k], *weights), len(dense))
        times = {}
        for label, fn in (("parts", parts_form), (kind, one_call)):
            fn(a, residual, fac[0], *weights)                       # autotune outside the graph
            times[label] = graph_ms(lambda k: fn(a, residual, fac[k], *weights), len(fac))
        chosen = next((v[0] for key, v in autotune._cache.items() if key[0] == key_name
                       and key[2] == tuple(blast_shapes)), "default")
        print(f"| {name} | {T} | {t_dense:.4f} | {times['parts']:.4f} | {times[kind]:.4f} | "
              f"{t_dense / times['parts']:.2f} | {t_dense / times[kind]:.2f} | {chosen} |", flush=True)
        record("group_speed", measurements(
            f"{name} T={T}", dict(group=name, T=T, b=args.blocks, budget=args.budget, dtype="bfloat16",
                                  shapes=[f"{m}x{n}" for m, n in shapes], ranks=[s.rank for s in blast_shapes]),
            [("dense time", t_dense, "ms"), ("blastfx parts time", times["parts"], "ms"),
             (f"blastfx {kind} time", times[kind], "ms"), ("parts vs dense", round(t_dense / times["parts"], 3), "x"),
             (f"{kind} vs dense", round(t_dense / times[kind], 3), "x"), (f"{kind} path", str(chosen), "")]),
            directory=args.results_dir)


def _factors(blast_shapes, factor_dtype, dev, dt):
    """One copy of every layer's factors: (U, S, V) in ``dt``, or with ``factor_dtype`` the op's
    arguments (U codes, U_scale, S, V codes, V_scale)."""
    out = []
    for s in blast_shapes:
        U, S, V = (torch.randn(*s.factor_shapes[k], device=dev, dtype=dt) * 0.05 for k in "USV")
        if factor_dtype is None:
            out.append((U, S, V))
        else:
            fmt = formats.get(factor_dtype)
            (Uc, su), (Vc, sv) = formats.quantize_u(U.float(), fmt), formats.quantize_v(V.float(), fmt)
            out.append((Uc, su, S, Vc, sv))
    return out


def group_rows(name, T_values, args, factor_dtype=None):
    """Dense vs blastfx per layer and grouped for one group of siblings (factors in ``factor_dtype``
    codes, or the activation dtype)."""
    dt, dev = torch.bfloat16, "cuda"
    shapes = GROUPS[name]
    n = shapes[0][1]
    dense = [[torch.randn(m, n, device=dev, dtype=dt) / n ** 0.5 for m, _ in shapes]
             for _ in range(copies_for(sum(m * n * 2 for m, _ in shapes)))]
    blast_shapes = [BlastShape.make(m, n, rank_at(m, n, args.blocks, args.budget), args.blocks) for m, _ in shapes]
    first = _factors(blast_shapes, factor_dtype, dev, dt)
    nbytes = sum(t.numel() * t.element_size() for f in first for t in f)
    fac = [first] + [_factors(blast_shapes, factor_dtype, dev, dt) for _ in range(copies_for(nbytes) - 1)]
    outs = [s.out_features for s in blast_shapes]
    call = blastfx.blast_matmul if factor_dtype is None else blast_matmul_quantized
    label = "" if factor_dtype is None else f" {factor_dtype}"
    for T in T_values:
        x = torch.randn(T, n, device=dev, dtype=dt)
        t_dense = graph_ms(lambda k: [torch.nn.functional.linear(x, w) for w in dense[k]], len(dense))
        for f in fac[0]:
            call(x, *f)                                    # autotune outside the graph
        t_layers = graph_ms(lambda k: [call(x, *f) for f in fac[k]], len(fac))

        def grouped(k):
            lists = [list(t) for t in zip(*fac[k])]
            op = blast_matmul_group if factor_dtype is None else blast_matmul_quantized_group
            return op(x, *lists, [None] * len(outs), outs)

        grouped(0)
        kind = "group" if factor_dtype is None else "quantized_group"
        chosen = next((v[0] for key, v in autotune._cache.items() if key[0] == kind
                       and key[2] == tuple(blast_shapes)), "default")
        t_group = graph_ms(grouped, len(fac))
        print(f"| {name}{label} | {T} | {t_dense:.4f} | {t_layers:.4f} | {t_group:.4f} | {t_dense / t_layers:.2f} | "
              f"{t_dense / t_group:.2f} | {chosen} |", flush=True)
        record("group_speed", measurements(
            f"{name} T={T}{label}", dict(group=name, T=T, b=args.blocks, budget=args.budget, dtype="bfloat16",
                                          factor_dtype=factor_dtype or "bfloat16",
                                          shapes=[f"{m}x{n}" for m, n in shapes], ranks=[s.rank for s in blast_shapes]),
            [("dense time", t_dense, "ms"), ("blastfx per-layer time", t_layers, "ms"),
             ("blastfx grouped time", t_group, "ms"), ("per-layer vs dense", round(t_dense / t_layers, 3), "x"),
             ("grouped vs dense", round(t_dense / t_group, 3), "x"), ("grouped path", str(chosen), "")]),
            directory=args.results_dir)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", nargs="+", default=list(GROUPS) + list(MLPS) + list(BLOCKS),
                    choices=list(GROUPS) + list(MLPS) + list(BLOCKS))
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1])
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--factor-dtype", nargs="+", default=[], choices=formats.names(),
                    help="also time the sibling groups with U and V stored in these formats")
    add_arguments(ap)
    args = ap.parse_args()
    print(versions())
    print("\n| group | T | dense ms | blastfx per layer ms | blastfx grouped ms | per layer x | grouped x | chosen |"
          "\n|---|---|---|---|---|---|---|---|", flush=True)
    for factor_dtype in [None] + args.factor_dtype:
        for name in (g for g in args.groups if g in GROUPS):
            group_rows(name, args.tokens, args, factor_dtype)
    mlps = [g for g in args.groups if g in MLPS]
    if mlps:
        print("\n| MLP | T | dense ms | blastfx per layer ms | grouped ms | chained ms | grouped x | chained x | "
              "chained path |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in mlps:
        mlp_rows(name, args.tokens, args)
    blocks = [g for g in args.groups if g in BLOCKS]
    if blocks:
        print("\n| block | T | dense ms | blastfx parts ms | one call ms | parts x | one call x | path |"
              "\n|---|---|---|---|---|---|---|---|", flush=True)
    for name in blocks:
        block_rows(name, args.tokens, args)

if __name__ == "__main__":
    main()
