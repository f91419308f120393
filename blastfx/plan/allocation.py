"""The planner: (analysis, budget, config[, spectra]) -> Plan of per-layer (b_out, b_in, rank).

Pure: no weights are read or written here. The "error" and "loss" strategies take each layer's
singular values (computed by :mod:`blastfx.statistics.sensitivity`) as numbers.
"""
from __future__ import annotations

import heapq

import torch

from ..config import BlastConfig
from ..structures.blast.layout import BlastShape, normalize_blocks
from .checks import BUDGET_TOLERANCE, check_budget
from .layers import DEFAULT_STRUCTURE, LayerPlan, Plan, full_rank


def fit_blocks(dim: int, b: int) -> int:
    """The largest block count <= b that divides dim."""
    return max(d for d in range(1, min(b, dim) + 1) if dim % d == 0)


def block_candidates(m: int, n: int, choices) -> list[tuple[int, int]]:
    """The distinct (b_out, b_in) that ``choices`` give for an m x n layer (each fitted to divisors)."""
    fitted = [(fit_blocks(m, b[0]), fit_blocks(n, b[1])) for b in map(normalize_blocks, choices)]
    return list(dict.fromkeys(fitted))


def rank_at(lp: LayerPlan, blocks: tuple[int, int], multiple: int) -> int:
    """The rank whose parameter count with ``blocks`` is nearest ``lp``'s planned one (a fair comparison
    of block counts: within half a rank step of equal parameters)."""
    per_rank = _params_per_rank(lp.out_features, lp.in_features, blocks)
    rank = max(multiple, multiple * round(lp.params / per_rank / multiple))
    return min(rank, full_rank(lp.out_features, lp.in_features, blocks))


def _params_per_rank(m, n, blocks) -> int:
    """r(m + n + b_out * b_in) parameters: what one unit of rank costs."""
    return m + n + blocks[0] * blocks[1]


def rank_for(m, n, blocks, fraction, multiple):
    """The largest rank, a multiple of ``multiple`` (or below it for tiny layers, at least 1), whose
    BLAST parameters stay within ``fraction`` of the m x n layer's: the rule every plan starts from,
    public so benchmarks size layers exactly as plans do."""
    per_rank = _params_per_rank(m, n, blocks)
    r = int(fraction * m * n // per_rank)
    return max(multiple, r - r % multiple) if r >= multiple else max(r, 1)


def _layer_step_cost(lp: LayerPlan, step: int) -> int:
    return step * (lp.shape.m_pad + lp.shape.n_pad + lp.blocks[0] * lp.blocks[1])


def _balance(plan: Plan, adjustable: list[str], target: int, multiple: int) -> None:
    """Nudge ranks of ``adjustable`` layers until kept params are within tolerance of ``target``."""
    tol = BUDGET_TOLERANCE * target / 2
    for step in sorted({multiple, 1}, reverse=True):
        for _ in range(100000):
            gap = target - plan.kept_params
            if abs(gap) <= tol:
                return
            frac = {k: plan.layers[k].params / plan.layers[k].dense_params for k in adjustable}
            if gap > 0:
                options = [k for k in sorted(adjustable, key=frac.get)
                           if _layer_step_cost(plan.layers[k], step) <= gap + tol
                           and plan.layers[k].params + _layer_step_cost(plan.layers[k], step) <= plan.layers[k].dense_params]
            else:
                options = [k for k in sorted(adjustable, key=frac.get, reverse=True)
                           if plan.layers[k].rank > step and _layer_step_cost(plan.layers[k], step) <= -gap + tol]
            if not options:
                break
            plan.layers[options[0]].rank += step if gap > 0 else -step


def _error_curve(lp: LayerPlan, tail: torch.Tensor, multiple: int, allow_dense: bool) -> list[tuple]:
    """The layer's lower convex hull of (parameters, estimated error, rank) over ranks that are multiples
    of ``multiple`` and cost less than dense, plus (dense parameters, 0, None) for keeping it dense.

    Why a hull: the greedy below is optimal on convex curves, and the dense point breaks convexity
    where the spectrum is flat (BLAST at ~97% of the dense parameters still drops a third of the rank
    of a 576 x 1536 layer). On the hull, a flat layer jumps straight to dense when that is worth it."""
    points, r = [], min(multiple, full_rank(lp.out_features, lp.in_features, lp.blocks))
    while True:
        shape = BlastShape.make(lp.out_features, lp.in_features, r, lp.blocks, allow_larger=True)
        if shape.num_params > lp.dense_params and points:      # the smallest rank stays, as in "uniform"
            break
        points.append((shape.num_params, tail[min(r, len(tail) - 1)].item(), r))
        if r >= len(tail) - 1:
            break
        r += multiple
    if allow_dense and points[-1][1] > 0:
        points.append((lp.dense_params, 0.0, None))
    hull = []
    for pt in points:      # monotone chain: drop points above the chord of their neighbours
        while len(hull) >= 2 and ((hull[-1][1] - hull[-2][1]) * (pt[0] - hull[-2][0])
                                  >= (pt[1] - hull[-2][1]) * (hull[-1][0] - hull[-2][0])):
            hull.pop()
        hull.append(pt)
    return hull


def _allocate_by_error(plan: Plan, adjustable: list[str], target: int, multiple: int, spectra,
                       relative: bool = True, allow_dense: bool = True) -> list[str]:
    """Greedy on each layer's convex error curve (:func:`_error_curve`): the next move goes to the layer
    whose squared error (SVD tail energy at the rank, an upper bound for BLAST) drops most per
    parameter. ``relative``: each layer's error as a fraction of its own ("error"); otherwise as given,
    for spectra already in common units (the loss-weighted ones of strategy "loss"). A move that does
    not fit the budget is cut to the rank steps that do. Returns the layers to keep dense (taken out of
    ``plan.layers`` by the caller)."""
    curves, at = {}, {}
    for k in adjustable:
        s2 = spectra[k].double().pow(2)
        tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])
        tail = tail / s2.sum().clamp_min(1e-300) if relative else tail
        curves[k], at[k] = _error_curve(plan.layers[k], tail, multiple, allow_dense), 0
        plan.layers[k].rank = curves[k][0][2]          # the smallest rank: one step, or the full rank

    def ratio(k):
        (p0, e0, _), (p1, e1, _) = curves[k][at[k]], curves[k][at[k] + 1]
        return (e0 - e1) / max(p1 - p0, 1)

    heap = [(-ratio(k), k) for k in adjustable if len(curves[k]) > 1]
    heapq.heapify(heap)
    dense, kept = [], plan.kept_params
    while heap:
        _, k = heapq.heappop(heap)
        lp = plan.layers[k]
        params, _, rank = curves[k][at[k] + 1]
        cost = params - lp.params
        if kept + cost <= target:
            at[k] += 1
            kept += cost
            if rank is None:
                dense.append(k)
                continue
            lp.rank = rank
            if at[k] + 1 < len(curves[k]):
                heapq.heappush(heap, (-ratio(k), k))
        elif rank is not None:              # part of the segment: the rank steps that fit; layer done
            before = lp.params
            while lp.rank + multiple < rank and kept + _layer_step_cost(lp, multiple) <= target:
                lp.rank += multiple
            kept += lp.params - before
    return dense


