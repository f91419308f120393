"""What each reduction factor costs a layer: the output error of its SS1 projection, measured.

The planner compares sizes (and, with ``structure="auto"``, structures) by error per parameter. For
SS1 the error is exact and cheap: the projection is a closed-form solve (:mod:`.project`), so each
reduction is projected and its error ``sum_n f_n ((W - W_ss1) C (W - W_ss1)^T)_nn`` evaluated, with
``C`` the damped input covariance (the identity without calibration: the weight error) and ``f`` the
output Fisher where the loss strategy weighs outputs (ones otherwise). These are the units of the
BLAST spectra the planner reads (:func:`blastfx.statistics.sensitivity.layer_spectra`: the tail energy
of ``diag(f)^{1/2} W L`` with ``L L^T`` the same damped covariance), so the two structures' errors
compare directly; ``energy`` is the same quantity for the zero matrix, what relative errors divide by.
"""
from __future__ import annotations

import torch

from ...statistics.damping import damped
from .layout import SS1Layout
from .ops import ss1_to_dense
from .project import calibrated_row_errors, project_weight

__all__ = ["projection_errors"]


@torch.no_grad()
def projection_errors(weight: torch.Tensor, reductions, covariance: torch.Tensor | None = None,
                      damping: float = 0.01, output_weights: torch.Tensor | None = None
                      ) -> tuple[dict[int, float], float]:
    """``({reduction: error}, energy)`` for the (out, in) ``weight`` (see the module docstring), each
    reduction projected the way the builder will project it (seed 0, default tiles)."""
    w = weight.detach().double()
    out_features, in_features = w.shape
    f = None if output_weights is None else output_weights.to(w.device).double().clamp_min(0)
    total = lambda rows: float(rows.sum() if f is None else (f * rows).sum())      # noqa: E731
    errors, energy = {}, None
    for r in reductions:
        layout = SS1Layout(out_features, in_features, r)
        if covariance is None:
            rows, energy = ((w - ss1_to_dense(project_weight(w, layout), layout)) ** 2).sum(1), (w * w).sum(1)
        else:
            rows, energy = calibrated_row_errors(w, layout, covariance.to(w.device), damping)
        errors[r] = total(rows)
    if energy is None:
        energy = (w * w).sum(1) if covariance is None else (w @ damped(covariance.to(w.device), damping) * w).sum(1)
    return errors, total(energy)
