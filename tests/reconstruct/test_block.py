"""Block-wise reconstruction (blastfx.reconstruct): one block's factors fitted to the dense block's outputs."""
import math

import pytest
import torch
from torch import nn

from blastfx import BlastLinear
from blastfx.reconstruct import ReconstructOptions, block_parameters, reconstruct_block


class Block(nn.Module):
    """A pre-norm residual MLP block with BLAST layers (dims not divisible by the blocks: padding)."""

    def __init__(self, dim=30, hidden=52, rank=6):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = BlastLinear(dim, hidden, rank, blocks=(4, 4))
        self.down = BlastLinear(hidden, dim, rank, blocks=(4, 4))
        self.dense = nn.Linear(dim, dim)                 # a layer kept dense: never trained

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x)))) + 0.1 * self.dense(x)


def problem(seed=0, batches=4):
    torch.manual_seed(seed)
    block = Block()
    teacher = nn.Sequential(nn.LayerNorm(30), nn.Linear(30, 52), nn.GELU(), nn.Linear(52, 30))
    inputs = [torch.randn(3, 16, 30) for _ in range(batches)]
    with torch.no_grad():
        targets = [x + teacher(x) for x in inputs]
    return block, inputs, targets


def call(block, x, k):
    return block(x)


def error64(block, inputs, targets):
    """Relative squared error of the block's outputs over all batches, in float64."""
    block = _double(block)
    with torch.no_grad():
        num = sum((block(x.double()) - t.double()).square().sum() for x, t in zip(inputs, targets))
        den = sum(t.double().square().sum() for t in targets)
    return (num / den).item()


def _double(block):
    import copy
    return copy.deepcopy(block).double()


def state(block):
    return {k: v.detach().clone() for k, v in block.state_dict().items()}


def test_reconstruction_lowers_the_block_output_error_float64():
    block, inputs, targets = problem()
    before = error64(block, inputs, targets)
    result = reconstruct_block(block, inputs, targets, call, ReconstructOptions(steps=60, lr=1e-2, progress=False))
    after = error64(block, inputs, targets)
    assert result.kept and result.steps == 60
    assert after < 0.7 * before
    assert result.error_before == pytest.approx(before, rel=1e-4)
    assert result.error_after == pytest.approx(after, rel=1e-4)


def test_only_factors_and_norms_train_and_padding_stays_zero():
    block, inputs, targets = problem()
    start = state(block)
    flags = {n: p.requires_grad for n, p in block.named_parameters()}
    block.dense.weight.requires_grad_(False)                  # a flag the caller set is kept as it was
    flags["dense.weight"] = False
    reconstruct_block(block, inputs, targets, call, ReconstructOptions(steps=20, lr=1e-2, norms=False, progress=False))
    end = state(block)
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert changed == {f"{layer}.{f}" for layer in ("up", "down") for f in ("U", "S", "V", "bias")}
    assert {n: p.requires_grad for n, p in block.named_parameters()} == flags
    assert all(p.grad is None for p in block.parameters())
    block.up.check_padding()
    block.down.check_padding()
    assert {id(p) for p in block_parameters(block, norms=True)} == \
        {id(p) for m in (block.up, block.down, block.norm) for p in m.parameters()}


def test_steps_bound():
    block, inputs, targets = problem()
    calls = []

    def counting(b, x, k):
        calls.append(k)
        return b(x)
    result = reconstruct_block(block, inputs, targets, counting, ReconstructOptions(steps=7, progress=False))
    assert result.steps == 7
    assert len(calls) == 7 + 2 * len(inputs)                 # the steps, and the error over all batches twice
    assert calls[len(inputs):len(inputs) + 7] == [0, 1, 2, 3, 0, 1, 2]


@pytest.mark.parametrize("batches, steps", [(1, 32), (4, 32), (5, 40), (32, 256)])
def test_default_steps_are_eight_passes_over_the_batches_at_least_32(batches, steps):
    block, inputs, targets = problem(batches=batches)
    result = reconstruct_block(block, inputs, targets, call, ReconstructOptions(steps=None, lr=1e-3, progress=False))
    assert result.steps == steps


def test_the_config_default_is_eight_passes():
    from blastfx import BlastConfig
    options = ReconstructOptions.from_config(BlastConfig())
    assert options.steps is None and options.steps_for(100) == 800 and options.steps_for(3) == 32
    assert ReconstructOptions.from_config(BlastConfig(reconstruct_steps=5)).steps_for(100) == 5


