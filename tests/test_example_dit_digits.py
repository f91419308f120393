"""examples/dit_digits.py: a DiT trained on the digits, compressed, sampled through DiTPipeline before
and after. The fast mode runs the whole example (training, compression, recovery, sampling, the
classifier's table, save and reload through the pipeline, the PNGs); the parts with a known answer
are checked on their own."""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from example_loader import load_example

pytestmark = pytest.mark.requires("diffusers", "sklearn", "matplotlib")


@pytest.fixture(scope="module")
def dit():
    return load_example("dit_digits")


@pytest.fixture(scope="module")
def fast_run(dit, tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_digits")
    args = dit.parse_args(["--fast", "--out", str(root / "images"), "--save-dir", str(root / "pipeline")])
    lines = []
    with dit.torch_threads(1):
        result = dit.run(args, log=lines.append)
    return SimpleNamespace(args=args, result=result, log="\n".join(lines), root=root)


def test_fast_run_writes_both_grids_as_pngs(fast_run):
    from PIL import Image

    out = fast_run.root / "images"
    assert [p.name for p in fast_run.result.pngs] == ["dit_digits_dense.png", "dit_digits_blast.png"]
    for png in fast_run.result.pngs:
        assert png.parent == out
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 300      # 10 rows of digits
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]          # no staging files left


def test_fast_run_reloads_the_compressed_pipeline_with_identical_samples(fast_run, dit):
    from diffusers import DiTPipeline

    result = fast_run.result
    assert result.reload_identical
    saved = fast_run.root / "pipeline"
    config = json.loads((saved / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "blastfx"
    assert set(config["quantization_config"]["plan"]["layers"]) == set(result.plan.layers)
    assert (saved / "vae").is_dir() and (saved / "scheduler").is_dir()
    # the check the example makes can fail: a model whose factors differ does not draw the same images
    pipe = DiTPipeline.from_pretrained(saved)
    pipe.set_progress_bar_config(disable=True)
    args = fast_run.args
    ref, _ = dit.sample(pipe, args.samples_per_class, args.inference_steps, args.seed)
    with torch.no_grad():
        pipe.transformer.transformer_blocks[0].attn1.to_q.S.mul_(1.5)
    changed, _ = dit.sample(pipe, args.samples_per_class, args.inference_steps, args.seed)
    assert not torch.equal(ref, changed)


def test_fast_run_table_and_classifier_ceiling(fast_run, dit):
    result = fast_run.result
    assert result.ceiling > 0.9                                     # chance is 0.10
    assert list(result.acc) == ["dense", "BLAST 0.5", "BLAST 0.5 + recovery"]
    assert result.params["BLAST 0.5"] < result.params["dense"]
    assert result.params["BLAST 0.5 + recovery"] == result.params["BLAST 0.5"]
    assert 0.45 < result.plan.kept_fraction < 0.55
    for per, overall in result.acc.values():
        assert per.shape == (10,) and 0.0 <= overall <= 1.0
        assert overall == pytest.approx(per.mean())                 # equal samples per class
    text = dit.table(result)
    rows = text.splitlines()
    assert rows[0] == "| class | real test (ceiling) | dense | BLAST 0.5 | BLAST 0.5 + recovery |"
    assert len(rows) == 2 + 10 + 2
    for c in range(10):
        assert rows[2 + c].startswith(f"| {c} | {result.ceiling_per_class[c]:.2f} | {result.acc['dense'][0][c]:.2f} |")
    assert f"**{result.ceiling:.3f}**" in rows[12]
    assert f"{result.params['dense']:,}" in rows[13]
    assert "real test split" in fast_run.log and "identical" in fast_run.log


def test_classifier_ceiling_is_measured_on_held_out_real_digits(dit):
    (X, y), (Xt, yt) = dit.digits(0)
    assert len(X) == 1400 and len(Xt) == 397 and float(X.min()) == 0.0 and float(X.max()) == 1.0
    clf = dit.fit_classifier(X, y)
    per, overall = dit.per_class_accuracy(clf, Xt, yt)
    expected = (clf.predict(Xt.reshape(len(Xt), -1).numpy()) == yt.numpy()).mean()
    assert overall == pytest.approx(expected) and overall > 0.95
    _, noise = dit.per_class_accuracy(clf, torch.rand(200, 8, 8), torch.arange(10).repeat_interleave(20))
    assert noise < 0.4                                              # uniform noise is not a digit


def test_per_class_accuracy_known_answer(dit):
    class Fixed:                                                    # predicts the pixel at (0, 0)
        def predict(self, flat):
            return flat[:, 0].astype(int)

    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9])
    images = torch.zeros(len(labels), 8, 8)
    images[:, 0, 0] = labels.float()
    images[1, 0, 0] = 5.0                                           # one of two 0s wrong
    images[2, 0, 0] = 0.0                                           # one of three 1s wrong
    per, overall = dit.per_class_accuracy(Fixed(), images, labels)
    np.testing.assert_allclose(per, [0.5, 2 / 3, 1, 1, 1, 1, 1, 1, 1, 1])
    assert overall == pytest.approx(12 / 14)


