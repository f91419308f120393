"""Projecting a trained dense weight onto an SS1 structure.

The dense matrix an SS1 weight represents is linear in the shared slots, ``W(theta) = A theta``, and
``A`` only *selects*: every dense entry reads exactly one slot of its own row. Two consequences:

* **Weight-only** (:func:`project_weight`): minimising ``||W - W(theta)||_F`` decouples over the slots
  (``A^T A`` is diagonal, the tie counts), so each slot is the mean of the dense entries tied to it.
* **Calibration-aware** (:func:`project_calibrated`): minimising ``||(W - W(theta)) C^{1/2}||_F`` for
  an input covariance ``C`` (what a layer's output error on inputs with second moment ``C`` is)
  decouples over output rows, and all rows of one output tile share their tie pattern ``A_j``. So each
  output tile is one symmetric positive definite solve, ``(A_j^T C A_j) theta = A_j^T C w`` with the
  tile's rows as right-hand sides; ``A_j^T C A_j`` is ``C`` with its rows and columns summed by slot.
  ``C`` is damped by ``damping * mean(diag C)`` on its diagonal so a rank-deficient calibration set
  still gives a unique, weight-anchored answer.

Row weights (an output Fisher ``f``, minimising ``sum_n f_n ||(w_n - w_n(theta)) C^{1/2}||^2``) do not
change the optimum: slots are never shared between rows, so each row's term is minimised on its own
whatever its weight. :func:`project_calibrated` accepts them (a pipeline passes them to every
structure) and checks them, and the result is the unweighted one.

Slots that no real input feature reads are set to zero. Solves run in float64.
"""
from __future__ import annotations

import math

import torch

from ...statistics.damping import damped
from .layout import SS1Layout
from .ops import ss1_fold

_BATCH_BYTES = 1 << 28          # one-hot selection matrices per batched solve (256 MB)

__all__ = ["project_weight", "project_calibrated", "calibrated_row_errors", "check_weight", "check_covariance",
           "check_output_weights"]


def check_weight(weight: torch.Tensor, layout: SS1Layout) -> None:
    if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
        raise ValueError(f"weight must be a floating-point tensor, got {getattr(weight, 'dtype', type(weight))}")
    if tuple(weight.shape) != (layout.out_features, layout.in_features):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected "
                         f"({layout.out_features}, {layout.in_features})")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight has non-finite entries (nan or inf)")


def check_covariance(covariance: torch.Tensor, in_features: int) -> None:
    if not isinstance(covariance, torch.Tensor) or not covariance.dtype.is_floating_point:
        raise ValueError(f"covariance must be a floating-point tensor, got {type(covariance).__name__}")
    if tuple(covariance.shape) != (in_features, in_features):
        raise ValueError(f"covariance has shape {tuple(covariance.shape)}, expected ({in_features}, {in_features})")
    c = covariance.double()
    if not bool(torch.isfinite(c).all()):
        raise ValueError("covariance has non-finite entries (nan or inf)")
    scale = c.abs().max().clamp(min=1e-300)
    if float((c - c.T).abs().max() / scale) > 1e-6:
        raise ValueError("covariance must be symmetric (an input second-moment matrix X^T X / n)")
    if bool((c.diagonal() < 0).any()):
        raise ValueError("covariance has negative diagonal entries; it is not a covariance")


def check_output_weights(output_weights: torch.Tensor, out_features: int) -> None:
    if not isinstance(output_weights, torch.Tensor) or tuple(output_weights.shape) != (out_features,):
        raise ValueError(f"output_weights must be a tensor of shape ({out_features},), got "
                         f"{tuple(getattr(output_weights, 'shape', ())) or type(output_weights).__name__}")
    if not bool(torch.isfinite(output_weights).all()) or bool((output_weights < 0).any()):
        raise ValueError("output_weights must be finite and non-negative")


def check_damping(damping) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) \
            or damping < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    return float(damping)


def _tie_counts(layout: SS1Layout, device) -> torch.Tensor:
    """(n_tiles, shared_in_features): how many dense columns read each slot in each output tile."""
    slots = layout.slot_index(device)
    counts = torch.zeros(layout.n_tiles, layout.shared_in_features, dtype=torch.float64, device=device)
    return counts.scatter_add_(1, slots, torch.ones_like(slots, dtype=torch.float64))


def project_weight(weight: torch.Tensor, layout: SS1Layout) -> torch.Tensor:
    """The shared weight closest to ``weight`` in Frobenius norm: each slot the mean of its tied
    entries (zero where none). Returns (out_features, shared_in_features) in ``weight``'s dtype."""
    check_weight(weight, layout)
    sums = ss1_fold(weight.double(), layout, layout.shifts(weight.device))
    counts = _tie_counts(layout, weight.device).repeat_interleave(layout.block_n, dim=0)[: layout.out_features]
    return (sums / counts.clamp(min=1)).to(weight.dtype)


