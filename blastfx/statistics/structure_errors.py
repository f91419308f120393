"""Measured errors of each structure for the planner (measured strategies and ``structure="auto"``).

Reads the layers' weights and calibration statistics and hands the planner numbers, as
:mod:`.sensitivity` does with spectra: per layer, the output error of a ladder family at every size it
measures (its structure's ``size_errors``), and for ``"auto"`` the output error of a BLAST
factorization at the rank the BLAST plan gives it (fitted as the builder fits it), all in the units of
:func:`.sensitivity.layer_spectra` (``sum_n f_n ((W - W_hat) C (W - W_hat)^T)_nn`` with ``C`` the
damped input covariance, the identity without calibration, and ``f`` the output Fisher where
measured), so the structures compare.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import structures
from ..analyze import dense_weight
from ..build import MAX_BATCH_ELEMENTS, method_for
from ..config import CALIBRATION_DAMPING
from ..plan import DEFAULT_STRUCTURE
from ..structures.blast.factorize import factorize
from .collect import singular_covariance_error
from .damping import damped
from .layer_stats import LayerStats, field_of


def ladder_errors(model: nn.Module, names, structure, stats: dict[str, LayerStats] | None = None,
                  damping: float = CALIBRATION_DAMPING, budget: float | None = None
                  ) -> dict[str, tuple[dict, float]]:
    """{layer: ({size: output error}, output energy)} of ladder family ``structure`` (a registered
    :class:`~blastfx.structures.Structure`) for the named layers: its ``size_errors`` on each layer's
    weight and statistics (``budget``: the kept fraction aimed at, for the sizes it skips)."""
    return {k: structure.size_errors(dense_weight(model.get_submodule(k)), (stats or {}).get(k) or LayerStats(),
                                     damping, budget)
            for k in names}


@torch.no_grad()
def blast_errors(model: nn.Module, plan, config, stats: dict[str, LayerStats] | None = None
                 ) -> dict[str, tuple[dict[int, float], float]]:
    """{layer: ({rank: output error}, output energy)} for the BLAST layers of ``plan``, each fitted at
    its planned rank and blocks exactly as the builder fits it (its method, iterations and tolerance,
    with the output Fisher under the loss objective), so the error is the built layer's. Why not a
    short probe: five ALS iterations left the error of a small Llama's layers about a third above the
    built ones, which would hand a ladder family layers that BLAST fits better. Layers of one shape and
    size are factorized as one batch."""
    covariances, fisher = field_of(stats, "covariance"), field_of(stats, "output_fisher")
    groups: dict[tuple, list[str]] = {}
    for name, lp in plan.layers.items():
        if lp.structure == DEFAULT_STRUCTURE:
            method = method_for(structures.get(DEFAULT_STRUCTURE), lp.method, config.method)
            groups.setdefault((lp.out_features, lp.in_features, lp.rank, lp.blocks, method.name), []).append(name)
    out = {}
    for (m, n, rank, blocks, method), names in groups.items():
        calibrated = structures.get(DEFAULT_STRUCTURE).methods[method].calibrated
        chunk = max(1, MAX_BATCH_ELEMENTS // (m * n))
        for start in range(0, len(names), chunk):
            part = names[start:start + chunk]
            W = torch.stack([dense_weight(model.get_submodule(k)) for k in part])
            C = None if covariances is None else torch.stack([covariances[k].to(W.device) for k in part])
            F = None if fisher is None else torch.stack([fisher[k].to(W.device) for k in part])
            try:
                f = factorize(W, rank, blocks, method=method, allow_larger=True, iters=config.iters, tol=config.tol,
                              calibration=C if calibrated else None, calibration_damping=config.calibration_damping,
                              output_weights=F if config.objective == "loss" else None)
            except torch.linalg.LinAlgError as err:
                if C is None:
                    raise
                raise singular_covariance_error(part, covariances, config.calibration_damping, err) from err
            Wd = W.double()
            D = Wd - f.to_dense().double()
            for i, k in enumerate(part):
                Cd = None if C is None else damped(C[i], config.calibration_damping)
                w = None if F is None else F[i].double().clamp_min(0)
                out[k] = ({rank: _output_energy(D[i], Cd, w)}, _output_energy(Wd[i], Cd, w))
    return out


def _output_energy(x: torch.Tensor, c: torch.Tensor | None, f: torch.Tensor | None) -> float:
    """``sum_n f_n (x C x^T)_nn`` for a float64 (out, in) ``x``: the module docstring's units (``C`` the
    identity and ``f`` ones where None)."""
    rows = (x * x).sum(1) if c is None else ((x @ c) * x).sum(1)
    return float(rows.sum() if f is None else (rows * f).sum())
