"""Graph pass: a decoder block's tail, o_proj, the residual add, an RMSNorm and a chained gated MLP of
BLAST layers, becomes one ``blastfx::blast_block_tail`` call.

Why: after attention a Llama-style block runs ``h = residual + o_proj(a)``, ``n = rmsnorm(h)``,
``mlp = down(silu(gate(n)) * up(n))`` and ``residual + mlp``: at decode o's two stages, the norm kernel
and the MLP chain's three launches. The block-tail kernels (:mod:`blastfx.kernels.block_tail`) run
o's second stage, the residual add, the norm's sums of squares and gate's and up's first stage as one
kernel, four launches in all, and leave the norm's per-token scale to the MLP chain's middle kernel.

The pass runs on the dynamo graph the ``"blast"`` backend receives, after the MLP chain pass (it
rewrites a ``blastfx::blast_mlp_chain`` call whose input is an RMSNorm of ``residual + o(a)``, o a
``blastfx::blast_matmul`` call). The norm is matched in the form transformers writes for Llama,
Mistral, Qwen2 and their relatives (``h.to(float32)``, ``pow(2).mean(-1, keepdim=True)``,
``h * rsqrt(var + eps)``, ``weight * h.to(dtype)``); other norms are left alone. Like the other decode
rewrites it applies to graphs that run without autograd, at decode sizes on CUDA, where each
intermediate has no other use than the next step (``h`` itself may have any uses: the op returns it).
On CUDA the op is timed against running its parts as before by the autotuner, so the rewrite never
makes a call slower; layers the tail cannot stream (:func:`blastfx.kernels.block_tail.tail_chainable`)
run as before.

With quantized factors (the MLP a ``blastfx::blast_mlp_chain_quantized`` call, o a
``blastfx::blast_matmul_quantized`` call) the tail is one ``blastfx::blast_block_tail_quantized`` call
of the same kernels reading codes.

``blastfx::blast_block_tail`` and ``blastfx::blast_block_tail_quantized`` are defined here with their
references (the parts' reference calls, the source of truth) and fakes; they have no autograd.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from ..kernels.add_norm import add_rms_norm, rms_norm_reference
from ..structures.blast.ops import blast_matmul, blast_matmul_reference, check_inputs
from ..structures.blast.quant.ops import blast_matmul_quantized, blast_matmul_quantized_reference, check_quantized_inputs
from .grouping import _NAMES, _QUANTIZED_NAMES, _call_args, _decode_sized, _rows, check_group_mode, tuned_decode_call
from .mlp_chain import _check_chain, _check_quantized_chain, _only_user, blast_mlp_chain, blast_mlp_chain_quantized

stats = {"tails": 0}


@torch.library.custom_op("blastfx::blast_block_tail", mutates_args=())
def blast_block_tail(x: torch.Tensor, residual: torch.Tensor, U: list[torch.Tensor], S: list[torch.Tensor],
                     V: list[torch.Tensor], bias: list[Optional[torch.Tensor]], out_features: list[int],
                     norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``cat([h, down(silu(gate(n)) * up(n))], -1)`` with ``h = residual + o(x)`` and ``n =
    rms_norm_reference(h, norm_weight, eps)``, for the layers (o, gate, up, down) given as four
    entries of each list (reference: the parts' reference calls, each output in x's dtype). One
    tensor: the graph takes ``h`` and the MLP's output as views of it."""
    _check_tail(x, residual, U, S, V, bias, out_features, norm_weight)
    h = residual + blast_matmul_reference(x, U[0], S[0], V[0], bias[0], out_features[0])
    mlp = blast_mlp_chain(rms_norm_reference(h, norm_weight, eps), U[1:], S[1:], V[1:], bias[1:], out_features[1:])
    return torch.cat([h, mlp], dim=-1)


@blast_block_tail.register_fake
def _(x, residual, U, S, V, bias, out_features, norm_weight, eps):
    shapes = _check_tail(x, residual, U, S, V, bias, out_features, norm_weight)
    return x.new_empty(*x.shape[:-1], 2 * shapes[0].out_features)


def _check_tail(x, residual, U, S, V, bias, out_features, norm_weight):
    if not (len(U) == len(S) == len(V) == len(bias) == len(out_features) == 4):
        raise ValueError(f"blast_block_tail takes four layers (o, gate, up, down): one U, S, V, bias and out_features "
                         f"each, got {len(U)}, {len(S)}, {len(V)}, {len(bias)}, {len(out_features)}")
    o = check_inputs(x, U[0], S[0], V[0], bias[0], out_features[0])
    _check_residual_and_weight(x, residual, norm_weight, o.out_features)
    h = x.new_empty(()).expand(*x.shape[:-1], o.out_features)  # what the MLP reads: o's width, x's dtype
    return [o, *_check_down_width(o, _check_chain(h, U[1:], S[1:], V[1:], bias[1:], out_features[1:]))]


