"""compress() on every supported family: exact where the structure allows it, budgets met, the
model's own API kept, and all-or-nothing behaviour on errors."""
import copy
import threading
import warnings
from dataclasses import replace

import pytest
import torch
from torch import nn

import blastfx
from blastfx import BlastConfig, BlastLinear, LayerOverride
from blastfx.analyze import dense_weight
import models

QUIET = dict(progress=False)
# most tests here compress random-init models without calibration on purpose
pytestmark = pytest.mark.filterwarnings("ignore::blastfx.api.WeightOnlyWarning")


def inputs_for(name, model):
    g = torch.Generator().manual_seed(1)
    if name in ("tiny_llama", "tiny_gpt2", "tiny_bert"):
        return (torch.randint(3, 128, (2, 12), generator=g),), {}
    if name == "tiny_vit":
        return (torch.randn(2, 3, 16, 16, generator=g),), {}
    if name == "tiny_mlp":
        return (torch.randn(5, 48, generator=g),), {}
    from blastfx.analyze.capture import example_inputs_for
    return example_inputs_for(model)


def first_output(out):
    if torch.is_tensor(out):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.logits if hasattr(out, "logits") else out[0]


def make_low_rank(model, names, k=4):
    """Make the named layers' weights exactly rank k, so BLAST at rank >= k must be exact."""
    with torch.no_grad():
        for name in names:
            mod = model.get_submodule(name)
            m, n = dense_weight(mod).shape
            w = torch.randn(m, k) @ torch.randn(k, n) / (k * n) ** 0.5
            mod.weight.copy_(w.T if type(mod).__name__ == "Conv1D" else w)


FAMILIES = ["tiny_llama", "tiny_gpt2", "tiny_bert", "tiny_vit", "tiny_dit", "tiny_pixart", "tiny_sd3", "tiny_mlp"]


@pytest.mark.parametrize("name", FAMILIES)
def test_exact_when_structure_allows(name):
    model = getattr(models, name)()
    include = ("*",) if name == "tiny_mlp" else ()
    plan = blastfx.plan_for(model, 0.5, BlastConfig(include=include, **QUIET))
    make_low_rank(model, plan.layers, k=4)
    args, kwargs = inputs_for(name, model)
    with torch.no_grad():
        ref = first_output(model(*args, **kwargs))
    cfg = BlastConfig(include=include, overrides={"*": LayerOverride(rank=8)}, **QUIET)
    out_model = blastfx.compress(model, 0.5, config=cfg)
    assert out_model is model and type(model).__name__ != "BlastLinear"
    with torch.no_grad():
        out = first_output(model(*args, **kwargs))
    assert sum(isinstance(m, BlastLinear) for m in model.modules()) == len(plan.layers) > 0
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_budget_met_and_outputs_finite(name, budget):
    model = getattr(models, name)()
    include = ("*",) if name == "tiny_mlp" else ()
    before = sum(p.numel() for p in model.parameters())
    blastfx.compress(model, budget, config=BlastConfig(include=include, **QUIET))
    plan = model.blastfx_plan
    assert abs(plan.kept_fraction - budget) <= 0.01 * budget + 1e-9, plan.summary()
    after = sum(p.numel() for p in model.parameters())
    assert before - after == plan.dense_total - plan.kept_params
    args, kwargs = inputs_for(name, model)
    with torch.no_grad():
        assert torch.isfinite(first_output(model(*args, **kwargs))).all()


def test_default_targets_skip_embeddings_and_head():
    model = models.tiny_llama()
    plan = blastfx.plan_for(model, 0.5, BlastConfig(**QUIET))
    assert "lm_head" not in plan.layers and len(plan.layers) == 14
    assert all(".layers." in k for k in plan.layers)


def test_hf_generate_keeps_working():
    model = models.tiny_llama()
    names = blastfx.plan_for(model, 0.5, BlastConfig(**QUIET)).layers
    make_low_rank(model, names)
    x = torch.randint(3, 128, (1, 6))
    ref = model.generate(x, max_new_tokens=6, do_sample=False)
    blastfx.compress(model, 0.5, config=BlastConfig(overrides={"*": {"rank": 8}}, **QUIET))
    assert torch.equal(model.generate(x, max_new_tokens=6, do_sample=False), ref)


