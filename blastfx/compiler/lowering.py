"""How Inductor sees ``blastfx::blast_matmul``: inlined into cuBLAS batched GEMMs plus a fused mix, or
kept as the op (an extern call of its CUDA kernel).

Why inline: the op's CUDA kernel is Python (argument checks, the tuner's cache lookup, two cuBLAS
calls and a Triton launch), 100+ microseconds of CPU per call. Under CUDA graphs that is free, but
without them a 7B model's 224 BLAST layers at T = 2048 are CPU-bound: compiled prefill measured 0.59x
dense (benchmarks/RESULTS.md section 5) while each layer replayed from a CUDA graph is 1.2-1.5x
faster than dense. Inlined, Inductor's generated code calls the two GEMMs directly and fuses the
s-mix (fp32 accumulation), the bias, the cast and the (T, m) output layout into its own Triton
kernels: the autotuner's most frequent winner (``bmm_mix_bmm``) without the Python.

Why not always: at decode sizes the op's tuner can pick the split-reduction Triton kernels, and under
CUDA graphs the op's CPU cost does not count. ``"auto"`` (the default) therefore inlines the graphs
whose BLAST calls are all on CUDA with token counts known to exceed ``DECODE_MAX_T`` and keeps the
op otherwise; ``"inline"`` and ``"extern"`` force one or the other (CPU included, e.g. for tests). Training is unaffected in
correctness: the op's registered backward still runs (traced into the backward graph); only the
forward is rewritten.
"""
from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..layout import BlastShape
from ..ops import _in_blocks

MODES = ("auto", "inline", "extern")
DECODE_MAX_T = 16


def blast_matmul_inline(x, U, S, V, bias=None, out_features=None):
    """The op's math in ops Inductor fuses well: bmm, a pointwise sum over the b_in block-columns
    (not the bmm-over-rank of the reference, which Inductor would run as a (r, b, b) extern bmm with
    permute copies), bmm. Same contract as :func:`blastfx.ops.blast_matmul_reference`."""
    shape = BlastShape.from_factors(U, S, V, out_features=out_features)
    lead, n = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n)
    z = torch.bmm(_in_blocks(x2, shape.b_in, shape.q), V)                  # (b_in, T, r)
    Sf = S.float()
    w = Sf[:, 0, None, :] * z[0].float()
    for j in range(1, shape.b_in):                                          # unrolled: b_in is static
        w = w + Sf[:, j, None, :] * z[j].float()
    y = torch.bmm(w.to(U.dtype), U.transpose(1, 2))                        # (b_out, T, p)
    y = y.transpose(0, 1).reshape(x2.shape[0], shape.m_pad)[:, : shape.out_features]
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, shape.out_features)


def _blast_inputs(gm) -> list:
    """Example values of ``x`` at every BLAST call in a dynamo graph (the op itself, or the naive
    three-stage code's replacement, whose first argument is x in blocks)."""
    from .patterns import naive_blast_replacement

    op = torch.ops.blastfx.blast_matmul
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (op, op.default, naive_blast_replacement):
            x = node.args[0].meta.get("example_value") if isinstance(node.args[0], torch.fx.Node) else None
            found.append((x, node.target is naive_blast_replacement))
    return found


def _prefill_sized(x, blocked: bool) -> bool:
    if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
        return False
    tokens = x.shape[1] if blocked else x.numel() // x.shape[-1]      # blocked: (b_in, T, q)
    return statically_known_true(tokens > DECODE_MAX_T)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"lowering must be one of {MODES}, got {mode!r}")
    return mode


def inline_graph(gm, mode: str) -> bool:
    """Whether to inline the op in this graph. One choice per graph, because Inductor cannot hold an
    op both as a decomposition and as a fallback: ``"auto"`` inlines only when every BLAST call in it
    is on CUDA with a token count known to exceed ``DECODE_MAX_T`` (a prefill graph); a decode graph,
    a dynamic token count or CPU keeps the op."""
    if check_mode(mode) != "auto":
        return mode == "inline"
    found = _blast_inputs(gm)
    return bool(found) and all(_prefill_sized(x, blocked) for x, blocked in found)


def _decompose(x, U, S, V, bias=None, out_features=None):
    stats["inlined"] += 1
    return blast_matmul_inline(x, U, S, V, bias, out_features)


def decompositions(inline: bool) -> dict | None:
    """The table for ``compile_fx(decompositions=)``: Inductor's default plus the BLAST entry when
    inlining (the argument replaces the default table, so that is included); None keeps the default."""
    if not inline:
        return None
    from torch._inductor.decomposition import select_decomp_table

    return {**select_decomp_table(), torch.ops.blastfx.blast_matmul.default: _decompose}


stats = {"inlined": 0}
