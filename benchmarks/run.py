"""One entry point for the benchmarks.

    python benchmarks/run.py --list                           # name, GPU?, rough duration, what it measures
    python benchmarks/run.py layer_speed --tokens 1 16        # run one; arguments after the name go to it
    python benchmarks/run.py --deadline 30 quality_smollm2    # stop it after 30 minutes

Each benchmark is a script in this folder that prints its table and records its rows in
``benchmarks/results/<name>.csv`` (``rows.record``) as each case finishes, so a run stopped by
``--deadline`` (or Ctrl-C) keeps the rows it wrote. ``python benchmarks/report.py`` then regenerates
``RESULTS.md``. ``run.py``'s own options come before the name: everything after it is the script's
(``recovery_smollm2.py`` has a ``--deadline`` of its own, which shortens its training instead).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Benchmark:
    script: str          # file in benchmarks/
    title: str           # section heading in RESULTS.md
    measures: str        # one line for --list
    gpu: str             # "yes": needs CUDA; "optional": runs on a CPU too, much slower; "no": CPU timings
    duration: str        # rough wall clock of the default arguments
    reading: str         # what the numbers mean: the one or two sentences heading its tables in RESULTS.md
    also: tuple = ()     # result files it writes beside its own: (name, title, reading) each


REGISTRY: dict[str, Benchmark] = {
    "factorize_speed": Benchmark(
        "factorize_speed.py", "Factorization speed",
        "seconds for the default ALS to reach the error of 300 PrecGD iterations (the BLAST paper's)",
        "no", "2 min CPU, 1 min GPU",
        "Time for `blastfx.factorize`'s default ALS to reach the relative Frobenius error that 300 iterations "
        "of the paper's PrecGD reach on the same synthetic weight (sigma_k = k^-0.5), and the ratio of the two; "
        "\"converged\" is ALS run to its own stopping rule."),
    "quality_smollm2": Benchmark(
        "quality_smollm2.py", "Quality without retraining: SmolLM2-135M-Instruct",
        "held-out perplexity after compressing every decoder linear, per budget and method",
        "optional", "40 min CPU, 5 min GPU",
        "Held-out Wikipedia perplexity (32 windows of 512 tokens from articles never used for fitting) after "
        "compressing all 210 decoder linears, no retraining; \"x dense\" is the ratio to the dense model's "
        "perplexity in the same run. Methods and their options: `python benchmarks/quality_smollm2.py --help`."),
    "recovery_smollm2": Benchmark(
        "recovery_smollm2.py", "Recovery by distillation: SmolLM2-135M-Instruct",
        "held-out perplexity before and after a time-boxed distillation of the dense model's logits",
        "optional", "10 min GPU (24-min recipes: 27)",
        "Held-out perplexity (as in the quality table) of the compressed model before and after `blastfx.finetune` "
        "distils the dense model's logits into it for the given minutes of wall clock, compile time included; "
        "\"gen\" is the number of 512-token training rows the dense model wrote beside the real text."),
    "layer_speed": Benchmark(
        "layer_speed.py", "One layer at 50% of its parameters",
        "dense vs low-rank vs blastfx time of one linear layer, per shape, block count and token count",
        "yes", "3 min",
        "One bf16 linear layer compressed to half its parameters, each call replayed from a CUDA graph over "
        "enough weight copies to stream them from HBM; \"blastfx vs dense\" is dense time / blastfx time in the "
        "same process (above 1: faster than dense)."),
    "group_speed": Benchmark(
        "group_speed.py", "Sibling layers grouped (q/k/v, gate/up), gated MLPs chained, block tails and seams",
        "dense vs blastfx one call per layer vs grouped (and, for MLPs, chained) calls, and a block's tail and seam "
        "as their parts vs one call, Llama-2-7B and Llama-3-8B",
        "yes", "4 min",
        "Layers that read the same input at half their parameters (budget 0.5, b = 4): all of them dense, each "
        "BLAST layer called on its own, and one grouped call (what `backend=\"blast\"` runs at decode sizes; "
        "with `--factor-dtype`, also with quantized factors); "
        "gated MLPs (`down(silu(gate(x)) * up(x))`) also as one chained call, the autotuner's pick of the "
        "three-launch chain and the grouped form; a block's tail (o_proj, the residual add, the RMSNorm, the MLP) "
        "and seam (the tail, the add, the next norm and q/k/v) as their parts run and as one call, dense and "
        "the parts running each residual add and its norm as one launch (the tail and seam rows of commit "
        "6923262 ran them as eager ops); \"x\" columns are dense time / blastfx time in the same process."),
    "decode_stages": Benchmark(
        "decode_stages.py", "Decode kernels: time per stage",
        "per-stage time and bandwidth of the decode kernels, each launch mode, a Llama block's linears in a row, and the launch model's ceilings, vs dense",
        "yes", "2 min",
        "One decode-sized BLAST call (budget 0.5) split into its stages: stage 1 streams V, stage 2 streams U; "
        "each bandwidth is the factor bytes over the stage's time, beside a dense GEMV's on the same GPU. "
        "The block rows call the seven linears of Llama-2-7B blocks in a row (weights from HBM). "
        "The launch model row fits dense GEMVs of six sizes to time = fixed cost per launch + bytes / marginal "
        "bandwidth; each shape's \"one-launch\" and \"two-launch ceiling\" is the speedup that many launches "
        "streaming the BLAST factors would reach if each cost what a dense GEMV's launch does.",
        also=(("decode_stage_sweep", "Decode kernels: the fastest tiles of each stage",
               "`decode_stages --sweep`: each stage of the GEMV decode kernel timed alone over a grid of tile "
               "configs (tiles, warps, pipeline stages, programs per SM); the fastest configs of each stage, time "
               "and bandwidth of its factor bytes."),)),
    "compress_speed": Benchmark(
        "compress_speed.py", "Compress time and memory: Llama shapes",
        "wall time per pipeline stage and peak GPU memory of compress, resident or streamed from the CPU",
        "yes", "3 min (4 blocks of the 7B shape)",
        "`blastfx.compress` at budget 0.5 on a Llama-shaped model (random weights, bf16) with a few of its decoder "
        "blocks: wall time per pipeline stage (`blastfx.stage_times`), seconds per block and the full model's time "
        "scaled by its block count, peak GPU memory beyond the weights on the GPU (streamed: the model stays on "
        "the CPU), and the final hidden states' relative error on held-out tokens, to compare recipes at equal error."),
    "llama_e2e": Benchmark(
        "llama_e2e.py", "End to end: Llama-2-7B shape",
        "decode tok/s, prefill and training-step time of a Llama-2-7B-shaped model, dense vs blastfx 0.5",
        "yes", "8 min",
        "A random-init Llama-2-7B-shaped model (bf16, 32 layers) against its `compress(model, 0.5)` version in "
        "one process; \"blastfx vs dense\" is the speed ratio (above 1: blastfx is faster). Each \"vs dense\" "
        "ratio is against dense timed in its own process; where a row holds several runs (its command column), "
        "the dense column shows the newest run's, and dense varies by about 10% between processes.",
        also=(("llama_e2e_kernels", "End to end: the top kernels of a decode step",
               "`llama_e2e --profile`: the kernels that take the most time in one decode step of each model "
               "(CUDA-graph replays), by name with their category: time and launches per step, time per launch."),)),
    "step_overhead": Benchmark(
        "step_overhead.py", "CPU time of a compiled decode step",
        "per-step CPU time of a compiled decode step, dense vs blastfx, with and without blastfx.inference_options()",
        "yes", "4 min (8 layers)",
        "A Llama-shaped model with few layers (random weights, bf16, budget 0.5), its decode step compiled and "
        "replayed as a CUDA graph: the step's CPU time (the call returns before the GPU is done), the step followed "
        "by a sync (CPU and GPU in series, as in HF `generate`), the step in a loop without syncs, and dynamo's "
        "guard check alone; \"inference options\" compiles with `blastfx.inference_options()`."),
    "grad_mix_speed": Benchmark(
        "grad_mix_speed.py", "Backward middle (blast_grad_mix)",
        "the backward's mixes and dS: plain-PyTorch reference vs the Triton kernel",
        "yes", "1 min",
        "Median time of the backward's middle (the two mixes and dS, one memory-bound pass) on bf16 inputs "
        "from HBM, and the kernel's achieved bandwidth; \"op runs\" is the path the CUDA op dispatches to."),
    "train_step_profile": Benchmark(
        "train_step_profile.py", "Distillation step profile",
        "per-phase time of one distillation step on a SmolLM2-135M-shaped model (dense, eager, compiled)",
        "yes", "2 min (--whole: 5 min)",
        "Median time of each phase of one `finetune` step (batch 32 x 512, bf16 autocast) on a random-init "
        "SmolLM2-135M-shaped model at budget 0.8; \"first step\" includes compiling."),
    "quality_quantized": Benchmark(
        "quality_quantized.py", "Quantized factors: SmolLM2-135M-Instruct",
        "held-out perplexity and bytes with U and V stored as int8 (rounded inside the calibrated fit) vs float",
        "optional", "4 min per case CPU, 1 min GPU",
        "Held-out perplexity (as in the quality table) of SmolLM2-135M-Instruct compressed with the default recipe, "
        "its BLAST factors U and V stored as `factor_dtype` codes with float32 scales (S and biases float); "
        "\"bytes vs bf16 dense\" is the compressed layers' stored bytes over the same layers dense in bf16."),
    "quantized_speed": Benchmark(
        "quantized_speed.py", "Quantized factors: one layer at decode",
        "T=1 time of one layer: int8 or int4 BLAST (GEMV reading codes) vs bf16 BLAST vs bf16 dense",
        "yes", "2 min",
        "One linear layer at T = 1 (budget 0.5, b = 4), each call replayed from a CUDA graph over enough weight "
        "copies to stream them from HBM: bf16 dense, bf16 BLAST and BLAST with `--factor-dtype` codes (int8 by "
        "default); \"x\" columns are dense time "
        "over the layer's time in the same process."),
    "quantized_rounding": Benchmark(
        "quantized_rounding.py", "Quantized factors: what rounding costs a real layer",
        "held-out output error of SmolLM2's 30 down_proj after rounding their BLAST factors, per format and method",
        "optional", "3 min CPU",
        "The named linear of every SmolLM2-135M-Instruct block fitted at the budget's rank (blocks 4x4, calibrated "
        "output objective), then its U and V rounded to each format: \"nearest\" rounds each code under "
        "absolute-maximum scales, \"rounds=k\" is `quantize_fitted` (refits, searched scales, error-feedback "
        "rounding of U, k rounds; 3 is the default). Errors are relative output errors on held-out text, mean and "
        "worst over the blocks, beside the float factors' own."),
    "quality_structures": Benchmark(
        "quality_structures.py", "Structures: SS1 vs BLAST vs auto, without retraining and after distillation",
        "SmolLM2 perplexity and MiniLM embedding cosine, BLAST vs SS1 vs structure='auto' at equal budgets",
        "optional", "10 min per model and budget CPU",
        "The same dense model compressed with `BlastConfig(structure=...)` and otherwise the default recipe for "
        "its calibration data: SmolLM2-135M-Instruct by held-out perplexity (the quality "
        "table's protocol; \"x dense\" its ratio to dense), the all-MiniLM-L6-v2 sentence encoder by the "
        "cosine of held-out news sentences' embeddings to the dense model's; layer counts say what \"auto\" "
        "chose. Rows named \"kd=N\" are the same model after N steps of `blastfx.finetune` from the dense one "
        "(`--recover-steps N`: next-token KL for SmolLM2, token states for the encoder, on the calibration "
        "half of the corpus). Smaller calibration or evaluation sets than the defaults are named in the case."),
    "quality_encoder": Benchmark(
        "quality_encoder.py", "Recipes on a sentence encoder, in and out of domain: all-MiniLM-L6-v2",
        "MiniLM embedding cosine per recipe (calibrated / sequential / reconstructed), Wikipedia and news text",
        "optional", "15 min CPU",
        "The all-MiniLM-L6-v2 sentence encoder compressed with BLAST by each recipe (calibrated: every layer on "
        "the dense activations; sequential: each block on the compressed model's own inputs; reconstructed: "
        "sequential, then each block fitted to the dense block's outputs), calibrated on Wikipedia only, no "
        "retraining; the cosine of each sentence's embedding to the dense model's, mean and minimum, on "
        "held-out Wikipedia sentences and on news sentences (a domain calibration never saw)."),
    "fit_precision": Benchmark(
        "fit_precision.py", "Fit precision: fp32 vs TF32 products on a real model's layers",
        "worst and median output error of one batched calibrated fit of SmolLM2's 30 o_proj, fp32 vs TF32",
        "optional", "5 min CPU",
        "The named layer of all 30 SmolLM2-135M-Instruct decoder blocks fitted as one batched problem (as "
        "`compress` does) with their input covariances and output Fisher on 8192 calibration tokens, with the "
        "fit's large products in IEEE fp32 and in TF32 (the tensor cores on CUDA; on a CPU every product's "
        "operands rounded to TF32 first). Output errors are relative, ||(W - What) X^T|| weighted as the fit "
        "weighs them; the weight error is ||W - What|| / ||W||, whose worst case shows a fit that broke down."),
    "als_iterations": Benchmark(
        "als_iterations.py", "Calibrated ALS iterations",
        "output error of calibrated ALS after 30 / 100 / 300 iterations on real SmolLM2 layers",
        "no", "30 min",
        "Relative output error ||(W - What) C^1/2|| / ||W C^1/2|| on 8192 calibration tokens of one SmolLM2 "
        "layer at 80% of its parameters, after a fixed number of ALS iterations (no early stop)."),
}


def list_benchmarks(registry=REGISTRY) -> str:
    rows = [("name", "GPU", "duration", "measures")]
    rows += [(n, b.gpu, b.duration, b.measures) for n, b in registry.items()]
    widths = [max(len(r[k]) for r in rows) for k in range(3)]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    return "\n".join(lines + ["", "GPU: yes = needs CUDA; optional = runs on a CPU too, much slower; no = runs anywhere."])


def _interruptible() -> None:
    """In the benchmark's process before it starts: SIGINT back to its default action. A process
    started with SIGINT ignored (run.py in a background job or under nohup) passes that on, and
    Python then never raises KeyboardInterrupt, so the deadline's interrupt would not let the
    benchmark's cleanups run."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Interrupt the benchmark's process group (KeyboardInterrupt: its cleanups run), then terminate,
    then kill, each after ``grace`` seconds."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run(name: str, args: list[str], deadline: float | None = None, registry=REGISTRY,
        grace: float = 10.0) -> int:
    """Run one benchmark's script as a subprocess; returns its exit status (124 when the deadline
    stopped it, 130 on Ctrl-C). The rows it recorded before stopping stay recorded."""
    bench = registry[name]
    script = (HERE / bench.script).resolve()
    proc = subprocess.Popen([sys.executable, str(script), *args], start_new_session=True, preexec_fn=_interruptible)
    try:
        return proc.wait(timeout=None if deadline is None else deadline * 60)
    except subprocess.TimeoutExpired:
        _stop(proc, grace)
        print(f"run.py: stopped {name} at its {deadline:g}-minute deadline; rows it recorded are kept",
              file=sys.stderr, flush=True)
        return 124
    except KeyboardInterrupt:
        _stop(proc, grace)
        print(f"run.py: {name} interrupted; rows it recorded are kept", file=sys.stderr, flush=True)
        return 130


def main(argv: list[str] | None = None, registry=REGISTRY) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Options of run.py come before NAME; the rest goes to the benchmark.")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--deadline", type=float, default=None, metavar="MINUTES",
                    help="stop the benchmark after this many minutes (the rows it recorded stay)")
    ap.add_argument("name", nargs="?", help="benchmark to run (see --list)")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark's script")
    ns = ap.parse_args(argv)
    if ns.list:
        print(list_benchmarks(registry))
        return 0
    if ns.name is None:
        ap.error("name a benchmark (python benchmarks/run.py --list shows them)")
    if ns.name not in registry:
        ap.error(f"unknown benchmark {ns.name!r}; known: {', '.join(registry)}")
    if ns.deadline is not None and not ns.deadline > 0:
        ap.error(f"--deadline must be a positive number of minutes, got {ns.deadline}")
    if registry[ns.name].gpu == "yes":
        import torch
        if not torch.cuda.is_available():
            ap.error(f"{ns.name} needs a CUDA GPU and torch sees none")
    return run(ns.name, ns.args, ns.deadline, registry)


if __name__ == "__main__":
    sys.exit(main())
