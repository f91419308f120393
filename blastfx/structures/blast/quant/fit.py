"""Quantizing fitted BLAST factors so that the *layer's output* loses as little as possible.

Rounding U and V at the end (:func:`round_factors`) throws the rounding error away uncorrected. The
calibrated factorization already solves for each factor in closed form given the others, so
:func:`quantize_fitted` lets the float factors absorb the error of the quantized ones instead:

1. quantize V (per column of r, :mod:`.formats`; scales searched, :mod:`.rounding`);
2. refit U and S to the fixed, quantized V: alternating exact least-squares steps of the output
   objective ``||D^1/2 (W - What) C^1/2||`` (C the damped input covariance, D the output weights);
3. quantize U (per row of p), each row rounded with error feedback through the Hessian of its
   output error (the U step's Gram), with searched scales;
4. refit each row's scale of U (one scalar per row, closed form) and S, alternately;
5. further rounds: refit V in float to the quantized U (one sweep of the factorization's V step),
   round it again; then refit U and S in float to the new V and round U again (3-4).

Every refit minimizes its block exactly (V's sweep block-column by block-column), so it only removes
error that rounding put in. Each round's result is scored on the objective and the best returned;
the rounds stop early once one no longer lowers it for any matrix of the batch. Without calibration
C is the identity and the steps fit the weight. The work is a few products with the covariance and
(b_in r)-sized solves per block-row, small beside the factorization.

Why V first: its error is then absorbed by U and S, which have m r + b_out b_in r free values, and
per-row scales of U absorb what rounding U leaves in each output row's gain. U's rounding is the
larger loss at int4 (r codes per row under one scale), which the error feedback and the later
rounds (V refitted around the rounded U) reduce (``benchmarks/quantized_rounding.py`` measures
each on SmolLM2's layers against nearest rounding).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..factorize import blocks as blk
from ..factorize.weighted import _cross_grams, c_blocks, u_gram, u_step, u_system, v_sweep, weighted_error2
from ..layout import BlastShape
from . import formats, rounding

RIDGE = 1e-6            # proximal ridge of each solve, relative to its Gram's mean diagonal


@dataclass
class QuantizedFactors:
    """Codes ``U`` (b_out, p, r) and ``V`` (b_in, q, r) in ``format``'s storage dtype (the last
    dimension ceil(r/2) for packed int4) with float32 ``U_scale`` (b_out, p) and ``V_scale`` (b_in, r),
    float ``S`` (b_out, b_in, r); with a leading batch dimension when several matrices were quantized
    together."""
    U: torch.Tensor
    U_scale: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    V_scale: torch.Tensor
    shape: BlastShape
    format: formats.FactorFormat

    @property
    def batched(self) -> bool:
        return self.U.dim() == 4

    def __getitem__(self, k: int) -> "QuantizedFactors":
        if not self.batched:
            raise TypeError("only batched QuantizedFactors can be indexed")
        return replace(self, U=self.U[k], U_scale=self.U_scale[k], S=self.S[k], V=self.V[k], V_scale=self.V_scale[k])

    def __len__(self) -> int:
        if not self.batched:
            raise TypeError("unbatched QuantizedFactors have no length")
        return self.U.shape[0]

    def dequantized(self, dtype=torch.float32):
        """(U, S, V) as floats in ``dtype``."""
        return (formats.dequantize_u(self.U, self.U_scale, dtype, rank=self.shape.rank), self.S.to(dtype),
                formats.dequantize_v(self.V, self.V_scale, dtype))

    def to_dense(self, dtype=torch.float32) -> torch.Tensor:
        """The dense matrix (or batch of them) the quantized factors represent."""
        U, S, V = (t if self.batched else t.unsqueeze(0) for t in self.dequantized(dtype))
        dense = blk.reconstruct(U, S, V)[:, : self.shape.out_features, : self.shape.in_features]
        return dense if self.batched else dense[0]


def _batched(factors):
    U, S, V = factors.U, factors.S, factors.V
    return (U, S, V, True) if U.dim() == 4 else (U.unsqueeze(0), S.unsqueeze(0), V.unsqueeze(0), False)


def _result(Uc, su, S, Vc, sv, shape, fmt, batched) -> QuantizedFactors:
    q = QuantizedFactors(Uc, su.to(formats.SCALE_DTYPE), S, Vc, sv.to(formats.SCALE_DTYPE), shape, fmt)
    return q if batched else q[0]


def round_factors(factors, factor_dtype: str) -> QuantizedFactors:
    """Round-to-nearest of float factors (:class:`~blastfx.BlastFactors` or anything with U, S, V and
    shape), nothing refitted: the baseline :func:`quantize_fitted` improves on."""
    fmt = formats.get(factor_dtype)
    U, S, V, batched = _batched(factors)
    Uc, su = formats.quantize_u(U, fmt)
    Vc, sv = formats.quantize_v(V, fmt)
    return _result(Uc, su, S.clone(), Vc, sv, factors.shape, fmt, batched)


def _prepared_covariance(C, B: int, n: int, n_pad: int, damping: float, dtype, device) -> torch.Tensor:
    """The padded covariance, normalized to mean diagonal 1 and damped as the factorization damps it
    (identity without calibration: the weight error)."""
    if C is None:
        return torch.eye(n_pad, dtype=dtype, device=device).expand(B, n_pad, n_pad)
    C = C.to(device=device, dtype=dtype)
    C = (C.unsqueeze(0) if C.dim() == 2 else C).expand(B, n, n)
    C = F.pad(C, (0, n_pad - n, 0, n_pad - n))
    C = C / C.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30).view(-1, 1, 1)
    return C + damping * torch.eye(n_pad, dtype=dtype, device=device)


def _row_weights(weights, B: int, m: int, m_pad: int, dtype, device) -> torch.Tensor:
    """Output-row weights (B, m_pad), with the factorization's floor; zero on padding rows."""
    if weights is None:
        w = torch.ones(B, m, dtype=dtype, device=device)
    else:
        w = torch.as_tensor(weights).to(device=device, dtype=dtype)
        w = (w.unsqueeze(0) if w.dim() == 1 else w).expand(B, m)
        w = w + 1e-6 * w.mean(-1, keepdim=True)
    return F.pad(w, (0, m_pad - m))


