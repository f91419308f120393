"""A decoder block's tail, ``h = residual + o(a)``, an RMSNorm of h and a gated MLP of BLAST layers,
rewritten into one ``blastfx::blast_block_tail`` call by the "blast" backend: the rewritten graph
computes what the eager model does, only the norm transformers writes is matched, intermediates used
elsewhere keep the graph as it was, and the op's reference is its parts' reference calls."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import blastfx
import models
from decode_cases import forced_forms
from blastfx.compiler import block_tail, mlp_chain


def rms_norm(h, weight, eps):
    """transformers' LlamaRMSNorm.forward."""
    input_dtype = h.dtype
    hidden = h.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


class Tail(nn.Module):
    """o, the residual add, an RMSNorm (or a LayerNorm) and a gated MLP; ``leak``: the normalized input
    is also returned (the norm's output has another use)."""

    def __init__(self, norm="rms", leak=False, o_dense=False):
        super().__init__()
        self.o = nn.Linear(48, 48) if o_dense else blastfx.BlastLinear(48, 48, 16, 4, bias=True)
        self.gate = blastfx.BlastLinear(48, 64, 16, 4, bias=True)
        self.up = blastfx.BlastLinear(48, 64, 8, 4)
        self.down = blastfx.BlastLinear(64, 48, 16, 4)
        self.weight = nn.Parameter(1 + 0.2 * torch.randn(48))
        self.norm, self.leak = norm, leak

    def forward(self, a, residual):
        h = residual + self.o(a)
        n = rms_norm(h, self.weight, 1e-6) if self.norm == "rms" else F.layer_norm(h, (48,), self.weight)
        out = h + self.down(F.silu(self.gate(n)) * self.up(n))
        return (out, n) if self.leak else out


def _compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="blast", options={"lowering": "extern", "chain_mlp": "always",
                                                           "chain_norm": "always", **options})


def _inputs(T=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, T, 48, generator=g), 3 * torch.randn(2, T, 48, generator=g)


def test_tail_is_rewritten_and_matches_eager():
    torch.manual_seed(0)
    model = Tail()
    before = block_tail.stats["tails"]
    with torch.no_grad():
        want = model(*_inputs())
        got = _compiled(model)(*_inputs())
    assert block_tail.stats["tails"] == before + 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", [dict(norm="layer"), dict(leak=True), dict(o_dense=True)],
                         ids=["layer-norm", "norm-output-used-elsewhere", "dense-o"])
def test_what_does_not_match_is_left_as_it_was(variant):
    torch.manual_seed(0)
    model = Tail(**variant)
    before, chains = block_tail.stats["tails"], mlp_chain.stats["chains"]
    with torch.no_grad():
        want = model(*_inputs())
        got = _compiled(model)(*_inputs())
    assert block_tail.stats["tails"] == before
    assert mlp_chain.stats["chains"] == chains + 1                    # the MLP is still chained
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_backend_leaves_tails_alone_unless_asked(monkeypatch):
    """chain_norm defaults to "never": a model decoded slower with block tails and seams than
    without them, so the backend makes them only when the options ask for them."""
    import blastfx.compiler as compiler
    modes = []

    def recording(real):
        def run(gm, mode):
            modes.append(mode)
            return real(gm, mode)
        return run

    for name in ("chain_block_tails", "seam_block_boundaries"):
        monkeypatch.setattr(compiler, name, recording(getattr(compiler, name)))
    torch.manual_seed(0)
    model = Tail()
    before = block_tail.stats["tails"]
    with torch.no_grad():
        want = model(*_inputs(1))
        torch._dynamo.reset()
        got = torch.compile(model, backend="blast", options={"lowering": "extern", "chain_mlp": "always"})(*_inputs(1))
    assert modes == ["never", "never"] and block_tail.stats["tails"] == before
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        _compiled(model)(*_inputs(1))                             # "always" still rewrites
    assert block_tail.stats["tails"] == before + 1


def test_training_graphs_never_and_auto_on_cpu_leave_the_tail_alone():
    torch.manual_seed(0)
    model = Tail()
    before = block_tail.stats["tails"]
    _compiled(model)(*_inputs()).sum().backward()
    assert model.o.U.grad is not None and torch.isfinite(model.o.U.grad).all()
    with torch.no_grad():
        _compiled(model, chain_norm="never")(*_inputs(1))
        _compiled(model, chain_norm="auto")(*_inputs(1))          # auto: CUDA inputs only
    assert block_tail.stats["tails"] == before
    with pytest.raises(Exception, match="chain_norm must be one of"):
        with torch.no_grad():
            _compiled(model, chain_norm="sometimes")(*_inputs(1))


