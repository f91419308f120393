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


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build(layers, hidden=4096, inter=11008, heads=32):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=32000, max_position_embeddings=4096)
    with torch.device(DEVICE):
        return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def decode_tps(model, backend, new_tokens):
    from transformers import StaticCache
    ids = torch.randint(0, 32000, (1, 16), device=DEVICE)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
              disable_compile=True)        # we compile forward ourselves, with the backend under test
    compiled = torch.compile(model.forward, backend=backend, mode="reduce-overhead", fullgraph=False)

    def forward(*args, **kwargs):       # each decode step is a new CUDA-graph step (static cache is
        torch.compiler.cudagraph_mark_step_begin()      # updated in place between steps)
        return compiled(*args, **kwargs)

    model.forward = forward
    for _ in range(2):
        model.generate(ids, **kw)
    sync()
    t0 = time.perf_counter()
    out = model.generate(ids, **kw)
    sync()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return new_tokens / (time.perf_counter() - t0)


@torch.no_grad()
def prefill_ms(model, T):
    ids = torch.randint(0, 32000, (1, T), device=DEVICE)
    if DEVICE == "cpu":
        t0 = time.perf_counter()
        model(ids, use_cache=False)
        return (time.perf_counter() - t0) * 1e3
    return median_ms(lambda k: model(ids, use_cache=False), 1, warmup=2, reps=5)


def train_step_ms(layer_fn, T):
    x = torch.randn(T, layer_fn.in_features, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    def step(_):
        y = layer_fn(x)
        y.backward(torch.ones_like(y))
    return median_ms(step, 1, warmup=3, reps=10)


def train_step_table(args):
    h, T = args.hidden, args.train_tokens
    dense_layer = torch.nn.Linear(h, h, bias=False, device=DEVICE, dtype=torch.bfloat16)
    r = int(args.budget * h * h / (2 * h + 16)) // 16 * 16
    blast_layer = blastfx.BlastLinear(h, h, r, 4, bias=False, device=DEVICE, dtype=torch.bfloat16)
    td, tb = train_step_ms(dense_layer, T), train_step_ms(blast_layer, T)
    print(f"training step (fwd+bwd) {h}x{h} at T={T}: dense {td:.3f} ms, blastfx b=4 r={r} {tb:.3f} ms "
          f"({td / tb:.2f}x)\n", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--train-tokens", type=int, default=4096)
    args = ap.parse_args()
    print(versions() if DEVICE == "cuda" else f"CPU; torch {torch.__version__}", flush=True)
    if DEVICE == "cuda":       # first: quick, and independent of the (slow to compile) model runs
        train_step_table(args)
    rows = []
    for name in ("dense", "blastfx"):
        torch._dynamo.reset()
        model = build(args.layers, args.hidden, args.inter, args.heads)
        backend = "inductor"
        if name == "blastfx":
            blastfx.compress(model, args.budget, config=BlastConfig(init="random", progress=False))
            backend = "blast"
        print(f"{name}: built{' and compressed' if name == 'blastfx' else ''} "
              f"({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params); compiling + decoding", flush=True)
        tps = decode_tps(model, backend, args.new_tokens)
        pre = prefill_ms(model, args.prefill)
        rows.append((name, tps, pre))
        print(f"{name}: decode {tps:.1f} tok/s, prefill {args.prefill} tokens {pre:.1f} ms", flush=True)
        del model
        torch.cuda.empty_cache()
    (_, d_tps, d_pre), (_, b_tps, b_pre) = rows
    print(f"\n| model | decode tok/s | x dense | prefill {args.prefill} ms | x dense |\n|---|---|---|---|---|")
    print(f"| dense (inductor) | {d_tps:.1f} | 1.00 | {d_pre:.1f} | 1.00 |")
    print(f"| blastfx {args.budget} (blast) | {b_tps:.1f} | {b_tps / d_tps:.2f} | {b_pre:.1f} | {d_pre / b_pre:.2f} |")


if __name__ == "__main__":
    main()
