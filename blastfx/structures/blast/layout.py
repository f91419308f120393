"""The geometry of one BLAST matrix: sizes, padding, parameter and FLOP counts.

An m x n weight is cut into ``b_out x b_in`` blocks of ``p x q``. When ``m`` (or ``n``) is not
divisible by the block count, the last block-row (block-column) is padded with zeros:
``p = ceil(m / b_out)``, ``m_pad = b_out * p``. The factors are stored padded
(U: (b_out, p, r), V: (b_in, q, r), S: (b_out, b_in, r)), so ``num_params`` counts what is really
stored, which is ``r * (m_pad + n_pad + b_out * b_in)`` and equals the paper's
``r * (m + n + b_out * b_in)`` when nothing is padded. Every check here raises ``ValueError`` naming
the argument, so that callers can validate before touching a model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def normalize_blocks(blocks) -> tuple[int, int]:
    """``4`` -> ``(4, 4)``; ``(b_out, b_in)`` is checked and returned as a tuple of ints."""
    if isinstance(blocks, int) and not isinstance(blocks, bool):
        blocks = (blocks, blocks)
    try:
        b_out, b_in = blocks
    except (TypeError, ValueError):
        raise ValueError(f"blocks must be an int or a pair (b_out, b_in), got {blocks!r}") from None
    return _positive_int("blocks[0] (b_out)", b_out), _positive_int("blocks[1] (b_in)", b_in)


@dataclass(frozen=True)
class BlastShape:
    out_features: int
    in_features: int
    rank: int
    b_out: int
    b_in: int

    @classmethod
    def make(cls, out_features, in_features, rank, blocks, *, allow_larger: bool = False) -> "BlastShape":
        b_out, b_in = normalize_blocks(blocks)
        shape = cls(_positive_int("out_features", out_features), _positive_int("in_features", in_features),
                    _positive_int("rank", rank), b_out, b_in)
        shape._check_blocks("b_out", b_out, out_features, "out_features")
        shape._check_blocks("b_in", b_in, in_features, "in_features")
        if not allow_larger and shape.num_params > shape.dense_params:
            raise ValueError(
                f"rank={rank} with blocks=({b_out}, {b_in}) needs {shape.num_params} parameters, more than "
                f"the dense {out_features}x{in_features} matrix ({shape.dense_params}); lower the rank or "
                f"pass allow_larger=True")
        return shape

    @staticmethod
    def _check_blocks(name, count, dim, dim_name):
        if count > dim:
            raise ValueError(f"{name}={count} is larger than {dim_name}={dim}")
        size = math.ceil(dim / count)
        if (count - 1) * size >= dim:
            usable = math.ceil(dim / size)
            raise ValueError(
                f"{name}={count} does not fit {dim_name}={dim}: blocks of {size} leave the last block "
                f"entirely padding; use {usable} blocks or a count that divides {dim}")

    @property
    def blocks(self) -> tuple[int, int]:
        return self.b_out, self.b_in

    @property
    def p(self) -> int:
        """Rows per block (padded)."""
        return math.ceil(self.out_features / self.b_out)

    @property
    def q(self) -> int:
        """Columns per block (padded)."""
        return math.ceil(self.in_features / self.b_in)

    @property
    def m_pad(self) -> int:
        return self.b_out * self.p

    @property
    def n_pad(self) -> int:
        return self.b_in * self.q

    @property
    def padded(self) -> bool:
        return self.m_pad != self.out_features or self.n_pad != self.in_features

    @property
    def num_params(self) -> int:
        return self.rank * (self.m_pad + self.n_pad + self.b_out * self.b_in)

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def factor_shapes(self) -> dict[str, tuple[int, int, int]]:
        return {"U": (self.b_out, self.p, self.rank), "S": (self.b_out, self.b_in, self.rank),
                "V": (self.b_in, self.q, self.rank)}

    @classmethod
    def from_factors(cls, U, S, V, out_features: int | None = None, in_features: int | None = None) -> "BlastShape":
        """Read the geometry back from factor tensors, checking they agree with each other."""
        if U.dim() != 3 or S.dim() != 3 or V.dim() != 3:
            raise ValueError(f"U, S, V must be 3-D, got shapes {tuple(U.shape)}, {tuple(S.shape)}, {tuple(V.shape)}")
        b_out, p, r = U.shape
        b_in, q, r_v = V.shape
        if r_v != r or tuple(S.shape) != (b_out, b_in, r):
            raise ValueError(
                f"factor shapes disagree: U {tuple(U.shape)} (b_out, p, r), V {tuple(V.shape)} (b_in, q, r), "
                f"S {tuple(S.shape)} must be ({b_out}, {b_in}, {r})")
        m = b_out * p if out_features is None else out_features
        n = b_in * q if in_features is None else in_features
        shape = cls(m, n, r, b_out, b_in)
        if shape.p != p or shape.q != q:
            raise ValueError(
                f"factors with p={p}, q={q} do not fit out_features={m}, in_features={n} with "
                f"blocks=({b_out}, {b_in}) (expected p={shape.p}, q={shape.q})")
        return shape


def full_rank(m: int, n: int, blocks) -> int:
    """min(m_pad, n_pad): the rank at which a BLAST matrix already represents every m x n matrix
    (V_j the block-columns of the identity, U_i the blocks of row i, s = 1), so a larger rank only
    spends parameters. It bounds every rank a plan may ask for, before anything is allocated."""
    shape = BlastShape.make(m, n, 1, blocks, allow_larger=True)
    return min(shape.m_pad, shape.n_pad)


def planned_shape(m: int, n: int, rank: int, blocks) -> BlastShape:
    """The geometry of a planned layer; ``ValueError`` if it cannot be represented or the rank is beyond
    :func:`full_rank` (a plan asking for rank 10**12 is refused here, not by the allocator)."""
    shape = BlastShape.make(m, n, rank, blocks, allow_larger=True)
    limit = min(shape.m_pad, shape.n_pad)
    if rank > limit:
        raise ValueError(f"rank={rank} is more than {limit}, the rank at which a BLAST matrix with "
                         f"blocks={normalize_blocks(blocks)} already represents every {m}x{n} matrix")
    return shape
