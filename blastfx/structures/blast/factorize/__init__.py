"""Dense -> BLAST factorization: ``factorize(W, rank, blocks, method=...)``.

Methods (pure tensor code: weight in, factors out; runs on W's device, or ``device=``), a registry
(:mod:`.methods`) that :func:`factorize` dispatches over:

* ``"als"`` (default): SVD warm start + exact damped alternating least squares (:mod:`.als`).
* ``"precgd"``: the BLAST paper's preconditioned gradient descent, 300 iterations (:mod:`.precgd`).
* ``"lowrank"``, ``"block_diagonal"``, ``"block_low_rank"`` (alias ``"monarch"``): classic structures
  as exact BLAST configurations (:mod:`.structured`).

``W`` may be (m, n), or (B, m, n) / a list of same-shape matrices: they are factorized as one
batched problem and the factors get a leading batch dimension.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ..layout import BlastShape
from . import blocks as blk
from .methods import METHODS as METHOD_REGISTRY
from .methods import Problem
from .precision import check as check_precision
from .precision import matmul_precision
from .weighted import damped_cholesky

METHODS = tuple(METHOD_REGISTRY)

__all__ = ["BlastFactors", "factorize", "METHODS"]


@dataclass
class BlastFactors:
    """Factors U (b_out, p, r), S (b_out, b_in, r), V (b_in, q, r) [with a leading batch dim if
    batched], their geometry, and how they were obtained."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    shape: BlastShape
    method: str = "als"
    rel_error: torch.Tensor | None = None   # ||W - What||_F / ||W||_F, per matrix
    iterations: int = 0
    seconds: float = 0.0
    history: torch.Tensor | None = field(default=None, repr=False)
    output_error: torch.Tensor | None = None  # ||(W - What) C^1/2|| / ||W C^1/2|| when calibrated

    @property
    def batched(self) -> bool:
        return self.U.dim() == 4

    def __len__(self) -> int:
        if not self.batched:
            raise TypeError("unbatched BlastFactors have no length")
        return self.U.shape[0]

    def __getitem__(self, k: int) -> "BlastFactors":
        if not self.batched:
            raise TypeError("only batched BlastFactors can be indexed")
        return replace(self, U=self.U[k], S=self.S[k], V=self.V[k],
                       rel_error=None if self.rel_error is None else self.rel_error[k],
                       output_error=None if self.output_error is None else self.output_error[k],
                       history=None if self.history is None else self.history[:, k])

    def to(self, *args, **kwargs) -> "BlastFactors":
        return replace(self, U=self.U.to(*args, **kwargs), S=self.S.to(*args, **kwargs),
                       V=self.V.to(*args, **kwargs))

    def to_dense(self) -> torch.Tensor:
        s = self.shape
        U, S, V = (t if self.batched else t.unsqueeze(0) for t in (self.U, self.S, self.V))
        dense = blk.reconstruct(U, S, V)[:, : s.out_features, : s.in_features]
        return dense if self.batched else dense[0]


def _as_batch(W) -> tuple[torch.Tensor, bool]:
    if isinstance(W, (list, tuple)):
        if not W:
            raise ValueError("W is an empty list")
        shapes = {tuple(w.shape) for w in W}
        if len(shapes) != 1:
            raise ValueError(f"a list W must hold matrices of one shape, got {sorted(shapes)}")
        W = torch.stack(list(W))
    if not torch.is_tensor(W):
        raise ValueError(f"W must be a tensor or a list of tensors, got {type(W).__name__}")
    if W.dim() not in (2, 3):
        raise ValueError(f"W must be (m, n) or (B, m, n), got shape {tuple(W.shape)}")
    if not W.dtype.is_floating_point:
        raise ValueError(f"W must be floating point, got dtype {W.dtype}")
    bad = (~torch.isfinite(W)).sum().item()
    if bad:
        raise ValueError(f"W contains {bad} NaN or Inf entries (of {W.numel()})")
    return (W, True) if W.dim() == 3 else (W.unsqueeze(0), False)


