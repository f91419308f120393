"""A compressed transformers model loads through transformers' own ``from_pretrained``."""
import copy
import io
import json
import logging
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import blastfx
import models
from blastfx import BlastConfig, BlastLinear
from conftest import dense_from_blocks

pytestmark = pytest.mark.requires("transformers")
QUIET = BlastConfig(progress=False)


def compressed_llama():
    return blastfx.compress(models.tiny_llama(), 0.5, config=QUIET)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blastfx.WeightOnlyWarning)
        model = compressed_llama()
    d = tmp_path_factory.mktemp("llama")
    model.save_pretrained(d)
    x = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        return d, model, x, model(x).logits


class LoadLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_plain_auto_from_pretrained_builds_the_blast_layers(llama_dir):
    from transformers import AutoModelForCausalLM

    d, model, x, ref = llama_dir
    config = json.loads((d / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "blastfx" and "blastfx" not in config
    log = LoadLog()
    logging.getLogger("transformers").addHandler(log)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(d)
    finally:
        logging.getLogger("transformers").removeHandler(log)
    assert not [m for m in log.messages if "LOAD REPORT" in m or "MISSING" in m], log.messages
    assert {n for n, m in loaded.named_modules() if isinstance(m, BlastLinear)} == set(model.blastfx_plan.layers)
    assert loaded.blastfx_plan.layers == model.blastfx_plan.layers
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)
    assert torch.equal(loaded.generate(x[:1], max_new_tokens=4, do_sample=False),
                       model.generate(x[:1], max_new_tokens=4, do_sample=False))
    assert loaded.half().dtype == torch.float16           # casting stays allowed: the factors are plain floats


def test_a_compressed_model_pickles_and_deep_copies(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    d, model, x, ref = llama_dir
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for i, other in enumerate((torch.load(buf, weights_only=False), copy.deepcopy(model))):
        with torch.no_grad():
            assert torch.equal(other(x).logits, ref)
        other.save_pretrained(tmp_path / str(i))          # saves its own layers, with the card
        assert (tmp_path / str(i) / "README.md").is_file()
        with torch.no_grad():
            assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / str(i))(x).logits, ref)


@pytest.mark.parametrize("family", ["tiny_gpt2", "tiny_bert", "tiny_vit"])
def test_other_families_round_trip_through_their_own_class(tmp_path, family):
    """GPT-2 (Conv1D layers, an init that reaches into c_proj), BERT, ViT (names renamed on load)."""
    model = getattr(models, family)()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blastfx.WeightOnlyWarning)
        blastfx.compress(model, 0.5, config=QUIET)
    x = torch.randn(2, 3, 16, 16) if family == "tiny_vit" else torch.randint(3, 128, (2, 9))
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])


