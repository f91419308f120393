"""User-facing configuration for :func:`blastfx.compress`, in the shape of torchao's ``quantize_``:
one config object with defaults, and per-module overrides keyed by FQN patterns (fnmatch syntax,
e.g. ``"*.mlp.*"`` or ``"model.layers.0.self_attn.q_proj"``).

Every field is checked when the config is made, so a bad value fails here, naming the field, and
never halfway through a compression.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from numbers import Integral, Real

from .structures.base import method_names, names as structure_names
from .structures.blast.factorize import precision as fit_precisions
from .structures.blast.layout import normalize_blocks
from .structures.blast.quant import formats as factor_formats

STRATEGIES = ("auto", "uniform", "error", "loss")
OBJECTIVES = ("auto", "output", "loss")
INITS = ("factorize", "random")

# C + damping * mean(diag C) * I for every input covariance C (GPTQ's relative ridge): the whitening,
# the planner's spectra and sequential calibration's corrected targets all use this one default.
CALIBRATION_DAMPING = 0.01
# The loss-aware objective adds this fraction of a layer's mean output Fisher to every output, so no
# output is left unfitted because its gradient happened to be tiny on the calibration batches.
FISHER_FLOOR = 0.01
# sequential="auto" compresses block by block (error feedback, reconstruction) at kept fractions up to
# this: where it measurably pays for its compress time (see BlastConfig's docstring).
SEQUENTIAL_BELOW = 0.6


def structure_choices() -> tuple[str, ...]:
    """What ``structure=`` may name: every registered structure (:mod:`blastfx.structures`), or
    ``"auto"`` (per layer the best of them, :mod:`blastfx.plan.auto`). Read at each check, not at
    import, so a family registered later is a choice too."""
    return structure_names() + ("auto",)


def _check_int(name: str, value, minimum: int = 1, optional: bool = False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}{' or None' if optional else ''}, got {value!r}")
    return int(value)


def _check_float(name: str, value, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) \
            or (value <= 0 if positive else value < 0):
        kind = "a positive" if positive else "a non-negative"
        raise ValueError(f"{name} must be {kind} finite number, got {value!r}")
    return float(value)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _check_compute_device(value, sequential: bool, init: str) -> str | None:
    """A device string (or torch.device) naming an available device that computes, as its str; streaming
    walks the model block by block, which sequential calibration of fitted layers does."""
    if value is None:
        return None
    import torch

    if not isinstance(value, (str, torch.device)):
        raise ValueError(f"compute_device must be a device string such as 'cuda' or 'cuda:1', got {value!r}")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"compute_device {value!r} is not a device torch knows (e.g. 'cuda', 'cuda:1', 'cpu')") from None
    if device.type == "meta":
        raise ValueError("compute_device 'meta' holds no values and cannot compute; name the accelerator, e.g. 'cuda'")
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if backend is not None and hasattr(backend, "is_available"):
        count = backend.device_count() if hasattr(backend, "device_count") else 1
        if not backend.is_available() or (device.index is not None and device.index >= count):
            raise ValueError(f"compute_device {str(device)!r} is not available here "
                             f"({count if backend.is_available() else 0} {device.type} device(s))")
    if sequential is False or init != "factorize":
        raise ValueError("compute_device streams the model block by block through sequential calibration: leave "
                         "sequential at 'auto' or set it True (with init='factorize')")
    return str(device)


def _check_patterns(name: str, value) -> tuple[str, ...]:
    """One pattern (a str) or several; a str is never split into its characters."""
    patterns = (value,) if isinstance(value, str) else value
    try:
        patterns = tuple(patterns)
    except TypeError:
        raise ValueError(f"{name} must be an FQN pattern or a sequence of them, got {value!r}") from None
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise ValueError(f"{name} patterns must be non-empty strings, got {p!r} in {value!r}")
    return patterns


@dataclass
class LayerOverride:
    """Per-module settings; ``None`` means "use the config's default"."""
    rank: int | None = None
    blocks: int | tuple[int, int] | None = None
    skip: bool = False
    method: str | None = None
    factor_dtype: str | None = None     # "int8", ...; "model" keeps this layer's factors in the model's dtype
    structure: str | None = None        # a registered structure or "auto" for the matched layers; rank and blocks
                                        # size BLAST

    def __post_init__(self):
        try:
            factor_formats.check_name(self.factor_dtype, allow_model=True)
        except ValueError as err:
            raise ValueError(f"{err} (or {factor_formats.MODEL!r}: the model's dtype)") from None
        self.rank = _check_int("rank", self.rank, optional=True)
        if self.blocks is not None:
            normalize_blocks(self.blocks)
        _check_bool("skip", self.skip)
        if self.method is not None and self.method not in method_names():
            raise ValueError(f"method must be one of {method_names()}, got {self.method!r}")
        if self.structure is not None and self.structure not in structure_choices():
            raise ValueError(f"structure must be one of {structure_choices()} or None, got {self.structure!r}")
        if self.structure not in (None, "blast", "auto") and (self.rank is not None or self.blocks is not None):
            raise ValueError(f"rank and blocks size a BLAST layer, not a {self.structure!r} one "
                             f"(got rank={self.rank!r}, blocks={self.blocks!r})")
        if self.structure == "auto" and self.rank is not None:
            raise ValueError(f"a fixed rank makes the layer BLAST: use structure='blast' or None with rank="
                             f"{self.rank!r}, not 'auto'")
        if self.structure not in (None, "blast", "auto") and self.factor_dtype not in (None, factor_formats.MODEL):
            raise ValueError(_unquantizable(self.structure, self.factor_dtype))


def _unquantizable(structure: str, factor_dtype: str) -> str:
    """Why ``factor_dtype`` cannot apply to layers of ``structure`` (quantized factors are BLAST's)."""
    return (f"factor_dtype={factor_dtype!r} stores BLAST factors quantized; {structure!r} layers have no quantized "
            f"form and would stay in the model's dtype: use structure='blast' (or 'auto', whose non-BLAST layers "
            f"the plan notes as unquantized), or leave factor_dtype unset")


@dataclass
class BlastConfig:
    """How :func:`blastfx.compress` compresses.

    ``objective`` and ``strategy`` default to ``"auto"``, resolved by :meth:`resolved` from the data
    given: with calibration batches the model returns a loss on (HF models given ``input_ids``), the
    loss objective and the loss strategy (keeping a layer dense where that buys most), the best
    measured recipe (SmolLM2-135M at budget 0.8: 1.54x the dense perplexity, against 3.81x for the
    output objective with a uniform budget); with other calibration batches, the output objective
    with a uniform budget (the "error" strategy measured worse than uniform there); without
    calibration, the weights alone with a uniform budget. The resolved values are on the plan.

    ``sequential`` defaults to ``"auto"``: with calibration batches, at a budget of at most
    :data:`SEQUENTIAL_BELOW` (and always in streaming mode), blocks are compressed one after another,
    each fitted towards the dense model's outputs on the already-compressed model's activations and
    then reconstructed (:mod:`blastfx.sequential`). Measured on SmolLM2-135M at budget 0.5 it takes the
    held-out perplexity from 7.0x to 4.4x the dense model's for about twice the compress time; at 0.8
    it gains little (1.54x to 1.50x) for the same cost, so larger budgets compress in one pass.

    ``compute_device`` (with ``sequential`` True or ``"auto"``) is streaming mode, for models larger than the
    accelerator: the model stays where its weights live (the CPU, or safetensors files memory-mapped by
    :func:`blastfx.streaming.attach_safetensors`), and only what is being computed on is moved to
    ``compute_device``: for the calibration passes the non-block modules and the one block being
    called, for the planner's measurements one layer, for the sequential walk one block with its
    calibration activations. Built layers go back to where the model lives, unchanged weights get
    their original tensors back, and the compressed model is the one compressing in place gives
    (:mod:`blastfx.streaming`).
    """
    blocks: int | tuple[int, int] = 4      # default (b_out, b_in); reduced to divisors of each layer's dims
    strategy: str = "auto"                 # "uniform": same kept fraction everywhere; "error": by relative
                                           # output error; "loss": by estimated loss increase (needs a loss)
    objective: str = "auto"                # with calibration: "output" error, or "loss" (Fisher-weighted outputs)
    method: str = "als"                    # fitting method, see blastfx.structures (BLAST: "als", ...)
    init: str = "factorize"                # or "random" (train from scratch)
    iters: int | None = None               # factorization iterations; None: the method's (ALS: 30 calibrated,
                                           # 100 weight-only; PrecGD: 300)
    tol: float = 1e-4
    rank_multiple: int = 8                 # kernel-friendly ranks
    min_features: int = 32                 # layers with min(in, out) below this stay dense by default
    include: tuple[str, ...] = ()          # FQN patterns to compress (default: linears in repeated blocks)
    exclude: tuple[str, ...] = ()          # FQN patterns to keep dense
    overrides: dict[str, LayerOverride] = field(default_factory=dict)
    progress: bool = True                  # tqdm bars (also off with TQDM_DISABLE=1)
    calibration_damping: float = CALIBRATION_DAMPING   # C + damping * mean(diag C) * I, as in GPTQ
    fit_precision: str = "fp32"            # the BLAST fit's large products in IEEE fp32; "tf32": on CUDA tensor
                                           # cores (10% less compress time on an H200, but a real model's
                                           # ill-conditioned covariances lose fits to its rounding:
                                           # blastfx.structures.blast.factorize.precision). No effect on a CPU
    sequential: bool | str = "auto"        # calibrate each block on the already-compressed model, with error
                                           # feedback and block reconstruction; "auto": where it pays (below)
    compute_device: str | None = None      # streaming mode (sequential "auto" or True), e.g. "cuda": the model
                                           # stays where it lives (the CPU); only the non-block modules and one block
                                           # at a time, with its calibration activations, are moved here
    distribute: bool = True                # in an initialized torch.distributed group: each rank fits a share
                                           # of the layers and receives the rest (same model on every rank)
    block_choices: tuple = ()              # e.g. (4, 8): each layer takes the one with the least measured error
    probe_iters: int = 5                   # factorization iterations of each block-choice probe
    allow_dense: bool = True               # strategies error/loss: keep a layer dense where that buys more
                                           # (estimated) error per parameter than any rank step elsewhere
    factor_dtype: str | None = None        # BLAST U and V stored quantized ("int8", "float8_e4m3fn", "int4"), rounded
                                           # inside the calibrated fit; None: the model's dtype
    structure: str = "blast"               # a registered structure ("blast", "ss1", ...), or "auto": per layer BLAST,
                                           # a ladder family or dense, never worse than one family alone on the
                                           # calibration objective (blastfx.plan.auto)
    # speed-aware plans (blastfx.plan.speed): each layer's expected decode speedup is in the plan's notes;
    # with min_speedup, layers expected slower than that on the target GPU are kept dense
    latency: object = "h200"               # a blastfx.plan.speed.LatencyModel, a preset name, or "measure"
    min_speedup: float | None = None       # e.g. 1.0: no compressed layer slower than dense at decode
    # sequential=True: after a block's layers are built, fit its factors (and norms) jointly to the dense
    # block's outputs on the calibration streams (blastfx.reconstruct); 0 steps turns it off
    reconstruct_steps: int | None = None   # optimizer steps per block, one calibration batch each; None:
                                           # eight passes over the calibration batches, at least 32
    reconstruct_seconds: float | None = None   # wall-time bound per block (None: the steps only)
    reconstruct_lr: float = 1e-3           # Adam, cosine-decayed over the steps
    reconstruct_norms: bool = True         # train the block's norm weights too

    def __post_init__(self):
        normalize_blocks(self.blocks)
        for name, value, allowed in (("strategy", self.strategy, STRATEGIES), ("method", self.method, method_names()),
                                     ("init", self.init, INITS), ("objective", self.objective, OBJECTIVES),
                                     ("structure", self.structure, structure_choices())):
            if not isinstance(value, str) or value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.iters = _check_int("iters", self.iters, optional=True)
        self.tol = _check_float("tol", self.tol, positive=False)
        self.rank_multiple = _check_int("rank_multiple", self.rank_multiple)
        self.min_features = _check_int("min_features", self.min_features, minimum=0)
        self.probe_iters = _check_int("probe_iters", self.probe_iters)
        self.calibration_damping = _check_float("calibration_damping", self.calibration_damping, positive=True)
        fit_precisions.check(self.fit_precision)
        factor_formats.check_name(self.factor_dtype)
        self.reconstruct_steps = _check_int("reconstruct_steps", self.reconstruct_steps, minimum=0, optional=True)
        if self.reconstruct_seconds is not None:
            self.reconstruct_seconds = _check_float("reconstruct_seconds", self.reconstruct_seconds, positive=True)
        self.reconstruct_lr = _check_float("reconstruct_lr", self.reconstruct_lr, positive=True)
        if self.min_speedup is not None:
            self.min_speedup = _check_float("min_speedup", self.min_speedup, positive=True)
        from .plan.speed import latency_model
        if self.latency != "measure":
            latency_model(self.latency)              # a bad preset name or type fails here, not after calibration
        _check_bool("reconstruct_norms", self.reconstruct_norms)
        if self.sequential != "auto" and not isinstance(self.sequential, bool):
            raise ValueError(f"sequential must be True, False or 'auto', got {self.sequential!r}")
        for name in ("progress", "allow_dense", "distribute"):
            _check_bool(name, getattr(self, name))
        self.compute_device = _check_compute_device(self.compute_device, self.sequential, self.init)
        self.include = _check_patterns("include", self.include)
        self.exclude = _check_patterns("exclude", self.exclude)
        if isinstance(self.block_choices, (int, str)):
            raise ValueError(f"block_choices must be a sequence of block counts, e.g. (4, 8), "
                             f"got {self.block_choices!r}")
        self.block_choices = tuple(self.block_choices)
        for choice in self.block_choices:
            try:
                normalize_blocks(choice)
            except ValueError as err:
                raise ValueError(f"block_choices: {err}") from None
        if len(self.block_choices) == 1:
            raise ValueError(f"block_choices needs at least two block counts to choose from, got "
                             f"{self.block_choices!r} (use blocks= for a single one)")
        if not isinstance(self.overrides, Mapping):
            raise ValueError(f"overrides must be a dict {{pattern: LayerOverride}}, got {self.overrides!r}")
        overrides = {}
        for pattern, o in self.overrides.items():
            _check_patterns("overrides", pattern)
            try:
                if isinstance(o, LayerOverride):
                    o.__post_init__()             # its fields may have been set after it was made
                elif isinstance(o, Mapping):
                    o = LayerOverride(**o)
                else:
                    raise ValueError(f"must be a LayerOverride or a dict of its fields, got {o!r}")
            except (TypeError, ValueError) as err:
                raise ValueError(f"overrides[{pattern!r}]: {err}") from None
            overrides[pattern] = o
        self.overrides = overrides
        quantizing = {p: o for p, o in overrides.items() if o.factor_dtype not in (None, factor_formats.MODEL)}
        if self.structure not in ("blast", "auto"):
            if self.factor_dtype is not None:
                raise ValueError(_unquantizable(self.structure, self.factor_dtype))
            for pattern, o in quantizing.items():
                if o.structure not in ("blast", "auto"):
                    raise ValueError(f"overrides[{pattern!r}]: {_unquantizable(self.structure, o.factor_dtype)} "
                                     f"(or give the override structure='blast')")
        if self.init == "random" and (self.factor_dtype is not None or quantizing):
            raise ValueError("factor_dtype: quantized factors are rounded from fitted ones; init='random' trains from "
                             "scratch: train float factors, then quantize (blastfx.structures.blast.quant.quantize_model)")

    @property
    def needs_loss(self) -> bool:
        """Whether compress must take loss gradients on the calibration batches."""
        return self.strategy == "loss" or self.objective == "loss"

    def resolved(self, *, calibrated: bool, returns_loss: bool, budget: float | None = None) -> "BlastConfig":
        """This config with ``"auto"`` objective, strategy and sequential replaced by what they mean
        here (see the class docstring): "loss" and "loss" when calibration batches are given (and used:
        not with ``init="random"``) and the model returns a loss on them; otherwise "output" and
        "uniform". Sequential in streaming mode (``compute_device``), or when calibrated at a ``budget``
        (the kept fraction) of at most :data:`SEQUENTIAL_BELOW`. Explicit values are kept."""
        fitted = calibrated and self.init != "random"
        use_loss = fitted and returns_loss
        objective = ("loss" if use_loss else "output") if self.objective == "auto" else self.objective
        strategy = ("loss" if use_loss else "uniform") if self.strategy == "auto" else self.strategy
        sequential = self.sequential
        if sequential == "auto":
            # streaming is always sequential: without calibration compress refuses it with that reason
            sequential = self.compute_device is not None or (
                fitted and budget is not None and budget <= SEQUENTIAL_BELOW + 1e-9)
        if (objective, strategy, sequential) == (self.objective, self.strategy, self.sequential):
            return self
        return replace(self, objective=objective, strategy=strategy, sequential=sequential)

    def override_for(self, fqn: str) -> LayerOverride:
        """The merged overrides whose patterns match ``fqn`` (later patterns win)."""
        merged = LayerOverride()
        for pattern, o in self.overrides.items():
            if fnmatch.fnmatchcase(fqn, pattern):
                for key in ("rank", "blocks", "method", "factor_dtype", "structure"):
                    if getattr(o, key) is not None:
                        setattr(merged, key, getattr(o, key))
                merged.skip = merged.skip or o.skip
        return merged

    def planning(self, structure: str) -> "BlastConfig":
        """This config as it plans the layers of ``structure`` (a group of them, or one family's
        candidate plan under "auto"). A structure without quantized factors plans with
        ``factor_dtype`` dropped, the config's and the overrides': those layers keep the model's dtype,
        which :func:`blastfx.plan.make_plan` notes in the plan."""
        if structure in ("blast", "auto"):
            return self if structure == self.structure else replace(self, structure=structure)
        return replace(self, structure=structure, factor_dtype=None,
                       overrides={p: replace(o, factor_dtype=None) for p, o in self.overrides.items()})

    def structures_used(self) -> set[str]:
        """The structures the config or any of its overrides names (what the planner must measure for)."""
        return {self.structure} | {o.structure for o in self.overrides.values() if o.structure is not None}

    def structure_for(self, fqn: str) -> str:
        """The structure layer ``fqn`` is planned with: its override's, else the config's."""
        return self.override_for(fqn).structure or self.structure

    def factor_dtype_for(self, fqn: str) -> str | None:
        """The factor format of layer ``fqn``: its override's (``"model"``: None), else the config's."""
        o = self.override_for(fqn).factor_dtype
        if o is None:
            return self.factor_dtype
        return None if o == factor_formats.MODEL else o

    def check_patterns(self, names) -> None:
        """Every include/exclude/override pattern must match some linear layer: a typo is an error."""
        names = list(names)
        for kind, patterns in (("include", self.include), ("exclude", self.exclude), ("overrides", self.overrides)):
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    sample = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                    raise ValueError(f"{kind} pattern {pattern!r} matches no linear layer (layers: {sample})")

    def selects(self, fqn: str, repeated: bool, min_dim: int) -> bool:
        o = self.override_for(fqn)
        if o.skip or any(fnmatch.fnmatchcase(fqn, p) for p in self.exclude):
            return False
        if self.include:
            return any(fnmatch.fnmatchcase(fqn, p) for p in self.include)
        return repeated and (min_dim >= self.min_features or o.rank is not None)
