"""Helpers shared by the benchmarks: CUDA-event medians over rotated weight copies, the quality
tables' SmolLM2 protocol, and the quantized dense baselines they compare against."""
from __future__ import annotations

import statistics
from contextlib import contextmanager

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
    baselines for quantized factors. int4 is stored in the tinygemm tile layout that torch's own
    ``_weight_int4pack_mm`` reads (gpt-fast's int4 kernel): torchao's default plain layout needs the
    ``mslk`` kernel library, which has no installable release. ImportError where torchao is not installed.

    ``set_inductor_config=False``: left to itself, ``quantize_`` switches on torchao's recommended
    Inductor settings for the whole process, so every model compiled after it (the dense baseline
    included) would compile with coordinate-descent tuning. :func:`torchao_compile_settings` applies
    them to torchao's own compiles only."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    quantize_(module, Int8WeightOnlyConfig(set_inductor_config=False) if kind == "int8"
              else Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d",
                                        set_inductor_config=False))
    return module


@contextmanager
def torchao_compile_settings():
    """torchao's recommended Inductor settings (``recommended_inductor_config_setter``: coordinate
    descent tuning and the rest), for the compiles inside the block only: torchao's models compile as
    torchao recommends, the dense and BLAST models of the same process as they would alone. The
    whole Inductor configuration is restored on the way out, exceptions included."""
    from torch._inductor import config
    from torchao.quantization.utils import recommended_inductor_config_setter

    saved = config.get_config_copy()
    recommended_inductor_config_setter()
    try:
        yield
    finally:
        config.load_config(saved)


def decoder_linears(model) -> dict[str, torch.nn.Module]:
    """The linears ``blastfx.compress`` picks with its default config, by name: for an HF decoder those
    of its repeated blocks (SmolLM2-135M: 210), not the embeddings nor ``lm_head``. The dense
    baselines quantize exactly these, so their bytes compare with the compressed layers'."""
    import blastfx
    from blastfx.api import selected_layers

    names = selected_layers(blastfx.analyze(model), blastfx.BlastConfig())
    return {name: model.get_submodule(name) for name in names}


def int4_rtn(weight: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, int]:
    """torchao's int4 weight-only quantization (``Int4WeightOnlyConfig``) of one (out, in) weight:
    its dequantized value, in the weight's dtype, and the bytes it is stored in.

    Asymmetric round-to-nearest over groups of ``group_size`` input columns, in torchao's float
    zero point form (``_choose_qparams_affine_tinygemm``, ``_quantize_affine_tinygemm``): per group
    ``scale = (max - min) / 15`` and ``zero = min + 8 * scale``, both stored in bf16; codes
    ``q = clamp(round((w - (zero - 8 * scale)) / scale), 0, 15)`` from the stored values; dequantized
    ``(q - 8) * scale + zero``. The arithmetic is float32 (torchao's runs in the bf16 weight's dtype,
    so a code can differ by one where a value falls on a rounding boundary).

    Stored: the uint4 codes (half a byte each) and a bf16 scale and zero per group (4 bytes).

    Ragged groups: where ``in_features`` is not a multiple of ``group_size`` the last group of each
    row is shorter (its own scale and zero over the remaining columns) and stored as a full group's
    parameters. torchao instead leaves such a layer unquantized (SmolLM2-135M: every layer with 576
    inputs, 180 of its 210), so this is the scheme at its intended bytes, not torchao's model.
    """
    if weight.dim() != 2:
        raise ValueError(f"int4_rtn quantizes a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    out_features, in_features = weight.shape
    pad = -in_features % group_size
    w = weight.detach().float()
    if pad:                                     # repeat the last column: the short group's min and max stay its own
        w = torch.cat([w, w[:, -1:].expand(-1, pad)], dim=1)
    groups = w.view(out_features, -1, group_size)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    bf16 = torch.bfloat16
    scale = ((hi - lo) / 15).clamp(min=torch.finfo(bf16).smallest_normal).to(bf16).float()
    zero = (lo + 8 * scale).to(bf16).float()
    codes = ((groups - (zero - 8 * scale)) / scale).round().clamp(0, 15)
    dequantized = ((codes - 8) * scale + zero).view(out_features, -1)[:, :in_features]
    stored = (out_features * in_features + 1) // 2 + 4 * out_features * groups.shape[1]
    return dequantized.to(weight.dtype), stored


def int4_weight_only_(model, group_size: int = 128, layers: dict | None = None) -> int:
    """Replace the weight of every linear in ``layers`` (default :func:`decoder_linears`) by its int4
    weight-only quantized value (:func:`int4_rtn`), in place; returns the bytes those layers would be
    stored in (codes, scales and zeros; biases in bf16). A fake-quantized model: it runs anywhere
    at the dtype it had, and its perplexity is that of torchao's int4 weight-only scheme."""
    layers = decoder_linears(model) if layers is None else layers
    total = 0
    with torch.no_grad():
        for name, layer in layers.items():
            if not isinstance(layer, torch.nn.Linear):
                raise ValueError(f"int4_weight_only_ quantizes nn.Linear layers; {name} is {type(layer).__name__}")
            dequantized, stored = int4_rtn(layer.weight, group_size)
            layer.weight.copy_(dequantized)
            total += stored + (2 * layer.bias.numel() if layer.bias is not None else 0)
    return total


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's quantized weights) by its inner tensors."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()
