"""The SS1 Triton kernel against the reference: fuzzed shapes under the interpreter (CPU) and the
compiled kernel on a GPU (``@pytest.mark.cuda``)."""
import random

import pytest
import torch
import triton

import blastfx
from blastfx.structures.ss1 import SS1Layout, SS1Linear, ss1_matmul, ss1_matmul_reference
from blastfx.structures.ss1.kernel import DENSE, EXPAND, FOLD_MAX_COPIES, GEMV_MAX_T, candidates, expand_triton, \
    fold_configs, fold_fits, fold_triton, fold_variants, gemv_configs, kernel_config, ss1_matmul_triton
from blastfx.structures.ss1.ops import ss1_to_dense
from ss1_oracles import dense_oracle

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _fuzz_cases(n, seed=2024):
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        bk = rng.choice([16, 32])
        bn = rng.choice([16, 32, 64])
        r = rng.choice([1, 2, 2, 4, 4, 8])
        if rng.random() < 0.7:                            # mostly ragged: in_features not a multiple of bk
            in_f = rng.randint((r - 1) * bk + 1, (2 * r + 1) * bk)
        else:
            in_f = bk * rng.randint(r, 2 * r + 1)
        out_f = rng.randint(1, 90)
        T = rng.choice([1, 2, 5, 16, 17, 40])
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
        cases.append((T, in_f, out_f, r, bk, bn, dtype, rng.random() < 0.5, rng.randint(0, 2 ** 32)))
    return cases


def _check(y, x, w, b, L, dtype):
    # ground truth: the same (rounded) low-precision inputs, float64 math
    want = x.double() @ dense_oracle(w, L).T + (b.double() if b is not None else 0)
    scale = want.abs().max().item() + 1e-6
    assert y.dtype == dtype and y.shape == want.shape
    torch.testing.assert_close(y.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * scale)
    ref = ss1_matmul_reference(x, w, L, b)
    torch.testing.assert_close(y.double(), ref.double(), rtol=2 * TOL[dtype], atol=2 * TOL[dtype] * scale)


@pytest.mark.parametrize("case", _fuzz_cases(28), ids=lambda c: "T{}-K{}-N{}-r{}-bk{}-bn{}-{}-bias{}-s{}".format(
    *c[:6], str(c[6]).split(".")[-1], int(c[7]), c[8]))
def test_kernel_matches_reference_on_fuzzed_shapes(case):
    T, in_f, out_f, r, bk, bn, dtype, bias, seed = case
    L = SS1Layout(out_f, in_f, r, seed=seed, block_k=bk, block_n=bn)
    x = torch.randn(T, in_f).to(dtype)
    w = torch.randn(L.weight_shape).to(dtype)
    b = torch.randn(out_f).to(dtype) if bias else None
    y = ss1_matmul_triton(x, w, L.shifts(), b, r, bk, bn)
    _check(y, x, w, b, L, dtype)


@pytest.mark.parametrize("T,cfg", [(1, {"BM": 16, "BN": 16}), (3, {"BM": 16, "BN": 32}), (40, {"BM": 32, "BN": 32}),
                                   (40, {"BM": 16, "BN": 16}), (1, {"BM": 16, "BN": 16, "KB": 32}),
                                   (3, {"BM": 16, "BN": 32, "KB": 64}), (40, {"BM": 32, "BN": 16, "KB": 128})])
def test_tile_configs_and_leading_dims(T, cfg):
    L = SS1Layout(45, 100, 2, seed=3, block_k=16, block_n=32)
    x = torch.randn(T, 2, L.in_features)
    w = torch.randn(L.weight_shape)
    b = torch.randn(L.out_features)
    y = ss1_matmul_triton(x, w, L.shifts(), b, 2, 16, 32, config=cfg)
    _check(y.reshape(-1, L.out_features), x.reshape(-1, L.in_features), w, b, L, torch.float32)
    assert y.shape == (T, 2, L.out_features)


@pytest.mark.parametrize("case", [c for c in _fuzz_cases(60, seed=77) if c[0] <= GEMV_MAX_T][:14] +
                         [(T, *c[1:]) for c in _fuzz_cases(8, seed=5) for T in (3, 4)][:6],
                         ids=lambda c: "T{}-K{}-N{}-r{}-bk{}-bn{}-{}-bias{}-s{}".format(
                             *c[:6], str(c[6]).split(".")[-1], int(c[7]), c[8]))
