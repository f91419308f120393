"""Matrix products of bf16 / fp16 tensors on CPUs without a native GEMM for that dtype, taken in fp32.

Why: on a CPU without AVX-512 bf16 / fp16 (or AMX) PyTorch's GEMM for those dtypes is a scalar loop,
tens of times slower than its fp32 GEMM. That loop accumulates in fp32 and rounds once, so the fp32
product rounded back to the dtype is the same result up to fp32 summation order. The BLAST reference
op takes its own products through :func:`bmm`; code that runs modules it does not own (a block's dense
linears and attention during reconstruction) wraps them in :func:`products_in_fp32`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _onednn_gemm_dtypes() -> frozenset:
    """The reduced-precision dtypes PyTorch has a oneDNN GEMM for on this CPU (bf16: AVX-512 or AMX; fp16:
    AVX-512-FP16 or AMX-FP16)."""
    mkldnn = torch.ops.mkldnn if torch.backends.mkldnn.is_available() else None
    checks = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}
    return frozenset(dtype for dtype, name in checks.items()
                     if mkldnn is not None and hasattr(mkldnn, name) and getattr(mkldnn, name)())


_ONEDNN_GEMM_DTYPES = _onednn_gemm_dtypes()


def gemm_in_fp32(t: torch.Tensor) -> bool:
    """True when a matrix product of ``t`` is better taken in fp32 and rounded back: ``t`` is bf16 / fp16
    on a CPU without a oneDNN GEMM for its dtype."""
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16) and t.dtype not in _ONEDNN_GEMM_DTYPES


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm``, in fp32 where :func:`gemm_in_fp32` says the dtype's own CPU GEMM is slow."""
    if gemm_in_fp32(a):
        return torch.bmm(a.float(), b.float()).to(a.dtype)
    return torch.bmm(a, b)


_PRODUCTS = frozenset({F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.Tensor.matmul,
                       torch.Tensor.__rmatmul__, torch.Tensor.mm, torch.Tensor.bmm, torch.Tensor.addmm,
                       torch.Tensor.baddbmm})


class _ProductsInFp32(TorchFunctionMode):
    """Every matrix product (``F.linear``, ``matmul``, ``mm``, ``bmm``, ...) whose tensors share a dtype
    :func:`gemm_in_fp32` names, taken in fp32 and rounded back; autograd records the casts, so the
    backward's products run in fp32 too."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = _slow_product_dtype(func, args, kwargs)
        if dtype is None:
            return func(*args, **kwargs)
        return func(*map(_fp32, args), **{k: _fp32(v) for k, v in kwargs.items()}).to(dtype)


def _fp32(a):
    return a.float() if isinstance(a, torch.Tensor) else a


def _slow_product_dtype(func, args, kwargs) -> torch.dtype | None:
    """The dtype of a call to a matrix product whose tensors share one dtype with a slow CPU GEMM;
    ``None`` for any other call."""
    if func not in _PRODUCTS or "out" in kwargs:
        return None
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if tensors and all(t.dtype == tensors[0].dtype and gemm_in_fp32(t) for t in tensors):
        return tensors[0].dtype
    return None


def products_in_fp32(call, tensors):
    """``call`` with its matrix products in fp32 where any of ``tensors`` (what it computes with) has a
    slow CPU GEMM; ``call`` itself otherwise, at no cost."""
    if not any(gemm_in_fp32(t) for t in tensors):
        return call

    def in_fp32(*args, **kwargs):
        with _ProductsInFp32():
            return call(*args, **kwargs)
    return in_fp32
