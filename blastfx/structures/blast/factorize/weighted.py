"""Calibration-aware BLAST factorization: minimize the layer's *output* error.

Objective: f = ||(A - Ahat) L||_F^2 = tr((A - Ahat) C (A - Ahat)^T) with C = X^T X the (damped)
covariance of the layer's inputs. A dense whitening ``A L`` would destroy the block structure of V,
so instead every ALS step solves the weighted problem exactly, block by block:

* **init**: the activation-whitened SVD (SVD-LLM style) ``A L = P Sigma Q^T``,
  ``U = P sqrt(Sigma)``, ``V = L^{-T} Q sqrt(Sigma)``, s = 1. It is low-rank, hence a BLAST point,
  and the optimum of the weighted problem among rank-r matrices.
* **U step** (per block-row, exact): ``U_i = R_i G_i^{-1}``, ``G_i = sum_jk D_ij K_jk D_ik``,
  ``R_i = sum_j (A C)_ij V_j D_ij`` with ``K_jk = V_j^T C_jk V_k``.
* **V step** (block Gauss-Seidel over j, exact per block): the optimality condition
  ``C_jj V_j P_jj = RHS_j`` separates (Kronecker), so ``V_j = C_jj^{-1} RHS_j P_jj^{-1}``.
* **S step** (Gauss-Seidel over j, batched over i): Hessian ``GU_i * K_jk`` (Hadamard), solved by a
  few warm-started conjugate-gradient steps (one right-hand side per block: a Cholesky there cost most
  of an iteration on a GPU; each CG step still lowers f).

Every step minimizes its block (S: decreases it) with a proximal ridge, so f never increases: the result
is never worse than the whitened SVD at the same rank.
"""
from __future__ import annotations

import torch

from ....linalg import top_singular
from . import blocks as blk


def damped_cholesky(C: torch.Tensor, damping: float) -> torch.Tensor:
    """Cholesky factor of C + damping * mean(diag C) * I (GPTQ-style damping), (B, n, n)."""
    n = C.shape[-1]
    lam = damping * C.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    return torch.linalg.cholesky(C + lam.view(-1, 1, 1) * torch.eye(n, dtype=C.dtype, device=C.device))


