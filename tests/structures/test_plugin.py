"""A structure family plugged in from outside the package: a plain low-rank layer, defined in this file
alone and registered for the test, is configured, planned (uniform and by measured error, and weighed
by ``structure="auto"``), built, costed, saved, loaded (blastfx's folders and transformers'
``save_pretrained``) and turned back to dense by the same stages as BLAST and SS1, and is forgotten
once unregistered."""
import copy
import dataclasses
import math
import warnings

import pytest
import torch
from torch import nn

import blastfx
from blastfx import BlastConfig, LayerOverride, structures
from blastfx.plan import LayerPlan, Plan
from blastfx.plan.speed import LatencyModel, expected_speedups
from blastfx.statistics.damping import damped
import models

NAME = "lowrank"


class LowRank(nn.Module):
    """x -> x Aᵀ Bᵀ + bias, A (rank, in) and B (out, rank)."""

    def __init__(self, in_features, out_features, rank, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def forward(self, x):
        y = x @ self.A.T @ self.B.T
        return y if self.bias is None else y + self.bias

    def to_dense(self):
        return self.B @ self.A


def _whitened_svd(weight, covariance, damping):
    """(U diag(s), Vh L⁻¹, s) with W L = U diag(s) Vh and L Lᵀ the damped covariance (the identity
    without one): the first r columns and rows are the least output error at rank r (Eckart-Young on
    W L), and sum(s[r:]²) is that error in the planner's units."""
    W = weight.double()
    if covariance is None:
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
        return U * s, Vh, s
    L = torch.linalg.cholesky(damped(covariance.to(W.device), damping))
    U, s, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    return U * s, torch.linalg.solve_triangular(L, Vh, upper=False, left=False), s


def num_params(out_features, in_features, rank):
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"a {out_features}x{in_features} low-rank layer takes a rank in [1, "
                         f"{min(out_features, in_features)}], got {rank!r}")
    return rank * (out_features + in_features)


def sizes(out_features, in_features):
    """The ranks keeping 1/2, 1/4, ... of the dense parameters: step i is the same fraction everywhere."""
    out, j = [], 1
    while (rank := out_features * in_features // (2 ** j * (out_features + in_features))) >= 1:
        out.append(rank)
        j += 1
    return out


def size_errors(weight, stats, damping, budget):
    """The truncated whitened SVD's error at every rank of the ladder (no output Fisher: the loss
    strategy is not what this toy is planned by)."""
    s2 = _whitened_svd(weight, stats.covariance, damping)[2].pow(2)
    return {r: float(s2[r:].sum()) for r in sizes(*weight.shape)}, float(s2.sum())


def build(weights, biases, stats, lp, method, options):
    layers = []
    for w, b, s in zip(weights, biases, stats):
        B, A, _ = METHODS[method].fit(w, s.covariance, options.calibration_damping)
        layer = LowRank(lp.in_features, lp.out_features, lp.rank, bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.A.copy_(A[:lp.rank])
            layer.B.copy_(B[:, :lp.rank])
            if b is not None:
                layer.bias.copy_(b)
        layers.append(layer)
    return layers


def empty(lp, *, bias, device=None, dtype=None):
    return LowRank(lp.in_features, lp.out_features, lp.rank, bias=bias, device=device, dtype=dtype)


def random(lp, *, bias, device=None, dtype=None):
    layer = empty(lp, bias=bias, device=device, dtype=dtype)
    with torch.no_grad():
        layer.A.uniform_(-1 / math.sqrt(lp.in_features), 1 / math.sqrt(lp.in_features))
        layer.B.uniform_(-1 / math.sqrt(lp.rank), 1 / math.sqrt(lp.rank))
    return layer


METHODS = {"truncated_svd": structures.Method("truncated_svd", _whitened_svd, uses={"covariance"})}

LOWRANK = structures.Structure(
    name=NAME, module_type=LowRank, knob=lambda lp: lp.rank, num_params=num_params, build=build, empty=empty,
    random=random, methods=METHODS, default_method="truncated_svd", size_of=lambda m: {"rank": m.rank},
    plan_fields=("rank",), fields=lambda rank: {"rank": rank}, exact=lambda m, n: min(m, n), sizes=sizes,
    size_errors=size_errors, decode_stages=2)


@pytest.fixture
def lowrank():
    with structures.registered(LOWRANK):
        yield LOWRANK
    assert NAME not in structures.names()
    with pytest.raises(ValueError, match="structure must be one of"):
        BlastConfig(structure=NAME)


class Blocks(nn.Module):
    """Residual blocks of two 64x64 linears, every weight exactly rank 2 in ``dtype`` (so any rank >= 2
    is exact)."""

    def __init__(self, n=2, d=64, dtype=torch.float64):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d, dtype=dtype), nn.GELU(), nn.Linear(d, d, dtype=dtype))
                                    for _ in range(n))
        with torch.no_grad():
            for layer in self.modules():
                if isinstance(layer, nn.Linear):
                    layer.weight.copy_(torch.randn(d, 2, dtype=dtype) @ torch.randn(2, d, dtype=dtype) / d ** 0.5)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


