"""Measured sensitivity for the planner: how much output error each layer would get, under each choice.

The planner itself reads no weights (:mod:`blastfx.plan.allocation`); these functions read them and hand it
numbers: singular values for strategy="error", and short probe factorizations for
``BlastConfig.block_choices``. Why probes: the best block count depends on the layer and the budget
(on SmolLM2, b = 8 beats b = 4 at 80% of the parameters and loses at 50%), and no spectrum predicts
it, so each candidate is factorized at the layer's parameter count and its error measured.
"""
from __future__ import annotations

import torch
from torch import nn

from ..analyze import dense_weight
from ..build import MAX_BATCH_ELEMENTS
from ..config import CALIBRATION_DAMPING
from ..linalg import singular_values
from ..plan import Plan, block_candidates, rank_at
from ..structures.blast.factorize import factorize
from ..structures.blast.factorize.weighted import damped_cholesky
from .collect import singular_covariance_error
from .layer_stats import LayerStats, field_of


def layer_spectra(model: nn.Module, names, stats: dict[str, LayerStats] | None = None,
                  damping: float = CALIBRATION_DAMPING) -> dict[str, torch.Tensor]:
    """Singular values of each named layer's weight, for the error-aware planner. With input
    covariances C = L L^T (``stats``), those of W L: their tail energy at rank r is exactly the *output*
    error of the best rank-r layer, a measured sensitivity rather than a weight-space proxy. With the
    outputs' diagonal Fisher w as well, those of diag(w)^{1/2} W L: the tail energy is then an
    estimate of the loss increase, in the same units for every layer."""
    covariances, output_weights = field_of(stats, "covariance"), field_of(stats, "output_fisher")
    spectra = {}
    for k in names:
        W = dense_weight(model.get_submodule(k)).float()
        if output_weights is not None:
            W = W * output_weights[k].to(W).clamp_min(0).sqrt().unsqueeze(-1)
        if covariances is not None:
            try:
                W = W @ damped_cholesky(covariances[k].to(W).unsqueeze(0), damping)[0]
            except torch.linalg.LinAlgError as err:
                raise singular_covariance_error([k], covariances, damping, err) from err
        spectra[k] = singular_values(W).cpu()
    return spectra


def block_errors(model: nn.Module, plan: Plan, config,
                 stats: dict[str, LayerStats] | None = None) -> dict[str, dict[tuple[int, int], float]]:
    """{layer: {(b_out, b_in): relative error}} for every planned layer and every distinct block count of
    ``config.block_choices`` it admits, each factorized (``config.probe_iters`` iterations) at the rank
    that keeps the layer's planned parameter count. The error is the output error on the calibration
    covariances when ``stats`` holds them, else the weight error. Layers with a blocks override are not
    probed."""
    covariances = field_of(stats, "covariance")
    errors: dict[str, dict[tuple[int, int], float]] = {}
    groups: dict[tuple, list[str]] = {}
    for name, lp in plan.layers.items():
        if config.override_for(name).blocks is None:
            groups.setdefault((lp.out_features, lp.in_features, lp.rank, lp.blocks), []).append(name)
    for (m, n, _, _), names in groups.items():
        lp = plan.layers[names[0]]
        chunk = max(1, MAX_BATCH_ELEMENTS // (m * n))
        for start in range(0, len(names), chunk):
            part = names[start:start + chunk]
            W = torch.stack([dense_weight(model.get_submodule(k)) for k in part])
            C = None if covariances is None else torch.stack([covariances[k].to(W.device) for k in part])
            for blocks in block_candidates(m, n, config.block_choices):
                try:
                    f = factorize(W, rank_at(lp, blocks, config.rank_multiple), blocks, method="als",
                                  iters=config.probe_iters, allow_larger=True, calibration=C,
                                  calibration_damping=config.calibration_damping)
                except torch.linalg.LinAlgError as err:
                    if C is None:
                        raise
                    raise singular_covariance_error(part, covariances, config.calibration_damping, err) from err
                err = f.output_error if C is not None else f.rel_error
                for k, name in enumerate(part):
                    errors.setdefault(name, {})[blocks] = err[k].item()
    return errors