def test_time_bound():
    block, inputs, targets = problem()

    def slow(b, x, k):
        if torch.is_grad_enabled():
            import time
            time.sleep(0.05)
        return b(x)
    result = reconstruct_block(block, inputs, targets, slow, ReconstructOptions(steps=10_000, seconds=0.3,
                                                                                progress=False))
    assert 1 <= result.steps < 30
    assert result.seconds < 3


def test_a_fit_that_makes_the_block_worse_is_not_kept():
    block, inputs, targets = problem()
    start = state(block)
    result = reconstruct_block(block, inputs, targets, call, ReconstructOptions(steps=5, lr=50.0, progress=False))
    assert not result.kept and result.error_after == result.error_before
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in start.items())


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_leaves_the_block_as_it_was(error):
    block, inputs, targets = problem()
    block.train()
    start = state(block)
    flags = {n: p.requires_grad for n, p in block.named_parameters()}
    steps = []

    def failing(b, x, k):
        if torch.is_grad_enabled():
            steps.append(k)
            if len(steps) == 4:
                raise error
        return b(x)
    with pytest.raises(type(error)):
        reconstruct_block(block, inputs, targets, failing, ReconstructOptions(steps=10, lr=1e-2, progress=False))
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in start.items())
    assert {n: p.requires_grad for n, p in block.named_parameters()} == flags
    assert block.training and all(p.grad is None for p in block.parameters())


def test_zero_steps_does_nothing():
    block, inputs, targets = problem()
    start = state(block)
    result = reconstruct_block(block, inputs, targets, call, ReconstructOptions(steps=0))
    assert result.steps == 0 and not result.kept and math.isnan(result.error_before)
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in start.items())


@pytest.mark.parametrize("field, value", [("steps", -1), ("steps", 2.5), ("steps", True), ("seconds", 0),
                                          ("seconds", float("inf")), ("lr", 0.0), ("lr", float("nan")),
                                          ("norms", 1), ("progress", "yes")])
def test_bad_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"{field} must be .*{value!r}"):
        ReconstructOptions(**{field: value})


def test_mismatched_targets_are_refused():
    block, inputs, targets = problem()
    with pytest.raises(ValueError, match="one target per input batch, got 4 inputs and 3 targets"):
        reconstruct_block(block, inputs, targets[:3], call, ReconstructOptions(steps=1))


def bf16_problem():
    block, inputs, targets = problem()
    return block.to(torch.bfloat16), [x.bfloat16() for x in inputs], [t.bfloat16() for t in targets]


def test_products_in_fp32_on_a_slow_cpu_gemm_give_the_dtype_own_values(monkeypatch):
    """Where bf16 has no fast CPU GEMM, the block's dense layers (and matmuls) run their products in fp32 and
    round back: the same outputs and gradients as bf16 products, up to fp32 summation order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from blastfx import cpu_products

    block, inputs, _ = bf16_problem()

    class ProductDtypes(TorchDispatchMode):
        """The dtypes the dense layer's and the matmul's aten products see."""
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
                self.dtypes |= {a.dtype for a in args if isinstance(a, torch.Tensor)}
            return func(*args, **(kwargs or {}))

    def matmul_too(b, x, k):
        return b(x) + 1e-3 * torch.matmul(x, torch.ones(30, 30, dtype=x.dtype))

    def run(fast_dtypes):
        monkeypatch.setattr(cpu_products, "_ONEDNN_GEMM_DTYPES", frozenset(fast_dtypes))
        with ProductDtypes() as products:
            y = cpu_products.products_in_fp32(matmul_too, (*inputs, *block.parameters()))(block, inputs[0], 0)
        assert products.dtypes == {torch.float32 if torch.bfloat16 not in fast_dtypes else torch.bfloat16}
        return y, torch.autograd.grad(y.float().square().sum(), block.parameters())

    y32, grads32 = run(())
    y, grads = run((torch.bfloat16,))
    assert y32.dtype == torch.bfloat16
    for a, b in zip((y32, *grads32), (y, *grads)):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02 * b.float().abs().max().item())
    block32, inputs32 = problem()[:2]
    assert cpu_products.products_in_fp32(call, (*inputs32, *block32.parameters())) is call     # fp32: as it is


def test_bf16_reconstruction_with_fp32_products(monkeypatch):
    from blastfx import cpu_products

    monkeypatch.setattr(cpu_products, "_ONEDNN_GEMM_DTYPES", frozenset())
    block, inputs, targets = bf16_problem()
    result = reconstruct_block(block, inputs, targets, call, ReconstructOptions(steps=8, lr=1e-2, progress=False))
    assert result.kept and result.error_after < result.error_before
    assert all(p.dtype == torch.bfloat16 for p in block.parameters())
