import json
import re

import pytest
import torch

import blastfx
from blastfx import BlastConfig
import models

QUIET = BlastConfig(progress=False)


@pytest.fixture
def compressed():
    model = blastfx.compress(models.tiny_llama(), 0.5, config=QUIET)
    x = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        return model, x, model(x).logits


def test_save_load_round_trip(tmp_path, compressed):
    model, x, ref = compressed
    blastfx.save(model, tmp_path / "ckpt")
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names[:2] == ["README.md", "blastfx.json"] and len(names) == 3  # README.md: the model card
    assert re.fullmatch(r"model-[0-9a-f]{16}\.safetensors", names[2])
    loaded = blastfx.load(tmp_path / "ckpt", models.tiny_llama())
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)
    assert loaded.blastfx_plan.to_dict() == model.blastfx_plan.to_dict()


def test_hf_save_pretrained_from_pretrained(tmp_path, compressed):
    model, x, ref = compressed
    model.save_pretrained(tmp_path / "hf")
    loaded = blastfx.from_pretrained(tmp_path / "hf")
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)
    assert torch.equal(loaded.generate(x[:1], max_new_tokens=4, do_sample=False),
                       model.generate(x[:1], max_new_tokens=4, do_sample=False))


def test_save_replaces_atomically_and_cleans_up_on_failure(tmp_path, compressed, monkeypatch):
    model, x, ref = compressed
    target = tmp_path / "ckpt"
    blastfx.save(model, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    import blastfx.io as bio

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(bio, "save_model", broken)
    with pytest.raises(OSError, match="disk full"):
        blastfx.save(model, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # old checkpoint intact, no temp files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_corrupt_and_mismatched_checkpoints(tmp_path, compressed):
    model, x, ref = compressed
    blastfx.save(model, tmp_path / "ok")
    with pytest.raises(ValueError, match="not a blastfx checkpoint"):
        blastfx.load(tmp_path, models.tiny_llama())

    bad = tmp_path / "bad"
    blastfx.save(model, bad)
    weights = next(bad.glob("model-*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    fresh = models.tiny_llama()
    with pytest.raises(ValueError, match="corrupt checkpoint weights"):
        blastfx.load(bad, fresh)
    assert not any(isinstance(m, blastfx.BlastLinear) for m in fresh.modules())

    (bad / "blastfx.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        blastfx.load(bad, models.tiny_llama())

    meta = json.loads((tmp_path / "ok" / "blastfx.json").read_text())
    meta["format"] = 99
    (bad / "blastfx.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format 99"):
        blastfx.load(bad, models.tiny_llama())


def test_wrong_architecture_is_refused(tmp_path, compressed):
    model, x, ref = compressed
    blastfx.save(model, tmp_path / "ckpt")
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="model's is"):
        blastfx.load(tmp_path / "ckpt", other)
    assert not any(isinstance(m, blastfx.BlastLinear) for m in other.modules())


def test_dtype_mismatch_is_refused(tmp_path, compressed):
    model, x, ref = compressed
    blastfx.save(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="does not fit this model"):
        blastfx.load(tmp_path / "ckpt", models.tiny_llama().to(torch.float64))


def test_save_uncompressed_model_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no blastfx plan"):
        blastfx.save(models.tiny_mlp(), tmp_path / "x")
    assert not (tmp_path / "x").exists()
