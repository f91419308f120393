"""A model compressed with quantized factors through the whole pipeline: config, plan, build,
save/load, to_dense, torch.compile, finetune's refusal, quantizing after the fact, and its bytes."""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import blastfx
from blastfx import BlastConfig, LayerOverride, Plan
from blastfx.structures.blast.quant import quantize_model
from models import tiny_mlp


def _calibration(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, n, generator=g) @ torch.randn(n, n, generator=g)
    return [X[:128], X[128:]]


def _compressed(factor_dtype="int8", overrides=None, dtype=torch.float32, model=None):
    model = (model or tiny_mlp()).to(dtype)
    cfg = BlastConfig(factor_dtype=factor_dtype, include=("*",), min_features=0, progress=False,
                      overrides=overrides or {}, sequential=False)
    return blastfx.compress(model, 0.5, config=cfg, calibration=[x.to(dtype) for x in _calibration()])


def test_config_checks_factor_dtype():
    with pytest.raises(ValueError, match="factor_dtype must be one of .* got 'int3'"):
        BlastConfig(factor_dtype="int3")
    with pytest.raises(ValueError, match="factor_dtype must be one of .* got 'bf16' \\(or 'model'"):
        LayerOverride(factor_dtype="bf16")
    with pytest.raises(ValueError, match="overrides\\['\\*'\\]: factor_dtype must be one of"):
        BlastConfig(overrides={"*": {"factor_dtype": "bf16"}})
    with pytest.raises(ValueError, match="init='random' trains from scratch"):
        BlastConfig(factor_dtype="int8", init="random")
    cfg = BlastConfig(factor_dtype="int8", overrides={"*.down": LayerOverride(factor_dtype="model")})
    assert cfg.factor_dtype_for("a.down") is None and cfg.factor_dtype_for("a.up") == "int8"


def test_compress_records_factor_dtype_and_override_keeps_a_layer_float():
    model = _compressed(overrides={"4": LayerOverride(factor_dtype="model")})
    plan = model.blastfx_plan
    assert {k: lp.factor_dtype for k, lp in plan.layers.items()} == {"0": "int8", "2": "int8", "4": None}
    assert model[0].U.dtype == torch.int8 and model[4].U.dtype == torch.float32
    again = Plan.from_json(plan.to_json())
    assert again.layers["0"].factor_dtype == "int8" and again.layers["4"].factor_dtype is None
    summary = plan.summary()
    assert "; 2 with int8 factors" in summary.splitlines()[0]
    rows = [line for line in summary.splitlines()[1:] if " x " in line and "e.g." in line]
    assert sum(("int8 codes" in line) for line in rows) >= 1 and any("e.g. 4" in line and "codes" not in line
                                                                     for line in rows)
    bad = json.loads(plan.to_json())
    bad["layers"]["0"]["factor_dtype"] = "int2"
    with pytest.raises(ValueError, match=r"layers\['0'\]\.factor_dtype: factor_dtype must be one of"):
        Plan.from_dict(bad)


def test_quantized_model_stays_close_to_the_float_one():
    """int8 codes stay near the float factors and lose nothing against the dense model: the rounding's
    refits go on minimizing the fit's objective, so they may move towards dense, not towards the float
    factors."""
    x = _calibration(seed=1)[0][:16]
    dense = tiny_mlp()
    want = dense(x)
    floats, quantized = _compressed(None, model=copy.deepcopy(dense)), _compressed("int8", model=dense)
    ref = floats(x)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()      # noqa: E731
    assert 0 < rel(quantized(x), ref) < 0.1
    assert rel(quantized(x), want) < 1.01 * rel(ref, want)


