"""User-facing configuration for :func:`blastfx.compress`, in the shape of torchao's ``quantize_``:
one config object with defaults, and per-module overrides keyed by FQN patterns (fnmatch syntax,
e.g. ``"*.mlp.*"`` or ``"model.layers.0.self_attn.q_proj"``)."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from .factorize import METHODS
from .layout import normalize_blocks

STRATEGIES = ("uniform", "error", "loss")
OBJECTIVES = ("output", "loss")
INITS = ("factorize", "random")


@dataclass
class LayerOverride:
    """Per-module settings; ``None`` means "use the config's default"."""
    rank: int | None = None
    blocks: int | tuple[int, int] | None = None
    skip: bool = False
    method: str | None = None


@dataclass
class BlastConfig:
    blocks: int | tuple[int, int] = 4      # default (b_out, b_in); reduced to divisors of each layer's dims
    strategy: str = "uniform"              # "uniform": same kept fraction everywhere; "error": by relative
                                           # output error; "loss": by estimated loss increase (needs a loss)
    objective: str = "output"              # with calibration: "output" error, or "loss" (Fisher-weighted outputs)
    method: str = "als"                    # factorization method, see blastfx.factorize.METHODS
    init: str = "factorize"                # or "random" (train from scratch)
    iters: int | None = None
    tol: float = 1e-4
    rank_multiple: int = 8                 # kernel-friendly ranks
    min_features: int = 32                 # layers with min(in, out) below this stay dense by default
    include: tuple[str, ...] = ()          # FQN patterns to compress (default: linears in repeated blocks)
    exclude: tuple[str, ...] = ()          # FQN patterns to keep dense
    overrides: dict[str, LayerOverride] = field(default_factory=dict)
    progress: bool = True
    calibration_damping: float = 0.01      # C + damping * mean(diag C) * I, as in GPTQ
    sequential: bool = False               # calibrate each block on the already-compressed model
    block_choices: tuple = ()              # e.g. (4, 8): each layer takes the one with the least measured error
    probe_iters: int = 5                   # factorization iterations of each block-choice probe
    allow_dense: bool = True               # strategies error/loss: keep a layer dense where that buys more
                                           # (estimated) error per parameter than any rank step elsewhere

    def __post_init__(self):
        normalize_blocks(self.blocks)
        for name, value, allowed in (("strategy", self.strategy, STRATEGIES), ("method", self.method, METHODS),
                                     ("init", self.init, INITS), ("objective", self.objective, OBJECTIVES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, int) or self.rank_multiple < 1:
            raise ValueError(f"rank_multiple must be a positive integer, got {self.rank_multiple!r}")
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)
        self.block_choices = tuple(self.block_choices)
        for choice in self.block_choices:
            normalize_blocks(choice)
        if len(self.block_choices) == 1:
            raise ValueError(f"block_choices needs at least two block counts to choose from, got "
                             f"{self.block_choices!r} (use blocks= for a single one)")
        if isinstance(self.probe_iters, bool) or not isinstance(self.probe_iters, int) or self.probe_iters < 1:
            raise ValueError(f"probe_iters must be a positive integer, got {self.probe_iters!r}")
        self.overrides = {k: v if isinstance(v, LayerOverride) else LayerOverride(**v)
                          for k, v in self.overrides.items()}
        for pattern, o in self.overrides.items():
            if o.blocks is not None:
                normalize_blocks(o.blocks)
            if o.method is not None and o.method not in METHODS:
                raise ValueError(f"overrides[{pattern!r}].method must be one of {METHODS}, got {o.method!r}")

    @property
    def needs_loss(self) -> bool:
        """Whether compress must take loss gradients on the calibration batches."""
        return self.strategy == "loss" or self.objective == "loss"

    def override_for(self, fqn: str) -> LayerOverride:
        """The merged overrides whose patterns match ``fqn`` (later patterns win)."""
        merged = LayerOverride()
        for pattern, o in self.overrides.items():
            if fnmatch.fnmatchcase(fqn, pattern):
                for key in ("rank", "blocks", "method"):
                    if getattr(o, key) is not None:
                        setattr(merged, key, getattr(o, key))
                merged.skip = merged.skip or o.skip
        return merged

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
