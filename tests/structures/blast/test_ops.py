"""The op against an independent float64 oracle; opcheck; gradcheck; errors."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from blastfx import blast_matmul, blast_to_dense
from blastfx.structures.blast.layout import BlastShape
from blastfx.structures.blast.ops import blast_matmul_reference
from conftest import dense_from_blocks


def factors(m, n, r, b_out, b_in, dtype=torch.float64, requires_grad=False):
    s = BlastShape.make(m, n, r, (b_out, b_in), allow_larger=True)
    U, S, V = (torch.randn(*s.factor_shapes[k], dtype=dtype, requires_grad=requires_grad) for k in "USV")
    return s, U, S, V


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), r=st.integers(1, 9), b_out=st.integers(1, 5),
       b_in=st.integers(1, 5), lead=st.lists(st.integers(1, 3), max_size=2), bias=st.booleans())
def test_matches_dense_oracle(m, n, r, b_out, b_in, lead, bias):
    try:
        s, U, S, V = factors(m, n, r, b_out, b_in)
    except ValueError:  # block counts that leave a block all padding are refused; tested below
        return
    x = torch.randn(*lead, n, dtype=torch.float64)
    b = torch.randn(m, dtype=torch.float64) if bias else None
    y = blast_matmul(x, U, S, V, b, m)
    A = dense_from_blocks(U, S, V, m, n)
    expected = x @ A.T + (b if bias else 0)
    assert y.shape == (*lead, m)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(blast_to_dense(U, S, V, m, n), A, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_low_precision_close_to_float64(dtype, tol):
    s, U, S, V = factors(48, 40, 8, 4, 2)  # 40 = 2 x 20; 48 = 4 x 12
    x = torch.randn(3, 7, 40, dtype=torch.float64)
    expected = x @ dense_from_blocks(U, S, V, 48, 40).T
    y = blast_matmul(x.to(dtype), U.to(dtype), S.to(dtype), V.to(dtype))
    assert y.dtype == dtype
    rel = (y.double() - expected).norm() / expected.norm()
    assert rel < tol


@pytest.mark.parametrize("m,n,r,b_out,b_in,bias", [(12, 10, 3, 3, 2, True), (13, 11, 4, 3, 4, False),
                                                    (8, 8, 2, 1, 1, True), (9, 17, 5, 2, 3, True)])
def test_gradcheck(m, n, r, b_out, b_in, bias):
    s, U, S, V = factors(m, n, r, b_out, b_in, requires_grad=True)
    x = torch.randn(2, 3, n, dtype=torch.float64, requires_grad=True)
    b = torch.randn(m, dtype=torch.float64, requires_grad=True) if bias else None
    args = (x, U, S, V, b) if bias else (x, U, S, V)
    assert torch.autograd.gradcheck(lambda *a: blast_matmul(*a[:4], a[4] if bias else None, m), args)


def test_backward_matches_dense_autograd():
    s, U, S, V = factors(13, 11, 4, 3, 4, requires_grad=True)
    x = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 13, dtype=torch.float64)
    grads = torch.autograd.grad(blast_matmul(x, U, S, V, None, 13), (x, U, S, V), g)
    ref = torch.autograd.grad(x @ blast_to_dense(U, S, V, 13, 11).T, (x, U, S, V), g)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)


def test_padded_rows_get_zero_gradient():
    s, U, S, V = factors(10, 7, 3, 4, 2, requires_grad=True)   # p = 3 -> 2 pad rows; q = 4 -> 1 pad row
    x = torch.randn(6, 7, dtype=torch.float64)
    blast_matmul(x, U, S, V, None, 10).pow(2).sum().backward()
    assert U.grad.reshape(12, 3)[10:].abs().max() == 0
    assert V.grad.reshape(8, 3)[7:].abs().max() == 0


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    s, U, S, V = factors(12, 10, 3, 3, 2, dtype=torch.float32, requires_grad=True)
    x = torch.randn(2, 4, 10, requires_grad=True)
    b = torch.randn(12, requires_grad=True) if bias else None
    torch.library.opcheck(torch.ops.blastfx.blast_matmul.default, (x, U, S, V, b, 12))


def test_no_four_dim_intermediate(monkeypatch):
    """The reference never builds a (b_out, b_in, T, r) tensor: watch every bmm operand's size."""
    s, U, S, V = factors(64, 64, 4, 8, 8, dtype=torch.float32)
    x = torch.randn(32, 64)
    biggest = []
    real_bmm = torch.bmm

    def spy(a, b):
        out = real_bmm(a, b)
        biggest.append(max(a.numel(), b.numel(), out.numel()))
        return out

    monkeypatch.setattr(torch, "bmm", spy)
    blast_matmul_reference(x, U, S, V)
    assert max(biggest) < 8 * 8 * 32 * 4


def test_errors_name_the_problem():
    s, U, S, V = factors(12, 10, 3, 3, 2, dtype=torch.float32)
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="one dtype"):
        blast_matmul(x.double(), U, S, V)
    with pytest.raises(ValueError, match="features"):
        blast_matmul(torch.randn(4, 3), U, S, V)
    with pytest.raises(ValueError, match="disagree"):
        blast_matmul(x, U, S[:, :1], V)
    with pytest.raises(ValueError, match="bias"):
        blast_matmul(x, U, S, V, torch.randn(5))
    with pytest.raises(ValueError, match="out_features"):
        blast_matmul(x, U, S, V, None, 3)