@pytest.mark.parametrize("factor_dtype", [None, "int8"])
def test_every_block_of_a_compressed_hf_llama_is_rewritten(factor_dtype):
    """transformers' LlamaDecoderLayer: its post-attention norm and MLP after o_proj, in every layer
    (float factors, or int8 codes); logits as eager."""
    model = models.compressed_tiny_llama(factor_dtype)
    ids = torch.randint(0, 100, (1, 5))
    before = block_tail.stats["tails"]
    with torch.no_grad():
        want = model(ids).logits
        got = _compiled(model, group_siblings="always")(ids).logits
    assert block_tail.stats["tails"] == before + 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _op_args(model, a, residual, dtype=torch.float64):
    layers = (model.o, model.gate, model.up, model.down)
    d = lambda t: None if t is None else t.detach().to(dtype)          # noqa: E731
    return (a.to(dtype), residual.to(dtype), [d(m.U) for m in layers], [d(m.S) for m in layers],
            [d(m.V) for m in layers], [d(m.bias) for m in layers], [m.out_features for m in layers],
            d(model.weight), 1e-6)


def test_op_reference_is_the_parts_and_passes_opcheck():
    torch.manual_seed(0)
    model = Tail().double()
    a, residual = (t.double() for t in _inputs())
    args = _op_args(model, a, residual)
    with torch.no_grad():
        out = torch.ops.blastfx.blast_block_tail(*args)
        h = residual + model.o(a)
        torch.testing.assert_close(out[..., :48], h)
        torch.testing.assert_close(out[..., 48:], model(a, residual) - h)
    torch.library.opcheck(torch.ops.blastfx.blast_block_tail.default, args, test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="four layers"):
        torch.ops.blastfx.blast_block_tail(args[0], args[1], args[2][:3], *args[3:])
    with pytest.raises(ValueError, match=r"the residual must be \(2, 3, 48\)"):
        torch.ops.blastfx.blast_block_tail(args[0], args[1][..., :40], *args[2:])
    with pytest.raises(ValueError, match=r"the norm weight must be \(48,\) of torch.float64"):
        torch.ops.blastfx.blast_block_tail(*args[:7], args[7].float(), 1e-6)


def test_the_op_on_cuda_runs_the_tail_or_the_parts_as_the_autotuner_says(monkeypatch):
    """The op's CUDA kernel (``tuned_decode_call``), run here on the CPU with the Triton interpreter:
    the four-launch tail and its parts (o, the add and norm kernel, the MLP chain op), both equal to
    eager in each half of the output (h, then the MLP's output)."""
    torch.manual_seed(0)
    model = Tail()
    a, residual = _inputs(2)
    args = _op_args(model, a, residual, torch.float32)
    with torch.no_grad():
        want, h = model(a, residual), residual + model.o(a)
        for _ in forced_forms(monkeypatch, ("tail", "parts")):
            out = block_tail._cuda_kernel(*args)
            torch.testing.assert_close(out[..., :48], h, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[..., 48:], want - h, rtol=1e-5, atol=1e-5)


class QuantizedTail(Tail):
    """The tail with codes in all four layers (``mixed``: o keeps float factors, so nothing is rewritten)."""

    def __init__(self, factor_dtype="int8", mixed=False):
        super().__init__()
        q = dict(factor_dtype=factor_dtype)
        self.o = blastfx.BlastLinear(48, 48, 16, 4, bias=True, **({} if mixed else q))
        self.gate = blastfx.BlastLinear(48, 64, 16, 4, bias=True, **q)
        self.up = blastfx.BlastLinear(48, 64, 8, 4, **q)
        self.down = blastfx.BlastLinear(64, 48, 16, 4, **q)


@pytest.mark.parametrize("factor_dtype,mixed", [("int8", False), ("int4", False), ("int8", True)],
                         ids=["int8", "int4", "float-o"])
