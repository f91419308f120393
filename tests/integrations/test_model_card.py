"""Every saved folder carries a model card saying what it is and how to load it; a person's README
is never touched."""
import re
import warnings

import pytest
import torch

import blastfx
import models
from blastfx import BlastConfig

QUIET = BlastConfig(progress=False)


def front_matter(text):
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, text[:200]
    return match.group(1).splitlines()


def run_load_snippet(text, folder):
    """Execute the card's Python block with the folder's real path: the instructions must work."""
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    code = code.replace(f"path/to/{folder.name}", str(folder))
    scope = {}
    exec(code, scope)                     # noqa: S102 -- our own generated text
    return scope


@pytest.mark.requires("transformers")
def test_save_pretrained_writes_a_card_that_loads(tmp_path):
    torch.manual_seed(0)
    model = models.tiny_llama()
    batches = [{"input_ids": torch.randint(3, 128, (2, 16))} for _ in range(2)]
    blastfx.compress(model, 0.5, config=BlastConfig(iters=3, progress=False), calibration=batches)
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "library_name: blastfx" in front_matter(text)
    plan = model.blastfx_plan
    assert f"| layers compressed (BLAST) | {len(plan.layers)} |" in text
    assert f"| layers the allocation kept dense | {len(plan.dense)} |" in text
    assert f"{plan.kept_params:,} of {plan.dense_total:,}" in text and "| budget asked | 0.5 |" in text
    assert "loss-aware" in text                      # how it was calibrated
    scope = run_load_snippet(text, tmp_path)
    x = torch.randint(3, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(scope["model"](x).logits, model(x).logits)
    assert "model.dequantize()" in text


def test_blastfx_save_writes_a_card_with_its_load_call(tmp_path):
    model = blastfx.compress(models.tiny_mlp(), 0.5, config=BlastConfig(include=("*",), init="random", progress=False))
    blastfx.save(model, tmp_path / "ckpt")
    text = (tmp_path / "ckpt" / "README.md").read_text()
    assert "library_name: blastfx" in front_matter(text)
    assert 'blastfx.load("path/to/ckpt", model)' in text and "Sequential" in text
    assert "Not fitted to trained weights" in text     # init="random": nothing was fitted


def test_a_users_readme_is_never_replaced(tmp_path):
    model = blastfx.compress(models.tiny_mlp(), 0.5, config=BlastConfig(include=("*",), init="random", progress=False))
    (tmp_path / "README.md").write_text("# my notes\n")
    blastfx.save(model, tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my notes\n"


def test_an_unedited_card_is_refreshed_and_an_edited_one_kept(tmp_path):
    model = models.tiny_mlp()
    blastfx.compress(model, 0.5, config=BlastConfig(include=("0",), init="random", progress=False))
    blastfx.save(model, tmp_path)
    assert "| layers compressed (BLAST) | 1 |" in (tmp_path / "README.md").read_text()
    blastfx.compress(model, 0.5, config=BlastConfig(include=("2",), init="random", progress=False))
    blastfx.save(model, tmp_path)                      # our own card, untouched: it follows the checkpoint
    text = (tmp_path / "README.md").read_text()
    assert "| layers compressed (BLAST) | 2 |" in text
    (tmp_path / "README.md").write_text(text.replace("# Sequential", "# My model"))
    blastfx.compress(model, 0.5, config=BlastConfig(include=("4",), init="random", progress=False))
    blastfx.save(model, tmp_path)                      # edited by a person: left alone
    assert "# My model" in (tmp_path / "README.md").read_text()
    assert not list(tmp_path.glob(".blastfx-card-*"))


@pytest.mark.requires("transformers")
def test_save_pretrained_keeps_a_users_readme(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blastfx.WeightOnlyWarning)
        model = blastfx.compress(models.tiny_llama(), 0.5, config=QUIET)
    (tmp_path / "README.md").write_text("mine")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "mine"
    assert (tmp_path / "config.json").is_file()
