"""An ALS fit whose solves fail, go non-finite or raise a matrix's error never returns worse than its
start: each matrix keeps its best iterate, a broken matrix is frozen there while the rest of the batch
goes on, and a failed solve ends the fit; for the weight-only and the calibrated ALS alike."""
import pytest
import torch

from blastfx.structures.blast.factorize import blocks as blk
from blastfx.structures.blast.factorize.als import run_als, svd_init
from blastfx.structures.blast.factorize.weighted import damped_cholesky, run_weighted_als, whitened_svd_init
from conftest import spectrum_matrix

B_IN = 2


def weighted_problem():
    A = torch.stack([spectrum_matrix(64, 96, 0.6, seed=s, dtype=torch.float64) for s in range(2)])
    A = A / A.std()
    g = torch.Generator().manual_seed(4)
    X = torch.randn(400, 96, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, 96, dtype=torch.float64)
    L = damped_cholesky((X.T @ X)[None].expand(2, -1, -1) / 400, 1e-3)
    C = L @ L.mT
    return A, C, whitened_svd_init(A, L, 4, B_IN, 16)


def weight_only_problem():
    A = torch.stack([spectrum_matrix(96, 64, 0.6, seed=s, dtype=torch.float64) for s in range(2)])
    A = A / A.std()
    return A, None, svd_init(A, 4, B_IN, 12)


def fit(kind, A, C, start, iters):
    if kind == "weighted":
        return run_weighted_als(A, C, *start, iters=iters, tol=0, window=100)
    return run_als(A, *start, iters=iters, tol=0, window=100)


def output_error(A, C, U, S, V):
    """||(A - Ahat) C^{1/2}||_F^2 (C = I for the weight-only fit), float64."""
    E = A - blk.reconstruct(U, S, V)
    return (E * (E if C is None else E @ C)).sum(dim=(1, 2))


# damped_solve_right calls per iteration: U once, then V once (weight-only) or once per block-column
CALLS = {"weighted": 1 + B_IN, "weight-only": 2}
PROBLEMS = {"weighted": weighted_problem, "weight-only": weight_only_problem}


def failing_solve(monkeypatch, fail_at: int, how: str):
    real, calls = blk.damped_solve_right, [0]

    def solve(G, R, eps):
        calls[0] += 1
        if calls[0] == fail_at:
            if how == "raise":
                raise torch.linalg.LinAlgError("The solver failed because the input matrix is singular.")
            return torch.full_like(R, float("nan"))
        return real(G, R, eps)
    monkeypatch.setattr(blk, "damped_solve_right", solve)


def relative(A, C, U, S, V):
    return (output_error(A, C, U, S, V) / (A * (A if C is None else A @ C)).sum(dim=(1, 2))).sqrt()


def failing_s_solve(monkeypatch, fail_from: int, how: str):
    """s_solve raising, or returning NaN, from its ``fail_from``-th call on."""
    real, calls = blk.s_solve, [0]

    def s_solve(*args):
        calls[0] += 1
        if calls[0] >= fail_from:
            if how == "raise":
                raise torch.linalg.LinAlgError("The solver failed because the input matrix is singular.")
            return real(*args).fill_(float("nan"))
        return real(*args)
    monkeypatch.setattr(blk, "s_solve", s_solve)


@pytest.mark.parametrize("how", ["raise", "nan"])
@pytest.mark.parametrize("kind", ["weighted", "weight-only"])
def test_a_failed_first_s_step_returns_the_start(monkeypatch, kind, how):
    A, C, start = PROBLEMS[kind]()
    failing_s_solve(monkeypatch, 1, how)
    warning = r"stopped after 0 iteration\(s\)" if how == "raise" else "the fit of 2 of 2 matrices broke down"
    with pytest.warns(RuntimeWarning, match=warning):
        U, S, V, history = fit(kind, A, C, start, iters=6)
    assert history.shape == (0, 2)
    torch.testing.assert_close(blk.reconstruct(U, S, V), blk.reconstruct(*start), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("how", ["raise", "nan"])
@pytest.mark.parametrize("kind", ["weighted", "weight-only"])
def test_a_failed_later_solve_keeps_the_best_iterate(monkeypatch, kind, how):
    A, C, start = PROBLEMS[kind]()
    before = output_error(A, C, *start)
    *_, clean = fit(kind, A, C, start, iters=6)
    failing_solve(monkeypatch, 2 * CALLS[kind] + 1, how)       # the U step of the third iteration
    warning = r"stopped after 3 iteration\(s\)" if how == "raise" else "the fit of 2 of 2 matrices broke down"
    with pytest.warns(RuntimeWarning, match=warning):
        U, S, V, history = fit(kind, A, C, start, iters=6)
    # the third S step was recorded before its U step failed: its iterate is the best and is returned
    assert history.shape == (3, 2)
    torch.testing.assert_close(history, clean[:3], rtol=0, atol=0)
    assert all(torch.isfinite(t).all() for t in (U, S, V))
    assert (output_error(A, C, U, S, V) < before).all()
    torch.testing.assert_close(relative(A, C, U, S, V), clean[2], rtol=1e-9, atol=0)


@pytest.mark.parametrize("kind", ["weighted", "weight-only"])
def test_a_non_finite_later_s_step_is_undone_too(monkeypatch, kind):
    A, C, start = PROBLEMS[kind]()
    *_, clean = fit(kind, A, C, start, iters=3)
    failing_s_solve(monkeypatch, (B_IN if kind == "weighted" else 1) + 1, "nan")   # the second iteration's
    with pytest.warns(RuntimeWarning, match="the fit of 2 of 2 matrices broke down"):
        U, S, V, history = fit(kind, A, C, start, iters=3)
    assert torch.equal(history, clean[:1].expand(2, -1))        # the best error stays the first step's
    assert all(torch.isfinite(t).all() for t in (U, S, V))
    torch.testing.assert_close(relative(A, C, U, S, V), clean[0], rtol=1e-9, atol=0)


@pytest.mark.parametrize("blowup", [1e6, float("nan")])
@pytest.mark.parametrize("kind", ["weighted", "weight-only"])
def test_one_matrix_breaking_down_leaves_the_others_fitting(monkeypatch, kind, blowup):
    """A step that leaves one matrix of the batch far worse (finite: its next error rises; or
    non-finite) freezes that matrix at its best iterate; the other matrix's fit runs to the end
    exactly as without the failure."""
    A, C, start = PROBLEMS[kind]()
    *_, clean = fit(kind, A, C, start, iters=8)
    real, calls = blk.damped_solve_right, [0]

    def solve(G, R, eps):
        calls[0] += 1
        X = real(G, R, eps)
        if calls[0] == 2 * CALLS[kind] + 1:                      # the third iteration's U step, matrix 0 only
            X[0] = X[0] * blowup
        return X
    monkeypatch.setattr(blk, "damped_solve_right", solve)
    with pytest.warns(RuntimeWarning, match="the fit of 1 of 2 matrices broke down"):
        U, S, V, history = fit(kind, A, C, start, iters=8)
    assert history.shape == (8, 2)
    torch.testing.assert_close(history[:, 1], clean[:, 1], rtol=1e-10, atol=0)
    torch.testing.assert_close(history[:, 0], torch.cat([clean[:3, 0], clean[2:3, 0].expand(5)]), rtol=0, atol=0)
    rel = relative(A, C, U, S, V)
    torch.testing.assert_close(rel[0], clean[2, 0], rtol=1e-9, atol=0)       # its best: the third S step's
    torch.testing.assert_close(rel[1], clean[-1, 1], rtol=1e-9, atol=0)
