"""Where a distillation step's time goes: SmolLM2-135M-shaped Llama (random init, so no model file is
needed), budget 0.8, batch 32 x 512 under bf16 autocast, exactly finetune()'s step. Prints median ms
per phase for dense-student, blastfx eager and blastfx compiled, then the top CUDA kernels of each.

    python benchmarks/train_step_profile.py [--steps 12] [--batch 32] [--whole]

Rows: the dense model trained as the student, blastfx eager, blastfx with each decoder block compiled
(``compile_blocks``, what recovery uses) and, with ``--whole``, the whole forward compiled. Each row is
recorded in benchmarks/results/train_step_profile.csv as it finishes.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

import blastfx
from blastfx.config import BlastConfig
from blastfx.compiler import compile_blocks
from blastfx.llm.recovery import no_cache_kwargs, distillation_loss, trainable_parameters
from common import versions
from rows import add_arguments, measurements, record

PHASES = [("teacher forward", "ms"), ("student forward + loss", "ms"), ("backward", "ms"), ("clip + AdamW", "ms")]


def smollm2_shaped() -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def phases(student, teacher, params, opt, ids):
    """One finetune() step, synchronizing between phases so each one's time is its own."""
    marks = [time.perf_counter()]
    auto = torch.autocast("cuda", dtype=torch.bfloat16)
    with torch.no_grad(), auto:
        t_logits = teacher(input_ids=ids, **no_cache_kwargs(teacher)).logits
    torch.cuda.synchronize(); marks.append(time.perf_counter())
    with auto:
        s_logits = student(input_ids=ids, **no_cache_kwargs(student)).logits
    loss = distillation_loss(s_logits[:, :-1], t_logits[:, :-1])
    torch.cuda.synchronize(); marks.append(time.perf_counter())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.cuda.synchronize(); marks.append(time.perf_counter())
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    torch.cuda.synchronize(); marks.append(time.perf_counter())
    return [1e3 * (b - a) for a, b in zip(marks, marks[1:])]


def measure(name, student, teacher, ids, steps, params, args):
    opt = torch.optim.AdamW(params, lr=1e-5)
    t0 = time.perf_counter()
    phases(student, teacher, params, opt, ids)            # compile / autotune / warm caches
    first = time.perf_counter() - t0
    rows = [phases(student, teacher, params, opt, ids) for _ in range(steps)]
    med = [sorted(col)[len(col) // 2] for col in zip(*rows)]
    print(f"| {name} | {first:.1f} | {med[0]:.1f} | {med[1]:.1f} | {med[2]:.1f} | {med[3]:.1f} | {sum(med):.1f} |",
          flush=True)
    case = name + (f" batch={args.batch}" if args.batch != 32 else "")
    config = {"student": name, "budget": args.budget, "batch": args.batch, "seq": 512, "steps": steps}
    record("train_step_profile", measurements(case, config, [
        ("first step", round(first, 1), "s"),
        *[(phase, round(ms, 1), unit) for (phase, unit), ms in zip(PHASES, med)],
        ("step", round(sum(med), 1), "ms")]), directory=args.results_dir)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        phases(student, teacher, params, opt, ids)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--budget", type=float, default=0.8)
    ap.add_argument("--whole", action="store_true", help="also time the whole forward compiled (slow cold start)")
    add_arguments(ap)
    args = ap.parse_args()
    torch.manual_seed(0)
    teacher = smollm2_shaped().cuda().eval()
    ids = torch.randint(0, 49152, (args.batch, 512), device="cuda")
    print(versions(), f"; batch {args.batch} x 512, bf16 autocast, fp32 master weights\n", flush=True)
    print("| student | first step s | teacher fwd ms | student fwd+loss ms | backward ms | clip+AdamW ms | step ms |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    tables = {}
    dense = copy.deepcopy(teacher).train()
    params = [p for n, p in dense.named_parameters() if "embed" not in n]
    tables["dense"] = measure("dense (all linears trained)", dense, teacher, ids, args.steps, params, args)
    del dense
    model = copy.deepcopy(teacher)
    blastfx.compress(model, args.budget, config=BlastConfig(init="random", progress=False))
    params = trainable_parameters(model)
    model.train()
    tables["blastfx eager"] = measure(f"blastfx {args.budget} eager", model, teacher, ids, args.steps, params,
                                      args)
    blocks = compile_blocks(model)
    tables["blastfx per-block compiled"] = measure(f"blastfx {args.budget} compile_blocks", model, teacher, ids,
                                                   args.steps, params, args)
    blocks.undo()
    if args.whole:
        compiled = copy.copy(model)
        compiled.forward = torch.compile(model.forward, backend="blast")
        tables["blastfx compiled"] = measure(f"blastfx {args.budget} whole forward compiled", compiled, teacher,
                                             ids, args.steps, params, args)
    for name, table in tables.items():
        print(f"\n### {name}: top CUDA kernels, one step\n```\n{table}\n```", flush=True)


if __name__ == "__main__":
    main()
