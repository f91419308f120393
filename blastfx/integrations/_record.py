"""The quantization config both transformers and diffusers save for a compressed model: the plan
(which layers are BLAST, with which blocks and rank) and the blastfx version that wrote it. Each
library gets a subclass on its own ``QuantizationConfigMixin``; this is what they share."""
from __future__ import annotations

import copy

from .._version import __version__
from .. import structures
from ..structures.blast.nn import BlastLinear
from ..plan import Plan

QUANT_METHOD = "blastfx"
FIELDS = ("quant_method", "plan", "blastfx_version")
SOURCE = "config.json quantization_config (blastfx)"


class PlanRecord:
    """The plan as a quantization config: validated on construction, JSON-ready in ``to_dict``."""

    quant_method = QUANT_METHOD

    def __init__(self, plan, blastfx_version: str | None = None, quant_method: str = QUANT_METHOD, **unknown):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"{type(self).__name__}: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if unknown:
            raise ValueError(f"quantization_config (blastfx): unknown field {sorted(unknown)[0]!r} (fields: "
                             f"{', '.join(FIELDS)}); written by a newer blastfx?")
        plan = plan.to_dict() if isinstance(plan, Plan) else copy.deepcopy(plan)
        Plan.from_dict(plan, SOURCE)          # checked field by field
        self.quant_method = type(self).quant_method       # in __dict__ too: some code reads dict(config)
        self.plan = plan
        self.blastfx_version = blastfx_version or __version__

    def to_plan(self) -> Plan:
        return Plan.from_dict(self.plan, SOURCE)

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, "plan": copy.deepcopy(self.plan), "blastfx_version": self.blastfx_version}

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def refresh(self, model) -> None:
        """Record the BLAST layers ``model`` has now (a second compress, a LoRA merge, layers set by hand),
        not the plan it was loaded or compressed with; the padding is checked as a save does."""
        from ..io import model_plan

        plan = model_plan(model)
        for name, m in model.named_modules():
            if isinstance(m, BlastLinear):
                m.check_padding(f"layer {name!r}")
        self.plan = plan.to_dict()
        self.blastfx_version = __version__


def check_checkpoint(plan: Plan, keys, source: str) -> None:
    """``ValueError`` unless the checkpoint's tensor names ``keys`` hold the factors of exactly the plan's
    layers (checked before anything is loaded, so a mismatch never ends as random weights)."""
    keys = set(keys)
    problems = []
    marks_of = {}                       # one probe layer per (structure, format), not one per planned layer
    for name, lp in plan.layers.items():
        key = (lp.structure, lp.factor_dtype)
        if key not in marks_of:
            marks_of[key] = _marks(*key)
        marks = marks_of[key]
        absent = [f"{name}.{p}" for p in marks if f"{name}.{p}" not in keys]
        if absent:
            dense = f"; it holds a dense {name}.weight instead" if f"{name}.weight" in keys and "weight" not in marks \
                else ""
            problems.append(f"the plan makes {name!r} a{'n' if lp.structure[0] in 'aeiosx' else ''} "
                            f"{lp.structure.upper()} layer but the checkpoint has no {absent[0]}{dense}")
    for structure in structures.names():
        marks = _marks(structure)
        stray = sorted({k.rsplit(".", 1)[0] for k in keys if k.endswith(tuple(f".{p}" for p in marks))}
                       - set(plan.layers))
        stray = [s for s in stray if all(f"{s}.{p}" in keys for p in marks)]
        if stray:
            problems.append(f"the checkpoint has {structure.upper()} tensors for {stray[0]!r}, a layer the plan "
                            "does not list")
    if problems:
        raise ValueError(f"{source}: the weights do not match the blastfx plan in config.json: "
                         + "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))


def _marks(structure: str, factor_dtype: str | None = None) -> tuple[str, ...]:
    """The tensors only a layer of ``structure`` stores (BLAST: U, S, V, and with quantized factors their
    scales; SS1: weight and ss1_layout), read off an empty 64x64 layer at the structure's exact size and
    ``factor_dtype`` on the meta device, so a new structure or format needs no entry here (one that
    names no exact size marks nothing)."""
    from ..plan import LayerPlan

    s = structures.get(structure)
    if s.exact is None or s.fields is None:
        return ()
    probe = LayerPlan.of(structure, 64, 64, s.fields(s.exact(64, 64)), factor_dtype=factor_dtype)
    names = tuple(s.empty(probe, bias=False, device="meta").state_dict())
    own = tuple(n for n in names if n != "weight")
    return own + (("weight",) if "weight" in names and own else ())


def build_planned_layers(model, plan: Plan, source: str) -> None:
    """Swap the plan's layers of ``model`` (built on the meta device by the library) for empty BLAST
    layers on the same device: nothing dense is allocated for them."""
    from ..build import empty_layers
    from ..plan import check_plan_fits
    from ..swap import swap_modules

    try:
        check_plan_fits(model, plan)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    swap_modules(model, empty_layers(model, plan))


def finish_load(model, plan: Plan, source: str) -> None:
    """After the factors are loaded: padding checked, the plan recorded, casting allowed, the card bound."""
    from ..swap import PLAN_ATTR
    from . import bind_model_card

    for name, m in model.named_modules():
        structure = structures.of_module(m)
        if structure is not None and structure.loaded is not None and name in plan.layers:
            structure.loaded(m)                 # e.g. SS1: the seed and shift table from its tensors
        if isinstance(m, BlastLinear) and m.U.device.type != "meta":
            m.check_padding(f"{source}, layer {name!r}")
    setattr(model, PLAN_ATTR, plan)
    # the factors are ordinary float parameters: .to(dtype), .half() and training work as on a dense model
    model.is_quantized = False
    bind_model_card(model)
