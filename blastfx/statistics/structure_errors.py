"""Measured errors of the non-BLAST structures for the planner (``structure="ss1"`` / ``"auto"``).

Reads the layers' weights and calibration statistics and hands the planner numbers, as
:mod:`.sensitivity` does for BLAST: per layer, the output error of the SS1 projection at every
reduction it admits, in the units of :func:`.sensitivity.layer_spectra` (so BLAST and SS1 compare).
"""
from __future__ import annotations

from torch import nn

from ..analyze import dense_weight
from ..config import CALIBRATION_DAMPING
from ..structures.ss1 import projection_errors
from ..structures.ss1.structure import reductions
from .layer_stats import LayerStats


def ss1_errors(model: nn.Module, names, stats: dict[str, LayerStats] | None = None,
               damping: float = CALIBRATION_DAMPING, budget: float | None = None
               ) -> dict[str, tuple[dict[int, float], float]]:
    """{layer: ({reduction: output error}, output energy)} for the named layers: with each layer's
    input covariance where measured (else the weight error), weighted by its output Fisher where
    measured (the loss strategy's units). With ``budget``, only reductions keeping at least
    ``budget / 8`` of a layer are measured (each costs a solve per output tile; an allocation never
    cuts one layer that far below the others), and always the smallest."""
    out = {}
    for k in names:
        w = dense_weight(model.get_submodule(k))
        s = (stats or {}).get(k) or LayerStats()
        sizes = reductions(*w.shape)
        if budget is not None:
            sizes = [r for r in sizes if 1 / r >= budget / 8] or sizes[:1]
        out[k] = projection_errors(w, sizes, s.covariance, damping, s.output_fisher)
    return out
