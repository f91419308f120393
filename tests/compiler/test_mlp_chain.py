"""Gated MLPs of BLAST layers, ``down(silu(gate(x)) * up(x))``, rewritten into one
``blastfx::blast_mlp_chain`` call by the "blast" backend: the chained graph computes what the eager
model does, only exact matches are chained, and training graphs are left alone."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import blastfx
import models
from decode_cases import forced_forms
from blastfx.compiler import grouping, mlp_chain


class GatedMLP(nn.Module):
    """A Llama-style MLP of BLAST layers (gate and up of different ranks, gate with a bias) beside a
    q/k-like pair of siblings, which the chain leaves to sibling grouping."""

    def __init__(self, act=F.silu, up_first=False, leak_gate=False):
        super().__init__()
        self.gate = blastfx.BlastLinear(32, 64, 8, 4, bias=True)
        self.up = blastfx.BlastLinear(32, 64, 16, 4)
        self.down = blastfx.BlastLinear(64, 32, 8, 4, bias=True)
        self.q = blastfx.BlastLinear(32, 32, 8, 4)
        self.k = blastfx.BlastLinear(32, 16, 8, 4)
        self.act, self.up_first, self.leak_gate = act, up_first, leak_gate

    def forward(self, x):
        g, u = self.gate(x), self.up(x)
        h = u * self.act(g) if self.up_first else self.act(g) * u
        out = self.down(h) + self.q(x).sum(-1, keepdim=True) + self.k(x).mean(-1, keepdim=True)
        return out + g[..., :32] if self.leak_gate else out


def _compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="blast", options={"lowering": "extern", **options})


@pytest.mark.parametrize("variant", [dict(), dict(act=nn.SiLU(), up_first=True)], ids=["F.silu", "nn.SiLU-up-first"])
def test_chained_graph_matches_eager_without_autograd(variant):
    torch.manual_seed(0)
    model = GatedMLP(**variant)
    x = torch.randn(2, 3, 32)
    chains, groups = mlp_chain.stats["chains"], grouping.stats["grouped_calls"]
    with torch.no_grad():
        want = model(x)
        got = _compiled(model, chain_mlp="always", group_siblings="always")(x)
    assert mlp_chain.stats["chains"] == chains + 1
    assert grouping.stats["grouped_calls"] == groups + 2       # q and k; gate and up went into the chain
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_intermediate_used_elsewhere_is_not_chained():
    """gate's output also reaches the model's output: the chain would have to produce it too."""
    torch.manual_seed(0)
    model = GatedMLP(leak_gate=True)
    x = torch.randn(4, 32)
    chains = mlp_chain.stats["chains"]
    with torch.no_grad():
        want = model(x)
        got = _compiled(model, chain_mlp="always")(x)
    assert mlp_chain.stats["chains"] == chains
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_other_activations_are_not_chained():
    torch.manual_seed(0)
    model = GatedMLP(act=F.gelu)
    chains = mlp_chain.stats["chains"]
    with torch.no_grad():
        _compiled(model, chain_mlp="always")(torch.randn(1, 32))
    assert mlp_chain.stats["chains"] == chains


def test_training_graphs_never_and_auto_on_cpu_leave_the_mlp_alone():
    torch.manual_seed(0)
    model = GatedMLP()
    chains = mlp_chain.stats["chains"]
    out = _compiled(model, chain_mlp="always")(torch.randn(4, 32))
    out.sum().backward()
    assert model.gate.U.grad is not None and torch.isfinite(model.gate.U.grad).all()
    with torch.no_grad():
        _compiled(model, chain_mlp="never")(torch.randn(1, 32))
        _compiled(model)(torch.randn(1, 32))                  # auto: CUDA inputs only
    assert mlp_chain.stats["chains"] == chains


def test_bad_option_is_a_clear_error():
    with pytest.raises(Exception, match="chain_mlp must be one of"):
        with torch.no_grad():
            _compiled(GatedMLP(), chain_mlp="sometimes")(torch.randn(1, 32))


@pytest.mark.cuda
def test_chained_model_matches_eager_and_replays_in_cuda_graphs():
    torch.manual_seed(0)
    model = GatedMLP().cuda().to(torch.bfloat16)
    x = torch.randn(1, 32, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="blast", mode="reduce-overhead")    # chains by default on CUDA
    chains = mlp_chain.stats["chains"]
    with torch.no_grad():
        want = model(x).float()
        for _ in range(4):
            got = compiled(x).float()
    assert mlp_chain.stats["chains"] == chains + 1
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("factor_dtype", [None, "int8"])
def test_every_mlp_of_a_compressed_hf_llama_is_chained(factor_dtype):
    """transformers' LlamaMLP, ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with its SiLU module,
    in every decoder layer of a compressed model (float factors, or int8 codes); logits as eager."""
    model = models.compressed_tiny_llama(factor_dtype)
    ids = torch.randint(0, 100, (1, 5))
    chains = mlp_chain.stats["chains"]
    with torch.no_grad():
        want = model(ids).logits
        got = _compiled(model, chain_mlp="always", group_siblings="always")(ids).logits
    assert mlp_chain.stats["chains"] == chains + 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _op_layers(dtype=torch.float32):
    torch.manual_seed(0)
    model = GatedMLP().to(dtype)
    return model, [(m.U.detach(), m.S.detach(), m.V.detach(), None if m.bias is None else m.bias.detach(),
                    blastfx.structures.blast.layout.BlastShape.from_factors(m.U, m.S, m.V, out_features=m.out_features))
                   for m in (model.gate, model.up, model.down)]


def test_the_op_on_cuda_picks_between_its_two_forms_as_the_autotuner_says(monkeypatch):
    """The op's CUDA kernel (``tuned_decode_call``), run here on the CPU with the Triton interpreter:
    the chained form where the autotuner picks it, the unchained one where the chain cannot run (too
    many tokens, deterministic mode), both equal to the reference."""
    from blastfx.compiler import grouping
    from blastfx.kernels import autotune, dispatch, mlp_chain as kernels
    model, layers = _op_layers()
    picked = []

    def choose(key, candidates, run, copies=1):
        picked.append((key[0], [label for label, _ in candidates]))
        return next(c for c in candidates if c[0] == "chain")

    monkeypatch.setattr(dispatch, "forward_impl", lambda dtype: "triton")
    monkeypatch.setattr(autotune, "choose", choose)
    call = lambda x: grouping.tuned_decode_call("mlp_chain", x, layers, ("layers", mlp_chain._unchained),
                                                ("chain", mlp_chain._chained, lambda d: [kernels.DEFAULT]),
                                                mlp_chain._why_not_chained)
    with torch.no_grad():
        for T, deterministic in ((1, False), (3, False), (5, False), (2, True)):
            x = torch.randn(T, 32)
            before = len(picked)
            torch.use_deterministic_algorithms(deterministic)
            try:
                got = call(x)
            finally:
                torch.use_deterministic_algorithms(False)
            want = model.down(F.silu(model.gate(x)) * model.up(x))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            timed = T <= 4 and not deterministic
            assert len(picked) == before + timed
            if timed:
                assert picked[-1] == ("mlp_chain", ["layers", "chain"])


class QuantizedGatedMLP(nn.Module):
    """The gated MLP with int8 (or other) codes in all three layers, beside one with float factors
    whose down layer has codes (mixed kinds: not chained)."""

    def __init__(self, factor_dtype="int8"):
        super().__init__()
        self.gate = blastfx.BlastLinear(32, 64, 8, 4, bias=True, factor_dtype=factor_dtype)
        self.up = blastfx.BlastLinear(32, 64, 16, 4, factor_dtype=factor_dtype)
        self.down = blastfx.BlastLinear(64, 32, 8, 4, bias=True, factor_dtype=factor_dtype)
        self.gate2 = blastfx.BlastLinear(32, 64, 8, 4)
        self.up2 = blastfx.BlastLinear(32, 64, 8, 4)
        self.down2 = blastfx.BlastLinear(64, 32, 8, 4, factor_dtype=factor_dtype)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x)) + self.down2(F.silu(self.gate2(x)) * self.up2(x))


@pytest.mark.parametrize("factor_dtype", ["int8", "int4"])
def test_quantized_mlp_is_chained_and_matches_eager(factor_dtype):
    torch.manual_seed(0)
    model = QuantizedGatedMLP(factor_dtype)
    x = torch.randn(2, 3, 32)
    chains, groups = mlp_chain.stats["chains"], grouping.stats["grouped_calls"]
    with torch.no_grad():
        want = model(x)
        got = _compiled(model, chain_mlp="always", group_siblings="always")(x)
    assert mlp_chain.stats["chains"] == chains + 1                  # not the mixed one
    assert grouping.stats["grouped_calls"] == groups + 2             # its gate2 and up2 as a float group
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _quantized_op_args(model, x):
    layers = (model.gate, model.up, model.down)
    return (x, [m.U for m in layers], [m.U_scale for m in layers], [m.S.detach() for m in layers],
            [m.V for m in layers], [m.V_scale for m in layers],
            [None if m.bias is None else m.bias.detach() for m in layers], [m.out_features for m in layers])


def test_quantized_chain_op_reference_and_checks():
    torch.manual_seed(0)
    model = QuantizedGatedMLP().double()
    x = torch.randn(3, 32, dtype=torch.float64)
    args = _quantized_op_args(model, x)
    with torch.no_grad():
        torch.testing.assert_close(torch.ops.blastfx.blast_mlp_chain_quantized(*args),
                                   model.down(F.silu(model.gate(x)) * model.up(x)))
    torch.library.opcheck(torch.ops.blastfx.blast_mlp_chain_quantized.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="three layers .* got 2, 3, 3"):
        torch.ops.blastfx.blast_mlp_chain_quantized(x, args[1][:2], *args[2:])


@pytest.mark.parametrize("factor_dtype", ["int8", "int4"])
def test_the_quantized_op_on_cuda_runs_the_chain_the_autotuner_picks(monkeypatch, factor_dtype):
    """The quantized chain op's CUDA kernel, run here on the CPU with the Triton interpreter: the
    chained form and the unchained one (a quantized group, SiLU·mul, down), both equal to eager."""
    from blastfx.compiler import grouping
    from blastfx.kernels import mlp_chain as kernels
    torch.manual_seed(0)
    model = QuantizedGatedMLP(factor_dtype)
    x = torch.randn(2, 32)
    args = _quantized_op_args(model, x)
    shapes = mlp_chain._check_quantized_chain(*args)
    layers = list(zip(args[1], args[3], args[4], args[6], shapes, args[2], args[5]))
    with torch.no_grad():
        want = model.down(F.silu(model.gate(x)) * model.up(x))
        for _ in forced_forms(monkeypatch, ("chain", "layers")):
            got = grouping.tuned_decode_call("quantized_mlp_chain", x, layers, ("layers", mlp_chain._unchained),
                                             ("chain", mlp_chain._chained, lambda d: [kernels.DEFAULT]),
                                             mlp_chain._why_not_chained)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