class _Problem:
    """The fixed parts of the output objective for a batch: A C, the cross Grams of V, the weights."""

    def __init__(self, A, C, D):
        self.A, self.C, self.D = A, C, D
        self.AC = A @ C
        self._blocks = None                 # C in blocks and its diagonal blocks' Cholesky factors (V steps)

    def with_v(self, V, b_out: int):
        self.K = _cross_grams(V, self.C)                                  # (B, j, k, r, r): V_j^T C_jk V_k
        self.AVc = blk.a_times_v(self.AC, V, b_out)                        # (B, j, i, p, r): (AC)_ij V_j
        return self

    def u_system(self, S):
        """G_i and R_i of the U step's normal equations U_i G_i = R_i (:func:`weighted.u_system`)."""
        return u_system(S, self.K, self.AVc)

    def u_step(self, U, S):
        """Every row of U at its exact optimum given S and V (:func:`weighted.u_step`; D does not enter)."""
        return u_step(U, S, self.K, self.AVc, RIDGE)

    def s_step(self, U, S):
        """All of S at its exact optimum given U and V, one (b_in r)-sized system per block-row:
        H_i = (U_i^T D_i U_i) * K (Hadamard, K as a (b_in r)^2 matrix), d_i = diag(U_i^T D_i (AC)_ij V_j)."""
        B, b_out, b_in, r = S.shape
        p = U.shape[2]
        Kfull = self.K.permute(0, 1, 3, 2, 4).reshape(B, b_in * r, b_in * r)
        Dw = self.D.view(B, b_out, p, 1)
        out = torch.empty_like(S)
        for i in range(b_out):
            UD = U[:, i] * Dw[:, i]                                               # (B, p, r)
            GU = UD.mT @ U[:, i]                                                  # (B, r, r)
            H = Kfull * GU.repeat(1, b_in, b_in)
            d = torch.stack([(UD * self.AVc[:, j, i]).sum(1) for j in range(b_in)], 1).reshape(B, b_in * r)
            lam = blk.relative_damping(H, RIDGE)
            s = blk.damped_solve_vec(H, d + lam.unsqueeze(-1) * S[:, i].reshape(B, b_in * r), lam)
            out[:, i] = s.view(B, b_in, r)
        return out

    def _c_blocks(self, b_in: int):
        """:func:`weighted.c_blocks` of C, formed at the first V step and kept for the others."""
        if self._blocks is None:
            self._blocks = c_blocks(self.C, b_in)
        return self._blocks

    def v_step(self, U, S, V):
        """One block Gauss-Seidel sweep of the V step (the factorization's, :func:`v_sweep`, with the
        output weights D): each block-column solved exactly given the others, so the objective does
        not rise; with one block column (or uncorrelated blocks) the sweep is the exact optimum."""
        B, b_out, p, _ = U.shape
        DU = U * self.D.view(B, b_out, p, 1)
        Cb, Ljj = self._c_blocks(V.shape[1])
        V = V.clone()
        v_sweep(self.AC, Cb, Ljj, DU, DU.mT @ U, S, V, RIDGE)
        return V

    def error(self, U, S):
        """The objective tr(D (A - What) C (A - What)^T) less its constant tr(D A C A^T), per matrix
        (B,), for the V of :meth:`with_v`, from the Grams already formed (no m x n product), in float64
        (:func:`weighted_error2`, the factorization's own measure)."""
        B, b_out, p, _ = U.shape
        DU = U * self.D.view(B, b_out, p, 1)
        d = torch.stack([(DU * self.AVc[:, j]).sum(2) for j in range(S.shape[2])], dim=2)   # (B, b_out, b_in, r)
        return weighted_error2(0.0, S, d, DU.mT @ U, self.K)

    def row_scales(self, codes, scale, S):
        """Each row's scale of U at its exact optimum given its (stored) codes, S and V:
        alpha = (R u) / (u G u)."""
        G, R = self.u_system(S)
        u = formats.codes_of(codes, S.shape[-1]).to(R.dtype)
        num = (R * u).sum(-1)
        den = ((u @ G) * u).sum(-1)
        return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), scale)


