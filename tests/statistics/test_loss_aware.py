"""The loss-aware objective and allocation: output Fisher collection, row-weighted factorization,
strategy="loss", and compress(objective="loss")."""
import pytest
import torch
from torch import nn

import blastfx
from blastfx import BlastConfig, factorize
from blastfx.statistics.collect import collect_covariances, collect_output_fisher
from conftest import spectrum_matrix
import models


class LinearLoss(nn.Module):
    """Two linears of the same input; the loss is linear in each output, with per-token weights
    g0 and g1 = scale * g0, so dL/dy is known exactly: g0 for the first, g1 for the second."""

    def __init__(self, n=64, scale=10.0):
        super().__init__()
        self.a, self.b = nn.Linear(n, n, bias=False), nn.Linear(n, n, bias=False)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)
        self.scale = scale

    def forward(self, x, g):
        return (self.a(x) * g).sum() + (self.b(x) * (self.scale * g)).sum()


def test_output_fisher_is_the_mean_squared_output_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8)).double()
    xs, ts = [torch.randn(5, 12, dtype=torch.float64) for _ in range(2)], [torch.randn(5, 8, dtype=torch.float64)
                                                                         for _ in range(2)]

    class WithLoss(nn.Module):
        def __init__(self, seq):
            super().__init__()
            self.seq = seq

        def forward(self, x, t):
            return ((self.seq(x) - t) ** 2).sum()

    wrapped = WithLoss(model)
    model[0].weight.requires_grad_(False)           # must be restored, and no .grad may appear
    fisher = collect_output_fisher(wrapped, ["seq.0", "seq.2"], list(zip(xs, ts)), damping=0.0)
    g2, g0 = [], []
    for x, t in zip(xs, ts):                        # by hand: dL/dy2 = 2 (y2 - t), dL/dy0 = W2^T dL/dy2 * tanh'
        h = model[0](x)
        y = model[2](torch.tanh(h))
        d2 = 2 * (y - t)
        g2.append(d2)
        g0.append((d2 @ model[2].weight) * (1 - torch.tanh(h) ** 2))
    torch.testing.assert_close(fisher["seq.2"], torch.cat(g2).pow(2).mean(0).float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fisher["seq.0"], torch.cat(g0).pow(2).mean(0).float(), rtol=1e-5, atol=1e-7)
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert not model[0]._forward_hooks


def test_output_fisher_damping_adds_a_floor():
    model = LinearLoss(8)
    batch = (torch.randn(4, 8), torch.zeros(4, 8))
    batch[1][:, 0] = 1.0                            # only output 0 has a gradient
    fisher = collect_output_fisher(model, ["a"], [batch], damping=0.01)["a"]
    assert fisher[0].item() == pytest.approx(1.0 + 0.01 / 8, rel=1e-5)
    torch.testing.assert_close(fisher[1:], torch.full((7,), 0.01 / 8), rtol=1e-5, atol=0)


