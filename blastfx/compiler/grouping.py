"""Graph pass: BLAST layers that read the same input (q/k/v, gate/up) become one grouped call.

Why: at decode every BLAST call pays a fixed cost (launch, ramp-up, tail: several microseconds on
an H200) on top of streaming its factors, and a decoder block has seven linear layers of which five
come in siblings sharing an input. One grouped call streams all the siblings' V factors in one
stream of work items and all their U factors in another (:func:`blastfx.kernels.gemv.
blast_gemv_group`), so the block pays that cost four times instead of seven.

The model and its ``state_dict`` stay as the user made them: the rewrite is made on the dynamo graph
the ``"blast"`` backend receives. It applies to graphs that run without autograd (decode runs under
``torch.no_grad`` / ``inference_mode``), to siblings whose token count is known to be at most
:data:`~blastfx.kernels.gemv.MAX_T`, on CUDA; siblings kept dense by the plan are simply not part of
the group, and members may differ in shape, rank and block count. On CUDA the grouped op is timed
against calling its members one by one (the autotuner), so grouping never makes a call slower;
members the grouped kernel cannot stream (:func:`blastfx.kernels.gemv.groupable`: mixed dtypes,
non-contiguous or not 16-byte-aligned factors, ranks not a multiple of 8) are called one by one.

Layers with quantized factors (``blastfx::blast_matmul_quantized``) that share an input become one
``blastfx::blast_matmul_quantized_group`` call the same way: the group kernel reads their codes and
scales as the one-layer kernel does. Quantized and float siblings of one input form separate groups.

``blastfx::blast_matmul_group`` and ``blastfx::blast_matmul_quantized_group`` are defined here with
their references (the members' reference calls, the source of truth) and fakes; they have no
autograd, which is why the pass leaves training graphs alone.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..kernels.gemv import MAX_T
from ..structures.blast.ops import blast_matmul, blast_matmul_reference, check_inputs
from ..structures.blast.quant import formats
from ..structures.blast.quant.ops import (blast_matmul_quantized, blast_matmul_quantized_reference,
                                          check_quantized_inputs)

stats = {"groups": 0, "grouped_calls": 0}
MODES = ("auto", "always", "never")


@torch.library.custom_op("blastfx::blast_matmul_group", mutates_args=())
def blast_matmul_group(x: torch.Tensor, U: list[torch.Tensor], S: list[torch.Tensor], V: list[torch.Tensor],
                       bias: list[Optional[torch.Tensor]], out_features: list[int]) -> torch.Tensor:
    """The members' outputs side by side: ``cat([blast_matmul(x, U[k], S[k], V[k], bias[k],
    out_features[k]) for k], -1)`` (reference). One tensor, so the graph takes each member's output
    as a view of it (a custom op's outputs may not alias each other)."""
    _check_group(x, U, S, V, bias, out_features)
    return torch.cat([blast_matmul_reference(x, u, s, v, b, o) for u, s, v, b, o in zip(U, S, V, bias, out_features)],
                     dim=-1)


@blast_matmul_group.register_fake
def _(x, U, S, V, bias, out_features):
    shapes = _check_group(x, U, S, V, bias, out_features)
    return x.new_empty(*x.shape[:-1], sum(shape.out_features for shape in shapes))


def _check_group(x, U, S, V, bias, out_features):
    if not (len(U) == len(S) == len(V) == len(bias) == len(out_features)) or not U:
        raise ValueError(f"blast_matmul_group takes one U, S, V, bias and out_features per member, got "
                         f"{len(U)}, {len(S)}, {len(V)}, {len(bias)}, {len(out_features)}")
    return [check_inputs(x, u, s, v, b, o) for u, s, v, b, o in zip(U, S, V, bias, out_features)]


@blast_matmul_group.register_kernel("cuda")
def _(x, U, S, V, bias, out_features):
    from ..kernels import gemv

    layers = list(zip(U, S, V, bias, _check_group(x, U, S, V, bias, out_features)))
    return tuned_decode_call("group", x, layers, ("members", _one_by_one),
                             ("gemv", gemv.blast_gemv_group, gemv.group_candidates), gemv.groupable)


@torch.library.custom_op("blastfx::blast_matmul_quantized_group", mutates_args=())
def blast_matmul_quantized_group(x: torch.Tensor, U: list[torch.Tensor], U_scale: list[torch.Tensor],
                                 S: list[torch.Tensor], V: list[torch.Tensor], V_scale: list[torch.Tensor],
                                 bias: list[Optional[torch.Tensor]], out_features: list[int]) -> torch.Tensor:
    """``blast_matmul_group`` for layers with quantized factors: ``cat([blast_matmul_quantized(x, U[k],
    U_scale[k], S[k], V[k], V_scale[k], bias[k], out_features[k]) for k], -1)`` (reference)."""
    _check_quantized_group(x, U, U_scale, S, V, V_scale, bias, out_features)
    return torch.cat([blast_matmul_quantized_reference(x, *member) for member in
                      zip(U, U_scale, S, V, V_scale, bias, out_features)], dim=-1)


@blast_matmul_quantized_group.register_fake
def _(x, U, U_scale, S, V, V_scale, bias, out_features):
    shapes = _check_quantized_group(x, U, U_scale, S, V, V_scale, bias, out_features)
    return x.new_empty(*x.shape[:-1], sum(shape.out_features for shape in shapes))


def _check_quantized_group(x, U, U_scale, S, V, V_scale, bias, out_features):
    lists = (U, U_scale, S, V, V_scale, bias, out_features)
    if len({len(a) for a in lists}) != 1 or not U:
        raise ValueError("blast_matmul_quantized_group takes one U, U_scale, S, V, V_scale, bias and out_features "
                         f"per member, got {', '.join(str(len(a)) for a in lists)}")
    return [check_quantized_inputs(x, *member) for member in zip(*lists)]


@blast_matmul_quantized_group.register_kernel("cuda")
def _(x, U, U_scale, S, V, V_scale, bias, out_features):
    from ..kernels import gemv

    shapes = _check_quantized_group(x, U, U_scale, S, V, V_scale, bias, out_features)
    layers = list(zip(U, S, V, bias, shapes, U_scale, V_scale))
    int4 = U[0].dtype == formats.get("int4").storage
    return tuned_decode_call("quantized_group", x, layers, ("members", _one_by_one),
                             ("gemv", gemv.blast_gemv_group, lambda device: gemv.group_candidates(device, int4)),
                             gemv.groupable)


def _one_by_one(x2, members):
    """The members' outputs side by side, each from its own call (of the quantized op for members
    (U, S, V, bias, shape, U_scale, V_scale))."""
    outs = []
    for member in members:
        U, S, V, b, shape = member[:5]
        if len(member) == 7:
            outs.append(blast_matmul_quantized(x2, U, member[5], S, V, member[6], b, shape.out_features))
        else:
            outs.append(blast_matmul(x2, U, S, V, b, shape.out_features))
    return torch.cat(outs, dim=-1)


def tuned_decode_call(name: str, x, layers, plain, fused, why_not):
    """One call of a multi-layer decode op (``layers`` = [(U, S, V, bias, shape[, U_scale, V_scale])],
    reading ``x``) in the
    faster of its two forms: ``plain`` = (label, run(x2, layers)), the layers' own calls, and ``fused``
    = (label, run(x2, layers, cfg), candidates(device)), its kernels. The fused form runs only at
    decode sizes, with the Triton kernels, where floats may be added in any order and ``why_not(layers)``
    finds nothing; there the autotuner times both, over clones of the factors, once per shape and
    token bucket (:mod:`blastfx.kernels.autotune`), so the fused form never makes a call slower."""
    from ..kernels import autotune
    from ..kernels.dispatch import forward_impl

    (plain_label, run_plain), (fused_label, run_fused, candidates) = plain, fused
    x2 = x.reshape(-1, x.shape[-1])
    T = x2.shape[0]
    copies = None

    def run(path, cfg, k):
        ls = layers if k == 0 else copies[k]
        return run_plain(x2, ls) if path == plain_label else run_fused(x2, ls, cfg)

    if (T > MAX_T or forward_impl(x.dtype) != "triton" or torch.are_deterministic_algorithms_enabled()
            or why_not(layers)):
        path, cfg = plain_label, {}
    else:
        copies = _MemberCopies(layers, x.device)
        key = (name, autotune.token_bucket(T), tuple(layer[4] for layer in layers), x.dtype, str(layers[0][0].dtype),
               tuple(layer[3] is not None for layer in layers), str(x.device))
        if autotune.will_time(key):
            run(plain_label, {}, 0)     # the layers tune their own kernels first, so they are timed at their best
        path, cfg = autotune.choose(key, [(plain_label, {})] + [(fused_label, c) for c in candidates(x2.device)],
                                    run, copies=copies.count)
    return run(path, cfg, 0).reshape(*x.shape[:-1], -1)


class _MemberCopies:
    """Clones of a group's factors for the autotuner (see ``kernels.autotune.WeightCopies``)."""

    def __init__(self, members, device):
        from ..kernels.autotune import copies_needed

        self.members, self._clones = members, {}
        self.count = copies_needed([t for m in members for t in m[:3] + tuple(m[5:])], device)

    def __getitem__(self, k):
        if k not in self._clones:
            self._clones[k] = [(m[0].clone(), m[1].clone(), m[2].clone(), m[3], m[4], *(t.clone() for t in m[5:]))
                               for m in self.members]
        return self._clones[k]


def check_group_mode(mode: str, option: str = "group_siblings") -> str:
    """``mode`` if it is one of :data:`MODES`, else a ValueError naming the backend option."""
    if mode not in MODES:
        raise ValueError(f"{option} must be one of {MODES}, got {mode!r}")
    return mode


_NAMES = ("x", "U", "S", "V", "bias", "out_features")
_QUANTIZED_NAMES = ("x", "U", "U_scale", "S", "V", "V_scale", "bias", "out_features")


def _call_args(node: fx.Node, names=_NAMES):
    """The arguments ``names`` of a call node (``blastfx::blast_matmul``'s by default), spelled
    positionally or by keyword."""
    values = dict(zip(names, node.args))
    values.update({k: v for k, v in node.kwargs.items() if k in names})
    return tuple(values.get(k) for k in names)


def _groupable_ops() -> dict:
    """Each op whose sibling calls are grouped: (its argument names, the group op)."""
    ops = torch.ops.blastfx
    return {ops.blast_matmul: (_NAMES, ops.blast_matmul_group.default),
            ops.blast_matmul_quantized: (_QUANTIZED_NAMES, ops.blast_matmul_quantized_group.default)}


def _rows(U: fx.Node) -> int:
    """Output rows of a call without ``out_features``: all b_out * p rows of U."""
    u = U.meta["example_value"]
    return u.shape[0] * u.shape[1]


def _decode_sized(x, mode: str) -> bool:
    example = x.meta.get("example_value") if isinstance(x, fx.Node) else None
    if not isinstance(example, torch.Tensor):
        return False
    if mode == "always":
        return True
    tokens = example.numel() // example.shape[-1]
    return example.device.type == "cuda" and statically_known_true(tokens <= MAX_T)


def group_sibling_calls(gm: fx.GraphModule, mode: str = "auto") -> int:
    """Replace the ``blastfx::blast_matmul`` calls of ``gm`` that share their input by one
    ``blastfx::blast_matmul_group`` call each, and the ``blastfx::blast_matmul_quantized`` calls that
    do by one ``blastfx::blast_matmul_quantized_group`` call each; returns how many groups were made.
    ``mode``: "auto" (CUDA inputs of at most ``MAX_T`` tokens), "always" (any device and size: tests)
    or "never". The caller decides whether the graph may run without autograd."""
    if check_group_mode(mode) == "never":
        return 0
    ops = _groupable_ops()
    targets = {t: op for op in ops for t in (op, op.default)}
    by_input: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in targets:
            op = targets[node.target]
            x = _call_args(node, ops[op][0])[0]
            if isinstance(x, fx.Node) and _decode_sized(x, mode):
                by_input.setdefault((x, op), []).append(node)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups = 0
    for (x, op), calls in by_input.items():
        names, group_op = ops[op]
        if len(calls) < 2:
            continue
        first = min(calls, key=order.__getitem__)
        args = [dict(zip(names, _call_args(c, names))) for c in calls]
        inputs = [a[k] for a in args for k in names[1:-1] if isinstance(a[k], fx.Node)]
        if any(order[a] > order[first] and a.op not in ("placeholder", "get_attr") for a in inputs):
            continue          # a factor computed after the first sibling (e.g. a cast): leave these alone
        for a in inputs:     # parameters read later in the graph: read them before the group instead
            if order[a] > order[first]:
                first.prepend(a)
        widths = [a["out_features"] if a["out_features"] is not None else _rows(a["U"]) for a in args]
        with gm.graph.inserting_before(first):
            group = gm.graph.call_function(group_op, (x, *([a[k] for a in args] for k in names[1:-1]), widths))
            outs, start = [], 0
            for width in widths:
                outs.append(gm.graph.call_function(torch.narrow, (group, -1, start, width)))
                start += width
        for call, out in zip(calls, outs):
            out.meta.update(call.meta)
            call.replace_all_uses_with(out)
            gm.graph.erase_node(call)
        groups += 1
        stats["grouped_calls"] += len(calls)
    if groups:
        gm.graph.lint()
        gm.recompile()
    stats["groups"] += groups
    return groups
