"""Block-wise reconstruction: after a block's layers are factorized one by one, fit the block as a whole.

Each layer's factorization minimizes that layer's own output error; what the rest of the model sees
is the *block's* output, where the errors of q/k/v, o, gate/up and down meet through attention,
the nonlinearity and the residual sum. A few optimizer steps on the block's factors (and its norm
weights), with the block's output on the compressed model's input stream pulled towards the dense
block's output on the dense stream, recover much of what the per-layer fits leave: no end-to-end
training, one block in memory, on the calibration streams the sequential mode already caches.

The steps are bounded (``steps``, and ``seconds`` of wall time per block); the block's loss on all
calibration batches is measured before and after, and the fit is kept only if it lowered it, so a
too-large learning rate cannot make a block worse. All-or-nothing: on an error or an interrupt the
block's parameters, their ``requires_grad`` flags and its training mode are as they were.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import structures
from ..progress import progress_bar
from ..cpu_products import products_in_fp32


def _check_number(name: str, value, integer: bool = False, optional: bool = False):
    """``steps``: an integer >= 0; ``seconds`` / ``lr``: a positive finite number (or None if optional)."""
    if value is None and optional:
        return None
    number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = number and (isinstance(value, int) and value >= 0 if integer else value > 0)
    if not ok:
        kind = "an integer >= 0" if integer else "a positive finite number"
        raise ValueError(f"{name} must be {kind}{' or None' if optional else ''}, got {value!r}")
    return value


# Default length of a block's fit: passes over the calibration batches, and a floor for few batches.
# Measured on SmolLM2-135M at budget 0.5 (held-out perplexity over dense; batches of 4 x 512 tokens):
# 8192 tokens (4 batches), 32 steps: 4.40x (128 steps: 4.02x); 65536 tokens (32 batches), 256 steps:
# 2.95x. Eight passes gives both measured step counts.
PASSES = 8
MIN_STEPS = 32


@dataclass(frozen=True)
class ReconstructOptions:
    """How each block is reconstructed. ``steps``: optimizer steps per block (0: none), each on one
    calibration batch in turn; None: :data:`PASSES` passes over the batches, at least :data:`MIN_STEPS`
    (:meth:`steps_for`); ``seconds``: wall-time bound per block (None: steps only); ``lr``: Adam's
    learning rate, cosine-decayed over ``steps``; ``norms``: train the block's norm weights too."""
    steps: int | None = 0
    seconds: float | None = None
    lr: float = 1e-3
    norms: bool = True
    progress: bool = True

    def __post_init__(self):
        _check_number("steps", self.steps, integer=True, optional=True)
        _check_number("seconds", self.seconds, optional=True)
        _check_number("lr", self.lr)
        for name in ("norms", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def steps_for(self, batches: int) -> int:
        """The steps per block on ``batches`` calibration batches: ``steps``, or where it is None a fixed
        number of passes over them, so that more calibration data is also used for longer."""
        return self.steps if self.steps is not None else max(MIN_STEPS, PASSES * batches)

    @classmethod
    def from_config(cls, config) -> "ReconstructOptions":
        return cls(steps=config.reconstruct_steps, seconds=config.reconstruct_seconds, lr=config.reconstruct_lr,
                   norms=config.reconstruct_norms, progress=config.progress)


@dataclass(frozen=True)
class ReconstructResult:
    """What one block's reconstruction did: steps taken, seconds spent, the relative squared error of the
    block's outputs over all calibration batches before and after, and whether the fit was kept."""
    steps: int
    seconds: float
    error_before: float
    error_after: float
    kept: bool


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and their library variants (LlamaRMSNorm, ...), by class name."""
    return "norm" in type(module).__name__.lower()


def norm_parameters(block: nn.Module) -> list[nn.Parameter]:
    """The floating-point parameters of the block's norm modules."""
    return [p for m in block.modules() if is_norm(m) for p in m.parameters(recurse=False) if p.is_floating_point()]


def block_parameters(block: nn.Module, norms: bool = True) -> list[nn.Parameter]:
    """What reconstruction trains: the parameters of the block's structured layers (BLAST, ...) and,
    with ``norms``, of its norm modules. Layers left dense are exact already and stay as they are."""
    kinds = structures.module_types()
    chosen = [p for m in block.modules() if isinstance(m, kinds) for p in m.parameters(recurse=False)
              if p.is_floating_point()]
    if norms:
        chosen += norm_parameters(block)
    return list({id(p): p for p in chosen}.values())


def _error(block, inputs, targets, call, scale: float) -> float:
    with torch.no_grad():
        return sum((call(block, x, k).float() - t.float()).square().sum().item()
                   for k, (x, t) in enumerate(zip(inputs, targets))) / scale


def reconstruct_block(block: nn.Module, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                      call: Callable[[nn.Module, torch.Tensor, int], torch.Tensor],
                      options: ReconstructOptions, desc: str = "reconstructing the block") -> ReconstructResult:
    """Fit ``block``'s trainable parameters (:func:`block_parameters`) so that ``call(block, inputs[k], k)``
    matches ``targets[k]`` in mean squared error, by Adam over the batches in turn, within
    ``options.steps_for(len(inputs))`` steps and ``options.seconds``. The fit is kept only if the
    squared error summed over all batches went down. All-or-nothing (see the module docstring)."""
    if len(inputs) != len(targets) or not len(inputs):
        raise ValueError(f"reconstruct_block needs one target per input batch, got {len(inputs)} inputs and "
                         f"{len(targets)} targets")
    params = block_parameters(block, options.norms)
    total = options.steps_for(len(inputs))
    if total == 0 or not params:
        return ReconstructResult(0, 0.0, math.nan, math.nan, False)
    call = products_in_fp32(call, (*inputs, *block.parameters()))
    flags = [(p, p.requires_grad) for p in block.parameters()]
    originals = [p.detach().clone() for p in params]
    was_training = block.training
    start = time.perf_counter()
    scale = max(sum(t.float().square().sum().item() for t in targets), 1e-30)

    def restore():
        with torch.no_grad():
            for p, v in zip(params, originals):
                p.copy_(v)

    try:
        block.eval()                                   # no dropout: the targets are the dense block's eval outputs
        for p, _ in flags:
            p.requires_grad_(False)
        before = _error(block, inputs, targets, call, scale)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=options.lr)
        bar = progress_bar(enabled=options.progress, desc=desc, total=total, unit="step", leave=False)
        step = 0
        tokens = [t.numel() for t in targets]
        while step < total and (options.seconds is None or time.perf_counter() - start < options.seconds):
            k = step % len(inputs)
            for group in optimizer.param_groups:
                group["lr"] = options.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = (call(block, inputs[k], k).float() - targets[k].float()).square().sum() * (sum(tokens) / tokens[k]
                                                                                                / scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(error=f"{loss.item():.3g}", refresh=False)
        bar.close()
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        after = _error(block, inputs, targets, call, scale)
        kept = after < before
        if not kept:
            restore()
    except BaseException:
        restore()
        for p in params:
            p.grad = None
        raise
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        block.train(was_training)
    return ReconstructResult(step, time.perf_counter() - start, before, after if kept else before, kept)
