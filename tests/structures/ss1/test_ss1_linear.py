"""``SS1Linear`` and ``build_ss1``: forward, dense conversion, state dict (seed travels, geometry
checked), construction from a dense layer, training, torch.compile."""
import io
import math

import pytest
import torch
import torch.nn as nn

import blastfx  # noqa: F401
from blastfx.structures.ss1 import (SS1Layout, SS1Linear, build_ss1, project_calibrated, project_weight, ss1_params,
                                    ss1_to_dense)
from ss1_oracles import dense_oracle


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(), (3,), (2, 4)])
def test_forward_is_the_dense_equivalent(bias, lead):
    layer = SS1Linear(100, 37, 2, bias=bias, seed=4, block_k=16, block_n=16, dtype=torch.float64)
    x = torch.randn(*lead, 100, dtype=torch.float64)
    want = x @ dense_oracle(layer.weight.detach(), layer.layout).T + (layer.bias.detach() if bias else 0)
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    assert layer(x).shape == (*lead, 37)


def test_sizes_parameters_and_repr():
    layer = SS1Linear(200, 70, 4, seed=9)
    assert (layer.in_features, layer.out_features, layer.reduction, layer.seed) == (200, 70, 4, 9)
    assert layer.weight.shape == SS1Layout(70, 200, 4).weight_shape
    assert layer.weight.numel() == ss1_params(70, 200, 4)
    assert sum(p.numel() for p in layer.parameters()) == ss1_params(70, 200, 4) + 70
    assert repr(layer) == ("SS1Linear(in_features=200, out_features=70, reduction=4, bias=True, seed=9, "
                           "block_k=32, block_n=64)")


def test_init_keeps_the_scale_of_nn_linear():
    layer = SS1Linear(512, 256, 4)
    bound = 1 / math.sqrt(512)
    dense = layer.dense_weight().detach()
    assert float(dense.abs().max()) <= bound
    assert abs(float(dense.std()) - bound / math.sqrt(3)) < 0.1 * bound      # uniform(-b, b) has std b/sqrt(3)


def test_to_dense_is_the_weight_and_to_linear_an_equivalent_linear():
    layer = SS1Linear(100, 37, 2, block_k=16, block_n=16, dtype=torch.float64)
    x = torch.randn(5, 100, dtype=torch.float64)
    W = layer.to_dense()
    assert W.shape == (37, 100) and W.dtype == torch.float64
    torch.testing.assert_close(x @ W.T + layer.bias, layer(x), rtol=1e-12, atol=1e-12)
    lin = layer.to_linear()
    assert isinstance(lin, nn.Linear) and lin.weight.dtype == torch.float64
    torch.testing.assert_close(lin(x), layer(x), rtol=1e-12, atol=1e-12)
    lin_nb = SS1Linear(100, 37, 2, bias=False, block_k=16, block_n=16).to_linear()
    assert lin_nb.bias is None


def test_state_dict_holds_weight_bias_and_the_hash_geometry():
    layer = SS1Linear(100, 37, 2, seed=12345, block_k=16, block_n=16)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "ss1_layout"}
    assert sd["ss1_layout"].dtype == torch.int64
    assert sd["ss1_layout"].tolist() == [37, 100, 2, 16, 16, 8, 12345]


def test_loading_adopts_the_seed_and_reproduces_the_outputs():
    src = SS1Linear(100, 37, 2, seed=777, block_k=16, block_n=16)
    dst = SS1Linear(100, 37, 2, seed=0, block_k=16, block_n=16)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst.load_state_dict(torch.load(buf))
    assert dst.seed == 777 and torch.equal(dst.shifts, src.shifts)
    x = torch.randn(4, 100)
    assert torch.equal(dst(x), src(x))


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file
    src = SS1Linear(64, 48, 2, seed=2 ** 40 + 3, block_k=16, block_n=16)
    save_file(src.state_dict(), str(tmp_path / "l.safetensors"))
    dst = SS1Linear(64, 48, 2, block_k=16, block_n=16)
    dst.load_state_dict(load_file(str(tmp_path / "l.safetensors")))
    x = torch.randn(3, 64)
    assert dst.seed == src.seed and torch.equal(dst(x), src(x))


@pytest.mark.parametrize("other,field", [
    (dict(reduction=4), "reduction=2 (this layer: 4)"),
    (dict(block_n=32), "block_n=16 (this layer: 32)"),
    (dict(in_features=96), "in_features=100 (this layer: 96)"),
])
def test_loading_another_geometry_is_refused_and_changes_nothing(other, field):
    src = SS1Linear(100, 37, 2, seed=5, block_k=16, block_n=16)
    args = dict(in_features=100, out_features=37, reduction=2, seed=1, block_k=16, block_n=16) | other
    dst = SS1Linear(**args)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    layout, shifts = dst.layout, dst.shifts.clone()
    with pytest.raises(RuntimeError, match=field.replace("(", r"\(").replace(")", r"\)")):
        dst.load_state_dict(src.state_dict())
    assert dst.layout == layout and torch.equal(dst.shifts, shifts)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_meta_device_then_assign():
    src = SS1Linear(100, 37, 2, seed=31, block_k=16, block_n=16)
    with torch.device("meta"):
        dst = SS1Linear(100, 37, 2, block_k=16, block_n=16)
    assert dst.weight.is_meta and dst.shifts.is_meta
    dst.load_state_dict(src.state_dict(), assign=True)
    assert dst.shifts.device.type == "cpu" and dst.seed == 31
    x = torch.randn(2, 100)
    assert torch.equal(dst(x), src(x))


