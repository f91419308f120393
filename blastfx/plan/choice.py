"""The planner for a ladder family (``BlastConfig(structure="ss1")``, or any registered structure with
``sizes``), and the allocation over every family that ``structure="auto"`` weighs against the others
(:mod:`.auto`): which structure each layer gets, and at which size.

A ladder family's sizes are a few coarse steps (SS1: reductions 2, 4, 8, ..., so 1/2, 1/4, ... of a
layer's parameters), so a budget between two steps is met by mixing layers at two neighbouring steps
(or, where dense is allowed, at a step and dense: at budget 0.8 the choice per SS1 layer is between
half and all of its parameters). The family says what its sizes are, what each costs and how wrong
each is (:class:`blastfx.structures.Structure`); nothing here knows a family by name but BLAST, whose
rank is the continuous knob of :mod:`.allocation`.

* ``strategy="uniform"``: every layer on the same step of its ladder, the least compression whose
  total fits the budget, then layers one step up (to the next size, or dense) in a low-discrepancy
  order over the model, so the mix is spread evenly over depth, while the budget allows.
* ``strategy="error"`` / ``"loss"``, and the "mixed" candidate of ``structure="auto"``: each layer
  has a curve of candidate (parameters, error) points, the greedy of :mod:`.allocation` walks the
  lower convex hulls, each step to the layer whose error drops most per parameter. A ladder family's
  points carry its measured error at each size (its ``size_errors``, e.g.
  :func:`blastfx.structures.ss1.projection_errors`); for "mixed" the same curve holds every ladder
  family's points, BLAST's (the tail energy of the layer's whitened spectrum at each rank, an upper
  bound of BLAST's error there, exact for low-rank layers) and dense (no error), all in one unit.
  With ``"error"`` errors are relative to each layer's own output energy; with ``"loss"`` they are
  weighted by the outputs' loss Fisher (an estimated loss increase, comparable across layers).

Pure, like the rest of the planner: errors and spectra arrive as numbers.
"""
from __future__ import annotations

import heapq
from collections import Counter

import torch

from .. import structures
from .allocation import _error_curve, _layer_step_cost
from .layers import DEFAULT_STRUCTURE, LayerPlan, Plan

_GOLDEN = 0.6180339887498949


def _hull(points: list[tuple]) -> list[tuple]:
    """Lower convex hull of (params, error, choice) points: by params, each strictly below the last in
    error, no point above the chord of its neighbours (the greedy is optimal on convex curves)."""
    best: dict[int, tuple] = {}
    for p in points:
        if p[0] not in best or p[1] < best[p[0]][1]:
            best[p[0]] = p
    hull: list[tuple] = []
    for pt in sorted(best.values(), key=lambda p: p[0]):
        if hull and pt[1] >= hull[-1][1]:
            continue
        while len(hull) >= 2 and ((hull[-1][1] - hull[-2][1]) * (pt[0] - hull[-2][0])
                                  >= (pt[1] - hull[-2][1]) * (hull[-1][0] - hull[-2][0])):
            hull.pop()
        hull.append(pt)
    return hull


def _top(lp: LayerPlan, structure, allow_dense: bool) -> tuple:
    """The no-error end of a ladder layer's sizes: dense, or the family's exact size."""
    if allow_dense:
        return lp.dense_params, 0.0, ("dense",)
    size = structure.exact(lp.out_features, lp.in_features)
    return structure.num_params(lp.out_features, lp.in_features, size), 0.0, (structure.name, size)


def _ladder_points(lp: LayerPlan, structure, errors: dict | None, energy: float, relative: bool) -> list[tuple]:
    """(params, error, (structure, size)) at each of the family's sizes for the layer (most parameters
    first): its whole ladder at no error without ``errors``, else the sizes measured."""
    m, n = lp.out_features, lp.in_features
    if errors is None:
        return [(structure.num_params(m, n, s), 0.0, (structure.name, s)) for s in structure.sizes(m, n)]
    scale = max(energy, 1e-300) if relative else 1.0
    return [(structure.num_params(m, n, s), errors[s] / scale, (structure.name, s))
            for s in sorted(errors, key=lambda s: -structure.num_params(m, n, s))]


