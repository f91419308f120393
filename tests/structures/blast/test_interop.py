import pytest
import torch

from blastfx import blast_to_dense
from blastfx.structures.blast.interop import from_original, to_original


def original_layer_forward(x, B, C, D):
    """The original BlastLinear.forward, re-derived from its documented shapes:
    B (b1, p, r), C (b2, r, q), D (b1, b2, r)."""
    b2, r, q = C.shape
    xb = x.view(-1, b2, q).transpose(0, 1)                   # (b2, T, q)
    y = torch.bmm(xb, C.transpose(1, 2))                     # (b2, T, r)
    z = (y.unsqueeze(0) * D.unsqueeze(2)).sum(1)             # (b1, T, r)
    out = torch.bmm(z, B.transpose(1, 2))                    # (b1, T, p)
    return out.transpose(0, 1).reshape(x.shape[0], -1)


@pytest.mark.parametrize("d_layout", ["layer", "factorization"])
def test_round_trip_and_same_matrix(d_layout):
    U, S, V = torch.randn(3, 4, 5), torch.randn(3, 2, 5), torch.randn(2, 6, 5)
    B, C, D = to_original(U, S, V, d_layout)
    assert B.shape == (3, 4, 5) and C.shape == (2, 5, 6)
    assert D.shape == ((3, 2, 5) if d_layout == "layer" else (5, 3, 2))
    U2, S2, V2 = from_original(B, C, D, d_layout)
    for a, b in zip((U, S, V), (U2, S2, V2)):
        assert torch.equal(a, b)
    x = torch.randn(7, 12)
    D_layer = D if d_layout == "layer" else D.permute(1, 2, 0)
    torch.testing.assert_close(original_layer_forward(x, B, C, D_layer), x @ blast_to_dense(U, S, V).T)


def test_errors():
    with pytest.raises(ValueError, match="d_layout"):
        to_original(torch.randn(2, 2, 1), torch.randn(2, 2, 1), torch.randn(2, 2, 1), "bogus")
    with pytest.raises(ValueError, match="padded"):
        to_original(torch.randn(2, 3, 1), torch.randn(2, 2, 1), torch.randn(2, 2, 1), out_features=5)
    with pytest.raises(ValueError, match="disagree"):
        from_original(torch.randn(2, 3, 4), torch.randn(2, 4, 3), torch.randn(2, 3, 4))
