"""The S step's conjugate-gradient solve against the Cholesky solve it replaces (float64)."""
import pytest
import torch

from blastfx.structures.blast.factorize import blocks as blk
from blastfx.structures.blast.factorize.als import run_als, svd_init
from blastfx.structures.blast.factorize.weighted import damped_cholesky, run_weighted_als, whitened_svd_init
from conftest import spectrum_matrix


def spd_batch(batch, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, 3 * r, r, generator=g, dtype=torch.float64) * torch.logspace(0, -1, r, dtype=torch.float64)
    return X.mT @ X, torch.randn(batch, r, generator=g, dtype=torch.float64)


def quadratic(H, eps, d, x):
    return 0.5 * (x * (H @ x.unsqueeze(-1)).squeeze(-1)).sum(-1) + 0.5 * eps * x.pow(2).sum(-1) - (d * x).sum(-1)


def test_cg_reaches_the_exact_solve():
    H, d = spd_batch(5, 24)
    eps = 1e-3
    exact = torch.linalg.solve(H + eps * torch.eye(24, dtype=H.dtype), d)
    x = blk.damped_cg_vec(H, d, eps, torch.zeros_like(d), steps=60)
    torch.testing.assert_close(x, exact, rtol=1e-8, atol=1e-10)


def test_every_cg_step_lowers_the_quadratic_and_a_solution_stays_put():
    H, d = spd_batch(4, 32, seed=1)
    eps, x0 = 1e-2, torch.randn(4, 32, dtype=torch.float64)
    values = [quadratic(H, eps, d, blk.damped_cg_vec(H, d, eps, x0, steps)) for steps in range(8)]
    for before, after in zip(values, values[1:]):
        assert (after <= before + 1e-12).all()
    assert (values[-1] < values[0]).all()
    exact = torch.linalg.solve(H + eps * torch.eye(32, dtype=H.dtype), d)
    torch.testing.assert_close(blk.damped_cg_vec(H, d, eps, exact, 5), exact, rtol=1e-10, atol=1e-12)


def test_s_solve_is_the_proximal_step_either_way():
    H, d = spd_batch(3, 16, seed=2)
    eps, x0 = torch.full((3,), 1e-2, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    exact = torch.linalg.solve(H + 1e-2 * torch.eye(16, dtype=H.dtype), d + 1e-2 * x0)
    torch.testing.assert_close(blk.s_solve(H, d, eps, x0, None), exact, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(blk.s_solve(H, d, eps, x0, 40), exact, rtol=1e-7, atol=1e-9)


def test_als_with_cg_s_step_follows_the_exact_trajectory():
    A = torch.stack([spectrum_matrix(96, 64, 0.6, seed=s, dtype=torch.float64) for s in range(2)])
    A = A / A.std()
    start = svd_init(A, 4, 2, 12)
    *_, exact = run_als(A, *start, iters=15, tol=0, s_steps=None)
    *_, cg = run_als(A, *start, iters=15, tol=0)
    assert cg.shape == exact.shape
    torch.testing.assert_close(cg, exact, rtol=1e-7, atol=0)
    assert (cg[1:] <= cg[:-1] * (1 + 1e-9)).all()            # f never increases


@pytest.mark.parametrize("blocks", [(4, 4), (2, 4)])
def test_weighted_als_with_cg_s_step_follows_the_exact_trajectory(blocks):
    A = spectrum_matrix(64, 96, 0.6, seed=3, dtype=torch.float64)[None]
    A = A / A.std()
    g = torch.Generator().manual_seed(4)
    X = torch.randn(400, 96, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, 96, dtype=torch.float64)
    L = damped_cholesky((X.T @ X)[None] / 400, 1e-3)
    C = L @ L.mT
    start = whitened_svd_init(A, L, *blocks, 16)
    *_, exact = run_weighted_als(A, C, *start, iters=12, tol=0, s_steps=None)
    *_, cg = run_weighted_als(A, C, *start, iters=12, tol=0)
    torch.testing.assert_close(cg, exact, rtol=1e-7, atol=0)
    assert (cg[1:] <= cg[:-1] * (1 + 1e-9)).all()
