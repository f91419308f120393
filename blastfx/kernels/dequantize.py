"""Quantized factors to a float copy in one pass: the "dequantize" path of the quantized forward.

Why: past the decode sizes the fastest quantized forward is often a float copy of U and V followed
by the float kernels (cuBLAS-class tiles outrun the fused kernels reading codes), so the copy itself
must cost no more than streaming the codes once and writing the copy once. In plain PyTorch it takes
a chain of elementwise kernels with float32 intermediates (unpack, widen, scale, cast), several
times the bytes; this kernel reads each code byte once, scales in float32 registers, and writes the
copy in the activation dtype. It rounds exactly as :func:`formats.dequantize_u` /
:func:`formats.dequantize_v` do (codes times scale in float32, one cast), so the two agree bit for bit.

Layouts (:mod:`blastfx.structures.blast.quant.formats`): U codes (..., b_out, p, r) with one scale per
row (..., b_out, p); V codes (..., b_in, q, r) with one scale per (block, column) (..., b_in, r).
Packed int4 codes hold ceil(r / 2) bytes per row, two codes per byte along r.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .codes import CODE_DTYPES, CODE_NAMES, _load_factor_tile
from ..structures.blast.quant import formats as factor_formats

BLOCK_ROWS = 32
BLOCK_COLS = 128              # even: a tile of packed int4 codes is whole bytes


@triton.jit
def _dequantize_kernel(c_ptr, s_ptr, o_ptr, ROWS, R, RC, GROUP, scr, scc, ssg, PER_ROW: tl.constexpr,
                       QUANT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[row, c] = codes[row, c] * scale, scale = s[row] (PER_ROW, U) or s[row // GROUP, c] (V)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < ROWS
    c0 = tl.program_id(1) * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    col_ok = cols < R
    codes = _load_factor_tile(c_ptr, rows, row_ok, scr, scc, c0, R, RC, BLOCK_R, BLOCK_C, QUANT).to(tl.float32)
    if PER_ROW:
        scale = tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    else:
        scale = tl.load(s_ptr + (rows // GROUP)[:, None] * ssg + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    tl.store(o_ptr + rows[:, None] * R + cols[None, :], (codes * scale).to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _launch(codes: torch.Tensor, scale: torch.Tensor, dtype, rank: int, per_row: bool, group: int) -> torch.Tensor:
    fmt = factor_formats.get(CODE_NAMES[CODE_DTYPES.index(codes.dtype)])
    stored = codes.shape[-1]
    if stored != fmt.stored_length(rank):
        raise ValueError(f"{fmt.name} codes of shape {tuple(codes.shape)} do not hold r={rank}: their last dimension "
                         f"must be {fmt.stored_length(rank)}")
    out = torch.empty(*codes.shape[:-1], rank, dtype=dtype, device=codes.device)
    if out.numel() == 0:
        return out
    c2 = codes.contiguous().view(-1, stored)
    s2 = scale.contiguous().view(-1) if per_row else scale.contiguous().view(-1, rank)
    rows = c2.shape[0]
    grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(rank, BLOCK_COLS))
    _dequantize_kernel[grid](c2, s2, out, rows, rank, stored, group, c2.stride(0), c2.stride(1),
                             0 if per_row else s2.stride(0), PER_ROW=per_row, QUANT=fmt.bits,
                             BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS)
    return out


def supported(codes: torch.Tensor, dtype) -> bool:
    """Codes this kernel reads, into a float dtype it writes (float64 copies stay in PyTorch). Triton
    converts float8 (e4m3) only on sm_89 and newer; older GPUs copy float8 codes in PyTorch."""
    if codes.dtype not in CODE_DTYPES or dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if codes.dtype == torch.float8_e4m3fn and codes.is_cuda:
        return torch.cuda.get_device_capability(codes.device) >= (8, 9)
    return True


def dequantize_u(codes: torch.Tensor, scale: torch.Tensor, dtype, rank: int) -> torch.Tensor:
    """U (..., b_out, p, r) in ``dtype`` from its codes and per-row scales; :func:`formats.dequantize_u`."""
    return _launch(codes, scale, dtype, rank, True, 1)


def dequantize_v(codes: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    """V (..., b_in, q, r) in ``dtype`` from its codes and per-column scales; :func:`formats.dequantize_v`."""
    return _launch(codes, scale, dtype, scale.shape[-1], False, codes.shape[-2])


def dequantized(U, U_scale, V, V_scale, dtype):
    """(U, V) in ``dtype``, one launch each where :func:`supported`, else the PyTorch reference."""
    if not (supported(U, dtype) and supported(V, dtype)):
        from ..structures.blast.quant.ops import dequantized as reference
        return reference(U, U_scale, V, V_scale, dtype)
    return dequantize_u(U, U_scale, dtype, V_scale.shape[-1]), dequantize_v(V, V_scale, dtype)
