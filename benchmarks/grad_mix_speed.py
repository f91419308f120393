"""The backward's middle (``blastfx::blast_grad_mix``): plain-PyTorch reference vs the Triton kernel.

    python benchmarks/grad_mix_speed.py

One call reads z (b_in, T, r) and gw (b_out, T, r) and writes w and gz of the same sizes (plus a
small dS), so it is memory-bound: the table gives each path's median ms, the kernel's achieved
bandwidth and which of the two the CUDA op dispatches to. Shapes: SmolLM2's distillation step
(batch 32 x 512 tokens, budget 0.8) and the Llama-2-7B layer of the training-step benchmark
(T = 4096, budget 0.5). bf16, inputs rotated over enough copies that they come from HBM. Each shape's
row is recorded in benchmarks/results/grad_mix_speed.csv.
"""
from __future__ import annotations

import argparse

import torch

from blastfx.kernels.backward import grad_mix_triton, kernel_beats_reference
from blastfx.structures.blast.ops import grad_mix_reference
from common import copies_for, median_ms, versions
from rows import add_arguments, measurements, record

# (name, b_out, b_in, T, r)
SHAPES = [
    ("SmolLM2 576x576, 0.8", 4, 4, 16384, 224),
    ("SmolLM2 1536x576, 0.8", 4, 4, 16384, 328),
    ("Llama 4096x4096, 0.5", 4, 4, 4096, 1008),
    ("Llama 11008x4096, 0.5", 4, 4, 4096, 1488),
    ("Llama 4096x4096 b=16, 0.5", 16, 16, 4096, 992),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(ap)
    args = ap.parse_args()
    print(versions())
    print("\n| shape | b | T | r | reference ms | kernel ms | kernel GB/s | kernel vs reference | op runs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, b_out, b_in, T, r in SHAPES:
        bytes_per = 2 * (b_in + b_out) * T * r                       # z and gw in bf16
        n = copies_for(bytes_per, minimum=2)
        inputs = [(torch.randn(b_in, T, r, device="cuda", dtype=torch.bfloat16),
                   torch.randn(b_out, T, r, device="cuda", dtype=torch.bfloat16),
                   torch.randn(b_out, b_in, r, device="cuda", dtype=torch.bfloat16)) for _ in range(n)]
        ref = [t.float() for t in grad_mix_reference(*(t.float() for t in inputs[0]))]
        for out, want in zip(grad_mix_triton(*inputs[0]), ref):     # a wrong kernel must not get a time
            err = ((out.float() - want).norm() / want.norm()).item()
            assert err < 2e-2, (name, err)
        ref_ms = median_ms(lambda k: grad_mix_reference(*inputs[k]), n)
        ker_ms = median_ms(lambda k: grad_mix_triton(*inputs[k]), n)
        runs = "kernel" if kernel_beats_reference(b_out, b_in) else "reference"
        print(f"| {name} | {b_out} | {T} | {r} | {ref_ms:.3f} | {ker_ms:.3f} | {2 * bytes_per / ker_ms / 1e6:.0f} | "
              f"{ref_ms / ker_ms:.2f}x | {runs} |", flush=True)
        record("grad_mix_speed", measurements(
            name, {"b_out": b_out, "b_in": b_in, "T": T, "r": r, "dtype": "bfloat16"},
            [("reference time", round(ref_ms, 4), "ms"), ("kernel time", round(ker_ms, 4), "ms"),
             ("kernel bandwidth", round(2 * bytes_per / ker_ms / 1e6), "GB/s"),
             ("kernel vs reference", round(ref_ms / ker_ms, 2), "x"), ("op runs", runs, "")]),
            directory=args.results_dir)
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