class Allocations(TorchDispatchMode):
    """Shapes of every tensor an op produces off the meta device."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.shapes.add(tuple(t.shape))
        return out


def test_loading_allocates_no_dense_weight_of_a_blast_layer(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    # every dense (out, in) shape of the compressed layers is distinct from the other tensors' shapes
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blastfx.WeightOnlyWarning)
        blastfx.compress(model, 0.5, config=QUIET)
    model.save_pretrained(tmp_path)
    dense_shapes = {(lp.out_features, lp.in_features) for lp in model.blastfx_plan.layers.values()}
    assert dense_shapes == {(64, 64), (32, 64), (160, 64), (64, 160)}

    control = Allocations()
    with control:
        LlamaForCausalLM(config)                    # building the dense model the old way allocates them
    assert dense_shapes <= control.shapes

    seen = Allocations()
    with seen:
        loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert not dense_shapes & seen.shapes
    assert sum(isinstance(m, BlastLinear) for m in loaded.modules()) == len(model.blastfx_plan.layers)


def test_bfloat16_and_device_map(llama_dir):
    from transformers import AutoModelForCausalLM

    d, model, x, ref = llama_dir
    for loaded in (AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, device_map="cpu"),
                   blastfx.from_pretrained(d, dtype=torch.bfloat16, device_map="cpu")):
        layer = loaded.model.layers[0].self_attn.q_proj
        assert isinstance(layer, BlastLinear) and layer.U.dtype == torch.bfloat16
        assert layer.U.device.type == "cpu"
        expected = model.model.layers[0].self_attn.q_proj.U.to(torch.bfloat16)
        assert torch.equal(layer.U, expected)
        with torch.no_grad():
            out = loaded(x).logits.float()
        assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_dequantize_gives_the_dense_model(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    d, model, x, ref = llama_dir
    loaded = AutoModelForCausalLM.from_pretrained(d)
    blast = loaded.model.layers[0].mlp.down_proj
    expected = dense_from_blocks(blast.U, blast.S, blast.V, blast.out_features, blast.in_features)
    dense = loaded.dequantize()
    layer = dense.model.layers[0].mlp.down_proj
    assert type(layer) is torch.nn.Linear and not any(isinstance(m, BlastLinear) for m in dense.modules())
    assert (layer.weight.double() - expected).abs().max() < 1e-6
    assert getattr(dense.config, "quantization_config", None) is None and not hasattr(dense, "blastfx_plan")
    with torch.no_grad():
        torch.testing.assert_close(dense(x).logits, ref, atol=1e-5, rtol=1e-5)
    dense.save_pretrained(tmp_path)                  # an ordinary dense checkpoint now
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_to_dense_on_any_module():
    model = models.tiny_mlp()
    blastfx.compress(model, 0.5, config=BlastConfig(include=("*",), init="random", progress=False))
    layer = model[2]
    expected = dense_from_blocks(layer.U, layer.S, layer.V, layer.out_features, layer.in_features)
    x = torch.randn(3, 48)
    with torch.no_grad():
        ref = model(x)
    blastfx.to_dense(model)
    assert type(model[2]) is torch.nn.Linear and not hasattr(model, "blastfx_plan")
    assert (model[2].weight.double() - expected).abs().max() < 1e-6
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="layer.to_dense"):
        blastfx.to_dense(BlastLinear(8, 8, 2))


def test_blastfx_from_pretrained_refuses_a_dense_folder(tmp_path):
    models.tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no blastfx plan"):
        blastfx.from_pretrained(tmp_path)


def test_older_layout_folder_loads_with_a_warning(llama_dir, tmp_path):
    """A folder whose config.json has the plan under 'blastfx' and no quantization_config: the plain load
    reads it as the blastfx method (before, it returned the dense layers randomly initialized)."""
    from transformers import AutoModelForCausalLM

    d, model, x, ref = llama_dir
    for f in d.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["blastfx"] = config.pop("quantization_config")["plan"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="older layout"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, BlastLinear)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)
    out = tmp_path / "resaved"
    loaded.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert "blastfx" not in config and config["quantization_config"]["quant_method"] == "blastfx"


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_weights_that_do_not_match_the_plan_fail_loudly(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    d, model, x, ref = llama_dir
    # factors of one planned layer missing from the checkpoint
    short = _copy(d, tmp_path / "short")
    tensors = load_file(str(short / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.U"]
    save_file(tensors, str(short / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.U"):
        AutoModelForCausalLM.from_pretrained(short)

    # a dense checkpoint with a blastfx plan pasted into its config
    dense_dir = tmp_path / "dense"
    models.tiny_llama().save_pretrained(dense_dir)
    config = json.loads((dense_dir / "config.json").read_text())
    config["quantization_config"] = json.loads((d / "config.json").read_text())["quantization_config"]
    (dense_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"dense model\.layers\.0\.\w+\.\w+_proj\.weight instead"):
        AutoModelForCausalLM.from_pretrained(dense_dir)

    # an older-layout folder whose plan names a layer the weights do not have as BLAST
    old = _copy(d, tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    plan = config.pop("quantization_config")["plan"]
    plan["layers"]["lm_head"] = {"out_features": 128, "in_features": 64, "rank": 8, "blocks": [4, 4]}
    config["blastfx"] = plan
    (old / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="older layout"), pytest.raises(ValueError, match="lm_head"):
        AutoModelForCausalLM.from_pretrained(old)


def test_a_bad_plan_field_is_named(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    d = _copy(llama_dir[0], tmp_path / "bad")
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"]["plan"]["layers"]["model.layers.0.mlp.up_proj"]["rank"] = -3
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json quantization_config.*up_proj'\]"):
        AutoModelForCausalLM.from_pretrained(d)


def test_import_blastfx_stays_light_and_registers_when_transformers_arrives():
    code = ("import sys, blastfx\n"
            "assert 'transformers' not in sys.modules and 'peft' not in sys.modules and 'diffusers' not in sys.modules\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING\n"
            "import transformers.modeling_utils\n"
            "print(AUTO_QUANTIZER_MAPPING['blastfx'].__name__, AUTO_QUANTIZATION_CONFIG_MAPPING['blastfx'].__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["BlastfxHfQuantizer", "BlastfxConfig"]


def test_compress_refuses_to_record_over_another_quantization_method():
    from transformers.quantizers.base import HfQuantizer

    class Other(HfQuantizer):
        def is_serializable(self):
            return True

        @property
        def is_trainable(self):
            return False

    class OtherConfig:
        quant_method = "other"

    model = models.tiny_llama()
    model.hf_quantizer = Other(OtherConfig())
    with pytest.raises(ValueError, match="quantized with 'other'"):
        blastfx.compress(model, 0.5, config=BlastConfig(init="random", progress=False))
    assert not any(isinstance(m, BlastLinear) for m in model.modules())
