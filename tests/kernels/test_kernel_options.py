"""Kernel options are scoped: a ``with blastfx.kernels.options(...)`` block, or one compiled model's
``options={...}``; never a process setting. CPU only: the CUDA kernel functions of the ops are called
directly with CPU tensors, and compiled models are watched at the op level."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import blastfx
from blastfx import kernels
from blastfx.kernels import autotune, dispatch
from blastfx.structures.blast.ops import blast_matmul_reference, grad_mix_reference


def test_options_nest_and_restore_on_errors_and_interrupts():
    assert kernels.current() == kernels.DEFAULTS == kernels.KernelOptions(kernels="triton", autotune=True)
    with kernels.options(kernels="reference"):
        assert kernels.current() == kernels.KernelOptions(kernels="reference", autotune=True)
        with kernels.options(autotune=False):            # keeps the enclosing kernels choice
            assert kernels.current() == kernels.KernelOptions(kernels="reference", autotune=False)
        assert kernels.current().autotune is True
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc):
            with kernels.options(kernels="reference", autotune=False):
                raise exc()
        assert kernels.current() == kernels.DEFAULTS


def test_options_are_validated():
    with pytest.raises(ValueError, match="kernels must be one of .* got 'cudnn'"):
        with kernels.options(kernels="cudnn"):
            pass
    with pytest.raises(ValueError, match="autotune must be True or False, got 'no'"):
        kernels.KernelOptions(autotune="no")
    with pytest.raises(ValueError, match="kernels must be one of"):
        torch.ops.blastfx.blast_grad_mix(torch.zeros(2, 3, 4), torch.zeros(1, 3, 4), torch.zeros(1, 2, 4), "cudnn")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="kernels must be one of"):
        torch.compile(blastfx.BlastLinear(8, 8, 2, 2), backend="blast", options={"kernels": "cudnn"})(torch.randn(2, 8))
    assert kernels.current() == kernels.DEFAULTS


def test_no_process_wide_kernel_settings_remain():
    assert not hasattr(dispatch, "settings") and not hasattr(dispatch, "set_kernels")
    assert not hasattr(autotune, "settings")


def _layer_inputs():
    layer = blastfx.BlastLinear(10, 12, 3, (3, 2), bias=True)
    nn.init.normal_(layer.S)
    nn.init.normal_(layer.bias)
    return layer, torch.randn(5, 10)


@pytest.mark.requires("triton")
def test_cuda_forward_kernel_follows_the_options_in_effect(monkeypatch):
    """The op's CUDA kernel, called with CPU tensors: Triton by default, the reference inside a
    ``kernels="reference"`` block, Triton again after it."""
    from blastfx.kernels import forward
    layer, x = _layer_inputs()
    triton_calls = []

    def spy(x, U, S, V, bias, out_features, shape):
        triton_calls.append(x.shape)
        return blast_matmul_reference(x, U, S, V, bias, out_features)

    monkeypatch.setattr(forward, "blast_matmul_triton", spy)
    args = (x, layer.U.detach(), layer.S.detach(), layer.V.detach(), layer.bias.detach(), 12)
    expected = x.double() @ blastfx.blast_to_dense(*(t.double() for t in args[1:4]), 12, 10).T + args[4].double()
    for context, runs_triton in ((kernels.options(kernels="reference"), False), (kernels.options(), True)):
        triton_calls.clear()
        with context:
            out = dispatch._cuda_blast_matmul(*args)
        assert (len(triton_calls) == 1) == runs_triton
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    triton_calls.clear()
    dispatch._cuda_blast_matmul(*args)
    assert len(triton_calls) == 1


@pytest.mark.requires("triton")
def test_cuda_grad_mix_kernel_follows_its_argument_then_the_options(monkeypatch):
    from blastfx.kernels import backward
    calls = []
    monkeypatch.setattr(backward, "grad_mix_triton", lambda z, gw, S: calls.append(1) or grad_mix_reference(z, gw, S))
    z, gw, S = torch.randn(2, 7, 4), torch.randn(3, 7, 4), torch.randn(3, 2, 4)
    ref = grad_mix_reference(z.double(), gw.double(), S.double())

    def runs_triton(kernels_arg):
        calls.clear()
        out = dispatch._cuda_grad_mix(z, gw, S, kernels_arg)
        for o, r in zip(out, ref):
            torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5)
        return bool(calls)

    assert runs_triton(None) and not runs_triton("reference")
    with kernels.options(kernels="reference"):
        assert not runs_triton(None) and runs_triton("triton")     # the op's argument wins
    assert dispatch.grad_mix_impl(torch.float32, 16, 2) == "reference"   # too many block pairs


def test_autotune_off_uses_the_default_even_where_a_choice_is_cached(monkeypatch):
    monkeypatch.setattr(autotune, "_cache", {("k",): ("b", {"BT": 32})})
    cands = [("a", {}), ("b", {"BT": 32})]
    run = lambda p, c, k: pytest.fail("nothing is timed")            # noqa: E731
    assert autotune.choose(("k",), cands, run) == ("b", {"BT": 32})
    with kernels.options(autotune=False):
        assert autotune.choose(("k",), cands, run) == ("a", {})
    autotune.clear()
    assert autotune.report() == {}


class _GradMixCalls(TorchDispatchMode):
    """The ``kernels`` argument of every blast_grad_mix call (compiled backward graphs included)."""

    def __init__(self):
        super().__init__()
        self.kernels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.blastfx.blast_grad_mix.default:
            self.kernels.append(args[3] if len(args) > 3 else kwargs.get("kernels"))
        return func(*args, **kwargs)


def test_compiled_models_keep_their_own_options(monkeypatch):
    """Model A is compiled with options={"kernels": "reference", "autotune": False}, model B without.
    Calls of each, interleaved, see their own options (forward: read when the op runs; backward: A's
    choice travels as blast_grad_mix's argument, B's is left to the caller), and the process default
    is unchanged. B's first call (its compile) inside a block must not bind that block to B."""
    torch._dynamo.reset()
    seen = []                                       # (what the CUDA forward would run, autotune) per op call

    def spy(x, *args, **kwargs):
        seen.append((dispatch.forward_impl(x.dtype), kernels.current().autotune))
        return blast_matmul_reference(x, *args, **kwargs)

    monkeypatch.setattr(blastfx.structures.blast.ops, "blast_matmul_reference", spy)
    torch.manual_seed(0)
    layer_a, x = _layer_inputs()
    layer_b, _ = _layer_inputs()
    a = torch.compile(layer_a, backend="blast", options={"kernels": "reference", "autotune": False, "lowering": "extern"})
    b = torch.compile(layer_b, backend="blast", options={"lowering": "extern"})

    def step(model, layer):
        layer.zero_grad()
        seen.clear()
        out = model(x)
        with _GradMixCalls() as mode:
            out.pow(2).sum().backward()
        return seen[:], mode.kernels, out

    assert step(a, layer_a)[:2] == ([("reference", False)], ["reference"])
    assert kernels.current() == kernels.DEFAULTS
    with kernels.options(kernels="reference"):      # B compiles here; the block covers this call only
        assert step(b, layer_b)[:2] == ([("reference", True)], [None])
    fwd, bwd, out = step(b, layer_b)
    assert (fwd, bwd) == ([("triton", True)], [None])
    assert step(a, layer_a)[:2] == ([("reference", False)], ["reference"])
    assert kernels.current() == kernels.DEFAULTS

    ref = blastfx.blast_matmul_reference(x.double(), *(p.detach().double() for p in (layer_b.U, layer_b.S, layer_b.V,
                                                                                    layer_b.bias)), 12)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    x64 = x.double()
    params = [p.detach().double().requires_grad_() for p in (layer_b.U, layer_b.S, layer_b.V, layer_b.bias)]
    blastfx.blast_matmul_reference(x64, *params, 12).pow(2).sum().backward()
    for p, r in zip((layer_b.U, layer_b.S, layer_b.V, layer_b.bias), params):
        torch.testing.assert_close(p.grad.double(), r.grad, rtol=1e-4, atol=1e-5)


