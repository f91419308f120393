"""One typed record of what calibration measured about a layer, and collection of exactly what is needed.

The planner and the builder each declare which statistics they need (:data:`STATISTICS` names);
:func:`collect_statistics` runs the calibration passes for the union of those, once, on the dense model.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from ..streaming.passes import streamed
from ..structures.base import STATISTICS
from .collect import collect_covariances, collect_output_fisher


@dataclass
class LayerStats:
    """What calibration measured about one linear layer; a field is None where it was not measured.

    ``covariance``: (in, in) mean of x x^T over the calibration tokens of the layer's inputs.
    ``output_fisher``: (out,) mean squared loss gradient of each output channel, floored (the
    loss-aware objective's row weights). ``target``: (out, in) the matrix to fit instead of the layer's
    weight (sequential calibration's drift-corrected weight)."""
    covariance: torch.Tensor | None = None
    output_fisher: torch.Tensor | None = None
    target: torch.Tensor | None = None

    def only(self, names) -> "LayerStats":
        """A copy keeping the fields in ``names`` (the others None): what one stage may read."""
        keep = set(names)
        return LayerStats(**{f.name: getattr(self, f.name) if f.name in keep else None for f in fields(self)})

    def merged(self, **values) -> "LayerStats":
        """A copy with ``values`` set."""
        return replace(self, **values)


def check_needs(needs) -> frozenset:
    needs = frozenset(needs)
    unknown = needs - set(STATISTICS)
    if unknown:
        raise ValueError(f"needs: {sorted(unknown)} are not statistics; known: {STATISTICS}")
    return needs


def collect_statistics(model: nn.Module, names, batches, needs, progress: bool = False,
                       compute_device=None) -> dict[str, LayerStats]:
    """{layer: LayerStats} for the named layers, with the statistics in ``needs`` measured on ``batches``
    (one pass over them per statistic); empty records without batches or needs. ``compute_device``:
    stream the model through it (:mod:`blastfx.streaming`), the covariances kept where the model lives."""
    needs = check_needs(needs)
    names = list(names)
    stats = {n: LayerStats() for n in names}
    if batches is None or not names or not needs:
        return stats
    with streamed(model, compute_device) as passes:
        if "covariance" in needs:
            store = None if passes is None else passes.home
            for n, c in collect_covariances(model, names, batches, progress=progress, store=store).items():
                stats[n].covariance = c
        if "output_fisher" in needs:
            with contextlib.nullcontext() if passes is None else passes.saved_tensors_at_home():
                for n, f in collect_output_fisher(model, names, batches, progress=progress).items():
                    stats[n].output_fisher = f
    return stats


def field_of(stats: dict[str, LayerStats] | None, name: str) -> dict[str, torch.Tensor] | None:
    """{layer: that statistic} where measured, None when no layer has it."""
    values = {k: getattr(s, name) for k, s in (stats or {}).items() if getattr(s, name) is not None}
    return values or None


def stacked(stats: list[LayerStats], name: str, device) -> torch.Tensor | None:
    """The statistic ``name`` of every record stacked on ``device`` (a batched problem), None if no
    record has it; ``ValueError`` if only some do (the layers of one batch are fitted alike)."""
    values = [getattr(s, name) for s in stats]
    present = [v is not None for v in values]
    if not any(present):
        return None
    if not all(present):
        raise ValueError(f"statistic {name!r} is measured for {sum(present)} of {len(values)} layers fitted "
                         "together: give it for all or none")
    return torch.stack([v.to(device) for v in values])
