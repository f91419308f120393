"""The damped input covariance every calibrated fit and measured error reads.

``C + damping * mean(diag C) * I`` (GPTQ's relative ridge, :data:`blastfx.config.CALIBRATION_DAMPING`):
a rank-deficient calibration set still gives a unique, weight-anchored fit, and the errors the planner
compares across structures are all measured under this one matrix.
"""
from __future__ import annotations

import torch


def damped(covariance: torch.Tensor, damping: float) -> torch.Tensor:
    """``C + damping * mean(diag C) * I`` in float64, ``C`` symmetrized first."""
    c = covariance.double()
    c = (c + c.T) / 2
    return c + damping * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
