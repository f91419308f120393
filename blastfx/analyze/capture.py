"""Capture a model as an FX graph on example inputs, building those inputs when we can.

``torch.export`` (non-strict) is used because plain ``torch.fx.symbolic_trace`` fails on HF and
diffusers models. Example inputs for known model families come from :data:`INPUT_BUILDERS`, a
registry keyed by class name so new families are one function away.
"""
from __future__ import annotations

import threading

import torch
from torch import nn

INPUT_BUILDERS = {}

# torch.export keeps state in process-wide Python objects (the pre-dispatch mode stack of
# torch._ops), so two exports running at once in different threads corrupt each other ("Trying to
# pop empty mode stack", fake tensors leaking into the other graph). Exports are therefore one at a
# time; plain forward passes in other threads are not affected and need no lock.
_EXPORT_LOCK = threading.Lock()


def input_builder(*class_names):
    def register(fn):
        for name in class_names:
            INPUT_BUILDERS[name] = fn
        return fn
    return register


def _param(model):
    p = next(model.parameters())
    return p.device, (p.dtype if p.dtype.is_floating_point else torch.float32)


def _latent_inputs(model, **extra_dims):
    """A diffusers transformer's latent and timestep, plus (1, *dims) random tensors by name."""
    device, dtype = _param(model)
    c = model.config
    inputs = {"hidden_states": torch.randn(1, c.in_channels, c.sample_size, c.sample_size, device=device, dtype=dtype),
              "timestep": torch.tensor([1], device=device)}
    inputs.update({k: torch.randn(1, *dims, device=device, dtype=dtype) for k, dims in extra_dims.items()})
    return inputs


@input_builder("DiTTransformer2DModel")
def _dit(model):
    return {**_latent_inputs(model), "class_labels": torch.tensor([0], device=_param(model)[0])}


@input_builder("PixArtTransformer2DModel")
def _pixart(model):
    return {**_latent_inputs(model, encoder_hidden_states=(4, model.config.caption_channels)),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


@input_builder("SD3Transformer2DModel")
def _sd3(model):
    c = model.config
    return _latent_inputs(model, encoder_hidden_states=(4, c.joint_attention_dim),
                          pooled_projections=(c.pooled_projection_dim,))


@input_builder("ViTForImageClassification", "ViTModel")
def _vit(model):
    device, dtype = _param(model)
    c = model.config
    return {"pixel_values": torch.randn(1, c.num_channels, c.image_size, c.image_size, device=device, dtype=dtype)}


def example_inputs_for(model: nn.Module):
    """(args, kwargs) that run ``model``, or None when we do not know how to build them."""
    builder = INPUT_BUILDERS.get(type(model).__name__)
    if builder is not None:
        return (), builder(model)
    dummy = getattr(model, "dummy_inputs", None)          # HF PreTrainedModel
    if isinstance(dummy, dict) and dummy:
        device, _ = _param(model)
        kwargs = {k: v.to(device) for k, v in dummy.items()}
        if "input_ids" in kwargs:
            kwargs["input_ids"] = kwargs["input_ids"][:1, :8]
            kwargs.pop("attention_mask", None)
            kwargs.pop("token_type_ids", None)
        if getattr(getattr(model, "config", None), "use_cache", None) is not None:
            kwargs["use_cache"] = False
        return (), kwargs
    return None


def normalize_example_inputs(example_inputs):
    """Accept a tensor, a tuple of args, a dict of kwargs, or (args, kwargs)."""
    if example_inputs is None:
        return None
    if torch.is_tensor(example_inputs):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), example_inputs
    if (isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[0], tuple)
            and isinstance(example_inputs[1], dict)):
        return example_inputs
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ValueError(f"example_inputs must be a tensor, tuple, dict or (args, kwargs), got {type(example_inputs).__name__}")


def export_graph(model: nn.Module, args, kwargs):
    """torch.export (non-strict) of the model in eval mode, restoring its training flag. Thread-safe:
    concurrent calls wait for each other (see ``_EXPORT_LOCK``)."""
    with _EXPORT_LOCK:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return torch.export.export(model, args, kwargs, strict=False)
        finally:
            model.train(was_training)
