"""Quantizing inside the calibrated fit against rounding at the end, on the float64 output error."""
import pytest
import torch

import blastfx
from blastfx.structures.blast.quant import quantize_fitted, round_factors


def _problem(m=64, n=48, r=12, blocks=(4, 4), noise=1e-3, seed=0):
    """A weight close to a BLAST matrix of rank r and strongly correlated inputs (a 6-dim latent plus
    a little noise): rounding errors along the inputs' few directions are what the output sees."""
    g = torch.Generator().manual_seed(seed)
    W = blastfx.factorize(torch.randn(m, n, generator=g, dtype=torch.float64), r, blocks).to_dense()
    W = W + noise * torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(2000, 6, generator=g, dtype=torch.float64) @ torch.randn(6, n, generator=g, dtype=torch.float64)
    X = X + 0.05 * torch.randn(2000, n, generator=g, dtype=torch.float64)
    return W, X, X.T @ X


def _output_error(W, What, X, weights=None):
    E = (W - What) @ X.T
    Y = W @ X.T
    if weights is not None:
        E, Y = E * weights.sqrt()[:, None], Y * weights.sqrt()[:, None]
    return (E.norm() / Y.norm()).item()


@pytest.mark.parametrize("name", ["int8", "float8_e4m3fn", "int4"])
def test_refit_beats_rounding_at_the_end_on_correlated_inputs(name):
    W, X, C = _problem()
    fitted = blastfx.factorize(W, 12, (4, 4), calibration=C)
    base = _output_error(W, fitted.to_dense(), X)
    rounded = _output_error(W, round_factors(fitted, name).to_dense(torch.float64), X)
    refit = _output_error(W, quantize_fitted(W, fitted, name, calibration=C).to_dense(torch.float64), X)
    # the error quantization adds (in quadrature over the float fit's): well below what rounding adds
    added = lambda e: max(e ** 2 - base ** 2, 0.0) ** 0.5        # noqa: E731
    assert refit < rounded
    assert added(refit) < 0.7 * added(rounded), (base, rounded, refit)


@pytest.mark.parametrize("name", ["int8", "float8_e4m3fn", "int4"])
def test_refit_with_output_weights_and_batch(name):
    W, X, C = _problem(seed=1)
    W2, _, _ = _problem(seed=2)
    Ws = torch.stack([W, W2])
    fisher = torch.rand(2, 64, dtype=torch.float64) + 0.1
    fitted = blastfx.factorize(Ws, 12, (4, 4), calibration=C, output_weights=fisher)
    q = quantize_fitted(Ws, fitted, name, calibration=C, output_weights=fisher)
    r = round_factors(fitted, name)
    for k in range(2):
        assert _output_error(Ws[k], q[k].to_dense(torch.float64), X, fisher[k]) < \
            _output_error(Ws[k], r[k].to_dense(torch.float64), X, fisher[k])
        one = quantize_fitted(Ws[k], fitted[k], name, calibration=C, output_weights=fisher[k])   # batch = one by one
        torch.testing.assert_close(one.to_dense(torch.float64), q[k].to_dense(torch.float64), rtol=1e-9, atol=1e-9)


def _objective(W, q, C, weights=None):
    """The rounding's objective tr(D (W - What) C (W - What)^T), in float64."""
    E = W - q.to_dense(torch.float64)
    d = torch.ones(W.shape[0], dtype=W.dtype) if weights is None else weights
    return ((E @ C) * E * d[:, None]).sum().item()


def test_more_rounds_never_raise_the_objective_and_lower_it_at_int4():
    W, X, C = _problem(seed=4, noise=3e-2)
    fisher = torch.rand(64, dtype=torch.float64) + 0.1
    fitted = blastfx.factorize(W, 12, (4, 4), calibration=C, output_weights=fisher)
    Cd = C + 0.01 * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype)       # as the fit damps it
    errors = [_objective(W, quantize_fitted(W, fitted, "int4", calibration=C, output_weights=fisher, rounds=k), Cd,
                         fisher) for k in (1, 2, 3, 5)]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.95 * errors[0], errors


def test_weight_only_refit_beats_rounding_on_the_weight():
    W, _, _ = _problem(seed=3)
    fitted = blastfx.factorize(W, 12, (4, 4))
    q = quantize_fitted(W, fitted, "int8")
    r = round_factors(fitted, "int8")
    assert (W - q.to_dense(torch.float64)).norm() < (W - r.to_dense(torch.float64)).norm()
    assert quantize_fitted(W, fitted, "int8", refit_iters=0).to_dense().equal(r.to_dense())