def test_pass_through_vae_returns_the_pixels(dit):
    vae = dit.pass_through_vae()
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2.8 - 1.4
    with torch.no_grad():
        decoded = vae.double().decode(x).sample
        mean = vae.encode(x).latent_dist.mean
    torch.testing.assert_close(decoded, x, atol=2e-6, rtol=0)
    torch.testing.assert_close(mean, x, atol=2e-6, rtol=0)
    assert dit.check_pass_through(vae.float(), x.float()) < 1e-4
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(1.01)
    with pytest.raises(RuntimeError, match="pass-through VAE changes pixels"):
        dit.check_pass_through(vae, x.float())


def test_calibration_covers_the_noise_schedule(dit):
    (X, y), _ = dit.digits(0)
    X = dit.to_pixels(X)
    batches = dit.calibration_batches(X, y, timesteps=4, batch=16, seed=0)
    assert [int(b["timestep"][0]) for b in batches] == [125, 375, 625, 875]
    for b in batches:
        assert b["hidden_states"].shape == (16, 1, 8, 8) and b["class_labels"].shape == (16,)
        assert (b["timestep"] == b["timestep"][0]).all()
    # late timesteps are nearly pure unit noise; early ones still hold the digits' dark background
    assert float(batches[-1]["hidden_states"].std()) == pytest.approx(1.0, abs=0.15)
    assert float(batches[0]["hidden_states"].mean()) < -0.25


@pytest.mark.parametrize("argv, message", [
    (["--budget", "1.5"], r"--budget must be in \(0, 1\), got 1.5"),
    (["--budget", "x"], r"--budget must be a number, got 'x'"),
    (["--train-steps", "0"], r"--train-steps must be positive, got 0"),
    (["--recovery-steps", "-1"], r"--recovery-steps must be 0 or more, got -1"),
    (["--samples-per-class", "two"], r"--samples-per-class must be an integer, got 'two'"),
    (["--threads", "0"], r"--threads must be positive, got 0"),
])
def test_bad_arguments_name_the_flag(dit, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        dit.parse_args(argv)
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_out_and_save_dir_are_checked_before_anything_runs(dit, tmp_path, capsys):
    file = tmp_path / "file.png"
    file.write_bytes(b"x")
    with pytest.raises(SystemExit):
        dit.parse_args(["--out", str(file)])
    assert f"--out must be a folder, got the file {file}" in capsys.readouterr().err
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        dit.parse_args(["--save-dir", str(full)])
    assert "--save-dir must be an empty or new folder" in capsys.readouterr().err
    assert (full / "keep.txt").read_text() == "mine"
    args = dit.parse_args(["--save-dir", str(tmp_path / "new"), "--fast"])
    assert args.train_steps == dit.FAST.train_steps and args.budget == 0.5


def test_an_interrupted_save_leaves_no_folder(dit, tmp_path):
    class Interrupting:
        def save_pretrained(self, where):
            (Path(where) / "half.json").write_text("{")
            raise KeyboardInterrupt

    target = tmp_path / "pipe"
    with pytest.raises(KeyboardInterrupt):
        dit.save_pipeline(Interrupting(), target)
    assert list(tmp_path.iterdir()) == []


def test_torch_threads_is_scoped(dit):
    before = torch.get_num_threads()
    with pytest.raises(ValueError):
        with dit.torch_threads(1):
            assert torch.get_num_threads() == 1
            raise ValueError
    assert torch.get_num_threads() == before


def test_main_prints_the_table_and_fails_when_the_reload_differs(dit, monkeypatch, capsys, tmp_path):
    per = np.linspace(0.5, 1.0, 10)
    result = dit.Result(ceiling=0.99, ceiling_per_class=np.ones(10), acc={"dense": (per, per.mean())},
                        params={"dense": 1234567}, seconds={"train": 1.0}, reload_identical=True,
                        pngs=[tmp_path / "a.png"])
    seen = {}

    def fake_run(args, log=print):
        seen["threads"] = torch.get_num_threads()
        return result

    monkeypatch.setattr(dit, "run", fake_run)
    assert dit.main(["--threads", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert seen["threads"] == 1
    assert dit.table(result) in out and "| 9 | 1.00 | 1.00 |" in out and "1,234,567" in out
    result.reload_identical = False
    assert dit.main(["--out", str(tmp_path)]) == 1


def test_grid_png_is_written_whole_or_not_at_all(dit, tmp_path, monkeypatch):
    images = torch.rand(20, 8, 8)
    path = tmp_path / "grid.png"
    dit.write_grid(images, 2, path, "title")
    first = path.read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.figure

    def interrupted(self, fname, **kw):
        Path(fname).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dit.write_grid(images, 2, path, "title")
    assert path.read_bytes() == first and [p.name for p in tmp_path.iterdir()] == ["grid.png"]
