"""A residual add and the RMSNorm after it in one launch: ``h = a + b`` (kept) and ``n = weight *
rmsnorm(h)``.

Why: the block-tail and block-seam ops (:mod:`blastfx.compiler.block_tail`,
:mod:`blastfx.compiler.block_seam`) choose between their fused kernels and their *parts*, the calls
the graph made before the rewrite, by timing both. Run as eager PyTorch ops the parts' add and norm
are nine small kernels and a concatenation, where a compiled graph without the rewrite runs them as
the one kernel Inductor fuses. Timed against those slow parts the fused forms won per block and still
lost end to end. This kernel gives the parts what the graph would run: one program per token reads
``a`` and ``b``, writes ``h`` where the caller wants it (the op's output, so no concatenation copies
it) and writes ``n``. It runs where the op's own Triton kernels run (``kernels="triton"``, a dtype
they take); ``kernels="reference"`` keeps the parts on the reference.

``h`` is rounded to the inputs' dtype before the norm reads it and the norm's product is rounded as
transformers' Llama rounds it (:func:`add_rms_norm_reference`, the source of truth), so ``h`` is
bit for bit the reference's and ``n`` differs only by the order of the sum of squares.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .dispatch import TRITON_DTYPES, forward_impl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_FEATURES = 16384        # one row in registers per program; wider rows run the reference


def rms_norm_reference(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' Llama writes it: in float32, cast back, times the weight."""
    x = h.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


def add_rms_norm_reference(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, eps: float):
    """``(h, n)``: ``h = a + b`` and :func:`rms_norm_reference` of it."""
    h = a + b
    return h, rms_norm_reference(h, weight, eps)


@triton.jit
def _add_rms_norm_kernel(a_ptr, b_ptr, w_ptr, h_ptr, n_ptr, H, sa, sb, sh, sn, eps, BH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BH)
    ok = cols < H
    a = tl.load(a_ptr + row * sa + cols, mask=ok, other=0.0)
    b = tl.load(b_ptr + row * sb + cols, mask=ok, other=0.0)
    h = (a.to(tl.float32) + b.to(tl.float32)).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + row * sh + cols, h, mask=ok)
    hf = h.to(tl.float32)
    scale = tl.rsqrt(tl.sum(hf * hf, axis=0) / H + eps)
    x = (hf * scale).to(n_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(n_ptr + row * sn + cols, (w * x).to(n_ptr.dtype.element_ty), mask=ok)


def _check(a, b, weight, h_out):
    if not a.device == b.device == weight.device or (h_out is not None and h_out.device != a.device):
        raise ValueError(f"add_rms_norm: a, b, weight and h_out must be on one device, got {a.device}, {b.device}, "
                         f"{weight.device}" + (f", {h_out.device}" if h_out is not None else ""))
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"add_rms_norm takes two (tokens, features) tensors of one shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    T, H = a.shape
    if weight.shape != (H,) or not a.dtype == b.dtype == weight.dtype:
        raise ValueError(f"add_rms_norm: the weight must be ({H},) and a, b and weight one dtype, got "
                         f"{tuple(weight.shape)} and {a.dtype}, {b.dtype}, {weight.dtype}")
    if h_out is not None and (h_out.shape != a.shape or h_out.dtype != a.dtype):
        raise ValueError(f"add_rms_norm: h_out must be ({T}, {H}) of {a.dtype}, got {tuple(h_out.shape)} of "
                         f"{h_out.dtype}")


def add_rms_norm_triton(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, eps: float,
                        h_out: torch.Tensor | None = None, *, interpret: bool = False):
    """``(h, n)`` as :func:`add_rms_norm_reference` gives them, in one launch. ``h`` is written into
    ``h_out`` (any (T, H) view whose rows are contiguous, e.g. columns of a wider output) when given;
    ``h_out`` may be ``a`` or ``b`` itself (a program reads its row before writing it), not a view
    overlapping other rows of them."""
    _check(a, b, weight, h_out)
    T, H = a.shape
    if a.dtype not in TRITON_DTYPES:
        raise ValueError(f"add_rms_norm_triton takes {', '.join(map(str, TRITON_DTYPES))}, got {a.dtype}")
    if H > MAX_FEATURES:
        raise ValueError(f"add_rms_norm_triton keeps a row in registers: at most {MAX_FEATURES} features, got {H}")
    a, b, weight = (t if t.stride(-1) == 1 else t.contiguous() for t in (a, b, weight))
    if h_out is None or h_out.stride(1) != 1:
        h = torch.empty_like(a)
    else:
        h = h_out
    n = torch.empty_like(a)
    if T:
        BH = triton.next_power_of_2(H)
        launch = {} if interpret else {"num_warps": 4 if BH <= 2048 else 8 if BH <= 8192 else 16}
        _add_rms_norm_kernel[(T,)](a, b, weight, h, n, H, a.stride(0), b.stride(0), h.stride(0), n.stride(0),
                                   float(eps), BH=BH, **launch)
    return _landed(h, h_out), n


def add_rms_norm(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, eps: float,
                 h_out: torch.Tensor | None = None):
    """``(h, n)``: the kernel where the op's Triton kernels run (CUDA, or the interpreter; the kernel
    options in effect say "triton" for this dtype) and rows fit :data:`MAX_FEATURES`, else the
    reference; ``h`` lands in ``h_out`` when given."""
    on_triton = (a.device.type == "cuda" or INTERPRET) and forward_impl(a.dtype) == "triton"
    if on_triton and a.shape[-1] <= MAX_FEATURES:
        return add_rms_norm_triton(a, b, weight, eps, h_out, interpret=a.device.type != "cuda")
    _check(a, b, weight, h_out)
    h, n = add_rms_norm_reference(a, b, weight, eps)
    return _landed(h, h_out), n


def _landed(h: torch.Tensor, h_out: torch.Tensor | None) -> torch.Tensor:
    """``h``, copied into ``h_out`` where the caller gave one that does not hold it already."""
    if h_out is None or h is h_out:
        return h
    h_out.copy_(h)
    return h_out
