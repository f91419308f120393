"""The planner: (analysis, budget, config[, spectra]) -> Plan of per-layer (b_out, b_in, rank).

Pure: no weights are read or written here. The "error" and "loss" strategies take each layer's
singular values (computed by the caller) as numbers. A Plan is inspectable, editable, JSON-serializable, and can be
passed back to :func:`blastfx.compress`.
"""
from __future__ import annotations

import heapq
import json
from dataclasses import asdict, dataclass, field

import torch

from .config import BlastConfig
from .layout import BlastShape, normalize_blocks

PLAN_FORMAT = 1
BUDGET_TOLERANCE = 0.01          # achieved kept fraction within +-1% (relative) of the budget


@dataclass
class LayerPlan:
    out_features: int
    in_features: int
    rank: int
    blocks: tuple[int, int]
    kind: str = "linear"              # "linear" | "conv1d"
    bias: bool = False
    method: str | None = None         # None: the config's

    def __post_init__(self):
        self.blocks = normalize_blocks(self.blocks)

    @property
    def shape(self) -> BlastShape:
        return BlastShape.make(self.out_features, self.in_features, self.rank, self.blocks, allow_larger=True)

    @property
    def params(self) -> int:
        return self.shape.num_params

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features


@dataclass
class Plan:
    layers: dict[str, LayerPlan]
    budget: float
    strategy: str = "uniform"
    dense_total: int = 0               # dense parameters of all compressible layers (targets or not)
    notes: list[str] = field(default_factory=list)

    @property
    def kept_params(self) -> int:
        """Parameters of the compressible layers after compression (dense ones counted whole)."""
        blast = sum(lp.params for lp in self.layers.values())
        return self.dense_total - sum(lp.dense_params for lp in self.layers.values()) + blast

    @property
    def kept_fraction(self) -> float:
        return self.kept_params / self.dense_total if self.dense_total else 1.0

    def summary(self) -> str:
        by_shape: dict[tuple, list[str]] = {}
        for name, lp in self.layers.items():
            by_shape.setdefault((lp.out_features, lp.in_features, lp.blocks, lp.rank), []).append(name)
        lines = [f"BLAST plan ({self.strategy}): {len(self.layers)} layers, budget {self.budget:.4f}, "
                 f"kept {self.kept_params}/{self.dense_total} = {self.kept_fraction:.4f}"]
        for (m, n, b, r), names in sorted(by_shape.items(), key=lambda kv: -len(kv[1])):
            frac = BlastShape.make(m, n, r, b, allow_larger=True).num_params / (m * n)
            lines.append(f"  {len(names):4d} x {m}x{n}  blocks={b}  rank={r}  ({frac:.1%} of dense)  e.g. {names[0]}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    __str__ = summary

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "budget": self.budget, "strategy": self.strategy,
                "dense_total": self.dense_total, "notes": self.notes,
                "layers": {k: asdict(v) for k, v in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a blastfx plan of format {PLAN_FORMAT}: format={d.get('format') if isinstance(d, dict) else d!r}")
        try:
            layers = {k: LayerPlan(**{**v, "blocks": tuple(v["blocks"])}) for k, v in d["layers"].items()}
            return cls(layers, float(d["budget"]), d["strategy"], int(d["dense_total"]), list(d.get("notes", [])))
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed blastfx plan: {err}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise ValueError(f"blastfx plan is not valid JSON: {err}") from None


def check_budget(budget) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < 1:
        raise ValueError(f"budget must be a number in (0, 1): the fraction of compressible parameters kept; got {budget!r}")
    return float(budget)


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
    return max(multiple, multiple * round(lp.params / per_rank / multiple))


def _params_per_rank(m, n, blocks) -> int:
    """r(m + n + b_out * b_in) parameters: what one unit of rank costs."""
    return m + n + blocks[0] * blocks[1]


def _rank_for(m, n, blocks, fraction, multiple):
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


def _allocate_by_error(plan: Plan, adjustable: list[str], target: int, multiple: int, spectra,
                       relative: bool = True) -> None:
    """Greedy: give the next rank step to the layer whose squared error (SVD tail energy at that
    rank, an upper bound for BLAST) drops most per parameter. Optimal for convex error curves.
    ``relative``: each layer's error as a fraction of its own ("error"); otherwise as given, for
    spectra already in common units (the loss-weighted ones of strategy "loss")."""
    energy = {}
    for k in adjustable:
        s2 = spectra[k].double().pow(2)
        tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])
        energy[k] = tail / s2.sum().clamp_min(1e-300) if relative else tail
    for k in adjustable:
        plan.layers[k].rank = multiple

    def gain(k):
        lp = plan.layers[k]
        tail = energy[k]
        r = min(lp.rank, len(tail) - 1)
        nxt = min(lp.rank + multiple, len(tail) - 1)
        return (tail[r] - tail[nxt]).item() / _layer_step_cost(lp, multiple)

    heap = [(-gain(k), k) for k in adjustable]
    heapq.heapify(heap)
    while heap:
        g, k = heapq.heappop(heap)
        lp = plan.layers[k]
        cost = _layer_step_cost(lp, multiple)
        if plan.kept_params + cost > target or lp.params + cost > lp.dense_params:
            continue
        lp.rank += multiple
        heapq.heappush(heap, (-gain(k), k))


def make_plan(analysis, budget: float, config: BlastConfig | None = None, spectra=None, block_errors=None) -> Plan:
    """Per-layer ranks and block counts so that the compressible layers keep ``budget`` of their
    parameters (within 1%). ``spectra``: {fqn: singular values}, needed by strategy="error".
    ``block_errors``: {fqn: {(b_out, b_in): measured error}}; a layer without a blocks override takes
    the block count of least error (``config.block_choices``, measured by ``blastfx.sensitivity``)."""
    config = config or BlastConfig()
    budget = check_budget(budget)
    sites = [s for s in analysis if s.substitutable]
    config.check_patterns([s.fqn for s in sites])
    b_default = normalize_blocks(config.blocks)
    targets = [s for s in sites if config.selects(s.fqn, s.repeated, min(s.in_features, s.out_features))]
    if not targets:
        raise ValueError("no linear layer is selected for compression: check include/exclude/min_features "
                         f"(the model has {len(sites)} linear layers)")
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
        rank = o.rank if o.rank is not None else _rank_for(s.out_features, s.in_features, blocks, budget,
                                                           config.rank_multiple)
        lp = LayerPlan(s.out_features, s.in_features, rank, blocks, s.kind, s.bias, o.method)
        BlastShape.make(s.out_features, s.in_features, rank, blocks)   # raises if it cannot be represented
        plan.layers[s.fqn] = lp
        (fixed if o.rank is not None else adjustable).append(s.fqn)
    target = round(budget * plan.dense_total)
    if adjustable and config.strategy in ("error", "loss"):
        if spectra is None:
            raise ValueError(f"strategy={config.strategy!r} needs the layers' singular values (spectra=)")
        _allocate_by_error(plan, adjustable, target, config.rank_multiple, spectra,
                           relative=config.strategy == "error")
    if adjustable:
        _balance(plan, adjustable, target, config.rank_multiple)
    if abs(plan.kept_fraction - budget) > BUDGET_TOLERANCE * budget:
        plan.notes.append(f"kept fraction {plan.kept_fraction:.4f} is more than 1% from the budget {budget}: "
                          "fixed ranks or tiny layers leave too little to adjust")
    return plan