def test_eager_backward_uses_the_options_of_its_forward():
    """An eager call's backward gets the kernels choice its forward ran under, as blast_grad_mix's
    argument, whatever block backward() runs in."""
    layer, x = _layer_inputs()
    for forward_block, backward_block, expected in (
            (kernels.options(kernels="reference"), kernels.options(), "reference"),
            (kernels.options(), kernels.options(kernels="reference"), "triton")):
        with forward_block:
            out = layer(x)
        with _GradMixCalls() as mode, backward_block:
            out.sum().backward()
        assert mode.kernels == [expected]


@pytest.mark.cuda
def test_cuda_compiled_models_run_their_own_kernels(monkeypatch):
    """On CUDA, end to end: the model compiled with kernels="reference" launches no Triton kernel,
    forward or backward (backward() called outside any block); the one compiled without options, after
    it, launches both."""
    from blastfx.kernels import backward, forward
    torch._dynamo.reset()
    launched = []
    for module, name in ((forward, "blast_matmul_triton"), (backward, "grad_mix_triton")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: launched.append(_name) or _real(*a, **k))
    layers = [blastfx.BlastLinear(64, 48, 8, (2, 2), bias=True, device="cuda") for _ in range(2)]
    x = torch.randn(5, 64, device="cuda")
    compiled = [torch.compile(layer, backend="blast", options=opts)
                for layer, opts in zip(layers, ({"kernels": "reference", "lowering": "extern"}, {"lowering": "extern"}))]
    for layer, model, expected in ((layers[0], compiled[0], []), (layers[1], compiled[1], ["blast_matmul_triton",
                                                                                           "grad_mix_triton"])):
        launched.clear()
        out = model(x)
        out.pow(2).sum().backward()
        assert launched == expected
        ref = blast_matmul_reference(x.double(), *(p.detach().double() for p in (layer.U, layer.S, layer.V, layer.bias)), 48)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    assert kernels.current() == kernels.DEFAULTS


@pytest.mark.cuda
def test_cuda_eager_backward_follows_its_forward_block(monkeypatch):
    """CUDA backward runs on the autograd engine's device thread, outside the caller's context: the
    choice made at the forward must still reach the backward kernel."""
    from blastfx.kernels import backward
    launched = []
    real = backward.grad_mix_triton
    monkeypatch.setattr(backward, "grad_mix_triton", lambda *a: launched.append(1) or real(*a))
    layer = blastfx.BlastLinear(64, 48, 8, (2, 2), bias=True, device="cuda")
    x = torch.randn(5, 64, device="cuda")
    for block, expected in ((kernels.options(kernels="reference"), []), (kernels.options(), [1])):
        launched.clear()
        with block:
            loss = layer(x).pow(2).sum()
        loss.backward()
        assert launched == expected
