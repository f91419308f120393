"""Calibration-aware factorization and compress(calibration=...)."""
import pytest
import torch

import blastfx
from blastfx import BlastConfig, factorize
from blastfx.statistics.collect import collect_covariances, singular_covariance_error
from conftest import spectrum_matrix
import models


def correlated_inputs(n, T=1500, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, n, generator=g) @ (0.3 * torch.randn(n, n, generator=g)) + torch.randn(T, n, generator=g)
    X[:, :4] *= 15                                    # outlier channels, as in real LLM activations
    return X


def output_error(W, What, X):
    return ((W - What) @ X.T).norm().item() / (W @ X.T).norm().item()


@pytest.mark.parametrize("blocks", [(4, 4), (2, 4), (3, 1)])
def test_calibrated_beats_weight_only_and_whitened_svd_on_outputs(blocks):
    W = spectrum_matrix(96, 80, 0.5)
    X = correlated_inputs(80)
    C = X.T @ X
    weight_only = factorize(W, 16, blocks)
    wsvd = factorize(W, 16, blocks, method="lowrank", calibration=C)
    cal = factorize(W, 16, blocks, calibration=C)
    e_w, e_s, e_c = (output_error(W, f.to_dense(), X) for f in (weight_only, wsvd, cal))
    if blocks[1] == 1:      # one block-column: BLAST is rank-r with a shared V, the whitened SVD is optimal
        assert e_c <= e_s * (1 + 1e-5) and e_s < e_w
    else:
        assert e_c < e_s < e_w
    assert cal.output_error.item() == pytest.approx(e_c, rel=1e-4)


def test_weighted_als_is_monotone():
    W = spectrum_matrix(64, 64, 0.5)
    X = correlated_inputs(64)
    f = factorize(W, 8, 4, calibration=X.T @ X, tol=0, iters=15)
    h = f.history
    assert torch.all(h[1:] <= h[:-1] * (1 + 1e-5))


def test_identity_covariance_matches_weight_only():
    W = spectrum_matrix(48, 48, 0.7, dtype=torch.float64)
    f_cal = factorize(W, 8, 2, calibration=torch.eye(48, dtype=torch.float64), calibration_damping=0.0, iters=60)
    f_w = factorize(W, 8, 2, iters=60)
    assert f_cal.rel_error.item() == pytest.approx(f_w.rel_error.item(), rel=2e-2)


def test_calibration_argument_errors():
    W = torch.randn(16, 12)
    with pytest.raises(ValueError, match="covariance"):
        factorize(W, 2, 2, calibration=torch.eye(16))
    with pytest.raises(ValueError, match="weight-only"):
        factorize(W, 2, 2, method="precgd", calibration=torch.eye(12))
    with pytest.raises(ValueError, match="NaN"):
        factorize(W, 2, 2, calibration=torch.full((12, 12), float("nan")))


def test_collect_covariances_matches_direct_computation():
    model = models.tiny_mlp()
    xs = [torch.randn(7, 48), torch.randn(5, 48)]
    covs = collect_covariances(model, ["0", "2"], xs)
    X = torch.cat(xs)
    torch.testing.assert_close(covs["0"], X.T @ X / 12, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        H = torch.cat([torch.nn.functional.gelu(model[0](x)) for x in xs])
    torch.testing.assert_close(covs["2"], H.T @ H / 12, rtol=1e-4, atol=1e-5)
    assert not model[0]._forward_pre_hooks            # hooks removed


@pytest.mark.filterwarnings("ignore::blastfx.api.WeightOnlyWarning")     # the uncalibrated baseline
@pytest.mark.parametrize("sequential", [False, True])
def test_compress_with_calibration_lowers_output_error(sequential):
    torch.manual_seed(0)
    dense = models.tiny_llama()
    batches = [torch.randint(3, 128, (4, 24)) for _ in range(3)]
    test = torch.randint(3, 128, (4, 24))
    with torch.no_grad():
        ref = dense(test).logits
    errs = []
    for cal in (None, batches):
        m = models.tiny_llama()
        m.load_state_dict(dense.state_dict())
        blastfx.compress(m, 0.4, config=BlastConfig(progress=False, sequential=sequential), calibration=cal)
        with torch.no_grad():
            errs.append(((m(test).logits - ref).norm() / ref.norm()).item())
    assert errs[1] < errs[0]


def test_calibration_that_misses_layers_is_an_error_and_model_untouched():
    class Dead(torch.nn.Module):                       # "b" is never called in forward
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(48, 48), torch.nn.Linear(48, 48)

        def forward(self, x):
            return self.a(x)

    model = Dead()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="never reached 1 target layers"):
        blastfx.compress(model, 0.5, config=BlastConfig(include=("*",), progress=False),
                         calibration=[torch.randn(4, 48)], example_inputs=torch.randn(4, 48))
    assert not any(isinstance(m, blastfx.BlastLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_error_strategy_uses_output_sensitivity_with_calibration():
    """Two layers with the same weights; the second sees inputs in a 2-D subspace only, so its output
    error needs few ranks: the calibrated planner must give it less than the first."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    with torch.no_grad():
        model[1].weight.copy_(model[0].weight)
        model[0].bias.zero_()

    class TwoInputs(torch.nn.Module):
        def __init__(self, seq):
            super().__init__()
            self.seq = seq

        def forward(self, x):
            return self.seq[0](x) + self.seq[1](x[:, :2] @ torch.ones(2, 64))

    wrapper = TwoInputs(model)
    batches = [torch.randn(32, 64) for _ in range(4)]
    cfg = BlastConfig(include=("seq.*",), strategy="error", progress=False)
    weight_plan = blastfx.plan_for(wrapper, 0.5, cfg, example_inputs=batches[0])
    cal_plan = blastfx.plan_for(wrapper, 0.5, cfg, example_inputs=batches[0], calibration=batches)
    assert abs(weight_plan.layers["seq.0"].rank - weight_plan.layers["seq.1"].rank) <= 8   # one balancing step
    assert cal_plan.layers["seq.1"].rank < cal_plan.layers["seq.0"].rank


def test_a_failed_solve_with_sound_covariances_is_not_blamed_on_the_data():
    """Only a covariance that has no damped Cholesky factor is called singular; otherwise the error says
    the fit's own solve failed and carries its cause."""
    sound = torch.eye(6) + 0.1
    rank_one = torch.ones(6, 6)
    err = singular_covariance_error(["a", "b"], {"a": sound, "b": sound}, 0.01, RuntimeError("pivot 3 is zero"))
    assert "fitting layer 'a' (and 1 more) failed in a linear solve (pivot 3 is zero)" in str(err)
    assert "ill-conditioned" in str(err)
    assert "span too few directions" not in str(err)
    err = singular_covariance_error(["a", "b"], {"a": sound, "b": rank_one}, 0.0)
    assert "input covariance of layer 'b' is singular even with calibration_damping=0" in str(err)
