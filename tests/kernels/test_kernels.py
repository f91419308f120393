"""Triton forward vs the float64 reference: ragged T, padded dims, b_out != b_in, all dtypes, both
the decode (split block-columns, atomic) and the prefill path. CPU: the Triton interpreter."""
import pytest
import torch

from blastfx.structures.blast.layout import BlastShape
from blastfx.structures.blast.ops import blast_matmul_reference

forward = pytest.importorskip("blastfx.kernels.forward")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def run_case(m, n, r, blocks, T, dtype, bias, config=None, path=None):
    s = BlastShape.make(m, n, r, blocks, allow_larger=True)
    g = torch.Generator().manual_seed(m * 31 + n * 7 + T)
    U, S, V = (torch.randn(*s.factor_shapes[k], generator=g, dtype=torch.float64) for k in "USV")
    x = torch.randn(T, n, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64) if bias else None
    ref = blast_matmul_reference(x, U, S, V, b, m)
    cast = [t.to(DEVICE, dtype) if t is not None else None for t in (x, U, S, V, b)]
    y = forward.blast_matmul_triton(*cast, m, path=path, config=config)
    assert y.shape == (T, m) and y.dtype == dtype
    rel = ((y.double().cpu() - ref).norm() / ref.norm()).item()
    assert rel < TOL[dtype], rel


@pytest.mark.parametrize("m,n,r,blocks", [(24, 20, 8, (4, 2)), (30, 21, 5, (4, 3)), (33, 40, 16, (3, 5)),
                                          (32, 32, 16, (2, 2))])
@pytest.mark.parametrize("T", [1, 5, 17, 40])
def test_matches_reference_fp32(m, n, r, blocks, T):
    run_case(m, n, r, blocks, T, torch.float32, bias=T % 2 == 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [3, 24])
def test_matches_reference_half(dtype, T):
    run_case(40, 24, 8, (4, 3), T, dtype, bias=True)


@pytest.mark.parametrize("j_per_prog,q_chunk", [(1, None), (2, 16), (5, None), (1, 16)])
def test_split_block_columns_and_q_any_split(j_per_prog, q_chunk):
    run_case(24, 50, 8, (2, 5), 4, torch.float32, bias=False, path="fused",
             config={"J_PER_PROG": j_per_prog, "Q_CHUNK": q_chunk})


@pytest.mark.parametrize("path", sorted(forward.PATHS))
@pytest.mark.parametrize("m,n,r,blocks,T", [(24, 20, 8, (4, 2), 3), (33, 40, 16, (3, 5), 20), (32, 48, 24, (2, 3), 17)])
def test_every_path_matches_reference(path, m, n, r, blocks, T):
    run_case(m, n, r, blocks, _tokens_for(path, T), torch.float32, bias=True, path=path)


@pytest.mark.parametrize("path", sorted(forward.PATHS))
def test_every_path_half(path):
    run_case(40, 24, 8, (4, 3), _tokens_for(path, 18), torch.bfloat16, bias=True, path=path)


def _tokens_for(path, T):
    """The GEMV path takes only a few tokens (its own tests cover its limit)."""
    return min(T, forward.gemv_kernels.MAX_T) if path == "gemv" else T


def test_decode_config_fills_the_gpu():
    s = BlastShape.make(4096, 4096, 1024, 4)
    cfg = forward.decode_config(s, torch.device("cpu"), waves=4)   # 4 "SMs" on CPU
    programs = -(-s.rank // cfg["BR"]) * s.b_in * -(-s.q // cfg["Q_CHUNK"])
    assert programs >= 16 and cfg["Q_CHUNK"] % cfg["BQ"] == 0
    assert [p for p, _ in forward.candidates(1, s, torch.device("cpu"))][0] == "bmm_mix_bmm"
    assert {p for p, _ in forward.candidates(2048, s, torch.device("cpu"))} == set(forward.PATHS) - {"decode", "gemv"}
    assert {p for p, _ in forward.candidates(16, s, torch.device("cpu"))} == set(forward.PATHS) - {"gemv"}
    assert {p for p, _ in forward.candidates(1, s, torch.device("cpu"))} == set(forward.PATHS)


def test_deterministic_mode_leaves_out_paths_with_float_atomics():
    s = BlastShape.make(4096, 4096, 1024, 4)
    torch.use_deterministic_algorithms(True)
    try:
        paths = {p for p, _ in forward.candidates(1, s, torch.device("cpu"))}
    finally:
        torch.use_deterministic_algorithms(False)
    assert paths == {"bmm_mix_bmm", "decode"}
    assert "gemv" in {p for p, _ in forward.candidates(1, s, torch.device("cpu"))}


def test_autotune_buckets_and_default_without_cuda():
    from blastfx.kernels import autotune
    assert [autotune.token_bucket(t) for t in (1, 2, 3, 16, 17, 4096, 100000)] == [1, 2, 4, 16, 32, 4096, 8192]
    calls = []
    choice = autotune.choose(("k",), [("a", {}), ("b", {})], lambda p, c, k: calls.append(p))
    if not torch.cuda.is_available():
        assert choice == ("a", {}) and calls == []


def test_leading_dims():
    s = BlastShape.make(64, 64, 16, 4)
    U, S, V = (torch.randn(*s.factor_shapes[k], device=DEVICE) for k in "USV")
    x = torch.randn(2, 3, 64, device=DEVICE)
    torch.testing.assert_close(forward.blast_matmul_triton(x, U, S, V), blast_matmul_reference(x, U, S, V),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_cuda_op_dispatches_to_triton_and_matches():
    import blastfx
    layer = blastfx.BlastLinear(4096, 4096, 1024, 16, dtype=torch.bfloat16, device="cuda")
    for T in (1, 16, 128, 1024):
        x = torch.randn(T, 4096, device="cuda", dtype=torch.bfloat16)
        ref = blast_matmul_reference(x.float(), layer.U.float(), layer.S.float(), layer.V.float(), layer.bias.float())
        rel = ((layer(x).float() - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, (T, rel)


@pytest.mark.parametrize("mix_cfg", [{"BI": 16, "BTM": 16, "BRM": 32}, {"BI": 8, "BTM": 32, "BRM": 32}])
def test_wide_mix_configs(mix_cfg):
    run_case(48, 40, 8, (12, 5), 21, torch.float32, bias=True, path="bmm_mix_bmm", config=mix_cfg)