@pytest.mark.requires("diffusers")
def test_dit_pipeline_end_to_end():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=16).eval()
    transformer = models.tiny_dit()
    names = blastfx.plan_for(transformer, 0.5, BlastConfig(**QUIET)).layers
    make_low_rank(transformer, names)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(class_labels=[1], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    ref = run()
    blastfx.compress(pipe.transformer, 0.5, config=BlastConfig(overrides={"*": {"rank": 8}}, **QUIET))
    assert isinstance(pipe.transformer.transformer_blocks[0].attn1.to_q, BlastLinear)
    out = run()
    assert out.shape == ref.shape and abs(out - ref).max() < 1e-3


def test_init_random_for_training_from_scratch():
    model = models.tiny_mlp()
    blastfx.compress(model, 0.5, config=BlastConfig(include=("*",), init="random", **QUIET))
    layer = model[2]
    assert isinstance(layer, BlastLinear) and torch.all(layer.S == 1)


def test_plan_is_editable_and_serializable():
    model = models.tiny_llama()
    plan = blastfx.plan_for(model, 0.5, BlastConfig(**QUIET))
    plan2 = blastfx.Plan.from_json(plan.to_json())
    assert plan2.to_dict() == plan.to_dict()
    plan2.layers["model.layers.0.mlp.up_proj"].rank = 8
    blastfx.compress(model, plan=plan2, config=BlastConfig(**QUIET))
    assert model.model.layers[0].mlp.up_proj.rank == 8
    assert model.config.quantization_config.plan["layers"]["model.layers.0.mlp.up_proj"]["rank"] == 8


def test_error_strategy_spends_where_the_spectrum_is_slow():
    model = models.tiny_mlp()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(96, 2) @ torch.randn(2, 48))      # rank 2: needs little
    plan = blastfx.plan_for(model, 0.5, BlastConfig(include=("*",), strategy="error", **QUIET))
    assert plan.layers["0"].rank < plan.layers["2"].rank
    assert abs(plan.kept_fraction - 0.5) <= 0.005


@pytest.mark.parametrize("kwargs,match", [
    (dict(budget=1.5), "budget"), (dict(budget=0), "budget"), (dict(budget="half"), "budget"),
    (dict(config=dict(include=("nothing.*",))), "matches no linear layer"),
    (dict(config=dict(overrides={"*.q_prj": {"rank": 4}})), "matches no linear layer"),
    (dict(config=dict(overrides={"*.q_proj": {"blocks": (3, 3)}})), "do not divide"),
    (dict(config=dict(overrides={"*.q_proj": {"rank": 10000}})), "more than the dense"),
    (dict(config=dict(exclude=("*",))), "no linear layer is selected"),
])
def test_bad_input_leaves_model_untouched(kwargs, match):
    model = models.tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = BlastConfig(**kwargs.pop("config", {}), **QUIET)
    with pytest.raises(ValueError, match=match):
        blastfx.compress(model, kwargs.get("budget", 0.5), config=cfg)
    assert not any(isinstance(m, BlastLinear) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_failure_midway_leaves_model_untouched(monkeypatch):
    model = models.tiny_llama()
    x = torch.randint(3, 128, (1, 5))
    ref = model(x).logits
    import blastfx.structures.blast.structure as sub
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return blastfx.factorize(*a, **k)

    monkeypatch.setattr(sub, "factorize", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        blastfx.compress(model, 0.5, config=BlastConfig(**QUIET))
    assert not any(isinstance(m, BlastLinear) for m in model.modules())
    assert not hasattr(model, "blastfx_plan")
    torch.testing.assert_close(model(x).logits, ref)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(64, 64) for _ in range(2)])

    def forward(self, x):
        if x.sum() > 0:             # data-dependent control flow: export cannot trace it
            x = -x
        for b in self.blocks:
            x = b(x)
        return x


