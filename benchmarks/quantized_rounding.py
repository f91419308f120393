"""How much rounding BLAST factors to int8, float8 or int4 costs a real layer, by rounding method.

    python benchmarks/quantized_rounding.py                       # SmolLM2-135M's 30 mlp.down_proj at budget 0.5
    python benchmarks/quantized_rounding.py --layer self_attn.o_proj --budget 0.8

Why: the quality tables measure whole models; this isolates the rounding. The named linear of every
decoder block is fitted as one batched problem at the budget's rank (blocks 4x4, the calibrated
output objective on the calibration text, as ``compress`` fits it), then its factors are rounded:

* ``nearest``: each code the nearest to its value under absolute-maximum scales, nothing refitted
  (``round_factors``);
* ``rounds=k``: ``quantize_fitted``, which refits the float factors around the rounded ones, with
  searched scales and error-feedback rounding of U, ``k`` rounds (3 is the library's default).

Each is scored by its relative output error on *held-out* text (the held-out windows' input
covariance, never seen by the fit or the rounding): the mean and worst over the blocks, next to the
float factors' own error.
"""
from __future__ import annotations

import argparse

import torch

from blastfx.plan.allocation import rank_for as planned_rank
from blastfx.statistics.collect import collect_covariances
from blastfx.structures.blast.factorize import factorize
from blastfx.structures.blast.quant import formats, quantize_fitted, round_factors
from common import place_on_gpu_if_any, smollm2_setup
from rows import add_arguments, measurements, record

ROUNDS = (1, 3)


def output_errors(W, What, C) -> torch.Tensor:
    """Per matrix ||(W - What) C^1/2|| / ||W C^1/2||, in float64."""
    W, What, C = W.double(), What.double(), C.double()
    E = W - What
    return (((E @ C) * E).sum((1, 2)) / ((W @ C) * W).sum((1, 2))).sqrt()


def rank_for(budget: float, m: int, n: int, blocks: int) -> int:
    """The rank a uniform plan gives the layer at ``budget`` (BLAST parameters m r + n r + blocks^2 r
    at most ``budget`` of m n, a multiple of 8): the planner's own rule."""
    return planned_rank(m, n, (blocks, blocks), budget, 8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", default="mlp.down_proj", help="which linear of each decoder block")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--iters", type=int, default=30, help="ALS iterations (compress's default)")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--eval-windows", type=int, default=16, help="held-out 512-token windows scoring the errors")
    ap.add_argument("--formats", nargs="+", default=list(formats.names()), choices=formats.names())
    add_arguments(ap)
    args = ap.parse_args()
    dense, _, _, windows, calib = smollm2_setup(None, args.eval_windows, args.calib_tokens)
    where = place_on_gpu_if_any(dense)
    names = [f"model.layers.{i}.{args.layer}" for i in range(len(dense.model.layers))]
    fit_cov = collect_covariances(dense, names, calib)
    heldout_cov = collect_covariances(dense, names, [{"input_ids": w.unsqueeze(0)} for w in windows])
    modules = dict(dense.named_modules())
    W = torch.stack([modules[n].weight.detach().float() for n in names])
    C = torch.stack([fit_cov[n].float() for n in names])
    H = torch.stack([heldout_cov[n].float() for n in names])
    m, n = W.shape[1:]
    rank = rank_for(args.budget, m, n, args.blocks)
    case = (f"SmolLM2-135M {len(names)} x {args.layer} {m}x{n} budget {args.budget:g} rank {rank} "
            f"b={args.blocks} calib={args.calib_tokens}")
    print(f"{where}: {case}", flush=True)
    fitted = factorize(W, rank, args.blocks, calibration=C, iters=args.iters)
    config = {"layer": args.layer, "budget": args.budget, "rank": rank, "blocks": args.blocks, "iters": args.iters,
              "calib_tokens": args.calib_tokens, "eval_windows": args.eval_windows}
    rows = []

    def add(label, err):
        print(f"  {label}: held-out output error mean {err.mean():.4f}, worst {err.max():.4f}", flush=True)
        rows.extend(measurements(f"{case}: {label}", {**config, "factors": label}, [
            ("mean output error", round(err.mean().item(), 4), ""), ("worst output error", round(err.max().item(), 4), "")]))

    add("float", output_errors(W, fitted.to_dense(), H))
    for name in args.formats:
        add(f"{name} nearest", output_errors(W, round_factors(fitted, name).to_dense(), H))
        for k in ROUNDS:
            add(f"{name} rounds={k}", output_errors(W, quantize_fitted(W, fitted, name, calibration=C, rounds=k).to_dense(), H))
    record("quantized_rounding", rows, directory=args.results_dir)


if __name__ == "__main__":
    main()
