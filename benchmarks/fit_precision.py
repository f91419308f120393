"""The calibrated BLAST fit in IEEE fp32 against TF32 products, on a real model's layers.

    python benchmarks/fit_precision.py                           # SmolLM2-135M's 30 o_proj, one batch
    python benchmarks/fit_precision.py --layer mlp.down_proj --rank 200

Why: ``BlastConfig(fit_precision="tf32")`` runs the fit's large products on CUDA tensor cores, whose
operands keep 10 mantissa bits. On random weights that reaches fp32's error; a real model's input
covariances have outlier channels, and there the rounding breaks fits. This fits the named layer of
every decoder block as one batched problem, as ``compress`` does, with the layers' input covariances
and output Fisher from the calibration text (the loss-aware objective), once per precision, and
records the worst and median relative output error and the worst relative weight error.

On CUDA "tf32" is the real tensor-core setting. On a CPU, which has no TF32, every matmul inside the
fit gets its float32 operands rounded to TF32's 10-bit mantissa (round to nearest) first: the
products' inputs as the tensor cores see them, accumulated in fp32.
"""
from __future__ import annotations

import argparse
import contextlib

import torch
from torch.overrides import TorchFunctionMode

import blastfx.structures.blast.factorize as factorize_module
from blastfx.statistics.collect import collect_covariances, collect_output_fisher
from blastfx.structures.blast.factorize import factorize
from common import place_on_gpu_if_any, smollm2_setup
from rows import add_arguments, measurements, record

MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.bmm,
           torch.mm, torch.Tensor.bmm, torch.Tensor.mm, torch.baddbmm, torch.addmm}


def to_tf32(x):
    """float32 ``x`` rounded to nearest at TF32's 10-bit mantissa (other tensors and values unchanged)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


class EmulatedTF32(TorchFunctionMode):
    """Every matmul's float32 operands rounded to TF32 before an fp32 product."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            args = tuple(to_tf32(a) for a in args)
        return func(*args, **(kwargs or {}))


real_precision = factorize_module.matmul_precision      # the library's context, put back after the run


@contextlib.contextmanager
def precision_on_cpu(precision, device):
    """The fit's precision context with TF32 emulated where the fit runs on a CPU."""
    if precision == "tf32" and torch.device(device).type == "cpu":
        with EmulatedTF32():
            yield
    else:
        with real_precision(precision, device):
            yield


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", default="self_attn.o_proj", help="which linear of each decoder block")
    ap.add_argument("--rank", type=int, default=136, help="BLAST rank (136: half of a 576x576 layer's parameters)")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--iters", type=int, default=100, help="ALS iterations (the recovery recipe's)")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    add_arguments(ap)
    args = ap.parse_args()
    dense, _, _, _, calib = smollm2_setup(None, 1, args.calib_tokens)
    where = place_on_gpu_if_any(dense)
    names = [f"model.layers.{i}.{args.layer}" for i in range(len(dense.model.layers))]
    covariances, fisher = collect_covariances(dense, names, calib), collect_output_fisher(dense, names, calib)
    modules = dict(dense.named_modules())
    W = torch.stack([modules[n].weight.detach().float() for n in names])
    C = torch.stack([covariances[n].float() for n in names])
    F = torch.stack([fisher[n].float() for n in names])
    factorize_module.matmul_precision = precision_on_cpu      # the fit's own context, emulated on a CPU
    case = (f"SmolLM2-135M {len(names)} x {args.layer} {tuple(W.shape[1:])} rank {args.rank} b={args.blocks} "
            f"{args.iters} iters calib={args.calib_tokens}")
    print(f"{where}: {case}", flush=True)
    metrics = []
    try:
        for precision in ("fp32", "tf32"):
            fit = factorize(W, args.rank, args.blocks, calibration=C, output_weights=F, iters=args.iters,
                            precision=precision)
            out, weight = fit.output_error.double(), fit.rel_error.double()
            label = precision if precision == "fp32" or W.is_cuda else "tf32 (emulated)"
            print(f"  {label}: output error worst {out.max():.4g}, median {out.median():.4g}; weight error worst "
                  f"{weight.max():.4g}; {fit.iterations} iterations", flush=True)
            metrics += [(f"{label} worst output error", round(out.max().item(), 4), ""),
                        (f"{label} median output error", round(out.median().item(), 4), ""),
                        (f"{label} worst weight error", float(f"{weight.max().item():.4g}"), ""),
                        (f"{label} iterations", fit.iterations, "")]
    finally:
        factorize_module.matmul_precision = real_precision
    record("fit_precision", measurements(case, {"layer": args.layer, "rank": args.rank, "blocks": args.blocks,
                                                "iters": args.iters, "calib_tokens": args.calib_tokens}, metrics),
           directory=args.results_dir)


if __name__ == "__main__":
    main()
