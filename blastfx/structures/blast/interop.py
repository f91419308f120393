"""Import/export of the original BLAST release's factor layout (github.com/changwoolee/BLAST).

Mapping (theirs -> ours), block (i, j) = B_i diag(D_ij) C_j = U_i diag(S_ij) V_j^T in both:

==========================  ===================  ===============================
original                    shape                blastfx
==========================  ===================  ===============================
``B`` (layer and factorize)  (b1, p, r)          ``U`` as is
``C`` (layer and factorize)  (b2, r, q)          ``V = C.transpose(1, 2)``  (b2, q, r)
``D`` in ``BlastLinear``     (b1, b2, r)         ``S`` as is
``D`` in ``blast_precond_gd``(r, b1, b2)         ``S = D.permute(1, 2, 0)``
==========================  ===================  ===============================

The original needs the block counts to divide the dimensions, so padded factors cannot be exported.
"""
from __future__ import annotations

import torch

from .layout import BlastShape

LAYOUTS = ("layer", "factorization")


def _check_layout(d_layout: str) -> None:
    if d_layout not in LAYOUTS:
        raise ValueError(f"d_layout must be one of {LAYOUTS}, got {d_layout!r}")


def from_original(B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, d_layout: str = "layer"):
    """Original (B, C, D) -> blastfx (U, S, V). ``d_layout``: "layer" for D (b1, b2, r) as stored by
    the original ``BlastLinear``, "factorization" for D (r, b1, b2) as returned by ``blast_precond_gd``."""
    _check_layout(d_layout)
    if B.dim() != 3 or C.dim() != 3 or D.dim() != 3:
        raise ValueError(f"B, C, D must be 3-D, got {tuple(B.shape)}, {tuple(C.shape)}, {tuple(D.shape)}")
    S = D if d_layout == "layer" else D.permute(1, 2, 0)
    U, V = B, C.transpose(1, 2)
    BlastShape.from_factors(U, S, V)  # raises ValueError if the three disagree
    return U.contiguous(), S.contiguous(), V.contiguous()


def to_original(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, d_layout: str = "layer",
                out_features: int | None = None, in_features: int | None = None):
    """blastfx (U, S, V) -> original (B, C, D); see :func:`from_original` for ``d_layout``."""
    _check_layout(d_layout)
    shape = BlastShape.from_factors(U, S, V, out_features, in_features)
    if shape.padded:
        raise ValueError(
            f"the original BLAST layout needs blocks dividing the dimensions; this {shape.out_features}x"
            f"{shape.in_features} matrix is padded to {shape.m_pad}x{shape.n_pad}")
    D = S if d_layout == "layer" else S.permute(2, 0, 1)
    return U.contiguous(), V.transpose(1, 2).contiguous(), D.contiguous()
