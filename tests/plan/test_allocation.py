"""The error-driven allocation (strategies "error" and "loss"): a greedy on each layer's convex error
curve, where keeping a layer dense is one more point of that curve."""
import torch
from torch import nn

import blastfx
from blastfx import BlastConfig, BlastLinear
from blastfx.plan import LayerPlan
from blastfx.plan.allocation import _error_curve
from conftest import spectrum_matrix

QUIET = dict(progress=False, include=("*",))


def test_flat_spectrum_jumps_straight_to_dense():
    """Known answer: equal singular values make the BLAST error linear in the parameters, and BLAST
    at rank r costs r(m + n + b^2) > r * m: the chord from the smallest rank to the dense point is
    steeper than any rank step, so the hull is exactly [smallest rank, dense]."""
    lp = LayerPlan(96, 48, 8, (4, 4))
    tail = torch.arange(48, -1, -1, dtype=torch.float64)          # s_i = 1: tail energy 48 - r
    hull = _error_curve(lp, tail, 8, allow_dense=True)
    assert [(p, e, r) for p, e, r in hull] == [(8 * (96 + 48 + 16), 40.0, 8), (96 * 48, 0.0, None)]
    no_dense = _error_curve(lp, tail, 8, allow_dense=False)
    assert [r for _, _, r in no_dense] == [8, 24]                  # rank 32 would exceed dense: 32*160 > 4608
    assert all(r is not None for _, _, r in no_dense)


def test_decaying_spectrum_hull_keeps_every_rank_and_is_convex():
    lp = LayerPlan(96, 48, 8, (4, 4))
    s2 = torch.arange(1, 49, dtype=torch.float64) ** -2.0
    tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])
    hull = _error_curve(lp, tail, 8, allow_dense=True)
    slopes = [(e1 - e0) / (p1 - p0) for (p0, e0, _), (p1, e1, _) in zip(hull, hull[1:])]
    assert all(a <= b for a, b in zip(slopes, slopes[1:]))         # convex: ever flatter
    assert [r for _, _, r in hull][:2] == [8, 16]


def _two_layer_model():
    """Layer "0": an orthogonal (flat-spectrum) 64 x 64 map, which BLAST cannot shorten; layer "1": a
    fast-decaying spectrum, which it can."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))[0].float())
        model[1].weight.copy_(spectrum_matrix(64, 64, 1.5))
    return model


def test_allocation_keeps_the_incompressible_layer_dense_and_exact(tmp_path):
    model = _two_layer_model()
    x = torch.randn(256, 64)
    batches = [x[:128], x[128:]]
    plan = blastfx.plan_for(model, 0.7, BlastConfig(strategy="error", **QUIET), example_inputs=x[:4],
                            calibration=batches)
    assert plan.dense == ["0"] and list(plan.layers) == ["1"]
    assert abs(plan.kept_fraction - 0.7) <= 0.01 * 0.7
    assert "kept dense" in plan.summary()
    capped = blastfx.plan_for(model, 0.7, BlastConfig(strategy="error", allow_dense=False, **QUIET),
                              example_inputs=x[:4], calibration=batches)
    assert capped.dense == [] and set(capped.layers) == {"0", "1"}
    reference = model[1](model[0](x)).double()
    outputs = {}
    for name, p in (("dense", plan), ("capped", capped)):
        m = _two_layer_model()
        blastfx.compress(m, plan=blastfx.Plan.from_json(p.to_json()), config=BlastConfig(**QUIET), calibration=batches)
        outputs[name] = m(x).double()
        if name == "dense":
            assert type(m[0]) is nn.Linear and torch.equal(m[0].weight, model[0].weight)
            assert isinstance(m[1], BlastLinear)
            blastfx.save(m, tmp_path / "ckpt")            # the dense layer travels as a plain weight
            fresh = blastfx.load(tmp_path / "ckpt", nn.Sequential(nn.Linear(64, 64, bias=False),
                                                                  nn.Linear(64, 64, bias=False)))
            assert fresh.blastfx_plan.dense == ["0"] and type(fresh[0]) is nn.Linear
            torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    err = {k: ((v - reference).norm() / reference.norm()).item() for k, v in outputs.items()}
    assert err["dense"] < 0.5 * err["capped"]


def test_structure_override_plans_each_structure_on_its_own_share():
    """SS1 everywhere but the second linear of each block, kept BLAST by an override: each group keeps
    the budget of its own parameters, so the whole does too."""
    from blastfx import LayerOverride
    from blastfx.plan import Plan

    model = nn.Module()
    model.blocks = nn.ModuleList(nn.Sequential(nn.Linear(128, 256), nn.Linear(256, 128)) for _ in range(3))
    cfg = BlastConfig(structure="ss1", strategy="uniform", overrides={"blocks.*.1": LayerOverride(structure="blast")},
                      **QUIET)
    plan = blastfx.plan.make_plan(blastfx.analyze(model), 0.5, cfg)
    assert {n: lp.structure for n, lp in plan.layers.items()} == {
        f"blocks.{i}.{j}": ("blast" if j else "ss1") for i in range(3) for j in range(2)}
    assert list(plan.layers) == [f"blocks.{i}.{j}" for i in range(3) for j in range(2)]   # the model's order
    for structure in ("ss1", "blast"):
        group = [lp for lp in plan.layers.values() if lp.structure == structure]
        kept = sum(lp.params for lp in group) / sum(lp.dense_params for lp in group)
        assert abs(kept - 0.5) <= 0.005 * (structure == "blast")                # SS1 at reduction 2: exactly half
    assert abs(plan.kept_fraction - 0.5) <= 0.005 and plan.dense_total == 6 * 128 * 256
    assert "structure per layer from overrides: ss1 for 3 layers, blast for 3 layers" in plan.notes
    assert Plan.from_json(plan.to_json()).layers == plan.layers
    # and the other way round: BLAST by default, SS1 where an override says so
    flipped = blastfx.plan.make_plan(blastfx.analyze(model), 0.5, BlastConfig(
        strategy="uniform", overrides={"blocks.*.1": LayerOverride(structure="ss1")}, **QUIET))
    assert {n: lp.structure for n, lp in flipped.layers.items()} == {
        f"blocks.{i}.{j}": ("ss1" if j else "blast") for i in range(3) for j in range(2)}
