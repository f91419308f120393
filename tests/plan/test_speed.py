"""Speed-aware plans (``blastfx.plan.speed``): the latency model's fit, the expected speedups the plan
reports, and ``min_speedup`` keeping dense exactly the layers expected below it."""
import dataclasses
import math
import warnings

import pytest
import torch
from torch import nn

import blastfx
from blastfx import BlastConfig
from blastfx.plan.speed import PRESETS, STAGES, LatencyModel, apply_speed, expected_speedups, latency_model


class Mixed(nn.Module):
    """Repeated blocks with one wide layer and one narrow layer each (sizes far apart, so a latency
    model with a large fixed cost favours compressing only the wide one)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"wide": nn.Linear(256, 512), "narrow": nn.Linear(64, 64)})
                                    for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = x + b["wide"](x)[..., :256]
            x = torch.cat([b["narrow"](x[..., :64]), x[..., 64:]], -1)
        return x


# a GPU where a stage costs 10 µs and both paths stream at 1 GB/s (1000 bytes per µs): a layer of P
# weight bytes takes 10 + P/1000 µs dense and 20 + P'/1000 µs structured
TOY = LatencyModel("toy GPU", dense_fixed_us=10.0, dense_bandwidth_gbs=1.0, fixed_us=10.0, bandwidth_gbs=1.0)


def _plan(model, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return blastfx.plan_for(model, 0.5, config, example_inputs=(torch.randn(2, 256),))


def test_fit_recovers_known_constants():
    dense = [(b, 3.0 + b / 2e6) for b in (1e6, 4e6, 9e6)]                     # 3 µs + 2 TB/s
    structured = [(s, b, 2.5 * s + b / 1e6) for s, b in ((2, 1e6), (2, 5e6), (1, 3e6))]   # 2.5 µs/stage, 1 TB/s
    m = LatencyModel.fit("synthetic", dense, structured)
    assert m.dense_fixed_us == pytest.approx(3.0, rel=1e-9)
    assert m.dense_bandwidth_gbs == pytest.approx(2000.0, rel=1e-9)
    assert m.fixed_us == pytest.approx(2.5, rel=1e-9)
    assert m.bandwidth_gbs == pytest.approx(1000.0, rel=1e-9)
    assert m.ss1_fixed_us is None and m.structured_us(1, 4e6, "ss1") == m.structured_us(1, 4e6)
    ss1 = [(b, 7.0 + b / 5e5) for b in (1e6, 2e6, 6e6)]                        # 7 µs + 0.5 TB/s
    m = LatencyModel.fit("synthetic", dense, structured, ss1)
    assert m.ss1_fixed_us == pytest.approx(7.0, rel=1e-9)
    assert m.ss1_bandwidth_gbs == pytest.approx(500.0, rel=1e-9)
    assert m.structured_us(1, 4e6, "ss1") == pytest.approx(15.0, rel=1e-9)
    assert m.structured_us(2, 4e6, "blast") == pytest.approx(9.0, rel=1e-9)   # BLAST keeps its constants


def test_the_preset_reproduces_its_measurements():
    """The H200 preset is a fit to six measured layers: it must predict each within 10%."""
    from blastfx.structures.blast.layout import BlastShape
    h200 = PRESETS["h200"]
    for (m, n), t in (((4096, 4096), 12.91), ((11008, 4096), 25.14), ((4096, 11008), 28.38)):
        assert h200.dense_us(m * n * 2) == pytest.approx(t, rel=0.1)
    for m, n, r, t in ((4096, 4096, 1008, 12.12), (11008, 4096, 1488, 22.48), (4096, 11008, 1488, 20.93)):
        assert h200.structured_us(2, BlastShape.make(m, n, r, 4).num_params * 2) == pytest.approx(t, rel=0.1)


def test_the_preset_predicts_the_measured_decode_times_it_was_fitted_to():
    """The H200 rows (µs at T = 1): dense, BLAST at rank 1008/1488 and SS1 at reduction 2, for the
    three Llama-2-7B shapes. The fit is a two-constant line per kind, so each prediction is within 15%
    of its row, and it keeps the measured order: SS1 and BLAST faster than dense at every shape."""
    from blastfx.structures.blast.layout import BlastShape
    from blastfx.structures.ss1 import SS1Layout
    h200 = PRESETS["h200"]
    rows = {(4096, 4096): (13.7, 1008, 11.73, 8.75), (11008, 4096): (25.3, 1488, 22.62, 19.13),
            (4096, 11008): (28.3, 1488, 21.67, 19.69)}
    for (m, n), (dense, rank, blast, ss1) in rows.items():
        d = h200.dense_us(m * n * 2)
        b = h200.structured_us(2, BlastShape.make(m, n, rank, 4).num_params * 2)
        s = h200.structured_us(1, SS1Layout(m, n, 2).num_params * 2, "ss1")
        assert d == pytest.approx(dense, rel=0.15) and b == pytest.approx(blast, rel=0.15)
        assert s == pytest.approx(ss1, rel=0.15)
        assert s < d and b < d


def test_ss1_layers_are_costed_with_the_ss1_constants():
    model = Mixed()
    slow_ss1 = LatencyModel("toy GPU", 10.0, 1.0, 10.0, 1.0, ss1_fixed_us=100.0, ss1_bandwidth_gbs=1.0)
    plan = _plan(model, BlastConfig(include=("*",), structure="ss1"))
    assert plan.layers and all(lp.structure == "ss1" for lp in plan.layers.values())
    speed = expected_speedups(plan, slow_ss1, 4)
    for name, lp in plan.layers.items():
        assert speed[name] == pytest.approx((10.0 + lp.dense_params * 4 / 1000.0) / (100.0 + lp.params * 4 / 1000.0))


def test_expected_speedups_follow_the_model():
    plan = _plan(Mixed(), BlastConfig(include=("*",)))
    speed = expected_speedups(plan, TOY, 4)
    for name, lp in plan.layers.items():
        dense = 10.0 + lp.dense_params * 4 / 1000.0
        ours = STAGES["blast"] * 10.0 + lp.params * 4 / 1000.0
        assert speed[name] == pytest.approx(dense / ours, rel=1e-12)
    assert any("expected decode speedup on toy GPU" in n for n in apply_speed(plan, TOY, 4, None).notes)


def test_min_speedup_keeps_dense_exactly_the_slow_layers():
    torch.manual_seed(0)
    model = Mixed()
    config = BlastConfig(include=("*",), latency=TOY, min_speedup=1.0)
    plan = _plan(model, config)
    full = _plan(model, BlastConfig(include=("*",), latency=TOY))
    speed = expected_speedups(full, TOY, 4)
    slow = sorted(k for k, s in speed.items() if s < 1.0)
    assert slow == ["blocks.0.narrow", "blocks.1.narrow"]                  # the toy GPU's fixed cost
    assert sorted(plan.layers) == ["blocks.0.wide", "blocks.1.wide"]
    assert set(slow) <= set(plan.dense)
    assert any("kept dense 2 layers expected below min_speedup=1.0" in n for n in plan.notes)
    x = torch.randn(3, 256)
    want = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blastfx.compress(model, 0.5, config=config, example_inputs=(x,))
    assert type(model.blocks[0]["narrow"]) is nn.Linear
    assert isinstance(model.blocks[0]["wide"], blastfx.BlastLinear)
    assert torch.isfinite(model(x)).all() and model(x).shape == want.shape


def test_min_speedup_nobody_reaches_is_an_error_and_the_model_is_untouched():
    model = Mixed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slow_gpu = LatencyModel("slow GPU", 1.0, 1.0, 1e6, 1.0)
    with pytest.raises(ValueError, match="every selected layer is expected slower"):
        blastfx.compress(model, 0.5, config=BlastConfig(include=("*",), latency=slow_gpu, min_speedup=1.0),
                         example_inputs=(torch.randn(2, 256),))
    assert all(type(b["wide"]) is nn.Linear for b in model.blocks)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, message", [
    ({"min_speedup": 0.0}, "min_speedup must be a positive"),
    ({"min_speedup": math.nan}, "min_speedup must be a positive"),
    ({"latency": "a100"}, "latency must be a LatencyModel, 'measure' or a preset"),
    ({"latency": 3}, "latency must be a LatencyModel"),
])
def test_bad_speed_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlastConfig(**kwargs)


def test_bad_latency_model_constants_are_named():
    with pytest.raises(ValueError, match="LatencyModel.fixed_us must be a finite non-negative number"):
        LatencyModel("x", 1.0, 1.0, -1.0, 1.0)
    with pytest.raises(ValueError, match="at least two points of different sizes for each kind"):
        LatencyModel.fit("x", [(1.0, 1.0)], [(2, 1.0, 1.0), (2, 2.0, 2.0)])
    with pytest.raises(ValueError, match="at least two points of different sizes for each kind"):
        LatencyModel.fit("x", [(1.0, 1.0), (2.0, 2.0)], [(2, 1.0, 1.0), (2, 2.0, 2.0)], [(1.0, 3.0)])
    with pytest.raises(ValueError, match="ss1_fixed_us and ss1_bandwidth_gbs together or neither"):
        LatencyModel("x", 1.0, 1.0, 1.0, 1.0, ss1_fixed_us=1.0)
    with pytest.raises(ValueError, match="LatencyModel.ss1_bandwidth_gbs must be a finite"):
        LatencyModel("x", 1.0, 1.0, 1.0, 1.0, ss1_fixed_us=1.0, ss1_bandwidth_gbs=math.inf)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_measure_without_a_gpu_says_what_to_pass_instead():
    with pytest.raises(RuntimeError, match="pass a preset"):
        latency_model("measure")


@pytest.mark.cuda
def test_measure_on_the_gpu_gives_a_model_that_predicts_its_own_points():
    m = LatencyModel.measure()
    assert m.dense_bandwidth_gbs > 100 and m.bandwidth_gbs > 100
    assert 0 < m.dense_fixed_us < 100 and 0 <= m.fixed_us < 100
    assert m.ss1_bandwidth_gbs > 10 and 0 <= m.ss1_fixed_us < 1000


class Siblings(nn.Module):
    """q/k/v-like layers reading one input, then one o-like layer on its own."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(256, 256) for _ in range(4))

    def forward(self, x):
        return self.o(self.q(x) + self.k(x) + self.v(x))