def _blast_points(lp: LayerPlan, spectrum: torch.Tensor, multiple: int, relative: bool) -> list[tuple]:
    s2 = spectrum.double().pow(2)
    tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])
    tail = tail / s2.sum().clamp_min(1e-300) if relative else tail
    return [(p, e, (DEFAULT_STRUCTURE, r)) for p, e, r in _error_curve(lp, tail, multiple, allow_dense=False)]


def _apply(plan: Plan, name: str, choice: tuple, dense: list[str]) -> None:
    lp = plan.layers[name]
    if choice[0] == "dense":
        del plan.layers[name]
        dense.append(name)
    elif choice[0] == DEFAULT_STRUCTURE:
        lp.rank = choice[1]
    else:
        structure = structures.get(choice[0])
        plan.layers[name] = LayerPlan.of(structure.name, lp.out_features, lp.in_features, structure.fields(choice[1]),
                                         kind=lp.kind, bias=lp.bias)


def _greedy(plan: Plan, curves: dict[str, list[tuple]], target: int, multiple: int) -> dict[str, tuple]:
    """Walk the hulls from their cheapest points: each step to the layer whose error drops most per
    parameter, while the budget allows; a BLAST step that does not fit is cut to the rank steps that
    do. Returns each layer's chosen point."""
    at = {k: 0 for k in curves}
    kept = plan.kept_params + sum(c[0][0] - plan.layers[k].params for k, c in curves.items())

    def ratio(k):
        (p0, e0, _), (p1, e1, _) = curves[k][at[k]], curves[k][at[k] + 1]
        return (e0 - e1) / max(p1 - p0, 1)

    heap = [(-ratio(k), k) for k in curves if len(curves[k]) > 1]
    heapq.heapify(heap)
    partial: dict[str, tuple] = {}
    while heap:
        neg, k = heapq.heappop(heap)
        if -neg <= 0:
            break
        (p0, _, c0), (p1, _, c1) = curves[k][at[k]], curves[k][at[k] + 1]
        if kept + p1 - p0 <= target:
            at[k] += 1
            kept += p1 - p0
            if at[k] + 1 < len(curves[k]):
                heapq.heappush(heap, (-ratio(k), k))
        elif c0[0] == c1[0] == DEFAULT_STRUCTURE:        # part of the segment: the rank steps that fit
            lp = plan.layers[k]
            rank, step = c0[1], _layer_step_cost(lp, multiple)
            while rank + multiple < c1[1] and kept + step <= target:
                rank, kept = rank + multiple, kept + step
            partial[k] = (DEFAULT_STRUCTURE, rank)
    return {k: partial.get(k, curves[k][at[k]][2]) for k in curves}


def _uniform(plan: Plan, names: list[str], target: int, structure, allow_dense: bool) -> dict[str, tuple]:
    """One step of the ladder for all (the least compression that fits), then layers a step up in an
    order spread evenly over the model while the budget allows. A layer whose ladder is shorter than
    the step stays at its last (most compressed) size."""
    ladders = {}
    for k in names:
        lp = plan.layers[k]
        ladder = [(p, c) for p, _, c in _ladder_points(lp, structure, None, 1.0, False)]
        ladders[k] = ladder[::-1] + [_top(lp, structure, allow_dense)[::2]]      # most compressed first
    base = plan.kept_params - sum(plan.layers[k].params for k in names)

    def index(k, step):                  # the layer's point at ``step`` (its most compressed if step is beyond)
        ladder = ladders[k]
        return max(len(ladder) - 2 - step, 0)

    depth = max([len(ladders[k]) - 1 for k in names] + [0])
    step = 0
    while step < depth - 1 and base + sum(ladders[k][index(k, step)][0] for k in names) > target:
        step += 1
    at = {k: index(k, step) for k in names}
    kept = base + sum(ladders[k][at[k]][0] for k in names)
    order = sorted(range(len(names)), key=lambda i: (i * _GOLDEN) % 1.0)
    for i in order:
        k = names[i]
        if len(ladders[k]) - 1 > step:               # the layer has this step: one up is its next size, or the top
            cost = ladders[k][at[k] + 1][0] - ladders[k][at[k]][0]
            if kept + cost <= target:
                at[k] += 1
                kept += cost
    return {k: ladders[k][at[k]][1] for k in names}