def _check_down_width(o, mlp):
    """``mlp`` if down's output has o's width (the tail adds it to the residual stream), else ValueError."""
    if mlp[2].out_features != o.out_features:
        raise ValueError(f"blast_block_tail: down has {mlp[2].out_features} outputs where o has {o.out_features}: "
                         "the MLP's output is added to the residual stream")
    return mlp


def _check_residual_and_weight(x, residual, norm_weight, H: int) -> None:
    want = (*x.shape[:-1], H)
    if tuple(residual.shape) != want or residual.dtype != x.dtype:
        raise ValueError(f"blast_block_tail: the residual must be {want} of {x.dtype}, got {tuple(residual.shape)} "
                         f"of {residual.dtype}")
    if tuple(norm_weight.shape) != (H,) or norm_weight.dtype != x.dtype:
        raise ValueError(f"blast_block_tail: the norm weight must be ({H},) of {x.dtype}, got "
                         f"{tuple(norm_weight.shape)} of {norm_weight.dtype}")


@blast_block_tail.register_kernel("cuda")
def _cuda_kernel(x, residual, U, S, V, bias, out_features, norm_weight, eps):
    layers = list(zip(U, S, V, bias, _check_tail(x, residual, U, S, V, bias, out_features, norm_weight)))
    return _tuned(x, residual, layers, norm_weight, eps)


def _tuned(x, residual, layers, norm_weight, eps):
    """The op's CUDA kernel: the four-launch tail or its parts, as the autotuner picks."""
    from ..kernels import block_tail

    residual2 = residual.reshape(-1, residual.shape[-1])
    name = "block_tail" if len(layers[0]) == 5 else "quantized_block_tail"
    return tuned_decode_call(
        name, x, layers, ("parts", lambda x2, ls: _parts(x2, residual2, ls, norm_weight, eps)),
        ("tail", lambda x2, ls, cfg: block_tail.blast_block_tail_gemv(x2, residual2, ls[0], norm_weight, eps, *ls[1:],
                                                                       cfg), block_tail.candidates),
        lambda ls: block_tail.tail_chainable(*ls))


def _parts(x2, residual2, layers, norm_weight, eps):
    """The tail as it runs without the rewrite: o's call, the residual add and the norm (one launch on
    CUDA, as Inductor fuses them in a graph without the rewrite; h written into the output), the MLP
    chain op (each layer (U, S, V, bias, shape), or with codes (U, S, V, bias, shape, U_scale,
    V_scale))."""
    o, *mlp = layers
    H = o[4].out_features
    out = x2.new_empty(x2.shape[0], H + mlp[-1][4].out_features)
    if len(o) == 7:
        oy = blast_matmul_quantized(x2, o[0], o[5], o[1], o[2], o[6], o[3], H)
        chain, fields = torch.ops.blastfx.blast_mlp_chain_quantized, (0, 5, 1, 2, 6, 3)   # the op's argument order
    else:
        oy = blast_matmul(x2, *o[:4], H)
        chain, fields = torch.ops.blastfx.blast_mlp_chain, (0, 1, 2, 3)
    _, n = add_rms_norm(residual2, oy, norm_weight, eps, h_out=out[:, :H])
    out[:, H:].copy_(chain(n, *([m[k] for m in mlp] for k in fields), [m[4].out_features for m in mlp]))
    return out