def test_untraceable_model_falls_back_to_module_discovery():
    model = Untraceable()
    with pytest.warns(UserWarning, match="falling back to module discovery"):
        a = blastfx.analyze(model, torch.randn(2, 64))
    assert not a.traced and set(a.sites) == {"blocks.0", "blocks.1"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blastfx.compress(model, 0.5, example_inputs=torch.randn(2, 64), config=BlastConfig(**QUIET))
    assert "not traced" in model.blastfx_plan.summary()
    assert isinstance(model.blocks[0], BlastLinear)


def test_analyze_table_reports_calls_flops_groups():
    a = blastfx.analyze(models.tiny_llama())
    site = a.sites["model.layers.0.mlp.gate_proj"]
    assert site.calls == 1 and site.flops == 2 * site.tokens * 128 * 64 and site.tokens == 5   # HF dummy input
    assert ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"] in a.groups
    assert "gate_proj" in str(a) and "traced with torch.export" in str(a)


def test_module_called_twice_is_counted_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(32, 32)

        def forward(self, x):
            return self.f(self.f(x))

    a = blastfx.analyze(Twice(), torch.randn(3, 32))
    assert a.sites["f"].calls == 2 and a.sites["f"].tokens == 6


class SwapTrap(nn.Module):
    """Two linears; assigning a BlastLinear to ``second`` raises KeyboardInterrupt (Ctrl-C mid-swap)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(64, 64), nn.Linear(64, 64)

    def __setattr__(self, name, value):
        if name == "second" and isinstance(value, BlastLinear):
            raise KeyboardInterrupt
        super().__setattr__(name, value)

    def forward(self, x):
        return self.second(self.first(x))


@pytest.mark.parametrize("sequential", [False, True])
def test_interrupt_during_the_swap_restores_the_model(sequential):
    model = nn.Sequential(SwapTrap())
    originals = dict(model[0].named_children())
    x = torch.randn(16, 64)
    with pytest.raises(KeyboardInterrupt):
        blastfx.compress(model, 0.5, config=BlastConfig(include=("*",), sequential=sequential, iters=2, **QUIET),
                         calibration=[x], example_inputs=x)
    assert dict(model[0].named_children()) == originals          # the very same modules, none half-swapped
    assert not hasattr(model, "blastfx_plan")


def test_budget_below_the_smallest_structure_warns_with_what_is_kept():
    model = models.tiny_mlp()
    with pytest.warns(blastfx.api.BudgetWarning) as record:
        blastfx.compress(model, 1e-9, config=BlastConfig(include="*", init="random", **QUIET))
    plan = model.blastfx_plan
    assert plan.kept_fraction > 0.02                                 # rank 1 everywhere: far above 1e-9
    message = str(record[0].message)
    assert "budget 1e-09 asked" in message and f"keeps {plan.kept_fraction:.4f}" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", blastfx.api.BudgetWarning)
        blastfx.plan_for(models.tiny_mlp(), 0.5, BlastConfig(include="*", **QUIET))     # a budget it can keep
        small = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))                  # keeps a little less: no warning
        assert blastfx.plan_for(small, 0.5, BlastConfig(include="*", **QUIET)).kept_fraction < 0.5 * 0.99


def test_weight_only_compression_warns_how_to_calibrate():
    def warned(config, calibration=None):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            blastfx.compress(models.tiny_mlp(), 0.5, config=BlastConfig(include="*", iters=2, **config, **QUIET),
                             calibration=calibration)
        return [str(w.message) for w in record if issubclass(w.category, blastfx.api.WeightOnlyWarning)]

    [message] = warned({})
    assert "pass calibration=" in message.lower() and "100,000x" in message
    assert warned({}, calibration=[torch.randn(8, 48)]) == []
    assert warned({"init": "random"}) == []                           # nothing is fitted
    assert warned({"method": "block_diagonal"}) == []                 # a structure that takes no calibration


def test_auto_sequential_is_noted_on_the_plan_with_its_reason():
    batches = [{"input_ids": torch.randint(3, 128, (2, 16))}]
    explicit = BlastConfig(objective="output", strategy="uniform", **QUIET)
    notes = lambda budget, cfg=explicit, cal=batches: [n for n in blastfx.plan_for(  # noqa: E731
        models.tiny_llama(), budget, cfg, calibration=cal).notes if n.startswith("recipe (auto)")]
    assert notes(0.5) == ["recipe (auto): sequential True: budget 0.5 <= 0.6"]
    assert notes(0.8) == ["recipe (auto): sequential False: budget 0.8 > 0.6"]
    assert notes(0.5, replace(explicit, sequential=False)) == []
    [both] = notes(0.5, BlastConfig(**QUIET))
    assert "objective 'loss', strategy 'loss': the model returns a loss" in both and "; sequential True" in both


def test_auto_recipe_is_the_loss_recipe_when_the_model_returns_a_loss():
    dense = models.tiny_llama()
    batches = [{"input_ids": torch.randint(3, 128, (2, 16))} for _ in range(2)]
    explicit = blastfx.plan_for(dense, 0.5, BlastConfig(objective="loss", strategy="loss", **QUIET),
                                calibration=batches)
    model = models.tiny_llama()
    model.load_state_dict(dense.state_dict())
    blastfx.compress(model, 0.5, config=BlastConfig(iters=3, sequential=False, **QUIET), calibration=batches)
    plan = model.blastfx_plan
    assert (plan.strategy, plan.objective) == ("loss", "loss")
    assert plan.layers == explicit.layers and plan.dense == explicit.dense
    assert any("recipe (auto)" in n and "returns a loss" in n for n in plan.notes)
    assert model.config.quantization_config.plan["objective"] == "loss"
    # the factors are those of the Fisher-weighted problem
    from blastfx.statistics.collect import collect_covariances, collect_output_fisher
    name = next(iter(plan.layers))
    lp = plan.layers[name]
    expected = blastfx.factorize(dense.get_submodule(name).weight.detach(), lp.rank, lp.blocks, iters=3,
                                 calibration=collect_covariances(dense, [name], batches)[name],
                                 output_weights=collect_output_fisher(dense, [name], batches)[name],
                                 allow_larger=True)
    torch.testing.assert_close(model.get_submodule(name).to_dense(), expected.to_dense(), rtol=1e-4, atol=1e-5)


def test_auto_recipe_is_the_output_objective_without_a_loss_and_the_weights_without_calibration():
    model = models.tiny_llama()
    tensors = [torch.randint(3, 128, (2, 16))]                    # positional input_ids: no labels, no loss
    plan = blastfx.plan_for(model, 0.5, BlastConfig(**QUIET), calibration=tensors)
    assert (plan.strategy, plan.objective) == ("uniform", "output")
    assert any("returns no loss" in n for n in plan.notes)
    plan = blastfx.plan_for(model, 0.5, BlastConfig(**QUIET))
    assert (plan.strategy, plan.objective) == ("uniform", "weight")
    assert blastfx.Plan.from_json(plan.to_json()).objective == "weight"


def test_two_threads_compress_as_in_series():
    """torch.export is not thread-safe: without the export lock both analyses fell back to module
    discovery with a warning."""
    dense = [models.tiny_llama(), models.tiny_llama()]
    batches = [[torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(k))] for k in range(2)]
    # one pass: reconstruction's Adam steps would amplify the fp32 rounding that a shared intra-op
    # thread pool varies between concurrent callers, which is not what this test is about
    cfg = BlastConfig(include="*.mlp.*", iters=2, sequential=False, **QUIET)

    def run(k, into):
        into[k] = copy.deepcopy(dense[k])
        blastfx.compress(into[k], 0.5, config=cfg, calibration=batches[k])

    serial, threaded = {}, {}
    for k in range(2):
        run(k, serial)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=run, args=(k, threaded)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert [str(w.message) for w in record] == []
    for k in range(2):
        assert "not traced" not in threaded[k].blastfx_plan.summary()
        a, b = serial[k].state_dict(), threaded[k].state_dict()
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_singular_covariance_names_the_layer_and_suggests_more_damping():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    x = torch.randn(256, 1) @ torch.randn(1, 64)                    # inputs of rank 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = BlastConfig(include="*", calibration_damping=1e-12, objective="output", strategy="uniform", **QUIET)
    with pytest.raises(ValueError, match=r"input covariance of layer '0'.*singular even with calibration_damping="
                                         r"1e-12.*calibration_damping=1e-11"):
        blastfx.compress(model, 0.5, config=cfg, calibration=[x], example_inputs=x)
    assert not any(isinstance(m, BlastLinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_weight_only_method_with_calibration_is_refused_before_any_forward_pass():
    model = models.tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    passes = []
    model.register_forward_pre_hook(lambda *a: passes.append(1))
    for method in ("precgd", "block_diagonal"):
        cfg = BlastConfig(include="*", method=method, objective="output", strategy="uniform", **QUIET)
        with pytest.raises(ValueError, match=rf"method='{method}' fits the weights alone and cannot use calibration "
                                             r"data: pass no calibration=, or use a method that reads it \('als', "
                                             r"'lowrank'\)"):
            blastfx.compress(model, 0.5, config=cfg, calibration=[torch.randn(8, 48)])
    assert passes == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_statistics_are_collected_once_and_only_what_the_stages_read(monkeypatch):
    import blastfx.statistics.layer_stats as ls
    calls = []
    for name in ("collect_covariances", "collect_output_fisher"):
        real = getattr(ls, name)
        monkeypatch.setattr(ls, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    batches = [{"input_ids": torch.randint(3, 128, (2, 16))}]          # the model returns a loss on these
    blastfx.compress(models.tiny_llama(), 0.5, config=BlastConfig(objective="output", strategy="uniform", iters=2,
                                                                   sequential=False, **QUIET), calibration=batches)
    assert calls == ["collect_covariances"]                    # the builder's covariance; no Fisher
    calls.clear()
    blastfx.compress(models.tiny_llama(), 0.5, config=BlastConfig(objective="output", strategy="loss", iters=2,
                                                                   sequential=False, **QUIET), calibration=batches)
    assert calls == ["collect_covariances", "collect_output_fisher"]      # shared by planner and builder
    calls.clear()
    blastfx.compress(models.tiny_llama(), 0.5, config=BlastConfig(init="random", **QUIET), calibration=batches)
    assert calls == []
