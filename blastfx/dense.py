"""Back to dense: every compressed layer, of any registered structure, replaced by the dense layer it
computes (its structure's :meth:`~blastfx.structures.Structure.matrix`).

For when a tool needs ``.weight`` (QKV fusion, weight quantization, export formats), or to measure
what the structure alone costs. The result is an ordinary model without any blastfx record
(plan, quantization config), so it saves and loads like the original architecture.
"""
from __future__ import annotations

import torch
from torch import nn

from . import structures
from .plan import Plan
from .swap import PLAN_ATTR, swap_modules


def _dense_layer(layer: nn.Module, kind: str, dtype) -> nn.Module:
    with torch.no_grad():
        W = structures.of_module(layer).matrix(layer, dtype)
        bias = layer.bias
        kw = {"device": W.device, "dtype": W.dtype}
        if kind == "conv1d":                      # HF GPT-2 style Conv1D: weight stored (in, out)
            from transformers.pytorch_utils import Conv1D

            dense = Conv1D(layer.out_features, layer.in_features).to(**kw)
            dense.weight.copy_(W.T)
            if bias is not None:
                dense.bias.copy_(bias)
            else:
                dense.bias = None
        else:
            dense = torch.nn.utils.skip_init(nn.Linear, layer.in_features, layer.out_features,
                                             bias=bias is not None, **kw)
            dense.weight.copy_(W)
            if bias is not None:
                dense.bias.copy_(bias)
    dense.train(layer.training)
    return dense


def to_dense(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every compressed layer of ``model`` by the dense layer computing the same matrix
    (``nn.Linear``, or transformers' ``Conv1D`` where the recorded plan says the layer was one), in
    ``dtype`` (default: the factors'), and drop blastfx's records on the model. All or nothing.
    Returns ``model``. For transformers models ``model.dequantize()`` does the same."""
    if isinstance(model, structures.module_types()):
        raise TypeError("to_dense takes a model holding compressed layers; for one layer use layer.to_dense(), "
                        "the (out_features, in_features) matrix")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    from .integrations import forget_plan

    plan = getattr(model, PLAN_ATTR, None)
    kinds = {name: lp.kind for name, lp in plan.layers.items()} if isinstance(plan, Plan) else {}
    new = {name: _dense_layer(m, kinds.get(name, "linear"), dtype)
           for name, m in model.named_modules() if isinstance(m, structures.module_types())}
    old = swap_modules(model, new)
    try:
        forget_plan(model)
    except BaseException:
        swap_modules(model, old)
        raise
    return model
