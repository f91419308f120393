"""Swapping: put built modules into the model, all or nothing, and record the plan on it.

``swap_modules`` replaces submodules by name and restores them if anything goes wrong, an interrupt
included; ``attach_plan`` records the plan on the model and where its library saves it.
"""
from __future__ import annotations

from torch import nn

PLAN_ATTR = "blastfx_plan"


def swap_modules(model: nn.Module, new: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Replace submodules by FQN; returns the old ones. On any failure, an interrupt (Ctrl-C) included,
    the model is restored before the exception propagates."""
    old: dict[str, nn.Module] = {}
    try:
        for name, module in new.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            old[name] = getattr(parent, child)       # recorded before the swap: restoring it is always safe
            setattr(parent, child, module)
    except BaseException:
        swap_modules(model, old)
        raise
    return old


def attach_plan(model: nn.Module, plan) -> None:
    """Record the plan on the model, and where its library saves it (transformers and diffusers: the
    quantization config, see :mod:`blastfx.integrations`). All or nothing: that record is made, or
    refused, before the plan is set."""
    from ..integrations import record_plan

    record_plan(model, plan)
    setattr(model, PLAN_ATTR, plan)