def test_quantized_tail_is_rewritten_and_matches_eager(factor_dtype, mixed):
    torch.manual_seed(0)
    model = QuantizedTail(factor_dtype, mixed)
    before = block_tail.stats["tails"]
    with torch.no_grad():
        want = model(*_inputs())
        got = _compiled(model)(*_inputs())
    assert block_tail.stats["tails"] == before + (not mixed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _quantized_op_args(model, a, residual):
    layers = (model.o, model.gate, model.up, model.down)
    return (a, residual, [m.U for m in layers], [m.U_scale for m in layers], [m.S.detach() for m in layers],
            [m.V for m in layers], [m.V_scale for m in layers],
            [None if m.bias is None else m.bias.detach() for m in layers], [m.out_features for m in layers],
            model.weight.detach(), 1e-6)


def test_quantized_op_reference_opcheck_and_cuda_kernel(monkeypatch):
    """The reference is the parts' (as the eager model computes them), opcheck passes, and the CUDA
    kernel's two forms (the tail under the interpreter, and the parts) agree with it."""
    torch.manual_seed(0)
    model = QuantizedTail()
    a, residual = _inputs(2)
    args = _quantized_op_args(model, a, residual)
    with torch.no_grad():
        want, h = model(a, residual), residual + model.o(a)
        out = torch.ops.blastfx.blast_block_tail_quantized(*args)
        torch.testing.assert_close(out[..., :48] + out[..., 48:], want)
        torch.library.opcheck(torch.ops.blastfx.blast_block_tail_quantized.default, args,
                              test_utils=("test_schema", "test_faketensor"))
        for _ in forced_forms(monkeypatch, ("tail", "parts")):
            out = block_tail._cuda_kernel_quantized(*args)
            torch.testing.assert_close(out[..., :48], h, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[..., 48:], want - h, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="four layers .* got 3, 4, 4"):
        torch.ops.blastfx.blast_block_tail_quantized(a, residual, args[2][:3], *args[3:])


@pytest.mark.cuda
def test_tail_model_matches_eager_and_replays_in_cuda_graphs():
    """On CUDA "auto" rewrites at decode sizes; CUDA-graph replays (the workspace's halves taking
    turns) equal eager in bf16."""
    torch.manual_seed(0)
    model = Tail().cuda().to(torch.bfloat16)
    a, residual = (t[:, :1].cuda().to(torch.bfloat16) for t in _inputs())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="blast", options={"triton.cudagraphs": True, "chain_norm": "auto"})
    before = block_tail.stats["tails"]
    with torch.no_grad():
        want = model(a, residual).float()
        for _ in range(5):
            got = compiled(a, residual).float()
    assert block_tail.stats["tails"] == before + 1
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


class ProjectingTail(nn.Module):
    """The tail's shape, but down projects to ``width`` features, not the residual stream's 48, and the
    MLP's output is returned beside h (not added to it)."""

    def __init__(self, width):
        super().__init__()
        self.o = blastfx.BlastLinear(48, 48, 16, 4, bias=True)
        self.gate = blastfx.BlastLinear(48, 64, 16, 4, bias=True)
        self.up = blastfx.BlastLinear(48, 64, 8, 4)
        self.down = blastfx.BlastLinear(64, width, 16, 4)
        self.weight = nn.Parameter(1 + 0.2 * torch.randn(48))

    def forward(self, a, residual):
        h = residual + self.o(a)
        n = rms_norm(h, self.weight, 1e-6)
        return h, self.down(F.silu(self.gate(n)) * self.up(n))


class ScaledEpsTail(Tail):
    """A norm that is not RMSNorm: ``rsqrt(torch.add(variance, eps, alpha=50))``."""

    def forward(self, a, residual):
        h = residual + self.o(a)
        hidden = h.to(torch.float32)
        variance = hidden.pow(2).mean(-1, keepdim=True)
        n = self.weight * (hidden * torch.rsqrt(torch.add(variance, 1.0, alpha=50.0))).to(h.dtype)
        return h + self.down(F.silu(self.gate(n)) * self.up(n))


@pytest.mark.parametrize("model", [lambda: ProjectingTail(32), lambda: ProjectingTail(64), ScaledEpsTail],
                         ids=["down-narrower", "down-wider", "add-with-alpha"])
def test_near_misses_are_not_rewritten(model):
    """A down projection of another width than the residual stream, or an eps added with ``alpha``:
    the graph stays as it was and computes what eager does."""
    torch.manual_seed(0)
    model = model()
    before = block_tail.stats["tails"]
    with torch.no_grad():
        want = model(*_inputs())
        got = _compiled(model)(*_inputs())
    assert block_tail.stats["tails"] == before
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_op_refuses_a_down_of_another_width():
    torch.manual_seed(0)
    model = ProjectingTail(32).double()
    a, residual = (t.double() for t in _inputs())
    with pytest.raises(ValueError, match="down has 32 outputs where o has 48"):
        torch.ops.blastfx.blast_block_tail(*_op_args(model, a, residual))
