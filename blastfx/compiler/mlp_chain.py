"""Graph pass: a gated MLP of BLAST layers, ``down(silu(gate(x)) * up(x))``, becomes one chained call.

Why: at decode a decoder block's MLP otherwise launches five kernels (gate/up as one grouped call of
two stages, SiLU·mul, down's two stages), each paying a fixed cost of several microseconds on top of
its bytes. Row ``c`` of gate and up is input feature ``c`` of down, so gate/up's second stage, the
SiLU·mul and down's first stage can run as one kernel (:mod:`blastfx.kernels.mlp_chain`): three
launches in all.

Like sibling grouping (:mod:`.grouping`), the rewrite is made on the dynamo graph the ``"blast"``
backend receives, so the model and its ``state_dict`` stay as the user made them. It applies to
graphs that run without autograd, to MLPs whose token count is known to be at most
:data:`~blastfx.kernels.gemv.MAX_T`, on CUDA, where each intermediate (gate's and up's outputs, the
SiLU, the product) has no other use. On CUDA the chained op is timed against running its layers as
before (a grouped gate/up call, SiLU·mul, the down call) by the autotuner, so chaining never makes a
call slower; layers the chain cannot stream (:func:`blastfx.kernels.mlp_chain.chainable`) run as before.

MLPs whose three layers have quantized factors (``blastfx::blast_matmul_quantized`` calls) become
one ``blastfx::blast_mlp_chain_quantized`` call the same way; the chain's kernels read the codes and
apply the scales in registers.

``blastfx::blast_mlp_chain`` and ``blastfx::blast_mlp_chain_quantized`` are defined here with their
references (the layers' reference calls, the source of truth) and fakes; they have no autograd.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..structures.blast.ops import blast_matmul, blast_matmul_reference, check_inputs
from ..structures.blast.quant.ops import (blast_matmul_quantized, blast_matmul_quantized_reference,
                                          check_quantized_inputs)
from .grouping import _call_args, _decode_sized, _groupable_ops, _rows, check_group_mode, tuned_decode_call

stats = {"chains": 0}
_SILU = (F.silu, torch.ops.aten.silu.default, torch.ops.aten.silu)
_MUL = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)


@torch.library.custom_op("blastfx::blast_mlp_chain", mutates_args=())
def blast_mlp_chain(x: torch.Tensor, U: list[torch.Tensor], S: list[torch.Tensor], V: list[torch.Tensor],
                    bias: list[Optional[torch.Tensor]], out_features: list[int]) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` for the layers (gate, up, down) given as three entries of each
    list (reference: the layers' reference calls, each output in x's dtype)."""
    _check_chain(x, U, S, V, bias, out_features)
    gate = blast_matmul_reference(x, U[0], S[0], V[0], bias[0], out_features[0])
    up = blast_matmul_reference(x, U[1], S[1], V[1], bias[1], out_features[1])
    return blast_matmul_reference(F.silu(gate) * up, U[2], S[2], V[2], bias[2], out_features[2])


@blast_mlp_chain.register_fake
def _(x, U, S, V, bias, out_features):
    shapes = _check_chain(x, U, S, V, bias, out_features)
    return x.new_empty(*x.shape[:-1], shapes[2].out_features)


def _check_chain(x, U, S, V, bias, out_features):
    if not (len(U) == len(S) == len(V) == len(bias) == len(out_features) == 3):
        raise ValueError(f"blast_mlp_chain takes three layers (gate, up, down): one U, S, V, bias and out_features "
                         f"each, got {len(U)}, {len(S)}, {len(V)}, {len(bias)}, {len(out_features)}")
    gate, up = (check_inputs(x, U[k], S[k], V[k], bias[k], out_features[k]) for k in (0, 1))
    if gate.out_features != up.out_features:
        raise ValueError(f"blast_mlp_chain: gate has {gate.out_features} outputs and up {up.out_features}")
    h = x.new_empty(()).expand(gate.out_features)          # what down reads: gate's width, x's dtype and device
    return [gate, up, check_inputs(h, U[2], S[2], V[2], bias[2], out_features[2])]


