"""Quantizing the float BLAST layers of an already compressed model (e.g. after ``blastfx.finetune``,
which trains float factors only).

V is rounded, U and S are refitted to it, then U is rounded and its row scales and S refitted, in a
few rounds (:func:`.fit.quantize_fitted`), which keeps more of the trained layer than rounding both
factors.
The refits' objective is each layer's output error on calibration data where it is given (its input
covariance), else its own matrix (the identity covariance).
"""
from __future__ import annotations

import torch
from torch import nn

from ..factorize import BlastFactors
from ..nn import BlastLinear
from . import formats
from .fit import quantize_fitted


def quantize_layer(layer: BlastLinear, factor_dtype: str = "int8", refit_iters: int = 2, *, calibration=None,
                   calibration_damping: float | None = None, output_weights=None) -> BlastLinear:
    """A new layer computing (nearly) what the float BLAST ``layer`` computes, with ``factor_dtype`` codes.
    ``calibration`` (the layer's (in, in) input covariance), ``calibration_damping`` and
    ``output_weights`` ((out,) output Fisher): the objective of the rounding's refits, as
    :func:`.fit.quantize_fitted` takes them; without them, the layer's own matrix."""
    if not isinstance(layer, BlastLinear):
        raise TypeError(f"quantize_layer takes a BlastLinear, got {type(layer).__name__}")
    if layer.quantized:
        raise ValueError(f"this layer already stores {layer.factor_dtype} factors")
    formats.get(factor_dtype)
    with torch.no_grad():
        work = torch.float64 if layer.S.dtype == torch.float64 else torch.float32
        U, S, V = layer.float_factors(work)
        factors = BlastFactors(U, S, V, layer.shape)
        q = quantize_fitted(factors.to_dense(), factors, factor_dtype, refit_iters=refit_iters,
                            calibration=calibration, calibration_damping=calibration_damping,
                            output_weights=output_weights)
        new = BlastLinear.from_quantized(q, layer.bias, dtype=layer.S.dtype)
    new.train(layer.training)
    return new


def quantize_model(model: nn.Module, factor_dtype: str = "int8", refit_iters: int = 2, *, calibration=None,
                   tokenizer=None, calibration_damping: float | None = None) -> nn.Module:
    """Replace every float :class:`BlastLinear` of ``model`` by a quantized one (layers already quantized
    stay as they are); the recorded plan follows. All or nothing. Returns ``model``.

    ``calibration`` (what :func:`blastfx.compress` takes: batches, token ids, or texts with
    ``tokenizer``): the rounding's refits then weigh each layer's output error by its input
    covariance on these batches, as a calibrated compression does, instead of the matrix's own
    error; the covariances come from one pass of the float model."""
    from ....io import model_plan
    from ....statistics import calibration_batches, collect_covariances
    from ....swap import PLAN_ATTR, attach_plan, swap_modules

    formats.get(factor_dtype)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BlastLinear) and not m.quantized}
    if isinstance(model, BlastLinear):
        raise ValueError("for one layer use quantize_layer")
    if not layers:
        held = sorted({m.factor_dtype for m in model.modules() if isinstance(m, BlastLinear)})
        why = (f"its BLAST layers are already quantized ({', '.join(held)}); round from the float model for another "
               "format") if held else "compress it first"
        raise ValueError(f"quantize_model takes a model holding float BLAST layers: {why}")
    batches = calibration_batches(model, calibration, tokenizer)
    covariances = collect_covariances(model, list(layers), batches) if batches is not None else {}
    new = {name: quantize_layer(m, factor_dtype, refit_iters, calibration=covariances.get(name),
                                calibration_damping=calibration_damping)
           for name, m in layers.items()}
    had_plan = getattr(model, PLAN_ATTR, None) is not None
    old = swap_modules(model, new)
    try:
        if had_plan:
            attach_plan(model, model_plan(model))
    except BaseException:
        swap_modules(model, old)
        raise
    return model