def test_int4_save_load_and_quantize_after_the_fact_round_trip(tmp_path):
    model = _compressed("int4")
    assert all(model[k].U.dtype == torch.uint8 and model[k].U.shape[-1] == (model[k].rank + 1) // 2 for k in (0, 2, 4))
    x = _calibration(seed=2)[0][:8]
    y = model(x)
    blastfx.save(model, tmp_path / "compressed")
    loaded = blastfx.load(tmp_path / "compressed", tiny_mlp())
    assert {loaded[k].factor_dtype for k in (0, 2, 4)} == {"int4"} and loaded[0].V.dtype == torch.uint8
    assert torch.equal(loaded(x), y)
    assert loaded.blastfx_plan.layers["2"].factor_dtype == "int4"

    after = _compressed(None)
    y_float = after(x)
    quantize_model(after, "int4")
    assert {lp.factor_dtype for lp in after.blastfx_plan.layers.values()} == {"int4"}
    err4 = ((after(x) - y_float).norm() / y_float.norm()).item()
    assert 0 < err4 < 0.3          # 16 times coarser than int8 (< 0.02 below): per-row scales at 4 bits
    blastfx.save(after, tmp_path / "after")
    assert torch.equal(blastfx.load(tmp_path / "after", tiny_mlp())(x), after(x))


def test_save_load_keeps_codes_scales_and_plan(tmp_path):
    model = _compressed(overrides={"4": LayerOverride(factor_dtype="model")})
    x = _calibration(seed=2)[0][:8]
    y = model(x)
    blastfx.save(model, tmp_path)
    meta = json.loads((tmp_path / "blastfx.json").read_text())
    assert meta["plan"]["layers"]["0"]["factor_dtype"] == "int8" and meta["plan"]["layers"]["4"]["factor_dtype"] is None
    weights = next(tmp_path.glob("model-*.safetensors"))
    with safe_open(str(weights), "pt") as f:
        assert f.get_tensor("0.U").dtype == torch.int8 and f.get_tensor("0.V").dtype == torch.int8
        assert f.get_tensor("0.U_scale").dtype == torch.float32 and f.get_tensor("4.U").dtype == torch.float32
    loaded = blastfx.load(tmp_path, tiny_mlp())
    assert loaded[0].factor_dtype == "int8" and loaded[4].factor_dtype is None
    assert torch.equal(loaded(x), y)
    assert loaded.blastfx_plan.layers["2"].factor_dtype == "int8"


def test_to_dense_and_compile_of_a_quantized_model():
    model = _compressed()
    x = _calibration(seed=3)[0][:8]
    y = model(x)
    torch.testing.assert_close(torch.compile(model, backend="blast")(x), y, rtol=1e-5, atol=1e-4)
    dense = blastfx.to_dense(copy.deepcopy(model))
    assert all(type(m) is nn.Linear for m in (dense[0], dense[2], dense[4]))
    torch.testing.assert_close(dense(x), y, rtol=1e-5, atol=1e-4)


def test_finetune_is_refused_with_the_fix():
    model = _compressed()
    with pytest.raises(ValueError, match="compress without factor_dtype, finetune, then quantize"):
        blastfx.finetune(model, tiny_mlp(), [torch.zeros(1, 4, dtype=torch.long)], steps=1, progress=False)


def test_quantize_after_the_fact_is_all_or_nothing_and_close():
    model = _compressed(None)
    x = _calibration(seed=4)[0][:8]
    y = model(x)
    quantize_model(model, "int8")
    assert all(model[k].factor_dtype == "int8" for k in (0, 2, 4))
    assert {lp.factor_dtype for lp in model.blastfx_plan.layers.values()} == {"int8"}
    assert ((model(x) - y).norm() / y.norm()).item() < 0.02
    with pytest.raises(ValueError, match=r"float BLAST layers: its BLAST layers are already quantized \(int8\)"):
        quantize_model(model, "int4")
    with pytest.raises(ValueError, match="float BLAST layers: compress it first"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), "int8")
    with pytest.raises(ValueError, match="factor_dtype must be one of"):
        quantize_model(_compressed(None), "int5")


