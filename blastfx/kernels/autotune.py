"""Pick the fastest (path, config) for a BLAST shape by timing the candidates once, then cache it.

Why measure instead of a fixed rule: which of the fused Triton path or the cuBLAS-backed paths wins
depends on T, b and r in ways a heuristic gets wrong by 2x. The cost is a few dozen launches the
first time a (shape, dtype, token bucket) is seen. Nothing is timed while a CUDA graph is being
captured or on CPU (interpreter): the first candidate (a sound default) is used and not cached, so a
later eager call can still tune. With ``autotune=False`` in the kernel options in effect
(``blastfx.kernels.options``, or a compiled graph's options) the first candidate is used even where
another call already tuned the shape.

The cache of choices is process-wide: a measurement, not an option (:func:`clear` empties it).
"""
from __future__ import annotations

import statistics

import torch

from .scope import current

DECODE_MAX_T = 16          # token counts up to this are decode sizes (kernel candidates, compiler lowering)
_cache: dict = {}
REPS = 7                   # timed replays per candidate; the median counts


def token_bucket(T: int) -> int:
    """Token counts that share a choice: powers of two (1, 2, 4, ..., 8192, then capped)."""
    return min(1 << max(T - 1, 0).bit_length(), 8192)


def graph_ms(fn, calls: int, reps: int = 7, eager_fallback: bool = False) -> float:
    """Median GPU time per call of ``fn(k)``, k = 0..calls-1, replayed from one CUDA graph holding all
    the calls: eager timing would charge multi-kernel paths for Python launch cost that a compiled
    (CUDA-graph) model never pays. The benchmarks use it too, with k picking a weight copy. With
    ``eager_fallback``, a function that cannot be captured is timed eagerly (one call per sample)."""
    fn(0)                                   # compile, allocate
    torch.cuda.synchronize()
    graph = None
    try:
        side = torch.cuda.Stream()          # warm-up on a side stream, as capture requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for k in range(calls):
                fn(k)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for k in range(calls):
                fn(k)
    except Exception:                       # noqa: BLE001 -- uncapturable
        if not eager_fallback:
            raise
        graph, calls = None, 1
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay() if graph is not None else fn(0)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return statistics.median(times)


def copies_needed(tensors, device) -> int:
    """How many copies of ``tensors`` (at most 8) together take twice the L2 cache."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    return max(1, min(8, -(-2 * l2 // max(nbytes, 1))))


class WeightCopies:
    """The factors, and clones of them made only when the autotuner times candidates: enough that
    rotating through them streams the weights from memory, as a model's layers do in a decode step.
    Timing one copy over and over would measure L2 bandwidth and pick the wrong kernel."""

    def __init__(self, factors, device):
        self.factors, self._clones = factors, {}
        self.count = copies_needed(factors, device)

    def __getitem__(self, k: int):
        if k == 0:
            return self.factors
        if k not in self._clones:
            self._clones[k] = tuple(t.clone() for t in self.factors)
        return self._clones[k]


def will_time(key) -> bool:
    """Whether :func:`choose` would time candidates for ``key`` now: autotuning on, ``key`` not chosen
    yet, a CUDA device and no graph being captured. A caller that warms something up for the timing
    (a path that tunes its own kernels first) does so only then, not on every call."""
    return (current().autotune and key not in _cache and torch.cuda.is_available()
            and not torch.cuda.is_current_stream_capturing())


def choose(key, candidates, run, copies: int = 1):
    """Best (path, config) of ``candidates`` for ``key``; ``run(path, config, k)`` executes one on
    weight copy ``k`` (of ``copies``): each candidate is timed over every copy in turn, so weights
    come from memory as they do in a model rather than from L2."""
    if not current().autotune:
        return candidates[0]
    if key in _cache:
        return _cache[key]
    if len(candidates) == 1 or not torch.cuda.is_available() or torch.cuda.is_current_stream_capturing():
        return candidates[0]
    timings = []
    for path, cfg in candidates:
        try:
            t = graph_ms(lambda k: run(path, cfg, k % copies), calls=max(4, copies), reps=REPS, eager_fallback=True)
            timings.append((t, path, cfg))
        except Exception:       # a config a GPU cannot run (e.g. out of shared memory) is just skipped
            continue
    if not timings:
        return candidates[0]
    best = min(timings, key=lambda t: t[0])
    _cache[key] = (best[1], best[2])
    return _cache[key]


def report() -> dict:
    """What was chosen per key (for benchmarks and debugging)."""
    return {k: v[0] for k, v in _cache.items()}


def clear() -> None:
    """Forget every choice (the next call of each shape times its candidates again)."""
    _cache.clear()
