"""Rounding one factor: searched scales and error feedback, against nearest rounding and known answers."""
import pytest
import torch

from blastfx.structures.blast.quant import formats
from blastfx.structures.blast.quant.rounding import (FEEDBACK_DAMPING, error_feedback_codes,
                                                     searched_scales)

NAMES = ["int8", "float8_e4m3fn", "int4"]


def _rounding_error(x, scale, fmt, dim, weight=None):
    s = scale.unsqueeze(dim)
    err = (x - s * fmt.nearest(x / s)).square()
    return (err if weight is None else err * weight).sum(dim)


@pytest.mark.parametrize("name", NAMES)
def test_searched_scales_never_lose_to_the_maximum_and_win_at_int4(name):
    fmt = formats.get(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g, dtype=torch.float64)          # Gaussian rows: the maximum is an outlier
    weight = torch.rand(1, 96, generator=g, dtype=torch.float64)
    amax = x.abs().amax(-1) / fmt.qmax
    searched = searched_scales(x, -1, fmt, weight)
    plain, best = _rounding_error(x, amax, fmt, -1, weight), _rounding_error(x, searched, fmt, -1, weight)
    assert (best <= plain).all()
    if name == "int4":
        assert best.sum() < 0.9 * plain.sum(), (best.sum(), plain.sum())
    # along the other dimension (one scale per column, as V's), and an all-zero slice keeps scale 1
    x[:, 3] = 0
    cols = searched_scales(x, -2, fmt)
    assert cols[3] == 1
    assert (_rounding_error(x, cols, fmt, -2) <= _rounding_error(x, x.abs().amax(-2).clamp_min(1e-300) / fmt.qmax,
                                                                 fmt, -2) + 1e-12).all()


@pytest.mark.parametrize("name", NAMES)
def test_error_feedback_on_a_diagonal_hessian_is_nearest_rounding(name):
    fmt = formats.get(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, 40, generator=g, dtype=torch.float64)
    scale = x.abs().amax(-1) / fmt.qmax
    H = torch.diag_embed(torch.rand(3, 40, generator=g, dtype=torch.float64) + 0.5)
    codes = error_feedback_codes(x, H, scale, fmt, block=7)
    assert torch.equal(codes, fmt.nearest(x / scale.unsqueeze(-1)))


def test_error_feedback_two_columns_known_answer():
    """Column 0 (the larger Hessian diagonal) is rounded first; its error moves onto column 1 by
    the optimal-brain-surgeon step -e0 * Hinv_01 / Hinv_00 = e0 * H_01 / H_11 (damped H)."""
    fmt = formats.get("int4")
    H = torch.tensor([[4.0, 1.5], [1.5, 1.0]], dtype=torch.float64)
    x = torch.tensor([[0.62, -0.33], [0.18, 0.91]], dtype=torch.float64)
    scale = torch.tensor([0.1, 0.13], dtype=torch.float64)
    Hd = H + FEEDBACK_DAMPING * H.diagonal().mean() * torch.eye(2, dtype=torch.float64)
    q0 = (x[:, 0] / scale).round().clamp(-7, 7)
    e0 = x[:, 0] - q0 * scale
    q1 = ((x[:, 1] + e0 * Hd[0, 1] / Hd[1, 1]) / scale).round().clamp(-7, 7)
    codes = error_feedback_codes(x, H, scale, fmt)
    torch.testing.assert_close(codes, torch.stack([q0, q1], -1), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_error_feedback_lowers_the_hessian_weighted_error(name):
    """On correlated inputs (a Hessian of a few strong directions), rounding with feedback leaves a
    smaller e H e^T than nearest rounding, over many rows; blocks of any width give the same codes."""
    fmt = formats.get(name)
    g = torch.Generator().manual_seed(2)
    n = 48
    Z = torch.randn(400, 4, generator=g, dtype=torch.float64) @ torch.randn(4, n, generator=g, dtype=torch.float64)
    Z = Z + 0.05 * torch.randn(400, n, generator=g, dtype=torch.float64)
    H = Z.T @ Z
    x = torch.randn(256, n, generator=g, dtype=torch.float64)
    scale = x.abs().amax(-1) / fmt.qmax
    codes = error_feedback_codes(x, H, scale, fmt)
    assert torch.equal(codes, error_feedback_codes(x, H, scale, fmt, block=5))

    def weighted(c):
        e = x - c * scale.unsqueeze(-1)
        return ((e @ H) * e).sum()

    assert weighted(codes) < 0.7 * weighted(fmt.nearest(x / scale.unsqueeze(-1)))
    assert codes.abs().max() <= fmt.qmax


def test_error_feedback_survives_a_singular_hessian():
    fmt = formats.get("int8")
    x = torch.randn(8, 12, dtype=torch.float64)
    scale = x.abs().amax(-1) / fmt.qmax
    v = torch.randn(12, 1, dtype=torch.float64)
    codes = error_feedback_codes(x, v @ v.T, scale, fmt)            # rank one: damped, then fine
    assert torch.isfinite(codes).all() and codes.abs().max() <= fmt.qmax
    zero = error_feedback_codes(x, torch.zeros(12, 12, dtype=torch.float64), scale, fmt)
    assert torch.equal(zero, fmt.nearest(x / scale.unsqueeze(-1)))


def test_searched_scales_in_chunks_equal_one_pass(monkeypatch):
    import blastfx.structures.blast.quant.rounding as rounding

    fmt = formats.get("int4")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 7, 9, generator=g)
    weight = torch.rand(5, 3, 1, 9, generator=g)
    whole = searched_scales(x, -1, fmt, weight), searched_scales(x, -2, fmt)
    monkeypatch.setattr(rounding, "SEARCH_CHUNK", 100)            # one leading slice at a time
    assert torch.equal(searched_scales(x, -1, fmt, weight), whole[0])
    assert torch.equal(searched_scales(x, -2, fmt), whole[1])
