"""benchmarks/llama_e2e.py: --profile's kernel categories and the rows it records per model."""
import argparse
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import llama_e2e  # noqa: E402
import rows  # noqa: E402


def test_blast_kernels_are_blastfx_launched_triton_kernels():
    sources = (BENCH.parent / "blastfx").rglob("*.py")
    jitted = {name for path in sources
              for name in re.findall(r"@triton\.jit[^\n]*\n\s*def\s+(\w+)", path.read_text(encoding="utf-8"))}
    assert llama_e2e.BLAST_KERNELS == {name for name in jitted if name.endswith("_kernel")}


@pytest.mark.parametrize("name, category", [
    ("_gemv_decode_kernel", "blast"),
    ("_gemv_group_kernel", "blast"),
    ("_mix_kernel", "blast"),
    ("_ss1_kernel", "blast"),
    ("my_mix_kernel", "other"),                                     # a blast name inside another name is not one
    ("nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_cublas", "gemm"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4, false>(...)", "gemm"),
    ("void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, true>(...)", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(...)", "gemm"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)", "attention"),
    ("void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4>>(...)", "attention"),
    ("triton_poi_fused__scaled_dot_product_efficient_attention_0", "other"),   # Inductor's, named after its ops
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1", "other"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>(...)", "other"),
    ("Memcpy DtoD (Device -> Device)", "other"),
])
def test_kernel_category(name, category):
    assert llama_e2e.kernel_category(name) == category
    assert category in llama_e2e.CATEGORIES


def test_profile_rows_per_model_and_category(tmp_path, monkeypatch):
    options = []

    class Decoder:
        def __init__(self, model, backend, prompt, new_tokens, batch, blast_options=None):
            self.model = model
            options.append(blast_options)

        def kernel_profile(self, steps):
            times = {"blast": 0.0, "gemm": 3000.0, "attention": 200.0, "other": 800.0}
            times = {c: t / self.model for c, t in times.items()}
            top = [("gemm", "gemv2T_kernel", 3000.0 / self.model, 224.0)]
            return {**times, "total": sum(times.values())}, 900.0 / self.model, "CUDA-graph replays", top

    monkeypatch.setattr(llama_e2e, "DEVICE", "cuda")
    monkeypatch.setattr(llama_e2e, "Decoder", Decoder)
    args = argparse.Namespace(batch=[1], model="llama2-7b", prompt=16, new_tokens=256, results_dir=str(tmp_path))
    llama_e2e.profile_decode(args, {"dense": (1, "inductor", None), "blastfx": (2, "blast", None)}, {"layers": 32})
    got = {(r["case"], r["metric"]): (float(r["value"]), r["unit"]) for r in rows.read(tmp_path / "llama_e2e.csv")}
    case = "decode 256 tokens at batch 1, CUDA graphs: kernels per step"
    assert got[(case, "dense gemm kernel time")] == (3000.0, "µs")
    assert got[(case, "blastfx total kernel time")] == (2000.0, "µs")
    assert got[(case, "blastfx kernel launches")] == (450.0, "")
    assert len(got) == 2 * (len(llama_e2e.CATEGORIES) + 2)
    kernels = {(r["case"], r["metric"]): float(r["value"]) for r in rows.read(tmp_path / "llama_e2e_kernels.csv")}
    assert kernels[(case + ", blastfx: [gemm] gemv2T_kernel", "time per step")] == 1500.0
    assert kernels[(case + ", dense: [gemm] gemv2T_kernel", "launches per step")] == 224.0
    assert kernels[(case + ", dense: [gemm] gemv2T_kernel", "time per launch")] == round(3000.0 / 224.0, 3)
    assert options == [None, None]                   # each model's own options reach its decoder
    args.results_dir = str(tmp_path / "tails")
    llama_e2e.profile_decode(args, {"blastfx, block tails": (2, "blast", {"chain_norm": "auto"})}, {"layers": 32})
    assert options[-1] == {"chain_norm": "auto"}


def test_decode_options_name_one_variant_per_chain_norm():
    args = argparse.Namespace(chain_mlp="auto", chain_norm=["never"])
    models = {"dense": ("D", "inductor"), "blastfx": ("B", "blast")}
    assert llama_e2e.with_decode_options(models, args) == {"dense": ("D", "inductor", None),
                                                           "blastfx": ("B", "blast", None)}   # the defaults
    args.chain_norm = ["never", "auto", "never"]       # both, in one process, each once
    assert llama_e2e.with_decode_options(models, args) == {
        "dense": ("D", "inductor", None), "blastfx": ("B", "blast", None),
        "blastfx, block tails": ("B", "blast", {"chain_norm": "auto"})}
    args.chain_mlp, args.chain_norm = "never", ["auto"]
    assert llama_e2e.decode_options(args) == [{"chain_mlp": "never", "chain_norm": "auto"}]
    assert list(llama_e2e.with_decode_options(models, args)) == ["dense", "blastfx, MLP not chained, block tails"]


def test_generate_options_keep_cuda_graphs_beside_blast_options():
    assert llama_e2e.generate_options(None, None) is None
    assert llama_e2e.generate_options({"guard": 1}, None) == {"guard": 1}
    assert llama_e2e.generate_options(None, {"chain_norm": "auto"}) == {"triton.cudagraphs": True,
                                                                        "chain_norm": "auto"}
    assert llama_e2e.generate_options({"triton.cudagraphs": True, "guard": 1}, {"chain_norm": "auto"}) == {
        "triton.cudagraphs": True, "guard": 1, "chain_norm": "auto"}