def _round_v(V, C, fmt, dtype):
    """Codes and scales of V (B, b_in, q, r), the scales searched with each input's variance as the
    weight of its rows; returns (codes, scales, the rounded V in ``dtype``)."""
    B, b_in, q, _ = V.shape
    weight = C.diagonal(dim1=-2, dim2=-1).reshape(B, b_in, q, 1)
    sv = rounding.searched_scales(V, -2, fmt, weight)
    Vc = fmt.encode(V, sv.unsqueeze(-2))
    return Vc, sv, formats.dequantize_v(Vc, sv, dtype)


def _round_u(U, S, problem, fmt):
    """Codes and row scales of U (B, b_out, p, r): each row rounded with error feedback through its
    output error's Hessian G_i (the U step's Gram, shared by the rows of a block-row)."""
    G = u_gram(S, problem.K)
    su = rounding.searched_scales(U, -1, fmt, G.diagonal(dim1=-2, dim2=-1).unsqueeze(2))
    codes = rounding.error_feedback_codes(U, G, su, fmt)
    return fmt.encode(codes, torch.ones((), dtype=codes.dtype, device=codes.device)), su


def _where(keep, new, old):
    """Per matrix of the batch (``keep`` (B,)), ``new`` where kept, else ``old``; float8 codes are
    selected as their bytes (``torch.where`` has no float8 kernels)."""
    mask = keep.view(-1, *[1] * (new.dim() - 1))
    if new.dtype.itemsize == 1 and new.dtype.is_floating_point:
        return torch.where(mask, new.view(torch.uint8), old.view(torch.uint8)).view(new.dtype)
    return torch.where(mask, new, old)