def test_dtype_moves_keep_the_table():
    layer = SS1Linear(64, 32, 2, block_k=16, block_n=16).to(torch.float64)
    assert layer.shifts.dtype == torch.int64 and layer.ss1_layout.dtype == torch.int64
    assert layer.weight.dtype == torch.float64
    layer16 = SS1Linear(64, 32, 2, block_k=16, block_n=16, dtype=torch.bfloat16)
    assert layer16(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_pickles_whole():
    layer = SS1Linear(64, 32, 2, seed=8, block_k=16, block_n=16)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    x = torch.randn(2, 64)
    assert torch.equal(back(x), layer(x)) and back.layout == layer.layout


@pytest.mark.parametrize("kwargs,match", [
    (dict(reduction=3), "reduction must be a power of two"),
    (dict(reduction=8), "reduction=8 exceeds the 7 input tiles"),
    (dict(bias=1), "bias must be True or False"),
    (dict(seed=-3), "seed must be an integer >= 0"),
])
def test_constructor_errors(kwargs, match):
    args = dict(in_features=200, out_features=20, reduction=2) | kwargs
    with pytest.raises(ValueError, match=match):
        SS1Linear(**args)


def test_from_dense_weight_only():
    lin = nn.Linear(100, 37)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    layer = SS1Linear.from_dense(lin, 2, seed=3, block_k=16, block_n=16)
    assert torch.equal(lin.weight, w0) and torch.equal(lin.bias, b0)          # the source is untouched
    L = SS1Layout(37, 100, 2, seed=3, block_k=16, block_n=16)
    assert layer.layout == L
    torch.testing.assert_close(layer.weight.detach(), project_weight(w0, L))
    assert torch.equal(layer.bias.detach(), b0)


def test_from_dense_reduction_one_is_exact():
    lin = nn.Linear(64, 40, dtype=torch.float64)
    layer = SS1Linear.from_dense(lin, 1, block_k=16, block_n=16)
    torch.testing.assert_close(layer.dense_weight(), lin.weight, rtol=0, atol=0)
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-12, atol=1e-12)


def test_from_dense_calibrated_and_dtype():
    lin = nn.Linear(64, 40, bias=False, dtype=torch.bfloat16)
    X = torch.randn(500, 64) @ torch.randn(64, 64)
    C = X.T @ X / 500
    layer = SS1Linear.from_dense(lin, 2, covariance=C, damping=0.05, block_k=16, block_n=16)
    assert layer.weight.dtype == torch.bfloat16 and layer.bias is None
    want = project_calibrated(lin.weight.detach(), layer.layout, C, 0.05)
    assert torch.equal(layer.weight.detach(), want)


def test_build_ss1_matches_from_dense():
    lin = nn.Linear(100, 37)
    a = build_ss1(lin.weight, lin.bias, 4, seed=2, block_k=16, block_n=16)
    b = SS1Linear.from_dense(lin, 4, seed=2, block_k=16, block_n=16)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and a.layout == b.layout
    assert isinstance(a.weight, nn.Parameter) and a.weight.requires_grad


@pytest.mark.parametrize("change,match", [
    (dict(weight=torch.randn(10)), "weight must be a 2-D tensor"),
    (dict(bias=torch.randn(5)), r"bias must be None or a tensor of shape \(37,\)"),
    (dict(reduction=6), "reduction must be a power of two"),
    (dict(covariance=torch.randn(99, 99)), r"covariance has shape \(99, 99\), expected \(100, 100\)"),
    (dict(damping=-1.0), "damping must be a finite number >= 0"),
    (dict(output_weights=torch.ones(36)), r"output_weights must be a tensor of shape \(37,\)"),
    (dict(output_weights=-torch.ones(37)), "output_weights must be finite and non-negative"),
    (dict(weight=torch.full((37, 100), float("nan"))), "weight has non-finite entries"),
    (dict(weight=torch.ones(37, 100, dtype=torch.int64)), "weight must be a floating-point tensor"),
])
def test_build_ss1_errors_leave_the_inputs_alone(change, match):
    args = dict(weight=torch.randn(37, 100), bias=torch.randn(37), reduction=2) | change
    snapshot = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=match):
        build_ss1(**args)
    for k in snapshot:
        torch.testing.assert_close(args[k], snapshot[k], rtol=0, atol=0, equal_nan=True)


def test_from_dense_refuses_other_modules():
    with pytest.raises(ValueError, match="linear must be an nn.Linear, got Conv1d"):
        SS1Linear.from_dense(nn.Conv1d(3, 3, 1), 2)


def test_trains_to_a_target_ss1_matrix():
    torch.manual_seed(1)
    target = SS1Linear(64, 32, 2, seed=6, block_k=16, block_n=16)
    layer = SS1Linear(64, 32, 2, seed=6, block_k=16, block_n=16)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
    X = torch.randn(256, 64)
    with torch.no_grad():
        Y = target(X)
    first = None
    for _ in range(200):
        loss = (layer(X) - Y).square().mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3 * first
    torch.testing.assert_close(layer.weight.detach(), target.weight.detach(), rtol=0, atol=5e-2)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_layer_compiles(backend):
    torch._dynamo.reset()
    model = nn.Sequential(SS1Linear(64, 48, 2, block_k=16, block_n=16), nn.GELU(),
                          SS1Linear(48, 16, 2, block_k=16, block_n=16))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(3, 5, 64)
    y = compiled(x)
    torch.testing.assert_close(y, model(x))
    y.sum().backward()
    g = model[0].weight.grad.clone()
    model.zero_grad()
    model(x).sum().backward()
    torch.testing.assert_close(g, model[0].weight.grad)


def test_dense_weight_uses_the_layer_table():
    layer = SS1Linear(100, 37, 2, seed=10, block_k=16, block_n=16)
    assert torch.equal(layer.dense_weight(), ss1_to_dense(layer.weight, layer.layout))