def test_quantize_after_the_fact_with_calibration_weighs_the_rounding_by_the_inputs():
    """With calibration batches the refits minimize each layer's output error on inputs like them
    (the inputs here span a few directions strongly): held out from the same distribution, the
    rounded model stays closer to the float one than with the weight objective; the batches are
    checked as compress checks them."""
    model = _compressed(None)
    calib, held = _calibration(seed=5), _calibration(seed=6)[0]
    y = model(held)
    errors = {}
    for label, kwargs in (("weights", {}), ("calibrated", {"calibration": calib})):
        q = quantize_model(copy.deepcopy(model), "int4", **kwargs)
        assert all(q[k].factor_dtype == "int4" for k in (0, 2, 4))
        errors[label] = ((q(held) - y).norm() / y.norm()).item()
    assert errors["calibrated"] < errors["weights"], errors
    with pytest.raises(TypeError, match="pass tokenizer="):
        quantize_model(copy.deepcopy(model), "int8", calibration=["some text"])
    assert model[0].factor_dtype is None                    # the model itself was never touched


def _bf16_mlp_compressed(factor_dtype, tmp_path=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256)).to(torch.bfloat16)
    dense_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    g = torch.Generator().manual_seed(0)
    X = (torch.randn(512, 256, generator=g) @ torch.randn(256, 256, generator=g)).to(torch.bfloat16)
    blastfx.compress(model, 0.5, config=BlastConfig(factor_dtype=factor_dtype, include=("*",), blocks=4,
                                                    progress=False), calibration=[X[:256], X[256:]])
    return model, dense_bytes


def _code_bytes(model):
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if k.endswith((".U", ".V")))


def test_state_dict_bytes_are_a_quarter_of_bf16_dense_plus_scales():
    model, dense_bytes = _bf16_mlp_compressed("int8")
    got = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    want = 0
    for k in ("0", "2"):
        s = model.get_submodule(k).shape
        want += s.rank * (s.m_pad + s.n_pad)                     # int8 codes of U and V
        want += 2 * s.b_out * s.b_in * s.rank + 2 * 256          # bf16 S and bias
        want += 4 * (s.b_out * s.p + s.b_in * s.rank)            # float32 scales
    assert got == want
    assert 0.25 < got / dense_bytes < 0.28, got / dense_bytes       # half the parameters at 1 byte of 2, plus S and scales


