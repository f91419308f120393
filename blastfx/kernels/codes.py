"""Tiles of factor codes as the kernels read them: int8, float8 and packed int4 loaded and unpacked in
registers, shared by every kernel that streams quantized U or V (GEMV, decode, fused, chains).

Why one module: the packing (two int4 codes a byte along r, low nibble first) is defined once, in
:mod:`blastfx.structures.blast.quant.formats`; each kernel unpacking it its own way would be a place
for the layouts to drift apart.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..structures.blast.quant import formats as factor_formats

# the factor formats whose codes the kernels read (QUANT = their bits): int8, packed int4, float8 (one
# byte like int8: loaded as is and widened in registers)
CODE_NAMES = ("int8", "int4", "float8_e4m3fn")
CODE_DTYPES = tuple(factor_formats.get(name).storage for name in CODE_NAMES)


def code_format(U, V, U_scale, V_scale, rank: int, kernel: str) -> tuple[int, int]:
    """(QUANT, PACK) of a kernel's launch: (0, 1) for float factors, else the codes' bits and codes per
    stored element. Raises ValueError naming ``kernel`` when the scales come alone, the codes are not
    a format the kernels read, or their last dimension does not hold ``rank``."""
    quant = U_scale is not None
    if quant != (V_scale is not None):
        raise ValueError(f"{kernel} takes U_scale and V_scale together (quantized factors) or neither")
    if not quant:
        return 0, 1
    if U.dtype != V.dtype or U.dtype not in CODE_DTYPES:
        raise ValueError(f"{kernel} reads quantized factors as codes of {CODE_NAMES}, "
                         f"got U.dtype={U.dtype}, V.dtype={V.dtype}")
    fmt = factor_formats.of_storage(U.dtype)
    stored = fmt.stored_length(rank)
    if U.shape[-1] != stored or V.shape[-1] != stored:
        raise ValueError(f"codes of U {tuple(U.shape)} and V {tuple(V.shape)} do not hold rank {rank}: "
                         f"their last dimension must be {stored}")
    return fmt.bits, fmt.per_element


@triton.jit
def _unpack_int4(b, ROWS: tl.constexpr, COLS: tl.constexpr):
    """(ROWS, COLS // 2) packed bytes -> (ROWS, COLS) int32 codes: byte k gives element 2k (low
    nibble) and 2k + 1 (high nibble), each a two's-complement nibble."""
    b = b.to(tl.int32)
    lo = b & 15
    hi = (b >> 4) & 15
    lo = tl.where(lo > 7, lo - 16, lo)
    hi = tl.where(hi > 7, hi - 16, hi)
    return tl.reshape(tl.join(lo, hi), (ROWS, COLS))


@triton.jit
def _load_nibbles(base, rows, row_ok, stride_row, stride_col, c0, RC, COLS: tl.constexpr):
    """Columns c0 .. c0 + COLS of the given rows of packed int4 codes as two (rows, COLS / 2) int32
    tiles, the even columns (low nibbles) and the odd ones (high nibbles), each sign-extended by
    two shifts; no interleaving back into one tile."""
    offs_h = c0 // 2 + tl.arange(0, COLS // 2)
    b = tl.load(base + rows[:, None] * stride_row + offs_h[None, :] * stride_col,
                mask=row_ok[:, None] & (offs_h < RC)[None, :], other=0).to(tl.int32)
    return (b << 28) >> 28, (b << 24) >> 28


@triton.jit
def _load_factor_tile(base, rows, row_ok, stride_row, stride_col, c0, R, RC, ROWS: tl.constexpr,
                      COLS: tl.constexpr, QUANT: tl.constexpr):
    """Columns c0 .. c0 + COLS of the given rows of a factor whose columns run along r: its own
    dtype, int8 codes, or (QUANT == 4) packed int4 codes read as COLS / 2 bytes and unpacked.
    RC: the stored columns (ceil(R / 2) for int4), an argument of its own so that the JIT sees its
    divisibility: a bound derived as (R + 1) // 2 has none, and a mask with none turns every
    16-byte load of codes into sixteen byte loads."""
    # one return statement: the compiler types every return of a function, a constexpr branch's too
    if QUANT == 4:
        offs_h = c0 // 2 + tl.arange(0, COLS // 2)
        packed = tl.load(base + rows[:, None] * stride_row + offs_h[None, :] * stride_col,
                         mask=row_ok[:, None] & (offs_h < RC)[None, :], other=0)
        tile = _unpack_int4(packed, ROWS, COLS)
    else:
        offs = c0 + tl.arange(0, COLS)
        tile = tl.load(base + rows[:, None] * stride_row + offs[None, :] * stride_col,
                       mask=row_ok[:, None] & (offs < R)[None, :], other=0.0)
    return tile
