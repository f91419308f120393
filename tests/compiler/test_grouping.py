"""Sibling BLAST calls (same input) grouped into one ``blastfx::blast_matmul_group`` by the "blast"
backend: the grouped graph computes what the eager model does, training graphs are left alone, and
the op's reference is the members' reference calls."""
import pytest
import torch
from torch import nn

import blastfx
from blastfx.compiler import grouping


class Siblings(nn.Module):
    """q/k/v-like BLAST siblings of different shapes and ranks, one sibling kept dense, and a BLAST
    layer reading something else (not grouped)."""

    def __init__(self):
        super().__init__()
        self.q = blastfx.BlastLinear(32, 32, 8, 4, bias=True)
        self.k = blastfx.BlastLinear(32, 16, 4, 2, bias=False)
        self.v = blastfx.BlastLinear(32, 24, 8, (4, 2), bias=True)
        self.dense = nn.Linear(32, 8)
        self.o = blastfx.BlastLinear(72, 32, 8, 4)

    def forward(self, x):
        h = torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)
        return self.o(h) + self.dense(x).sum(-1, keepdim=True)


def _compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="blast", options={"lowering": "extern", **options})


def test_grouped_graph_matches_eager_without_autograd():
    torch.manual_seed(0)
    model = Siblings()
    x = torch.randn(2, 3, 32)
    before = dict(grouping.stats)
    with torch.no_grad():
        want = model(x)
        got = _compiled(model, group_siblings="always")(x)
    assert grouping.stats["groups"] == before["groups"] + 1
    assert grouping.stats["grouped_calls"] == before["grouped_calls"] + 3      # q, k, v; not o, not dense
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_graphs_are_not_grouped_and_still_differentiate():
    torch.manual_seed(0)
    model = Siblings()
    x = torch.randn(4, 32)
    before = grouping.stats["groups"]
    out = _compiled(model, group_siblings="always")(x)
    out.sum().backward()
    assert grouping.stats["groups"] == before
    assert model.q.U.grad is not None and torch.isfinite(model.q.U.grad).all()


def test_never_and_auto_on_cpu_leave_the_calls_alone():
    model = Siblings()
    before = grouping.stats["groups"]
    with torch.no_grad():
        _compiled(model, group_siblings="never")(torch.randn(1, 32))
        _compiled(model)(torch.randn(1, 32))                  # auto: CUDA inputs only
    assert grouping.stats["groups"] == before


def test_bad_option_is_a_clear_error():
    with pytest.raises(Exception, match="group_siblings must be one of"):
        with torch.no_grad():
            _compiled(Siblings(), group_siblings="sometimes")(torch.randn(1, 32))


def test_group_op_reference_matches_members_and_passes_opcheck():
    torch.manual_seed(0)
    model = Siblings().double()
    x = torch.randn(3, 32, dtype=torch.float64)
    layers = [model.q, model.k, model.v]
    args = (x, [m.U for m in layers], [m.S for m in layers], [m.V for m in layers], [m.bias for m in layers],
            [m.out_features for m in layers])
    with torch.no_grad():
        y_all = torch.ops.blastfx.blast_matmul_group(*args)
        assert y_all.shape == (3, sum(m.out_features for m in layers))
        for y, m in zip(y_all.split([m.out_features for m in layers], dim=-1), layers):
            torch.testing.assert_close(y, m(x))
    torch.library.opcheck(torch.ops.blastfx.blast_matmul_group.default,
                          tuple(a if not isinstance(a, list) else [t.detach() if isinstance(t, torch.Tensor) else t
                                                                  for t in a] for a in args),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="one U, S, V, bias and out_features per member"):
        torch.ops.blastfx.blast_matmul_group(x, [model.q.U], [], [], [], [])


