"""Speed-aware plans: what each planned layer is expected to cost at decode on a given GPU, and
keeping dense the layers that would be slower than dense there.

Why: at decode a layer's time is a fixed cost per kernel stage (launch, ramp-up until enough loads
are in flight, the tail) plus its weight bytes over the achieved bandwidth. A structured layer moves
fewer bytes but runs more stages (BLAST: x·V with the s-mix, then w·Uᵀ), so below some size it is
slower than the dense GEMV it replaces, however few bytes it moves: on an H200 a 576x576 layer at
half its parameters takes longer than dense. A user who compresses to go faster should not get such
layers silently; the plan says what it expects, and ``BlastConfig(min_speedup=...)`` keeps dense
what would fall below it.

The model is ``t = stages * fixed + bytes / bandwidth``, fitted by least squares to measured
(stages, bytes, time) points, where ``stages`` is the structure's ``decode_stages``; a structure whose
kernel streams its weights at a rate of its own has its own constants, keyed by its name (SS1: one
GEMM over the shared weight, in a kernel that streams it at a different rate than BLAST's).
:meth:`LatencyModel.measure` times the library's own kernels (dense, BLAST, SS1) on the current GPU,
and :data:`PRESETS` holds fits to measurements published in ``benchmarks/results``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .. import structures
from .layers import DEFAULT_STRUCTURE
from ..structures.blast.quant import formats as factor_formats

_SS1 = "ss1"          # the structure of the ss1_* constants: measure() and the presets time its kernel


class _Stages(Mapping):
    """Kernel stages a decode call runs, by structure name (dense: one GEMV; a structure: its
    ``decode_stages``), read off the registry at each lookup, so a structure registered later is costed
    too."""

    def __getitem__(self, name: str) -> int:
        if name == "dense":
            return 1
        if name not in structures.names():
            raise KeyError(name)
        return structures.get(name).decode_stages

    def __iter__(self):
        return iter(("dense",) + structures.names())

    def __len__(self) -> int:
        return 1 + len(structures.names())


STAGES = _Stages()


def _check_constant(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"LatencyModel.{name} must be a finite non-negative number, got {value!r}")


@dataclass(frozen=True)
class LatencyModel:
    """Decode time of a linear layer on one GPU: ``stages * fixed_us + bytes / bandwidth``, with its
    own constants for dense layers (one cuBLAS GEMV) and for structured ones (the blastfx kernels).
    ``device``: what it was measured on, named in the plan's notes. ``own``: {structure name:
    (fixed_us, bandwidth_gbs)}, a structure's own constants for a whole decode call of its layers
    (kept as sorted (name, constants) pairs, so the model stays hashable and picklable); a structure
    without them is costed as its stages of the structured constants. ``ss1_fixed_us``
    and ``ss1_bandwidth_gbs`` (both or neither): SS1's entry of ``own``, as :meth:`fit` gives it from
    SS1's measured points (read back from ``own`` when given there)."""
    device: str
    dense_fixed_us: float
    dense_bandwidth_gbs: float
    fixed_us: float                  # per stage of a structured layer
    bandwidth_gbs: float
    ss1_fixed_us: float | None = None
    ss1_bandwidth_gbs: float | None = None
    own: Mapping[str, tuple[float, float]] | tuple = ()

    def __post_init__(self):
        if (self.ss1_fixed_us is None) != (self.ss1_bandwidth_gbs is None):
            raise ValueError("LatencyModel takes ss1_fixed_us and ss1_bandwidth_gbs together or neither")
        for name in ("dense_fixed_us", "dense_bandwidth_gbs", "fixed_us", "bandwidth_gbs") + (
                ("ss1_fixed_us", "ss1_bandwidth_gbs") if self.ss1_fixed_us is not None else ()):
            _check_constant(name, getattr(self, name))
        own = dict(self.own)
        if self.ss1_fixed_us is not None:
            own[_SS1] = (self.ss1_fixed_us, self.ss1_bandwidth_gbs)
        for name, constants in own.items():
            if not isinstance(constants, (tuple, list)) or len(constants) != 2:
                raise ValueError(f"LatencyModel.own[{name!r}] must be a pair (fixed_us, bandwidth_gbs), "
                                 f"got {constants!r}")
            for what, value in zip(("fixed_us", "bandwidth_gbs"), constants):
                _check_constant(f"own[{name!r}] {what}", value)
        if self.dense_bandwidth_gbs == 0 or self.bandwidth_gbs == 0 or any(bw == 0 for _, bw in own.values()):
            raise ValueError("LatencyModel bandwidths must be positive")
        object.__setattr__(self, "own", tuple(sorted((k, tuple(v)) for k, v in own.items())))
        if _SS1 in own:
            object.__setattr__(self, "ss1_fixed_us", own[_SS1][0])
            object.__setattr__(self, "ss1_bandwidth_gbs", own[_SS1][1])

    def dense_us(self, weight_bytes: float) -> float:
        return self.dense_fixed_us + weight_bytes / (self.dense_bandwidth_gbs * 1e3)

    def structured_us(self, stages: int, weight_bytes: float, structure: str = DEFAULT_STRUCTURE) -> float:
        """A decode call of a ``structure`` layer: its own constants where it has them, else ``stages``
        fixed costs of the structured constants."""
        own = dict(self.own)
        if structure in own:
            fixed, bandwidth = own[structure]
            return fixed + weight_bytes / (bandwidth * 1e3)
        return stages * self.fixed_us + weight_bytes / (self.bandwidth_gbs * 1e3)

    @classmethod
    def fit(cls, device: str, dense: list[tuple[float, float]], structured: list[tuple[int, float, float]],
            ss1: list[tuple[float, float]] | None = None):
        """Least-squares constants from measured points: ``dense`` [(bytes, µs)], ``structured``
        [(stages, bytes, µs)], optionally ``ss1`` [(bytes, µs)]; each needs at least two points of
        different sizes."""
        if len({b for b, _ in dense}) < 2 or len({(s, b) for s, b, _ in structured}) < 2 or \
                (ss1 is not None and len({b for b, _ in ss1}) < 2):
            raise ValueError("LatencyModel.fit needs at least two points of different sizes for each kind of layer")
        d_fixed, d_slope = _lstsq([(1.0, b) for b, _ in dense], [t for _, t in dense])
        s_fixed, s_slope = _lstsq([(float(s), b) for s, b, _ in structured], [t for *_, t in structured])
        ss1_fixed, ss1_slope = _lstsq([(1.0, b) for b, _ in ss1], [t for _, t in ss1]) if ss1 else (0.0, 1.0)
        if d_slope <= 0 or s_slope <= 0 or ss1_slope <= 0:
            raise ValueError("LatencyModel.fit: the points do not grow with bytes; measure larger layers")
        extra = dict(ss1_fixed_us=max(ss1_fixed, 0.0), ss1_bandwidth_gbs=1.0 / ss1_slope) if ss1 else {}
        return cls(device, max(d_fixed, 0.0), 1.0 / d_slope, max(s_fixed, 0.0), 1.0 / s_slope, **extra)

    @classmethod
    def measure(cls, device=None, dtype=torch.bfloat16, reps: int = 20) -> "LatencyModel":
        """Fit to this GPU: dense GEMVs, BLAST layers (b = 4) and SS1 layers (reduction 2) at half
        their parameters, sizes of 2048x2048 to 11008x4096, timed at T = 1 as CUDA-graph replays over
        weight copies rotated out of L2, through the same autotuned kernels a compiled model runs."""
        from ..kernels import autotune
        from ..structures.blast.layout import BlastShape
        from ..structures.blast.ops import blast_matmul
        from ..structures.ss1 import SS1Layout, ss1_matmul

        device = torch.device(device or "cuda")
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError("LatencyModel.measure times kernels on a CUDA GPU; on this machine pass a preset "
                               f"({', '.join(PRESETS)}) or a LatencyModel")
        size = torch.tensor([], dtype=dtype).element_size()
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
        dense, structured, ss1 = [], [], []
        for m, n in ((2048, 2048), (4096, 4096), (11008, 4096)):
            copies = max(2, 4 * l2 // (m * n * size) + 1)
            ws = [torch.randn(m, n, device=device, dtype=dtype) for _ in range(copies)]
            x = torch.randn(1, n, device=device, dtype=dtype)
            dense.append((m * n * size, 1e3 * autotune.graph_ms(lambda k: torch.nn.functional.linear(x, ws[k]),
                                                               copies, reps)))
            del ws
            rank = int(0.5 * m * n / (m + n + 16)) // 16 * 16
            shape = BlastShape.make(m, n, rank, 4)
            copies = max(2, 4 * l2 // (shape.num_params * size) + 1)
            fs = [tuple(torch.randn(*shape.factor_shapes[k], device=device, dtype=dtype) for k in "USV")
                  for _ in range(copies)]
            blast_matmul(x, *fs[0], None, m)                        # tune outside the timed graph
            structured.append((STAGES["blast"], shape.num_params * size,
                               1e3 * autotune.graph_ms(lambda k: blast_matmul(x, *fs[k], None, m), copies, reps)))
            del fs
            layout = SS1Layout(m, n, 2)
            shifts = layout.shifts(device)
            copies = max(2, 4 * l2 // (layout.num_params * size) + 1)
            ws = [torch.randn(*layout.weight_shape, device=device, dtype=dtype) for _ in range(copies)]
            ss1_matmul(x, ws[0], layout, shifts=shifts)               # tune outside the timed graph
            ss1.append((layout.num_params * size,
                        1e3 * autotune.graph_ms(lambda k: ss1_matmul(x, ws[k], layout, shifts=shifts), copies, reps)))
            del ws
        return cls.fit(torch.cuda.get_device_name(device), dense, structured, ss1)


def _lstsq(rows: list[tuple[float, float]], times: list[float]) -> tuple[float, float]:
    """(per-unit fixed cost, µs per kB) of ``time = unit * fixed + bytes * slope`` by least squares."""
    a = torch.tensor([[u, b / 1e3] for u, b in rows], dtype=torch.float64)
    fixed, slope = torch.linalg.lstsq(a, torch.tensor([[t] for t in times], dtype=torch.float64)).solution[:, 0]
    return float(fixed), float(slope)


def _fit_rows(device: str, dense_rows, blast_rows, ss1_rows, element_size: int = 2) -> LatencyModel:
    """A fit from measured rows: dense [(out, in, µs)], BLAST at b = 4 [(out, in, rank, µs)], SS1 at
    reduction 2 [(out, in, µs)]."""
    from ..structures.blast.layout import BlastShape
    from ..structures.ss1 import SS1Layout
    return LatencyModel.fit(device, [(m * n * element_size, t) for m, n, t in dense_rows],
                            [(STAGES["blast"], BlastShape.make(m, n, r, 4).num_params * element_size, t)
                             for m, n, r, t in blast_rows],
                            [(SS1Layout(m, n, 2).num_params * element_size, t) for m, n, t in ss1_rows])


# Fits to measured T = 1 rows (H200, torch 2.11, triton 3.6, bf16, budget 0.5, b = 4, CUDA-graph
# medians over weights rotated out of L2; ``python benchmarks/layer_speed.py --structures blast ss1
# --tokens 1 16``): dense, BLAST's GEMV kernels, and SS1's one-launch CUDA-core kernel (1.6x dense at
# 4096x4096, 1.3-1.4x at the MLP shapes). The fits extrapolate to layers much smaller than these.
PRESETS = {"h200": _fit_rows("NVIDIA H200 (preset)",
                             [(4096, 4096, 12.91), (11008, 4096, 25.14), (4096, 11008, 28.38)],
                             [(4096, 4096, 1008, 12.12), (11008, 4096, 1488, 22.48), (4096, 11008, 1488, 20.93)],
                             [(4096, 4096, 8.75), (11008, 4096, 19.13), (4096, 11008, 19.69)])}


def latency_model(spec) -> LatencyModel:
    """A :class:`LatencyModel` from a config's ``latency``: the model itself, a preset name, or
    ``"measure"`` (time this machine's GPU)."""
    if isinstance(spec, LatencyModel):
        return spec
    if spec == "measure":
        return LatencyModel.measure()
    if isinstance(spec, str) and spec in PRESETS:
        return PRESETS[spec]
    raise ValueError(f"latency must be a LatencyModel, 'measure' or a preset in {tuple(PRESETS)}, got {spec!r}")


def layer_bytes(lp, element_size: int) -> float:
    """Weight bytes a decode call of planned layer ``lp`` streams: its parameters at the model's
    element size, or the format's code size per entry for quantized factors (one byte for int8, half
    a byte for packed int4)."""
    size = element_size
    if lp.factor_dtype not in (None, factor_formats.MODEL):
        size = factor_formats.get(lp.factor_dtype).bits / 8
    return lp.params * size


def grouped_siblings(plan, groups) -> list[list[str]]:
    """The members of each sibling group (layers that read one input: q/k/v, gate/up) that a model
    compiled with ``backend="blast"`` runs as one grouped call at decode: its planned BLAST layers
    with ranks the grouped kernel streams (multiples of 8), float factors and each quantized format
    forming groups of their own, where there are at least two."""
    def kind(lp):
        return None if lp.factor_dtype in (None, factor_formats.MODEL) else lp.factor_dtype

    out = []
    for group in groups:
        by_kind: dict = {}
        for k in group:
            lp = plan.layers.get(k)
            if lp is not None and lp.structure == DEFAULT_STRUCTURE and lp.rank % 8 == 0:
                by_kind.setdefault(kind(lp), []).append(k)
        out += [members for members in by_kind.values() if len(members) > 1]
    return out


def _layer_times(plan, latency: LatencyModel, element_size: int, grouped) -> dict[str, tuple[float, float]]:
    """{layer: (dense µs, planned µs)} at decode under ``latency``. The members of each of ``grouped``
    (:func:`grouped_siblings`) run as one call and pay the stages' fixed cost once for the group: the
    group's time is shared among its members in proportion to their dense times, so each has the
    group's speedup."""
    times = {name: (latency.dense_us(lp.dense_params * element_size),
                    latency.structured_us(STAGES.get(lp.structure, 1), layer_bytes(lp, element_size), lp.structure))
             for name, lp in plan.layers.items()}
    for members in grouped:
        dense = sum(times[k][0] for k in members)
        grouped = latency.structured_us(STAGES[DEFAULT_STRUCTURE],
                                        sum(layer_bytes(plan.layers[k], element_size) for k in members))
        for k in members:
            times[k] = (times[k][0], grouped * times[k][0] / dense)
    return times


def expected_speedups(plan, latency: LatencyModel, element_size: int, groups=()) -> dict[str, float]:
    """{layer: dense time / planned time} at decode under ``latency``; ``groups``: the model's sibling
    groups (``Analysis.groups``), costed as grouped calls."""
    return {name: dense / planned
            for name, (dense, planned) in _layer_times(plan, latency, element_size,
                                                       grouped_siblings(plan, groups)).items()}


def apply_speed(plan, latency: LatencyModel, element_size: int, min_speedup: float | None, groups=()):
    """``plan`` with each layer's expected decode speedup in its notes and, with ``min_speedup``,
    the layers expected below it kept dense (moved to ``plan.dense``; the kept fraction then rises
    above the budget, which the notes say). ``groups``: the model's sibling groups, each costed as the
    one grouped call ``backend="blast"`` makes of it (its members share one speedup, so they are kept
    or dropped together). Returns a new plan; ``plan`` is not changed."""
    grouped = grouped_siblings(plan, groups)
    times = _layer_times(plan, latency, element_size, grouped)
    speed = {name: dense / planned for name, (dense, planned) in times.items()}
    slow = sorted(k for k, s in speed.items() if min_speedup is not None and s < min_speedup)
    if speed and len(slow) == len(speed):
        best = max(speed.items(), key=lambda kv: kv[1])
        raise ValueError(f"min_speedup={min_speedup}: every selected layer is expected slower than that at decode on "
                         f"{latency.device} (the fastest, {best[0]}, {best[1]:.2f}x): nothing would be compressed. "
                         "Lower min_speedup, or leave it None to compress for size alone.")
    layers = {k: v for k, v in plan.layers.items() if k not in slow}
    new = dataclasses.replace(plan, layers=layers, dense=sorted(set(plan.dense) | set(slow)), notes=list(plan.notes))
    total_dense = sum(dense for dense, _ in times.values())
    total = sum(dense if k in slow else planned for k, (dense, planned) in times.items())
    by = sorted(speed.items(), key=lambda kv: kv[1])
    how = (f", {len(grouped)} sibling group{'s' if len(grouped) != 1 else ''} as one grouped call each (as "
           "torch.compile(backend='blast') runs them)" if grouped else "")
    new.notes.append(f"expected decode speedup on {latency.device} at T=1{how}: compressed layers together "
                     f"{total_dense / total:.2f}x dense; slowest {by[0][0]} {by[0][1]:.2f}x, fastest "
                     f"{by[-1][0]} {by[-1][1]:.2f}x" if by else f"expected decode speedup on {latency.device}: no layers")
    if slow:
        new.notes.append(f"kept dense {len(slow)} layers expected below min_speedup={min_speedup} on {latency.device} "
                         f"(e.g. {slow[0]}: {speed[slow[0]]:.2f}x); kept fraction {new.kept_fraction:.4f} "
                         f"against the budget {plan.budget}")
    return new
