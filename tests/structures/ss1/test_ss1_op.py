"""The SS1 reference math and ``torch.ops.blastfx.ss1_matmul``: against a float64 entry-by-entry
oracle, its adjoint, autograd (gradcheck, double backward), fake tensors and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import blastfx  # noqa: F401
from blastfx.structures.ss1 import SS1Layout, ss1_fold, ss1_matmul, ss1_matmul_reference, ss1_to_dense
from blastfx.structures.ss1.ops import check_inputs
from ss1_oracles import dense_oracle

GEOMETRIES = [  # out, in, reduction, block_k, block_n
    (40, 64, 2, 16, 16), (37, 100, 4, 16, 16), (70, 200, 2, 32, 64), (16, 48, 1, 16, 16), (50, 81, 2, 16, 32),
    (24, 130, 8, 16, 16),
]


def _layout(out_f, in_f, r, bk, bn, seed=11):
    return SS1Layout(out_f, in_f, r, seed=seed, block_k=bk, block_n=bn)


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_to_dense_matches_the_entrywise_oracle(geom):
    L = _layout(*geom)
    w = torch.randn(L.weight_shape, dtype=torch.float64)
    assert torch.equal(ss1_to_dense(w, L), dense_oracle(w, L))


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_fold_is_the_adjoint_of_to_dense(geom):
    L = _layout(*geom)
    w = torch.randn(L.weight_shape, dtype=torch.float64)
    D = torch.randn(L.out_features, L.in_features, dtype=torch.float64)
    lhs = (ss1_to_dense(w, L) * D).sum()
    rhs = (w * ss1_fold(D, L)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_reference_is_x_times_dense_transpose(geom, lead, bias):
    L = _layout(*geom)
    w = torch.randn(L.weight_shape, dtype=torch.float64)
    b = torch.randn(L.out_features, dtype=torch.float64) if bias else None
    x = torch.randn(*lead, L.in_features, dtype=torch.float64)
    want = x @ dense_oracle(w, L).T + (b if bias else 0)
    got = ss1_matmul_reference(x, w, L, b)
    assert got.shape == (*lead, L.out_features)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ss1_matmul(x, w, L, b), want, rtol=1e-12, atol=1e-12)


def test_reduction_one_is_a_column_permutation_per_tile():
    L = _layout(32, 64, 1, 16, 16)
    w = torch.randn(L.weight_shape, dtype=torch.float64)
    dense = ss1_to_dense(w, L)
    for j in range(2):
        for i in range(4):
            blk = dense[j * 16:(j + 1) * 16, i * 16:(i + 1) * 16]
            src = w[j * 16:(j + 1) * 16, i * 16:(i + 1) * 16]
            s = int(L.shifts()[i, j])
            assert torch.equal(blk, torch.roll(src, shifts=s, dims=1))


@pytest.mark.parametrize("geom", [(18, 40, 2, 16, 16), (20, 70, 4, 16, 16)])   # partial tiles in both dims
@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck(geom, bias):
    L = _layout(*geom)
    w = torch.randn(L.weight_shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(L.out_features, dtype=torch.float64, requires_grad=True) if bias else None
    x = torch.randn(2, 1, L.in_features, dtype=torch.float64, requires_grad=True)
    s = L.shifts()
    fn = lambda x, w, b: torch.ops.blastfx.ss1_matmul(x, w, s, b, L.reduction, L.block_k, L.block_n)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    if bias:                                     # the backward is plain PyTorch: differentiable again
        assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_gradients_match_autograd_through_the_oracle():
    L = _layout(37, 100, 4, 16, 16)
    w = torch.randn(L.weight_shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(L.out_features, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, L.in_features, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, L.out_features, dtype=torch.float64)
    grads = torch.autograd.grad(ss1_matmul(x, w, L, b), (x, w, b), g)
    # oracle: dL/dshared[n, slot] = sum of dL/dW over the entries tied to the slot
    from ss1_oracles import tie_matrix
    A = tie_matrix(L)
    gW = g.T @ x.detach()
    want_w = (A.T @ gW.reshape(-1)).view(L.weight_shape)
    want_x = g @ dense_oracle(w.detach(), L)
    torch.testing.assert_close(grads[0], want_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1], want_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[2], g.sum(0), rtol=1e-12, atol=1e-12)


def test_opcheck():
    L = _layout(50, 81, 2, 16, 32)
    s = L.shifts()
    for bias in (None, torch.randn(L.out_features)):
        args = (torch.randn(3, L.in_features, requires_grad=True), torch.randn(L.weight_shape, requires_grad=True),
                s, bias, L.reduction, L.block_k, L.block_n)
        torch.library.opcheck(torch.ops.blastfx.ss1_matmul.default, args)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile(backend):
    L = _layout(70, 200, 2, 32, 64)
    w = torch.randn(L.weight_shape, requires_grad=True)
    b = torch.randn(L.out_features, requires_grad=True)
    s = L.shifts()

    def f(x, w, b):
        return torch.relu(ss1_matmul(x, w, L, b, shifts=s)).sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    x = torch.randn(2, 5, L.in_features)
    got = compiled(x, w, b)
    gw, gb = torch.autograd.grad(got, (w, b))
    want = f(x, w, b)
    ww, wb = torch.autograd.grad(want, (w, b))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gw, ww)
    torch.testing.assert_close(gb, wb)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    L = _layout(37, 100, 4, 16, 16)
    with FakeTensorMode():
        x = torch.empty(4, 9, L.in_features)
        w = torch.empty(L.weight_shape)
        s = torch.empty(L.k_tiles, L.n_tiles, dtype=torch.int64)
        y = torch.ops.blastfx.ss1_matmul(x, w, s, None, L.reduction, L.block_k, L.block_n)
        assert tuple(y.shape) == (4, 9, L.out_features)


def test_low_precision_reference_matches_float64():
    L = _layout(70, 200, 2, 32, 64)
    w = torch.randn(L.weight_shape)
    x = torch.randn(6, L.in_features)
    want = x.double() @ dense_oracle(w, L).T
    for dt, tol in ((torch.float16, 2e-2), (torch.bfloat16, 8e-2)):
        got = ss1_matmul(x.to(dt), w.to(dt), L)
        assert got.dtype == dt
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def _args(L):
    return dict(x=torch.randn(3, L.in_features), weight=torch.randn(L.weight_shape), shifts=L.shifts(), bias=None,
                reduction=L.reduction, block_k=L.block_k, block_n=L.block_n)


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(x=torch.randn(3, 300)), r"shifts has shape \(7, 2\), but 300 input features"),
    (lambda a: a.update(weight=torch.randn(70, 96)), "weight has 96 columns, but 200 input features"),
    (lambda a: a.update(weight=torch.randn(70, 128, 1)), "weight must be 2-D"),
    (lambda a: a.update(bias=torch.randn(3)), r"bias must have shape \(70,\)"),
    (lambda a: a.update(x=torch.randn(3, 200, dtype=torch.float64)), "one dtype for x, weight and bias"),
    (lambda a: a.update(x=torch.ones(3, 200, dtype=torch.int64)), "floating-point inputs"),
    (lambda a: a.update(shifts=torch.zeros(7, 2)), "shifts must be a 2-D int64/int32 tensor"),
    (lambda a: a.update(reduction=3), "reduction must be a power of two"),
    (lambda a: a.update(block_k=8), "block_k must be a power of two >= 16"),
    (lambda a: a.update(vec=3), "vec must be a power of two"),
    (lambda a: a.update(vec=64), "vec=64 must not exceed block_k=32"),
])
def test_bad_inputs_name_the_problem(change, match):
    L = _layout(70, 200, 2, 32, 64)
    args = _args(L)
    change(args)
    with pytest.raises(ValueError, match=match):
        check_inputs(**args)
    with pytest.raises((ValueError, RuntimeError), match=match):
        torch.ops.blastfx.ss1_matmul(*args.values())


def test_layout_mismatch_is_named():
    L = _layout(70, 200, 2, 32, 64)
    with pytest.raises(ValueError, match=r"weight has shape \(70, 64\), but SS1Layout"):
        ss1_matmul(torch.randn(2, 200), torch.randn(70, 64), L)
    with pytest.raises(ValueError, match="x has 199 features, but the layout has in_features=200"):
        ss1_matmul_reference(torch.randn(2, 199), torch.randn(L.weight_shape), L)
    with pytest.raises(ValueError, match="layout must be an SS1Layout"):
        ss1_to_dense(torch.randn(L.weight_shape), (70, 200, 2))
    with pytest.raises(ValueError, match=r"dense has shape \(70, 100\)"):
        ss1_fold(torch.randn(70, 100), L)


def test_dense_equivalent_is_linear_in_the_shared_weight():
    L = _layout(37, 100, 4, 16, 16)
    a, b = torch.randn(2, *L.weight_shape, dtype=torch.float64)
    torch.testing.assert_close(ss1_to_dense(2 * a - b, L), 2 * ss1_to_dense(a, L) - ss1_to_dense(b, L))
    x = torch.randn(4, L.in_features, dtype=torch.float64)
    torch.testing.assert_close(ss1_matmul(x, a, L), F.linear(x, ss1_to_dense(a, L)))


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("form", ["dense", "folded", None])
@pytest.mark.parametrize("T", [1, 3, 64])
def test_both_reference_forms_match_the_oracle(geom, form, T):
    from blastfx.structures.ss1.ops import _reference
    L = _layout(*geom)
    w = torch.randn(L.weight_shape, dtype=torch.float64)
    b = torch.randn(L.out_features, dtype=torch.float64)
    x = torch.randn(T, 1, L.in_features, dtype=torch.float64)
    got = _reference(x, w, L.shifts(), b, L.reduction, L.block_k, L.block_n, form)
    torch.testing.assert_close(got, x @ dense_oracle(w, L).T + b, rtol=1e-12, atol=1e-12)


def test_reference_form_is_checked():
    from blastfx.structures.ss1.ops import _reference
    L = _layout(40, 64, 2, 16, 16)
    with pytest.raises(ValueError, match="form must be 'dense', 'folded' or None, got 'fast'"):
        _reference(torch.randn(2, 64), torch.randn(L.weight_shape), L.shifts(), None, 2, 16, 16, "fast")
