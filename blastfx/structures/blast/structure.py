"""BLAST as a :class:`~blastfx.structures.base.Structure`: its size knob (rank, blocks), cost model,
builder over the factorization methods, empty or random layers, and its dense matrix. Its rank is
sized continuously, by the planner's own allocation (:mod:`blastfx.plan.allocation`), so it has no
ladder of sizes."""
from __future__ import annotations

import torch

from ...statistics.layer_stats import stacked
from ..base import Structure
from .factorize import factorize
from .factorize.methods import METHODS
from .layout import full_rank, planned_shape
from .nn import BlastLinear
from .ops import blast_to_dense
from .quant import quantize_fitted


def knob(lp) -> tuple[int, tuple[int, int]]:
    """(rank, (b_out, b_in)) of a planned layer."""
    return lp.rank, lp.blocks


def num_params(out_features: int, in_features: int, size) -> int:
    """r (m_pad + n_pad + b_out b_in): what the padded factors store."""
    rank, blocks = size
    return planned_shape(out_features, in_features, rank, blocks).num_params


def fields(size) -> dict:
    """The plan fields of a (rank, blocks) knob."""
    rank, blocks = size
    return {"rank": rank, "blocks": blocks}


def exact(out_features: int, in_features: int) -> tuple[int, tuple[int, int]]:
    """One block at full rank: the plain low-rank product of rank min(out, in), any matrix."""
    return full_rank(out_features, in_features, (1, 1)), (1, 1)


def build(weights: torch.Tensor, biases, stats, lp, method: str, options) -> list[BlastLinear]:
    """Factorize the (B, out, in) ``weights`` as one batched problem with the layers' input covariances
    and output Fisher (where measured) and return one BlastLinear per weight, in its dtype. With a
    ``factor_dtype`` on the plan, U and V are then quantized with the same objective, the other
    factors refitted to absorb the rounding (:func:`.quant.quantize_fitted`)."""
    device = weights.device
    covariance, fisher = stacked(stats, "covariance", device), stacked(stats, "output_fisher", device)
    factors = factorize(weights, lp.rank, lp.blocks, method=method, iters=options.iters, tol=options.tol,
                        allow_larger=True, calibration=covariance, calibration_damping=options.calibration_damping,
                        output_weights=fisher, precision=options.fit_precision)
    if getattr(lp, "factor_dtype", None) is not None:
        quantized = quantize_fitted(weights, factors, lp.factor_dtype, calibration=covariance,
                                    calibration_damping=options.calibration_damping, output_weights=fisher)
        return [BlastLinear.from_quantized(quantized[k], bias, dtype=weights.dtype) for k, bias in enumerate(biases)]
    return [BlastLinear.from_factors(factors[k].to(weights.dtype), bias) for k, bias in enumerate(biases)]


def empty(lp, *, bias: bool, device=None, dtype=None) -> BlastLinear:
    """Allocated, not initialized: a checkpoint overwrites every tensor (initializing big models is costly)."""
    return torch.nn.utils.skip_init(BlastLinear, lp.in_features, lp.out_features, lp.rank, lp.blocks, bias=bias,
                                    device=device, dtype=dtype, allow_larger=True,
                                    factor_dtype=getattr(lp, "factor_dtype", None))


def size_of(module: BlastLinear) -> dict:
    """The plan fields of a built layer: its rank, blocks and factor format."""
    return {"rank": module.rank, "blocks": module.blocks, "factor_dtype": module.factor_dtype}


def random(lp, *, bias: bool, device=None, dtype=None) -> BlastLinear:
    """Randomly initialized factors, for training from scratch."""
    return BlastLinear(lp.in_features, lp.out_features, lp.rank, lp.blocks, bias=bias, device=device, dtype=dtype,
                       allow_larger=True)


def to_dense(module: BlastLinear, dtype) -> torch.Tensor:
    """The (out, in) matrix, multiplied out in float32 (float64 for float64 factors, dequantized codes for
    quantized ones) and only then cast to ``dtype`` (default: S's dtype), so it is rounded once."""
    work = torch.float64 if module.S.dtype == torch.float64 else torch.float32
    return blast_to_dense(*module.float_factors(work), module.out_features,
                          module.in_features).to(dtype or module.S.dtype)


BLAST = Structure(name="blast", module_type=BlastLinear, knob=knob, num_params=num_params, build=build,
                  empty=empty, random=random, methods=METHODS, default_method="als", size_of=size_of,
                  fields=fields, exact=exact, to_dense=to_dense, decode_stages=2)
