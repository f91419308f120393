"""A Plan: per layer, the structure and its size (BLAST: (b_out, b_in) blocks and a rank; another
family: the fields its knob reads), with the budget it was made for. Inspectable, editable,
JSON-serializable, and can be passed back to :func:`blastfx.compress`. Made by :mod:`.allocation`.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field, fields

from .. import structures
from ..structures.blast.layout import BlastShape, full_rank, normalize_blocks, planned_shape

PLAN_FORMAT = 1
KINDS = ("linear", "conv1d")
DEFAULT_STRUCTURE = "blast"      # what the planner makes, and what a layer plan without "structure" is


@dataclass
class LayerPlan:
    """One planned layer. Each structure reads its own size knob from these fields (its
    ``plan_fields``: BLAST ``rank`` and ``blocks``, SS1 ``reduction``); the fields it does not read are
    None."""
    out_features: int
    in_features: int
    rank: int | None
    blocks: tuple[int, int] | None
    kind: str = "linear"              # "linear" | "conv1d"
    bias: bool = False
    method: str | None = None         # None: the config's
    structure: str = DEFAULT_STRUCTURE  # a name in blastfx.structures
    reduction: int | None = None      # a ladder family's size step (SS1: how many input tiles share a weight tile)
    factor_dtype: str | None = None   # BLAST: factors stored quantized ("int8", ...); None: the model's dtype

    def __post_init__(self):
        if self.blocks is not None:
            self.blocks = normalize_blocks(self.blocks)

    @classmethod
    def of(cls, structure: str, out_features: int, in_features: int, size: dict, **kw) -> "LayerPlan":
        """A layer of ``structure`` with the plan fields ``size`` (a structure's ``fields(knob)`` or
        ``size_of(module)``), the size fields it does not name null."""
        return cls(out_features, in_features, **{"rank": None, "blocks": None, **size}, structure=structure, **kw)

    @property
    def shape(self) -> BlastShape:
        """The BLAST geometry of the layer; ``ValueError`` if it cannot be represented, the rank is
        beyond :func:`~blastfx.structures.blast.layout.full_rank`, or the layer is not BLAST."""
        if self.structure != DEFAULT_STRUCTURE:
            raise ValueError(f"a {self.structure!r} layer has no BLAST shape")
        return planned_shape(self.out_features, self.in_features, self.rank, self.blocks)

    @property
    def params(self) -> int:
        """Parameters of the layer as planned: its structure's cost model."""
        return structures.get(self.structure).params(self)

    @classmethod
    def from_dict(cls, d, where: str = "layer") -> "LayerPlan":
        """A layer plan from its JSON object, checked field by field (``ValueError`` naming ``where``
        and the field): positive integer sizes, blocks that fit, a rank within :func:`full_rank`."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: must be an object, got {d!r}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        missing = sorted({f.name for f in fields(cls) if f.default is MISSING} - set(d))
        if unknown:
            raise ValueError(f"{where}: unknown field {unknown[0]!r} (fields: {sorted(names)})")
        if missing:
            raise ValueError(f"{where}: field {missing[0]!r} is missing")
        if d.get("factor_dtype") is not None:
            from ..structures.blast.quant import formats
            try:
                formats.check_name(d["factor_dtype"])
            except ValueError as err:
                raise ValueError(f"{where}.factor_dtype: {err}") from None
            if d.get("structure", DEFAULT_STRUCTURE) != DEFAULT_STRUCTURE:
                raise ValueError(f"{where}.factor_dtype: quantized factors are a BLAST format; must be null for a "
                                 f"{d['structure']!r} layer, got {d['factor_dtype']!r}")
        if d.get("structure", DEFAULT_STRUCTURE) != DEFAULT_STRUCTURE:
            return _other_structure(cls, d, where)
        if d.get("reduction") is not None:
            raise ValueError(f"{where}.reduction: must be null for a BLAST layer, got {d['reduction']!r}")
        for key in ("out_features", "in_features", "rank"):
            value = d[key]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{where}.{key}: must be a positive integer, got {value!r}")
        if not isinstance(d["blocks"], (list, tuple)):
            raise ValueError(f"{where}.blocks: must be a pair [b_out, b_in], got {d['blocks']!r}")
        if d.get("kind", "linear") not in KINDS:
            raise ValueError(f"{where}.kind: must be one of {KINDS}, got {d.get('kind')!r}")
        if not isinstance(d.get("bias", False), bool):
            raise ValueError(f"{where}.bias: must be true or false, got {d.get('bias')!r}")
        try:
            structure = structures.get(d.get("structure", DEFAULT_STRUCTURE))
        except ValueError as err:
            raise ValueError(f"{where}.structure: {err}") from None
        if d.get("method") is not None and d.get("method") not in structure.methods:
            raise ValueError(f"{where}.method: must be null or one of {tuple(structure.methods)}, "
                             f"got {d.get('method')!r}")
        try:
            lp = cls(**{**d, "blocks": tuple(d["blocks"])})
            full_rank(lp.out_features, lp.in_features, lp.blocks)
        except ValueError as err:
            raise ValueError(f"{where}.blocks: {err}") from None
        try:
            lp.params  # noqa: B018 -- bounds the size knob (BLAST: the rank)
        except ValueError as err:
            raise ValueError(f"{where}.rank: {err}") from None
        return lp

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features


def _other_structure(cls, d: dict, where: str) -> LayerPlan:
    """A layer plan of a structure other than BLAST: the size fields it does not read null, its own
    knob bounded by the structure's cost model (SS1: ``reduction`` a power of two the layer's input
    tiles allow)."""
    try:
        structure = structures.get(d["structure"])
    except ValueError as err:
        raise ValueError(f"{where}.structure: {err}") from None
    for key in ("out_features", "in_features"):
        value = d[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{where}.{key}: must be a positive integer, got {value!r}")
    if structure.plan_fields is not None:
        for key in ("rank", "blocks", "reduction"):
            if key not in structure.plan_fields and d.get(key) is not None:
                raise ValueError(f"{where}.{key}: must be null for a {structure.name!r} layer, got {d[key]!r}")
    if d.get("kind", "linear") not in KINDS:
        raise ValueError(f"{where}.kind: must be one of {KINDS}, got {d.get('kind')!r}")
    if not isinstance(d.get("bias", False), bool):
        raise ValueError(f"{where}.bias: must be true or false, got {d.get('bias')!r}")
    if d.get("method") is not None and d.get("method") not in structure.methods:
        raise ValueError(f"{where}.method: must be null or one of {tuple(structure.methods)}, got {d.get('method')!r}")
    for key in ("rank", "reduction"):
        value = d.get(key)
        required = structure.plan_fields is not None and key in structure.plan_fields
        if (value is not None or required) and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{where}.{key}: must be a positive integer, got {value!r}")
    if d.get("blocks") is not None and not isinstance(d["blocks"], (list, tuple)):
        raise ValueError(f"{where}.blocks: must be a pair [b_out, b_in], got {d['blocks']!r}")
    try:
        lp = cls(**{**d, "blocks": None if d.get("blocks") is None else tuple(d["blocks"])})
    except ValueError as err:
        raise ValueError(f"{where}.blocks: {err}") from None
    knob = structure.plan_fields[0] if structure.plan_fields else "structure"
    try:
        lp.params  # noqa: B018 -- bounds the size knob
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}.{knob}: {err}") from None
    return lp


@dataclass
class Plan:
    layers: dict[str, LayerPlan]
    budget: float
    strategy: str = "uniform"
    dense_total: int = 0               # dense parameters of all compressible layers (targets or not)
    notes: list[str] = field(default_factory=list)
    dense: list[str] = field(default_factory=list)   # targets the allocation kept dense (not in layers)
    objective: str | None = None       # what compress fitted: "weight", "output" or "loss"; None: nothing
                                       # (init="random") or not recorded

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
            by_shape.setdefault((lp.out_features, lp.in_features, lp.structure, lp.blocks, lp.rank, lp.reduction,
                                 lp.factor_dtype), []).append(name)
        kinds = sorted({lp.structure for lp in self.layers.values()}) or [DEFAULT_STRUCTURE]
        codes = Counter(lp.factor_dtype for lp in self.layers.values() if lp.factor_dtype is not None)
        lines = [f"{'/'.join(k.upper() for k in kinds)} plan ({self.strategy}): {len(self.layers)} layers, "
                 f"budget {self.budget:.4f}, kept {self.kept_params}/{self.dense_total} = {self.kept_fraction:.4f}"
                 + (f", objective {self.objective}" if self.objective else "")
                 + "".join(f"; {count} with {fmt} factors" for fmt, count in sorted(codes.items()))]
        for (m, n, s, b, r, _, fmt), names in sorted(by_shape.items(), key=lambda kv: -len(kv[1])):
            lp = self.layers[names[0]]
            frac = lp.params / (m * n)
            size = f"blocks={b}  rank={r}" if s == DEFAULT_STRUCTURE else _size_text(lp)
            size += f"  {fmt} codes" if fmt is not None else ""
            lines.append(f"  {len(names):4d} x {m}x{n}  {size}  ({frac:.1%} of dense)  e.g. {names[0]}")
        if self.dense:
            lines.append(f"  {len(self.dense):4d} kept dense by the allocation, e.g. {self.dense[0]}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    __str__ = summary

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "budget": self.budget, "strategy": self.strategy,
                "dense_total": self.dense_total, "notes": self.notes, "dense": self.dense,
                "objective": self.objective, "layers": {k: asdict(v) for k, v in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: dict, source=None) -> "Plan":
        """The plan ``d`` describes, every field checked before anything is built from it: a ``ValueError``
        names ``source`` (the file it came from, if any) and the bad field."""
        where = f"{source}: " if source is not None else ""

        def bad(name, message):
            raise ValueError(f"{where}blastfx plan field {name}: {message}")

        if not isinstance(d, dict):
            raise ValueError(f"{where}a blastfx plan must be a JSON object, got {type(d).__name__}")
        if d.get("format") != PLAN_FORMAT:
            bad("'format'", f"this blastfx reads plan format {PLAN_FORMAT}, got {d.get('format')!r}")
        unknown = sorted(set(d) - _PLAN_FIELDS)
        if unknown:
            bad(repr(unknown[0]), f"unknown (fields: {sorted(_PLAN_FIELDS)})")
        for key in ("layers", "budget", "strategy", "dense_total"):
            if key not in d:
                bad(repr(key), "missing")
        budget = d["budget"]
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
            bad("'budget'", f"must be a number, got {budget!r}")
        if not isinstance(d["strategy"], str):
            bad("'strategy'", f"must be a string, got {d['strategy']!r}")
        if isinstance(d["dense_total"], bool) or not isinstance(d["dense_total"], int) or d["dense_total"] < 0:
            bad("'dense_total'", f"must be a non-negative integer, got {d['dense_total']!r}")
        for key in ("notes", "dense"):
            value = d.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                bad(repr(key), f"must be a list of strings, got {value!r}")
        if not isinstance(d["layers"], dict):
            bad("'layers'", f"must be an object of layer name -> layer plan, got {type(d['layers']).__name__}")
        layers = {name: LayerPlan.from_dict(v, f"{where}blastfx plan field layers[{name!r}]")
                  for name, v in d["layers"].items()}
        if d.get("objective") is not None and not isinstance(d["objective"], str):
            bad("'objective'", f"must be a string or null, got {d['objective']!r}")
        return cls(layers, float(budget), d["strategy"], d["dense_total"], list(d.get("notes", [])),
                   list(d.get("dense", [])), d.get("objective"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str, source=None) -> "Plan":
        """Parse :meth:`to_json`'s text; ``source`` (a file name) is named in every error."""
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{f'{source}: ' if source is not None else ''}blastfx plan is not valid JSON: "
                             f"{err}") from None
        return cls.from_dict(d, source)


def _size_text(lp: LayerPlan) -> str:
    """``"<structure>  <field>=<value> ..."``: a layer's size as its structure's plan fields name it."""
    structure = structures.get(lp.structure)
    fields = structure.fields(structure.knob(lp)) if structure.fields else {"size": structure.knob(lp)}
    return "  ".join([lp.structure] + [f"{k}={v}" for k, v in fields.items()])


_PLAN_FIELDS = {"format", "budget", "strategy", "dense_total", "notes", "dense", "objective", "layers"}
