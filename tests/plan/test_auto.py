"""``structure="auto"`` (blastfx.plan.auto): per-layer choice at each layer's allotted parameters,
and a plan never worse than BLAST alone or SS1 alone on the calibration objective."""
import copy

import pytest
import torch
from torch import nn

import blastfx
from blastfx import BlastConfig
from blastfx.plan import make_plan
from blastfx.plan.auto import choose_auto
from blastfx.structures.ss1 import SS1Layout, ss1_to_dense
from blastfx.structures.ss1.layout import ss1_params
import models
from models import layer_inputs


def _cfg(**kw):
    return BlastConfig(progress=False, include=("*",), **kw)


class Parallel(nn.Module):
    """Linear layers side by side, their outputs summed."""

    def __init__(self, n, m=256, k=256):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(k, m, bias=False) for _ in range(n))

    def forward(self, x):
        return sum(b(x) for b in self.blocks)


def test_each_layer_takes_the_structure_measured_better_at_its_share():
    """Known answer from given errors: layer 0 is better as SS1 at the largest reduction that fits its
    BLAST share, layer 1 is better as BLAST and gets the parameters layer 0 frees."""
    analysis = blastfx.analyze(Parallel(2))
    cfg = _cfg(structure="auto", strategy="uniform")
    blast = make_plan(analysis, 0.5, _cfg(strategy="uniform"))
    share = blast.layers["blocks.0"].params
    ss1 = {"blocks.0": ({2: 0.05, 4: 0.10, 8: 0.20}, 1.0), "blocks.1": ({2: 0.60, 4: 0.80, 8: 0.90}, 1.0)}
    measured = {k: ({lp.rank: e}, 1.0) for (k, lp), e in zip(blast.layers.items(), (0.30, 0.01))}
    plan = make_plan(analysis, 0.5, cfg, size_errors={"ss1": ss1}, blast_errors=measured)
    fits = {r: e for r, e in ss1["blocks.0"][0].items() if ss1_params(256, 256, r) <= share}
    assert plan.layers["blocks.0"].structure == "ss1"
    assert plan.layers["blocks.0"].reduction == min(fits, key=fits.get)
    assert plan.layers["blocks.1"].structure == "blast"
    assert plan.layers["blocks.1"].rank > blast.layers["blocks.1"].rank       # the freed parameters
    assert plan.kept_params <= round(0.5 * plan.dense_total) * 1.01
    assert any(n.startswith("structure 'auto': 1 BLAST, 1 SS1, 0 dense (the 'per layer' plan") for n in plan.notes)


def test_the_ss1_plan_wins_where_it_is_better_on_the_objective():
    """At 0.75 the SS1 plan keeps one layer dense and the other at reduction 2; with that layer exact
    at reduction 2 its objective is 0, which no plan keeping each layer's BLAST share reaches."""
    analysis = blastfx.analyze(Parallel(2))
    ss1_plan = make_plan(analysis, 0.75, _cfg(structure="ss1", strategy="uniform"))
    assert len(ss1_plan.dense) == 1
    (exact,) = ss1_plan.layers
    other = ss1_plan.dense[0]
    ss1 = {exact: ({2: 0.0, 4: 0.5}, 1.0), other: ({2: 0.5, 4: 0.7}, 1.0)}
    blast = make_plan(analysis, 0.75, _cfg(strategy="uniform"))
    measured = {k: ({lp.rank: 0.2}, 1.0) for k, lp in blast.layers.items()}
    plan = make_plan(analysis, 0.75, _cfg(structure="auto", strategy="uniform"), size_errors={"ss1": ss1},
                     blast_errors=measured)
    assert plan.dense == [other] and plan.layers[exact].reduction == 2 and list(plan.layers) == [exact]
    note = next(n for n in plan.notes if n.startswith("structure 'auto'"))
    assert "(the 'ss1' plan; sum of relative output errors: per layer 0.2, blast 0.4, ss1 0)" in note


def test_auto_needs_blast_errors_at_the_blast_plans_ranks():
    analysis = blastfx.analyze(Parallel(2))
    ss1 = {f"blocks.{i}": ({2: 0.1}, 1.0) for i in range(2)}
    with pytest.raises(ValueError, match="BLAST errors"):
        make_plan(analysis, 0.5, _cfg(structure="auto"), size_errors={"ss1": ss1})
    with pytest.raises(ValueError, match="no error for 'blocks.0' at rank"):
        make_plan(analysis, 0.5, _cfg(structure="auto"), size_errors={"ss1": ss1},
                  blast_errors={"blocks.0": ({1: 0.1}, 1.0), "blocks.1": ({1: 0.1}, 1.0)})
    with pytest.raises(ValueError, match="BLAST errors"):
        choose_auto(lambda s: None, [], 0, _cfg(structure="auto"), None, {"ss1": ss1}, None)


