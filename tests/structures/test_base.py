"""The structure registry: a family plugged in by registering it is planned, built and loaded by the
same stages as BLAST, and every lookup error names what was asked."""
import pytest
import torch
from torch import nn

from blastfx import structures
from blastfx.build import BuildOptions, build_layers, empty_layers
from blastfx.plan import LayerPlan, Plan
from blastfx.statistics import LayerStats
from blastfx.structures import base


class Factored(nn.Module):
    """x -> B (A x) + bias: the plain low-rank layer the toy structure builds."""

    def __init__(self, A, B, bias):
        super().__init__()
        self.A, self.B = nn.Parameter(A), nn.Parameter(B)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x):
        y = x @ self.A.T @ self.B.T
        return y if self.bias is None else y + self.bias


def _svd_fit(weights, rank, covariance=None):
    out = []
    for k, W in enumerate(weights.double()):
        if covariance is None:
            U, s, Vh = torch.linalg.svd(W, full_matrices=False)
            out.append((Vh[:rank], U[:, :rank] * s[:rank]))
        else:                              # whitened: min ||(W - BA) L||, L L^T = C
            L = torch.linalg.cholesky(covariance[k].double())
            U, s, Vh = torch.linalg.svd(W @ L, full_matrices=False)
            out.append((torch.linalg.solve_triangular(L, Vh[:rank], upper=False, left=False),
                        U[:, :rank] * s[:rank]))
    return out


def make_toy(calls):
    def fit_plain(weights, stats):
        calls.append(("svd", stats))
        return None

    def fit_whitened(weights, stats):
        calls.append(("whitened", stats))
        return torch.stack([s.covariance for s in stats])

    def build(weights, biases, stats, lp, method, options):
        cov = toy.methods[method].fit(weights, stats)
        return [Factored(A.to(weights.dtype), B.to(weights.dtype), b)
                for (A, B), b in zip(_svd_fit(weights, lp.rank, cov), biases)]

    def new(lp, *, bias, device=None, dtype=None):
        b = torch.zeros(lp.out_features, device=device, dtype=dtype) if bias else None
        return Factored(torch.zeros(lp.rank, lp.in_features, device=device, dtype=dtype),
                        torch.zeros(lp.out_features, lp.rank, device=device, dtype=dtype), b)

    toy = base.Structure(
        name="toy", module_type=Factored, knob=lambda lp: lp.rank,
        num_params=lambda m, n, rank: rank * (m + n), build=build, empty=new, random=new,
        methods={"svd": base.Method("svd", fit_plain),
                 "whitened": base.Method("whitened", fit_whitened, {"covariance"})},
        default_method="svd")
    return toy


@pytest.fixture
def toy(monkeypatch):
    calls = []
    structure = make_toy(calls)
    monkeypatch.setitem(base._REGISTRY, "toy", structure)
    return structure, calls


def test_blast_is_registered_with_its_methods():
    blast = structures.get("blast")
    assert "blast" in structures.names() and blast.default_method == "als"
    assert set(blast.methods) == {"als", "precgd", "lowrank", "block_diagonal", "block_low_rank", "monarch"}
    assert blast.methods["als"].uses == {"covariance", "output_fisher"} and blast.methods["precgd"].uses == set()
    lp = LayerPlan(96, 64, 8, (2, 4))
    assert blast.params(lp) == 8 * (96 + 64 + 2 * 4) == lp.params


def test_a_registered_structure_is_built_by_the_builder_with_its_method_and_stats(toy):
    structure, calls = toy
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(12, 10, bias=False))
    plan = Plan({"0": LayerPlan(10, 12, 3, 1, structure="toy"),
                 "1": LayerPlan(10, 12, 3, 1, structure="toy", bias=False, method="whitened")}, 0.5,
                dense_total=240)
    X = torch.randn(50, 12, dtype=torch.float64)
    C = (X.T @ X / 50).float()
    new = build_layers(model, plan, {"1": LayerStats(covariance=C)}, BuildOptions(progress=False))
    assert {type(m) for m in new.values()} == {Factored}
    assert [c[0] for c in calls] == ["svd", "whitened"]
    assert calls[1][1][0].covariance is C                    # the layer's LayerStats reached the method
    # known answers in float64: the best rank-3 layer, and the best rank-3 layer on the inputs X
    W0, W1 = (model[k].weight.detach().double() for k in (0, 1))
    U, s, Vh = torch.linalg.svd(W0)
    best = U[:, :3] * s[:3] @ Vh[:3]
    torch.testing.assert_close((new["0"].B @ new["0"].A).double(), best, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(new["0"].bias, model[0].bias)
    fit = (new["1"].B @ new["1"].A).double()
    err = ((X @ (W1 - fit).T).norm() / (X @ W1.T).norm()).item()      # output error on X
    sx = torch.linalg.svdvals(X @ W1.T)
    bound = (sx[3:].square().sum().sqrt() / sx.square().sum().sqrt()).item()
    assert err == pytest.approx(bound, rel=1e-3)               # the truncated output SVD's error, exactly


def test_empty_layers_and_params_follow_the_structure(toy):
    model = nn.Sequential(nn.Linear(12, 10))
    plan = Plan({"0": LayerPlan(10, 12, 3, 1, structure="toy", bias=True)}, 0.5, dense_total=120)
    [(name, layer)] = empty_layers(model, plan).items()
    assert isinstance(layer, Factored) and layer.A.shape == (3, 12) and layer.bias is not None
    assert plan.layers["0"].params == 3 * 22 and plan.kept_params == 66


def test_a_plan_names_its_structure_and_round_trips(toy):
    plan = Plan({"0": LayerPlan(10, 12, 3, 1, structure="toy", method="whitened")}, 0.5, dense_total=120)
    again = Plan.from_json(plan.to_json())
    assert again.layers == plan.layers
    d = plan.to_dict()
    d["layers"]["0"]["method"] = "als"                       # a BLAST method, not one of toy's
    with pytest.raises(ValueError, match=r"layers\['0'\]\.method: must be null or one of \('svd', 'whitened'\)"):
        Plan.from_dict(d)


def test_lookup_errors_name_what_was_asked():
    with pytest.raises(ValueError, match=r"structure must be one of \('blast',.*got 'nope'"):
        structures.get("nope")
    with pytest.raises(ValueError, match=r"method must be one of .* for structure 'blast', got 'sgd'"):
        structures.get("blast").method("sgd")
    assert structures.get("blast").method(None).name == "als"


def test_bad_declarations_are_refused():
    fit = lambda *a: None  # noqa: E731
    with pytest.raises(ValueError, match="uses \\['hessian'\\] are not statistics"):
        base.Method("m", fit, {"hessian"})
    with pytest.raises(ValueError, match="default_method 'x' is not one of its methods \\('m',\\)"):
        base.Structure("s", nn.Linear, fit, fit, fit, fit, fit, {"m": base.Method("m", fit)}, "x")
    with pytest.raises(ValueError, match="a structure named 'blast' is already registered"):
        base.register(make_toy([]).__class__(**{**vars(make_toy([])), "name": "blast"}))
    with pytest.raises(TypeError, match="register takes a Structure, got str"):
        base.register("blast")
