"""The structure plug-in interface: what the planner, the builder and the loader need to know about one
family of structured matrices, and the registry they look it up in by name.

Why a registry: the pipeline stages (plan, build, swap, io) stay the same for every family; a new
family is a new folder under ``blastfx/structures/`` whose ``__init__`` calls :func:`register`, and
:mod:`blastfx.structures` imports every such folder. The config's choices, the planner's sizes and
errors, the latency model, saving, loading and going back to dense all ask the registered
:class:`Structure`, so a family needs nothing outside its folder (only the latency model's presets
and ``measure`` name families: they time the library's own kernels, BLAST's and SS1's).

A structure has a *size knob*: what the plan sets per layer to trade parameters for accuracy (BLAST:
``(rank, blocks)``). ``knob`` reads it off a layer's plan entry, ``fields`` writes it back as plan
fields, and ``num_params`` is the cost model the planner counts with. Its *methods* are the ways of
fitting the structure to a dense weight, each declaring which calibration statistics (fields of
:class:`blastfx.statistics.LayerStats`) it reads, so that collection gathers exactly those.

Two kinds of families, by how they are sized:

* BLAST's rank is continuous (any multiple of ``rank_multiple``): the planner allocates it from the
  layers' spectra (:mod:`blastfx.plan.allocation`), its own code.
* A *ladder* family (``sizes`` set; SS1) has a few sizes per layer that step alike across layers (SS1's
  reductions 2, 4, 8, ...: each step halves every layer). The planner needs nothing else of it: a
  uniform plan puts every layer on the same step, a measured one walks each layer's (parameters,
  error) points from ``size_errors``, and ``structure="auto"`` weighs every ladder family against BLAST
  and dense, layer by layer.

A module of a structure has ``in_features``, ``out_features``, ``bias`` (a tensor or None) and
``to_dense()``, the (out, in) matrix it applies, as ``nn.Linear`` has its ``weight``: what going back
to dense and the training helpers read.
"""
from __future__ import annotations

import contextlib
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
    * ``fields(knob)``: the :class:`~blastfx.plan.LayerPlan` size fields of a knob (``knob`` read
      backwards), so the planner writes a layer of any family, and a probe of its tensors is made
      without naming the family (:mod:`blastfx.integrations`).
    * ``exact(out_features, in_features)``: the knob at which the structure represents every matrix of
      that shape (SS1: reduction 1; BLAST: full rank with one block): a ladder's no-error end where a
      layer may not stay dense, and the size a probe of the family's tensors is made at.
    * ``sizes(out_features, in_features)``: the knobs a ladder family's layer may take below
      ``exact``, most parameters first, stepping alike across layers (see the module docstring); None
      for a family sized continuously (BLAST). A ladder family also sets ``exact``, ``fields`` and
      ``size_errors``, which the planner reads of it.
    * ``size_errors(weight, stats, damping, budget)``: ``({knob: error}, energy)`` for one (out, in)
      dense ``weight``: the output error of the family's fit at each size it measures, and the error of
      the zero matrix, in the units every family is compared in, ``sum_n f_n ((W - W_hat) C (W -
      W_hat)^T)_nn`` (``C`` the input covariance of ``stats`` damped by ``damping``, the identity
      without one; ``f`` its output Fisher, ones without). Why: the measured strategies and
      ``structure="auto"`` compare sizes and families by error per parameter. ``budget`` (the kept
      fraction aimed at, or None) lets a family skip sizes no plan of that budget takes.
    * ``to_dense(module, dtype)``: the (out, in) matrix a built layer applies, in ``dtype`` (None: the
      layer's). Why a hook: BLAST multiplies its factors in float32 or float64 before rounding to a
      half-precision ``dtype``. None: ``module.to_dense()`` cast to ``dtype``.
    * ``decode_stages``: the kernel launches one decode call of a layer runs (BLAST: two, x·V with the
      s-mix then w·Uᵀ): what the latency model charges a fixed cost for (:mod:`blastfx.plan.speed`).
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
    fields: Callable | None = None
    exact: Callable | None = None
    sizes: Callable | None = None
    size_errors: Callable | None = None
    to_dense: Callable | None = None
    decode_stages: int = 1

    def __post_init__(self):
        if self.default_method not in self.methods:
            raise ValueError(f"structure {self.name!r}: default_method {self.default_method!r} is not one of its "
                             f"methods {tuple(self.methods)}")
        if self.sizes is not None:
            lacking = [k for k in ("fields", "exact", "size_errors") if getattr(self, k) is None]
            if lacking:
                raise ValueError(f"structure {self.name!r}: a family with sizes (a ladder) needs {', '.join(lacking)} "
                                 "too: the planner reads them")
        object.__setattr__(self, "methods", MappingProxyType(dict(self.methods)))

    @property
    def ladder(self) -> bool:
        """Whether the planner sizes it by its ``sizes`` (else by BLAST's rank allocation)."""
        return self.sizes is not None

    def method(self, name: str | None) -> Method:
        """The named method (``None``: the default); ``ValueError`` naming the choices otherwise."""
        name = self.default_method if name is None else name
        if name not in self.methods:
            raise ValueError(f"method must be one of {tuple(self.methods)} for structure {self.name!r}, got {name!r}")
        return self.methods[name]

    def params(self, layer_plan) -> int:
        """Parameters of a layer planned as ``layer_plan``."""
        return self.num_params(layer_plan.out_features, layer_plan.in_features, self.knob(layer_plan))

    def matrix(self, module, dtype=None):
        """The (out, in) matrix ``module`` applies, in ``dtype`` (None: its own)."""
        if self.to_dense is not None:
            return self.to_dense(module, dtype)
        W = module.to_dense()
        return W if dtype is None else W.to(dtype)


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


@contextlib.contextmanager
def registered(structure: Structure):
    """``structure`` registered inside the ``with`` block and forgotten after it: a family tried out
    (a test, a notebook) without leaving it in the registry every later config and plan sees."""
    fresh = structure.name not in _REGISTRY
    register(structure)
    try:
        yield structure
    finally:
        if fresh:
            del _REGISTRY[structure.name]


def get(name: str) -> Structure:
    """The registered structure ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"structure must be one of {names()}, got {name!r}") from None


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def ladders() -> tuple[Structure, ...]:
    """The registered ladder families (``sizes`` set), in registration order: what ``structure="auto"``
    weighs against BLAST and dense."""
    return tuple(s for s in _REGISTRY.values() if s.ladder)


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
