"""An ALS iteration whose solves fail (or go non-finite) is undone: the fit returns its last good
iterate instead of raising, for the weight-only and the calibrated ALS alike."""
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


@pytest.mark.parametrize("how", ["raise", "nan"])
@pytest.mark.parametrize("kind", ["weighted", "weight-only"])
def test_a_failed_first_iteration_returns_the_start(monkeypatch, kind, how):
    A, C, start = PROBLEMS[kind]()
    before = output_error(A, C, *start)
    failing_solve(monkeypatch, 1, how)
    with pytest.warns(RuntimeWarning, match=r"stopped after 0 iteration\(s\)"):
        U, S, V, history = fit(kind, A, C, start, iters=6)
    assert history.shape == (0, 2)
    torch.testing.assert_close(output_error(A, C, U, S, V), before, rtol=1e-12, atol=0)


@pytest.mark.parametrize("how", ["raise", "nan"])
@pytest.mark.parametrize("kind", ["weighted", "weight-only"])
def test_a_failed_later_iteration_keeps_the_iterations_before_it(monkeypatch, kind, how):
    A, C, start = PROBLEMS[kind]()
    before = output_error(A, C, *start)
    *_, clean = fit(kind, A, C, start, iters=6)
    failing_solve(monkeypatch, 2 * CALLS[kind] + 1, how)       # the U step of the third iteration
    with pytest.warns(RuntimeWarning, match=r"stopped after 2 iteration\(s\)"):
        U, S, V, history = fit(kind, A, C, start, iters=6)
    assert history.shape == (2, 2)                             # the third iteration's entry dropped
    torch.testing.assert_close(history, clean[:2], rtol=0, atol=0)
    assert all(torch.isfinite(t).all() for t in (U, S, V))
    after = output_error(A, C, U, S, V)
    assert (after < before).all()
    # the iterate after two full iterations: below the second S step's error (its U and V steps
    # lowered it further) and above the third S step's (which starts from it and lowers it again)
    rel = (after / (A * (A if C is None else A @ C)).sum(dim=(1, 2))).sqrt()
    assert (rel <= clean[1] * (1 + 1e-12)).all() and (rel >= clean[2] * (1 - 1e-12)).all()


@pytest.mark.parametrize("kind", ["weighted", "weight-only"])
def test_a_non_finite_last_s_step_is_undone_too(monkeypatch, kind):
    """The loop stops right after the last iteration's S step; a non-finite S there is undone as well."""
    A, C, start = PROBLEMS[kind]()
    *_, clean = fit(kind, A, C, start, iters=2)
    real = blk.s_solve
    calls = [0]

    def s_solve(*args):
        calls[0] += 1
        out = real(*args)
        return out.fill_(float("nan")) if calls[0] > (B_IN if kind == "weighted" else 1) else out
    monkeypatch.setattr(blk, "s_solve", s_solve)
    with pytest.warns(RuntimeWarning, match=r"stopped after 1 iteration\(s\)"):
        U, S, V, history = fit(kind, A, C, start, iters=2)
    assert history.shape == (1, 2) and torch.equal(history, clean[:1])
    assert all(torch.isfinite(t).all() for t in (U, S, V))
    assert (output_error(A, C, U, S, V) < output_error(A, C, *start)).all()
