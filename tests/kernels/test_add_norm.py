"""blastfx.kernels.add_norm: the residual add and RMSNorm in one launch against its reference (and
float64), under the interpreter on CPU and compiled on CUDA."""
import pytest
import torch

from blastfx.kernels.add_norm import MAX_FEATURES, add_rms_norm, add_rms_norm_reference, add_rms_norm_triton

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# bf16 under the interpreter: its casts round toward zero (the GPU's to nearest), three roundings deep
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2 if CUDA else 3e-2, torch.float16: 2e-3}


def _rows(T, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = (3 * torch.randn(T, H, generator=g) for _ in range(2))
    w = 1 + 0.2 * torch.randn(H, generator=g)
    return [t.to(DEVICE, dtype) for t in (a, b, w)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, H", [(1, 48), (3, 100), (5, 257), (2, 1024)])
def test_kernel_matches_the_reference_and_float64(T, H, dtype):
    a, b, w = _rows(T, H, dtype)
    h, n = add_rms_norm_triton(a, b, w, 1e-6, interpret=not CUDA)
    h_ref, n_ref = add_rms_norm_reference(a, b, w, 1e-6)
    if dtype == torch.bfloat16 and not CUDA:    # the interpreter casts to bf16 toward zero, the GPU to nearest
        torch.testing.assert_close(h, h_ref, rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(h, h_ref)                          # the add rounds as PyTorch's does
    torch.testing.assert_close(n, n_ref, rtol=TOL[dtype], atol=TOL[dtype])
    h64 = h_ref.double()                                      # and the norm is the norm of the rounded h
    want = w.double() * h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(n.double(), want, rtol=2 * TOL[dtype], atol=2 * TOL[dtype])


def test_h_lands_in_a_column_slice_of_a_wider_output_and_nothing_else_is_written():
    """The op's parts write h into the output's first columns; the other columns keep what they held."""
    a, b, w = _rows(3, 40, torch.float32)
    out = torch.full((3, 64), float("nan"), device=DEVICE)
    h, n = add_rms_norm_triton(a, b, w, 1e-5, h_out=out[:, :40], interpret=not CUDA)
    assert h.data_ptr() == out.data_ptr()
    assert torch.equal(out[:, :40], a + b) and torch.isnan(out[:, 40:]).all()
    torch.testing.assert_close(n, add_rms_norm_reference(a, b, w, 1e-5)[1])
    strided = torch.zeros(40, 3, device=DEVICE).t()          # rows not contiguous: written through a copy
    add_rms_norm_triton(a, b, w, 1e-5, h_out=strided, interpret=not CUDA)
    assert torch.equal(strided, a + b)


def test_inputs_with_strided_rows_and_no_tokens():
    wide_a, wide_b, w = _rows(4, 96, torch.float32)
    a, b, w = wide_a[:, :48], wide_b[:, 48:], w[:48]          # column slices: row stride 96
    h, n = add_rms_norm_triton(a, b, w, 1e-6, interpret=not CUDA)
    h_ref, n_ref = add_rms_norm_reference(a, b, w, 1e-6)
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(n, n_ref)
    h, n = add_rms_norm_triton(a[:0], b[:0], w, 1e-6, interpret=not CUDA)
    assert h.shape == n.shape == (0, 48)


def test_dispatch_follows_the_kernel_options_and_checks_its_arguments(monkeypatch):
    """The kernel runs where the op's Triton kernels do; kernels="reference", float64, a CPU without
    the interpreter and over-wide rows take the reference (bit for bit)."""
    import blastfx
    from blastfx.kernels import add_norm

    a, b, w = (t.cpu() for t in _rows(2, 32, torch.float32))
    launches = []
    real = add_norm._add_rms_norm_kernel
    monkeypatch.setattr(add_norm, "_add_rms_norm_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: (launches.append(grid), real[grid])[1]})())
    monkeypatch.setattr(add_norm, "INTERPRET", True)
    out = torch.empty(2, 40)
    h, n = add_rms_norm(a, b, w, 1e-6, h_out=out[:, :32])
    assert launches == [(2,)] and h.data_ptr() == out.data_ptr()
    h_ref, n_ref = add_rms_norm_reference(a, b, w, 1e-6)
    torch.testing.assert_close(n, n_ref)
    with blastfx.kernels.options(kernels="reference"):
        h2, n2 = add_rms_norm(a, b, w, 1e-6)
    assert len(launches) == 1 and torch.equal(h2, h_ref) and torch.equal(n2, n_ref)
    _, n3 = add_rms_norm(a.double(), b.double(), w.double(), 1e-6)
    assert len(launches) == 1 and torch.equal(n3, add_rms_norm_reference(a.double(), b.double(), w.double(), 1e-6)[1])
    monkeypatch.setattr(add_norm, "INTERPRET", False)             # a CPU without the interpreter
    h4, n4 = add_rms_norm(a, b, w, 1e-6)
    assert len(launches) == 1 and torch.equal(n4, n_ref)
    with pytest.raises(ValueError, match="one shape"):
        add_rms_norm(a, b[:, :16], w, 1e-6)
    with pytest.raises(ValueError, match=r"weight must be \(32,\)"):
        add_rms_norm(a, b, w[:16], 1e-6)
    with pytest.raises(ValueError, match=r"h_out must be \(2, 32\)"):
        add_rms_norm(a, b, w, 1e-6, h_out=out)
    with pytest.raises(ValueError, match="one device"):
        add_rms_norm(a, b, w.to("meta"), 1e-6)
    with pytest.raises(ValueError, match="takes torch.float16"):
        add_rms_norm_triton(a.double(), b.double(), w.double(), 1e-6, interpret=True)
    with pytest.raises(ValueError, match=f"at most {MAX_FEATURES} features"):
        add_rms_norm_triton(*(torch.empty(1, MAX_FEATURES + 1) for _ in range(2)), torch.empty(MAX_FEATURES + 1),
                            1e-6, interpret=True)
