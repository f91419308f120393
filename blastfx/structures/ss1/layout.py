"""The geometry of one SS1 matrix and its hash: which shared weight each dense entry reads.

An ``out x in`` weight ``W`` (rows = outputs, as in ``nn.Linear``) is cut along the input dimension
into ``k_tiles = ceil(in / block_k)`` tiles of ``block_k`` columns, and along the output dimension
into ``n_tiles = ceil(out / block_n)`` tiles of ``block_n`` rows. Consecutive input tiles are grouped
``reduction`` at a time; each group reads *one* shared weight tile. So the stored weight is
``(out, shared_tiles * block_k)`` with ``shared_tiles = ceil(k_tiles / reduction)``, and a GEMM's
K-loop reads ``reduction`` times fewer weight tiles than a dense one.

The tiles of a group would read identical columns if they shared their tile as is; instead tile
``i`` (group ``g = i // reduction``) reads it rotated by a hashed shift ``s[i, j]`` that differs per
output tile ``j``::

    W[n, i*block_k + c] = shared[n, g*block_k + (c - s[i, n // block_n]) mod block_k]

Rotations are cheap for a kernel (one modular add on the load offsets of the *input* tile, the weight
tile is read straight) and differ per output tile, so two input features tied in one output tile are
generally not tied in the next: the sharing is random but keeps tiles contiguous. Shifts are
multiples of ``vec`` elements, so a rotated load stays in aligned vectors of ``vec`` elements. Within
a group and output tile the ``reduction`` tiles take distinct rotations while there are enough
(``block_k / vec`` of them), then the next round of distinct rotations, and so on.

The hash is a 32-bit integer mix of (seed, group, output tile, round, rotation) written with int64
tensor arithmetic only, never a random-number generator, so the same seed gives the same tie
pattern on every machine and version: a checkpoint stores the seed, not the table.

Padding: ``in`` not divisible by ``block_k`` reads zeros past the last input feature (the kernel masks
them); ``out`` needs no padding (rows are never shared). Shared slots that no real input feature
reads stay zero under every projection; there are some only when the last group is a single partial
tile (always the case for ``reduction == 1`` and a partial last tile). ``num_params`` counts what is
stored, those slots included.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = ["SS1Layout", "ss1_params"]

_M32 = 0xFFFFFFFF
_MAX_SEED = 2 ** 63 - 1


def _int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


def _power_of_two(name: str, value, *, minimum: int = 1) -> int:
    _int(name, value)
    if value & (value - 1) or value < minimum:
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class SS1Layout:
    """Sizes, tiling and hash seed of one SS1 weight; every field is checked when it is made.

    ``block_k`` and ``block_n`` are part of the structure (they decide which entries are tied), not
    kernel tuning knobs: a kernel uses ``block_k`` as its K tile and any power of two up to
    ``block_n`` as its N tile.
    """
    out_features: int
    in_features: int
    reduction: int
    seed: int = 0
    block_k: int = 32
    block_n: int = 64
    vec: int = 8

    def __post_init__(self):
        _int("out_features", self.out_features)
        _int("in_features", self.in_features)
        _power_of_two("reduction", self.reduction)
        _int("seed", self.seed, minimum=0)
        if self.seed > _MAX_SEED:
            raise ValueError(f"seed must be below 2**63 (it is stored as int64), got {self.seed!r}")
        _power_of_two("block_k", self.block_k, minimum=16)     # tl.dot needs K tiles of 16 or more
        _power_of_two("block_n", self.block_n, minimum=16)
        _power_of_two("vec", self.vec)
        if self.vec > self.block_k:
            raise ValueError(f"vec={self.vec} must not exceed block_k={self.block_k}")
        if self.reduction > self.k_tiles:
            raise ValueError(
                f"reduction={self.reduction} exceeds the {self.k_tiles} input tiles of in_features="
                f"{self.in_features} with block_k={self.block_k}: at most {self.k_tiles} tiles can share "
                f"one (use a smaller reduction or block_k)")

    # sizes -----------------------------------------------------------------------------------

    @property
    def k_tiles(self) -> int:
        return math.ceil(self.in_features / self.block_k)

    @property
    def n_tiles(self) -> int:
        return math.ceil(self.out_features / self.block_n)

    @property
    def shared_tiles(self) -> int:
        return math.ceil(self.k_tiles / self.reduction)

    @property
    def shared_in_features(self) -> int:
        """Columns of the stored weight."""
        return self.shared_tiles * self.block_k

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.shared_in_features

    @property
    def num_params(self) -> int:
        """Stored weight entries (bias not included)."""
        return self.out_features * self.shared_in_features

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    # the hash --------------------------------------------------------------------------------

    def shifts(self, device=None) -> torch.Tensor:
        """The rotation of each (input tile, output tile), an int64 (k_tiles, n_tiles) tensor of
        multiples of ``vec`` in [0, block_k). Computed once per layout (cached on the CPU)."""
        s = _shifts(self).clone()           # the cached table stays private
        return s if device is None else s.to(device)

    def slot_index(self, device=None) -> torch.Tensor:
        """``slot[j, k]``: the shared column that dense column ``k`` reads in output tile ``j``, an
        int64 (n_tiles, in_features) tensor; the whole tie pattern in gather/scatter form."""
        return slots_from_shifts(self.shifts(device), self.in_features, self.reduction, self.block_k)


def slots_from_shifts(shifts: torch.Tensor, in_features: int, reduction: int, block_k: int) -> torch.Tensor:
    """:meth:`SS1Layout.slot_index` from a shift table (on the table's device): elementwise, so an op
    can derive it per call from the small table it is given."""
    k = torch.arange(in_features, device=shifts.device)
    tile, col = k // block_k, k % block_k
    base = (tile // reduction) * block_k
    return base[None, :] + (col[None, :] - shifts.to(torch.int64).t()[:, tile]) % block_k


def ss1_params(out_features: int, in_features: int, reduction: int, block_k: int = 32) -> int:
    """Stored weight parameters of an SS1 matrix (bias excluded): the cost of a reduction factor.
    Raises ``ValueError`` for a geometry :class:`SS1Layout` refuses."""
    return SS1Layout(out_features, in_features, reduction, block_k=block_k).num_params


# ---------------------------------------------------------------------------------------------
# 32-bit integer hash on int64 tensors (no overflow: products stay below 2**49)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for x in [0, 2**32), c a 32-bit constant, split in 16-bit halves."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * (c & 0xFFFF)) & 0xFFFF) << 16)) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mix (xor-shift-multiply, constants of the "lowbias32" hash)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=256)
def _shifts(layout: SS1Layout) -> torch.Tensor:
    cpu = torch.device("cpu")      # explicit: a surrounding `with torch.device("meta")` must not apply
    r, G = layout.reduction, layout.block_k // layout.vec
    rounds = math.ceil(r / G)
    shape = (layout.shared_tiles, layout.n_tiles, rounds, G)
    g, j, rnd, q = torch.meshgrid(*(torch.arange(n, dtype=torch.int64, device=cpu) for n in shape), indexing="ij")
    seed = torch.tensor(layout.seed, dtype=torch.int64, device=cpu)
    h = mix32(mix32(seed & _M32) ^ (seed >> 32))
    for v in (g, j, rnd, q):
        h = mix32(h ^ v)
    # rank the G rotations of each (group, output tile, round) by their hash: a permutation
    order = torch.argsort(h, dim=-1, stable=True)                      # (shared_tiles, n_tiles, rounds, G)
    per_tile = order.reshape(layout.shared_tiles, layout.n_tiles, rounds * G)[:, :, :r]
    table = per_tile.permute(0, 2, 1).reshape(layout.shared_tiles * r, layout.n_tiles)[: layout.k_tiles]
    return (table * layout.vec).contiguous()