def test_options_label_names_only_what_differs_from_the_defaults():
    assert llama_e2e.options_label({"chain_mlp": "never", "chain_norm": "auto"}) == ", MLP not chained, block tails"
    assert llama_e2e.options_label({"chain_norm": "never"}) == ""  # the default names nothing
    assert llama_e2e.options_label({}) == ""


def test_top_kernels_rank_by_time_per_step():
    events = [("_gemv_group_kernel", 6.0), ("gemv2T_kernel", 10.0), ("_gemv_group_kernel", 6.0),
              ("triton_red_fused_mean_0", 1.0), ("gemv2T_kernel", 10.0), ("_gemv_group_kernel", 6.0)]
    top = llama_e2e.top_kernels(events, steps=2, count=2)
    assert top == [("gemm", "gemv2T_kernel", 10.0, 1.0), ("blast", "_gemv_group_kernel", 9.0, 1.5)]
    long = "void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4, false, "
    same_cut = [(long + "true>(...)", 4.0), (long + "false>(...)", 2.0)]     # one name when cut to 80
    assert llama_e2e.top_kernels(same_cut, steps=1) == [("gemm", long[:80], 6.0, 2.0)]


def test_profile_is_skipped_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(llama_e2e, "DEVICE", "cpu")
    args = argparse.Namespace(batch=[1], model="llama2-7b", prompt=16, new_tokens=256, results_dir=str(tmp_path))
    llama_e2e.profile_decode(args, {}, {})
    assert "needs CUDA" in capsys.readouterr().out
    assert not (tmp_path / "llama_e2e.csv").exists()


def test_kernel_rows_get_a_table_of_their_own():
    import report
    row = lambda case, metric: dict(case=case, metric=metric, unit="")     # noqa: E731
    decode = [row("decode", "dense"), row("decode", "blastfx vs dense"), row("prefill", "blastfx vs dense")]
    kernels = [row("decode: kernels", "dense gemm kernel time"), row("decode: kernels", "dense kernel launches")]
    assert report.metric_groups(decode[:2] + kernels + decode[2:]) == [decode, kernels]


def test_each_models_value_is_recorded_as_it_lands(tmp_path):
    """A run cut short (here: the third model raises, as a time limit would end it) keeps dense and
    the models measured before it, each with its ratio to dense in the right direction per unit."""
    tok_s = {"dense": 200.0, "blastfx int8": 250.0}

    def decode(model, backend, options):
        if model not in tok_s:
            raise TimeoutError("time limit")
        return tok_s[model]

    models = {name: (name, "inductor" if name == "dense" else "blast", None) for name in (*tok_s, "torchao int8")}
    args = argparse.Namespace(model="llama3-8b", results_dir=str(tmp_path))
    table = [("decode", "decode 256 tokens at batch 1, CUDA graphs", "tok/s", decode, True)]
    with pytest.raises(TimeoutError):
        llama_e2e.time_rows(args, models, table, {"layers": 32})
    got = {r["metric"]: (float(r["value"]), r["unit"], r["case"]) for r in rows.read(tmp_path / "llama_e2e.csv")}
    case = "llama3-8b: decode 256 tokens at batch 1, CUDA graphs"
    assert got == {"dense": (200.0, "tok/s", case), "blastfx int8": (250.0, "tok/s", case),
                   "blastfx int8 vs dense": (1.25, "x", case)}
    # times: lower is better, so the ratio is dense / model
    ms = {"dense": 10.0, "blastfx": 8.0}
    args.model, args.results_dir = "llama2-7b", str(tmp_path / "ms")
    llama_e2e.time_rows(args, {n: (n, "inductor", None) for n in ms},
                        [("prefill", "prefill 2048 tokens, compiled", "ms", lambda m, b, o: ms[m], False)], {})
    got = {r["metric"]: float(r["value"]) for r in rows.read(tmp_path / "ms" / "llama_e2e.csv")}
    assert got == {"dense": 10.0, "blastfx": 8.0, "blastfx vs dense": 1.25}


def test_each_model_prints_the_choices_its_ops_were_tuned_to(tmp_path, monkeypatch, capsys):
    """The autotuner's cache is process-wide: a model's line lists only the keys its own row tuned,
    so two blastfx models timed in one process each show what they ran."""
    from blastfx.kernels import autotune
    monkeypatch.setattr(autotune, "_cache", {("old",): ("gemv", {})})

    def decode(model, backend, options):
        if model != "dense":
            autotune._cache[(model,)] = ("seam" if model == "blastfx" else "parts", {})
        return 100.0

    models = {n: (n, "inductor" if n == "dense" else "blast", None)
              for n in ("dense", "blastfx", "blastfx, no block tails")}
    llama_e2e.time_rows(argparse.Namespace(model="llama2-7b", results_dir=str(tmp_path)), models,
                        [("decode", "decode", "tok/s", decode, True)], {})
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if "autotuned" in line]
    assert lines == ["blastfx autotuned: ('blastfx',): seam",
                     "blastfx, no block tails autotuned: ('blastfx, no block tails',): parts"]


def test_autotuner_keys_print_their_shapes_short():
    from blastfx.structures.blast.layout import BlastShape
    key = ("group", 1, (BlastShape(4096, 4096, 1016, 4, 4), BlastShape(11008, 4096, 1488, 4, 2)), "cuda:0")
    assert llama_e2e.short_key(key) == "('group', 1, (4096x4096 r=1016 b=4, 11008x4096 r=1488 b=4x2), 'cuda:0')"
    assert llama_e2e.short_key(("old",)) == "('old',)"