def _as_covariance(C, B: int, n: int) -> torch.Tensor:
    if not torch.is_tensor(C) or C.shape[-2:] != (n, n) or C.dim() not in (2, 3):
        raise ValueError(f"calibration must be an (n, n) or (B, n, n) covariance with n={n}, got "
                         f"{tuple(C.shape) if torch.is_tensor(C) else type(C).__name__}")
    if not torch.isfinite(C).all():
        raise ValueError("calibration covariance contains NaN or Inf")
    C = C.unsqueeze(0) if C.dim() == 2 else C
    if C.shape[0] not in (1, B):
        raise ValueError(f"calibration holds {C.shape[0]} covariances for {B} matrices")
    return C.expand(B, n, n)


def _as_row_scale(weights, B: int, m: int) -> torch.Tensor:
    """sqrt of non-negative output-row weights, (B, m); rejects what cannot be a weighting."""
    w = torch.as_tensor(weights)
    if w.dim() == 1:
        w = w.unsqueeze(0)
    if w.dim() != 2 or w.shape[-1] != m or w.shape[0] not in (1, B):
        raise ValueError(f"output_weights must be ({m},) or ({B}, {m}) for {B} matrices with {m} rows, "
                         f"got {tuple(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("output_weights must be finite and non-negative")
    if (w.amax(-1) <= 0).any():
        raise ValueError("output_weights are all zero for some matrix: nothing would be fitted")
    w = w.double()
    w = w + 1e-6 * w.mean(-1, keepdim=True)           # a floor, so U can be unscaled
    return w.sqrt().expand(B, m)


def factorize(W, rank: int, blocks=(1, 1), method: str = "als", *, iters: int | None = None,
              tol: float = 1e-4, target_error: float | None = None, damping: float = 1e-5,
              delta: float = 0.1, init: str | None = None, seed: int = 0, device=None,
              allow_larger: bool = False, progress: bool = False, calibration=None,
              calibration_damping: float | None = None, output_weights=None,
              precision: str = "fp32") -> BlastFactors:
    """Fit BLAST factors of the given ``rank`` and ``blocks=(b_out, b_in)`` to the weight ``W``.

    Args:
        method: one of :data:`METHODS` (the registry :data:`.methods.METHODS` holds each one's defaults).
        iters: iteration cap (default 100 for "als", 30 for calibrated "als", 300 for "precgd").
        tol: "als" stops when one iteration improves the relative error by less than this fraction.
        target_error: stop as soon as the relative Frobenius error is at most this.
        damping: relative ridge of the "als" solves; delta: PrecGD's eps = delta * ||W - What||.
        init: "svd" (default for "als") or "random" (default for "precgd").
        device: where to compute (default: W's device). The factors come back there, in float32
            (float64 if W is float64).
        allow_larger: accept a rank whose parameter count exceeds the dense matrix.
        progress: show a tqdm bar over iterations.
        calibration: the covariance C = X^T X (n, n) [or (B, n, n)] of the layer's inputs. Then the
            output error ||(W - What) X^T|| is minimized instead of ||W - What|| ("als": weighted ALS
            from the whitened SVD; "lowrank": the whitened SVD itself). See :mod:`.weighted`.
        calibration_damping: C + damping * mean(diag C) * I is used (GPTQ-style); None: the library's
            default, :data:`blastfx.config.CALIBRATION_DAMPING`.
        output_weights: non-negative weights (m,) [or (B, m)] of the output rows, e.g. the diagonal
            Fisher of the layer's outputs: ||diag(w)^{1/2} (W - What) X^T|| is minimized. A row scaling
            keeps the block structure (it scales rows of U_i), so the weighted problem is solved exactly
            by factorizing diag(w)^{1/2} W and unscaling U. ``output_error`` is then the weighted one.
        precision: "fp32" (default) or "tf32": the fit's large products on CUDA tensor cores in TF32
            (:mod:`.precision`); the reported errors are computed in fp32 either way.
    """
    check_precision(precision)
    A, batched = _as_batch(W)
    B, m, n = A.shape
    shape = BlastShape.make(m, n, rank, blocks, allow_larger=allow_larger)
    if method not in METHOD_REGISTRY:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    chosen = METHOD_REGISTRY[method]
    init = init or chosen.defaults["init"]
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    C = _as_covariance(calibration, B, n) if calibration is not None else None
    if C is not None and not chosen.calibrated:
        calibrated = " and ".join(repr(k) for k, v in METHOD_REGISTRY.items() if v.calibrated)
        raise ValueError(f"calibration is supported by methods {calibrated}, not {method!r} (weight-only)")

    start = time.perf_counter()
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    A = A.to(device=device if device is not None else A.device, dtype=dtype)
    # the fitted matrix: A, or its rows scaled by sqrt(output_weights) (undone on U below)
    row_scale = None if output_weights is None else _as_row_scale(output_weights, B, m).to(A).unsqueeze(-1)
    A_fit = A if row_scale is None else A * row_scale
    scale = A_fit.std(dim=(1, 2), unbiased=False)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    A_pad = F.pad(A_fit / scale.view(-1, 1, 1), (0, shape.n_pad - n, 0, shape.m_pad - m))
    C, L = _whitening(C, shape, n, A.device, dtype, calibration_damping)
    problem = Problem(A_pad, shape, L, iters, tol, target_error, damping, delta, init,
                      torch.Generator().manual_seed(seed), progress)
    with matmul_precision(precision, A.device):
        U, S, V, history = chosen.fit(problem)
    U, S, V = _finish(U, S, V, shape, m, n, row_scale, scale)
    return _measured(A, A_fit, C, row_scale, U, S, V, shape, method, history, time.perf_counter() - start, batched)


def _whitening(C, shape: BlastShape, n: int, device, dtype, calibration_damping):
    """The padded covariance, normalized to mean diagonal 1, and its damped Cholesky factor (None, None
    without calibration)."""
    if C is None:
        return None, None
    C = F.pad(C.to(device=device, dtype=dtype), (0, shape.n_pad - n, 0, shape.n_pad - n))
    C = C / C.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30).view(-1, 1, 1)
    if calibration_damping is None:
        from ....config import CALIBRATION_DAMPING       # config imports this package: import at call time
        calibration_damping = CALIBRATION_DAMPING
    return C, damped_cholesky(C, calibration_damping)