def project_calibrated(weight: torch.Tensor, layout: SS1Layout, covariance: torch.Tensor, damping: float = 0.01,
                       output_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The shared weight minimising ``||(W - W_ss1) (C + lambda I)^{1/2}||_F`` with
    ``lambda = damping * mean(diag C)``; one float64 Cholesky solve per output tile. ``output_weights``
    is checked and cannot change the result (see the module docstring). Raises ``ValueError`` when the
    damped slot system is singular (all-zero covariance with ``damping=0``)."""
    check_weight(weight, layout)
    check_covariance(covariance, layout.in_features)
    damping = check_damping(damping)
    if output_weights is not None:
        check_output_weights(output_weights, layout.out_features)
    return _calibrated(weight.double(), layout, damped(covariance.to(weight.device), damping), damping)[0] \
        .to(weight.dtype)


def calibrated_row_errors(weight: torch.Tensor, layout: SS1Layout, covariance: torch.Tensor,
                          damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(errors, energies)``, float64 (out,) each: every row's damped output error
    ``(w - w_ss1) C_d (w - w_ss1)^T`` after the calibrated projection, and ``w C_d w^T``.

    At a least-squares optimum the error is the energy less ``b . theta`` (``b = A^T C_d w`` the
    solve's right-hand side, ``theta`` its solution), so no dense difference is ever formed: what
    makes measuring every reduction of every layer cheap enough for the planner."""
    check_weight(weight, layout)
    check_covariance(covariance, layout.in_features)
    damping = check_damping(damping)
    _, errors, energies = _calibrated(weight.double(), layout, damped(covariance.to(weight.device), damping), damping)
    return errors, energies


def _calibrated(w: torch.Tensor, layout: SS1Layout, c: torch.Tensor, damping: float):
    """The per-output-tile solves of :func:`project_calibrated` on float64 ``w`` and damped ``c``:
    (shared weight, row errors, row energies).

    ``A_j^T C A_j`` sums ``C`` by slot. Within a tile of ``block_k`` inputs the slots are a rotation,
    so ordering each tile's inputs by slot (one gather of ``C``, zero-padded to whole groups) turns the
    sum into a reshape: the ``reduction`` tiles of one group land on the same slots. Tiles are solved
    in batches (one batched Cholesky per batch, at most :data:`_BATCH_BYTES` of gathered ``C``)."""
    device = w.device
    dead = _tie_counts(layout, device) == 0                                      # (n_tiles, ks)
    ks, bn, n_tiles, out_f = layout.shared_in_features, layout.block_n, layout.n_tiles, layout.out_features
    bk, r, groups = layout.block_k, layout.reduction, layout.shared_tiles
    full = groups * r * bk                                                       # inputs padded to whole groups
    cp = torch.nn.functional.pad(c, (0, full - c.shape[0], 0, full - c.shape[0]))
    # order[j, q]: the (padded) input landing on position q of output tile j's slot-ordered inputs
    col = torch.arange(full, device=device)
    tile, offset = col // bk, col % bk
    shifts = torch.nn.functional.pad(layout.shifts(device), (0, 0, 0, groups * r - layout.k_tiles))
    dest = tile * bk + (offset[None, :] - shifts.t()[:, tile]) % bk                # (n_tiles, full)
    order = torch.empty_like(dest).scatter_(1, dest, col.expand_as(dest))
    wt = torch.nn.functional.pad(w, (0, full - w.shape[1], 0, n_tiles * bn - out_f)).reshape(n_tiles, bn, full)
    theta = torch.empty(n_tiles, ks, bn, dtype=torch.float64, device=device)
    gain = torch.empty(n_tiles, bn, dtype=torch.float64, device=device)
    step = max(1, _BATCH_BYTES // (8 * full * full))
    for j0 in range(0, n_tiles, step):
        j1 = min(n_tiles, j0 + step)
        o = order[j0:j1]                                                         # (b, full)
        b = j1 - j0
        m = cp[o[:, :, None], o[:, None, :]].reshape(b, groups, r, bk, groups, r, bk).sum((2, 5))
        m = m.reshape(b, ks, ks) + torch.diag_embed(dead[j0:j1].to(torch.float64))   # unread slots: theta = 0
        crows = torch.matmul(cp, wt[j0:j1].transpose(1, 2))                      # (b, full, bn)
        rhs = crows.gather(1, o[:, :, None].expand(b, full, bn)).reshape(b, groups, r, bk, bn).sum(2)
        rhs = rhs.reshape(b, ks, bn)
        chol, info = torch.linalg.cholesky_ex(m)
        if bool((info != 0).any()):
            j = j0 + int((info != 0).nonzero()[0])
            raise ValueError(f"the calibrated SS1 projection is singular for output tile {j} "
                             f"(damping={damping}); the covariance carries too little signal: pass a "
                             f"positive damping or more calibration data")
        theta[j0:j1] = torch.cholesky_solve(rhs, chol)
        gain[j0:j1] = (rhs * theta[j0:j1]).sum(1)
    energies = ((w @ c) * w).sum(1)
    out = theta.transpose(1, 2).reshape(n_tiles * bn, ks)[:out_f]
    errors = (energies - gain.reshape(-1)[:out_f]).clamp_min(0)
    return out, errors, energies