def _objective(dense, compressed, inputs) -> float:
    """Sum over layers of the relative output error on the calibration inputs, in float64: the
    calibration objective of the uniform strategy, measured on the built layers."""
    total = 0.0
    for name, X in inputs.items():
        W = dense.get_submodule(name).weight.detach().double()
        layer = compressed.get_submodule(name)
        W_hat = (layer.weight if isinstance(layer, nn.Linear) else layer.to_dense()).detach().double()
        total += float(((X @ (W - W_hat).T) ** 2).sum() / ((X @ W.T) ** 2).sum())
    return total


def _objectives(dense, budget, batches, **kw):
    names = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    inputs = layer_inputs(dense, names, batches)
    out, plans = {}, {}
    for structure in ("blast", "ss1", "auto"):
        model = blastfx.compress(copy.deepcopy(dense), budget, calibration=batches,
                                 config=BlastConfig(structure=structure, progress=False, **kw))
        out[structure], plans[structure] = _objective(dense, model, inputs), model.blastfx_plan
    return out, plans


def test_auto_beats_both_families_where_layers_differ():
    """Two layers nearly SS1 (reduction 2), two nearly rank 16 (each plus 1% noise): auto takes each
    family where it fits and its calibration error is below both single-family plans'."""
    torch.manual_seed(0)
    dense = Parallel(4)
    layout = SS1Layout(256, 256, 2)
    with torch.no_grad():
        for i, layer in enumerate(dense.blocks):
            w = ss1_to_dense(torch.randn(layout.weight_shape), layout) if i % 2 == 0 else \
                torch.randn(256, 16) @ torch.randn(16, 256) / 4
            layer.weight.copy_(w + 0.01 * w.std() * torch.randn_like(w))
    batches = [torch.randn(256, 256) for _ in range(2)]
    errors, plans = _objectives(dense, 0.5, batches, include=("*",))
    auto = plans["auto"]
    assert [auto.layers[f"blocks.{i}"].structure for i in range(4)] == ["ss1", "blast", "ss1", "blast"]
    assert errors["auto"] < 0.5 * min(errors["blast"], errors["ss1"])


def test_auto_is_no_worse_than_either_family_on_a_small_llama():
    torch.manual_seed(0)
    dense = models.tiny_llama()
    batches = [{"input_ids": torch.randint(3, 128, (4, 32))} for _ in range(2)]
    errors, plans = _objectives(dense, 0.5, batches, strategy="uniform", objective="output")
    assert errors["auto"] <= min(errors["blast"], errors["ss1"]) * (1 + 1e-3), (errors, plans["auto"].notes)
    assert any(n.startswith("structure 'auto'") for n in plans["auto"].notes)


def test_layers_auto_makes_ss1_keep_the_model_dtype_and_the_plan_says_so():
    """With factor_dtype, the layers "auto" gives to SS1 (which has no quantized form) are planned
    without it, the BLAST ones with it, and the plan notes the former: they keep more bytes."""
    analysis = blastfx.analyze(Parallel(2))
    blast = make_plan(analysis, 0.5, _cfg(strategy="uniform", factor_dtype="int8"))
    ss1 = {"blocks.0": ({2: 0.05, 4: 0.10, 8: 0.20}, 1.0), "blocks.1": ({2: 0.60, 4: 0.80, 8: 0.90}, 1.0)}
    measured = {k: ({lp.rank: e}, 1.0) for (k, lp), e in zip(blast.layers.items(), (0.30, 0.01))}
    plan = make_plan(analysis, 0.5, _cfg(structure="auto", strategy="uniform", factor_dtype="int8"),
                     size_errors={"ss1": ss1}, blast_errors=measured)
    assert [(lp.structure, lp.factor_dtype) for lp in plan.layers.values()] == [("ss1", None), ("blast", "int8")]
    assert "factor_dtype 'int8' quantizes BLAST factors only: 1 SS1 layer keeps the model's dtype (blocks.0)" \
        in plan.notes
    assert type(plan).from_dict(plan.to_dict()).layers == plan.layers           # a plan that saves and loads
    assert not any("quantizes BLAST factors only" in n for n in blast.notes)