class Parallel(nn.Module):
    """Two 64x64 linears side by side: the first exactly rank 2 in ``dtype``, the second full rank."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(64, 64, bias=False, dtype=dtype) for _ in range(2))
        with torch.no_grad():
            self.blocks[0].weight.copy_(torch.randn(64, 2, dtype=dtype) @ torch.randn(2, 64, dtype=dtype) / 8)

    def forward(self, x):
        return self.blocks[0](x) + self.blocks[1](x)


def _cfg(**kw):
    return BlastConfig(progress=False, **kw)


def test_a_ladder_family_declares_what_the_planner_reads():
    with pytest.raises(ValueError, match="structure 'lowrank': a family with sizes .* needs size_errors too"):
        dataclasses.replace(LOWRANK, size_errors=None)
    assert NAME not in structures.names()


def test_the_family_is_a_config_choice_only_while_registered(lowrank):
    assert NAME in structures.names() and [s.name for s in structures.ladders()] == ["ss1", NAME]
    config = _cfg(structure="blast", include=("*",), overrides={"blocks.0.*": LayerOverride(structure=NAME)})
    with pytest.raises(ValueError, match="rank and blocks size a BLAST layer, not a 'lowrank' one"):
        LayerOverride(structure=NAME, rank=8)
    torch.manual_seed(0)
    plan = blastfx.plan_for(Blocks(dtype=torch.float32), 0.25, config)
    assert {k: lp.structure for k, lp in plan.layers.items()} == {
        "blocks.0.0": NAME, "blocks.0.2": NAME, "blocks.1.0": "blast", "blocks.1.2": "blast"}
    assert "lowrank  rank=8" in plan.summary()
    again = Plan.from_json(plan.to_json())
    assert again.layers == plan.layers
    bad = plan.to_dict()
    bad["layers"]["blocks.0.0"]["rank"] = 65
    with pytest.raises(ValueError, match=r"layers\['blocks.0.0'\]\.rank: .*rank in \[1, 64\], got 65"):
        Plan.from_dict(bad)


def test_compress_builds_saves_loads_and_densifies_the_family(lowrank, tmp_path):
    """Uniform at 0.25: every 64x64 layer on the ladder's 1/4 step (rank 8), exactly the budget; the
    weights are rank 2, so in float64 the compressed model computes what the dense one did."""
    torch.manual_seed(0)
    dense = Blocks()
    with pytest.warns(blastfx.WeightOnlyWarning):
        model = blastfx.compress(copy.deepcopy(dense), 0.25, config=_cfg(structure=NAME))
    plan = model.blastfx_plan
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRank)}
    assert set(layers) == set(plan.layers) == {"blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"}
    assert {(lp.structure, lp.rank, lp.blocks, lp.reduction) for lp in plan.layers.values()} == {(NAME, 8, None, None)}
    stored = sum(m.A.numel() + m.B.numel() for m in layers.values())
    assert stored == plan.kept_params == 0.25 * plan.dense_total and plan.kept_fraction == 0.25
    assert any(n.startswith("structure 'lowrank' by one size step for all: 4 LOWRANK, 0 dense") for n in plan.notes)
    assert any(n.startswith("expected decode speedup") for n in plan.notes)
    x = torch.randn(5, 64, dtype=torch.float64)
    torch.testing.assert_close(model(x), dense(x), rtol=1e-10, atol=1e-10)

    blastfx.save(model, tmp_path)
    torch.manual_seed(1)
    loaded = blastfx.load(tmp_path, Blocks())
    assert all(isinstance(loaded.get_submodule(n), LowRank) for n in layers)
    assert loaded.blastfx_plan.layers == plan.layers
    assert torch.equal(loaded(x), model(x))

    back = blastfx.to_dense(loaded)
    assert all(type(back.get_submodule(n)) is nn.Linear for n in layers) and not hasattr(back, "blastfx_plan")
    torch.testing.assert_close(back(x), dense(x), rtol=1e-10, atol=1e-10)


def test_the_measured_strategy_reads_the_family_errors(lowrank):
    """Strategy "error" at 0.3 (2458 of 8192 parameters; the uniform plan: rank 8 for both): the rank-2
    layer's error drops to 0 at rank 2 and the rest goes to the full-rank layer, up to rank 16 (2048
    parameters), its largest size that fits; in float64 the rank-2 layer is exact on any input."""
    torch.manual_seed(0)
    dense = Parallel()
    batches = [torch.randn(128, 64, dtype=torch.float64) for _ in range(2)]
    model = blastfx.compress(copy.deepcopy(dense), 0.3, calibration=batches,
                             config=_cfg(structure=NAME, strategy="error", sequential=False))
    plan = model.blastfx_plan
    assert plan.layers["blocks.0"].rank == 2 and plan.layers["blocks.1"].rank == 16
    assert plan.kept_params == 2 * 128 + 16 * 128 <= 0.3 * plan.dense_total
    assert any("measured relative output error per parameter" in n for n in plan.notes)
    x = torch.randn(7, 64, dtype=torch.float64)
    torch.testing.assert_close(model.blocks[0](x), dense.blocks[0](x), rtol=1e-10, atol=1e-10)


def test_auto_weighs_the_registered_family(lowrank):
    torch.manual_seed(0)
    batches = [torch.randn(128, 64) for _ in range(2)]
    plan = blastfx.plan_for(Parallel(torch.float32), 0.25, _cfg(structure="auto", strategy="error"),
                            calibration=batches)
    note = next(n for n in plan.notes if n.startswith("structure 'auto'"))
    scores = note.split("sum of relative output errors: ")[1]
    assert [s.split(" ")[0] for s in scores.rstrip(")").split(", ")] == ["per", "blast", "ss1", NAME, "mixed"]
    assert {lp.structure for lp in plan.layers.values()} <= {"blast", "ss1", NAME}


def test_the_latency_model_costs_the_family_by_its_stages_or_its_own_constants(lowrank):
    plan = Plan({"l": LayerPlan.of(NAME, 64, 64, {"rank": 8})}, 0.25, dense_total=4096)
    bytes_ = 8 * 128 * 4
    stages = LatencyModel("toy GPU", 10.0, 1.0, 10.0, 1.0)
    own = LatencyModel("toy GPU", 10.0, 1.0, 10.0, 1.0, own={NAME: (3.0, 2.0)})
    dense_us = 10.0 + 4096 * 4 / 1000.0
    assert expected_speedups(plan, stages, 4)["l"] == pytest.approx(dense_us / (2 * 10.0 + bytes_ / 1000.0))
    assert expected_speedups(plan, own, 4)["l"] == pytest.approx(dense_us / (3.0 + bytes_ / 2000.0))


def test_transformers_round_trip_of_the_family(lowrank, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blastfx.WeightOnlyWarning)
        model = blastfx.compress(models.tiny_llama(), 0.5, config=_cfg(structure=NAME))
    layers = [n for n, m in model.named_modules() if isinstance(m, LowRank)]
    assert len(layers) == 14
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert all(isinstance(loaded.get_submodule(n), LowRank) for n in layers)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
