"""End to end: a Llama-2-7B-shaped LlamaForCausalLM (random init, bf16, 32 layers) compressed at 0.5.

    python benchmarks/llama_e2e.py [--layers 32]

Greedy decode of 256 tokens at batch 1 with CUDA graphs (torch.compile mode="reduce-overhead"):
dense under inductor vs blastfx under backend="blast"; prefill of 2048 tokens; one training step
(forward + backward) of a compressed 4096x4096 layer at T = 4096 vs dense.
"""
from __future__ import annotations

import argparse
import time

import torch

import blastfx
from blastfx import BlastConfig
from common import median_ms, versions


def build(layers):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    with torch.device("cuda"):
        return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


@torch.no_grad()
def decode_tps(model, backend, new_tokens):
    from transformers import StaticCache
    ids = torch.randint(0, 32000, (1, 16), device="cuda")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, cache_implementation="static")
    model.forward = torch.compile(model.forward, backend=backend, mode="reduce-overhead", fullgraph=False)
    for _ in range(2):
        model.generate(ids, **kw)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - t0)


@torch.no_grad()
def prefill_ms(model, T):
    ids = torch.randint(0, 32000, (1, T), device="cuda")
    return median_ms(lambda k: model(ids, use_cache=False), 1, warmup=2, reps=5)


def train_step_ms(layer_fn, T):
    x = torch.randn(T, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    def step(_):
        y = layer_fn(x)
        y.backward(torch.ones_like(y))
    return median_ms(step, 1, warmup=3, reps=10)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--budget", type=float, default=0.5)
    args = ap.parse_args()
    print(versions())
    rows = []
    for name in ("dense", "blastfx"):
        torch._dynamo.reset()
        model = build(args.layers)
        backend = "inductor"
        if name == "blastfx":
            blastfx.compress(model, args.budget, config=BlastConfig(init="random", progress=False))
            backend = "blast"
        tps = decode_tps(model, backend, args.new_tokens)
        pre = prefill_ms(model, 2048)
        rows.append((name, tps, pre))
        del model
        torch.cuda.empty_cache()
    (_, d_tps, d_pre), (_, b_tps, b_pre) = rows
    print(f"\n| model | decode tok/s | x dense | prefill 2048 ms | x dense |\n|---|---|---|---|---|")
    print(f"| dense (inductor) | {d_tps:.1f} | 1.00 | {d_pre:.1f} | 1.00 |")
    print(f"| blastfx {args.budget} (blast) | {b_tps:.1f} | {b_tps / d_tps:.2f} | {b_pre:.1f} | {d_pre / b_pre:.2f} |")
    dense_layer = torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
    r = int(args.budget * 4096 * 4096 / (8192 + 16)) // 16 * 16
    blast_layer = blastfx.BlastLinear(4096, 4096, r, 4, bias=False, device="cuda", dtype=torch.bfloat16)
    td, tb = train_step_ms(dense_layer, 4096), train_step_ms(blast_layer, 4096)
    print(f"\ntraining step (fwd+bwd) 4096x4096 at T=4096: dense {td:.3f} ms, blastfx b=4 r={r} {tb:.3f} ms "
          f"({td / tb:.2f}x)")


if __name__ == "__main__":
    main()
