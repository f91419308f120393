"""Where :func:`blastfx.compress` spends its time: wall seconds per pipeline stage, when asked.

Compressing a 7B model takes minutes; which stage dominates (the calibration passes, the
statistics, the planner, the factorization, block-wise reconstruction, moving blocks to and from the
GPU) decides what to make faster or which option to change. ::

    with blastfx.stage_times() as times:
        blastfx.compress(model, 0.5, calibration=batches)
    print(times)    # StageTimes(total 125.3 s: statistics 9.1 s, plan 4.0 s, sequential 111.2 s, ...)

Stages nest: a stage entered inside another is recorded under ``outer/inner`` (``sequential/build``),
summed over its repeats, with its count. Recording is scoped to the ``with`` block (a context
variable, so concurrent threads and other compresses are unaffected) and costs nothing outside it.
While recording, each stage boundary waits for the GPU's queued work, so that asynchronous kernels
are charged to the stage that launched them.
"""
from __future__ import annotations

import contextlib
import contextvars
import time
from dataclasses import dataclass, field

import torch

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("blastfx_stage_times", default=None)


@dataclass
class StageTimes:
    """Seconds and counts per stage path (``"sequential/build"``), in the order first entered."""
    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    _stack: list[str] = field(default_factory=list, repr=False)

    @property
    def total(self) -> float:
        """Seconds in top-level stages."""
        return sum(s for k, s in self.seconds.items() if "/" not in k)

    def __getitem__(self, path: str) -> float:
        return self.seconds[path]

    def __contains__(self, path: str) -> bool:
        return path in self.seconds

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {s:.1f} s" + (f" ({self.counts[k]}x)" if self.counts[k] > 1 else "")
                          for k, s in self.seconds.items())
        return f"StageTimes(total {self.total:.1f} s: {parts})"


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextlib.contextmanager
def stage_times():
    """Record the stages of every compress inside the block; yields the :class:`StageTimes`."""
    times = StageTimes()
    token = _ACTIVE.set(times)
    try:
        yield times
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def stage(name: str):
    """Charge the block's wall time to ``name`` (under the enclosing stage) while recording."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"a stage name is a non-empty word without '/', got {name!r}")
    times = _ACTIVE.get()
    if times is None:
        yield
        return
    _sync()
    times._stack.append(name)
    path = "/".join(times._stack)
    start = time.perf_counter()
    try:
        yield
    finally:
        try:
            _sync()
        finally:                                 # the stack unwinds even if the wait fails
            times.seconds[path] = times.seconds.get(path, 0.0) + time.perf_counter() - start
            times.counts[path] = times.counts.get(path, 0) + 1
            times._stack.pop()