# a GPU where a stage's fixed cost outweighs half of a 256x256 layer's bytes: alone each BLAST layer
# is slower than dense there, three siblings in one grouped call are faster
HEAVY_STAGES = LatencyModel("toy GPU", dense_fixed_us=200.0, dense_bandwidth_gbs=1.0, fixed_us=200.0, bandwidth_gbs=1.0)


def test_siblings_are_costed_as_one_grouped_call():
    plan = _plan(Siblings(), BlastConfig(include=("*",)))
    groups = [["k", "q", "v"]]
    assert sorted(plan.layers) == ["k", "o", "q", "v"]
    alone = expected_speedups(plan, HEAVY_STAGES, 4)
    grouped = expected_speedups(plan, HEAVY_STAGES, 4, groups)
    siblings = [plan.layers[k] for k in "qkv"]
    dense = sum(200.0 + lp.dense_params * 4 / 1000.0 for lp in siblings)
    ours = STAGES["blast"] * 200.0 + sum(lp.params * 4 / 1000.0 for lp in siblings)
    for k in "qkv":
        assert alone[k] < 1.0 < grouped[k] == pytest.approx(dense / ours, rel=1e-12)
    assert grouped["o"] == alone["o"] < 1.0
    notes = apply_speed(plan, HEAVY_STAGES, 4, None, groups).notes
    assert any("at T=1, 1 sibling group as one grouped call each" in n for n in notes)