def test_batches_without_a_loss_are_a_clear_error_and_the_model_is_untouched():
    model = models.tiny_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="scalar loss"):
        blastfx.compress(model, 0.5, config=BlastConfig(include=("*",), objective="loss", progress=False),
                         calibration=[torch.randn(4, 48)])
    assert not any(isinstance(m, blastfx.BlastLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="pass calibration="):
        blastfx.compress(model, 0.5, config=BlastConfig(include=("*",), strategy="loss", progress=False))
    with pytest.raises(ValueError, match="objective must be one of"):
        BlastConfig(objective="logits")


def weighted_output_error(W, What, C, w):
    E = (W - What).double() * w.double().sqrt().unsqueeze(-1)
    A = W.double() * w.double().sqrt().unsqueeze(-1)
    return ((E @ C.double() * E).sum() / (A @ C.double() * A).sum()).sqrt().item()


def test_row_weighted_lowrank_is_the_weighted_whitened_svd():
    """Known answer: with one block, the best rank-r fit of ||D^1/2 (W - What) L|| is the truncated
    SVD of D^1/2 W L; its error is that SVD's tail energy."""
    g = torch.Generator().manual_seed(1)
    W = spectrum_matrix(40, 32, 0.7, dtype=torch.float64)
    X = torch.randn(300, 32, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 32, dtype=torch.float64)
    C = X.T @ X
    w = torch.rand(40, generator=g, dtype=torch.float64) ** 3 * 10
    f = factorize(W, 6, 1, method="lowrank", calibration=C, calibration_damping=0.0, output_weights=w)
    s = torch.linalg.svdvals(w.sqrt().unsqueeze(-1) * W @ torch.linalg.cholesky(C))
    expected = (s[6:].pow(2).sum() / s.pow(2).sum()).sqrt().item()
    assert weighted_output_error(W, f.to_dense(), C, w) == pytest.approx(expected, rel=1e-6)
    assert f.output_error.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("blocks", [(4, 4), (2, 1)])
def test_row_weighted_als_beats_unweighted_on_the_weighted_objective(blocks):
    g = torch.Generator().manual_seed(2)
    W = spectrum_matrix(64, 48, 0.5)
    X = torch.randn(400, 48, generator=g) @ (0.3 * torch.randn(48, 48, generator=g)) + torch.randn(400, 48, generator=g)
    C = X.T @ X
    w = torch.exp(3 * torch.randn(64, generator=g))          # weights over orders of magnitude
    plain = factorize(W, 8, blocks, calibration=C, iters=40)
    weighted = factorize(W, 8, blocks, calibration=C, iters=40, output_weights=w)
    e_plain = weighted_output_error(W, plain.to_dense(), C, w)
    e_weighted = weighted_output_error(W, weighted.to_dense(), C, w)
    assert e_weighted < 0.9 * e_plain
    assert weighted.output_error.item() == pytest.approx(e_weighted, rel=5e-3)   # 1% damping of C


def test_output_weights_argument_errors():
    W = torch.randn(16, 12)
    with pytest.raises(ValueError, match=r"output_weights must be \(16,\)"):
        factorize(W, 2, 2, output_weights=torch.ones(12))
    with pytest.raises(ValueError, match="non-negative"):
        factorize(W, 2, 2, output_weights=-torch.ones(16))
    with pytest.raises(ValueError, match="all zero"):
        factorize(W, 2, 2, output_weights=torch.zeros(16))


def test_loss_strategy_gives_rank_where_the_loss_is_sensitive():
    """Identical weights and inputs: the error strategy cannot tell the layers apart; the loss one
    sees b's 100x Fisher and gives it more rank."""
    torch.manual_seed(0)
    model = LinearLoss(128, scale=10.0)
    batches = [(torch.randn(64, 128), torch.randn(64, 128)) for _ in range(3)]
    plans = {s: blastfx.plan_for(model, 0.4, BlastConfig(include=("*",), strategy=s, progress=False),
                                 example_inputs=batches[0], calibration=batches) for s in ("error", "loss")}
    err, loss = plans["error"].layers, plans["loss"].layers
    assert abs(err["a"].rank - err["b"].rank) <= 8
    assert loss["b"].rank >= loss["a"].rank + 16
    assert abs(plans["loss"].kept_fraction - 0.4) <= 0.01 * 0.4


def test_compress_objective_loss_factorizes_the_fisher_weighted_problem():
    """The wiring: compress(objective="loss") must give exactly the factors of factorize() called
    with the layer's covariance and its output Fisher."""
    torch.manual_seed(0)
    dense = models.tiny_llama()
    batches = [{"input_ids": torch.randint(3, 128, (2, 16))} for _ in range(2)]
    name = "model.layers.1.mlp.down_proj"
    fisher = collect_output_fisher(dense, [name], batches)[name]
    cov = collect_covariances(dense, [name], batches)[name]
    model = models.tiny_llama()
    model.load_state_dict(dense.state_dict())
    blastfx.compress(model, 0.5, config=BlastConfig(objective="loss", strategy="uniform", progress=False,
                                                         sequential=False), calibration=batches)
    lp = model.blastfx_plan.layers[name]
    expected = factorize(dense.get_submodule(name).weight.detach(), lp.rank, lp.blocks, calibration=cov,
                         output_weights=fisher, allow_larger=True, iters=30)
    got = model.get_submodule(name)
    torch.testing.assert_close(got.to_dense() if hasattr(got, "to_dense") else got.weight, expected.to_dense(),
                               rtol=1e-4, atol=1e-5)
    unweighted = factorize(dense.get_submodule(name).weight.detach(), lp.rank, lp.blocks, calibration=cov,
                           allow_larger=True, iters=30)
    assert not torch.allclose(unweighted.to_dense(), expected.to_dense(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("calibrated", [False, True])
def test_weighted_factors_come_back_balanced_whatever_the_weights_scale(calibrated):
    """Output weights are a Fisher: tiny in absolute terms (1e-9 here). Only their ratios may matter:
    the same factors for w and 1e-9 w, and U, V columns of one size per rank. Unbalanced
    factors (U ~1e4 times V) were what made distillation from a loss-objective start diverge."""
    g = torch.Generator().manual_seed(3)
    W = spectrum_matrix(48, 40, 0.6, dtype=torch.float64)
    X = torch.randn(200, 40, generator=g, dtype=torch.float64)
    C = X.T @ X if calibrated else None
    w = torch.exp(2 * torch.randn(48, generator=g, dtype=torch.float64))
    big = factorize(W, 6, (2, 2), calibration=C, iters=20, output_weights=w)
    tiny = factorize(W, 6, (2, 2), calibration=C, iters=20, output_weights=1e-9 * w)
    for a, b in ((big.U, tiny.U), (big.S, tiny.S), (big.V, tiny.V)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    nu = tiny.U.norm(dim=-2).pow(2).mean(0).sqrt()           # per rank: RMS over blocks of column norms
    nv = tiny.V.norm(dim=-2).pow(2).mean(0).sqrt()
    torch.testing.assert_close(nu, nv)
    assert tiny.U.abs().max() < 10 * tiny.V.abs().max() and tiny.V.abs().max() < 10 * tiny.U.abs().max()