def _fit_scales(problem, Uc, su, S, iters, rank, dtype):
    for _ in range(iters):
        su = problem.row_scales(Uc, su, S)
        S = problem.s_step(formats.dequantize_u(Uc, su, dtype, rank=rank), S)
    return su, S


def quantize_fitted(W, factors, factor_dtype: str, *, calibration=None, calibration_damping: float | None = None,
                    output_weights=None, refit_iters: int = 2, rounds: int = 3) -> QuantizedFactors:
    """Quantize fitted float factors of ``W`` ((m, n) or (B, m, n)) so that the output error stays
    small: V rounded first, U and S refitted to it, then U rounded and its row scales and S refitted,
    and ``rounds - 1`` more rounds of V and U refitted and rounded again (see the module docstring).
    ``calibration`` (the input covariance, (n, n) or (B, n, n)), ``calibration_damping`` and
    ``output_weights`` ((m,) or (B, m)) are those the factors were fitted with; without them the
    weight error is the objective. ``refit_iters``: alternations of each refit (0: round only, as
    :func:`round_factors`); ``rounds``: at least 1. Computed in float32 (float64 for float64 W)."""
    fmt = formats.get(factor_dtype)
    for name, value, low in (("refit_iters", refit_iters, 0), ("rounds", rounds, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if refit_iters == 0:
        return round_factors(factors, factor_dtype)
    if calibration_damping is None:
        from ....config import CALIBRATION_DAMPING       # config imports this package: import at call time
        calibration_damping = CALIBRATION_DAMPING
    shape: BlastShape = factors.shape
    U, S, V, batched = _batched(factors)
    A = W if W.dim() == 3 else W.unsqueeze(0)
    B, m, n = A.shape
    if (m, n) != (shape.out_features, shape.in_features) or U.shape[0] != B:
        raise ValueError(f"W {tuple(W.shape)} does not match factors of shape {shape} (batch {U.shape[0]})")
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    device = U.device
    A = F.pad(A.to(device=device, dtype=dtype), (0, shape.n_pad - n, 0, shape.m_pad - m))
    C = _prepared_covariance(calibration, B, n, shape.n_pad, calibration_damping, dtype, device)
    D = _row_weights(output_weights, B, m, shape.m_pad, dtype, device)
    U, S, V = (t.to(dtype) for t in (U, S, V))
    problem = _Problem(A, C, D)
    rank = shape.rank

    Vc, sv, Vq = _round_v(V, C, fmt, dtype)
    problem.with_v(Vq, shape.b_out)
    best = best_error = None
    for k in range(rounds):
        if k > 0:                       # V again, refitted in float around the rounded U
            Vc, sv, Vq = _round_v(problem.v_step(U, S, Vq), C, fmt, dtype)     # U: the rounded U, in float
            problem.with_v(Vq, shape.b_out)
        for _ in range(refit_iters):
            U = problem.u_step(U, S)
            S = problem.s_step(U, S)
        U.view(B, shape.m_pad, rank)[:, m:] = 0
        Uc, su = _round_u(U, S, problem, fmt)
        su, S = _fit_scales(problem, Uc, su, S, refit_iters, rank, dtype)
        U = formats.dequantize_u(Uc, su, dtype, rank=rank)
        error = problem.error(U, S)
        if best is None:
            best, best_error = [Uc, su, S, Vc, sv], error
        else:
            keep = error < best_error
            if not bool(keep.any()):                    # no matrix gained: later rounds start worse
                break
            best = [_where(keep, new, old) for new, old in zip((Uc, su, S, Vc, sv), best)]
            best_error = torch.minimum(error, best_error)
    Uc, su, S, Vc, sv = best
    return _result(Uc, su, S, Vc, sv, shape, fmt, batched)
