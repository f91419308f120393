"""Graph pass: a block tail and the next block's grouped q/k/v, across the residual add and the next
RMSNorm, become one ``blastfx::blast_block_seam`` call.

Why: after a block tail (:mod:`.block_tail`) a Llama-style model adds the MLP's output to the residual
stream, normalizes it and runs the next block's q/k/v as one grouped call: down's second stage, a
norm kernel and the group's two stages. Row ``c`` of down's output is input feature ``c`` of q, k
and v, so the tail's last kernel can become a lead kernel like the tail's own
(:func:`blastfx.kernels.block_tail.launch_lead`): down's w·Uᵀ, the residual add, the next norm's
sums of squares and q's, k's and v's x·V; their second stage applies the norm's per-token scale.
A block boundary then costs five launches where it cost eight (tail four, norm, group two, with the
residual add fused into the norm by Inductor).

The pass runs on the dynamo graph the ``"blast"`` backend receives, after sibling grouping: it
rewrites a ``blastfx::blast_matmul_group`` call of 2 or 3 members whose input is an RMSNorm (as
:func:`.block_tail.match_rms_norm` finds it) of ``h + mlp``, the two halves of a
``blastfx::blast_block_tail`` call's output used only there. The new residual stream is read back
from the seam's output, so it may have any uses after the group. Decode sizes on CUDA, graphs
without autograd (the tail's conditions); on CUDA the op is timed against running the tail, the add
and norm and the group as before by the autotuner.

With quantized factors (a ``blastfx::blast_block_tail_quantized`` call and a
``blastfx::blast_matmul_quantized_group`` call) the seam is one ``blastfx::blast_block_seam_quantized``
call of the same kernels reading codes.

``blastfx::blast_block_seam`` and ``blastfx::blast_block_seam_quantized`` are defined here with their
references (the parts' reference calls, the source of truth) and fakes; they have no autograd.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from ..kernels.add_norm import add_rms_norm, rms_norm_reference
from ..structures.blast.ops import check_inputs
from ..structures.blast.quant.ops import check_quantized_inputs
from .block_tail import _check_quantized_tail, _check_tail, _fn, _same, _width, match_rms_norm, norm_is_private
from .grouping import blast_matmul_group, blast_matmul_quantized_group, check_group_mode, tuned_decode_call

stats = {"seams": 0}


@torch.library.custom_op("blastfx::blast_block_seam", mutates_args=())
def blast_block_seam(x: torch.Tensor, residual: torch.Tensor, U: list[torch.Tensor], S: list[torch.Tensor],
                     V: list[torch.Tensor], bias: list[Optional[torch.Tensor]], out_features: list[int],
                     norm_weight: torch.Tensor, eps: float, next_norm_weight: torch.Tensor,
                     next_eps: float) -> torch.Tensor:
    """``cat([h2, *heads], -1)``: the block tail of the first four layers (o, gate, up, down; see
    ``blast_block_tail``) gives h and the MLP's output, ``h2 = h + mlp``, and the remaining 2 or 3
    layers (the next block's q/k/v) read ``rms_norm_reference(h2, next_norm_weight, next_eps)``
    (reference: the parts' reference calls)."""
    _check_seam(x, residual, U, S, V, bias, out_features, norm_weight, next_norm_weight)
    tail = torch.ops.blastfx.blast_block_tail(x, residual, U[:4], S[:4], V[:4], bias[:4], out_features[:4],
                                              norm_weight, eps)
    h, mlp = tail.chunk(2, dim=-1)
    h2 = h + mlp
    heads = blast_matmul_group(rms_norm_reference(h2, next_norm_weight, next_eps), U[4:], S[4:], V[4:], bias[4:],
                               out_features[4:])
    return torch.cat([h2, heads], dim=-1)


@blast_block_seam.register_fake
def _(x, residual, U, S, V, bias, out_features, norm_weight, eps, next_norm_weight, next_eps):
    shapes = _check_seam(x, residual, U, S, V, bias, out_features, norm_weight, next_norm_weight)
    return x.new_empty(*x.shape[:-1], shapes[0].out_features + sum(s.out_features for s in shapes[4:]))


def _check_seam(x, residual, U, S, V, bias, out_features, norm_weight, next_norm_weight):
    counts = {len(U), len(S), len(V), len(bias), len(out_features)}
    if len(counts) != 1 or not 6 <= len(U) <= 7:
        raise ValueError("blast_block_seam takes six or seven layers (o, gate, up, down and 2 or 3 heads): one U, S, "
                         f"V, bias and out_features each, got {len(U)}, {len(S)}, {len(V)}, {len(bias)}, "
                         f"{len(out_features)}")
    tail = _check_tail(x, residual, U[:4], S[:4], V[:4], bias[:4], out_features[:4], norm_weight)
    H = tail[0].out_features
    _check_next_weight(x, next_norm_weight, H)
    h2 = x.new_empty(()).expand(*x.shape[:-1], H)
    return tail + [check_inputs(h2, *a) for a in zip(U[4:], S[4:], V[4:], bias[4:], out_features[4:])]


def _check_next_weight(x, next_norm_weight, H: int) -> None:
    if tuple(next_norm_weight.shape) != (H,) or next_norm_weight.dtype != x.dtype:
        raise ValueError(f"blast_block_seam: the next norm weight must be ({H},) of {x.dtype}, got "
                         f"{tuple(next_norm_weight.shape)} of {next_norm_weight.dtype}")


@blast_block_seam.register_kernel("cuda")
def _cuda_kernel(x, residual, U, S, V, bias, out_features, norm_weight, eps, next_norm_weight, next_eps):
    shapes = _check_seam(x, residual, U, S, V, bias, out_features, norm_weight, next_norm_weight)
    return _tuned(x, residual, list(zip(U, S, V, bias, shapes)), norm_weight, eps, next_norm_weight, next_eps)


def _tuned(x, residual, layers, norm_weight, eps, next_norm_weight, next_eps):
    """The op's CUDA kernel: the five-launch seam or its parts, as the autotuner picks."""
    from ..kernels import block_tail

    residual2 = residual.reshape(-1, residual.shape[-1])

    def parts(x2, ls):
        return _parts(x2, residual2, ls, norm_weight, eps, next_norm_weight, next_eps)

    def seam(x2, ls, cfg):
        return block_tail.blast_block_seam_gemv(x2, residual2, ls[0], norm_weight, eps, *ls[1:4], next_norm_weight,
                                                next_eps, ls[4:], cfg)

    name = "block_seam" if len(layers[0]) == 5 else "quantized_block_seam"
    return tuned_decode_call(name, x, layers, ("parts", parts), ("seam", seam, block_tail.candidates),
                             lambda ls: block_tail.seam_chainable(*ls[:4], ls[4:]))


def _parts(x2, residual2, layers, norm_weight, eps, next_norm_weight, next_eps):
    """The seam as it runs without the rewrite: the tail op, the add and norm (one launch on CUDA, as
    Inductor fuses them; h2 written into the output), the group op (each layer (U, S, V, bias,
    shape), or with codes (U, S, V, bias, shape, U_scale, V_scale))."""
    ops = torch.ops.blastfx
    fields = (0, 1, 2, 3) if len(layers[0]) == 5 else (0, 5, 1, 2, 6, 3)        # the ops' argument order
    lists = [[layer[k] for layer in layers] for k in fields] + [[layer[4].out_features for layer in layers]]
    tail_op, group_op = ((ops.blast_block_tail, ops.blast_matmul_group) if len(layers[0]) == 5 else
                         (ops.blast_block_tail_quantized, ops.blast_matmul_quantized_group))
    tail = tail_op(x2, residual2, *(a[:4] for a in lists), norm_weight, eps)
    h, mlp = tail.chunk(2, dim=-1)
    H = h.shape[-1]
    out = x2.new_empty(x2.shape[0], H + sum(lists[-1][4:]))
    _, n = add_rms_norm(h, mlp, next_norm_weight, next_eps, h_out=out[:, :H])
    out[:, H:].copy_(group_op(n, *(a[4:] for a in lists)))
    return out


@torch.library.custom_op("blastfx::blast_block_seam_quantized", mutates_args=())
def blast_block_seam_quantized(x: torch.Tensor, residual: torch.Tensor, U: list[torch.Tensor],
                               U_scale: list[torch.Tensor], S: list[torch.Tensor], V: list[torch.Tensor],
                               V_scale: list[torch.Tensor], bias: list[Optional[torch.Tensor]], out_features: list[int],
                               norm_weight: torch.Tensor, eps: float, next_norm_weight: torch.Tensor,
                               next_eps: float) -> torch.Tensor:
    """``blast_block_seam`` for layers with quantized factors (as ``blast_matmul_quantized`` takes
    them); reference: the parts' quantized reference calls."""
    lists = (U, U_scale, S, V, V_scale, bias, out_features)
    _check_quantized_seam(x, residual, lists, norm_weight, next_norm_weight)
    tail = torch.ops.blastfx.blast_block_tail_quantized(x, residual, *(a[:4] for a in lists), norm_weight, eps)
    h, mlp = tail.chunk(2, dim=-1)
    h2 = h + mlp
    heads = blast_matmul_quantized_group(rms_norm_reference(h2, next_norm_weight, next_eps), *(a[4:] for a in lists))
    return torch.cat([h2, heads], dim=-1)


@blast_block_seam_quantized.register_fake
def _(x, residual, U, U_scale, S, V, V_scale, bias, out_features, norm_weight, eps, next_norm_weight, next_eps):
    shapes = _check_quantized_seam(x, residual, (U, U_scale, S, V, V_scale, bias, out_features), norm_weight,
                                   next_norm_weight)
    return x.new_empty(*x.shape[:-1], shapes[0].out_features + sum(s.out_features for s in shapes[4:]))


def _check_quantized_seam(x, residual, lists, norm_weight, next_norm_weight):
    if len({len(a) for a in lists}) != 1 or not 6 <= len(lists[0]) <= 7:
        raise ValueError("blast_block_seam_quantized takes six or seven layers (o, gate, up, down and 2 or 3 heads): "
                         "one U, U_scale, S, V, V_scale, bias and out_features each, got "
                         f"{', '.join(str(len(a)) for a in lists)}")
    tail = _check_quantized_tail(x, residual, *(a[:4] for a in lists), norm_weight)
    H = tail[0].out_features
    _check_next_weight(x, next_norm_weight, H)
    h2 = x.new_empty(()).expand(*x.shape[:-1], H)
    return tail + [check_quantized_inputs(h2, *member) for member in zip(*(a[4:] for a in lists))]


@blast_block_seam_quantized.register_kernel("cuda")
def _cuda_kernel_quantized(x, residual, U, U_scale, S, V, V_scale, bias, out_features, norm_weight, eps,
                           next_norm_weight, next_eps):
    shapes = _check_quantized_seam(x, residual, (U, U_scale, S, V, V_scale, bias, out_features), norm_weight,
                                   next_norm_weight)
    return _tuned(x, residual, list(zip(U, S, V, bias, shapes, U_scale, V_scale)), norm_weight, eps, next_norm_weight,
                  next_eps)


def _narrowed(node, source) -> tuple[int, int] | None:
    """(start, length) if ``node`` is ``torch.narrow(source, -1, start, length)``, else None."""
    if _fn(node, torch.narrow) and len(node.args) == 4 and node.args[0] is source and node.args[1] == -1:
        return node.args[2], node.args[3]
    return None


def seam_block_boundaries(gm: fx.GraphModule, mode: str = "auto") -> int:
    """Replace each ``blastfx::blast_matmul_group`` call of 2 or 3 members whose input is an RMSNorm of
    ``h + mlp``, the halves of a ``blastfx::blast_block_tail`` call used only there, by one
    ``blastfx::blast_block_seam`` call; returns how many. ``mode`` is the backend's ``chain_norm``:
    "auto" and "always" (the tail's own conditions already hold), or "never"."""
    if check_group_mode(mode, "chain_norm") == "never":
        return 0
    ops = torch.ops.blastfx
    # the group op -> (the tail op it follows, the seam op)
    kinds = {ops.blast_matmul_group: (ops.blast_block_tail, ops.blast_block_seam.default),
             ops.blast_matmul_quantized_group: (ops.blast_block_tail_quantized, ops.blast_block_seam_quantized.default)}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found = []
    for group in gm.graph.nodes:
        group_op = next((op for op in kinds if _fn(group, op, op.default)), None)
        if group_op is None or not 2 <= len(group.args[1]) <= 3:
            continue
        tail_op, seam_op = kinds[group_op]
        norm = match_rms_norm(group.args[0])
        if norm is None:
            continue
        h2, weight, eps, norm_nodes = norm
        if not (_fn(h2, operator.add, torch.add) and len(h2.args) == 2 and not h2.kwargs):
            continue
        halves = [a for a in h2.args if isinstance(a, fx.Node)]
        tails = {a.args[0] for a in halves if _fn(a, torch.narrow) and a.args}
        if len(halves) != 2 or len(tails) != 1:
            continue
        tail = tails.pop()
        if not _fn(tail, tail_op, tail_op.default):
            continue
        H = _width(h2)
        if sorted(_narrowed(a, tail) or (-1, -1) for a in halves) != [(0, H), (H, H)]:
            continue
        later = all(order[u] > order[group] for u in h2.users if u not in norm_nodes)
        private = (norm_is_private(norm_nodes, group) and all(set(a.users) == {h2} for a in halves)
                   and set(tail.users) == set(halves))
        if later and private and _same(halves[0], halves[1]):
            found.append((group, tail, halves, h2, weight, eps, norm_nodes, seam_op))
    for group, tail, halves, h2, weight, eps, norm_nodes, seam_op in found:
        t = tail.args               # (x, residual, *lists, norm_weight, eps)
        g = group.args              # (x, *lists): the same lists in the same order
        count = len(g) - 1
        with gm.graph.inserting_before(group):
            seam = gm.graph.call_function(seam_op, (
                t[0], t[1], *([*t[2 + k], *g[1 + k]] for k in range(count)), t[2 + count], t[3 + count], weight,
                float(eps)))
            H = _width(h2)
            new_h2 = gm.graph.call_function(torch.narrow, (seam, -1, 0, H))
            heads = gm.graph.call_function(torch.narrow, (seam, -1, H, sum(group.args[-1])))
        new_h2.meta.update(h2.meta)
        heads.meta.update(group.meta)
        group.replace_all_uses_with(heads)
        h2.replace_all_uses_with(new_h2)
        for n in (group, *norm_nodes, h2, *halves, tail):
            gm.graph.erase_node(n)
    if found:
        gm.graph.lint()
        gm.recompile()
    stats["seams"] += len(found)
    return len(found)

