"""The build stage: each planned layer fitted by its structure's method with its LayerStats, batched,
and what the builder declares it reads."""
import pytest
import torch
from torch import nn

import blastfx
from blastfx import BlastConfig, BlastLinear
from blastfx.build import BuildOptions, build_layers, empty_layers, method_of, needs
from blastfx.plan import LayerPlan, Plan
from blastfx.statistics import LayerStats
from blastfx.structures import get


def _model_and_plan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.Linear(24, 16), nn.Linear(16, 24, bias=False))
    plan = Plan({"0": LayerPlan(16, 24, 4, 2, bias=True), "1": LayerPlan(16, 24, 4, 2, bias=True),
                 "2": LayerPlan(24, 16, 4, 2, method="lowrank")}, 0.5, dense_total=3 * 384)
    return model, plan


def test_each_layer_is_the_factorization_of_its_target_under_its_statistics():
    model, plan = _model_and_plan()
    X = torch.randn(64, 24)
    C = X.T @ X / 64
    fisher = torch.rand(16) + 0.1
    target = torch.randn(16, 24)
    stats = {"0": LayerStats(covariance=C, output_fisher=fisher),
             "1": LayerStats(covariance=C, output_fisher=fisher, target=target),
             "2": LayerStats(covariance=torch.eye(16))}
    new = build_layers(model, plan, stats, BuildOptions(iters=5, progress=False))
    assert all(isinstance(m, BlastLinear) for m in new.values()) and set(new) == {"0", "1", "2"}
    for name, weight in (("0", model[0].weight.detach()), ("1", target)):
        expected = blastfx.factorize(weight, 4, 2, iters=5, calibration=C, output_weights=fisher, allow_larger=True)
        torch.testing.assert_close(new[name].to_dense(), expected.to_dense(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(new["1"].bias, model[1].bias)
    # lowrank under the identity covariance is the truncated SVD: a float64 known answer
    U, s, Vh = torch.linalg.svd(model[2].weight.detach().double())
    torch.testing.assert_close(new["2"].to_dense().double(), U[:, :4] * s[:4] @ Vh[:4], rtol=1e-3, atol=1e-4)
    assert new["2"].bias is None
    assert all(not isinstance(m, BlastLinear) for m in model)          # the model is untouched


def test_names_selects_layers_and_random_init_keeps_the_bias():
    model, plan = _model_and_plan()
    new = build_layers(model, plan, options=BuildOptions(init="random", progress=False), names={"1"})
    assert list(new) == ["1"] and new["1"].rank == 4
    torch.testing.assert_close(new["1"].bias, model[1].bias)


def test_empty_layers_have_the_planned_sizes_and_the_weights_dtype():
    model, plan = _model_and_plan()
    model = model.double()
    new = empty_layers(model, plan)
    assert [(m.out_features, m.in_features, m.rank, m.blocks, m.U.dtype, m.bias is None) for m in new.values()] == \
        [(16, 24, 4, (2, 2), torch.float64, False), (16, 24, 4, (2, 2), torch.float64, False),
         (24, 16, 4, (2, 2), torch.float64, True)]


def test_a_singular_covariance_names_the_layer():
    model, plan = _model_and_plan()
    x = torch.randn(1, 24)
    singular = x.T @ x                                  # rank 1
    stats = {"0": LayerStats(covariance=torch.eye(24)), "1": LayerStats(covariance=singular),
             "2": LayerStats(covariance=torch.eye(16))}
    with pytest.raises(ValueError, match=r"input covariance of layer '1' is singular even with calibration_damping"):
        build_layers(model, plan, stats, BuildOptions(iters=2, progress=False, calibration_damping=1e-12))


def test_statistics_measured_for_some_layers_of_a_batch_only_are_refused():
    model, plan = _model_and_plan()
    stats = {"0": LayerStats(covariance=torch.eye(24))}
    with pytest.raises(ValueError, match="statistic 'covariance' is measured for 1 of 2 layers"):
        build_layers(model, plan, stats, BuildOptions(iters=2, progress=False))


def test_what_the_builder_reads_follows_its_methods_and_the_objective():
    als, precgd = get("blast").method("als"), get("blast").method("precgd")
    assert needs(BlastConfig(objective="output"), {als}) == {"covariance"}
    assert needs(BlastConfig(objective="loss"), {als}) == {"covariance", "output_fisher"}
    assert needs(BlastConfig(objective="loss"), {precgd}) == set()
    assert needs(BlastConfig(init="random", objective="loss"), {als}) == set()
    options = BuildOptions(method="precgd")
    assert method_of(LayerPlan(8, 8, 1, 1), options) is precgd
    assert method_of(LayerPlan(8, 8, 1, 1, method="lowrank"), options).name == "lowrank"
    with pytest.raises(ValueError, match="init must be one of \\('factorize', 'random'\\), got 'zeros'"):
        BuildOptions(init="zeros")
