"""The GEMV decode kernel and the fused tensor-core kernels reading int8 codes and packed int4 codes
(unpacked and scaled in registers) against the quantized reference, and the quantized op's CUDA-side
paths (``blastfx.kernels.forward``); on CPU under the Triton interpreter."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from blastfx.kernels import forward, gemv
from blastfx.structures.blast.quant import formats

from decode_cases import CUDA, DEVICE, blocks_fit, close_to_quantized_reference as _close, coded_factors as _codes

TINY = dict(BQ=16, BR=16, BP=16, BK=16)


FUZZ = dict(T=st.integers(1, gemv.MAX_T), m=st.integers(17, 80), n=st.integers(17, 80), r=st.integers(1, 40),
            b_out=st.integers(1, 4), b_in=st.integers(1, 4), bias=st.booleans(),
            dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))


@settings(max_examples=10 if not CUDA else 40, deadline=None)
@given(**FUZZ)
def test_int8_gemv_matches_reference_on_fuzzed_shapes(T, m, n, r, b_out, b_in, bias, dtype):
    _check_fuzzed("int8", T, m, n, r, b_out, b_in, bias, dtype)


@settings(max_examples=12 if not CUDA else 40, deadline=None)
@given(**FUZZ)
def test_int4_gemv_matches_reference_on_fuzzed_shapes(T, m, n, r, b_out, b_in, bias, dtype):
    """Packed codes: odd r (a zero pad nibble), ragged p and q, tiles of r that end inside a byte pair."""
    _check_fuzzed("int4", T, m, n, r, b_out, b_in, bias, dtype)


@settings(max_examples=12 if not CUDA else 40, deadline=None)
@given(**FUZZ)
def test_int4_split_nibbles_match_reference_on_fuzzed_shapes(T, m, n, r, b_out, b_in, bias, dtype):
    """The same with the nibbles kept apart (even and odd ranks as two half-width tiles)."""
    _check_fuzzed("int4", T, m, n, r, b_out, b_in, bias, dtype, cfg=dict(TINY, nibbles="split"))


@settings(max_examples=8 if not CUDA else 40, deadline=None)
@given(**FUZZ)
def test_float8_gemv_matches_reference_on_fuzzed_shapes(T, m, n, r, b_out, b_in, bias, dtype):
    _check_fuzzed("float8_e4m3fn", T, m, n, r, b_out, b_in, bias, dtype)


def _check_fuzzed(name, T, m, n, r, b_out, b_in, bias, dtype, cfg=TINY):
    if not blocks_fit(m, n, b_out, b_in):
        return          # a block count that leaves a block all padding is refused by BlastShape
    shape, (Uc, su, S, Vc, sv, b) = _codes(m, n, r, b_out, b_in, name=name)
    assert Uc.dtype == formats.get(name).storage
    x = torch.randn(T, n, device=DEVICE, dtype=dtype)
    b = b.to(dtype) if bias else None
    y = gemv.blast_gemv(x, Uc, S.to(dtype), Vc, b, shape, cfg, interpret=not CUDA, U_scale=su, V_scale=sv)
    assert y.dtype == dtype
    _close(y, x, Uc, su, S.to(dtype), Vc, sv, b, m)


@pytest.mark.parametrize("preload", [False, True], ids=["loop", "preload"])
@pytest.mark.parametrize("name,r", [("int8", 24), ("int4", 24), ("int4", 37), ("float8_e4m3fn", 19)])
def test_persistent_form_over_codes(name, r, preload):
    """The one-launch form over codes, each program's first U tile of codes loaded before stage 1
    (``preload``: all ranks at once, int4 as ceil(r / 2) bytes unpacked) or in the loop."""
    shape, (Uc, su, S, Vc, sv, b) = _codes(70, 90, r, 2, 3, seed=2, name=name)
    x = torch.randn(3, 90, device=DEVICE)
    y = gemv.blast_gemv(x, Uc, S, Vc, b, shape, dict(TINY, BP=8, mode="persistent", preload=preload),
                        interpret=not CUDA, U_scale=su, V_scale=sv)
    _close(y, x, Uc, su, S, Vc, sv, b, 70)


@pytest.mark.parametrize("name,r,nibbles", [("int8", 24, "interleave"), ("int4", 24, "interleave"),
                                            ("int4", 37, "interleave"), ("int4", 24, "split"), ("int4", 37, "split")])
def test_q_chunks_with_codes(name, r, nibbles):
    """x·V split into several q-chunks (each adds its share of z, scaled, into w with atomics); for
    int4 also several r-tiles (BR = 16 codes, 8 bytes) and an odd r, nibbles interleaved or apart."""
    shape, (Uc, su, S, Vc, sv, b) = _codes(70, 200, r, 2, 2, seed=1, name=name)
    x = torch.randn(2, 200, device=DEVICE)
    y = gemv.blast_gemv(x, Uc, S, Vc, b, shape, dict(TINY, per_sm=8, nibbles=nibbles), interpret=not CUDA,
                        U_scale=su, V_scale=sv)
    _close(y, x, Uc, su, S, Vc, sv, b, 70)


@settings(max_examples=8 if not CUDA else 40, deadline=None)
@given(**{**FUZZ, "T": st.integers(gemv.MAX_T + 1, 40), "name": st.sampled_from(gemv.CODE_NAMES),
          "prefill_tiles": st.booleans()})
def test_fused_kernels_over_codes_match_reference_on_fuzzed_shapes(T, m, n, r, b_out, b_in, bias, dtype, name,
                                                                   prefill_tiles):
    """Past the GEMV's token counts: x·V with the s-mix and w·Uᵀ on tensor cores, codes converted in
    registers, V's scale on z, U's on each output; decode splits (atomics into fp32 w) or whole
    reductions per program (the prefill tiles)."""
    if not blocks_fit(m, n, b_out, b_in):
        return          # a block count that leaves a block all padding is refused by BlastShape
    shape, (Uc, su, S, Vc, sv, b) = _codes(m, n, r, b_out, b_in, name=name)
    x = torch.randn(T, n, device=DEVICE, dtype=dtype)
    b = b.to(dtype) if bias else None
    cfg = forward.quantized_fused_candidates(1024 if prefill_tiles else T, shape, x.device)[0]
    y = forward.blast_matmul_quantized_triton(x, Uc, su, S.to(dtype), Vc, sv, b, m, path="fused", config=cfg)
    assert y.dtype == dtype
    _close(y, x, Uc, su, S.to(dtype), Vc, sv, b, m)


@pytest.mark.parametrize("name", gemv.CODE_NAMES)
def test_fused_over_codes_with_q_chunks_and_r_tiles(name):
    """Several q-chunks adding into one w and several r-tiles of 16 codes (8 int4 bytes), odd r."""
    shape, (Uc, su, S, Vc, sv, b) = _codes(70, 200, 37, 2, 2, seed=3, name=name)
    x = torch.randn(9, 200, device=DEVICE)
    cfg = dict(forward.decode_config(shape, x.device), BQ=16, Q_CHUNK=32)
    y = forward.blast_matmul_quantized_triton(x, Uc, su, S, Vc, sv, b, 70, path="fused", config=cfg)
    _close(y, x, Uc, su, S, Vc, sv, b, 70)


@pytest.mark.parametrize("name", gemv.CODE_NAMES)
@pytest.mark.parametrize("T,paths", [(1, ["gemv"]), (3, ["gemv"]), (6, ["fused", "decode", "dequantize"]),
                                     (16, ["fused", "decode", "dequantize"]), (40, ["dequantize", "fused"])])
def test_quantized_forward_paths(T, paths, name):
    """The paths timed for T tokens, the default first (GEMV, then fused kernels at decode sizes and
    the one-launch decode kernel up to T = 16, a float copy at prefill sizes), and each of them,
    forced or picked, against the reference."""
    shape, (Uc, su, S, Vc, sv, b) = _codes(50, 37, 9, 3, 2, seed=2, name=name)
    x = torch.randn(2, T // 2, 37, device=DEVICE) if T > gemv.MAX_T else torch.randn(T, 37, device=DEVICE)
    assert list(dict.fromkeys(p for p, _ in forward.quantized_candidates(T, Uc, shape, x.device))) == paths
    for path in paths + [None]:
        y = forward.blast_matmul_quantized_triton(x, Uc, su, S, Vc, sv, b, 50, path=path)
        _close(y.reshape(-1, 50), x.reshape(-1, 37), Uc, su, S, Vc, sv, b, 50)
    assert forward.quantized_path(T, Uc, shape, x.dtype, True, x.device) in paths


def test_deterministic_mode_runs_fused_without_atomics():
    """No float atomics: the fused path's whole-reduction tiles (or the float paths' deterministic
    ones on a float copy), so two calls agree bit for bit."""
    shape, (Uc, su, S, Vc, sv, b) = _codes(50, 37, 8, 3, 2)
    x = torch.randn(1, 37, device=DEVICE)
    torch.use_deterministic_algorithms(True)
    try:
        cands = forward.quantized_candidates(1, Uc, shape, x.device)
        assert [p for p, _ in cands][0] == "fused" and "gemv" not in [p for p, _ in cands]
        assert "decode" in [p for p, _ in cands]            # partial sums in slots, mixed in a fixed order
        assert all("Q_CHUNK" not in c and "J_PER_PROG" not in c for p, c in cands if p == "fused")
        y1, y2 = (forward.blast_matmul_quantized_triton(x, Uc, su, S, Vc, sv, b, 50) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(y1, y2)
    _close(y1, x, Uc, su, S, Vc, sv, b, 50)


@pytest.mark.parametrize("T,path", [(1, "gemv"), (4, "gemv"), (9, "fused")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float8_codes_are_read_in_registers(T, path, dtype):
    """float8 codes are one byte like int8: the same kernels load them and widen them in registers."""
    shape, (Uc, su, S, Vc, sv, b) = _codes(50, 37, 9, 3, 2, name="float8_e4m3fn")
    assert Uc.dtype == torch.float8_e4m3fn
    x = torch.randn(T, 37, device=DEVICE, dtype=dtype)
    y = forward.blast_matmul_quantized_triton(x, Uc, su, S.to(dtype), Vc, sv, b.to(dtype), 50, path=path)
    _close(y, x, Uc, su, S.to(dtype), Vc, sv, b.to(dtype), 50)


def test_gemv_scale_arguments_are_checked():
    shape, (Uc, su, S, Vc, sv, b) = _codes(50, 37, 8, 3, 2)
    x = torch.randn(1, 37, device=DEVICE)
    with pytest.raises(ValueError, match="U_scale and V_scale together"):
        gemv.blast_gemv(x, Uc, S, Vc, b, shape, TINY, interpret=not CUDA, U_scale=su)
    with pytest.raises(ValueError, match=r"codes of \('int8', 'int4', 'float8_e4m3fn'\), got U.dtype=torch.float32"):
        gemv.blast_gemv(x, Uc.float(), S, Vc.float(), b, shape, TINY, interpret=not CUDA, U_scale=su, V_scale=sv)
    shape4, (Uc4, su4, S4, Vc4, sv4, b4) = _codes(50, 37, 8, 3, 2, name="int4")
    with pytest.raises(ValueError, match=r"do not hold rank 8: their last dimension must be 4"):
        gemv.blast_gemv(x, Uc4[..., :3], S4, Vc4[..., :3], b4, shape4, TINY, interpret=not CUDA, U_scale=su4,
                        V_scale=sv4)
    with pytest.raises(ValueError, match="GEMV nibbles must be 'interleave' or 'split', got 'apart'"):
        gemv.blast_gemv(x, Uc4, S4, Vc4, b4, shape4, dict(TINY, nibbles="apart"), interpret=not CUDA, U_scale=su4,
                        V_scale=sv4)
    with pytest.raises(ValueError, match=r"path must be one of \('gemv', 'decode', 'fused', 'dequantize'\)"):
        forward.blast_matmul_quantized_triton(x, Uc, su, S, Vc, sv, b, 50, path="bmm_mix_bmm")


def test_split_nibbles_are_timed_only_for_int4():
    device = torch.device(DEVICE)
    plain, int4 = gemv.candidates(device), gemv.candidates(device, int4=True)
    assert all(c["nibbles"] == "interleave" for c in plain)
    assert int4[:len(plain)] == plain and [c for c in int4[len(plain):]] == [{**c, "nibbles": "split"} for c in plain]


def _quantized_members(specs, n, name, dtype, seed=0):
    """(U, S, V, bias, shape, U_scale, V_scale) per (m, r, b_out, b_in, bias) spec, all reading width n."""
    members = []
    for k, (m, r, b_out, b_in, bias) in enumerate(specs):
        shape, (Uc, su, S, Vc, sv, b) = _codes(m, n, r, b_out, b_in, seed=seed + k, name=name)
        members.append((Uc, S.to(dtype), Vc, b.to(dtype) if bias else None, shape, su, sv))
    return members


def _check_group(x, members, cfg=TINY):
    y_all = gemv.blast_gemv_group(x, members, cfg, interpret=not CUDA)
    assert y_all.shape == (x.shape[0], sum(m[4].out_features for m in members)) and y_all.dtype == x.dtype
    for y, (Uc, S, Vc, b, shape, su, sv) in zip(y_all.split([m[4].out_features for m in members], dim=-1), members):
        _close(y, x, Uc, su, S, Vc, sv, b, shape.out_features)


@pytest.mark.parametrize("name,nibbles", [("int8", "interleave"), ("float8_e4m3fn", "interleave"),
                                          ("int4", "interleave"), ("int4", "split")])
@pytest.mark.parametrize("T,dtype", [(1, torch.float32), (3, torch.bfloat16), (4, torch.float16)])
def test_group_of_quantized_siblings_matches_each_reference(T, dtype, name, nibbles):
    """q/k/v-like siblings with codes: different heights, ranks, block counts and biases, each
    member's codes, S, bias and scales found from the anchor of their kind."""
    members = _quantized_members([(40, 16, 4, 4, True), (24, 8, 2, 3, False), (56, 24, 4, 2, True)], 48, name, dtype)
    _check_group(torch.randn(T, 48, device=DEVICE, dtype=dtype), members, dict(TINY, nibbles=nibbles))