def test_cuda_core_form_matches_reference_on_fuzzed_shapes(case):
    """The decode GEMV form (T <= 4): ragged in/out features, every reduction, bias or none, with
    its tile a power of two down to one row (BN 1..16) and K steps of one or several shared tiles."""
    T, in_f, out_f, r, bk, bn, dtype, bias, seed = case
    L = SS1Layout(out_f, in_f, r, seed=seed, block_k=bk, block_n=bn)
    x = torch.randn(T, in_f).to(dtype)
    w = torch.randn(L.weight_shape).to(dtype)
    b = torch.randn(out_f).to(dtype) if bias else None
    for cfg in ({"path": "gemv"}, {"path": "gemv", "BN": 1 << (seed % 5), "KB": bk * (1 << (seed % 3))}):
        y = ss1_matmul_triton(x, w, L.shifts(), b, r, bk, bn, config=cfg)
        _check(y, x, w, b, L, dtype)


def test_cuda_core_form_is_offered_and_checked_only_at_decode_sizes():
    for T in range(1, GEMV_MAX_T + 1):
        gemv = [c for c in candidates(T, 64, 32) if c.get("path") == "gemv"]
        assert gemv and gemv == gemv_configs(T, 64, 32)
        assert all(c["BN"] * triton.next_power_of_2(T) <= 32 and 64 % c["BN"] == 0 for c in gemv)
    assert not [c for T in (5, 16, 17, 512) for c in candidates(T, 64, 32) if c.get("path") == "gemv"]
    L = SS1Layout(20, 64, 2, block_k=16, block_n=16)
    w = torch.randn(L.weight_shape)
    with pytest.raises(ValueError, match=f"config path='gemv' takes at most {GEMV_MAX_T} tokens, got T=5"):
        ss1_matmul_triton(torch.randn(5, 64), w, L.shifts(), None, 2, 16, 16, config={"path": "gemv"})
    with pytest.raises(ValueError, match="config BN=32 must be a power of two dividing block_n=16"):
        ss1_matmul_triton(torch.randn(2, 64), w, L.shifts(), None, 2, 16, 16, config={"path": "gemv", "BN": 32})
    with pytest.raises(ValueError, match="config KB=24 must be a power-of-two multiple of block_k=16"):
        ss1_matmul_triton(torch.randn(2, 64), w, L.shifts(), None, 2, 16, 16, config={"path": "gemv", "KB": 24})


def _in_nan_buffers(L, T: int):
    """(x, weight, bias) of random values for layout ``L`` and T tokens, each a strided view into a
    larger NaN-filled buffer: a kernel reading past any of them gives NaN."""
    xbuf = torch.full((T + 3, L.in_features + 40), float("nan"))
    xbuf[:T, :L.in_features] = torch.randn(T, L.in_features)
    wbuf = torch.full((L.out_features + 9, L.shared_in_features + 64), float("nan"))
    wbuf[:L.out_features, :L.shared_in_features] = torch.randn(L.weight_shape)
    bbuf = torch.full((L.out_features + 7,), float("nan"))
    bbuf[:L.out_features] = torch.randn(L.out_features)
    return xbuf[:T, :L.in_features], wbuf[:L.out_features, :L.shared_in_features], bbuf[:L.out_features]


@pytest.mark.parametrize("T,cfg", [(5, None), (3, {"path": "gemv", "BN": 16, "KB": 64})], ids=["tensor-core", "gemv"])
def test_kernel_reads_only_the_shared_weight_and_the_real_inputs(T, cfg):
    """Strided views into NaN-filled buffers: a read past the shared weight's columns, past the last
    input feature, past the last row or token would make the output NaN (the CUDA-core form with a
    K step of four shared tiles, so its last step reaches past the shared columns)."""
    L = SS1Layout(37, 70, 4, seed=5, block_k=16, block_n=16)
    x, w, b = _in_nan_buffers(L, T)
    y = ss1_matmul_triton(x, w, L.shifts(), b, L.reduction, L.block_k, L.block_n, config=cfg)
    assert bool(torch.isfinite(y).all())
    _check(y, x.contiguous(), w.contiguous(), b.contiguous(), L, torch.float32)


