"""The planner for ``BlastConfig(structure="ss1")``, and the allocation over both families that
``structure="auto"`` weighs against the others (:mod:`.auto`): which structure each layer gets, and
at which size.

SS1's size knob is a power-of-two reduction factor, so a layer's sizes are a few coarse steps
(1/2, 1/4, ... of its parameters) and a budget between two steps is met by mixing layers at two
neighbouring reductions (or, where dense is allowed, at a reduction and dense: at budget 0.8 the
choice per layer is between half and all of its parameters).

* ``strategy="uniform"`` (SS1): every layer at the same reduction, the least compression whose total
  fits the budget, then layers one step up (to half the reduction, or dense) in a low-discrepancy
  order over the model, so the mix is spread evenly over depth, while the budget allows.
* ``strategy="error"`` / ``"loss"``, and the "mixed" candidate of ``structure="auto"``: each layer
  has a curve of candidate (parameters, error) points, the greedy of :mod:`.allocation` walks the
  lower convex hulls, each step to the layer whose error drops most per parameter. SS1 points carry
  the measured error of the projection at each reduction
  (:func:`blastfx.structures.ss1.projection_errors`); for "mixed" the same curve also holds BLAST's
  points (the tail energy of the layer's whitened spectrum at each rank, an upper bound of BLAST's
  error there, exact for low-rank layers) and dense (no error), all in one unit. With ``"error"``
  errors are relative to each layer's own output energy; with ``"loss"`` they are weighted by the
  outputs' loss Fisher (an estimated loss increase, comparable across layers).

Pure, like the rest of the planner: errors and spectra arrive as numbers.
"""
from __future__ import annotations

import heapq
from collections import Counter

import torch

from ..structures.ss1.layout import ss1_params
from ..structures.ss1.structure import reductions
from .allocation import _error_curve, _layer_step_cost
from .layers import LayerPlan, Plan

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


def _top(lp: LayerPlan, allow_dense: bool) -> tuple:
    """The no-error end of an SS1 layer's sizes: dense, or reduction 1 (exact, same parameters)."""
    if allow_dense:
        return lp.dense_params, 0.0, ("dense",)
    return ss1_params(lp.out_features, lp.in_features, 1), 0.0, ("ss1", 1)


def _ss1_points(lp: LayerPlan, errors: dict | None, energy: float, relative: bool) -> list[tuple]:
    out = []
    for r in reductions(lp.out_features, lp.in_features) if errors is None else sorted(errors):
        err = 0.0 if errors is None else errors[r] / (max(energy, 1e-300) if relative else 1.0)
        out.append((ss1_params(lp.out_features, lp.in_features, r), err, ("ss1", r)))
    return out


def _blast_points(lp: LayerPlan, spectrum: torch.Tensor, multiple: int, relative: bool) -> list[tuple]:
    s2 = spectrum.double().pow(2)
    tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])
    tail = tail / s2.sum().clamp_min(1e-300) if relative else tail
    return [(p, e, ("blast", r)) for p, e, r in _error_curve(lp, tail, multiple, allow_dense=False)]


def _apply(plan: Plan, name: str, choice: tuple, dense: list[str]) -> None:
    lp = plan.layers[name]
    if choice[0] == "dense":
        del plan.layers[name]
        dense.append(name)
    elif choice[0] == "ss1":
        plan.layers[name] = LayerPlan(lp.out_features, lp.in_features, None, None, kind=lp.kind, bias=lp.bias,
                                      structure="ss1", reduction=choice[1])
    else:
        lp.rank = choice[1]


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
        (p0, _, c0), (p1, e1, c1) = curves[k][at[k]], curves[k][at[k] + 1]
        if kept + p1 - p0 <= target:
            at[k] += 1
            kept += p1 - p0
            if at[k] + 1 < len(curves[k]):
                heapq.heappush(heap, (-ratio(k), k))
        elif c0[0] == c1[0] == "blast":        # part of the segment: the rank steps that fit
            lp = plan.layers[k]
            rank, step = c0[1], _layer_step_cost(lp, multiple)
            while rank + multiple < c1[1] and kept + step <= target:
                rank, kept = rank + multiple, kept + step
            partial[k] = ("blast", rank)
    return {k: partial.get(k, curves[k][at[k]][2]) for k in curves}