@blast_mlp_chain.register_kernel("cuda")
def _(x, U, S, V, bias, out_features):
    from ..kernels import mlp_chain

    layers = list(zip(U, S, V, bias, _check_chain(x, U, S, V, bias, out_features)))
    return tuned_decode_call("mlp_chain", x, layers, ("layers", _unchained), ("chain", _chained, mlp_chain.candidates),
                             _why_not_chained)


@torch.library.custom_op("blastfx::blast_mlp_chain_quantized", mutates_args=())
def blast_mlp_chain_quantized(x: torch.Tensor, U: list[torch.Tensor], U_scale: list[torch.Tensor],
                              S: list[torch.Tensor], V: list[torch.Tensor], V_scale: list[torch.Tensor],
                              bias: list[Optional[torch.Tensor]], out_features: list[int]) -> torch.Tensor:
    """``blast_mlp_chain`` for layers with quantized factors (as ``blast_matmul_quantized`` takes
    them); reference: the layers' quantized reference calls, each output in x's dtype."""
    _check_quantized_chain(x, U, U_scale, S, V, V_scale, bias, out_features)
    gate, up, down = zip(U, U_scale, S, V, V_scale, bias, out_features)
    h = F.silu(blast_matmul_quantized_reference(x, *gate)) * blast_matmul_quantized_reference(x, *up)
    return blast_matmul_quantized_reference(h, *down)


@blast_mlp_chain_quantized.register_fake
def _(x, U, U_scale, S, V, V_scale, bias, out_features):
    shapes = _check_quantized_chain(x, U, U_scale, S, V, V_scale, bias, out_features)
    return x.new_empty(*x.shape[:-1], shapes[2].out_features)


def _check_quantized_chain(x, U, U_scale, S, V, V_scale, bias, out_features):
    lists = (U, U_scale, S, V, V_scale, bias, out_features)
    if any(len(a) != 3 for a in lists):
        raise ValueError("blast_mlp_chain_quantized takes three layers (gate, up, down): one U, U_scale, S, V, "
                         f"V_scale, bias and out_features each, got {', '.join(str(len(a)) for a in lists)}")
    gate, up, down = zip(*lists)
    gate, up = check_quantized_inputs(x, *gate), check_quantized_inputs(x, *up)
    if gate.out_features != up.out_features:
        raise ValueError(f"blast_mlp_chain_quantized: gate has {gate.out_features} outputs and up {up.out_features}")
    h = x.new_empty(()).expand(gate.out_features)          # what down reads: gate's width, x's dtype and device
    return [gate, up, check_quantized_inputs(h, *down)]


@blast_mlp_chain_quantized.register_kernel("cuda")
def _(x, U, U_scale, S, V, V_scale, bias, out_features):
    from ..kernels import mlp_chain

    shapes = _check_quantized_chain(x, U, U_scale, S, V, V_scale, bias, out_features)
    layers = list(zip(U, S, V, bias, shapes, U_scale, V_scale))
    return tuned_decode_call("quantized_mlp_chain", x, layers, ("layers", _unchained),
                             ("chain", _chained, mlp_chain.candidates), _why_not_chained)


def _unchained(x2, layers):
    """The MLP as it runs without the chain: gate and up as one grouped call, SiLU·mul, down (each
    layer (U, S, V, bias, shape), or with codes (U, S, V, bias, shape, U_scale, V_scale))."""
    gate, up, down = layers
    widths = [gate[4].out_features, up[4].out_features]
    if len(down) == 7:
        g, u = torch.ops.blastfx.blast_matmul_quantized_group(
            x2, [gate[0], up[0]], [gate[5], up[5]], [gate[1], up[1]], [gate[2], up[2]], [gate[6], up[6]],
            [gate[3], up[3]], widths).split(widths, dim=-1)
        U, S, V, b, shape, us, vs = down
        return blast_matmul_quantized(F.silu(g) * u, U, us, S, V, vs, b, shape.out_features)
    g, u = torch.ops.blastfx.blast_matmul_group(x2, [gate[0], up[0]], [gate[1], up[1]], [gate[2], up[2]],
                                                [gate[3], up[3]], widths).split(widths, dim=-1)
    return blast_matmul(F.silu(g) * u, *down[:4], down[4].out_features)