def _finish(U, S, V, shape: BlastShape, m: int, n: int, row_scale, scale):
    """Zero padding, the output-row weighting undone, and the factors balanced."""
    B, r = U.shape[0], shape.rank
    U, S, V = U.clone(), S.clone(), V.clone()
    U.view(B, shape.m_pad, r)[:, m:] = 0
    if row_scale is not None:                       # back from the weighted problem
        U.view(B, shape.m_pad, r)[:, :m] /= row_scale
    V.view(B, shape.n_pad, r)[:, n:] = 0
    # U and V of equal size before the final balance: unscaling U leaves it at any scale, and factors
    # of very different magnitude make a per-element optimizer (AdamW) wreck the smaller one
    blk.equalize(U, V)
    blk.balance(U, V, S, scale)
    return U, S, V


def _measured(A, A_fit, C, row_scale, U, S, V, shape, method, history, seconds, batched) -> BlastFactors:
    """The factors with their weight error, and their output error when calibrated."""
    m, n = A.shape[1:]
    dense = blk.reconstruct(U, S, V)[:, :m, :n]
    rel_error = (A - dense).norm(dim=(1, 2)) / A.norm(dim=(1, 2)).clamp_min(torch.finfo(A.dtype).tiny)
    output_error = None
    if C is not None:
        E = F.pad(A - dense if row_scale is None else (A - dense) * row_scale, (0, shape.n_pad - n))
        Ap = F.pad(A_fit, (0, shape.n_pad - n))
        output_error = ((E * (E @ C)).sum(dim=(1, 2)) / (Ap * (Ap @ C)).sum(dim=(1, 2)).clamp_min(1e-30)).sqrt()
    iterations = 0 if history is None else history.shape[0]
    factors = BlastFactors(U, S, V, shape, method, rel_error, iterations, seconds, history, output_error)
    return factors if batched else factors[0]