def _uniform_ss1(plan: Plan, names: list[str], target: int, allow_dense: bool) -> dict[str, tuple]:
    """One reduction for all (the least compression that fits), then layers a step up in an order
    spread evenly over the model while the budget allows."""
    ladders = {}
    for k in names:
        lp = plan.layers[k]
        ladder = [(p, c) for p, _, c in _ss1_points(lp, None, 1.0, False)][::-1]      # most compressed first
        ladders[k] = ladder + [_top(lp, allow_dense)[::2]]
    base = plan.kept_params - sum(plan.layers[k].params for k in names)

    def index(k, r):                     # the layer's point at reduction r (its most compressed if r is beyond)
        ladder = ladders[k]
        for i, (_, c) in enumerate(ladder):
            if c[0] == "ss1" and c[1] <= r:
                return i
        return len(ladder) - 1

    r_max = max([c[1] for k in names for _, c in ladders[k][:1] if c[0] == "ss1"] + [1])
    r = 2
    while r < r_max and base + sum(ladders[k][index(k, r)][0] for k in names) > target:
        r *= 2
    at = {k: index(k, r) for k in names}
    kept = base + sum(ladders[k][at[k]][0] for k in names)
    order = sorted(range(len(names)), key=lambda i: (i * _GOLDEN) % 1.0)
    for i in order:
        k = names[i]
        if at[k] + 1 < len(ladders[k]) and ladders[k][at[k]][1] == ("ss1", r):
            cost = ladders[k][at[k] + 1][0] - ladders[k][at[k]][0]
            if kept + cost <= target:
                at[k] += 1
                kept += cost
    return {k: ladders[k][at[k]][1] for k in names}


def choose_structures(plan: Plan, adjustable: list[str], target: int, config, spectra=None,
                      ss1_errors=None) -> list[str]:
    """Give the ``adjustable`` layers of ``plan`` (all BLAST at a starting rank) their structure and
    size for ``config.structure`` ("ss1" or "auto") and ``config.strategy`` (see the module docstring),
    in place: SS1 layers replaced, dense ones removed and listed in ``plan.dense``. ``spectra``:
    {layer: singular values} ("auto"); ``ss1_errors``: {layer: ({reduction: error}, energy)} (measured
    strategies and "auto"). Returns the layers still BLAST, for the rank balancing."""
    structure, strategy = config.structure, config.strategy
    relative = strategy != "loss"
    narrow = [k for k in adjustable if not reductions(plan.layers[k].out_features, plan.layers[k].in_features)]
    dense: list[str] = []
    if structure == "ss1":                  # no SS1 size fits these (fewer than two input tiles): dense
        for k in narrow:
            _apply(plan, k, ("dense",), dense)
        if narrow:
            plan.notes.append(f"structure 'ss1': {len(narrow)} layers have fewer than two input tiles of 32 "
                              f"features and stay dense (e.g. {narrow[0]})")
    candidates = [k for k in adjustable if k not in narrow]
    if structure == "ss1" and strategy == "uniform":
        chosen = _uniform_ss1(plan, candidates, target, config.allow_dense)
    else:
        if ss1_errors is None or (structure == "auto" and spectra is None):
            raise ValueError(f"structure={structure!r} with strategy={strategy!r} needs the layers' measured "
                             "SS1 errors" + (" and spectra" if structure == "auto" else ""))
        curves = {}
        for k in candidates + (narrow if structure == "auto" else []):
            lp = plan.layers[k]
            points = [] if k in narrow else _ss1_points(lp, *ss1_errors[k], relative)
            if structure == "auto":
                points += _blast_points(lp, spectra[k], config.rank_multiple, relative)
                if config.allow_dense:
                    points.append((lp.dense_params, 0.0, ("dense",)))
            else:
                points.append(_top(lp, config.allow_dense))
            curves[k] = _hull(points)
        chosen = _greedy(plan, curves, target, config.rank_multiple)
    for k, choice in chosen.items():
        _apply(plan, k, choice, dense)
    plan.dense = sorted(set(plan.dense) | set(dense))
    counts = Counter(lp.structure for k, lp in plan.layers.items() if k in adjustable)
    how = ("uniform reduction" if structure == "ss1" and strategy == "uniform" else
           f"measured {'relative output' if relative else 'loss-weighted output'} error per parameter")
    label = "BLAST and SS1 in one allocation" if structure == "auto" else f"structure {structure!r}"
    plan.notes.append(f"{label} by {how}: " + ", ".join(
        [f"{counts[s]} {s.upper()}" for s in sorted(counts)] + [f"{len(dense)} dense"]))
    return [k for k in adjustable if k in plan.layers and plan.layers[k].structure == "blast"]