# Shapes for the second-order tests: bias or not, padded rows and columns (m, n not multiples of the
# block sizes), b_out != b_in, and the one-block case.
SECOND_ORDER = [(12, 10, 3, 3, 2, True), (13, 11, 4, 3, 4, False), (10, 7, 3, 4, 2, True), (5, 6, 2, 1, 1, False)]


def _args(m, n, r, b_out, b_in, bias, lead=(2, 3)):
    s, U, S, V = factors(m, n, r, b_out, b_in, requires_grad=True)
    x = torch.randn(*lead, n, dtype=torch.float64, requires_grad=True)
    b = torch.randn(m, dtype=torch.float64, requires_grad=True) if bias else None
    return [t for t in (x, U, S, V, b) if t is not None]


@pytest.mark.parametrize("m,n,r,b_out,b_in,bias", SECOND_ORDER)
def test_gradgradcheck(m, n, r, b_out, b_in, bias):
    """Double backward through the op (its backward's middle, blast_grad_mix, has its own formula)."""
    args = _args(m, n, r, b_out, b_in, bias)
    fn = lambda *a: blast_matmul(*a[:4], a[4] if bias else None, m)        # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("b_out,b_in,T,r", [(3, 2, 5, 4), (1, 4, 3, 2), (2, 2, 1, 3)])
def test_grad_mix_op_gradcheck_gradgradcheck_and_opcheck(b_out, b_in, T, r):
    z = torch.randn(b_in, T, r, dtype=torch.float64, requires_grad=True)
    gw = torch.randn(b_out, T, r, dtype=torch.float64, requires_grad=True)
    S = torch.randn(b_out, b_in, r, dtype=torch.float64, requires_grad=True)
    op = torch.ops.blastfx.blast_grad_mix
    assert torch.autograd.gradcheck(op, (z, gw, S))
    assert torch.autograd.gradgradcheck(op, (z, gw, S))
    torch.library.opcheck(op.default, (z, gw, S, None))
    torch.library.opcheck(op.default, (z.float(), gw.float(), S.float(), "reference"))


def test_grad_mix_backward_with_one_output_used():
    """Gradients of only w (gz, dS unused) equal autograd through the plain reference."""
    from blastfx.structures.blast.ops import grad_mix_reference
    z, gw, S = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((2, 5, 3), (3, 5, 3), (3, 2, 3)))
    g = torch.randn(3, 5, 3, dtype=torch.float64)
    got = torch.autograd.grad(torch.ops.blastfx.blast_grad_mix(z, gw, S)[0], (z, S), g)
    ref = torch.autograd.grad(grad_mix_reference(z, gw, S)[0], (z, S), g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def _dense_oracle(U, S, V, m, n):
    """The BLAST matrix from one einsum: block (i, j) = U_i diag(S_ij) V_j^T. Functional (torch.func)."""
    b_out, p, _ = U.shape
    b_in, q, _ = V.shape
    return torch.einsum("ipr,ijr,jqr->ipjq", U, S, V).reshape(b_out * p, b_in * q)[:m, :n]


@pytest.mark.parametrize("m,n,r,b_out,b_in,bias", SECOND_ORDER[:3])
def test_hessian_vector_product_matches_dense(m, n, r, b_out, b_in, bias):
    """H v of a nonlinear loss through the op (reverse over reverse) equals forward-over-reverse
    (torch.func) of the same loss written with the dense matrix x @ A^T."""
    args = _args(m, n, r, b_out, b_in, bias, lead=(4,))
    c = torch.randn(4, m, dtype=torch.float64)
    vs = [torch.randn_like(a) for a in args]

    def loss_blast(*a):
        return (blast_matmul(*a[:4], a[4] if bias else None, m).sin() * c).sum()

    def loss_dense(*a):
        y = a[0] @ _dense_oracle(*a[1:4], m, n).T + (a[4] if bias else 0)
        return (y.sin() * c).sum()

    grads = torch.autograd.grad(loss_blast(*args), args, create_graph=True)
    hvp = torch.autograd.grad(grads, args, vs)
    primals = tuple(a.detach() for a in args)
    _, ref = torch.func.jvp(torch.func.grad(loss_dense, argnums=tuple(range(len(args)))), primals, tuple(vs))
    for h, e in zip(hvp, ref):
        assert h.abs().max() > 0
        torch.testing.assert_close(h, e, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_slow_cpu_gemm_dtypes_take_their_products_in_fp32(dtype, monkeypatch):
    """Where the CPU has no oneDNN GEMM for bf16 / fp16, the reference takes each product in fp32 and rounds it
    back: the values of the dtype's own bmm (which accumulates in fp32 too), forward and backward, up to
    summation order."""
    from blastfx import cpu_products
    from blastfx.structures.blast import ops

    s, U, S, V = factors(48, 40, 8, 4, 2, dtype=torch.float32)
    leaves = [t.to(dtype).requires_grad_() for t in (torch.randn(3, 7, 40), U, S, V)]

    def run(fast_dtypes):
        monkeypatch.setattr(cpu_products, "_ONEDNN_GEMM_DTYPES", frozenset(fast_dtypes))
        assert ops.gemm_in_fp32(leaves[0]) == (dtype not in fast_dtypes)
        y = torch.ops.blastfx.blast_matmul(*leaves, None, None)
        grads = torch.autograd.grad(y.float().square().sum(), leaves)
        return y, grads

    y32, grads32 = run(())
    y, grads = run((dtype,))
    assert y32.dtype == dtype and all(g.dtype == dtype for g in grads32)
    for a, b in zip((y32, *grads32), (y, *grads)):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02 * b.float().abs().max().item())
    assert not ops.gemm_in_fp32(torch.ones(2, dtype=torch.float32))