def test_int4_codes_are_half_the_bytes_of_int8_on_disk(tmp_path):
    """Packed int4: ceil(r/2) bytes per row of U and V, half of int8's codes (the ranks agree: the plan
    does not depend on the format); what the safetensors file holds is what the tensor sizes say."""
    int8, dense_bytes = _bf16_mlp_compressed("int8")
    int4, _ = _bf16_mlp_compressed("int4")
    got = sum(t.numel() * t.element_size() for t in int4.state_dict().values())
    want = 0
    for k in ("0", "2"):
        s = int4.get_submodule(k).shape
        assert s == int8.get_submodule(k).shape and s.rank % 2 == 0
        want += (s.rank // 2) * (s.m_pad + s.n_pad)              # packed codes of U and V, two per byte
        want += 2 * s.b_out * s.b_in * s.rank + 2 * 256          # bf16 S and bias
        want += 4 * (s.b_out * s.p + s.b_in * s.rank)            # float32 scales
    assert got == want
    assert 2 * _code_bytes(int4) == _code_bytes(int8)
    assert 0.14 < got / dense_bytes < 0.17, got / dense_bytes       # half the parameters at half a byte of 2
    blastfx.save(int4, tmp_path)
    weights = next(tmp_path.glob("model-*.safetensors"))
    with safe_open(str(weights), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert stored["0.U"].dtype == torch.uint8
    assert sum(t.numel() * t.element_size() for t in stored.values()) == got
    # the file: its tensors' bytes plus the safetensors header (8-byte length + JSON), nothing more
    with open(weights, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    assert weights.stat().st_size == 8 + header + got


def test_hf_save_pretrained_round_trip_keeps_int8_codes_and_generates(tmp_path):
    """transformers' own save/load: the codes stay int8 on disk and in the reloaded model, the
    reloaded logits are identical, and ``generate`` runs on it."""
    from models import tiny_llama
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = tiny_llama()
    blastfx.compress(model, 0.5, config=BlastConfig(factor_dtype="int8", progress=False),
                     calibration=torch.randint(3, 128, (4, 16)))
    x = torch.randint(3, 128, (2, 8))
    want = model(x).logits
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.U").dtype == torch.int8
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    layer = loaded.model.layers[0].mlp.up_proj
    assert isinstance(layer, blastfx.BlastLinear) and layer.U.dtype == torch.int8 and layer.factor_dtype == "int8"
    assert torch.equal(loaded(x).logits, want)
    out = loaded.generate(x, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :8], x)


def test_hf_from_pretrained_refuses_a_checkpoint_without_the_scales(tmp_path):
    """Scales are buffers transformers would leave uninitialized: a checkpoint missing them is refused
    by name before anything is loaded, as a missing code tensor is."""
    from models import tiny_llama
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = tiny_llama()
    blastfx.compress(model, 0.5, config=BlastConfig(factor_dtype="int8", progress=False),
                     calibration=torch.randint(3, 128, (4, 16)))
    model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["model.layers.0.mlp.up_proj.V_scale"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"checkpoint has no model\.layers\.0\.mlp\.up_proj\.V_scale"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("factor_dtype", ["int8", "float8_e4m3fn", "int4"])
def test_module_casts_move_codes_and_scales_without_casting_them(factor_dtype, tmp_path):
    """``.to(dtype)``, ``.half()``, ``.double()`` cast S and the bias only: the codes (float8 ones are
    floating point to PyTorch) and float32 scales keep their bits, so the cast model computes what the
    float64 reference of the same codes does, and saves and loads like a model built in that dtype."""
    model = _compressed(factor_dtype)
    codes = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("U", "V", "_scale"))}
    x = _calibration(seed=5)[0][:8]
    reference = blastfx.to_dense(copy.deepcopy(model).double())(x.double())
    for cast, dtype in ((lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.half(), torch.float16),
                        (lambda m: m.double(), torch.float64)):
        cast_model = cast(copy.deepcopy(model))
        state = cast_model.state_dict()
        for k, v in codes.items():
            assert state[k].dtype == v.dtype and torch.equal(state[k].view(torch.uint8), v.view(torch.uint8)), k
        assert cast_model[0].S.dtype == dtype and cast_model[0].bias.dtype == dtype
        y = cast_model(x.to(dtype)).double()
        tol = 1e-10 if dtype == torch.float64 else 3e-2
        assert ((y - reference).norm() / reference.norm()).item() < tol
    half = _compressed(factor_dtype).half()
    blastfx.save(half, tmp_path)
    loaded = blastfx.load(tmp_path, tiny_mlp().half())
    assert torch.equal(loaded(x.half()), half(x.half()))


def test_load_state_dict_refuses_factors_of_another_format():
    """Codes of int8 and float8 (and float factors) share shapes: loading one into another is refused
    by name rather than cast, and the target keeps its own factors."""
    int8 = _compressed("int8")
    before = {k: v.clone() for k, v in int8.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"0\.U: checkpoint torch\.float8_e4m3fn, this layer's int8 codes"):
        int8.load_state_dict(_compressed("float8_e4m3fn").state_dict())
    with pytest.raises(RuntimeError, match=r"0\.U: checkpoint torch\.float32, this layer's int8 codes"):
        int8.load_state_dict(_compressed(None).state_dict(), strict=False)
    assert all(torch.equal(v, before[k]) for k, v in int8.state_dict().items())
    with pytest.raises(RuntimeError, match=r"0\.U: checkpoint holds torch\.int8 codes, this layer float factors"):
        _compressed(None).load_state_dict(int8.state_dict(), strict=False)