def make_plan(analysis, budget: float, config: BlastConfig | None = None, spectra=None, block_errors=None,
              size_errors=None, blast_errors=None) -> Plan:
    """Per-layer structures and sizes so that the compressible layers keep ``budget`` of their
    parameters (within 1%). ``spectra``: {fqn: singular values}, needed by strategy="error".
    ``config.structure`` a ladder family (``"ss1"``) or "auto": each layer's structure and size by
    :mod:`.choice` and :mod:`.auto`, with ``size_errors`` ({family: {fqn: ({size: error}, energy)}},
    e.g. ``{"ss1": {fqn: ({reduction: error}, energy)}}``) for measured strategies and "auto", and
    ``blast_errors`` ({fqn: ({rank: error}, energy)}, measured at the ranks of
    :func:`auto_start_plan`) for "auto". A layer whose override names a structure is planned with the
    layers of that structure, on the same fraction of their own parameters.
    ``block_errors``: {fqn: {(b_out, b_in): measured error}}; a layer without a blocks override takes
    the block count of least error (``config.block_choices``, measured by ``blastfx.statistics.sensitivity``)."""
    config = config or BlastConfig()
    budget = check_budget(budget)
    plan = _plan_groups(_targets(analysis, config), budget, config, spectra, block_errors, size_errors, blast_errors)
    note_unquantized(plan, config)
    return plan