@pytest.mark.parametrize("preload", [False, True], ids=["loop", "preload"])
@pytest.mark.parametrize("name", ["int8", "int4", "float8_e4m3fn"])
def test_quantized_group_in_its_persistent_form(name, preload):
    """The grouped kernel's one launch over codes, the first U tile of codes preloaded or not."""
    members = _quantized_members([(40, 16, 4, 4, True), (24, 8, 2, 3, False), (56, 24, 4, 2, True)], 48, name,
                                 torch.float32)
    _check_group(torch.randn(2, 48, device=DEVICE), members, dict(TINY, BP=8, mode="persistent", preload=preload))


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantized_group_finds_tensors_before_and_after_each_anchor(name):
    """Members' codes, floats and scales carved out of shared buffers, the second member's placed
    before the first's: negative offsets from every anchor. Repeated calls alternate workspace halves."""
    made = _quantized_members([(40, 16, 4, 4, True), (24, 8, 2, 3, True)], 48, name, torch.float32, seed=4)
    pools = {}

    def carve(kind, tensors):
        flat = [t.reshape(-1) for t in tensors]
        sizes = [-(-f.numel() * f.element_size() // 16) * 16 // f.element_size() for f in flat]
        pool = torch.zeros(sum(sizes), dtype=flat[0].dtype, device=DEVICE)
        pools[kind] = pool
        views, start = [], 0
        for f, size, t in zip(flat, sizes, tensors):
            views.append(pool[start:start + f.numel()].view(t.shape))
            views[-1].copy_(t)
            start += size
        return views

    second, first = made[1], made[0]            # the pool holds the second member first
    U2, U1, V2, V1 = carve("codes", [second[0], first[0], second[2], first[2]])
    S2, S1, b2, b1 = carve("floats", [second[1], first[1], second[3], first[3]])
    us2, us1, vs2, vs1 = carve("scales", [second[5], first[5], second[6], first[6]])
    members = [(U1, S1, V1, b1, first[4], us1, vs1), (U2, S2, V2, b2, second[4], us2, vs2)]
    assert gemv.groupable(members) is None
    for T in (1, 2, 1):
        _check_group(torch.randn(T, 48, device=DEVICE), members)


def test_group_refuses_quantized_members_it_cannot_stream():
    codes8 = _quantized_members([(40, 16, 4, 4, True), (24, 8, 2, 3, False)], 48, "int8", torch.float32)
    codes4 = _quantized_members([(24, 8, 2, 3, False)], 48, "int4", torch.float32)
    floats = [(Uc.float(), S, Vc.float(), b, shape) for Uc, S, Vc, b, shape, _, _ in codes8]
    assert gemv.groupable(codes8) is None
    assert "mix float and quantized" in gemv.groupable([codes8[0], floats[1]])
    assert "mix dtypes of their codes" in gemv.groupable([codes8[0], codes4[0]])
    Uc, S, Vc, b, shape, su, sv = codes8[1]
    assert "mix dtypes of their scales" in gemv.groupable([codes8[0], (Uc, S, Vc, b, shape, su.double(), sv.double())])
    assert "mix dtypes of their floats" in gemv.groupable([codes8[0], (Uc, S.double(), Vc, b, shape, su, sv)])
    shifted = torch.zeros(su.numel() + 1, device=DEVICE)[1:].view(su.shape)
    shifted.copy_(su)
    assert "not 16-byte aligned" in gemv.groupable([codes8[0], (Uc, S, Vc, b, shape, shifted, sv)])
    short = _quantized_members([(24, 12, 2, 3, False)], 48, "int8", torch.float32)
    assert "not a multiple of 8" in gemv.groupable([codes8[0], short[0]])
    with pytest.raises(ValueError, match="cannot run these layers as one GEMV group: members mix float"):
        gemv.blast_gemv_group(torch.randn(1, 48, device=DEVICE), [codes8[0], floats[1]], TINY, interpret=not CUDA)
    with pytest.raises(ValueError, match=r"member 0: codes of U .* do not hold rank 8: their last dimension must be 8"):
        bad = (Uc[..., :4].contiguous(), S, Vc[..., :4].contiguous(), b, shape, su, sv)
        gemv.blast_gemv_group(torch.randn(1, 48, device=DEVICE), [bad], TINY, interpret=not CUDA)
