"""How Inductor sees ``blastfx::blast_matmul``: inlined into cuBLAS batched GEMMs plus a fused mix, or
kept as the op (an extern call of its CUDA kernel).

Why inline: the op's CUDA kernel is Python (argument checks, the tuner's cache lookup, two cuBLAS
calls and a Triton launch), 100+ microseconds of CPU per call. Under CUDA graphs that is free, but
without them a 7B model's 224 BLAST layers at T = 2048 are CPU-bound: compiled prefill measured 0.59x
dense with the op kept as an extern call (H100), 1.27x inlined (H200; ``benchmarks/llama_e2e.py``),
while each layer replayed from a CUDA graph is 1.2-1.5x faster than dense. Inlined, Inductor's generated code calls the two GEMMs directly and fuses the
s-mix (fp32 accumulation), the bias, the cast and the (T, m) output layout into its own Triton
kernels: the autotuner's most frequent winner (``bmm_mix_bmm``) without the Python. The rewrite is
made on the dynamo graph, before AOTAutograd, so training differentiates the inlined ops as well.

Why not always: at decode sizes the op's tuner can pick the split-reduction Triton kernels, and under
CUDA graphs the op's CPU cost does not count. ``"auto"`` (the default) therefore inlines the
calls on CUDA whose token counts are known to exceed ``DECODE_MAX_T`` and keeps the op for the
others; ``"inline"`` and ``"extern"`` force one or the other (CPU included, e.g. for tests).
"""
from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..kernels.autotune import DECODE_MAX_T
from ..structures.blast.layout import BlastShape
from ..structures.blast.ops import _in_blocks
from .patterns import naive_blast_replacement, naive_blast_with

MODES = ("auto", "inline", "extern")
stats = {"inlined": 0}


def blast_matmul_inline(x, U, S, V, bias=None, out_features=None):
    """The op's math in ops Inductor fuses well: bmm, a pointwise sum over the b_in block-columns
    (not the bmm-over-rank of the reference, which Inductor would run as a (r, b, b) extern bmm with
    permute copies), bmm. Same contract as :func:`blastfx.structures.blast.ops.blast_matmul_reference`."""
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


def _prefill_sized(x, blocked: bool) -> bool:
    if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
        return False
    tokens = x.shape[1] if blocked else x.numel() // x.shape[-1]      # blocked: (b_in, T, q)
    return statically_known_true(tokens > DECODE_MAX_T)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"lowering must be one of {MODES}, got {mode!r}")
    return mode


def naive_blast_inline(xb, B, C, D):
    return naive_blast_with(blast_matmul_inline, xb, B, C, D)


def inline_blast_calls(gm, mode: str = "inline") -> int:
    """Replace the BLAST calls of the dynamo graph ``gm`` that ``mode`` selects by their inlined form;
    returns how many. "auto" picks each call on CUDA whose token count is known to exceed
    ``DECODE_MAX_T``. Done *before* AOTAutograd, so training differentiates the inlined ops (Inductor
    fuses the backward's mixes and dS reductions too) instead of calling the op's eager backward."""
    if check_mode(mode) == "extern":
        return 0
    op = torch.ops.blastfx.blast_matmul
    swaps = {op: blast_matmul_inline, op.default: blast_matmul_inline, naive_blast_replacement: naive_blast_inline}
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in swaps:
            continue
        x = node.args[0].meta.get("example_value") if isinstance(node.args[0], torch.fx.Node) else None
        if mode == "inline" or _prefill_sized(x, blocked=node.target is naive_blast_replacement):
            node.target = swaps[node.target]
            count += 1
    if count:
        gm.recompile()
    stats["inlined"] += count
    return count