def test_min_speedup_keeps_grouped_siblings_and_drops_the_slow_lone_layer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = blastfx.plan_for(Siblings(), 0.5, BlastConfig(include=("*",), latency=HEAVY_STAGES, min_speedup=1.0),
                                example_inputs=(torch.randn(2, 256),))
    assert sorted(plan.layers) == ["k", "q", "v"] and "o" in plan.dense


def test_lone_members_are_not_grouped_and_quantized_ones_group_by_format():
    plan = _plan(Siblings(), BlastConfig(include=("*",)))
    from blastfx.plan.speed import grouped_siblings
    assert grouped_siblings(plan, [["k", "q", "v"], ["o"]]) == [["k", "q", "v"]]
    odd = dataclasses.replace(plan, layers=dict(plan.layers))
    odd.layers["q"] = dataclasses.replace(plan.layers["q"], rank=plan.layers["q"].rank - 1)    # not a multiple of 8
    assert grouped_siblings(odd, [["k", "q", "v"]]) == [["k", "v"]]
    plan.layers["q"] = dataclasses.replace(plan.layers["q"], factor_dtype="int8")
    assert grouped_siblings(plan, [["k", "q", "v"]]) == [["k", "v"]]          # q's codes run on their own
    plan.layers["k"] = dataclasses.replace(plan.layers["k"], factor_dtype="int8")
    assert grouped_siblings(plan, [["k", "q", "v"]]) == [["k", "q"]]          # an int8 group; v alone
    plan.layers["v"] = dataclasses.replace(plan.layers["v"], factor_dtype="int4")
    assert grouped_siblings(plan, [["k", "q", "v"]]) == [["k", "q"]]