@torch.library.custom_op("blastfx::blast_block_tail_quantized", mutates_args=())
def blast_block_tail_quantized(x: torch.Tensor, residual: torch.Tensor, U: list[torch.Tensor],
                               U_scale: list[torch.Tensor], S: list[torch.Tensor], V: list[torch.Tensor],
                               V_scale: list[torch.Tensor], bias: list[Optional[torch.Tensor]], out_features: list[int],
                               norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``blast_block_tail`` for layers with quantized factors (as ``blast_matmul_quantized`` takes
    them); reference: the parts' quantized reference calls."""
    _check_quantized_tail(x, residual, U, U_scale, S, V, V_scale, bias, out_features, norm_weight)
    o, *mlp = zip(U, U_scale, S, V, V_scale, bias, out_features)
    h = residual + blast_matmul_quantized_reference(x, *o)
    y = blast_mlp_chain_quantized(rms_norm_reference(h, norm_weight, eps), *(list(a) for a in zip(*mlp)))
    return torch.cat([h, y], dim=-1)


@blast_block_tail_quantized.register_fake
def _(x, residual, U, U_scale, S, V, V_scale, bias, out_features, norm_weight, eps):
    shapes = _check_quantized_tail(x, residual, U, U_scale, S, V, V_scale, bias, out_features, norm_weight)
    return x.new_empty(*x.shape[:-1], 2 * shapes[0].out_features)


def _check_quantized_tail(x, residual, U, U_scale, S, V, V_scale, bias, out_features, norm_weight):
    lists = (U, U_scale, S, V, V_scale, bias, out_features)
    if any(len(a) != 4 for a in lists):
        raise ValueError("blast_block_tail_quantized takes four layers (o, gate, up, down): one U, U_scale, S, V, "
                         f"V_scale, bias and out_features each, got {', '.join(str(len(a)) for a in lists)}")
    o = check_quantized_inputs(x, *(a[0] for a in lists))
    _check_residual_and_weight(x, residual, norm_weight, o.out_features)
    h = x.new_empty(()).expand(*x.shape[:-1], o.out_features)
    return [o, *_check_down_width(o, _check_quantized_chain(h, *(a[1:] for a in lists)))]


@blast_block_tail_quantized.register_kernel("cuda")
def _cuda_kernel_quantized(x, residual, U, U_scale, S, V, V_scale, bias, out_features, norm_weight, eps):
    shapes = _check_quantized_tail(x, residual, U, U_scale, S, V, V_scale, bias, out_features, norm_weight)
    return _tuned(x, residual, list(zip(U, S, V, bias, shapes, U_scale, V_scale)), norm_weight, eps)


# ------------------------------------------------------------------------------------------------
# Matching the norm in a dynamo graph

def _fn(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _method(node, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == name


def _cast_of(node, dtype) -> fx.Node | None:
    """X if ``node`` is ``X.to(dtype)`` (positional or ``dtype=``), else None."""
    if not _method(node, "to") or len(node.args) < 1:
        return None
    target = node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")
    extra = set(node.kwargs) - {"dtype"}
    return node.args[0] if target == dtype and not extra and len(node.args) <= 2 else None


def _mul_pair(node):
    """The two operands of a product node, else None."""
    if _fn(node, operator.mul, torch.mul) and len(node.args) == 2 and not node.kwargs:
        return node.args
    return None


def _mean_of_squares(node, x) -> bool:
    """``node`` is ``x.pow(2).mean(-1, keepdim=True)``."""
    if not (_method(node, "mean") and len(node.args) >= 1) or set(node.kwargs) - {"dim", "keepdim"}:
        return False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    square = node.args[0]
    if dims not in (-1, (-1,), [-1]) or keep is not True:
        return False
    is_pow = ((_method(square, "pow") or _fn(square, torch.pow)) and len(square.args) == 2 and square.args[1] == 2
              and not square.kwargs)
    return is_pow and square.args[0] is x


def _value(node):
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def match_rms_norm(node: fx.Node):
    """(h, weight, eps, nodes) if ``node`` is ``weight * (h32 * rsqrt(h32.pow(2).mean(-1, keepdim=True)
    + eps)).to(h.dtype)`` with ``h32 = h.to(float32)`` and the weight a vector of h's dtype and width,
    else None; ``nodes``: the norm's own nodes, ``node`` first."""
    pair = _mul_pair(node)
    if pair is None:
        return None
    for weight, cast in (pair, pair[::-1]):
        if not (_method(cast, "to") and len(cast.args) == 2 and not cast.kwargs):
            continue
        scaled, dtype = cast.args
        inner = _mul_pair(scaled)
        if inner is None:
            continue
        for h32, rsqrt in (inner, inner[::-1]):
            if not (_fn(rsqrt, torch.rsqrt) and len(rsqrt.args) == 1 and not rsqrt.kwargs):
                continue
            add = rsqrt.args[0]
            if not (_fn(add, operator.add, torch.add) and len(add.args) == 2 and not add.kwargs
                    and isinstance(add.args[1], float)):
                continue
            h = _cast_of(h32, torch.float32)
            if h is None or not _mean_of_squares(add.args[0], h32):
                continue
            hv, wv = _value(h), _value(weight)
            if hv is None or wv is None or hv.dtype != dtype or wv.dtype != dtype or tuple(wv.shape) != hv.shape[-1:]:
                continue
            return h, weight, add.args[1], (node, cast, scaled, rsqrt, add, add.args[0], add.args[0].args[0], h32)
    return None


def norm_is_private(norm_nodes, consumer: fx.Node) -> bool:
    """The nodes of a norm :func:`match_rms_norm` found are used only inside it and, its output, by
    ``consumer``: nothing else reads them when the rewrite removes them."""
    out, cast, scaled, rsqrt, add, mean, square, h32 = norm_nodes
    allowed = {out: {consumer}, cast: {out}, scaled: {cast}, rsqrt: {scaled}, add: {rsqrt}, mean: {add},
               square: {mean}, h32: {square, scaled}}
    return all(set(n.users) <= allowed[n] for n in norm_nodes)


def chain_block_tails(gm: fx.GraphModule, mode: str = "auto") -> int:
    """Replace each ``blastfx::blast_mlp_chain`` call of ``gm`` whose input is an RMSNorm of
    ``residual + o(a)`` (o a ``blastfx::blast_matmul`` call used only there) by one
    ``blastfx::blast_block_tail`` call, and each such ``blastfx::blast_mlp_chain_quantized`` call (o a
    ``blastfx::blast_matmul_quantized`` call) by one ``blastfx::blast_block_tail_quantized`` call;
    returns how many. ``mode`` as for sibling grouping: "auto"
    (CUDA inputs of at most ``MAX_T`` tokens), "always" (any device and size: tests) or "never".
    The caller decides whether the graph may run without autograd."""
    if check_group_mode(mode, "chain_norm") == "never":
        return 0
    ops = torch.ops.blastfx
    # the chain op -> (the one-layer op o must call, its argument names, the tail op)
    kinds = {ops.blast_mlp_chain: (ops.blast_matmul, _NAMES, ops.blast_block_tail.default),
             ops.blast_mlp_chain_quantized: (ops.blast_matmul_quantized, _QUANTIZED_NAMES,
                                             ops.blast_block_tail_quantized.default)}
    found = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        chain_op = next((op for op in kinds if _fn(node, op, op.default)), None)
        if chain_op is None:
            continue
        matmul, names, tail_op = kinds[chain_op]
        norm = match_rms_norm(node.args[0]) if node.args else None
        if norm is None:
            continue
        h, weight, eps, norm_nodes = norm
        if not (_fn(h, operator.add, torch.add) and len(h.args) == 2 and not h.kwargs):
            continue
        for residual, o in (h.args, h.args[::-1]):
            if not (_fn(o, matmul, matmul.default) and _only_user(o) is h and isinstance(residual, fx.Node)):
                continue
            x = _call_args(o, names)[0]
            ok = (_decode_sized(x, mode) and isinstance(x, fx.Node)
                  and _same(residual, h) and _same(o, h) and _same(node, h))     # the MLP's output adds to h
            # h's other users (the residual add after the MLP, ...) must come after the chain, where h is
            # read back from the op's output
            later = all(order[u] > order[node] for u in h.users if u not in norm_nodes)
            if ok and later and norm_is_private(norm_nodes, node):
                found.append((node, o, h, residual, weight, eps, norm_nodes, names, tail_op))
                break
    for chain, o, h, residual, weight, eps, norm_nodes, names, tail_op in found:
        oa = dict(zip(names, _call_args(o, names)))
        oa["out_features"] = oa["out_features"] if oa["out_features"] is not None else _rows(oa["U"])
        lists = [[oa[k], *chain.args[j]] for j, k in enumerate(names[1:], start=1)]     # chain: (x, *lists)
        with gm.graph.inserting_before(chain):
            tail = gm.graph.call_function(tail_op, (oa["x"], residual, *lists, weight, float(eps)))
            width = _width(h)
            new_h = gm.graph.call_function(torch.narrow, (tail, -1, 0, width))
            mlp = gm.graph.call_function(torch.narrow, (tail, -1, width, width))
        new_h.meta.update(h.meta)
        mlp.meta.update(chain.meta)
        chain.replace_all_uses_with(mlp)
        h.replace_all_uses_with(new_h)
        for n in (chain, *norm_nodes):
            gm.graph.erase_node(n)
        gm.graph.erase_node(h)
        gm.graph.erase_node(o)
    if found:
        gm.graph.lint()
        gm.recompile()
    stats["tails"] += len(found)
    return len(found)


def _same(a: fx.Node, b: fx.Node) -> bool:
    """Both nodes' traced outputs have one shape and dtype (no broadcast, no promotion)."""
    ea, eb = a.meta.get("example_value"), b.meta.get("example_value")
    return (isinstance(ea, torch.Tensor) and isinstance(eb, torch.Tensor) and ea.shape == eb.shape
            and ea.dtype == eb.dtype)


def _width(node: fx.Node) -> int:
    return node.meta["example_value"].shape[-1]
