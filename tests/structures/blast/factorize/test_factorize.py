import pytest
import torch

from blastfx import factorize
from blastfx.structures.blast.factorize import METHODS
from conftest import spectrum_matrix


def svd_error(W, r):
    s = torch.linalg.svdvals(W.double())
    return (s[r:].pow(2).sum() / s.pow(2).sum()).sqrt().item()


@pytest.mark.parametrize("decay,b,r", [(0.5, 4, 48), (0.5, 2, 48), (1.0, 4, 64), (0.5, 8, 64)])
def test_beats_truncated_svd_at_equal_parameters(decay, b, r):
    m = n = 256
    W = spectrum_matrix(m, n, decay)
    f = factorize(W, r, b)
    r_svd = f.shape.num_params // (m + n)                     # SVD gets at least as many parameters
    assert r_svd * (m + n) <= f.shape.num_params < (r_svd + 1) * (m + n)
    assert f.rel_error.item() < svd_error(W, r_svd)


@pytest.mark.parametrize("decay", [0.5, 1.0, 2.0])
def test_never_worse_than_svd_at_same_rank(decay):
    W = spectrum_matrix(128, 96, decay)
    f = factorize(W, 16, (4, 3))
    assert f.rel_error.item() <= svd_error(W, 16) * (1 + 1e-4)


def test_reported_error_is_the_true_error_and_padding_works():
    W = spectrum_matrix(50, 37, 0.5, dtype=torch.float64)
    f = factorize(W, 8, (3, 4))                               # 50 = 3 x 17 - 1, 37 = 4 x 10 - 3
    assert f.U.dtype == torch.float64 and f.shape.padded
    true = ((f.to_dense() - W).norm() / W.norm()).item()
    assert f.rel_error.item() == pytest.approx(true, rel=1e-9)
    assert f.U.reshape(-1, 8)[50:].abs().max() == 0 and f.V.reshape(-1, 8)[37:].abs().max() == 0


def test_precgd_reference_converges_and_als_is_at_least_as_good():
    W = spectrum_matrix(96, 96, 0.5)
    ref = factorize(W, 16, 4, method="precgd", iters=60)
    assert ref.history[-1].item() < 0.7 * ref.history[0].item()   # starts at ~1 (tiny init)
    assert factorize(W, 16, 4).rel_error.item() <= ref.rel_error.item()


def test_exact_when_rank_covers_the_blocks():
    W = torch.randn(16, 16, dtype=torch.float64)
    f = factorize(W, 16, 4, iters=300, allow_larger=True)     # r = p * q: every 4x4 block is reachable
    assert f.rel_error.item() < 1e-6


def test_target_error_stops_early():
    W = spectrum_matrix(128, 128, 0.5)
    f = factorize(W, 32, 4, target_error=0.5)
    assert f.rel_error.item() <= 0.5 and f.iterations < 5


def test_batched_equals_one_by_one():
    Ws = [spectrum_matrix(64, 48, 0.7, seed=s) for s in range(3)]
    fb = factorize(Ws, 8, 2, iters=15, tol=0)
    assert fb.U.shape == (3, 2, 32, 8) and len(fb) == 3
    for k, W in enumerate(Ws):
        fk = factorize(W, 8, 2, iters=15, tol=0)
        assert fb[k].rel_error.item() == pytest.approx(fk.rel_error.item(), rel=1e-3)


def lowrank_matrix(m, n, k):
    return torch.randn(m, k, dtype=torch.float64) @ torch.randn(k, n, dtype=torch.float64)


def test_special_structures_are_exact_on_their_own_class():
    W = lowrank_matrix(24, 20, 3)
    f = factorize(W, 3, (3, 2), method="lowrank")
    assert f.rel_error.item() < 1e-10 and torch.all(f.S == f.S[0, 0, 0])   # one shared s (all equal)

    D = torch.block_diag(*[torch.randn(6, 5, dtype=torch.float64) for _ in range(4)])
    f = factorize(D, 5, 4, method="block_diagonal", allow_larger=True)
    assert f.rel_error.item() < 1e-10
    assert f.S[0, 1].abs().max() == 0 and f.S[0, 0].abs().min() > 0

    blocks = [[lowrank_matrix(8, 6, 2) for _ in range(3)] for _ in range(2)]
    W = torch.cat([torch.cat(row, 1) for row in blocks], 0)   # (16, 18), every block rank 2
    f = factorize(W, 6, (2, 3), method="block_low_rank")       # slots = 3, k = 2
    assert f.rel_error.item() < 1e-10


def test_structure_errors():
    with pytest.raises(ValueError, match="square"):
        factorize(torch.randn(8, 8), 2, (2, 4), method="block_diagonal")
    with pytest.raises(ValueError, match="divisible"):
        factorize(torch.randn(8, 8), 3, 2, method="block_low_rank")


@pytest.mark.parametrize("W,kwargs,match", [
    (torch.full((8, 8), float("nan")), {}, "NaN"),
    (torch.randn(8, 8), dict(rank=0), "rank"),
    (torch.randn(8, 8), dict(blocks=(0, 1)), "b_out"),
    (torch.randn(8, 8), dict(rank=7), "more than the dense"),
    (torch.randn(8, 8), dict(method="magic"), "method"),
    (torch.randn(8, 8, dtype=torch.float64).to(torch.int64), {}, "floating"),
    (torch.randn(2, 2, 2, 2), {}, r"\(m, n\)"),
    ([torch.randn(8, 8), torch.randn(4, 8)], {}, "one shape"),
])
def test_bad_input(W, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factorize(W, kwargs.pop("rank", 2), kwargs.pop("blocks", 2), **kwargs)


def test_methods_listed():
    assert {"als", "precgd", "lowrank", "block_diagonal", "block_low_rank"} <= set(METHODS)


def test_randomized_truncated_svd_close_to_exact():
    from blastfx.structures.blast.factorize.als import truncated_svd
    g = torch.Generator().manual_seed(3)
    for m, n in [(1024, 600), (600, 1024)]:
        A = spectrum_matrix(m, n, 0.5, seed=3)[None]
        P, s, Qh = truncated_svd(A, 96, generator=g)
        assert P.shape == (1, m, 96) and Qh.shape == (1, 96, n)
        exact = torch.linalg.svdvals(A)[0]
        best = exact[96:].pow(2).sum().sqrt() / exact.pow(2).sum().sqrt()
        err = (A - (P * s.unsqueeze(1)) @ Qh).norm() / A.norm()
        assert err < best * 1.02, (err, best)
        torch.testing.assert_close(P.transpose(1, 2) @ P, torch.eye(96)[None], atol=1e-4, rtol=0)
