"""End to end: a Llama-2-7B- or Llama-3-8B-shaped LlamaForCausalLM (random init, bf16, 32 layers) at 0.5.

    python benchmarks/llama_e2e.py [--model llama3-8b] [--layers 32] [--batch 1 8] [--only decode generate]
    python benchmarks/llama_e2e.py --only decode --factor-dtype int8 --torchao int8 int4   # equal-bytes baselines
    python benchmarks/llama_e2e.py --only decode --profile   # + kernel time per category of one decode step
    python benchmarks/llama_e2e.py --only decode --chain-norm never auto   # without and with block tails, one dense

Greedy decode of 256 tokens with CUDA graphs (torch.compile mode="reduce-overhead"), dense under
inductor vs blastfx under backend="blast", at each ``--batch``: a gpt-fast-style loop (``decode``)
and HF ``generate`` with a static cache and ``CompileConfig(backend=...)`` as the transformers docs
show (``generate``); prefill of 2048 tokens; one training step (forward + backward) of a compressed
4096x4096 layer at T = 4096 vs dense. ``--factor-dtype int8`` adds blastfx with int8 factors (a
quarter of dense's bytes at 0.5) and ``--torchao int8 int4`` torchao's weight-only quantized dense
models (``quantize_``, compiled by inductor), each against the same dense run. ``--ss1`` adds the
model compressed with ``structure="ss1"`` (the weight-only projection, one GEMM per layer).
``--profile`` (CUDA), after every timed row: each model's decode step compiled afresh and replayed
under ``torch.profiler``, its kernel time per :func:`kernel_category` (µs per step) and kernel count.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import re
import time

import torch

import blastfx
from blastfx import BlastConfig
from blastfx.compiler import CHAIN_NORM_DEFAULT
from blastfx.structures.blast.quant import quantize_model
from blastfx.structures.blast.quant.formats import FORMATS
from common import median_ms, tensor_bytes, torchao_compile_settings, torchao_weight_only, versions
from rows import add_arguments, measurements, record


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# blastfx's launched Triton kernels (its @triton.jit functions named *_kernel; a test checks the sources)
BLAST_KERNELS = frozenset({"_gemv_decode_kernel", "_gemv_group_kernel", "_blast_decode_kernel", "_xv_mix_kernel",
                           "_wu_kernel", "_mix_kernel", "_grad_mix_stream_kernel", "_ss1_kernel",
                           "_ss1_gemv_kernel", "_ss1_expand_kernel", "_mlp_mid_kernel",
                           "_dequantize_kernel", "_lead_kernel", "_ss1_fold_kernel", "_ss1_folded_gemm_kernel",
                           "_add_rms_norm_kernel"})
CATEGORIES = ("blast", "gemm", "attention", "other")        # kernel_category's answers
KERNEL_MARKS = (("other", ("triton_poi_", "triton_red_", "triton_per_")),   # Inductor's, named after their ops
                ("attention", ("flash", "fmha", "attention", "sdpa", "attn")),
                ("gemm", ("gemm", "gemv", "cublas", "cutlass", "nvjet", "xmma", "splitkreduce")))


def kernel_category(name: str) -> str:
    """A GPU kernel's category by its name: "blast" (blastfx's Triton kernels), then the first of
    ``KERNEL_MARKS`` whose marks the lower-cased name contains, else "other" (norms, copies, the rest)."""
    if BLAST_KERNELS.intersection(re.findall(r"\w+", name)):
        return "blast"
    return next((cat for cat, marks in KERNEL_MARKS if any(m in name.lower() for m in marks)), "other")


def top_kernels(events, steps: int, count: int = 12) -> list[tuple[str, str, float, float]]:
    """The ``count`` kernels that take the most time: (category, name cut to 80 characters, µs per
    step, launches per step), from the profiler's (name, µs) events of ``steps`` decode steps; a
    category total says how much time, this says which kernels (e.g. which cuBLAS GEMV ran a BLAST call)."""
    total, launches, category = {}, {}, {}
    for name, us in events:                     # summed under the cut name: templated names may share it
        cut = name[:80]
        total[cut] = total.get(cut, 0.0) + us / steps
        launches[cut] = launches.get(cut, 0) + 1 / steps
        category.setdefault(cut, kernel_category(name))
    ranked = sorted(total, key=total.get, reverse=True)[:count]
    return [(category[n], n, total[n], launches[n]) for n in ranked]


SHAPES = {   # the published configurations' shapes (random weights)
    "llama2-7b": dict(hidden=4096, inter=11008, heads=32, kv_heads=32, vocab=32000),
    "llama3-8b": dict(hidden=4096, inter=14336, heads=32, kv_heads=8, vocab=128256),
}


def build(layers, hidden=4096, inter=11008, heads=32, kv_heads=None, vocab=32000):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads or heads, vocab_size=vocab, max_position_embeddings=4096)
    with torch.device(DEVICE):
        return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class Decoder:
    """gpt-fast-style greedy decode on an HF model with a StaticCache: an eager prefill, then one
    compiled T=1 step (``dynamic=False``: one graph, one compile per model) replayed as a CUDA graph.
    HF ``generate`` would also compile the prompt shape and sync on its stopping checks every step."""

    def __init__(self, model, backend, prompt, new_tokens, batch=1, blast_options=None, compile_options=None):
        from transformers import StaticCache
        self.model, self.backend, self.prompt, self.new_tokens, self.batch = model, backend, prompt, new_tokens, batch
        self.cache = StaticCache(config=model.config, max_cache_len=prompt + new_tokens)
        self.ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=DEVICE)
        self.positions = torch.arange(prompt + new_tokens, device=DEVICE)
        # backend "blast" options travel beside CUDA graphs as one options dict (torch.compile takes a mode
        # or options, not both; the backend's "reduce-overhead" is Inductor's cudagraphs patch)
        self.blast_options = blast_options if backend == "blast" else None
        options = {**(compile_options or {}), **(self.blast_options or {})}
        self.compiled = (torch.compile(self.step, backend=backend, mode="reduce-overhead", dynamic=False)
                         if not options else
                         torch.compile(self.step, backend=backend, dynamic=False,
                                       options={"triton.cudagraphs": True, **options}))

    def step(self, tokens, positions):
        out = self.model(input_ids=tokens, past_key_values=self.cache, cache_position=positions, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def generate(self, compiled=True):
        self.cache.reset()
        tok = self.step(self.ids, self.positions[:self.prompt])          # eager prefill
        out = [tok]
        for k in range(self.prompt, self.prompt + self.new_tokens - 1):
            pos = self.positions[k:k + 1]
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()      # the static cache changes between steps
                tok = self.compiled(tok, pos).clone()
            else:
                tok = self.step(tok, pos)
            out.append(tok)
        return torch.cat(out, 1)

    def tokens_per_s(self):
        self.generate(compiled=False)                           # eager once: the op's autotuner sees T=1
        self.generate()                                         # compile + record the graph
        replayed = self.generate()
        sync()
        t0 = time.perf_counter()
        out = self.generate()
        sync()
        dt = time.perf_counter() - t0
        assert out.shape == (self.batch, self.new_tokens)
        print(f"  tokens equal in two replays: {(out == replayed).float().mean().item():.3f}", flush=True)
        return self.batch * self.new_tokens / dt

    @torch.no_grad()
    def kernel_profile(self, steps=16):
        """(µs per step by category and "total", kernels per step, how it ran) over ``steps`` decode
        steps replayed from the CUDA graph, or, where kineto records no kernels inside graph replays
        (fewer than two per layer), from the same step compiled without CUDA graphs."""
        if not 0 < steps <= self.new_tokens - 3:                # the cache holds a prefill, 2 + steps steps
            raise ValueError(f"steps={steps}: profile 1 to new_tokens - 3 = {self.new_tokens - 3} steps")
        self.generate(compiled=False)                           # as tokens_per_s: tune, compile, record
        self.generate()

        def replay(tok, pos):                                   # as generate's compiled steps
            torch.compiler.cudagraph_mark_step_begin()
            return self.compiled(tok, pos).clone()
        events, how = self._kernels(replay, steps), "CUDA-graph replays"
        if len(events) < steps * (2 * self.model.config.num_hidden_layers + 4):
            torch._dynamo.reset()
            plain = torch.compile(self.step, backend=self.backend, dynamic=False, options=self.blast_options)
            events, how = self._kernels(plain, steps), "compiled step without CUDA graphs (replays unrecorded)"
        if not events:
            raise RuntimeError("the profiler recorded no CUDA kernels")
        times = dict.fromkeys((*CATEGORIES, "total"), 0.0)
        for name, us in events:
            times[kernel_category(name)] += us / steps
            times["total"] += us / steps
        return times, len(events) / steps, how, top_kernels(events, steps)

    def _kernels(self, step, steps):
        """(name, µs) of every GPU kernel and copy that ``steps`` calls of ``step`` ran: after an eager
        prefill (the cache writes at its own count of tokens, which generate leaves at the end) and two
        steps outside the profiler (a compile, for a step not yet run)."""
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        self.cache.reset()
        tok = self.step(self.ids, self.positions[:self.prompt])
        window = [self.positions[k:k + 1] for k in range(self.prompt, self.prompt + steps + 2)]
        for pos in window[:2]:
            tok = step(tok, pos)
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for pos in window[2:]:
                tok = step(tok, pos)
            sync()
        return [(e.name, e.time_range.elapsed_us()) for e in prof.events()    # not the GPU-side annotation ranges
                if e.device_type == DeviceType.CUDA and not e.is_user_annotation]


@torch.no_grad()
def generate_tokens_per_s(model, backend, prompt, new_tokens, batch=1, compile_options=None):
    """HF ``generate`` as a user calls it: a static cache, and generate's own compile of the decode
    step with ``CompileConfig(backend=...)`` (``mode=None, options=compile_options`` where given);
    one eager ``generate`` first, so the blast op's autotuner has seen the decode shapes before a
    CUDA graph is captured."""
    from transformers import CompileConfig, GenerationConfig
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=DEVICE)
    with_options = dict(mode=None, options=compile_options) if compile_options else {}
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              cache_implementation="static", pad_token_id=0,
                              compile_config=CompileConfig(backend=backend, fullgraph=True, dynamic=False,
                                                           **with_options))
    eager = copy.deepcopy(config)
    eager.disable_compile = True
    model.generate(ids, generation_config=eager)
    # Inductor's performance hints name every graph it leaves without CUDA graphs, and why
    torch._logging.set_logs(perf_hints=True)
    try:
        for _ in range(2):                                      # compile + record, then one replayed run
            model.generate(ids, generation_config=config)
    finally:
        torch._logging.set_logs()
    sync()
    t0 = time.perf_counter()
    out = model.generate(ids, generation_config=config)
    sync()
    dt = time.perf_counter() - t0
    assert out.shape == (batch, prompt + new_tokens)
    return batch * new_tokens / dt


@torch.no_grad()
def prefill_ms(model, T, backend=None, options=None):
    """One forward of T tokens (last-position logits only, as a server would), eager or compiled."""
    ids = torch.randint(0, model.config.vocab_size, (1, T), device=DEVICE)
    fwd = model if backend is None else torch.compile(model, backend=backend, dynamic=False, options=options)
    call = lambda _k: fwd(ids, use_cache=False, logits_to_keep=1)
    if DEVICE == "cpu":
        call(0)
        t0 = time.perf_counter()
        call(0)
        return (time.perf_counter() - t0) * 1e3
    return median_ms(call, 1, warmup=2, reps=5)


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
    for how, wrap in (("eager", lambda m, b: m), ("compiled", lambda m, b: torch.compile(m, backend=b))):
        torch._dynamo.reset()
        td, tb = train_step_ms(wrap(dense_layer, "inductor"), T), train_step_ms(wrap(blast_layer, "blast"), T)
        print(f"training step (fwd+bwd) {h}x{h} at T={T}, {how}: dense {td:.3f} ms, blastfx b=4 r={r} {tb:.3f} ms "
              f"({td / tb:.2f}x)", flush=True)
    print(flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama2-7b", help="which published shape")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--train-tokens", type=int, default=4096)
    ap.add_argument("--lowering", default="auto", help='backend "blast" lowering option (auto, inline, extern)')
    ap.add_argument("--chain-mlp", default="auto", choices=("auto", "never"),
                    help='backend "blast" chain_mlp option of the decode loop: "never" runs each MLP as grouped gate/up and '
                         'down calls (the models are then named "... MLP not chained")')
    ap.add_argument("--chain-norm", nargs="+", default=[CHAIN_NORM_DEFAULT], choices=("auto", "never"),
                    help='backend "blast" chain_norm option of the decode loop (default: the backend\'s, "never"): "auto" '
                         'runs block tails and seams, o_proj, the residual add, the norm and the MLP (and the next q/k/v) '
                         'as one call (the models are then named "... block tails"); several values time each blastfx '
                         'model once per value, against the same dense run')
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="decode batch sizes")
    ap.add_argument("--factor-dtype", nargs="+", default=[], choices=sorted(FORMATS),
                    help="also blastfx with factors quantized to each of these (e.g. int8 int4)")
    ap.add_argument("--rank-multiple", type=int, default=BlastConfig.rank_multiple,
                    help="BlastConfig.rank_multiple of the BLAST models (default: the library's); e.g. 16 makes a row of "
                         "int8 codes whole 16-byte vectors (the models are then named \"... ranks of 16\")")
    ap.add_argument("--ss1", action="store_true", help="also the model compressed with structure='ss1' (weight-only)")
    ap.add_argument("--no-blast", action="store_true", help="leave out the BLAST model (e.g. SS1 or torchao rows only)")
    ap.add_argument("--torchao", nargs="*", default=[], choices=("int8", "int4"),
                    help="also torchao weight-only quantized dense models")
    ap.add_argument("--inference-options", action="store_true",
                    help="compile every model's decode step in the decode and generate rows with "
                         "blastfx.inference_options() (CUDA graphs, dynamo's guards on nn modules skipped); those rows "
                         "are named \"..., module guards skipped\" (prefill and --profile compile as without it)")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed rows, each model's decode-step kernel time by category (CUDA only)")
    ap.add_argument("--only", nargs="+", choices=("train", "eager-prefill", "decode", "generate", "prefill"),
                    default=("train", "eager-prefill", "decode", "generate", "prefill"), help="which measurements to run")
    add_arguments(ap)
    args = ap.parse_args()
    dims = SHAPES[args.model]
    args.hidden = dims["hidden"]
    print(versions() if DEVICE == "cuda" else f"CPU; torch {torch.__version__}", flush=True)
    if DEVICE == "cuda" and "train" in args.only:   # first: quick, independent of the model runs
        train_step_table(args)
    models = {"dense": (build(args.layers, **dims), "inductor")}
    blast_config = BlastConfig(init="random", progress=False, rank_multiple=args.rank_multiple)
    ranks = "" if args.rank_multiple == BlastConfig.rank_multiple else f" ranks of {args.rank_multiple}"
    if not args.no_blast:
        blast = build(args.layers, **dims)
        blastfx.compress(blast, args.budget, config=blast_config)
        models["blastfx" + ranks] = (blast, "blast")
    if args.ss1:
        ss1 = build(args.layers, **dims)
        blastfx.compress(ss1, args.budget, config=BlastConfig(structure="ss1", progress=False))
        models["blastfx ss1"] = (ss1, "blast")
    for dtype in args.factor_dtype:
        quantized = build(args.layers, **dims)
        blastfx.compress(quantized, args.budget, config=blast_config)
        models[f"blastfx {dtype}{ranks}"] = (quantize_model(quantized, dtype), "blast")
    for kind in args.torchao:
        models[f"torchao {kind}"] = (torchao_model(build(args.layers, **dims), kind), "inductor")
    models = with_decode_options(models, args)
    for name, (model, *_) in models.items():
        size = sum(tensor_bytes(t) for t in list(model.parameters()) + list(model.buffers()))
        print(f"{name}: {size / 2**30:.2f} GiB of weights", flush=True)
    # cheapest first, each row printed as it lands: a time limit still leaves the rows before it
    step_options = blastfx.inference_options() if args.inference_options else None
    skipped = ", module guards skipped" if args.inference_options else ""
    rows = [("eager-prefill", "prefill %d tokens, eager" % args.prefill, "ms",
             lambda m, b, o: prefill_ms(m, args.prefill), False),
            *[("decode", "decode %d tokens at batch %d, CUDA graphs%s" % (args.new_tokens, bs, skipped), "tok/s",
               lambda m, b, o, bs=bs: Decoder(m, b, args.prompt, args.new_tokens, bs, o, step_options).tokens_per_s(),
               True)
              for bs in args.batch],
            *[("generate", "HF generate %d tokens at batch %d, static cache, compiled%s" % (args.new_tokens, bs, skipped),
               "tok/s", lambda m, b, o, bs=bs: generate_tokens_per_s(m, b, args.prompt, args.new_tokens, bs,
                                                                    generate_options(step_options, o)), True)
              for bs in args.batch],
            ("prefill", "prefill %d tokens, compiled" % args.prefill, "ms", lambda m, b, o: prefill_ms(
                m, args.prefill, b, {"lowering": args.lowering} if b == "blast" else None), False)]
    rows = [r for r in rows if r[0] in args.only]
    config = dict(layers=args.layers, budget=args.budget, b=4, dtype="bfloat16", **dims)
    if ranks:
        config["rank_multiple"] = args.rank_multiple
    time_rows(args, models, rows, config)
    if args.profile and "decode" in args.only:
        profile_decode(args, models, config)


def time_rows(args, models, rows, config):
    """Time every model on every row, dense first. Each model's value (and its ratio to dense) is
    recorded as soon as it is measured, so a run cut short by a time limit keeps what it measured."""
    others = [n for n in models if n != "dense"]
    shown = set(backend_choices())
    print("\n| measurement | dense (inductor) | " + " | ".join(others) + " | "
          + " | ".join(f"{n} vs dense" for n in others) + " |\n|" + "---|" * (2 + 2 * len(others)), flush=True)
    for _, label, unit, measure, higher_is_better in rows:
        case = label if args.model == "llama2-7b" else f"{args.model}: {label}"
        vals, ratios = {}, {}
        for name, (model, backend, options) in models.items():
            torch._dynamo.reset()
            start = time.perf_counter()
            with compile_settings(name):
                vals[name] = value = measure(model, backend, options)
            print(f"  {name}: {value:.1f} {unit} ({time.perf_counter() - start:.0f} s with compile)", flush=True)
            chosen = [c for c in backend_choices() if c not in shown]
            if chosen:                      # what this model's ops were tuned to, for reading its row
                print(f"  {name} autotuned: " + "; ".join(chosen), flush=True)
                shown.update(chosen)
            metrics = [(name, round(value, 3), unit)]
            if name != "dense":
                ratios[name] = value / vals["dense"] if higher_is_better else vals["dense"] / value
                metrics.append((f"{name} vs dense", round(ratios[name], 3), "x"))
            record("llama_e2e", measurements(case, config, metrics), directory=args.results_dir)
        d = vals["dense"]
        print(f"| {label}, {unit} | {d:.1f} | " + " | ".join(f"{vals[n]:.1f}" for n in others) + " | "
              + " | ".join(f"{ratios[n]:.2f}x" for n in others) + " |", flush=True)


# the backend's default for each decode option, and what a model's name says when it runs the other value
OPTION_DEFAULTS = {"chain_mlp": "auto", "chain_norm": CHAIN_NORM_DEFAULT}
OPTION_LABELS = {("chain_mlp", "never"): ", MLP not chained", ("chain_norm", "auto"): ", block tails",
                 ("chain_norm", "never"): ", no block tails"}


def decode_options(args) -> list[dict | None]:
    """The backend "blast" options of the decode loop beyond its defaults (None: none), one per
    ``--chain-norm`` value, in the order given."""
    chosen = []
    for norm in dict.fromkeys(args.chain_norm):
        values = {"chain_mlp": args.chain_mlp, "chain_norm": norm}
        chosen.append({k: v for k, v in values.items() if v != OPTION_DEFAULTS[k]} or None)
    return chosen


def with_decode_options(models: dict, args) -> dict:
    """``{name: (model, backend, options)}``: every backend "blast" model once per decode-options
    variant (:func:`decode_options`), named after the options it runs beyond the defaults; the others
    once, with no options. One compressed model serves every variant: each row compiles afresh."""
    out = {}
    for name, (model, backend) in models.items():
        for options in decode_options(args) if backend == "blast" else [None]:
            out[f"{name}{options_label(options or {})}"] = (model, backend, options)
    return out


def generate_options(step_options: dict | None, blast_options: dict | None) -> dict | None:
    """generate's compile options: the step options (CUDA graphs, guards) with the blast options on
    top; blast options alone keep CUDA graphs on, as the decode loop's do (a mode and options cannot
    travel together)."""
    if not blast_options:
        return step_options
    return {**(step_options or {"triton.cudagraphs": True}), **blast_options}


def options_label(options: dict) -> str:
    """What a blastfx model's name says of its non-default decode options."""
    return "".join(OPTION_LABELS[k, v] for k, v in options.items() if v != OPTION_DEFAULTS.get(k))


