"""Timing helpers shared by the benchmarks: CUDA-event medians over rotated weight copies."""
from __future__ import annotations

import statistics

import torch


def median_ms(fn, n_copies: int, warmup: int = 5, reps: int = 50) -> float:
    """Median time of ``fn(k)`` in ms, k cycling over ``n_copies`` weight copies so that every call
    streams its weights from HBM rather than L2."""
    for k in range(warmup):
        fn(k % n_copies)
    torch.cuda.synchronize()
    times = []
    for k in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(k % n_copies)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn, n_copies: int, reps: int = 20) -> float:
    """Median time per call of ``fn(k)`` replayed from one CUDA graph that calls it once for every
    weight copy k (so weights come from HBM, and CPU launch cost is out of the picture, as it is in
    a CUDA-graph decode loop). Replay time / n_copies."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for k in range(n_copies):
            fn(k)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for k in range(n_copies):
            fn(k)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / n_copies)
    del graph
    return statistics.median(times)


def copies_for(bytes_per_copy: int, l2_bytes: int = 50 * 2**20, minimum: int = 4) -> int:
    """Enough copies that the set is several times larger than L2."""
    return max(minimum, (4 * l2_bytes) // max(bytes_per_copy, 1) + 1)


def versions() -> str:
    import triton
    return (f"{torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
            f"CUDA {torch.version.cuda}")
