"""Block algebra shared by the factorization methods, batched over a leading dimension B.

Shapes: A (B, m_pad, n_pad); U (B, b_out, p, r); V (B, b_in, q, r); S (B, b_out, b_in, r).
Everything is plain tensor code so that it runs unchanged on CPU and GPU.
"""
from __future__ import annotations

import warnings

import torch


def a_times_v(A: torch.Tensor, V: torch.Tensor, b_out: int) -> torch.Tensor:
    """AV[:, j, i] = A_ij @ V_j, shape (B, b_in, b_out, p, r). Costs m * n * r MACs."""
    B, m_pad, n_pad = A.shape
    _, b_in, q, r = V.shape
    out = A.view(B, m_pad, b_in, q).permute(0, 2, 1, 3) @ V            # (B, b_in, m_pad, r)
    return out.view(B, b_in, b_out, m_pad // b_out, r)


def at_times_u(A: torch.Tensor, U: torch.Tensor, b_in: int) -> torch.Tensor:
    """AtU[:, i, j] = A_ij^T @ U_i, shape (B, b_out, b_in, q, r). Costs m * n * r MACs."""
    B, m_pad, n_pad = A.shape
    _, b_out, p, r = U.shape
    out = A.view(B, b_out, p, n_pad).transpose(-1, -2) @ U              # (B, b_out, n_pad, r)
    return out.view(B, b_out, b_in, n_pad // b_in, r)


def gram(X: torch.Tensor) -> torch.Tensor:
    """X^T X per block: (B, b, rows, r) -> (B, b, r, r)."""
    return X.transpose(-1, -2) @ X


def reconstruct(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """The dense (B, m_pad, n_pad) matrix of batched factors."""
    B, b_out, p, r = U.shape
    _, b_in, q, _ = V.shape
    US = U.unsqueeze(2) * S.unsqueeze(3)                                 # (B, b_out, b_in, p, r)
    blocks = US @ V.transpose(-1, -2).unsqueeze(1)                       # (B, b_out, b_in, p, q)
    return blocks.permute(0, 1, 3, 2, 4).reshape(B, b_out * p, b_in * q)


def _sum_over(count, term):
    """sum_k term(k), accumulated in place (the contractions here run over a handful of blocks;
    an explicit loop avoids the 5-D temporaries einsum would build)."""
    total = term(0)
    for k in range(1, count):
        total.add_(term(k))
    return total


def u_normal_equations(S, GV, AV):
    """Gram and right-hand side of min_U ||A - Ahat||: G_i = sum_j diag(s_ij) GV_j diag(s_ij),
    R_i = sum_j (A_ij V_j) diag(s_ij). Returns G (B, b_out, r, r), R (B, b_out, p, r)."""
    G = _sum_over(S.shape[2], lambda j: (S[:, :, j].unsqueeze(-1) * S[:, :, j].unsqueeze(-2)) * GV[:, j].unsqueeze(1))
    R = _sum_over(S.shape[2], lambda j: AV[:, j] * S[:, :, j].unsqueeze(2))
    return G, R


def v_normal_equations(S, GU, AtU):
    """The same for V_j: G_j = sum_i diag(s_ij) GU_i diag(s_ij), R_j = sum_i (A_ij^T U_i) diag(s_ij)."""
    G = _sum_over(S.shape[1], lambda i: (S[:, i].unsqueeze(-1) * S[:, i].unsqueeze(-2)) * GU[:, i].unsqueeze(1))
    R = _sum_over(S.shape[1], lambda i: AtU[:, i] * S[:, i].unsqueeze(2))
    return G, R


def s_normal_equations(U, GU, GV, AV):
    """For each s_ij: H_ij = GU_i * GV_j (Hadamard), d_ij = diag(U_i^T A_ij V_j).
    Returns H (B, b_out, b_in, r, r), d (B, b_out, b_in, r)."""
    H = GU.unsqueeze(2) * GV.unsqueeze(1)
    d = torch.stack([(U * AV[:, j]).sum(2) for j in range(AV.shape[1])], dim=2)
    return H, d


def quadratic_form(H, s):
    """sum over all blocks of s^T H s, accumulated in float64."""
    return (s * (H @ s.unsqueeze(-1)).squeeze(-1)).double().sum(dim=tuple(range(1, s.dim())))


def damped_solve_right(G: torch.Tensor, R: torch.Tensor, eps) -> torch.Tensor:
    """X = R (G + eps I)^{-1} for symmetric PSD G (..., r, r), R (..., rows, r).

    ``eps`` is a tensor broadcastable to G's batch dims (or a float). Cholesky first; systems that
    fail it (numerically indefinite) are solved again with LU, which never needs positive definiteness.
    """
    r = G.shape[-1]
    eye = torch.eye(r, dtype=G.dtype, device=G.device)
    if torch.is_tensor(eps):
        eps = eps.reshape(*eps.shape, 1, 1)
    Gd = G + eps * eye
    L, info = torch.linalg.cholesky_ex(Gd)
    del Gd  # re-formed below only for the rare systems Cholesky rejects
    # two triangular solves: faster than batched cholesky_solve for few right-hand sides
    Y = torch.linalg.solve_triangular(L, R.transpose(-1, -2), upper=False)
    X = torch.linalg.solve_triangular(L.mT, Y, upper=True).transpose(-1, -2)
    bad = info != 0
    if bool(bad.any()):
        X[bad] = torch.linalg.solve((G + eps * eye)[bad], R[bad], left=False)
    return X


def damped_solve_vec(H: torch.Tensor, d: torch.Tensor, eps) -> torch.Tensor:
    """x = (H + eps I)^{-1} d for H (..., r, r), d (..., r)."""
    return damped_solve_right(H, d.unsqueeze(-2), eps).squeeze(-2)


S_CG_STEPS = 8   # CG steps of the S step's solves (None: Cholesky); 8 follow the exact solve's iterates to 1e-7


def damped_cg_vec(H: torch.Tensor, d: torch.Tensor, eps, x0: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximately x = (H + eps I)^{-1} d for symmetric PSD H (..., r, r): ``steps`` iterations of
    Jacobi-preconditioned conjugate gradients from ``x0``, all systems at once.

    Why not Cholesky: the S step solves one r x r system per block *for a single right-hand side*, and
    there a factorization (r^3 / 3 flops, a latency-bound cuSOLVER call, a host sync to check it)
    costs most of an ALS iteration on a GPU, while a CG step is one batched matrix-vector product.
    Started from the current iterate, every CG step lowers the quadratic ``x^T (H + eps I) x / 2 - d^T x``
    (it minimizes it over a growing Krylov space around ``x0``), so an ALS iteration built on it still
    never increases the error (up to rounding; a step along a direction rounding made non-positive
    is skipped); with the proximal ridge the systems are well conditioned and a few
    steps reach the exact solve's trajectory. Fixed step count: no data-dependent branch, no sync.
    """
    if torch.is_tensor(eps):
        eps = eps.unsqueeze(-1)
    precond = 1 / (H.diagonal(dim1=-2, dim2=-1) + eps).clamp_min(torch.finfo(H.dtype).tiny)

    def apply(v):
        return (H @ v.unsqueeze(-1)).squeeze(-1) + eps * v

    def dot(a, b):
        return (a * b).sum(-1, keepdim=True)

    x = x0.clone()
    res = d - apply(x)
    z = res * precond
    p = z.clone()
    rz = dot(res, z)
    tiny = torch.finfo(H.dtype).tiny
    for _ in range(steps):
        Hp = apply(p)
        curvature = dot(p, Hp)                           # > 0 in exact arithmetic; 0 once converged (p = 0)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(tiny), torch.zeros_like(rz))
        x.add_(alpha * p)
        res.sub_(alpha * Hp)
        z = res * precond
        rz_next = dot(res, z)
        p = z + (rz_next / rz.clamp_min(tiny)) * p
        rz = rz_next
    return x


def s_solve(H: torch.Tensor, d: torch.Tensor, eps, x0: torch.Tensor, steps: int | None) -> torch.Tensor:
    """The S step's proximal solve (H + eps I) x = d + eps x0: exact (Cholesky) when ``steps`` is None,
    else :func:`damped_cg_vec` from ``x0``."""
    rhs = d + (eps.unsqueeze(-1) if torch.is_tensor(eps) else eps) * x0
    if steps is None:
        return damped_solve_vec(H, rhs, eps)
    return damped_cg_vec(H, rhs, eps, x0, steps)


def relative_damping(G: torch.Tensor, ridge: float) -> torch.Tensor:
    """ridge * mean diagonal of each Gram, with a floor so all-zero Grams stay solvable."""
    scale = G.diagonal(dim1=-2, dim2=-1).mean(-1)
    return ridge * scale + torch.finfo(G.dtype).tiny ** 0.5


def normalize_columns(U, V, S):
    """Scale every column of each U_i and V_j to unit norm, moving the scale into S (in place).

    The product is unchanged; ALS steps then work on well-scaled Grams.
    """
    nu = U.norm(dim=2)                                                   # (B, b_out, r)
    nv = V.norm(dim=2)                                                   # (B, b_in, r)
    nu = torch.where(nu > 0, nu, torch.ones_like(nu))
    nv = torch.where(nv > 0, nv, torch.ones_like(nv))
    U /= nu.unsqueeze(2)
    V /= nv.unsqueeze(2)
    S *= nu.unsqueeze(2) * nv.unsqueeze(1)


def equalize(U, V):
    """Scale each rank's U columns and V columns (all blocks alike, so any structure such as one shared
    s is kept) to the same root-mean-square column norm over blocks; U V^T is unchanged (in place).

    A no-op on unit columns; it matters after a row weighting is undone on U, which leaves U's
    scale anywhere (a Fisher of 1e-9 left it ~1e4 times V's)."""
    nu = U.norm(dim=2).pow(2).mean(dim=1).sqrt()                          # (B, r)
    nv = V.norm(dim=2).pow(2).mean(dim=1).sqrt()
    ok = (nu > 0) & (nv > 0)
    f = torch.where(ok, (nv / torch.where(ok, nu, torch.ones_like(nu))).sqrt(), torch.ones_like(nu))
    U *= f.unsqueeze(1).unsqueeze(1)
    V /= f.unsqueeze(1).unsqueeze(1)


def balance(U, V, S, scale: torch.Tensor):
    """Final scaling for storage and training: S entries O(1), U and V of equal magnitude, and the
    normalization ``scale`` (B,) of the weight multiplied back in."""
    c = S.pow(2).mean(dim=(1, 2)).sqrt()                                 # (B, r)
    c = torch.where(c > 0, c, torch.ones_like(c))
    S /= c.unsqueeze(1).unsqueeze(1)
    g = (c * scale.view(-1, 1)).sqrt()                                   # (B, r)
    U *= g.view(g.shape[0], 1, 1, -1)
    V *= g.view(g.shape[0], 1, 1, -1)


def finite_per_matrix(*tensors: torch.Tensor) -> torch.Tensor:
    """(B,): whether every entry of each matrix's slice of every tensor is finite."""
    return torch.stack([torch.isfinite(t).flatten(1).all(1) for t in tensors]).all(0)


class BestIterate:
    """Each matrix's iterate of lowest recorded error in a batched alternating fit; a matrix whose
    fit breaks down is frozen at it while the rest of the batch goes on.

    Why: in exact arithmetic every ALS step lowers the error, so the last iterate would be the best.
    In floating point an ill-conditioned Gram (a real model's input covariance has outlier channels;
    TF32 products round at 1e-3) can make one matrix's step worse, finite or not, and the steps after
    it build on that. In a batched fit of SmolLM2-135M's 30 o_proj with TF32 products one layer's
    iterate became huge but finite, another's next step went non-finite, and undoing that iteration
    for the whole batch stopped all 30 fits at iteration 10, the first layer at a relative weight error
    of 3e10 (``benchmarks/fit_precision.py``). So errors are recorded per matrix after each S step; a matrix whose error goes
    non-finite, or rises by more than ``RISE`` of itself plus ``NOISE`` (in exact arithmetic it never
    rises; an exact fit's error of 1e-8 wanders by more than 1% in rounding), or whose U or V step leaves
    a non-finite factor, is put back to its best iterate and kept there (frozen)."""

    RISE = 1e-2
    NOISE = 1e-5

    def __init__(self, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor):
        self.factors = (U.clone(), S.clone(), V.clone())                    # the start, until one is recorded
        B = U.shape[0]
        self.error = torch.full((B,), float("inf"), dtype=torch.float64, device=U.device)
        self.frozen = torch.zeros(B, dtype=torch.bool, device=U.device)
        self.failed_at = None

    def _where(self, mask: torch.Tensor, new, kept) -> tuple:
        return tuple(torch.where(mask.view(-1, *[1] * (k.dim() - 1)), n, k) for n, k in zip(new, kept))

    def record(self, rel: torch.Tensor, U, S, V) -> torch.Tensor:
        """After an S step, ``rel`` (B,) the error of (U, S, V): keep each matrix's iterate that is finite
        and its best so far, freeze those that broke down. Returns each matrix's best error (inf: none)."""
        finite = torch.isfinite(rel) & finite_per_matrix(U, S, V)
        better = finite & ~self.frozen & (rel < self.error)
        self.factors = self._where(better, (U, S, V), self.factors)
        self.error = torch.where(better, rel.to(self.error.dtype), self.error)
        self.frozen |= ~finite | (rel > self.error * (1 + self.RISE) + self.NOISE)
        return self.error                 # replaced, never written in place: history may keep it

    def hold(self, U, S, V) -> tuple:
        """After the U and V steps: matrices left non-finite are frozen too, and every frozen matrix is
        put back to its best iterate (no sync: a masked select)."""
        self.frozen |= ~finite_per_matrix(U, S, V)
        return self._where(self.frozen, self.factors, (U, S, V))

    def fail(self, iterations: int):
        """A solve raised after ``iterations`` recorded iterations: the fit ends with the best iterates."""
        self.failed_at = iterations

    def all_frozen(self) -> bool:
        return bool(self.frozen.all())

    def result(self) -> tuple:
        """The best iterates, with a warning where any matrix's fit broke down or a solve failed."""
        frozen, batch = int(self.frozen.sum()), self.frozen.numel()
        if self.failed_at is not None:
            warnings.warn(f"factorization stopped after {self.failed_at} iteration(s): a solve failed (an "
                          "ill-conditioned Gram), so each matrix keeps its best iterate; a larger damping or fewer "
                          "iterations avoid it", RuntimeWarning, stacklevel=3)
        elif frozen:
            warnings.warn(f"the fit of {frozen} of {batch} matrices broke down (a step went non-finite or raised "
                          "its error: an ill-conditioned Gram), so each keeps its best iterate while the others "
                          "go on; a larger damping, fewer iterations or (with TF32 products) fit_precision='fp32' avoid it",
                          RuntimeWarning, stacklevel=3)
        return self.factors


def record_iterate(best: BestIterate, history: list, rel: torch.Tensor, U, S, V, it: int, iters: int, tol: float,
                   target_error: float | None, window: int, callback=None) -> bool:
    """An S step's iterate recorded in ``best`` and its best errors in ``history``; whether to stop:
    :func:`record_and_check` says so, or every matrix is frozen (then a step that recorded nothing at
    all, the first one gone non-finite everywhere, adds no history entry)."""
    errors = best.record(rel, U, S, V)
    if best.all_frozen():
        if bool(torch.isfinite(errors).any()):
            record_and_check(history, errors, it, iters, tol, target_error, window, callback)
        return True
    return record_and_check(history, errors, it, iters, tol, target_error, window, callback)


def stacked(history: list, batch: int, device) -> torch.Tensor:
    """The per-iteration errors as a tensor (iters_run, batch); (0, batch) when no iterate was recorded
    (the start is returned unchanged)."""
    return torch.stack(history) if history else torch.zeros(0, batch, dtype=torch.float64, device=device)


def record_and_check(history: list, rel: torch.Tensor, it: int, iters: int, tol: float,
                     target_error: float | None, window: int, callback=None) -> bool:
    """Append this iteration's relative error (B,) and say whether to stop: the iteration cap, the
    target reached by every matrix, or less than ``tol`` relative improvement per iteration over the
    last ``window`` iterations (a window: from the SVD start the first steps can be tiny)."""
    history.append(rel)
    if callback is not None:
        callback(it, rel)
    if it == iters - 1:
        return True
    if target_error is not None and bool((rel <= target_error).all()):
        return True
    return it >= window and bool(((history[-1 - window] - rel) <= window * tol * rel).all())
