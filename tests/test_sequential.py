"""Sequential calibration with error feedback (blastfx.sequential)."""
import copy

import pytest
import torch
from torch import nn

import blastfx
import blastfx.sequential as seq
from blastfx import BlastConfig
from blastfx.analyze import dense_weight
from blastfx.build import BuildOptions, build_layers
from blastfx.statistics import LayerStats
from blastfx.swap import swap_modules
import models
from models import ResidualBlock


def test_corrected_target_is_the_least_squares_fit_to_dense_outputs():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 10, generator=g, dtype=torch.float64)
    Xd = torch.randn(300, 10, generator=g, dtype=torch.float64)
    Xc = Xd + 0.3 * torch.randn(300, 10, generator=g, dtype=torch.float64)     # drifted inputs
    Wp = seq.corrected_target(W, Xc.T @ Xc / 300, Xd.T @ Xc / 300).double()
    ref = torch.linalg.lstsq(Xc, Xd @ W.T).solution.T                          # argmin ||X_c M^T - X_d W^T||
    torch.testing.assert_close(Wp, ref, rtol=1e-5, atol=1e-5)
    # ||W x_d - A x_c||^2 - ||(W' - A) x_c||^2 does not depend on A: fitting W' under C_cc is the same problem
    gaps = [((Xd @ W.T - Xc @ A.T).square().sum() - (Xc @ (Wp - A).T).square().sum()).item()
            for A in (torch.zeros_like(W), torch.randn(12, 10, generator=g, dtype=torch.float64))]
    assert gaps[0] == pytest.approx(gaps[1], rel=1e-5)


