"""Checks of a plan against its inputs: the budget asked, and the model it is applied to."""
from __future__ import annotations

from torch import nn

from ..analyze import dense_weight

BUDGET_TOLERANCE = 0.01          # achieved kept fraction within +-1% (relative) of the budget


def check_budget(budget) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < 1:
        raise ValueError(f"budget must be a number in (0, 1): the fraction of compressible parameters kept; got {budget!r}")
    return float(budget)


def check_plan_fits(model: nn.Module, plan) -> None:
    """``ValueError`` naming the layer unless every planned layer is a linear layer of ``model`` with the
    planned shape, at a size its structure can represent."""
    for name, lp in plan.layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"plan layer {name!r} is not in this model") from None
        if not hasattr(module, "weight") or module.weight.dim() != 2:
            raise ValueError(f"plan layer {name!r} is a {type(module).__name__}, not a linear layer")
        m, n = dense_weight(module).shape
        if (m, n) != (lp.out_features, lp.in_features):
            raise ValueError(f"plan layer {name!r} is {lp.out_features}x{lp.in_features} but the model's is {m}x{n}")
        lp.params  # noqa: B018 -- raises ValueError if the structure cannot be represented


def needs(config) -> frozenset:
    """The calibration statistics the planner reads under ``config`` (a resolved BlastConfig): input
    covariances for measured strategies, block probes and ``structure="auto"``, output Fisher for the
    loss strategy (and for ``"auto"``'s BLAST probes under the loss objective, fitted as built)."""
    wanted = set()
    auto = "auto" in config.structures_used()
    if config.strategy != "uniform" or config.block_choices or auto:
        wanted.add("covariance")
    if config.strategy == "loss" or (auto and config.objective == "loss"):
        wanted.add("output_fisher")
    return frozenset(wanted)