def test_transposed_input():
    L = SS1Layout(30, 64, 2, seed=1, block_k=16, block_n=16)
    x = torch.randn(L.in_features, 6).T                        # non-contiguous (6, 64)
    w = torch.randn(L.weight_shape)
    y = ss1_matmul_triton(x, w, L.shifts(), None, 2, 16, 16)
    _check(y, x, w, None, L, torch.float32)


def test_shifts_outside_the_tile_wrap_like_the_reference():
    """The op does not validate shift values (that would sync a GPU); kernel and reference must still
    agree on any integer table: both reduce it modulo block_k."""
    L = SS1Layout(20, 64, 2, seed=1, block_k=16, block_n=16)
    odd = L.shifts() + torch.tensor([[-48], [16], [35], [-3]])
    x, w = torch.randn(4, 64), torch.randn(L.weight_shape)
    y = ss1_matmul_triton(x, w, odd, None, 2, 16, 16)
    ref = torch.ops.blastfx.ss1_matmul(x, w, odd, None, 2, 16, 16)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kb", [32, 64, 128])
def test_wide_k_steps_with_a_ragged_last_step(kb):
    """KB spans several shared tiles; 7 shared tiles leave a partial last step for every KB > 16,
    and NaN past the shared weight's columns or past the last input feature would show any read
    beyond them (the masked tiles of the last step sit over both)."""
    L = SS1Layout(40, 16 * 7 * 2 - 5, 2, seed=11, block_k=16, block_n=32)
    assert L.shared_tiles == 7
    wbuf = torch.full((L.out_features, L.shared_in_features + 64), float("nan"))
    wbuf[:, :L.shared_in_features] = torch.randn(L.weight_shape)
    w = wbuf[:, :L.shared_in_features]
    xbuf = torch.full((3, L.in_features + 4 * 16 * 2), float("nan"))
    xbuf[:, :L.in_features] = torch.randn(3, L.in_features)
    x, b = xbuf[:, :L.in_features], torch.randn(L.out_features)
    y = ss1_matmul_triton(x, w, L.shifts(), b, 2, 16, 32, config={"BM": 16, "BN": 16, "KB": kb})
    _check(y, x.contiguous(), w.contiguous(), b, L, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_path_matches_the_float64_oracle(dtype):
    """The expand-then-GEMM config, writing into the kernel's output buffer, bias or none, from a
    contiguous input and from a strided view (feature stride 2, which the flattening keeps)."""
    L = SS1Layout(45, 100, 4, seed=9, block_k=16, block_n=32)
    strided = torch.randn(6, 2, 2 * L.in_features).to(dtype)[..., ::2]
    assert not strided.reshape(-1, L.in_features).is_contiguous()
    w = torch.randn(L.weight_shape).to(dtype)
    b = torch.randn(L.out_features).to(dtype)
    for x in (torch.randn(6, 2, L.in_features).to(dtype), strided):
        for bias in (b, None):
            y = ss1_matmul_triton(x, w, L.shifts(), bias, 4, 16, 32, config=DENSE)
            assert y.shape == (6, 2, L.out_features) and y.is_contiguous()
            _check(y.reshape(-1, L.out_features), x.reshape(-1, L.in_features), w, bias, L, dtype)


def test_unknown_config_keys_are_refused_before_launching():
    L = SS1Layout(20, 64, 2, block_k=16, block_n=16)
    x, w = torch.randn(8, 64), torch.randn(L.weight_shape)
    with pytest.raises(ValueError, match=r"config path='kernel' takes no \['swap_ab'\]"):
        ss1_matmul_triton(x, w, L.shifts(), None, 2, 16, 16, config={"swap_ab": True}, vec=8)
    with pytest.raises(ValueError, match=r"config path='gemv' takes no \['BM'\]"):
        ss1_matmul_triton(x[:2], w, L.shifts(), None, 2, 16, 16, config={"path": "gemv", "BM": 16}, vec=8)
    with pytest.raises(ValueError, match=r"config path='fold' takes no \['bogus'\] \(only \['BM', 'BN', 'KB', "
                                         r"'num_stages', 'num_warps', 'swap_ab'\]\)"):
        ss1_matmul_triton(x, w, L.shifts(), None, 2, 16, 16, config={"path": "fold", "bogus": 1}, vec=8)
    with pytest.raises(ValueError, match="config swap_ab must be True or False, got 'no'"):
        ss1_matmul_triton(x, w, L.shifts(), None, 2, 16, 16, config={"path": "fold", "swap_ab": "no"}, vec=8)


def test_empty_tokens_and_bad_config():
    L = SS1Layout(20, 64, 2, block_k=16, block_n=16)
    w = torch.randn(L.weight_shape)
    assert ss1_matmul_triton(torch.randn(0, 64), w, L.shifts(), None, 2, 16, 16).shape == (0, 20)
    with pytest.raises(ValueError, match="config BN=32 must be a power of two dividing block_n=16"):
        ss1_matmul_triton(torch.randn(2, 64), w, L.shifts(), None, 2, 16, 16, config={"BN": 32})
    with pytest.raises(ValueError, match="config KB=24 must be a power-of-two multiple of block_k=16"):
        ss1_matmul_triton(torch.randn(2, 64), w, L.shifts(), None, 2, 16, 16, config={"KB": 24})
    with pytest.raises(ValueError, match="config BM=24 must be a power of two of at least 16"):
        ss1_matmul_triton(torch.randn(2, 64), w, L.shifts(), None, 2, 16, 16, config={"BM": 24})
    with pytest.raises(ValueError, match="config BN=8 must be a power of two dividing block_n=16, at least 16"):
        ss1_matmul_triton(torch.randn(2, 64), w, L.shifts(), None, 2, 16, 16, config={"BN": 8})
    with pytest.raises(ValueError, match="config path='dens': expected 'kernel', 'gemv', 'fold', 'dense' or 'expand'"):
        ss1_matmul_triton(torch.randn(2, 64), w, L.shifts(), None, 2, 16, 16, config={"path": "dens"})


def test_a_cpu_call_outside_the_interpreter_is_refused(monkeypatch):
    """Off the GPU only the interpreter can run the kernel; anything else would fail inside Triton."""
    from blastfx.structures.ss1 import kernel
    monkeypatch.setattr(kernel, "INTERPRET", False)
    L = SS1Layout(20, 64, 2, block_k=16, block_n=16)
    with pytest.raises(ValueError, match="ss1_matmul_triton needs CUDA tensors .* got x on cpu"):
        ss1_matmul_triton(torch.randn(2, 64), torch.randn(L.weight_shape), L.shifts(), None, 2, 16, 16)


def test_config_never_exceeds_the_hash_tile():
    for T in (1, 16, 17, 4096):
        for bn in (16, 32, 64, 128):
            for interpret in (False, True):
                for bk in (16, 32, 256):
                    cfgs = [kernel_config(T, bn, bk, interpret=interpret)]
                    cfgs += [c for c in candidates(T, bn, bk) if c not in (DENSE, EXPAND)] if not interpret else []
                    for cfg in cfgs:
                        assert cfg["BN"] <= bn and bn % cfg["BN"] == 0
                        assert cfg["KB"] >= bk and cfg["KB"] % bk == 0
    assert kernel_config(1, 64, interpret=False)["BM"] == 16
    assert kernel_config(512, 64, interpret=False)["BM"] == 64
    assert candidates(1, 64, 32)[0] == kernel_config(1, 64, 32, interpret=False)
    assert candidates(1, 64, 32)[-1] == DENSE and candidates(17, 64, 32)[0] == DENSE      # untimed prefill: GEMM
    assert candidates(17, 64, 32)[1] == EXPAND and EXPAND not in candidates(16, 64, 32)
    assert len(candidates(1, 64, 32)) == len({str(c) for c in candidates(1, 64, 32)})      # no repeats


def test_cpu_op_runs_the_reference():
    L = SS1Layout(20, 64, 2, block_k=16, block_n=16)
    x, w = torch.randn(3, 64, dtype=torch.float64), torch.randn(L.weight_shape, dtype=torch.float64)
    assert torch.equal(ss1_matmul(x, w, L), ss1_matmul_reference(x, w, L))


# ---------------------------------------------------------------------------------------------
# GPU: the compiled kernel


# ---------------------------------------------------------------------------------------------
# the folded GEMM (path "fold")


def _fold_cases():
    """Fuzzed geometries where the fold path is offered (reduction 2 at any tile, 4 with two
    rotations a tile), at every token count of the fuzz, ragged dims included."""
    cases = [c for c in _fuzz_cases(120, seed=31) if fold_fits(c[3], c[4], 8)][:16]
    assert {c[3] for c in cases} == {2, 4} and any(c[1] % c[4] for c in cases)
    return cases


@pytest.mark.parametrize("case", _fold_cases(), ids=lambda c: "T{}-K{}-N{}-r{}-bk{}-bn{}-{}-bias{}-s{}".format(
    *c[:6], str(c[6]).split(".")[-1], int(c[7]), c[8]))
def test_folded_gemm_matches_reference_on_fuzzed_shapes(case):
    """The folded copies and the GEMM over them against the float64 oracle: ragged in/out features,
    bias or none, every dtype, the default tile and one that spans two shared tiles a K step, each
    orientation (``swap_ab``: outputs as the MMA's M)."""
    T, in_f, out_f, r, bk, bn, dtype, bias, seed = case
    L = SS1Layout(out_f, in_f, r, seed=seed, block_k=bk, block_n=bn)
    x = torch.randn(T, in_f).to(dtype)
    w = torch.randn(L.weight_shape).to(dtype)
    b = torch.randn(out_f).to(dtype) if bias else None
    for cfg in ({"path": "fold"}, {"path": "fold", "BM": 32, "BN": 16, "KB": 2 * bk},
                {"path": "fold", "BM": 16, "BN": 16, "KB": bk, "swap_ab": True},
                {"path": "fold", "BM": 32, "BN": min(bn, 32), "KB": 2 * bk, "swap_ab": True}):
        y = ss1_matmul_triton(x, w, L.shifts(), b, r, bk, bn, config=cfg, vec=L.vec)
        _check(y, x, w, b, L, dtype)


@pytest.mark.parametrize("r,bk,tiles", [(2, 16, 4), (2, 32, 3), (4, 16, 8), (4, 16, 5)])
def test_folded_copies_are_the_group_sums_for_every_relative_rotation(r, bk, tiles):
    """Copy v, shared column g*bk + c: the sum over the group's tiles u of x at column
    (c + d_u) mod bk of tile g*r + u, d_0 = 0 and d_u the u-th base-G digit of v times vec, zero
    past the last input feature; built here one integer at a time, with a ragged last tile and
    (3 or 5 tiles) a last group of fewer than r tiles. Integer-valued inputs make every sum exact."""
    vec, T = 8, 3
    G = bk // vec
    in_f = bk * tiles - 5
    shared_in = -(-tiles // r) * bk
    x = torch.randint(-50, 50, (T, in_f)).float()
    got = fold_triton(x, shared_in, r, bk, vec)
    assert got.shape == (fold_variants(r, bk, vec), T, shared_in) == (G ** (r - 1), T, shared_in)
    want = torch.zeros_like(got)
    for v in range(G ** (r - 1)):
        d = [0] + [(v // G ** (u - 1)) % G * vec for u in range(1, r)]
        for g in range(shared_in // bk):
            for c in range(bk):
                for u in range(r):
                    col = (g * r + u) * bk + (c + d[u]) % bk
                    if col < in_f:
                        want[v, :, g * bk + c] += x[:, col]
    assert torch.equal(got, want)


def test_folded_gemm_reads_only_the_shared_weight_and_the_real_inputs():
    """NaN everywhere past the real inputs, weight columns and rows, and bias: any read beyond them
    would make the output NaN (a K step of two shared tiles over 5 of them leaves a masked half)."""
    L = SS1Layout(37, 16 * 10 - 7, 2, seed=5, block_k=16, block_n=16)
    assert L.shared_tiles == 5
    x, w, b = _in_nan_buffers(L, 19)
    for swap in (False, True):
        y = ss1_matmul_triton(x, w, L.shifts(), b, 2, 16, 16, vec=L.vec,
                              config={"path": "fold", "BM": 16, "BN": 16, "KB": 32, "swap_ab": swap})
        assert bool(torch.isfinite(y).all())
        _check(y, x.contiguous(), w.contiguous(), b.contiguous(), L, torch.float32)


def test_folded_gemm_wraps_shifts_outside_the_tile_like_the_reference():
    """Multiples of vec past the tile or negative (what the op's ``vec`` promises, nothing more):
    the relative rotations and the weight's rotation reduce them modulo block_k as the reference does."""
    L = SS1Layout(20, 64, 2, seed=1, block_k=16, block_n=16)
    odd = L.shifts() + torch.tensor([[-48], [16], [40], [-8]])
    x, w = torch.randn(21, 64), torch.randn(L.weight_shape)
    ref = torch.ops.blastfx.ss1_matmul(x, w, odd, None, 2, 16, 16)
    for swap in (False, True):
        y = ss1_matmul_triton(x, w, odd, None, 2, 16, 16, config={"path": "fold", "swap_ab": swap}, vec=8)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_folded_gemm_is_offered_where_its_copies_fit_and_refused_elsewhere():
    assert fold_variants(2, 32, 8) == 4 and fold_variants(4, 16, 8) == 8 and fold_variants(4, 32, 8) == 64
    assert fold_fits(2, 32, 8) and fold_fits(4, 16, 8) and fold_fits(2, 16, 4)
    assert not fold_fits(1, 32, 8) and not fold_fits(4, 32, 8) and not fold_fits(2, 16, 1)
    assert FOLD_MAX_COPIES == 2 and fold_fits(8, 16, 16) and not fold_fits(8, 32, 16)       # 1 <= 16, 2**7 > 16
    for T in (5, 16, 17, 4096):
        fold = [c for c in candidates(T, 64, 32, 2, 8) if c.get("path") == "fold"]
        assert fold and fold == fold_configs(T, 64, 32, 2, 8)
        assert all(c["BN"] <= 64 and 64 % c["BN"] == 0 and c["KB"] % 32 == 0 for c in fold)
        assert {c.get("swap_ab", False) for c in fold} == {False, True}
        assert not [c for c in candidates(T, 64, 32, 4, 8) if c.get("path") == "fold"]
        assert not [c for c in candidates(T, 64, 32) if c.get("path") == "fold"]
    assert not [c for T in range(1, GEMV_MAX_T + 1) for c in candidates(T, 64, 32, 2, 8) if c.get("path") == "fold"]
    assert candidates(4096, 64, 32, 2, 8)[0] == DENSE                 # untimed prefill still runs the GEMM
    L = SS1Layout(20, 64 * 4, 4, block_k=32, block_n=16)
    w = torch.randn(L.weight_shape)
    with pytest.raises(ValueError, match=r"config path='fold' needs reduction > 1 and at most 2x the input in "
                                         r"folded copies: reduction=4 with block_k=32, vec=8 makes 64 copies of 1/4"):
        ss1_matmul_triton(torch.randn(8, 256), w, L.shifts(), None, 4, 32, 16, config={"path": "fold"}, vec=8)
    with pytest.raises(ValueError, match="config BN=32 must be a power of two dividing block_n=16"):
        L2 = SS1Layout(20, 64, 2, block_k=16, block_n=16)
        ss1_matmul_triton(torch.randn(8, 64), torch.randn(L2.weight_shape), L2.shifts(), None, 2, 16, 16,
                          config={"path": "fold", "BN": 32}, vec=8)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T", [1, 8, 16, 17, 333, 2048])
@pytest.mark.parametrize("geom", [(4096, 4096, 2), (1000, 3000, 4), (2048, 5632, 8), (768, 768, 1)])
def test_cuda_kernel_matches_reference(dtype, T, geom):
    out_f, in_f, r = geom
    L = SS1Layout(out_f, in_f, r, seed=7)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, in_f, device="cuda", generator=g).to(dtype)
    w = (torch.randn(L.weight_shape, device="cuda", generator=g) / in_f ** 0.5).to(dtype)
    b = torch.randn(out_f, device="cuda", generator=g).to(dtype)
    want = ss1_matmul_reference(x.double(), w.double(), L, b.double())
    scale = want.abs().max().item()
    # the autotuned config and every candidate, the rotated tiles loaded as the layout's aligned vectors
    for cfg in [None] + candidates(T, L.block_n, L.block_k, r, L.vec):
        y = ss1_matmul_triton(x, w, L.shifts("cuda"), b, r, L.block_k, L.block_n, config=cfg, vec=L.vec)
        torch.testing.assert_close(y.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.cuda
def test_cuda_op_dispatches_to_the_kernel_and_honours_kernel_options():
    L = SS1Layout(512, 1000, 4, seed=2)
    x = torch.randn(3, 7, 1000, device="cuda", dtype=torch.float16)
    w = torch.randn(L.weight_shape, device="cuda", dtype=torch.float16) / 30
    s = L.shifts("cuda")
    y = ss1_matmul(x, w, L, shifts=s)
    direct = ss1_matmul_triton(x, w, s, None, L.reduction, L.block_k, L.block_n)
    assert torch.equal(y, direct)
    with blastfx.kernels.options(kernels="reference"):
        ref = ss1_matmul(x, w, L, shifts=s)
    torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.cuda
def test_cuda_layer_trains_and_compiles():
    layer = SS1Linear(768, 512, 4, device="cuda")
    x = torch.randn(4, 9, 768, device="cuda")
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.square().mean().backward()
    assert layer.weight.grad is not None and bool(torch.isfinite(layer.weight.grad).all())
    torch.testing.assert_close(y, x @ layer.dense_weight().T + layer.bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", _fuzz_cases(12, seed=77))
def test_triton_expansion_is_the_reference_expansion_exactly(case):
    """One launch of the expansion kernel writes exactly the dense weight the reference's gather
    builds (a copy: bit for bit), on ragged shapes, every dtype, and tiles narrower than the hash's."""
    _, in_f, out_f, r, bk, bn, dtype, _, seed = case
    L = SS1Layout(out_f, in_f, r, seed=seed % 1000, block_k=bk, block_n=bn)
    w = torch.randn(L.weight_shape).to(dtype)
    for BN, KB in ((16, 256), (bn, bk)):
        got = expand_triton(w, L.shifts(), in_f, r, bk, bn, L.vec, BN=BN, KB=KB)
        assert torch.equal(got, ss1_to_dense(w, L))


def test_triton_expansion_takes_shifts_that_are_not_multiples_of_vec():
    """Any integer table (negative, past the tile) wraps as the reference does when vec = 1."""
    L = SS1Layout(20, 64, 2, seed=1, block_k=16, block_n=16)
    odd = L.shifts() + torch.tensor([[-48], [16], [35], [-3]])
    w = torch.randn(L.weight_shape)
    from blastfx.structures.ss1.ops import _expand
    assert torch.equal(expand_triton(w, odd, 64, 2, 16, 16), _expand(w, odd, 64, 2, 16, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expand_path_matches_the_float64_oracle(dtype):
    L = SS1Layout(45, 100, 4, seed=9, block_k=16, block_n=32)
    x = torch.randn(6, 2, L.in_features).to(dtype)
    w = torch.randn(L.weight_shape).to(dtype)
    b = torch.randn(L.out_features).to(dtype)
    for bias in (b, None):
        y = ss1_matmul_triton(x, w, L.shifts(), bias, 4, 16, 32, config=EXPAND, vec=L.vec)
        assert y.shape == (6, 2, L.out_features)
        _check(y.reshape(-1, L.out_features), x.reshape(-1, L.in_features), w, bias, L, dtype)
    with pytest.raises(ValueError, match=r"config path='expand' takes no \['BM'\] \(only BN, KB, num_warps\)"):
        ss1_matmul_triton(x, w, L.shifts(), None, 4, 16, 32, config={"path": "expand", "BM": 16})
    with pytest.raises(ValueError, match="expand KB=8 must be a power-of-two multiple of block_k=16"):
        ss1_matmul_triton(x, w, L.shifts(), None, 4, 16, 32, config={"path": "expand", "KB": 8})