@pytest.mark.cuda
def test_grouped_model_records_a_cuda_graph_without_an_eager_warm_up():
    """Under ``mode="reduce-overhead"`` the group's table and the GEMV workspace are first needed
    while CUDA-graph trees warm up and record; they must not land in the graph's memory pool (which
    refuses live tensors it does not own), and replays must equal eager."""
    torch.manual_seed(0)
    model = Siblings().cuda().to(torch.bfloat16)
    from blastfx.kernels import gemv
    gemv._WORKSPACES.clear()
    gemv._TABLES.clear()
    x = torch.randn(1, 32, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="blast", mode="reduce-overhead")    # groups by default on CUDA
    with torch.no_grad():
        want = model(x).float()
        for _ in range(4):
            got = compiled(x).float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_the_group_op_on_cuda_runs_the_grouped_kernel_the_autotuner_picks(monkeypatch):
    """The op's CUDA kernel (``tuned_decode_call``), run here on the CPU with the Triton interpreter."""
    from blastfx.kernels import autotune, dispatch, gemv
    from blastfx.structures.blast.layout import BlastShape
    torch.manual_seed(0)
    model = Siblings()
    layers = [(m.U.detach(), m.S.detach(), m.V.detach(), None if m.bias is None else m.bias.detach(),
               BlastShape.from_factors(m.U, m.S, m.V, out_features=m.out_features)) for m in (model.q, model.k, model.v)]
    monkeypatch.setattr(dispatch, "forward_impl", lambda dtype: "triton")
    monkeypatch.setattr(autotune, "choose", lambda key, candidates, run, copies=1: candidates[1])
    x = torch.randn(2, 32)
    with torch.no_grad():
        got = grouping.tuned_decode_call("group", x, layers, ("members", grouping._one_by_one),
                                         ("gemv", gemv.blast_gemv_group, lambda d: [gemv.DEFAULT]), gemv.groupable)
        want = torch.cat([model.q(x), model.k(x), model.v(x)], dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class QuantizedSiblings(nn.Module):
    """Siblings reading one input: three with int8 codes (one group), two with float factors
    (another group) and one kept dense; a quantized layer reading something else (not grouped)."""

    def __init__(self, factor_dtype="int8"):
        super().__init__()
        self.q = blastfx.BlastLinear(32, 32, 8, 4, bias=True, factor_dtype=factor_dtype)
        self.k = blastfx.BlastLinear(32, 16, 16, 2, bias=False, factor_dtype=factor_dtype, allow_larger=True)
        self.v = blastfx.BlastLinear(32, 24, 8, (4, 2), bias=True, factor_dtype=factor_dtype)
        self.f1 = blastfx.BlastLinear(32, 16, 8, 2)
        self.f2 = blastfx.BlastLinear(32, 16, 8, 2, bias=True)
        self.dense = nn.Linear(32, 8)
        self.o = blastfx.BlastLinear(72, 32, 8, 4, factor_dtype=factor_dtype)

    def forward(self, x):
        h = torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)
        return self.o(h) + (self.f1(x).sum(-1, keepdim=True) + self.f2(x).sum(-1, keepdim=True)
                            + self.dense(x).sum(-1, keepdim=True))


@pytest.mark.parametrize("factor_dtype", ["int8", "int4"])
def test_quantized_siblings_group_apart_from_float_ones(factor_dtype):
    torch.manual_seed(0)
    model = QuantizedSiblings(factor_dtype)
    x = torch.randn(2, 3, 32)
    before = dict(grouping.stats)
    with torch.no_grad():
        want = model(x)
        got = _compiled(model, group_siblings="always")(x)
    assert grouping.stats["groups"] == before["groups"] + 2                  # q/k/v codes; f1/f2 floats
    assert grouping.stats["grouped_calls"] == before["grouped_calls"] + 5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _quantized_args(layers, x):
    return (x, [m.U for m in layers], [m.U_scale for m in layers], [m.S.detach() for m in layers],
            [m.V for m in layers], [m.V_scale for m in layers],
            [None if m.bias is None else m.bias.detach() for m in layers], [m.out_features for m in layers])


def test_quantized_group_op_reference_matches_members_and_passes_opcheck():
    torch.manual_seed(0)
    model = QuantizedSiblings().double()
    x = torch.randn(3, 32, dtype=torch.float64)
    layers = [model.q, model.k, model.v]
    args = _quantized_args(layers, x)
    with torch.no_grad():
        y_all = torch.ops.blastfx.blast_matmul_quantized_group(*args)
        assert y_all.shape == (3, sum(m.out_features for m in layers))
        for y, m in zip(y_all.split([m.out_features for m in layers], dim=-1), layers):
            torch.testing.assert_close(y, m(x))
    torch.library.opcheck(torch.ops.blastfx.blast_matmul_quantized_group.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="one U, U_scale, S, V, V_scale, bias and out_features per member, got 1, 1, 1"):
        torch.ops.blastfx.blast_matmul_quantized_group(x, [model.q.U], [model.q.U_scale], [model.q.S], [model.q.V],
                                                       [model.q.V_scale], [None], [])


@pytest.mark.parametrize("factor_dtype", ["int8", "int4"])
def test_the_quantized_group_op_on_cuda_runs_the_grouped_kernel(monkeypatch, factor_dtype):
    """The quantized group op's CUDA kernel with the grouped GEMV forced, run here on the CPU with
    the Triton interpreter, against the layers' eager outputs; the members path too."""
    from blastfx.kernels import autotune, dispatch
    torch.manual_seed(0)
    model = QuantizedSiblings(factor_dtype)
    monkeypatch.setattr(dispatch, "forward_impl", lambda dtype: "triton")
    x = torch.randn(2, 32)
    layers = [model.q, model.k, model.v]
    from blastfx.compiler.grouping import _check_quantized_group, _one_by_one, tuned_decode_call
    from blastfx.kernels import gemv
    args = _quantized_args(layers, x)
    members = list(zip(args[1], args[3], args[4], args[6], _check_quantized_group(*args), args[2], args[5]))
    with torch.no_grad():
        want = torch.cat([m(x) for m in layers], dim=-1)
        for pick in (0, 1):
            monkeypatch.setattr(autotune, "choose", lambda key, candidates, run, copies=1: candidates[pick])
            got = tuned_decode_call("quantized_group", x, members, ("members", _one_by_one),
                                    ("gemv", gemv.blast_gemv_group, lambda d: [gemv.DEFAULT]), gemv.groupable)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
