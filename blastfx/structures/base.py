"""The structure plug-in interface: what the planner, the builder and the loader need to know about one
family of structured matrices, and the registry they look it up in by name.

Why a registry: the pipeline stages (plan, build, swap, io) stay the same for every family; a new
family is a new folder under ``blastfx/structures/`` whose ``__init__`` calls :func:`register`, and
:mod:`blastfx.structures` imports every such folder.

A structure has a *size knob*: what the plan sets per layer to trade parameters for accuracy (BLAST:
``(rank, blocks)``). ``knob`` reads it off a layer's plan entry, and ``num_params`` is the cost model
the planner counts with. Its *methods* are the ways of fitting the structure to a dense weight, each
declaring which calibration statistics (fields of :class:`blastfx.statistics.LayerStats`) it reads,
so that collection gathers exactly those.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

STATISTICS = ("covariance", "output_fisher")      # what a method may declare it reads


@dataclass(frozen=True, eq=False)
class Method:
    """One way of fitting a structure to a dense weight.

    ``fit(problem)``: the structure's own call signature (BLAST: see
    :mod:`blastfx.structures.blast.factorize.methods`). ``uses``: the statistics it reads when they are
    given (a subset of :data:`STATISTICS`); a method that uses none fits the weight alone.
    ``defaults``: its default options (e.g. iteration counts), for documentation and for the fit."""
    name: str
    fit: Callable
    uses: frozenset = frozenset()
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.uses) - set(STATISTICS)
        if unknown:
            raise ValueError(f"method {self.name!r}: uses {sorted(unknown)} are not statistics {STATISTICS}")
        object.__setattr__(self, "uses", frozenset(self.uses))
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    @property
    def calibrated(self) -> bool:
        """Whether calibration data changes what it fits (it reads the input covariance)."""
        return "covariance" in self.uses


@dataclass(frozen=True)
class Structure:
    """A family of structured matrices, as the pipeline sees it.

    * ``module_type``: the ``nn.Module`` class of a compressed layer.
    * ``knob(layer_plan)``: the layer's size knob; ``num_params(out_features, in_features, knob)``: the
      parameters a layer of that size stores (the planner's cost model).
    * ``build(weights, biases, stats, layer_plan, method, options)``: modules fitted to ``weights``
      (B, out, in), one per weight, each with its bias (or None); ``stats`` holds one
      :class:`~blastfx.statistics.LayerStats` per weight; ``method`` is a name in ``methods``;
      ``options`` a :class:`blastfx.build.BuildOptions`.
    * ``empty(layer_plan, bias, device, dtype)``: an uninitialized module of the planned size, for a
      checkpoint to be loaded into; ``random(...)``: the same, randomly initialized (training from scratch).
    * ``methods``: name -> :class:`Method`; ``default_method`` one of them.
    * ``size_of(module)``: the :class:`~blastfx.plan.LayerPlan` size fields of a built module (what a
      save records of a layer it finds in a model).
    * ``plan_fields``: the :class:`~blastfx.plan.LayerPlan` size fields its knob reads (BLAST: rank and
      blocks; SS1: reduction); a plan giving it another structure's size field is refused. None: any.
    * ``loaded(module)``: called once a loader put a checkpoint's tensors into an ``empty`` module;
      a loader may set tensors without ``load_state_dict`` (transformers does), so whatever a module
      derives from its tensors is derived again here.
    """
    name: str
    module_type: type
    knob: Callable
    num_params: Callable
    build: Callable
    empty: Callable
    random: Callable
    methods: Mapping[str, Method]
    default_method: str
    size_of: Callable | None = None
    loaded: Callable | None = None
    plan_fields: tuple | None = None

    def __post_init__(self):
        if self.default_method not in self.methods:
            raise ValueError(f"structure {self.name!r}: default_method {self.default_method!r} is not one of its "
                             f"methods {tuple(self.methods)}")
        object.__setattr__(self, "methods", MappingProxyType(dict(self.methods)))

    def method(self, name: str | None) -> Method:
        """The named method (``None``: the default); ``ValueError`` naming the choices otherwise."""
        name = self.default_method if name is None else name
        if name not in self.methods:
            raise ValueError(f"method must be one of {tuple(self.methods)} for structure {self.name!r}, got {name!r}")
        return self.methods[name]

    def params(self, layer_plan) -> int:
        """Parameters of a layer planned as ``layer_plan``."""
        return self.num_params(layer_plan.out_features, layer_plan.in_features, self.knob(layer_plan))


_REGISTRY: dict[str, Structure] = {}


def register(structure: Structure) -> Structure:
    """Make ``structure`` known by its name; a second structure of the same name is an error."""
    if not isinstance(structure, Structure):
        raise TypeError(f"register takes a Structure, got {type(structure).__name__}")
    known = _REGISTRY.get(structure.name)
    if known is not None and known is not structure:
        raise ValueError(f"a structure named {structure.name!r} is already registered")
    _REGISTRY[structure.name] = structure
    return structure


def get(name: str) -> Structure:
    """The registered structure ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"structure must be one of {names()}, got {name!r}") from None


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def method_names() -> tuple[str, ...]:
    """Every method name of every registered structure (what a config may ask for)."""
    return tuple(dict.fromkeys(m for s in _REGISTRY.values() for m in s.methods))


def of_module(module) -> Structure | None:
    """The registered structure whose layers ``module`` is one of (None for any other module)."""
    for structure in _REGISTRY.values():
        if isinstance(module, structure.module_type):
            return structure
    return None


def module_types() -> tuple[type, ...]:
    """The module classes of all registered structures (what counts as a compressed layer)."""
    return tuple(s.module_type for s in _REGISTRY.values())
