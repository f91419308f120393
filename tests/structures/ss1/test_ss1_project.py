"""SS1 projections against float64 least-squares references over the slot parameters (tiny sizes),
and the calibration-aware projection's advantage on correlated inputs."""
import pytest
import torch

import blastfx  # noqa: F401
from blastfx.structures.ss1 import SS1Layout, build_ss1, project_calibrated, project_weight, ss1_to_dense
from blastfx.structures.ss1.project import damped
from ss1_oracles import tie_matrix

GEOMETRIES = [  # out, in, reduction, block_k, block_n; the second and fourth have unread slots
    (20, 64, 2, 16, 16), (10, 40, 2, 16, 16), (18, 70, 4, 16, 16), (12, 24, 1, 16, 16), (9, 130, 8, 16, 16),
]


def _lstsq(A, b):
    return torch.linalg.lstsq(A, b.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)   # minimum norm


def _correlated(n, d, seed=0, sample_seed=None):
    """n samples of d strongly correlated features (a random mixing of scaled Gaussians, nonzero mean);
    ``sample_seed`` draws fresh samples of the same distribution."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * (torch.rand(d, generator=g, dtype=torch.float64) * 3)
    if sample_seed is not None:
        g = torch.Generator().manual_seed(sample_seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 0.5


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_weight_only_is_the_frobenius_least_squares_optimum(geom):
    L = SS1Layout(*geom[:3], seed=4, block_k=geom[3], block_n=geom[4])
    W = torch.randn(L.out_features, L.in_features, dtype=torch.float64)
    theta = project_weight(W, L)
    want = _lstsq(tie_matrix(L), W.reshape(-1)).view(L.weight_shape)
    torch.testing.assert_close(theta, want, rtol=1e-10, atol=1e-10)
    # and it is strictly better than nearby points
    err = (ss1_to_dense(theta, L) - W).norm()
    for _ in range(3):
        assert (ss1_to_dense(theta + 1e-3 * torch.randn_like(theta), L) - W).norm() > err


def test_weight_only_slot_is_the_mean_of_its_tied_entries():
    L = SS1Layout(16, 64, 4, seed=1, block_k=16, block_n=16)
    W = torch.randn(16, 64, dtype=torch.float64)
    theta = project_weight(W, L)
    slots = L.slot_index()[0]
    for slot in range(L.shared_in_features):
        tied = (slots == slot).nonzero().flatten()
        torch.testing.assert_close(theta[3, slot], W[3, tied].mean())


def test_unread_slots_are_zero_and_reduction_one_is_exact():
    L = SS1Layout(10, 40, 2, block_k=16, block_n=16)              # group 1 = tile 2: 8 real columns of 16
    theta = project_weight(torch.randn(10, 40, dtype=torch.float64), L)
    assert int((theta[:, 16:] == 0).sum(1).min()) == 8
    L1 = SS1Layout(12, 24, 1, block_k=16, block_n=16)
    W = torch.randn(12, 24, dtype=torch.float64)
    torch.testing.assert_close(ss1_to_dense(project_weight(W, L1), L1), W, rtol=0, atol=0)


def _calibrated_reference(W, L, C, damping, row_weights=None):
    """argmin_theta sum_n f_n (w_n - A_n theta_n)^T Cd (w_n - A_n theta_n) by one float64 lstsq over all
    slots: rows of sqrt(f_n) L^T (w_n - A_n theta_n) with Cd = L L^T."""
    Cd = damped(C, damping)
    Lc = torch.linalg.cholesky(Cd)
    A = tie_matrix(L).view(L.out_features, L.in_features, -1)
    f = torch.ones(L.out_features, dtype=torch.float64) if row_weights is None else row_weights.double()
    big = torch.cat([f[n].sqrt() * Lc.T @ A[n] for n in range(L.out_features)])
    rhs = torch.cat([f[n].sqrt() * Lc.T @ W[n] for n in range(L.out_features)])
    return _lstsq(big, rhs).view(L.weight_shape)


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("damping", [0.0, 0.01, 1.0])
def test_calibrated_is_the_whitened_least_squares_optimum(geom, damping):
    L = SS1Layout(*geom[:3], seed=7, block_k=geom[3], block_n=geom[4])
    W = torch.randn(L.out_features, L.in_features, dtype=torch.float64)
    X = _correlated(4 * L.in_features, L.in_features)
    C = X.T @ X / X.shape[0]
    theta = project_calibrated(W, L, C, damping)
    want = _calibrated_reference(W, L, C, damping)
    torch.testing.assert_close(theta, want, rtol=1e-7, atol=1e-7)


def test_identity_covariance_gives_the_weight_only_projection():
    L = SS1Layout(18, 70, 4, seed=2, block_k=16, block_n=16)
    W = torch.randn(18, 70, dtype=torch.float64)
    torch.testing.assert_close(project_calibrated(W, L, torch.eye(70), damping=0.3), project_weight(W, L))


def test_row_weights_do_not_move_the_optimum():
    """Rows never share slots, so any positive per-output weighting has the unweighted optimum."""
    L = SS1Layout(20, 64, 2, seed=3, block_k=16, block_n=16)
    W = torch.randn(20, 64, dtype=torch.float64)
    X = _correlated(300, 64, seed=1)
    C = X.T @ X / 300
    f = torch.rand(20, dtype=torch.float64) * 10 + 0.01
    weighted = _calibrated_reference(W, L, C, 0.01, row_weights=f)
    torch.testing.assert_close(project_calibrated(W, L, C, 0.01, output_weights=f), weighted, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(project_calibrated(W, L, C, 0.01), weighted, rtol=1e-7, atol=1e-7)


def test_calibrated_beats_weight_only_on_correlated_inputs():
    L = SS1Layout(64, 128, 4, seed=5, block_k=16, block_n=16)
    g = torch.Generator().manual_seed(3)
    W = torch.randn(64, 128, generator=g, dtype=torch.float64)
    calib, held_out = _correlated(2000, 128, seed=10), _correlated(2000, 128, seed=10, sample_seed=11)
    C = calib.T @ calib / calib.shape[0]
    dense_out = held_out @ W.T
    err_w = (held_out @ ss1_to_dense(project_weight(W, L), L).T - dense_out).norm()
    err_c = (held_out @ ss1_to_dense(project_calibrated(W, L, C, 0.01), L).T - dense_out).norm()
    err_cal_c = (calib @ ss1_to_dense(project_calibrated(W, L, C, 0.0), L).T - calib @ W.T).norm()
    err_cal_w = (calib @ ss1_to_dense(project_weight(W, L), L).T - calib @ W.T).norm()
    assert err_cal_c < err_cal_w                    # on the calibration data it is optimal
    assert err_c < 0.9 * err_w                      # and it carries over to fresh inputs


def test_singular_covariance_without_damping_is_a_clear_error():
    L = SS1Layout(20, 64, 2, block_k=16, block_n=16)
    with pytest.raises(ValueError, match="singular for output tile 0 .*damping=0.0"):
        project_calibrated(torch.randn(20, 64), L, torch.zeros(64, 64), damping=0.0)
    # rank-deficient but damped: fine, and finite
    X = torch.randn(10, 64, dtype=torch.float64)
    assert bool(torch.isfinite(project_calibrated(torch.randn(20, 64), L, X.T @ X, damping=0.01)).all())


@pytest.mark.parametrize("cov,damping,match", [
    (torch.randn(64, 64), 0.01, "covariance must be symmetric"),
    (torch.ones(63, 63), 0.01, r"covariance has shape \(63, 63\), expected \(64, 64\)"),
    (torch.full((64, 64), float("nan")), 0.01, "covariance has non-finite entries"),
    (-torch.eye(64), 0.01, "negative diagonal"),
    (torch.eye(64), -0.1, "damping must be a finite number >= 0, got -0.1"),
    (torch.eye(64), float("inf"), "damping must be a finite number >= 0"),
    (torch.eye(64), True, "damping must be a finite number >= 0, got True"),
])
def test_calibrated_argument_errors(cov, damping, match):
    L = SS1Layout(20, 64, 2, block_k=16, block_n=16)
    with pytest.raises(ValueError, match=match):
        project_calibrated(torch.randn(20, 64), L, cov, damping)


def test_weight_shape_errors():
    L = SS1Layout(20, 64, 2, block_k=16, block_n=16)
    with pytest.raises(ValueError, match=r"weight has shape \(20, 60\), expected \(20, 64\)"):
        project_weight(torch.randn(20, 60), L)
    with pytest.raises(ValueError, match=r"output_weights must be a tensor of shape \(20,\)"):
        project_calibrated(torch.randn(20, 64), L, torch.eye(64), output_weights=torch.ones(3))


def test_dtypes_follow_the_weight():
    L = SS1Layout(20, 64, 2, block_k=16, block_n=16)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        W = torch.randn(20, 64).to(dt)
        assert project_weight(W, L).dtype == dt
        assert project_calibrated(W, L, torch.eye(64)).dtype == dt


def test_build_ss1_with_covariance_is_the_calibrated_projection():
    W, b = torch.randn(37, 100), torch.randn(37)
    X = _correlated(400, 100, seed=4)
    C = (X.T @ X / 400).float()
    f = torch.rand(37)
    layer = build_ss1(W, b, 4, covariance=C, output_weights=f, damping=0.02, seed=9, block_k=16, block_n=16)
    want = project_calibrated(W, layer.layout, C, 0.02)
    assert torch.equal(layer.weight.detach(), want) and torch.equal(layer.bias.detach(), b)
