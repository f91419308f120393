"""Timing helpers shared by the benchmarks: CUDA-event medians over rotated weight copies."""
from __future__ import annotations

import statistics

import torch

from blastfx.kernels import autotune


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
    weight copy k (weights come from HBM; CPU launch cost is out, as in a CUDA-graph decode loop).
    The autotuner's own timer, without its eager fallback: a benchmark must not change method."""
    return autotune.graph_ms(fn, n_copies, reps)


def copies_for(bytes_per_copy: int, l2_bytes: int = 50 * 2**20, minimum: int = 4) -> int:
    """Enough copies that the set is several times larger than L2."""
    return max(minimum, (4 * l2_bytes) // max(bytes_per_copy, 1) + 1)


def versions() -> str:
    import triton
    return (f"{torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
            f"CUDA {torch.version.cuda}")


def place_on_gpu_if_any(model) -> str:
    """Move ``model`` to the GPU when there is one; returns where it runs, for
    the tables' header line. One place, so the quality and recovery tables run and say it alike."""
    if not torch.cuda.is_available():
        return f"CPU ({torch.get_num_threads()} threads)"
    model.cuda()
    return torch.cuda.get_device_name()


def smollm2_setup(gguf=None, eval_windows: int = 32, calib_tokens: int = 8192):
    """The quality tables' shared protocol: (dense, tokenizer, fit articles, held-out 512-token
    windows, calibration batches from fit articles only). One place, so every table evaluates alike."""
    from blastfx.llm.data import text_batches
    from blastfx.llm.data import split_articles
    from blastfx.llm.evaluate import token_windows
    from blastfx.llm.hf import load_causal_lm, smollm2_path

    dense, tok = load_causal_lm(gguf or smollm2_path())
    fit, heldout = split_articles()
    windows = token_windows(tok, heldout, 512, eval_windows)
    return dense, tok, fit, windows, text_batches(tok, calib_tokens, texts=fit)


def torchao_weight_only(module, kind: str):
    """``module`` with its linears quantized in place by torchao's weight-only config ``kind``: "int8"
    (half of bf16's bytes) or "int4" with group size 128 (about a quarter); the equal-bytes dense
    baselines for quantized factors. ImportError where torchao is not installed."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    quantize_(module, Int8WeightOnlyConfig() if kind == "int8" else Int4WeightOnlyConfig(group_size=128))
    return module
