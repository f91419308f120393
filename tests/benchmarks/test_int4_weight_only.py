"""benchmarks/common.py: the int4 weight-only baseline is torchao's scheme, computed by hand in float64."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import common  # noqa: E402


def bf16(x: float) -> float:
    return torch.tensor(x, dtype=torch.float64).to(torch.bfloat16).item()


def hand_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each row's columns cut into groups of ``group_size`` (the last one shorter), each group
    quantized on its own: float64, one value at a time."""
    w = weight.double()
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], group_size):
            group = w[r, start:start + group_size]
            lo, hi = group.min().item(), group.max().item()
            scale = bf16((hi - lo) / 15)
            zero = bf16(lo + 8 * scale)
            for c, value in enumerate(group.tolist()):
                q = min(max(round((value - (zero - 8 * scale)) / scale), 0), 15)
                out[r, start + c] = (q - 8) * scale + zero
    return out


def test_int4_matches_the_hand_computation_with_a_ragged_last_group():
    weight = torch.randn(5, 300)
    weight[:, 256:] = 10 * weight[:, 256:] + 50     # the short group (44 columns): its own range, zero outside it
    dequantized, stored = common.int4_rtn(weight, 128)
    assert dequantized.dtype == weight.dtype and dequantized.shape == weight.shape
    torch.testing.assert_close(dequantized.double(), hand_int4(weight, 128), rtol=1e-6, atol=1e-6)
    assert stored == 5 * 300 // 2 + 5 * 3 * 4          # codes half a byte each; bf16 scale and zero per group
    assert len(torch.unique(dequantized[0, :128])) <= 16


def test_int4_keeps_a_constant_group_and_rejects_bad_input():
    dequantized, _ = common.int4_rtn(torch.full((2, 128), 0.25), 128)
    assert torch.equal(dequantized, torch.full((2, 128), 0.25))
    with pytest.raises(ValueError, match="2-D"):
        common.int4_rtn(torch.randn(4), 128)
    with pytest.raises(ValueError, match="group_size"):
        common.int4_rtn(torch.randn(4, 4), 0)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 96, bias=True), nn.Linear(96, 64, bias=False)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(64, 40)


def test_int4_weight_only_quantizes_the_decoder_linears_and_counts_their_bytes():
    model = Decoder()
    head = model.head.weight.clone()
    stored = common.int4_weight_only_(model, group_size=32)
    assert torch.equal(model.head.weight, head)         # outside the repeated blocks: left as it was
    up = 96 * 64 // 2 + 4 * 96 * 2 + 2 * 96              # codes, scale and zero per group, bf16 bias
    down = 64 * 96 // 2 + 4 * 64 * 3
    assert stored == 2 * (up + down)
    for block in model.blocks:
        for layer in (block.up, block.down):
            groups = layer.weight.detach().reshape(-1, 32)          # one row's 32 columns each
            assert all(len(torch.unique(group)) <= 16 for group in groups)
