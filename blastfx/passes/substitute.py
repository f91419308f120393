"""Substitution pass: build a BlastLinear for every planned layer, then swap them all in.

All-or-nothing: every new module is built (factorized) before the model is touched; the swap itself
restores the old modules if anything goes wrong. Layers with the same (shape, rank, blocks, method)
are factorized as one batched problem on the weights' device.
"""
from __future__ import annotations

import functools
from collections import defaultdict

import torch
from torch import nn

from ..calibrate import singular_covariance_error
from ..config import CALIBRATION_DAMPING
from ..factorize import factorize
from ..nn import BlastLinear
from ..progress import progress_bar

MAX_BATCH_ELEMENTS = 1 << 27          # weights per batched factorization call (512 MB in fp32)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an nn.Linear or HF Conv1D (stored (in, out))."""
    w = module.weight.detach()
    return w.T if type(module).__name__ == "Conv1D" else w


def build_layers(model: nn.Module, plan, *, init: str = "factorize", method: str = "als", iters=None,
                 tol: float = 1e-4, progress: bool = True, empty: bool = False, covariances=None,
                 calibration_damping: float = CALIBRATION_DAMPING, names=None, output_weights=None,
                 targets=None) -> dict[str, BlastLinear]:
    """New BlastLinear modules for ``plan`` (the model is not modified). ``empty``: allocate only
    (for loading a checkpoint into). ``covariances``: {layer: input covariance} for calibration-aware
    factorization. ``names``: build only these layers of the plan. ``output_weights``: {layer: weight of
    each output row} (the outputs' diagonal Fisher, for the loss-aware objective). ``targets``: {layer:
    (out, in) matrix to factorize instead of its weight} (sequential calibration's drift-corrected weights)."""
    new: dict[str, BlastLinear] = {}
    groups = defaultdict(list)
    for name, lp in plan.layers.items():
        if names is not None and name not in names:
            continue
        module = model.get_submodule(name)
        w = module.weight
        if init == "random" or empty:
            # empty: a checkpoint overwrites every tensor, so skip the random init (costly for big models)
            make = functools.partial(torch.nn.utils.skip_init, BlastLinear) if empty else BlastLinear
            layer = make(lp.in_features, lp.out_features, lp.rank, lp.blocks, bias=module.bias is not None,
                         device=w.device, dtype=w.dtype, allow_larger=True)
            if not empty and module.bias is not None:
                with torch.no_grad():
                    layer.bias.copy_(module.bias)
            new[name] = layer
        else:
            groups[(lp.out_features, lp.in_features, lp.rank, lp.blocks, lp.method or method, w.device)].append(name)
    bar = progress_bar(enabled=progress and bool(groups), desc="factorizing", unit="layer",
                       total=sum(len(v) for v in groups.values()))
    for (m, n, rank, blocks, meth, _), names in groups.items():
        chunk = max(1, MAX_BATCH_ELEMENTS // (m * n))
        for start in range(0, len(names), chunk):
            part = names[start:start + chunk]
            modules = [model.get_submodule(k) for k in part]
            cal = None if covariances is None else torch.stack([covariances[k].to(mod.weight.device)
                                                                for k, mod in zip(part, modules)])
            rows = None if output_weights is None else torch.stack([output_weights[k].to(mod.weight.device)
                                                                     for k, mod in zip(part, modules)])
            weights = [dense_weight(mod) if targets is None or k not in targets else targets[k].to(mod.weight)
                       for k, mod in zip(part, modules)]
            try:
                factors = factorize(torch.stack(weights), rank, blocks, method=meth,
                                    iters=iters, tol=tol, allow_larger=True, calibration=cal,
                                    calibration_damping=calibration_damping, output_weights=rows)
            except torch.linalg.LinAlgError as err:
                if covariances is None:
                    raise
                raise singular_covariance_error(part, covariances, calibration_damping) from err
            for k, (name, mod) in enumerate(zip(part, modules)):
                new[name] = BlastLinear.from_factors(factors[k].to(mod.weight.dtype), mod.bias)
            bar.update(len(part))
    bar.close()
    return new


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
