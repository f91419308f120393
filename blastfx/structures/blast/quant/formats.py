"""Storage formats of quantized BLAST factors, and how factors are rounded into them.

A format stores U and V as codes of a narrow dtype with floating-point scales; S and the bias stay in
the activation dtype (they are a few percent of the bytes, and S carries the per-(block, rank)
couplings that every output depends on).

Scale layout, chosen so that both scales act *after* a reduction, where they cost one multiply per
output element instead of one per weight:

* ``U`` (b_out, p, r): one scale per row of p, ``U_scale`` (b_out, p) -- per output feature. The
  decode GEMV's second stage sums over r for each output row, then multiplies the sum by its scale.
  Rows of U differ most in magnitude (an output-weighted fit unscales U row by row), so per-row
  scales also fit the data best.
* ``V`` (b_in, q, r): one scale per column of r in each block-column, ``V_scale`` (b_in, r). The
  first stage sums over q for each (j, rank) pair, then scales: exactly where ``s_ij`` already
  multiplies, so the scale is folded into the mix. A rank component's column has one magnitude, so
  per-column scales lose little; per-row scales of V would multiply inside the reduction.

Scales are stored in float32: a bf16 scale would add a per-row gain error as large as int8 rounding
itself, for 4 bytes per row. Formats are looked up by name (:func:`get`), so a new one (int4 with
packed codes, another float8) is a new :class:`FactorFormat` in :data:`FORMATS`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float32
MODEL = "model"           # an override's way of saying "keep this layer's factors in the model's dtype"


@dataclass(frozen=True)
class FactorFormat:
    """``name``: what configs and plans call it; ``storage``: the dtype of the codes; ``qmax``: the
    largest code magnitude (a scale maps a row's or column's absolute maximum to it); ``integer``:
    codes are rounded integers (else a cast to a float dtype rounds them)."""
    name: str
    storage: torch.dtype
    qmax: float
    integer: bool

    def encode(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Codes of ``x / scale`` (``scale`` broadcast against ``x``), nearest representable value."""
        y = x / scale
        if self.integer:
            return y.round().clamp(-self.qmax, self.qmax).to(self.storage)
        return y.clamp(-self.qmax, self.qmax).to(self.storage)

    @property
    def bits(self) -> int:
        return torch.finfo(self.storage).bits if self.storage.is_floating_point else torch.iinfo(self.storage).bits


FORMATS: dict[str, FactorFormat] = {
    "int8": FactorFormat("int8", torch.int8, 127.0, True),
    "float8_e4m3fn": FactorFormat("float8_e4m3fn", torch.float8_e4m3fn, 448.0, False),
}


def names() -> tuple[str, ...]:
    return tuple(FORMATS)


def get(name: str) -> FactorFormat:
    """The format called ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"factor_dtype must be one of {names()} or None, got {name!r}") from None


def of_storage(dtype: torch.dtype) -> FactorFormat:
    """The format whose codes have ``dtype``; ``ValueError`` otherwise."""
    for fmt in FORMATS.values():
        if fmt.storage == dtype:
            return fmt
    raise ValueError(f"quantized factors must be stored as one of "
                     f"{[str(f.storage) for f in FORMATS.values()]}, got {dtype}")


def check_name(name, allow_model: bool = False):
    """``name`` if it is a format (or None; or :data:`MODEL` where ``allow_model``), else ``ValueError``."""
    if name is None or (allow_model and name == MODEL):
        return name
    get(name)
    return name


def _scale(amax: torch.Tensor, fmt: FactorFormat) -> torch.Tensor:
    """amax / qmax, with 1 where a row is all zero (its codes are zero whatever the scale)."""
    return torch.where(amax > 0, amax / fmt.qmax, torch.ones_like(amax))


def quantize_u(U: torch.Tensor, fmt: FactorFormat):
    """(codes, scale) of U (..., b_out, p, r) with one scale per row of p: scale (..., b_out, p)."""
    scale = _scale(U.abs().amax(dim=-1), fmt)
    return fmt.encode(U, scale.unsqueeze(-1)), scale


def quantize_v(V: torch.Tensor, fmt: FactorFormat):
    """(codes, scale) of V (..., b_in, q, r) with one scale per column of r: scale (..., b_in, r)."""
    scale = _scale(V.abs().amax(dim=-2), fmt)
    return fmt.encode(V, scale.unsqueeze(-2)), scale


def dequantize_u(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """U (..., b_out, p, r) = codes * scale per row, computed in float32 (float64 if asked) and cast to ``dtype``."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return (codes.to(work) * scale.to(work).unsqueeze(-1)).to(dtype)


def dequantize_v(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """V (..., b_in, q, r) = codes * scale per column, computed in float32 (float64 if asked), cast to ``dtype``."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return (codes.to(work) * scale.to(work).unsqueeze(-2)).to(dtype)