def _chained(x2, layers, cfg):
    from ..kernels import mlp_chain
    return mlp_chain.blast_mlp_chain_gemv(x2, *layers, cfg)


def _why_not_chained(layers):
    from ..kernels import mlp_chain
    return mlp_chain.chainable(*layers)


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _blast_op(node):
    """The BLAST op (``blastfx::blast_matmul`` or ``blastfx::blast_matmul_quantized``) ``node`` calls, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return None
    return next((op for op in _groupable_ops() if node.target in (op, op.default)), None)


def _chain_op(op):
    """The chain op of MLPs whose layers are calls of ``op``."""
    ops = torch.ops.blastfx
    return ops.blast_mlp_chain.default if op is ops.blast_matmul else ops.blast_mlp_chain_quantized.default


def _silu_of(node) -> fx.Node | None:
    """The node whose SiLU ``node`` is (not in place), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _SILU):
        return None
    if node.kwargs.get("inplace", False) or (len(node.args) > 1 and node.args[1]):
        return None
    return node.args[0] if node.args else node.kwargs.get("input")


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    """Both nodes' traced outputs have one shape (the product must not broadcast)."""
    ea, eb = a.meta.get("example_value"), b.meta.get("example_value")
    return isinstance(ea, torch.Tensor) and isinstance(eb, torch.Tensor) and ea.shape == eb.shape


def _match(mul: fx.Node, mode: str):
    """(gate call, up call, silu node, down call) if ``mul`` is ``silu(gate(x)) * up(x)`` feeding a BLAST
    call and nothing else, with gate and up reading the same decode-sized x; else None."""
    if len(mul.args) != 2 or mul.kwargs:
        return None
    for silu, up in (mul.args, mul.args[::-1]):
        gate = _silu_of(silu)
        op = _blast_op(gate)
        if op is None or _blast_op(up) is not op or gate is up:
            continue
        names = _groupable_ops()[op][0]
        x = _call_args(gate, names)[0]
        if _call_args(up, names)[0] is not x or not _decode_sized(x, mode) or not _same_shape(gate, up):
            continue
        down = _only_user(mul)
        if not (_blast_op(down) is op and _call_args(down, names)[0] is mul and mul not in _call_args(down, names)[1:]):
            continue
        if _only_user(gate) is silu and _only_user(silu) is mul and _only_user(up) is mul:
            return gate, up, silu, down, op
    return None


def chain_mlp_calls(gm: fx.GraphModule, mode: str = "auto") -> int:
    """Replace each ``down(silu(gate(x)) * up(x))`` of ``blastfx::blast_matmul`` calls in ``gm`` by one
    ``blastfx::blast_mlp_chain`` call (of ``blastfx::blast_matmul_quantized`` calls: by one
    ``blastfx::blast_mlp_chain_quantized`` call); returns how many. ``mode`` as for sibling grouping: "auto" (CUDA
    inputs of at most ``MAX_T`` tokens), "always" (any device and size: tests) or "never". The caller
    decides whether the graph may run without autograd."""
    if check_group_mode(mode, "chain_mlp") == "never":
        return 0
    found = [m for m in (_match(n, mode) for n in gm.graph.nodes
                         if n.op == "call_function" and n.target in _MUL) if m is not None]
    for gate, up, silu, down, op in found:
        names = _groupable_ops()[op][0]
        calls = [dict(zip(names, _call_args(c, names))) for c in (gate, up, down)]
        widths = [a["out_features"] if a["out_features"] is not None else _rows(a["U"]) for a in calls]
        with gm.graph.inserting_before(down):
            chain = gm.graph.call_function(_chain_op(op), (
                calls[0]["x"], *([a[k] for a in calls] for k in names[1:-1]), widths))
        chain.meta.update(down.meta)
        down.replace_all_uses_with(chain)
        mul = _only_user(silu)
        for node in (down, mul, silu, up, gate):
            gm.graph.erase_node(node)
    if found:
        gm.graph.lint()
        gm.recompile()
    stats["chains"] += len(found)
    return len(found)