def profile_decode(args, models, config, steps=16):
    """One row per model and category: µs of kernel time per decode step (per token at batch 1), and
    kernels per step. Each model is compiled afresh after every timed row: the profiler cannot touch them."""
    if DEVICE != "cuda":
        print("--profile: the kernel breakdown needs CUDA; skipped", flush=True)
        return
    steps = min(steps, args.new_tokens - 3)                     # the cache holds the prompt and new_tokens
    for bs in args.batch:
        label = "decode %d tokens at batch %d, CUDA graphs: kernels per step" % (args.new_tokens, bs)
        case = label if args.model == "llama2-7b" else f"{args.model}: {label}"
        rows, kernel_rows = [], []
        for name, (model, backend, options) in models.items():
            torch._dynamo.reset()
            with compile_settings(name):
                times, launches, how, top = Decoder(model, backend, args.prompt, args.new_tokens, bs,
                                                    options).kernel_profile(steps)
            print(f"{label}, {name}: " + ", ".join(f"{c} {t:.0f} µs" for c, t in times.items())
                  + f", {launches:.0f} kernels ({how})", flush=True)
            rows += measurements(case, {**config, "profiled": how, "steps": steps},
                                 [(f"{name} {c} kernel time", round(t, 2), "µs") for c, t in times.items()]
                                 + [(f"{name} kernel launches", round(launches, 1), "")])
            for cat, kernel, us, count in top:
                print(f"    {us:8.1f} µs {count:6.1f}x  {us / count:6.2f} µs each  [{cat}] {kernel}", flush=True)
                kernel_rows += measurements(f"{case}, {name}: [{cat}] {kernel}", {**config, "steps": steps},
                                            [("time per step", round(us, 2), "µs"),
                                             ("launches per step", round(count, 2), ""),
                                             ("time per launch", round(us / count, 3), "µs")])
        choices = backend_choices()
        if choices:
            print("  autotuned paths: " + ", ".join(choices), flush=True)
        record("llama_e2e", rows, directory=args.results_dir)
        record("llama_e2e_kernels", kernel_rows, directory=args.results_dir)


