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
itself, for 4 bytes per row. Formats are looked up by name (:func:`get`) or by the dtype of their
codes (:func:`of_storage`), so a new one is a new :class:`FactorFormat` in :data:`FORMATS`.

``int4`` packs two codes per byte: signed values in [-7, 7] (symmetric, like int8's [-127, 127]) as
two's-complement nibbles of a ``torch.uint8`` tensor, packed along the factor's last dimension r:
byte k holds element 2k in its low nibble and 2k + 1 in its high nibble, and an odd r is padded
with a zero code. U is then stored (b_out, p, ceil(r/2)) and V (b_in, q, ceil(r/2)). The packed
tensor no longer says what r is, so whoever unpacks passes it (read from ``V_scale`` or S, which
carry r unpacked) and :meth:`FactorFormat.unpack` checks the two agree. :func:`pack_int4` and
:func:`unpack_int4` are the plain-PyTorch definition of the layout that the GEMV kernel's in-register
unpacking is tested against. Its scales are int8's (per row of U, per column of V): 16 times
coarser codes under the same scales, which searched scales, error feedback and the refits only
partly absorb (SmolLM2-135M's down_proj at budget 0.5: held-out output error 0.4269 against 0.4008 for
int8 and 0.4025 for the float factors, ``benchmarks/quantized_rounding.py``), so int4 is for memory,
int8 for quality.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float32
MODEL = "model"           # an override's way of saying "keep this layer's factors in the model's dtype"


@dataclass(frozen=True)
class FactorFormat:
    """``name``: what configs and plans call it; ``storage``: the dtype of the stored codes; ``qmax``:
    the largest code magnitude (a scale maps a row's or column's absolute maximum to it); ``integer``:
    codes are rounded integers (else a cast to a float dtype rounds them); ``per_element``: codes
    packed into one stored element along the last dimension (2 for int4, see the module docstring)."""
    name: str
    storage: torch.dtype
    qmax: float
    integer: bool
    per_element: int = 1

    @property
    def packed(self) -> bool:
        return self.per_element > 1

    def nearest(self, y: torch.Tensor) -> torch.Tensor:
        """The nearest code to each value of ``y`` (already divided by its scale), saturated at
        +-qmax, as a float tensor of ``y``'s dtype: what :meth:`encode` stores."""
        y = y.clamp(-self.qmax, self.qmax)
        return y.round() if self.integer else y.to(self.storage).to(y.dtype)

    def encode(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Stored codes of ``x / scale`` (``scale`` broadcast against ``x``), nearest representable
        value (:meth:`nearest`); packed along the last dimension for a packed format."""
        codes = self.nearest(x / scale)
        return pack_int4(codes.to(torch.int8)) if self.packed else codes.to(self.storage)

    @property
    def rank_multiple(self) -> int:
        """The rank step at which a stored row of codes is a whole number of 16-byte vectors (32 for
        packed int4, 16 for one-byte codes): the decode kernels then load every row with 16-byte loads,
        where a row of 1008 int4 codes (504 bytes) allows only 8-byte ones."""
        return 16 * self.per_element // torch.empty((), dtype=self.storage).element_size()

    def stored_length(self, length: int) -> int:
        """How many stored elements hold ``length`` codes along the last dimension."""
        return -(-length // self.per_element)

    def stored_shape(self, shape) -> tuple[int, ...]:
        """The shape of the stored codes of a factor of ``shape`` (packing shortens the last dimension)."""
        return (*shape[:-1], self.stored_length(shape[-1]))

    def unpack(self, codes: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """The codes one per element (int8 for int4, ``codes`` itself otherwise), ``length`` along the
        last dimension. ``length`` (the factor's r) is required for a packed format and checked
        against the stored length; ``ValueError`` naming both when they disagree."""
        if length is None:
            if self.packed:
                raise ValueError(f"{self.name} codes are packed {self.per_element} per byte: unpacking them needs "
                                 f"the rank r (their last dimension holds ceil(r / {self.per_element}))")
            return codes
        if codes.shape[-1] != self.stored_length(length):
            raise ValueError(f"{self.name} codes of shape {tuple(codes.shape)} do not hold r={length}: their last "
                             f"dimension must be {self.stored_length(length)}"
                             + (f" (ceil(r / {self.per_element}), packed)" if self.packed else ""))
        return unpack_int4(codes, length) if self.packed else codes

    @property
    def bits(self) -> int:
        """Bits per code (a packed format's codes share their storage element)."""
        size = torch.finfo(self.storage).bits if self.storage.is_floating_point else torch.iinfo(self.storage).bits
        return size // self.per_element


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed codes in [-8, 7] (any integer dtype, ``(..., r)``) packed two per byte along the last
    dimension: ``torch.uint8`` ``(..., ceil(r/2))``, element 2k in the low nibble of byte k and 2k + 1
    in the high nibble (two's complement); an odd r is padded with a zero code."""
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"pack_int4 takes integer codes, got {codes.dtype}")
    nib = codes.to(torch.int16)
    if nib.numel() and not nib.is_meta and (nib.min() < -8 or nib.max() > 7):
        raise ValueError(f"int4 codes must lie in [-8, 7], got values in [{int(nib.min())}, {int(nib.max())}]")
    if nib.shape[-1] % 2:
        nib = torch.nn.functional.pad(nib, (0, 1))
    nib = nib & 15
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, length: int) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: int8 codes ``(..., length)`` from ``torch.uint8``
    ``(..., ceil(length/2))`` (sign-extended nibbles, low nibble first)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed int4 codes must be torch.uint8, got {packed.dtype}")
    if packed.shape[-1] != -(-length // 2):
        raise ValueError(f"packed int4 codes of shape {tuple(packed.shape)} do not hold {length} codes: their last "
                         f"dimension must be {-(-length // 2)}")
    b = packed.to(torch.int16)
    nib = torch.stack((b & 15, b >> 4), dim=-1).flatten(-2)[..., :length]
    return torch.where(nib > 7, nib - 16, nib).to(torch.int8)


FORMATS: dict[str, FactorFormat] = {
    "int8": FactorFormat("int8", torch.int8, 127.0, True),
    "float8_e4m3fn": FactorFormat("float8_e4m3fn", torch.float8_e4m3fn, 448.0, False),
    "int4": FactorFormat("int4", torch.uint8, 7.0, True, per_element=2),
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


def codes_of(stored: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """One code per element of the stored codes ``stored`` (..., r) of any format (found from their
    dtype): packed codes unpacked to ``rank`` (required for them), others as they are."""
    return of_storage(stored.dtype).unpack(stored, rank)


def dequantize_u(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.float32, rank: int | None = None) -> torch.Tensor:
    """U (..., b_out, p, r) = codes * scale per row, computed in float32 (float64 if asked) and cast to
    ``dtype``. ``rank``: r, which packed codes need (U's row scales do not say it; S and ``V_scale`` do)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return (codes_of(codes, rank).to(work) * scale.to(work).unsqueeze(-1)).to(dtype)


def dequantize_v(codes: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """V (..., b_in, q, r) = codes * scale per column, computed in float32 (float64 if asked), cast to
    ``dtype``; r is the scale's last dimension (packed codes are checked against it)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return (codes_of(codes, scale.shape[-1]).to(work) * scale.to(work).unsqueeze(-2)).to(dtype)
