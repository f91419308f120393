"""Triton forward vs the float64 reference: ragged T, padded dims, b_out != b_in, all dtypes, both
the decode (split block-columns, atomic) and the prefill path. CPU: the Triton interpreter."""
import pytest
import torch

from blastfx.layout import BlastShape
from blastfx.ops import blast_matmul_reference

forward = pytest.importorskip("blastfx.kernels.forward")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def run_case(m, n, r, blocks, T, dtype, bias, config=None):
    s = BlastShape.make(m, n, r, blocks, allow_larger=True)
    g = torch.Generator().manual_seed(m * 31 + n * 7 + T)
    U, S, V = (torch.randn(*s.factor_shapes[k], generator=g, dtype=torch.float64) for k in "USV")
    x = torch.randn(T, n, generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64) if bias else None
    ref = blast_matmul_reference(x, U, S, V, b, m)
    cast = [t.to(DEVICE, dtype) if t is not None else None for t in (x, U, S, V, b)]
    y = forward.blast_matmul_triton(*cast, m, config=config)
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


@pytest.mark.parametrize("j_per_prog", [1, 2, 5])
def test_split_block_columns_any_split(j_per_prog):
    run_case(24, 25, 8, (2, 5), 4, torch.float32, bias=False, config={"J_PER_PROG": j_per_prog})


def test_leading_dims_and_dispatch_choice():
    s = BlastShape.make(64, 64, 16, 4)
    small, large = forward.launch_config(8, s, torch.device("cpu")), forward.launch_config(512, s, torch.device("cpu"))
    assert small["J_PER_PROG"] < s.b_in or s.b_in == 1          # decode splits block-columns
    assert large["J_PER_PROG"] == s.b_in                         # prefill keeps them in one program
    U, S, V = (torch.randn(*s.factor_shapes[k], device=DEVICE) for k in "USV")
    x = torch.randn(2, 3, 64, device=DEVICE)
    torch.testing.assert_close(forward.blast_matmul_triton(x, U, S, V), blast_matmul_reference(x, U, S, V),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_op_dispatches_to_triton_and_matches():
    import blastfx
    layer = blastfx.BlastLinear(4096, 4096, 1024, 16, dtype=torch.bfloat16, device="cuda")
    for T in (1, 16, 128, 1024):
        x = torch.randn(T, 4096, device="cuda", dtype=torch.bfloat16)
        ref = blast_matmul_reference(x.float(), layer.U.float(), layer.S.float(), layer.V.float(), layer.bias.float())
        rel = ((layer(x).float() - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, (T, rel)