def backend_choices() -> list[str]:
    """What the BLAST op's autotuner chose so far in this process (every model and batch timed), one
    "key: path" per tuned key, each layer shape written short (:func:`short_key`)."""
    from blastfx.kernels import autotune
    return [f"{short_key(key)}: {path}" for key, path in autotune.report().items()]


SHAPE_REPR = re.compile(r"BlastShape\(out_features=(\d+), in_features=(\d+), rank=(\d+), b_out=(\d+), b_in=(\d+)\)")


def short_key(key) -> str:
    """An autotuner key as text with each ``BlastShape(...)`` as ``OUTxIN r=RANK b=B`` (``b=OUTxIN``
    where the two block counts differ): a block seam's key names seven shapes."""
    def short(m):
        out, inp, rank, b_out, b_in = m.groups()
        return f"{out}x{inp} r={rank} b={b_out if b_out == b_in else f'{b_out}x{b_in}'}"
    return SHAPE_REPR.sub(short, str(key))


def compile_settings(name: str):
    """The Inductor settings model ``name`` compiles under: torchao's recommended ones for torchao's
    models (``torchao_model``; as torchao's own docs compile them), the process's for the others, so
    the dense baseline compiles as it would in a process without torchao."""
    return torchao_compile_settings() if name.startswith("torchao ") else contextlib.nullcontext()


def torchao_model(model, kind):
    """``model`` with every linear but the head quantized by torchao's weight-only configs
    (:func:`common.torchao_weight_only`), timed under :func:`compile_settings` as "torchao KIND"."""
    torchao_weight_only(model.model, kind)
    return model


if __name__ == "__main__":
    main()
