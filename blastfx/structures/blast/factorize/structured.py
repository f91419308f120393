"""Classic structures as exact BLAST configurations, so every baseline is one argument away.

* ``lowrank``: the rank-r truncated SVD, every s_ij = 1 (any block counts).
* ``block_diagonal``: b x b blocks, only diagonal blocks kept, each its own rank-min(r, p, q) SVD;
  s_ij = 0 off the diagonal. With r >= block size it is the exact block-diagonal projection.
* ``block_low_rank`` (Monarch-like): every block (i, j) its own rank-k SVD, k = r // max(b_out, b_in).
  Block (i, j) uses rank slot (i + j) mod max(b_out, b_in) of U_i and V_j -- distinct along every
  block-row and block-column -- and s_ij selects that slot.
"""
from __future__ import annotations

import torch

from .als import svd_init


def lowrank(A, b_out: int, b_in: int, rank: int, generator=None):
    return svd_init(A, b_out, b_in, rank, generator)


def _block_svd(block: torch.Tensor, k: int):
    """Rank-k factors (P sqrt(sigma), Q sqrt(sigma)) of a (B, p, q) block, zero-filled past its rank."""
    P, sigma, Qh = torch.linalg.svd(block, full_matrices=False)
    k_eff = min(k, sigma.shape[-1])
    root = sigma[:, :k_eff].sqrt()
    left = block.new_zeros(block.shape[0], block.shape[1], k)
    right = block.new_zeros(block.shape[0], block.shape[2], k)
    left[..., :k_eff] = P[..., :k_eff] * root.unsqueeze(1)
    right[..., :k_eff] = Qh[:, :k_eff, :].transpose(1, 2) * root.unsqueeze(1)
    return left, right


def _blocks_of(A, b_out, b_in):
    B, m_pad, n_pad = A.shape
    p, q = m_pad // b_out, n_pad // b_in
    return A.view(B, b_out, p, b_in, q), p, q


def block_diagonal(A, b_out: int, b_in: int, rank: int, generator=None):
    if b_out != b_in:
        raise ValueError(f"block_diagonal needs square block counts, got blocks=({b_out}, {b_in})")
    Ab, p, q = _blocks_of(A, b_out, b_in)
    U = A.new_zeros(A.shape[0], b_out, p, rank)
    V = A.new_zeros(A.shape[0], b_in, q, rank)
    S = A.new_zeros(A.shape[0], b_out, b_in, rank)
    for i in range(b_out):
        U[:, i], V[:, i] = _block_svd(Ab[:, i, :, i, :], rank)
        S[:, i, i] = 1.0
    return U, S, V


def block_low_rank(A, b_out: int, b_in: int, rank: int, generator=None):
    slots = max(b_out, b_in)
    if rank % slots:
        raise ValueError(
            f"block_low_rank needs rank divisible by max(b_out, b_in)={slots}, got rank={rank}")
    k = rank // slots
    Ab, p, q = _blocks_of(A, b_out, b_in)
    U = A.new_zeros(A.shape[0], b_out, p, rank)
    V = A.new_zeros(A.shape[0], b_in, q, rank)
    S = A.new_zeros(A.shape[0], b_out, b_in, rank)
    for i in range(b_out):
        for j in range(b_in):
            cols = slice(((i + j) % slots) * k, ((i + j) % slots + 1) * k)
            U[:, i, :, cols], V[:, j, :, cols] = _block_svd(Ab[:, i, :, j, :], k)
            S[:, i, j, cols] = 1.0
    return U, S, V


STRUCTURES = {"lowrank": lowrank, "block_diagonal": block_diagonal, "block_low_rank": block_low_rank,
              "monarch": block_low_rank}
