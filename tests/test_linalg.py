"""blastfx.linalg: singular values and leading triplets through the float64 Gram, against float64 SVD."""
import pytest
import torch

from blastfx.linalg import singular_values, top_singular


def _matrix(shape, decay=0.5, seed=0):
    """Batched matrices with a power-law spectrum (sigma_k ~ k^-decay), like trained weights."""
    g = torch.Generator().manual_seed(seed)
    *batch, m, n = shape
    k = min(m, n)
    P = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64)).Q
    Q = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64)).Q
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -decay
    return (P * s) @ Q.mT


@pytest.mark.parametrize("shape", [(40, 90), (90, 40), (3, 33, 33), (2, 17, 50)])
def test_singular_values_match_float64_svd(shape):
    A = _matrix(shape)
    ref = torch.linalg.svdvals(A)
    got = singular_values(A.float())
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, k", [((40, 90), 12), ((90, 40), 40), ((3, 33, 33), 7), ((2, 17, 50), 17)])
def test_top_singular_is_the_best_rank_k_approximation(shape, k):
    A = _matrix(shape)
    P, s, Qh = top_singular(A.float(), k)
    assert P.shape == (*shape[:-1], k) and s.shape == (*shape[:-2], k) and Qh.shape == (*shape[:-2], k, shape[-1])
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    best = (U[..., :k] * S[..., None, :k]) @ Vh[..., :k, :]
    torch.testing.assert_close(((P * s.unsqueeze(-2)) @ Qh).double(), best, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.double(), S[..., :k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("wide", [True, False])
def test_rank_deficient_directions_come_back_as_zero_vectors(wide):
    A = _matrix((30, 50))
    low = A[:, :3] @ torch.randn(3, 50, dtype=torch.float64)        # rank 3
    low = low if wide else low.mT
    P, s, Qh = top_singular(low, 6)
    assert (s[3:] < 1e-6 * s[0]).all() and torch.isfinite(P).all() and torch.isfinite(Qh).all()
    larger_side = Qh[3:] if wide else P[:, 3:]
    assert (larger_side == 0).all()
    torch.testing.assert_close((P * s) @ Qh, low, rtol=1e-9, atol=1e-9)


def test_a_zero_matrix_has_zero_factors():
    P, s, Qh = top_singular(torch.zeros(4, 6), 2)
    assert (s == 0).all() and torch.isfinite(P).all() and (Qh == 0).all()


@pytest.mark.parametrize("k", [0, 31])
def test_k_out_of_range_is_refused(k):
    with pytest.raises(ValueError, match="k must be in 1..30"):
        top_singular(torch.randn(30, 50), k)


@pytest.mark.parametrize("device, capability, expected", [
    ("cpu", None, torch.float64),
    ("cuda", (9, 0), torch.float64),        # H100 / H200: full-rate float64
    ("cuda", (8, 0), torch.float64),        # A100
    ("cuda", (8, 9), torch.float32),        # consumer Ada: float64 at 1/64 rate
    ("cuda", (12, 0), torch.float32),
])
def test_gram_dtype_is_float64_only_where_it_runs_fast(device, capability, expected):
    from blastfx.linalg import gram_dtype
    assert gram_dtype(torch.device(device), capability) is expected