def whitened_svd_init(A, L, b_out: int, b_in: int, rank: int):
    """The rank-r minimizer of ||(A - Ahat) L|| as BLAST factors (s = 1)."""
    B, m_pad, n_pad = A.shape
    k = min(rank, m_pad, n_pad)
    P, sigma, Qh = top_singular(A @ L, k)
    root = sigma[:, :k].sqrt()
    U = A.new_zeros(B, m_pad, rank)
    V = A.new_zeros(B, n_pad, rank)
    U[:, :, :k] = P[:, :, :k] * root.unsqueeze(1)
    V[:, :, :k] = torch.linalg.solve_triangular(L.mT, Qh[:, :k, :].mT * root.unsqueeze(1), upper=True)
    return (U.view(B, b_out, m_pad // b_out, rank), A.new_ones(B, b_out, b_in, rank),
            V.view(B, b_in, n_pad // b_in, rank))


def _cross_grams(V, C):
    """K[:, j, k] = V_j^T C_jk V_k, (B, b_in, b_in, r, r)."""
    B, b_in, q, r = V.shape
    CV = C.view(B, b_in * q, b_in, q).permute(0, 2, 1, 3) @ V          # (B, k, n_pad, r): C[:, k-block] V_k
    CV = CV.view(B, b_in, b_in, q, r)                                  # (B, k, j, q, r)
    return V.mT.unsqueeze(2) @ CV.permute(0, 2, 1, 3, 4)              # (B, j, k, r, r)


def weighted_error2(norm2, S, d, GU, K):
    """f = tr(A C A^T) - 2 sum s.d + sum_i sum_jk s_ij^T (GU_i * K_jk) s_ik, per batch (float64)."""
    b_in = S.shape[2]
    quad = 0
    for j in range(b_in):
        for k in range(b_in):
            Hs = ((GU * K[:, j, k].unsqueeze(1)) @ S[:, :, k].unsqueeze(-1)).squeeze(-1)   # (B, b_out, r)
            quad = quad + (S[:, :, j] * Hs).double().sum(dim=(1, 2))
    return norm2 - 2 * (S.double() * d.double()).sum(dim=(1, 2, 3)) + quad


def c_blocks(C, b_in: int):
    """C (B, n, n) as blocks (B, j, k, q, q) = C_jk, and the Cholesky factors of its diagonal blocks
    (B, b_in, q, q): what every V step solves with. C is fixed and damped, so they are formed once."""
    B, q = C.shape[0], C.shape[-1] // b_in
    Cb = C.view(B, b_in, q, b_in, q).permute(0, 1, 3, 2, 4)
    return Cb, torch.linalg.cholesky(torch.stack([Cb[:, j, j] for j in range(b_in)], 1))


def u_gram(S, K):
    """G_i = sum_jk diag(s_ij) K_jk diag(s_ik) (B, b_out, r, r): the Hessian of each row of U_i, from
    the cross Grams ``K`` of V (B, j, k, r, r)."""
    b_in = S.shape[2]
    return blk._sum_over(b_in * b_in, lambda t: (S[:, :, t // b_in].unsqueeze(-1) * S[:, :, t % b_in].unsqueeze(-2))
                         * K[:, t // b_in, t % b_in].unsqueeze(1))


def u_system(S, K, AVc):
    """The U step's normal equations U_i G_i = R_i: G_i (:func:`u_gram`) and R_i = sum_j (AC)_ij V_j
    diag(s_ij) (B, b_out, p, r), from ``AVc`` = (AC)_ij V_j (B, j, i, p, r)."""
    R = blk._sum_over(S.shape[2], lambda j: AVc[:, j] * S[:, :, j].unsqueeze(2))
    return u_gram(S, K), R


def u_step(U, S, K, AVc, damping: float):
    """Every row of U at its exact (damped) optimum given S and V: U_i G_i = R_i (:func:`u_system`).
    Rows are independent, so output weights on the rows do not enter."""
    G, R = u_system(S, K, AVc)
    lam = blk.relative_damping(G, damping)
    return blk.damped_solve_right(G, R + lam[..., None, None] * U, lam)


def v_sweep(AC, Cb, Ljj, U, GU, S, V, damping: float) -> None:
    """One block Gauss-Seidel sweep of the V step, in place: for each block-column j,
    ``C_jj V_j P_jj = R_j - sum_{k != j} C_jk V_k P_kj`` solved exactly given the other blocks, with
    ``P_jk = sum_i diag(s_ij) GU_i diag(s_ik)`` and ``R_j = sum_i (AC)_ij^T U_i diag(s_ij)``. ``Cb`` is
    C as blocks (B, j, k, q, q), ``Ljj`` the Cholesky factors of its diagonal blocks; ``GU`` (B, b_out,
    r, r) is U_i^T U_i, or U_i^T D_i U_i with ``U`` standing for D U when rows carry output weights D."""
    b_out, b_in = S.shape[1], S.shape[2]
    P = torch.stack([torch.stack([blk._sum_over(b_out, lambda i: (S[:, i, j].unsqueeze(-1) * S[:, i, k].unsqueeze(-2))
                                                * GU[:, i]) for k in range(b_in)], 1) for j in range(b_in)], 1)
    AtUc = blk.at_times_u(AC, U, b_in)                                        # (B, i, j, q, r): (AC)_ij^T U_i
    Rv = blk._sum_over(b_out, lambda i: AtUc[:, i] * S[:, i].unsqueeze(2))   # (B, b_in, q, r)
    for j in range(b_in):
        rhs = Rv[:, j].clone()
        for k in range(b_in):
            if k != j:
                rhs -= Cb[:, j, k] @ V[:, k] @ P[:, k, j]
        Y = torch.cholesky_solve(rhs, Ljj[:, j])                                # C_jj^{-1} rhs
        lam = blk.relative_damping(P[:, j, j], damping)
        V[:, j] = blk.damped_solve_right(P[:, j, j], Y + lam[..., None, None] * V[:, j], lam)


def run_weighted_als(A, C, U, S, V, *, iters: int = 30, tol: float = 1e-4, damping: float = 1e-5,
                     target_error: float | None = None, window: int = 5, callback=None,
                     s_steps: int | None = blk.S_CG_STEPS):
    """Refine (U, S, V) for ||(A - Ahat) C^{1/2}||. ``C`` must already be damped (positive definite).
    ``s_steps``: CG steps of the S step's solves (None: Cholesky; see :func:`blocks.damped_cg_vec`).
    Returns (U, S, V, history (iters_run, B) of each matrix's best relative output error so far): per
    matrix the iterate of lowest error, never worse than the start (:class:`blocks.BestIterate`: a
    matrix whose step goes non-finite or raises its error, as ill-conditioned Grams late in a long fit
    can, keeps its best iterate while the others go on; a failed solve ends the fit)."""
    B, b_out = U.shape[:2]
    b_in = V.shape[1]
    U, S, V = U.clone(), S.clone(), V.clone()
    AC = A @ C
    norm2 = (A.double() * AC.double()).sum(dim=(1, 2)).clamp_min(1e-300)
    Cb, Ljj = c_blocks(C, b_in)
    history, best = [], blk.BestIterate(U, S, V)
    for it in range(iters):
        try:
            blk.normalize_columns(U, V, S)
            K = _cross_grams(V, C)
            GU = blk.gram(U)
            AVc = blk.a_times_v(AC, V, b_out)                                  # (B, j, i, p, r): (AC)_ij V_j
            d = torch.stack([(U * AVc[:, j]).sum(2) for j in range(b_in)], dim=2)   # (B, b_out, b_in, r)
            # S step: Gauss-Seidel over block-columns j, all block-rows i at once.
            for j in range(b_in):
                rhs = d[:, :, j].clone()
                for k in range(b_in):
                    if k != j:
                        rhs -= ((GU * K[:, j, k].unsqueeze(1)) @ S[:, :, k].unsqueeze(-1)).squeeze(-1)
                H = GU * K[:, j, j].unsqueeze(1)
                lam = blk.relative_damping(H, damping)
                S[:, :, j] = blk.s_solve(H, rhs, lam, S[:, :, j], s_steps)
            rel = (weighted_error2(norm2, S, d, GU, K).clamp_min(0) / norm2).sqrt()
            if blk.record_iterate(best, history, rel, U, S, V, it, iters, tol, target_error, window, callback):
                break
            U = u_step(U, S, K, AVc, damping)
            # V step: Gauss-Seidel over j; C_jj V_j P_jj = R_j - sum_{k != j} C_jk V_k P_kj.
            v_sweep(AC, Cb, Ljj, U, blk.gram(U), S, V, damping)
            U, S, V = best.hold(U, S, V)
            if best.all_frozen():
                break
        except torch.linalg.LinAlgError:
            best.fail(len(history))
            break
    return (*best.result(), blk.stacked(history, B, A.device))