def note_unquantized(plan: Plan, config: BlastConfig) -> None:
    """Note the layers the config quantizes (``factor_dtype``, its own or an override's) that the plan
    gives a structure without quantized factors (SS1, under ``structure="auto"`` or an override):
    they keep the model's dtype, and so more bytes than their parameter count at the codes' width."""
    kept = {}
    for name, lp in plan.layers.items():
        fmt = config.factor_dtype_for(name)
        if lp.structure != DEFAULT_STRUCTURE and fmt is not None:
            kept.setdefault((lp.structure, fmt), []).append(name)
    for (structure, fmt), names in kept.items():
        plan.notes.append(f"factor_dtype {fmt!r} quantizes BLAST factors only: {len(names)} {structure.upper()} "
                          f"layer{'s' * (len(names) > 1)} keep{'s' * (len(names) == 1)} the model's dtype "
                          f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")


def auto_start_plan(analysis, budget: float, config: BlastConfig | None = None, spectra=None, block_errors=None,
                    size_errors=None) -> Plan:
    """The plan with every ``"auto"`` layer planned as BLAST: what ``structure="auto"`` starts from, so
    its BLAST layers are where :func:`make_plan` needs ``blast_errors`` measured."""
    config = config or BlastConfig()
    budget = check_budget(budget)
    return _plan_groups(_targets(analysis, config), budget, config, spectra, block_errors, size_errors, None,
                        auto_as=DEFAULT_STRUCTURE)


def _targets(analysis, config: BlastConfig) -> list:
    sites = [s for s in analysis if s.substitutable]
    config.check_patterns([s.fqn for s in sites])
    targets = [s for s in sites if config.selects(s.fqn, s.repeated, min(s.in_features, s.out_features))]
    if not targets:
        raise ValueError("no linear layer is selected for compression: check include/exclude/min_features "
                         f"(the model has {len(sites)} linear layers)")
    return targets


def _plan_groups(targets, budget, config, spectra, block_errors, size_errors, blast_errors, auto_as=None) -> Plan:
    """The layers grouped by their structure (the config's, or their override's), each group planned
    on its own at ``budget``, merged into one plan."""
    groups: dict[str, list] = {}
    for s in targets:
        groups.setdefault(config.structure_for(s.fqn), []).append(s)
    plans = []
    for structure, sites in groups.items():
        structure = auto_as if structure == "auto" and auto_as else structure
        cfg = config.planning(structure)
        if structure == "auto":
            plans.append(_plan_auto(sites, budget, cfg, spectra, block_errors, size_errors, blast_errors))
        else:
            plans.append(_plan_family(sites, budget, cfg, spectra, block_errors, size_errors))
    if len(plans) == 1:
        return plans[0]
    order = {s.fqn: i for i, s in enumerate(targets)}
    layers = {k: lp for p in plans for k, lp in p.layers.items()}
    merged = Plan(dict(sorted(layers.items(), key=lambda kv: order[kv[0]])), budget, config.strategy,
                  dense_total=sum(p.dense_total for p in plans), dense=sorted(k for p in plans for k in p.dense))
    merged.notes.append("structure per layer from overrides: " + ", ".join(
        f"{structure} for {len(sites)} layers" for structure, sites in groups.items()))
    merged.notes += [n for p in plans for n in p.notes]
    note_budget_miss(merged)
    return merged


def _plan_auto(sites, budget, config, spectra, block_errors, size_errors, blast_errors) -> Plan:
    from .auto import choose_auto

    def make(structure: str) -> Plan:
        return _plan_family(sites, budget, config.planning(structure), spectra, block_errors, size_errors)

    adjustable = [s.fqn for s in sites if config.override_for(s.fqn).rank is None]
    target = round(budget * sum(s.params for s in sites))
    return choose_auto(make, adjustable, target, config, spectra, size_errors, blast_errors)


def _plan_family(targets, budget, config, spectra, block_errors, size_errors) -> Plan:
    """The plan of ``targets`` for ``config.structure``: "blast", a ladder family, or "auto" for one
    allocation over every family's error curves (:func:`.choice.choose_structures`)."""
    b_default = normalize_blocks(config.blocks)
    plan = Plan({}, budget, config.strategy, dense_total=sum(s.params for s in targets))
    fixed, adjustable = [], []
    for s in targets:
        o = config.override_for(s.fqn)
        want = normalize_blocks(o.blocks) if o.blocks is not None else b_default
        if o.blocks is None and block_errors and block_errors.get(s.fqn):
            want = min(block_errors[s.fqn].items(), key=lambda kv: kv[1])[0]
        blocks = (fit_blocks(s.out_features, want[0]), fit_blocks(s.in_features, want[1]))
        if o.blocks is not None and blocks != want:
            raise ValueError(f"overrides: blocks={want} do not divide {s.fqn} ({s.out_features}x{s.in_features})")
        rank = o.rank if o.rank is not None else rank_for(s.out_features, s.in_features, blocks, budget,
                                                          config.rank_multiple)
        lp = LayerPlan(s.out_features, s.in_features, rank, blocks, s.kind, s.bias, o.method,
                       factor_dtype=config.factor_dtype_for(s.fqn))
        BlastShape.make(s.out_features, s.in_features, rank, blocks)   # raises if it cannot be represented
        plan.layers[s.fqn] = lp
        (fixed if o.rank is not None else adjustable).append(s.fqn)
    target = round(budget * plan.dense_total)
    if adjustable and config.structure != DEFAULT_STRUCTURE:
        from .choice import choose_structures
        adjustable = choose_structures(plan, adjustable, target, config, spectra, size_errors)
    elif adjustable and config.strategy in ("error", "loss"):
        if spectra is None:
            raise ValueError(f"strategy={config.strategy!r} needs the layers' singular values (spectra=)")
        dense = _allocate_by_error(plan, adjustable, target, config.rank_multiple, spectra,
                                   relative=config.strategy == "error", allow_dense=config.allow_dense)
        for k in dense:
            del plan.layers[k]
            adjustable.remove(k)
        plan.dense = sorted(dense)
    if adjustable:
        _balance(plan, adjustable, target, config.rank_multiple)
    note_budget_miss(plan)
    return plan


def note_budget_miss(plan: Plan) -> None:
    """Say on the plan (once) when its kept fraction is more than 1% from its budget."""
    plan.notes = [n for n in plan.notes if not n.startswith("kept fraction")]
    if abs(plan.kept_fraction - plan.budget) > BUDGET_TOLERANCE * plan.budget:
        plan.notes.append(f"kept fraction {plan.kept_fraction:.4f} is more than 1% from the budget {plan.budget}: "
                          "fixed ranks or tiny layers leave too little to adjust")
