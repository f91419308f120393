"""blastfx's default factorization: SVD warm start + exact damped alternating least squares.

Why it is fast where the paper's algorithm (:mod:`.precgd`) is slow:

* **Warm start.** A BLAST matrix with every ``s_ij = 1`` is the low-rank matrix ``U V^T`` cut into
  blocks, so the rank-r truncated SVD is an exact BLAST point. Starting there, the first iteration
  is already at the low-rank optimum; ALS only improves from it (each step solves its
  sub-problem exactly, so the error never rises) and reaches what 300 damped, decayed-step PrecGD
  iterations reach in a few dozen.
* **Exact steps.** With step size 1 and damping -> 0, a preconditioned gradient step *is* the
  least-squares solution for that factor. We take it directly, with a *proximal* ridge
  (``damping`` x mean Gram diagonal, pulling toward the current iterate rather than toward zero):
  every solve stays well posed when rank >= block size, and no fixed point is moved, so exact
  fits stay exact.
* **Cheap error.** After the S step the squared error is ``||A||^2 - 2 s.d + s^T H s`` from
  quantities already computed, so early stopping costs nothing; no dense reconstruction per step.
* **Batched.** Many same-shape matrices are one batched problem.

Per iteration: two passes over A (A V and A^T U, 2 m n r MACs) plus r x r solves: Cholesky for U and
V (many right-hand sides), a few conjugate-gradient steps for S (one right-hand side per block).
"""
from __future__ import annotations

import torch

from . import blocks as blk


def truncated_svd(A: torch.Tensor, k: int, oversample: int = 64, power_iters: int = 2, generator=None):
    """Top-k singular triplets of a batch (B, m, n). Large matrices with k well below min(m, n) use a
    randomized range finder (Halko et al.) with power iterations: ALS refines the start anyway, and
    a full SVD of a 4096x4096 matrix costs more than the whole ALS run."""
    B, m, n = A.shape
    small = min(m, n)
    if small < 512 or k + oversample > small // 2:
        return torch.linalg.svd(A, full_matrices=False)
    wide = m < n
    M = A.transpose(1, 2) if wide else A                        # tall: (B, big, small)
    omega = torch.randn(B, M.shape[2], k + oversample, generator=generator, dtype=A.dtype).to(A.device)
    Y = torch.linalg.qr(M @ omega).Q
    for _ in range(power_iters):
        Y = torch.linalg.qr(M @ torch.linalg.qr(M.transpose(1, 2) @ Y).Q).Q
    Ub, sigma, Vh = torch.linalg.svd(Y.transpose(1, 2) @ M, full_matrices=False)
    P = Y @ Ub
    if wide:                                                     # A = (M)^T = Vh^T sigma P^T
        return Vh.transpose(1, 2)[..., :k], sigma[..., :k], P.transpose(1, 2)[..., :k, :]
    return P[..., :k], sigma[..., :k], Vh[..., :k, :]


def svd_init(A: torch.Tensor, b_out: int, b_in: int, rank: int, generator=None):
    """Rank-r truncated SVD as BLAST factors: U_i, V_j = rows of P sqrt(sigma), Q sqrt(sigma); s = 1."""
    B, m_pad, n_pad = A.shape
    P, sigma, Qh = truncated_svd(A, rank, generator=generator)
    k = min(rank, sigma.shape[-1])
    root = sigma[:, :k].sqrt()
    U = A.new_zeros(B, m_pad, rank)
    V = A.new_zeros(B, n_pad, rank)
    U[:, :, :k] = P[:, :, :k] * root.unsqueeze(1)
    V[:, :, :k] = Qh[:, :k, :].transpose(1, 2) * root.unsqueeze(1)
    if k < rank:  # rank beyond the matrix rank: small random columns ALS may still use
        U[:, :, k:] = 1e-3 * torch.randn(B, m_pad, rank - k, generator=generator, dtype=A.dtype).to(A.device)
        V[:, :, k:] = 1e-3 * torch.randn(B, n_pad, rank - k, generator=generator, dtype=A.dtype).to(A.device)
    U = U.view(B, b_out, m_pad // b_out, rank)
    V = V.view(B, b_in, n_pad // b_in, rank)
    S = A.new_ones(B, b_out, b_in, rank)
    return U, S, V


def run_als(A, U, S, V, *, iters: int = 100, tol: float = 1e-4, damping: float = 1e-5,
            target_error: float | None = None, window: int = 10, callback=None,
            s_steps: int | None = blk.S_CG_STEPS):
    """Refine (U, S, V) for ||A - BLAST(U, S, V)||_F by exact alternating least squares (the S step's
    single-vector systems by ``s_steps`` CG steps, None: Cholesky; see :func:`blocks.damped_cg_vec`).

    Stops as :func:`blocks.record_and_check` says (iteration cap, ``target_error``, or stalled). Returns (U, S, V, history) where
    history is each matrix's best relative error after each iteration (tensor (iters_run, B)); the
    factors are each matrix's best iterate (:class:`blocks.BestIterate`: a matrix whose step goes
    non-finite or raises its error is kept at its best while the others go on; a failed solve ends the fit).
    """
    b_out, b_in = U.shape[1], V.shape[1]
    norm2 = A.double().pow(2).sum(dim=(1, 2)).clamp_min(torch.finfo(torch.float64).tiny)
    U, S, V = U.clone(), S.clone(), V.clone()
    blk.normalize_columns(U, V, S)
    history, best = [], blk.BestIterate(U, S, V)
    AV = blk.a_times_v(A, V, b_out)
    for it in range(iters):
        try:
            GU, GV = blk.gram(U), blk.gram(V)
            # S step: every s_ij at once.
            H, d = blk.s_normal_equations(U, GU, GV, AV)
            lam = blk.relative_damping(H, damping)
            S = blk.s_solve(H, d, lam, S, s_steps)
            err2 = norm2 - 2 * (S.double() * d.double()).sum(dim=(1, 2, 3)) + blk.quadratic_form(H, S)
            rel = (err2.clamp_min(0) / norm2).sqrt()
            if blk.record_iterate(best, history, rel, U, S, V, it, iters, tol, target_error, window, callback):
                break
            # U step (uses A V from the current V), then V step (needs A^T U with the new U).
            G, R = blk.u_normal_equations(S, GV, AV)
            lam = blk.relative_damping(G, damping)
            U = blk.damped_solve_right(G, R + lam[..., None, None] * U, lam)
            GU = blk.gram(U)
            G, R = blk.v_normal_equations(S, GU, blk.at_times_u(A, U, b_in))
            lam = blk.relative_damping(G, damping)
            V = blk.damped_solve_right(G, R + lam[..., None, None] * V, lam)
            U, S, V = best.hold(U, S, V)
            if best.all_frozen():
                break
            blk.normalize_columns(U, V, S)
            AV = blk.a_times_v(A, V, b_out)
        except torch.linalg.LinAlgError:
            best.fail(len(history))
            break
    return (*best.result(), blk.stacked(history, A.shape[0], A.device))