def test_arguments_are_checked():
    W, _, C = _problem()
    fitted = blastfx.factorize(W, 12, (4, 4), calibration=C)
    with pytest.raises(ValueError, match="refit_iters must be an integer >= 0, got -1"):
        quantize_fitted(W, fitted, "int8", refit_iters=-1)
    with pytest.raises(ValueError, match="rounds must be an integer >= 1, got 0"):
        quantize_fitted(W, fitted, "int8", rounds=0)
    with pytest.raises(ValueError, match="factor_dtype must be one of"):
        quantize_fitted(W, fitted, "uint4")
    with pytest.raises(ValueError, match="does not match factors"):
        quantize_fitted(W[:, :40], fitted, "int8")


def test_the_rounds_score_the_objective_without_forming_the_error_matrix():
    """_Problem.error (from the Grams) equals tr(D (A - What) C (A - What)^T) - tr(D A C A^T), formed densely."""
    from blastfx.structures.blast.factorize import blocks as blk
    from blastfx.structures.blast.quant.fit import _Problem

    g = torch.Generator().manual_seed(5)
    B, b_out, b_in, p, q, r = 2, 3, 2, 5, 4, 3
    A = torch.randn(B, b_out * p, b_in * q, generator=g, dtype=torch.float64)
    X = torch.randn(B, 30, b_in * q, generator=g, dtype=torch.float64)
    C = X.mT @ X
    D = torch.rand(B, b_out * p, generator=g, dtype=torch.float64) + 0.1
    U = torch.randn(B, b_out, p, r, generator=g, dtype=torch.float64)
    S = torch.randn(B, b_out, b_in, r, generator=g, dtype=torch.float64)
    V = torch.randn(B, b_in, q, r, generator=g, dtype=torch.float64)
    problem = _Problem(A, C, D).with_v(V, b_out)
    E = A - blk.reconstruct(U, S, V)
    want = ((E @ C) * E * D.unsqueeze(-1)).sum((1, 2)) - ((A @ C) * A * D.unsqueeze(-1)).sum((1, 2))
    torch.testing.assert_close(problem.error(U, S), want, rtol=1e-10, atol=1e-8)


def test_v_step_is_the_exact_optimum_with_one_block_column_and_lowers_the_objective_with_more():
    from blastfx.structures.blast.quant.fit import _Problem

    g = torch.Generator().manual_seed(6)
    b_out, p, q, r = 3, 5, 7, 4
    A = torch.randn(1, b_out * p, q, generator=g, dtype=torch.float64)
    X = torch.randn(40, q, generator=g, dtype=torch.float64)
    C = (X.T @ X).unsqueeze(0)
    D = torch.rand(1, b_out * p, generator=g, dtype=torch.float64) + 0.1
    U = torch.randn(1, b_out, p, r, generator=g, dtype=torch.float64)
    S = torch.randn(1, b_out, 1, r, generator=g, dtype=torch.float64)
    V0 = torch.randn(1, 1, q, r, generator=g, dtype=torch.float64)
    V = _Problem(A, C, D).v_step(U, S, V0)
    # normal equations C V P = R: P = sum_i diag(s_i) U_i^T D_i U_i diag(s_i), R = sum_i (A_i C)^T D_i U_i diag(s_i)
    Ui, si, Di = U[0], S[0, :, 0], D[0].view(b_out, p, 1)
    P = sum(torch.diag(si[i]) @ (Ui[i] * Di[i]).T @ Ui[i] @ torch.diag(si[i]) for i in range(b_out))
    R = sum((A[0, i * p:(i + 1) * p] @ C[0]).T @ (Di[i] * Ui[i]) @ torch.diag(si[i]) for i in range(b_out))
    want = torch.linalg.solve(C[0], R) @ torch.linalg.inv(P)
    torch.testing.assert_close(V[0, 0], want, rtol=1e-2, atol=1e-3)       # a proximal step from V0
    at = _Problem(A, C, D).v_step(U, S, want.view(1, 1, q, r))              # the optimum is its fixed point
    torch.testing.assert_close(at[0, 0], want, rtol=1e-9, atol=1e-10)

    W, _, C2 = _problem(seed=7)                                  # 4 block-columns, correlated inputs
    fitted = blastfx.factorize(W, 12, (4, 4), calibration=C2)
    problem = _Problem(W.unsqueeze(0), (C2 / C2.diagonal().mean()).unsqueeze(0), torch.ones(1, 64, dtype=W.dtype))
    U, S, V = fitted.U.unsqueeze(0), fitted.S.unsqueeze(0), fitted.V.unsqueeze(0) * 1.3    # V moved off its fit
    before = problem.with_v(V, 4).error(U, S)
    after = problem.with_v(problem.v_step(U, S, V), 4).error(U, S)
    assert after < before


def test_non_finite_factors_are_named():
    W, _, C = _problem()
    fitted = blastfx.factorize(W, 12, (4, 4), calibration=C)
    fitted.U[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_fitted(W, fitted, "int4", calibration=C)
