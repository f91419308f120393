"""SS1 through the whole pipeline: ``compress(..., config=BlastConfig(structure="ss1" | "auto"))``,
plans, save/load, transformers round trip, torch.compile, recovery and back to dense."""
import copy
import json

import pytest
import torch
from torch import nn

import blastfx
from blastfx import BlastConfig
from blastfx.plan import LayerPlan, Plan
from blastfx.structures.ss1 import SS1Layout, SS1Linear, project_calibrated, project_weight, ss1_to_dense
import models
from models import layer_inputs


class Blocks(nn.Module):
    """Two residual MLP blocks (repeated, so every linear is a default target)."""

    def __init__(self, d=128, h=256):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)) for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def _cfg(**kw):
    return BlastConfig(progress=False, **kw)


def test_ss1_layers_are_the_calibrated_projection_of_the_dense_weights():
    dense = Blocks().eval()
    batches = [torch.randn(4, 16, 128) for _ in range(2)]
    names = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear)]
    inputs = layer_inputs(dense, names, batches)
    model = blastfx.compress(copy.deepcopy(dense), 0.5, config=_cfg(structure="ss1", sequential=False),
                             calibration=batches)
    plan = model.blastfx_plan
    assert plan.kept_fraction == pytest.approx(0.5) and set(plan.layers) == set(names)
    for n in names:
        layer, W = model.get_submodule(n), dense.get_submodule(n).weight.detach().double()
        assert isinstance(layer, SS1Linear) and plan.layers[n].structure == "ss1" and layer.reduction == 2
        X = inputs[n]
        C = X.T @ X / len(X)
        expected = project_calibrated(W, layer.layout, C, 0.01)            # float64 solve
        # the layer's statistics are fp32 sums: agreement to 1e-5 of the largest entry (the weight-only
        # projection is about 0.15 of it away)
        assert (layer.weight.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
        # and it is the optimum: no other shared weight has a smaller damped output error
        Cd = C + 0.01 * C.diagonal().mean() * torch.eye(len(C), dtype=C.dtype)
        err = lambda s: torch.trace((W - ss1_to_dense(s, layer.layout)) @ Cd @ (W - ss1_to_dense(s, layer.layout)).T)
        assert err(expected) < err(expected + 1e-3 * torch.randn_like(expected))
    x = torch.randn(2, 5, 128)
    assert (model(x) - dense(x)).norm() < 0.5 * dense(x).norm()


def test_weight_only_ss1_is_the_per_slot_mean_and_warns():
    dense = Blocks().eval()
    with pytest.warns(blastfx.WeightOnlyWarning):
        model = blastfx.compress(copy.deepcopy(dense), 0.5, config=_cfg(structure="ss1"))
    assert model.blastfx_plan.objective == "weight"
    for n, layer in model.named_modules():
        if isinstance(layer, SS1Linear):
            W = dense.get_submodule(n).weight.detach().double()
            # known answer: each slot is the mean of the dense entries tied to it
            slots = layer.layout.slot_index()
            tile = torch.arange(W.shape[0]) // layer.layout.block_n
            index = slots[tile]                                            # (out, in): slot of each entry
            sums = torch.zeros(W.shape[0], layer.weight.shape[1], dtype=torch.float64).scatter_add_(1, index, W)
            counts = torch.zeros_like(sums).scatter_add_(1, index, torch.ones_like(W))
            assert torch.allclose(layer.weight.double(), sums / counts.clamp(min=1), atol=1e-6)
            assert torch.allclose(layer.weight.double(), project_weight(W, layer.layout), atol=1e-6)


def test_uniform_ss1_at_0_8_mixes_half_and_dense_evenly_within_budget():
    model = nn.Module()
    model.blocks = nn.ModuleList(nn.Linear(128, 128) for _ in range(10))
    analysis = blastfx.analyze(model)
    plan = blastfx.plan.make_plan(analysis, 0.8, _cfg(structure="ss1", strategy="uniform"))
    # 10 equal layers, half or all of their parameters each: 6 dense and 4 at reduction 2 keep exactly 0.8
    assert plan.kept_fraction == pytest.approx(0.8)
    assert len(plan.dense) == 6 and {lp.reduction for lp in plan.layers.values()} == {2}
    depth = sorted(int(n.split(".")[1]) for n in plan.layers)
    assert depth[-1] - depth[0] >= 5                 # spread over the depth, not the first four
    strict = blastfx.plan.make_plan(analysis, 0.8, _cfg(structure="ss1", strategy="uniform", allow_dense=False))
    assert not strict.dense and {lp.reduction for lp in strict.layers.values()} == {1, 2}


def _first_layer_ss1(out_features, in_features):
    """Two bias-free linears under ``blocks`` (seed 0), the first exactly SS1 at reduction 4."""
    torch.manual_seed(0)
    model = nn.Module()
    model.blocks = nn.ModuleList(nn.Linear(in_features, out_features, bias=False) for _ in range(2))
    layout = SS1Layout(out_features, in_features, 4)
    with torch.no_grad():
        model.blocks[0].weight.copy_(ss1_to_dense(torch.randn(layout.weight_shape), layout))
    return model


def test_measured_strategy_spends_on_the_layer_ss1_fits_worst():
    """Layer 0 is exactly SS1 at reduction 4, layer 1 is noise: the error strategy leaves layer 0 at
    4 (error 0) and gives the parameters to layer 1."""
    model = _first_layer_ss1(128, 256)
    batches = [torch.randn(64, 256) for _ in range(2)]
    model.forward = lambda x: model.blocks[1](x) + model.blocks[0](x)
    plan = blastfx.plan_for(model, 0.5, _cfg(structure="ss1", strategy="error", allow_dense=False),
                            calibration=batches)
    assert plan.layers["blocks.0"].reduction == 4 and plan.layers["blocks.1"].reduction < 4


@pytest.mark.parametrize("budget, strategy", [(0.3, "auto"), (0.2, "error")])
def test_auto_picks_ss1_for_the_ss1_layer_and_blast_for_the_low_rank_one(budget, strategy):
    """Layer 0 is exactly SS1 at reduction 4 (a quarter of its parameters), layer 1 exactly rank 8.
    At 0.3 each layer's share (uniform strategy) holds the exact structure; at 0.2 only an allocation
    that moves parameters from the low-rank layer to the SS1 one does."""
    model = _first_layer_ss1(256, 256)
    with torch.no_grad():
        model.blocks[1].weight.copy_(torch.randn(256, 8) @ torch.randn(8, 256) / 16)
    model.forward = lambda x: model.blocks[1](model.blocks[0](x))
    batches = [torch.randn(128, 256) for _ in range(4)]
    ref = model.forward(batches[0])
    blastfx.compress(model, budget, config=_cfg(structure="auto", strategy=strategy), calibration=batches)
    plan = model.blastfx_plan
    assert plan.layers["blocks.0"].structure == "ss1" and plan.layers["blocks.0"].reduction == 4
    assert plan.layers["blocks.1"].structure == "blast" and plan.layers["blocks.1"].rank >= 8
    assert isinstance(model.blocks[0], SS1Linear) and isinstance(model.blocks[1], blastfx.BlastLinear)
    assert any("structure 'auto'" in note and "1 SS1" in note and "1 BLAST" in note for note in plan.notes)
    assert plan.kept_fraction <= budget * 1.01
    # both are exact: the compressed model computes what the dense one did
    assert torch.allclose(model.forward(batches[0]), ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())


@pytest.mark.parametrize("structure, override", [("ss1", "blast"), ("blast", "auto")])
def test_a_structure_override_keeps_some_layers_of_another_structure(structure, override):
    """``LayerOverride(structure=...)`` on the MLP down projections: they are built as the override
    says, the other layers as the config says, within the budget."""
    torch.manual_seed(0)
    cfg = _cfg(structure=structure, strategy="uniform", objective="output",
               overrides={"*.down_proj": blastfx.LayerOverride(structure=override)})
    model = blastfx.compress(models.tiny_llama(), 0.5, calibration=torch.randint(3, 128, (4, 16)), config=cfg)
    plan = model.blastfx_plan
    kinds = {"ss1": SS1Linear, "blast": blastfx.BlastLinear}
    for name, lp in plan.layers.items():
        wanted = override if name.endswith("down_proj") else structure
        assert isinstance(model.get_submodule(name), kinds[lp.structure])
        assert lp.structure == wanted or wanted == "auto"
    assert len(plan.layers) + len(plan.dense) == 14 and abs(plan.kept_fraction - 0.5) <= 0.005
    assert any(n.startswith("structure per layer from overrides") for n in plan.notes)
    assert any(n.startswith("structure 'auto'") for n in plan.notes) == (override == "auto")


def test_loss_strategy_weighs_ss1_errors_but_not_the_fit():
    """The output Fisher weights whole rows; SS1 never ties two rows, so the loss-aware fit equals
    the output-error fit, layer by layer."""
    torch.manual_seed(0)
    teacher = models.tiny_llama()
    ids = torch.randint(3, 128, (4, 16))
    loss_model = blastfx.compress(copy.deepcopy(teacher), 0.5, calibration=ids,
                                  config=_cfg(structure="ss1", objective="loss", strategy="uniform"))
    out_model = blastfx.compress(copy.deepcopy(teacher), 0.5, calibration=ids,
                                 config=_cfg(structure="ss1", objective="output", strategy="uniform"))
    assert loss_model.blastfx_plan.objective == "loss"
    layers = [(n, m) for n, m in loss_model.named_modules() if isinstance(m, SS1Linear)]
    assert layers
    for n, m in layers:
        assert torch.allclose(m.weight, out_model.get_submodule(n).weight, rtol=1e-5, atol=1e-6)
    plan = blastfx.plan_for(copy.deepcopy(teacher), 0.5, _cfg(structure="ss1", strategy="loss"), calibration=ids)
    assert plan.strategy == "loss" and any("loss-weighted" in note for note in plan.notes)


def test_plan_json_round_trip_and_bad_ss1_fields_named():
    dense = Blocks().eval()
    plan = blastfx.plan_for(dense, 0.5, _cfg(structure="ss1"))
    again = Plan.from_json(plan.to_json())
    assert again.layers == plan.layers and again.kept_params == plan.kept_params
    d = json.loads(plan.to_json())
    name = next(iter(d["layers"]))
    for field, value, match in (("reduction", 3, "reduction"), ("reduction", 64, "reduction"),
                                ("reduction", None, "reduction"), ("rank", 8, "rank"),
                                ("structure", "nope", "structure")):
        bad = copy.deepcopy(d)
        bad["layers"][name][field] = value
        with pytest.raises(ValueError, match=rf"layers\['{name}'\]\.{match}"):
            Plan.from_dict(bad)
    with pytest.raises(ValueError, match="structure"):
        BlastConfig(structure="ss2")
    assert LayerPlan(128, 256, None, None, structure="ss1", reduction=4).params == 128 * 64


def test_save_load_round_trip_keeps_the_ss1_layers_and_their_seed(tmp_path):
    dense = Blocks().eval()
    batches = [torch.randn(4, 16, 128)]
    model = blastfx.compress(copy.deepcopy(dense), 0.5, config=_cfg(structure="auto"), calibration=batches)
    # a layer set by hand with another seed: the checkpoint, not the plan, carries the tie pattern
    model.blocks[1][2] = SS1Linear(256, 128, 4, seed=12345)
    x = torch.randn(2, 3, 128)
    ref = model(x)
    blastfx.save(model, tmp_path)
    fresh = Blocks().eval()
    loaded = blastfx.load(tmp_path, fresh)
    assert loaded.blocks[1][2].seed == 12345 and loaded.blastfx_plan.layers["blocks.1.2"].reduction == 4
    assert torch.equal(loaded(x), ref)
    kinds = {lp.structure for lp in loaded.blastfx_plan.layers.values()}
    assert "ss1" in kinds


def test_transformers_round_trip_and_to_dense(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = blastfx.compress(models.tiny_llama(), 0.5, calibration=torch.randint(3, 128, (4, 16)),
                             config=_cfg(structure="ss1", strategy="uniform", objective="output"))
    layers = [n for n, m in model.named_modules() if isinstance(m, SS1Linear)]
    assert len(layers) == 14
    model.model.layers[0].mlp.down_proj.sync_layout()          # a no-op on a layer that is in sync
    x = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        ref = model(x).logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert {lp["structure"] for lp in config["quantization_config"]["plan"]["layers"].values()} == {"ss1"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert all(isinstance(loaded.get_submodule(n), SS1Linear) for n in layers)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)
    loaded = blastfx.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)
    dense = blastfx.to_dense(loaded)
    assert not any(isinstance(m, SS1Linear) for m in dense.modules())
    assert isinstance(dense.model.layers[0].mlp.down_proj, nn.Linear) and not hasattr(dense, "blastfx_plan")
    with torch.no_grad():
        assert torch.allclose(dense(x).logits, ref, rtol=1e-5, atol=1e-5)


def test_checkpoint_without_the_ss1_layout_is_refused_before_loading(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = blastfx.compress(models.tiny_llama(), 0.5, calibration=torch.randint(3, 128, (2, 8)),
                             config=_cfg(structure="ss1", strategy="uniform", objective="output"))
    model.save_pretrained(tmp_path)
    file = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(file)
    del tensors["model.layers.0.mlp.down_proj.ss1_layout"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="down_proj.ss1_layout"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_torch_compile_blast_backend_runs_ss1_layers():
    torch._dynamo.reset()
    dense = Blocks().eval()
    model = blastfx.compress(copy.deepcopy(dense), 0.5, config=_cfg(structure="ss1"),
                             calibration=[torch.randn(4, 8, 128)])
    x = torch.randn(3, 128)
    compiled = torch.compile(model, backend="blast", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_finetune_trains_the_ss1_weights_and_recovers_the_teacher():
    torch.manual_seed(0)
    teacher = models.tiny_llama()
    student = blastfx.compress(copy.deepcopy(teacher), 0.5, calibration=torch.randint(3, 128, (4, 16)),
                               config=_cfg(structure="ss1", strategy="uniform", objective="output"))
    held = torch.randint(3, 128, (8, 24))

    def kl():
        with torch.no_grad():
            return blastfx.llm.recovery.distillation_loss(student(input_ids=held).logits,
                                                          teacher(input_ids=held).logits).item()

    before = kl()
    w0 = student.model.layers[0].mlp.down_proj.weight.detach().clone()
    frozen = student.model.embed_tokens.weight.clone()
    losses = blastfx.finetune(student, teacher, [torch.randint(3, 128, (8, 24)) for _ in range(4)], steps=30,
                              lr=3e-3, progress=False)
    assert kl() < 0.7 * before and losses[-1] < losses[0]
    layer = student.model.layers[0].mlp.down_proj
    assert isinstance(layer, SS1Linear) and not torch.equal(layer.weight, w0)
    assert torch.equal(student.model.embed_tokens.weight, frozen)


def test_random_init_builds_ss1_layers_for_training_from_scratch():
    model = blastfx.compress(Blocks(), 0.5, config=_cfg(structure="ss1", init="random"))
    layer = model.blocks[0][0]
    assert isinstance(layer, SS1Linear) and layer.reduction == 2
    bound = 1 / 128 ** 0.5
    assert layer.weight.abs().max() <= bound and layer.weight.std() > 0.4 * bound


def test_a_failing_ss1_build_leaves_the_model_untouched(monkeypatch):
    from blastfx.structures.ss1 import structure

    dense = Blocks().eval()
    before = copy.deepcopy(dense.state_dict())
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return structure.project(*args, **kwargs)

    monkeypatch.setitem(structure.METHODS, "project", structure.METHODS["project"].__class__(
        "project", failing, uses={"covariance"}))
    with pytest.raises(KeyboardInterrupt):
        blastfx.compress(dense, 0.5, config=_cfg(structure="ss1"), calibration=[torch.randn(2, 4, 128)])
    assert all(type(m) in (nn.Linear, nn.GELU, nn.Sequential, nn.ModuleList, Blocks) for m in dense.modules())
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())


@pytest.mark.parametrize("shape", [(128, 256), (70, 100)])
def test_projection_errors_match_the_float64_error_of_the_projection(shape):
    from blastfx.structures.ss1 import projection_errors
    from blastfx.structures.ss1.project import damped

    out_f, in_f = shape
    W = torch.randn(out_f, in_f, dtype=torch.float64)
    X = torch.randn(512, in_f, dtype=torch.float64) * torch.linspace(0.1, 2, in_f, dtype=torch.float64)
    C = X.T @ X / 512
    f = torch.rand(out_f, dtype=torch.float64)
    reductions = [2] + ([4] if in_f >= 128 else [])
    for cov, fisher in ((None, None), (C, None), (C, f)):
        errors, energy = projection_errors(W, reductions, cov, 0.01, fisher)
        Cd = torch.eye(in_f, dtype=torch.float64) if cov is None else damped(C, 0.01)
        weights = torch.ones(out_f, dtype=torch.float64) if fisher is None else f
        assert energy == pytest.approx(float((weights * ((W @ Cd) * W).sum(1)).sum()), rel=1e-10)
        for r in reductions:
            layout = SS1Layout(out_f, in_f, r)
            shared = project_weight(W, layout) if cov is None else project_calibrated(W, layout, C, 0.01)
            D = W - ss1_to_dense(shared, layout)
            assert errors[r] == pytest.approx(float((weights * ((D @ Cd) * D).sum(1)).sum()), rel=1e-8)
