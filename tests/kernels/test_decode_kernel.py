"""The one-launch decode kernel against the plain-PyTorch reference (``blastfx.structures.blast.ops``).

On CPU the kernel runs under the Triton interpreter in its two-launch form (stage 1, stage 2: the
interpreter runs programs one at a time, so a grid barrier cannot be waited on); on CUDA the
one-launch form with its grid barrier is checked as well, including CUDA-graph replay."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from blastfx.kernels import decode
from blastfx.structures.blast.layout import BlastShape

from decode_cases import CUDA, DEVICE, blocks_fit, check, factors


_factors = factors


def _check(*args, **kwargs):
    check(decode.blast_decode, *args, **kwargs)


@settings(max_examples=12 if not CUDA else 40, deadline=None)
@given(T=st.integers(1, 16), m=st.integers(17, 80), n=st.integers(17, 80), r=st.integers(1, 40),
       b_out=st.integers(1, 4), b_in=st.integers(1, 4), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_matches_reference_on_fuzzed_shapes(T, m, n, r, b_out, b_in, bias, dtype):
    """Ragged dims (padding in the last block), b_out != b_in, ranks not multiple of the tiles."""
    if not blocks_fit(m, n, b_out, b_in):
        return          # a block count that leaves a block all padding is refused by BlastShape
    _check(T, m, n, r, b_out, b_in, dtype, bias, cfg=dict(BR=16, BQ=16, BP=16, BK=16))


@pytest.mark.parametrize("q_tiles", [1, 3])
def test_split_over_q_chunks_sums_every_slot(q_tiles):
    """Small tiles force several q-chunks per block-column (slots): each must be mixed exactly once."""
    _check(3, 64, 96, 24, 2, 2, torch.float32, True, cfg=dict(BR=16, BQ=16, BP=16, BK=16, slots=2 * q_tiles))


def test_poisoned_workspace_and_output_are_fully_overwritten(monkeypatch):
    """Every element of y and of the z slots it reads is written before it is read."""
    empty = torch.empty

    def poisoned(*a, **k):
        t = empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    _check(5, 50, 70, 20, 3, 2, torch.float32, False, cfg=dict(BR=16, BQ=16, BP=16, BK=16))


def test_counters_are_zero_after_each_call():
    """The per-r-tile counters are reset by the program that mixes the tile: no memset per call."""
    for T in (1, 7):
        _check(T, 64, 96, 40, 2, 3, torch.float32, True, cfg=dict(BR=16, BQ=16, BP=16, BK=16, slots=6))
        assert all(int(c.abs().sum()) == 0 for c in decode._COUNTERS.values())


def test_plan_covers_q_and_fills_the_grid():
    shape = BlastShape.make(4096, 4096, 1022, 4)
    plan = decode.decode_plan(shape, 132, decode.DEFAULT)
    assert plan["Q_SPLIT"] * plan["Q_CHUNK"] >= shape.q > (plan["Q_SPLIT"] - 1) * plan["Q_CHUNK"]
    items = shape.b_in * plan["Q_SPLIT"] * plan["R_TILES"]
    assert items >= 132 * 0.9


def test_token_tiles_up_to_max_and_rejects_prefill_sizes():
    _check(decode.MAX_T, 40, 24, 8, 4, 3, torch.float32, True, cfg=dict(BR=16, BQ=16, BP=16, BK=16))
    shape, U, S, V, b = _factors(32, 32, 8, 2, 2, torch.float32)
    with pytest.raises(ValueError, match=f"at most {decode.MAX_T} tokens"):
        decode.blast_decode(torch.randn(decode.MAX_T + 1, 32, device=DEVICE), U, S, V, b, shape,
                            interpret=not CUDA)
    with pytest.raises(ValueError, match="decode mode"):
        decode.blast_decode(torch.randn(1, 32, device=DEVICE), U, S, V, b, shape, {"mode": "fast"})


MODES = [decode.DEFAULT, decode.PDL_DEFAULT, {**decode.PDL_DEFAULT, "mode": "two"}]


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", MODES, ids=lambda c: c["mode"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T", [1, 4, 16, 33])
def test_every_mode_matches_reference_on_cuda(T, dtype, cfg):
    _check(T, 1000, 700, 96, 4, 4, dtype, True, cfg)
    _check(T, 4096, 4096, 1022, 4, 4, dtype, True, cfg)
    _check(T, 4096, 11008, 1491, 4, 4, dtype, False, cfg)
    _check(T, 512, 768, 64, 8, 2, dtype, True, cfg)


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", MODES, ids=lambda c: c["mode"])
def test_deterministic_and_replays_in_a_cuda_graph(cfg):
    shape, U, S, V, b = _factors(2048, 2048, 500, 4, 4, torch.bfloat16)
    x = torch.randn(2, 2048, device="cuda", dtype=torch.bfloat16)
    first = decode.blast_decode(x, U, S, V, b, shape, cfg)
    for _ in range(20):     # the barrier counters are reset by each call: repeated calls never hang
        assert torch.equal(decode.blast_decode(x, U, S, V, b, shape, cfg), first)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        decode.blast_decode(x, U, S, V, b, shape, cfg)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x2 = torch.relu(x) * 2                  # a producer kernel right before: PDL must wait for it
        out = decode.blast_decode(x2, U, S, V, b, shape, cfg)
        out2 = decode.blast_decode(out[:, :2048].contiguous(), U, S, V, b, shape, cfg)
    expect = decode.blast_decode(torch.relu(x) * 2, U, S, V, b, shape, cfg)
    expect2 = decode.blast_decode(expect[:, :2048].contiguous(), U, S, V, b, shape, cfg)
    for _ in range(5):
        out.fill_(float("nan"))
        out2.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expect) and torch.equal(out2, expect2)
