"""benchmarks/group_speed.py: the factors it times are what the per-layer and grouped ops take, and
the grouped call it times computes the per-layer calls (float and quantized factors)."""
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import group_speed  # noqa: E402
from blastfx.structures.blast.layout import BlastShape  # noqa: E402


@pytest.mark.parametrize("factor_dtype", [None, "int8", "int4"])
def test_grouped_call_equals_the_per_layer_calls(factor_dtype):
    torch.manual_seed(0)
    shapes = [BlastShape.make(m, 64, 16, 4) for m in (64, 32, 32)]
    fac = group_speed._factors(shapes, factor_dtype, "cpu", torch.float32)
    assert len(fac) == 3 and all(len(f) == (3 if factor_dtype is None else 5) for f in fac)
    x = torch.randn(2, 64)
    call = group_speed.blastfx.blast_matmul if factor_dtype is None else group_speed.blast_matmul_quantized
    op = group_speed.blast_matmul_group if factor_dtype is None else group_speed.blast_matmul_quantized_group
    outs = [s.out_features for s in shapes]
    grouped = op(x, *[list(t) for t in zip(*fac)], [None] * 3, outs)
    torch.testing.assert_close(grouped, torch.cat([call(x, *f) for f in fac], dim=-1))


def test_the_three_forms_of_a_block_tail_agree():
    """Dense (the BLAST matrices' dense weights), the parts, and the one block-tail call compute the
    same thing, in float64."""
    from blastfx.structures.blast.ops import blast_matmul_reference
    torch.manual_seed(0)
    shapes = [BlastShape.make(m, n, 16, 4) for m, n in ((48, 48), (64, 48), (64, 48), (48, 64))]
    fac = [tuple(t.double() for t in f) for f in group_speed._factors(shapes, None, "cpu", torch.float32)]
    weights = [blast_matmul_reference(torch.eye(s.in_features, dtype=torch.float64), U, S, V, None, s.out_features).T
               for (U, S, V), s in zip(fac, shapes)]
    a, residual, w = torch.randn(2, 48).double(), torch.randn(2, 48).double(), 1 + 0.1 * torch.randn(48).double()
    want = group_speed.dense_tail(a, residual, weights, w)
    layers = [(*f, None, s) for f, s in zip(fac, shapes)]
    torch.testing.assert_close(group_speed.tail_in_parts(a, residual, layers, w), want)
    torch.testing.assert_close(group_speed.tail_in_one_call(a, residual, layers, w), want)


def test_the_three_forms_of_a_block_seam_agree():
    from blastfx.structures.blast.ops import blast_matmul_reference
    torch.manual_seed(0)
    dims = ((48, 48), (64, 48), (64, 48), (48, 64), (48, 48), (16, 48), (16, 48))
    shapes = [BlastShape.make(m, n, 16 if m >= 32 else 8, 4 if m >= 32 else 2) for m, n in dims]
    fac = [tuple(t.double() for t in f) for f in group_speed._factors(shapes, None, "cpu", torch.float32)]
    weights = [blast_matmul_reference(torch.eye(s.in_features, dtype=torch.float64), U, S, V, None, s.out_features).T
               for (U, S, V), s in zip(fac, shapes)]
    a, residual = torch.randn(2, 48).double(), torch.randn(2, 48).double()
    w, w2 = (1 + 0.1 * torch.randn(48).double() for _ in range(2))
    dense = group_speed.dense_seam(a, residual, weights, w, w2)
    assert [t.shape[-1] for t in dense] == [48, 48, 16, 16]        # h2, then q/k/v as separate tensors
    want = torch.cat(dense, dim=-1)
    layers = [(*f, None, s) for f, s in zip(fac, shapes)]
    torch.testing.assert_close(group_speed.seam_in_parts(a, residual, layers, w, w2), want)
    torch.testing.assert_close(group_speed.seam_in_one_call(a, residual, layers, w, w2), want)
