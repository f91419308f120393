import pytest
import torch
from torch import nn

from blastfx import BlastLinear
from conftest import dense_from_blocks


def test_forward_is_x_times_dense_transpose():
    layer = BlastLinear(21, 30, rank=5, blocks=(4, 3), dtype=torch.float64)   # both padded
    x = torch.randn(2, 3, 21, dtype=torch.float64)
    A = dense_from_blocks(layer.U.detach(), layer.S.detach(), layer.V.detach(), 30, 21)
    torch.testing.assert_close(layer(x), x @ A.T + layer.bias)
    torch.testing.assert_close(layer.to_dense(), A)


def test_random_init_matches_linear_output_variance():
    n, m, T = 512, 256, 4096
    x = torch.randn(T, n)
    dense_var = torch.stack([nn.Linear(n, m, bias=False)(x).var() for _ in range(5)]).mean()
    blast_var = torch.stack([BlastLinear(n, m, 64, 4, bias=False)(x).var() for _ in range(5)]).mean()
    assert dense_var.item() == pytest.approx(1 / 3, rel=0.1)
    assert blast_var.item() == pytest.approx(dense_var.item(), rel=0.15)


def test_num_parameters_and_repr():
    layer = BlastLinear(21, 30, rank=5, blocks=(4, 3))
    assert layer.num_parameters() == 5 * (32 + 21 + 12) + 30
    assert layer.num_parameters() == sum(p.numel() for p in layer.parameters())
    assert layer.num_parameters(include_bias=False) == layer.shape.num_params
    r = repr(layer)
    assert "rank=5" in r and "blocks=(4, 3)" in r and "padded to 32x21" in r


def test_from_linear_exact_at_full_rank():
    lin = nn.Linear(16, 12).double()
    layer = BlastLinear.from_linear(lin, rank=12, blocks=(1, 1), allow_larger=True)
    x = torch.randn(4, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-6, atol=1e-6)


def test_trains_with_plain_pytorch():
    torch.manual_seed(0)
    target = nn.Linear(32, 32)
    layer = BlastLinear(32, 32, rank=8, blocks=4)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(256, 32)
    losses = []
    for _ in range(200):
        loss = (layer(x) - target(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_state_dict_round_trip():
    a = BlastLinear(20, 24, 4, (2, 2))
    b = BlastLinear(20, 24, 4, (2, 2))
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 20)
    torch.testing.assert_close(a(x), b(x))


def test_autocast_runs_in_the_autocast_dtype_like_linear():
    layer = BlastLinear(32, 24, 8, 2)
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        ref = torch.nn.functional.linear(x, layer.to_dense())
    assert y.dtype == ref.dtype == torch.bfloat16
    exact = (x.double() @ layer.to_dense().T.double() + layer.bias.double()).detach()
    assert ((y.double() - exact).norm() / exact.norm()).item() < 2e-2
    y.float().sum().backward()
    assert layer.U.grad is not None and layer.U.grad.dtype == torch.float32


@pytest.mark.parametrize("factor_dtype", [None, "int8"])
def test_compiled_forward_does_not_guard_the_tensor_names(factor_dtype):
    """Compiled, the forward reads its tensors from the module's dicts: no guard on whether each name
    is in ``_parameters`` / ``_buffers`` (what tracing the class's ``__getattr__`` adds, re-checked on
    every call), and the output equals eager."""
    torch._dynamo.reset()
    layer = BlastLinear(24, 16, 4, (2, 2), bias=True, factor_dtype=factor_dtype)
    seen = []

    def keep_all(entries):
        seen.extend(entries)
        return [True] * len(entries)
    compiled = torch.compile(layer, backend="eager", options={"guard_filter_fn": keep_all})
    x = torch.randn(3, 24)
    torch.testing.assert_close(compiled(x), layer(x))
    assert seen, "the guard filter saw no guards"
    name_checks = [(e.guard_type, e.name) for e in seen if e.guard_type == "DICT_CONTAINS"
                   and ("_parameters" in e.name or "_buffers" in e.name)]
    assert not name_checks


def test_forward_reads_tensors_moved_out_of_the_parameter_dict():
    """Pruning and parametrizations (and FSDP's unsharded views) move a factor out of ``_parameters``
    into a plain attribute or a property: the forward still reads the tensor in effect."""
    from torch.nn.utils import parametrize, prune
    torch.manual_seed(0)
    layer = BlastLinear(24, 16, 4, (2, 2), bias=True)
    x = torch.randn(3, 24)
    prune.l1_unstructured(layer, "U", amount=0.5)
    assert "U" not in layer._parameters
    ref = torch.nn.functional.linear(x, layer.to_dense(), layer.bias)
    torch.testing.assert_close(layer(x), ref)

    class Doubled(nn.Module):
        def forward(self, t):
            return 2 * t
    parametrize.register_parametrization(layer, "S", Doubled())
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.to_dense(), layer.bias))
    plain = BlastLinear(24, 16, 4, (2, 2), bias=False)
    V = plain.V.detach().clone()
    del plain.V
    plain.V = V                                   # a plain tensor attribute, as FSDP's unsharded view
    torch.testing.assert_close(plain(x), x @ plain.to_dense().T)
