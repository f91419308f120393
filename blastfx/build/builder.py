"""The builder: a new module for every planned layer, the model left untouched.

For each planned layer its structure and method are looked up in the registry
(:mod:`blastfx.structures`) and called with the layer's weight and its
:class:`~blastfx.statistics.LayerStats`. Layers with the same structure, shape, size and method are
fitted as one batched problem on the weights' device (in chunks of at most
:data:`MAX_BATCH_ELEMENTS` weights). Swapping the modules in is :mod:`blastfx.swap`'s job.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from .. import structures
from . import distributed
from ..analyze import dense_weight
from ..config import CALIBRATION_DAMPING, INITS
from ..progress import progress_bar
from ..statistics import LayerStats, field_of, singular_covariance_error

MAX_BATCH_ELEMENTS = 1 << 27          # weights per batched factorization call (512 MB in fp32)


@dataclass(frozen=True)
class BuildOptions:
    """How layers are built. ``init``: "factorize" (fit the weights) or "random" (train from scratch).
    ``method``: the fitting method of layers whose plan names none (None: the structure's default)."""
    init: str = "factorize"
    method: str | None = None
    iters: int | None = None
    tol: float = 1e-4
    calibration_damping: float = CALIBRATION_DAMPING
    fit_precision: str = "fp32"   # BLAST fits' large products in IEEE fp32 ("tf32": CUDA tensor cores)
    progress: bool = True
    distribute: bool = True       # split the fitting over the ranks of an initialized process group

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")

    @classmethod
    def from_config(cls, config, **changes) -> "BuildOptions":
        values = dict(init=config.init, method=config.method, iters=config.iters, tol=config.tol,
                      calibration_damping=config.calibration_damping, fit_precision=config.fit_precision,
                      progress=config.progress,
                      distribute=config.distribute)
        return cls(**{**values, **changes})


def method_of(lp, options: BuildOptions) -> structures.Method:
    """The method fitting planned layer ``lp``: the plan's, else the options', else the structure's default."""
    structure = structures.get(lp.structure)
    return method_for(structure, lp.method, options.method)


def method_for(structure, layer_method: str | None, default: str | None) -> structures.Method:
    """A layer's own method, else ``default`` where it is one of ``structure``'s (a config names one
    method for the model; layers of another structure take their structure's default)."""
    if layer_method is None and default is not None and default not in structure.methods:
        default = None
    return structure.method(layer_method or default)


def needs(config, methods) -> frozenset:
    """The calibration statistics the builder reads under ``config`` (a resolved BlastConfig) when
    fitting with ``methods``: what they use, the output Fisher only for the loss objective."""
    if config.init == "random":
        return frozenset()
    uses = set().union(*(m.uses for m in methods))
    if config.objective != "loss":
        uses.discard("output_fisher")
    return frozenset(uses)


def build_layers(model: nn.Module, plan, stats: dict[str, LayerStats] | None = None,
                 options: BuildOptions | None = None, *, names=None) -> dict[str, nn.Module]:
    """New modules for ``plan``'s layers (``names``: only these), fitted to each layer's weight (or its
    ``LayerStats.target``) with the statistics in ``stats``; the model is not modified."""
    options = options or BuildOptions()
    stats = stats or {}
    new: dict[str, nn.Module] = {}
    groups = defaultdict(list)
    for name, lp in plan.layers.items():
        if names is not None and name not in names:
            continue
        module = model.get_submodule(name)
        structure = structures.get(lp.structure)
        if options.init == "random":
            layer = structure.random(lp, bias=module.bias is not None, device=module.weight.device,
                                     dtype=module.weight.dtype)
            if module.bias is not None:
                with torch.no_grad():
                    layer.bias.copy_(module.bias)
            new[name] = layer
        else:
            key = (lp.structure, lp.out_features, lp.in_features, structure.knob(lp), method_of(lp, options).name,
                   module.weight.device, getattr(lp, "factor_dtype", None))
            groups[key].append(name)
    units = [(key, group[start:start + max(1, MAX_BATCH_ELEMENTS // (key[1] * key[2]))])
             for key, group in groups.items()
             for start in range(0, len(group), max(1, MAX_BATCH_ELEMENTS // (key[1] * key[2])))]
    rank, ranks = distributed.world() if options.distribute else (0, 1)
    owner = distributed.assign([key[1] * key[2] * len(part) for key, part in units], ranks)
    mine = [unit for unit, r in zip(units, owner) if r == rank]
    bar = progress_bar(enabled=options.progress and bool(mine) and rank == 0, desc="factorizing", unit="layer",
                       total=sum(len(part) for _, part in mine))
    for (structure_name, _, _, _, method, *_), part in mine:
        structure = structures.get(structure_name)
        modules = [model.get_submodule(k) for k in part]
        part_stats = [stats.get(k) or LayerStats() for k in part]
        weights = torch.stack([dense_weight(mod) if s.target is None else s.target.to(mod.weight)
                               for mod, s in zip(modules, part_stats)])
        try:
            built = structure.build(weights, [mod.bias for mod in modules], part_stats, plan.layers[part[0]],
                                    method, options)
        except torch.linalg.LinAlgError as err:
            covariances = field_of(dict(zip(part, part_stats)), "covariance")
            if covariances is None:
                raise
            raise singular_covariance_error(part, covariances, options.calibration_damping, err) from err
        new.update(zip(part, built))
        bar.update(len(part))
    bar.close()
    if ranks > 1:       # every rank receives the layers the others fitted (random ones: rank 0's)
        owners = {name: 0 for name in new if options.init == "random"}
        owners.update({name: r for (_, part), r in zip(units, owner) for name in part})
        new = distributed.share(new, owners, lambda name: _empty_like(model, plan, name))
    return new


def _empty_like(model: nn.Module, plan, name: str) -> nn.Module:
    module = model.get_submodule(name)
    lp = plan.layers[name]
    return structures.get(lp.structure).empty(lp, bias=module.bias is not None, device=module.weight.device,
                                               dtype=module.weight.dtype)


def empty_layers(model: nn.Module, plan) -> dict[str, nn.Module]:
    """Allocated, uninitialized modules for ``plan``'s layers, on each layer's device and in its dtype:
    what a checkpoint is loaded into."""
    new = {}
    for name, lp in plan.layers.items():
        module = model.get_submodule(name)
        new[name] = structures.get(lp.structure).empty(lp, bias=module.bias is not None, device=module.weight.device,
                                                        dtype=module.weight.dtype)
    return new