def choose_structures(plan: Plan, adjustable: list[str], target: int, config, spectra=None,
                      size_errors=None) -> list[str]:
    """Give the ``adjustable`` layers of ``plan`` (all BLAST at a starting rank) their structure and
    size for ``config.structure`` (a ladder family, or "auto") and ``config.strategy`` (see the module
    docstring), in place: ladder layers replaced, dense ones removed and listed in ``plan.dense``.
    ``spectra``: {layer: singular values} ("auto"); ``size_errors``: {structure: {layer: ({size:
    error}, energy)}} for each ladder family planned (measured strategies and "auto"). Returns the
    layers still BLAST, for the rank balancing."""
    structure, strategy = config.structure, config.strategy
    relative = strategy != "loss"
    auto = structure == "auto"
    families = structures.ladders() if auto else (structures.get(structure),)
    if not all(s.ladder for s in families):
        raise ValueError(f"structure {structure!r} has no ladder of sizes (Structure.sizes): the planner sizes BLAST "
                         "by rank and every other family by its sizes; give compress a plan= instead")
    sized = {s.name: [k for k in adjustable if s.sizes(plan.layers[k].out_features, plan.layers[k].in_features)]
             for s in families}
    dense: list[str] = []
    candidates = list(adjustable)
    if not auto:                         # no size of the family fits these (too small): dense
        (family,) = families
        candidates = sized[family.name]
        narrow = [k for k in adjustable if k not in candidates]
        for k in narrow:
            _apply(plan, k, ("dense",), dense)
        if narrow:
            plan.notes.append(f"structure {structure!r}: {len(narrow)} layers are too small for any "
                              f"{structure.upper()} size and stay dense (e.g. {narrow[0]})")
    uniform = not auto and strategy == "uniform"
    if uniform:
        chosen = _uniform(plan, candidates, target, family, config.allow_dense)
    else:
        missing = [s.name.upper() for s in families if s.name not in (size_errors or {})]
        if missing or (auto and spectra is None):
            raise ValueError(f"structure={structure!r} with strategy={strategy!r} needs the layers' measured "
                             f"{' and '.join(missing) or 'ladder'} errors" + (" and spectra" if auto else ""))
        curves = {}
        for k in candidates:
            lp = plan.layers[k]
            points = [p for s in families if k in sized[s.name]
                      for p in _ladder_points(lp, s, *size_errors[s.name][k], relative)]
            if auto:
                points += _blast_points(lp, spectra[k], config.rank_multiple, relative)
                if config.allow_dense:
                    points.append((lp.dense_params, 0.0, ("dense",)))
            else:
                points.append(_top(lp, family, config.allow_dense))
            curves[k] = _hull(points)
        chosen = _greedy(plan, curves, target, config.rank_multiple)
    for k, choice in chosen.items():
        _apply(plan, k, choice, dense)
    plan.dense = sorted(set(plan.dense) | set(dense))
    counts = Counter(lp.structure for k, lp in plan.layers.items() if k in adjustable)
    how = ("one size step for all" if uniform else
           f"measured {'relative output' if relative else 'loss-weighted output'} error per parameter")
    label = (" and ".join([DEFAULT_STRUCTURE.upper()] + [s.name.upper() for s in families]) + " in one allocation"
             if auto else f"structure {structure!r}")
    plan.notes.append(f"{label} by {how}: " + ", ".join(
        [f"{counts[s]} {s.upper()}" for s in sorted(counts)] + [f"{len(dense)} dense"]))
    return [k for k in adjustable if k in plan.layers and plan.layers[k].structure == DEFAULT_STRUCTURE]
