"""Triton middle of the backward vs the float64 reference (CPU: the Triton interpreter), and the op's
gradients through it on CUDA."""
import pytest
import torch

from blastfx.structures.blast.ops import grad_mix_reference

backward = pytest.importorskip("blastfx.kernels.backward")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}


@pytest.mark.parametrize("b_out,b_in,T,R", [(4, 4, 40, 24), (3, 5, 17, 33), (1, 2, 5, 8), (16, 2, 9, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_mix_matches_reference(b_out, b_in, T, R, dtype):
    g = torch.Generator().manual_seed(b_out * 100 + b_in * 10 + T)
    z, gw, S = (torch.randn(*shape, generator=g, dtype=torch.float64)
                for shape in ((b_in, T, R), (b_out, T, R), (b_out, b_in, R)))
    refs = grad_mix_reference(z, gw, S)
    got = backward.grad_mix_triton(*(t.to(DEVICE, dtype) for t in (z, gw, S)))
    for name, out, ref in zip(("w", "gz", "dS"), got, refs):
        assert out.shape == ref.shape and out.dtype == dtype, name
        rel = ((out.double().cpu() - ref).norm() / ref.norm()).item()
        assert rel < TOL[dtype], (name, rel)


def test_grad_mix_reads_strided_inputs():
    """z and gw straight from strided views (as cuBLAS leaves them) give the same result."""
    z = torch.randn(8, 3, 12, dtype=torch.float64).transpose(0, 1)          # (3, 8, 12), non-contiguous
    gw = torch.randn(2, 8, 12, dtype=torch.float64)
    S = torch.randn(3, 2, 12, dtype=torch.float64).transpose(0, 1)          # (2, 3, 12), non-contiguous
    refs = grad_mix_reference(z, gw, S)
    got = backward.grad_mix_triton(*(t.to(DEVICE, torch.float32) for t in (z, gw, S)))
    for out, ref in zip(got, refs):
        torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)


def test_grad_mix_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not fit"):
        backward.grad_mix_triton(torch.zeros(2, 5, 8), torch.zeros(3, 5, 8), torch.zeros(3, 2, 4))


def test_grad_mix_of_an_empty_batch():
    w, gz, dS = backward.grad_mix_triton(torch.zeros(2, 0, 8), torch.zeros(3, 0, 8), torch.randn(3, 2, 8))
    assert w.shape == (3, 0, 8) and gz.shape == (2, 0, 8) and torch.equal(dS, torch.zeros(3, 2, 8))


def test_grad_mix_stream_splits_long_T():
    """The kernel's T-ranges (several tiles per program, ragged last range) add up exactly."""
    g = torch.Generator().manual_seed(7)
    z, gw, S = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((2, 77, 70), (4, 77, 70), (4, 2, 70)))
    refs = grad_mix_reference(z, gw, S)
    got = backward.grad_mix_triton(*(t.to(DEVICE, torch.float32) for t in (z, gw, S)))
    for out, ref in zip(got, refs):
        torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_op_gradients_through_the_triton_backward():
    import blastfx
    torch.manual_seed(0)
    layer = blastfx.BlastLinear(96, 80, 24, (4, 2), bias=True, device="cuda")
    torch.nn.init.normal_(layer.S)
    x = torch.randn(3, 37, 96, device="cuda", requires_grad=True)
    layer(x).pow(2).sum().backward()
    x64 = x.detach().double().cpu().requires_grad_()
    params = [p.detach().double().cpu().requires_grad_() for p in (layer.U, layer.S, layer.V, layer.bias)]
    blastfx.blast_matmul_reference(x64, *params, layer.out_features).pow(2).sum().backward()
    for got, ref in zip([x.grad] + [p.grad for p in (layer.U, layer.S, layer.V, layer.bias)],
                        [x64.grad] + [p.grad for p in params]):
        torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
def test_cuda_hessian_vector_product_through_the_triton_backward():
    """Double backward on CUDA: the first backward's middle is the Triton kernel (fp32, b_out * b_in <= 16),
    its gradient the plain-PyTorch formula of blast_grad_mix. H v against float64 on the CPU."""
    import blastfx
    from blastfx.kernels import dispatch
    torch.manual_seed(0)
    assert dispatch.grad_mix_impl(torch.float32, 4, 2) == "triton"
    params = [torch.randn(*s, dtype=torch.float64) for s in ((4, 20, 8), (4, 2, 8), (2, 24, 8), (80,))]   # U, S, V, bias
    x = torch.randn(37, 48, dtype=torch.float64)
    vs = [torch.randn_like(t) for t in [x] + params]

    def hvp(tensors, device, dtype):
        args = [t.to(device, dtype).requires_grad_() for t in tensors]
        loss = blastfx.blast_matmul(*args, 80).sin().sum()
        grads = torch.autograd.grad(loss, args, create_graph=True)
        return torch.autograd.grad(grads, args, [v.to(device, dtype) for v in vs])

    for got, ref in zip(hvp([x] + params, "cuda", torch.float32), hvp([x] + params, "cpu", torch.float64)):
        assert ((got.double().cpu() - ref).norm() / ref.norm()).item() < 1e-4
