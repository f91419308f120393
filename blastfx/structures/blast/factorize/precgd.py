"""The BLAST paper's factorization (Lee et al. 2024, Alg. 1): preconditioned gradient descent.

Kept as the reference that blastfx's faster methods are measured against. Alternating U, V, S
steps on 0.5 * ||A - Ahat||_F^2; each gradient is right-multiplied by ((Gram of the other factors)
+ eps I)^{-1} with eps = delta * ||A - Ahat||_F, the step size decays linearly from 1 to 0, the
init is small and random, and A is the weight divided by its standard deviation.

eps -> 0 when the fit becomes exact (rank >= block size): a relative floor on eps keeps every
solve well posed without changing the algorithm elsewhere.
"""
from __future__ import annotations

import math

import torch

from . import blocks as blk


def random_init(A, b_out: int, b_in: int, rank: int, generator=None):
    """The paper's init: U, V ~ N(0, 1e-6 / r), S ~ N(0, 1)."""
    B, m_pad, n_pad = A.shape

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=A.dtype).to(A.device)

    U = randn(B, b_out, m_pad // b_out, rank) * (1e-3 / math.sqrt(rank))
    V = randn(B, b_in, n_pad // b_in, rank) * (1e-3 / math.sqrt(rank))
    S = randn(B, b_out, b_in, rank)
    return U, S, V


def run_precgd(A, U, S, V, *, iters: int = 300, delta: float = 0.1, floor: float = 1e-6,
           target_error: float | None = None, callback=None):
    """Run ``iters`` PrecGD iterations. Returns (U, S, V, history of relative errors (iters, B))."""
    b_out, b_in = U.shape[1], V.shape[1]
    norm = A.norm(dim=(1, 2))
    history = []

    def residual():
        return (A - blk.reconstruct(U, S, V)).norm(dim=(1, 2))            # (B,)

    def eps_for(G, err):
        e = (delta * err).view(-1, *([1] * (G.dim() - 3)))
        return torch.maximum(e, blk.relative_damping(G, floor))

    err = residual()
    for t in range(iters):
        lr = 1.0 - t / iters
        GV = blk.gram(V)
        G, R = blk.u_normal_equations(S, GV, blk.a_times_v(A, V, b_out))
        U = U - lr * blk.damped_solve_right(G, U @ G - R, eps_for(G, err))
        err = residual()

        GU = blk.gram(U)
        G, R = blk.v_normal_equations(S, GU, blk.at_times_u(A, U, b_in))
        V = V - lr * blk.damped_solve_right(G, V @ G - R, eps_for(G, err))
        err = residual()

        GV = blk.gram(V)
        H, d = blk.s_normal_equations(U, GU, GV, blk.a_times_v(A, V, b_out))
        grad = (H @ S.unsqueeze(-1)).squeeze(-1) - d
        S = S - lr * blk.damped_solve_vec(H, grad, eps_for(H, err))
        err = residual()

        rel = err / norm
        history.append(rel)
        if callback is not None:
            callback(t, rel)
        if target_error is not None and bool((rel <= target_error).all()):
            break
    return U, S, V, torch.stack(history)
