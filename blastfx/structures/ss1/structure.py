"""SS1 as a :class:`~blastfx.structures.base.Structure`: its size knob (the reduction factor), cost
model, the ladder of reductions the planner chooses from and their measured errors, builder over its
one fitting method, empty or random layers, and what a save and a load need.

The method, ``"project"``, is the exact projection of :mod:`.project`: with an input covariance the
output-error optimum, without it the per-slot mean (weight error). It declares the covariance only:
an output Fisher weights whole rows, and SS1 never shares a slot between rows, so row weights leave
each row's optimum where it is. The loss-aware recipe still matters for SS1 where budgets are
*compared* across layers (``strategy="loss"`` weighs each layer's error by its Fisher), not in the fit.

Every layer the pipeline builds uses seed 0 and the default tiles (``block_k=32``, ``block_n=64``):
the plan records only the reduction, and a checkpoint's ``ss1_layout`` buffer the whole geometry.
"""
from __future__ import annotations

import torch

from ..base import Method, Structure
from .layout import SS1Layout, ss1_params
from .nn import SS1Linear, _layout_vector, build_ss1
from .sensitivity import projection_errors


def knob(lp) -> int:
    """The reduction factor of a planned layer."""
    return lp.reduction


def num_params(out_features: int, in_features: int, reduction) -> int:
    """``out * ceil(ceil(in / 32) / reduction) * 32``: what the shared weight stores."""
    if reduction is None:
        raise ValueError("an SS1 layer needs a reduction (a power of two), got None")
    return ss1_params(out_features, in_features, reduction)


def fields(reduction: int) -> dict:
    """The plan field of a reduction."""
    return {"reduction": reduction}


def exact(out_features: int, in_features: int) -> int:
    """Reduction 1: every input tile its own weight tile, any matrix (as many parameters as dense)."""
    return 1


def reductions(out_features: int, in_features: int) -> list[int]:
    """Every reduction an ``out x in`` layer admits above 1 (powers of two up to its input tiles),
    smallest first: the sizes the planner chooses from (step i is reduction 2^(i+1) on every layer)."""
    k_tiles = SS1Layout(out_features, in_features, 1).k_tiles
    out, r = [], 2
    while r <= k_tiles:
        out.append(r)
        r *= 2
    return out


def size_errors(weight: torch.Tensor, stats, damping: float, budget: float | None) -> tuple[dict[int, float], float]:
    """``({reduction: output error}, output energy)`` of the (out, in) ``weight``: with its input
    covariance where measured (else the weight error), weighted by its output Fisher where measured
    (the loss strategy's units). With ``budget``, only reductions keeping at least ``budget / 8`` of
    the layer are measured (each costs a solve per output tile; an allocation never cuts one layer
    that far below the others), and always the smallest."""
    sizes = reductions(*weight.shape)
    if budget is not None:
        sizes = [r for r in sizes if 1 / r >= budget / 8] or sizes[:1]
    return projection_errors(weight, sizes, stats.covariance, damping, stats.output_fisher)


def project(weights: torch.Tensor, biases, covariances, reduction: int, damping: float) -> list[SS1Linear]:
    """One :class:`SS1Linear` per (out, in) weight of ``weights``: the calibrated projection under its
    covariance where ``covariances`` (a list, entries may be None) has one, else the weight-only one."""
    return [build_ss1(w, b, reduction, covariance=c, damping=damping)
            for w, b, c in zip(weights, biases, covariances)]


METHODS = {"project": Method("project", fit=project, uses={"covariance"})}


def build(weights: torch.Tensor, biases, stats, lp, method: str, options) -> list[SS1Linear]:
    """Project each of the (B, out, in) ``weights`` onto SS1 at the planned reduction (in float64
    solves), each layer in its weight's dtype."""
    covariances = [s.covariance for s in stats]
    return METHODS[method].fit(weights, biases, covariances, lp.reduction, options.calibration_damping)


def _fresh(layer: SS1Linear, device) -> SS1Linear:
    """The layout buffers set from the layout (they are garbage after ``skip_init``)."""
    layer.ss1_layout = _layout_vector(layer.layout).to(device if device is not None else layer.weight.device)
    layer.shifts = layer.layout.shifts(layer.weight.device)
    return layer


def empty(lp, *, bias: bool, device=None, dtype=None) -> SS1Linear:
    """Allocated, not initialized (a checkpoint overwrites the weight and adopts its seed)."""
    layer = torch.nn.utils.skip_init(SS1Linear, lp.in_features, lp.out_features, lp.reduction, bias=bias,
                                     device=device, dtype=dtype)
    return _fresh(layer, device)


def random(lp, *, bias: bool, device=None, dtype=None) -> SS1Linear:
    """Initialized like ``nn.Linear`` (each dense entry uniform in +-1/sqrt(in)), for training from scratch."""
    return SS1Linear(lp.in_features, lp.out_features, lp.reduction, bias=bias, device=device, dtype=dtype)


def size_of(module: SS1Linear) -> dict:
    """The plan fields of a built layer: its reduction (the BLAST fields null)."""
    return {"rank": None, "blocks": None, "reduction": module.reduction}


def loaded(module: SS1Linear) -> None:
    """After a loader set the tensors: the seed from ``ss1_layout``, the shift table rebuilt (not for
    a layer a device map left on the meta device)."""
    if module.weight.device.type != "meta":
        module.sync_layout()


SS1 = Structure(name="ss1", module_type=SS1Linear, knob=knob, num_params=num_params, build=build, empty=empty,
                random=random, methods=METHODS, default_method="project", size_of=size_of, loaded=loaded,
                plan_fields=("reduction",), fields=fields, exact=exact, sizes=reductions, size_errors=size_errors)