def test_corrected_target_is_the_ridge_fit_towards_the_dense_weight():
    """With damping, the target is argmin ||X_d W^T - X_c M^T||^2 + n r ||M - W||^2 (r the relative
    ridge): a float64 least-squares solve of the stacked system. Without drift it is W itself."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 10, generator=g, dtype=torch.float64)
    Xd = torch.randn(300, 10, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 10, dtype=torch.float64)
    Xc = Xd + 0.05 * torch.randn(300, 10, generator=g, dtype=torch.float64)      # drifted, weak directions
    c_cc, c_dc, damping = Xc.T @ Xc / 300, Xd.T @ Xc / 300, 0.1
    r = damping * c_cc.diagonal().mean()
    eye = torch.eye(10, dtype=torch.float64)
    ref = torch.linalg.lstsq(torch.cat([Xc, (300 * r).sqrt() * eye]),
                             torch.cat([Xd @ W.T, (300 * r).sqrt() * W.T])).solution.T
    torch.testing.assert_close(seq.corrected_target(W, c_cc, c_dc, damping).double(), ref, rtol=1e-5, atol=1e-5)
    c_dd = Xd.T @ Xd / 300
    torch.testing.assert_close(seq.corrected_target(W, c_dd, c_dd, damping).double(), W, rtol=1e-5, atol=1e-5)


def test_feedback_is_damped_at_least_by_the_feedback_damping(monkeypatch):
    """The correction is a full regression on the calibration tokens: the walk never damps it less
    than FEEDBACK_DAMPING, whatever the (whitening's) calibration_damping."""
    assert seq.feedback_damping(1e-4) == seq.FEEDBACK_DAMPING
    assert seq.feedback_damping(10 * seq.FEEDBACK_DAMPING) == 10 * seq.FEEDBACK_DAMPING
    used = []
    real = seq.corrected_target
    monkeypatch.setattr(seq, "corrected_target", lambda w, cc, dc, damping=0.0: used.append(damping) or real(
        w, cc, dc, damping))
    blastfx.compress(models.tiny_llama().eval(), 0.4, calibration=[torch.randint(3, 128, (2, 16))],
                     config=BlastConfig(progress=False, sequential=True, reconstruct_steps=0, calibration_damping=1e-3))
    assert used and set(used) == {seq.FEEDBACK_DAMPING}


LLAMA_STAGES = [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]


def reference_sequential(model, dense, plan, batches, options):
    """The definition, by full forward passes: for each block and stage, the stage's inputs in the
    dense model and in the model compressed so far, then the corrected targets under C_cc."""
    for i in range(len(model.model.layers)):
        for stage in LLAMA_STAGES:
            names = [f"model.layers.{i}.{s}" for s in stage]
            sums = {n: [0, 0, 0] for n in names}
            for batch in batches:
                seen = {}
                hooks = [m.get_submodule(n).register_forward_pre_hook(
                    lambda mod, a, n=n, k=k: seen.__setitem__((k, n), a[0].reshape(-1, a[0].shape[-1])))
                    for k, m in enumerate((dense, model)) for n in names]
                with torch.no_grad():
                    dense(batch), model(batch)
                for h in hooks:
                    h.remove()
                for n in names:
                    d, c = seen[0, n].double(), seen[1, n].double()
                    sums[n][0] += c.T @ c
                    sums[n][1] += d.T @ c
                    sums[n][2] += len(c)
            covs = {n: (cc / t).float() for n, (cc, _, t) in sums.items()}
            stats = {n: LayerStats(covariance=covs[n], target=seq.corrected_target(
                         dense_weight(model.get_submodule(n)), cc / t, dc / t,
                         seq.feedback_damping(options.calibration_damping)))
                     for n, (cc, dc, t) in sums.items()}
            swap_modules(model, build_layers(model, plan, stats, options, names=set(names)))


def test_chain_fast_path_equals_the_full_forward_definition():
    dense = models.tiny_llama().eval()
    batches = [torch.randint(3, 128, (2, 16)) for _ in range(3)]
    fast = copy.deepcopy(dense)
    blastfx.compress(fast, 0.4, config=BlastConfig(progress=False, sequential=True, reconstruct_steps=0),
                     calibration=batches)
    assert not any("not a chain" in note for note in fast.blastfx_plan.notes)      # the chain path ran
    ref = copy.deepcopy(dense)
    options = BuildOptions(progress=False, calibration_damping=BlastConfig().calibration_damping)
    reference_sequential(ref, dense, fast.blastfx_plan, batches, options)
    test = torch.randint(3, 128, (2, 16))
    with torch.no_grad():
        a, b, d = fast(test).logits, ref(test).logits, dense(test).logits
    assert (a - b).norm() < 1e-3 * (a - d).norm()              # same model, far closer than to dense


def logits_error(make, batches, test, **config):
    torch.manual_seed(0)
    dense = make().eval()
    m = copy.deepcopy(dense)
    blastfx.compress(m, 0.4, config=BlastConfig(progress=False, **config), calibration=batches)
    with torch.no_grad():
        ref, out = dense(test).logits, m(test).logits
    return ((out - ref).norm() / ref.norm()).item(), m


@pytest.mark.parametrize("make", [models.tiny_llama, models.tiny_gpt2])
def test_error_feedback_beats_plain_and_sequential_calibration(make, monkeypatch):
    torch.manual_seed(1)
    batches = [torch.randint(3, 128, (4, 32)) for _ in range(8)]      # the correction needs tokens >> width
    test = torch.randint(3, 128, (8, 32))
    plain, _ = logits_error(make, batches, test, sequential=False)
    feedback, model = logits_error(make, batches, test, sequential=True)
    monkeypatch.setattr(seq, "_chain_blocks", lambda model, names: None)      # force the fallback
    no_feedback, fallback = logits_error(make, batches, test, sequential=True)
    assert "without error feedback" in fallback.blastfx_plan.notes[-1]
    assert not any("not a chain" in note for note in model.blastfx_plan.notes)
    assert feedback < 0.95 * no_feedback and feedback < 0.95 * plain


class Blocks(nn.Module):
    """Three blocks; with ``skip`` the last also reads the model input, so they are not a chain."""

    def __init__(self, skip):
        super().__init__()
        self.blocks, self.skip = nn.ModuleList(ResidualBlock() for _ in range(3)), skip

    def forward(self, x):
        h = self.blocks[1](self.blocks[0](x))
        return self.blocks[2](h + x if self.skip else h)


@pytest.mark.filterwarnings("ignore::blastfx.api.WeightOnlyWarning")     # the uncalibrated baseline
@pytest.mark.parametrize("skip, include", [(False, ("*",)), (True, ("*",)), (False, ("blocks.0.*", "blocks.2.*"))])
def test_only_a_chain_takes_the_fast_path_and_both_improve(skip, include):
    torch.manual_seed(0)
    dense = Blocks(skip).eval()
    batches = [torch.randn(64, 32) @ torch.randn(32, 32) for _ in range(4)]
    test = batches[0]
    errs = []
    for cal in (None, batches):
        m = copy.deepcopy(dense)
        blastfx.compress(m, 0.4, config=BlastConfig(progress=False, sequential=True, include=include), calibration=cal)
        with torch.no_grad():
            errs.append(((m(test) - dense(test)).norm() / dense(test).norm()).item())
    assert seq._chain_blocks(dense, list(m.blastfx_plan.layers)) == ["blocks.0", "blocks.1", "blocks.2"]
    assert any("not a chain" in note for note in m.blastfx_plan.notes) == skip
    assert sum(isinstance(x, blastfx.BlastLinear) for x in m.modules()) == (6 if include == ("*",) else 4)
    assert errs[1] < errs[0]


def test_failure_in_a_later_block_leaves_the_model_untouched(monkeypatch):
    model = models.tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("factorization failed")
        return build_layers(*args, **kwargs)
    monkeypatch.setattr(seq, "build_layers", failing)
    with pytest.raises(RuntimeError, match="factorization failed"):
        blastfx.compress(model, 0.4, config=BlastConfig(progress=False, sequential=True),
                         calibration=[torch.randint(3, 128, (2, 16))])
    assert not any(isinstance(m, blastfx.BlastLinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
