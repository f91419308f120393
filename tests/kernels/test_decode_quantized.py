"""The one-launch decode kernel reading int8, float8 and packed int4 codes (converted in registers,
V's scale on each z tile, U's on each output) against the quantized reference.

On CPU under the Triton interpreter in its two-launch form; on CUDA every launch mode, and the
determinism and CUDA-graph replay that make it the quantized path under
``torch.use_deterministic_algorithms``."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from blastfx.kernels import decode, forward
from blastfx.kernels.codes import CODE_NAMES

from decode_cases import CUDA, DEVICE, blocks_fit, close_to_quantized_reference, coded_factors

TINY = dict(BR=16, BQ=16, BP=16, BK=16)


def _run(T, m, n, r, b_out, b_in, name, dtype=torch.float32, bias=True, cfg=TINY, seed=0):
    shape, (Uc, su, S, Vc, sv, b) = coded_factors(m, n, r, b_out, b_in, seed=seed, name=name)
    x = torch.randn(T, n, device=DEVICE, dtype=dtype)
    b = b.to(dtype) if bias else None
    y = decode.blast_decode(x, Uc, S.to(dtype), Vc, b, shape, cfg, interpret=not CUDA, U_scale=su, V_scale=sv)
    assert y.dtype == dtype
    close_to_quantized_reference(y, x, Uc, su, S.to(dtype), Vc, sv, b, m)


@settings(max_examples=10 if not CUDA else 40, deadline=None)
@given(T=st.integers(1, 16), m=st.integers(17, 80), n=st.integers(17, 80), r=st.integers(1, 40),
       b_out=st.integers(1, 4), b_in=st.integers(1, 4), bias=st.booleans(), name=st.sampled_from(CODE_NAMES),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_matches_reference_on_fuzzed_shapes(T, m, n, r, b_out, b_in, bias, name, dtype):
    """Ragged p and q (padding in the last block), odd r (a zero pad nibble for int4), ranks that are
    no multiple of the tiles, every code format and activation dtype."""
    if not blocks_fit(m, n, b_out, b_in):
        return          # a block count that leaves a block all padding is refused by BlastShape
    _run(T, m, n, r, b_out, b_in, name, dtype, bias)


@pytest.mark.parametrize("name", CODE_NAMES)
def test_slots_and_r_tiles_over_codes(name):
    """Several q-chunks per block-column (slots, each scaled by V's scale before the mix) and
    several r-tiles of 16 codes (8 int4 bytes) ending inside a byte pair (odd r)."""
    _run(7, 70, 200, 37, 2, 2, name, cfg=dict(TINY, slots=6))


def test_scales_are_applied_per_rank_and_per_row():
    """Codes equal, scales different: the output follows the scales (a kernel ignoring either would
    return the same y for both)."""
    shape, (Uc, su, S, Vc, sv, b) = coded_factors(40, 48, 16, 2, 2, seed=4)
    x = torch.randn(3, 48, device=DEVICE)
    outs = []
    for us, vs in ((su, sv), (su * 2, sv), (su, sv * torch.linspace(0.5, 2, 16, device=DEVICE))):
        outs.append(decode.blast_decode(x, Uc, S, Vc, b, shape, TINY, interpret=not CUDA, U_scale=us, V_scale=vs))
        close_to_quantized_reference(outs[-1], x, Uc, us, S, Vc, vs, b, 40)
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


def test_code_arguments_are_checked_before_launch():
    """The kernel's launcher runs the shared checks of codes and scales (``kernels.codes.code_format``,
    tested on its own), naming itself."""
    shape, (Uc, su, S, Vc, sv, b) = coded_factors(50, 37, 8, 3, 2, name="int4")
    x = torch.randn(9, 37, device=DEVICE)
    with pytest.raises(ValueError, match="blast_decode takes U_scale and V_scale together"):
        decode.blast_decode(x, Uc, S, Vc, b, shape, TINY, interpret=not CUDA, U_scale=su)
    with pytest.raises(ValueError, match=r"do not hold rank 8: their last dimension must be 4"):
        decode.blast_decode(x, Uc[..., :3], S, Vc[..., :3], b, shape, TINY, interpret=not CUDA, U_scale=su, V_scale=sv)


@pytest.mark.parametrize("name", CODE_NAMES)
def test_quantized_op_runs_the_decode_path(name):
    """``blast_matmul_quantized_triton(path="decode")``: the forward's dispatch of the kernel, its
    configs as the autotuner times them."""
    shape, (Uc, su, S, Vc, sv, b) = coded_factors(50, 37, 9, 3, 2, seed=2, name=name)
    x = torch.randn(2, 4, 37, device=DEVICE)
    cands = [c for p, c in forward.quantized_candidates(8, Uc, shape, x.device) if p == "decode"]
    assert cands == decode.candidates(x.device)
    for cfg in (None, cands[0]):
        y = forward.blast_matmul_quantized_triton(x, Uc, su, S, Vc, sv, b, 50, path="decode", config=cfg)
        close_to_quantized_reference(y.reshape(-1, 50), x.reshape(-1, 37), Uc, su, S, Vc, sv, b, 50)


MODES = [decode.DEFAULT, decode.PDL_DEFAULT, {**decode.PDL_DEFAULT, "mode": "two"}]


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", MODES, ids=lambda c: c["mode"])
@pytest.mark.parametrize("name", CODE_NAMES)
@pytest.mark.parametrize("T", [5, 8, 16])
def test_every_mode_over_codes_on_cuda(T, name, cfg):
    """Llama-sized layers at decode batch sizes, bf16 activations, every launch mode."""
    _run(T, 4096, 4096, 1016, 4, 4, name, torch.bfloat16, cfg=cfg)
    _run(T, 11008, 4096, 1488, 4, 4, name, torch.bfloat16, bias=False, cfg=cfg)
    _run(T, 4096, 11008, 1491, 4, 4, name, torch.bfloat16, cfg=cfg)


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", MODES, ids=lambda c: c["mode"])
def test_codes_deterministic_and_replay_in_a_cuda_graph(cfg):
    shape, (Uc, su, S, Vc, sv, b) = coded_factors(2048, 2048, 500, 4, 4, name="int4")
    S, b = S.bfloat16(), b.bfloat16()
    x = torch.randn(8, 2048, device="cuda", dtype=torch.bfloat16)

    def call(inp):
        return decode.blast_decode(inp, Uc, S, Vc, b, shape, cfg, U_scale=su, V_scale=sv)

    first = call(x)
    for _ in range(10):
        assert torch.equal(call(x), first)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(torch.relu(x) * 2)
    expect = call(torch.relu(x) * 2)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expect)
