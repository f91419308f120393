"""The fit's matmul precision: TF32 only inside the fit, only on CUDA, and within rounding of fp32."""
import dataclasses

import pytest
import torch

from blastfx import BlastConfig, factorize
from blastfx.build.builder import BuildOptions
from blastfx.structures.blast.factorize.precision import matmul_precision
from conftest import spectrum_matrix


def _calibrated_problem(m, n, device, seed=0):
    """A weight with a decaying spectrum and the covariance of correlated inputs (8n samples)."""
    g = torch.Generator().manual_seed(seed)
    W = spectrum_matrix(m, n, 0.7)
    mix = torch.randn(n, n, generator=g) / n ** 0.5 + torch.eye(n)
    X = torch.randn(8 * n, n, generator=g) @ mix
    return W.to(device), (X.T @ X).to(device)


def test_tf32_on_a_cpu_computes_exactly_what_fp32_does():
    W, C = _calibrated_problem(96, 64, "cpu")
    exact = factorize(W, 16, 4, calibration=C, iters=5)
    tf32 = factorize(W, 16, 4, calibration=C, iters=5, precision="tf32")
    for a, b in zip((exact.U, exact.S, exact.V), (tf32.U, tf32.S, tf32.V)):
        assert torch.equal(a, b)


def test_an_unknown_precision_is_refused_by_name_before_any_work():
    with pytest.raises(ValueError, match=r"fit_precision must be one of \('fp32', 'tf32'\), got 'bf16'"):
        factorize(torch.randn(8, 8), 2, 1, precision="bf16")
    with pytest.raises(ValueError, match="fit_precision must be one of"):
        BlastConfig(fit_precision="half")


def test_the_setting_is_restored_also_when_the_block_raises():
    settings = torch.backends.cuda.matmul
    before = settings.fp32_precision
    with pytest.raises(RuntimeError, match="inside"):
        with matmul_precision("tf32", "cuda"):          # the switch itself needs no GPU
            assert settings.fp32_precision == "tf32"
            raise RuntimeError("inside")
    assert settings.fp32_precision == before
    with matmul_precision("tf32", "cpu"):               # a CPU fit leaves the CUDA setting alone
        assert settings.fp32_precision == before


@pytest.mark.cuda
def test_tf32_fit_reaches_the_fp32_fits_output_error_on_cuda():
    W, C = _calibrated_problem(1024, 768, "cuda")
    before = torch.backends.cuda.matmul.fp32_precision
    exact = factorize(W, 128, 4, calibration=C)
    tf32 = factorize(W, 128, 4, calibration=C, precision="tf32")
    assert torch.backends.cuda.matmul.fp32_precision == before
    # the reported errors are computed in fp32 in both: a like-for-like comparison
    assert tf32.output_error.item() <= exact.output_error.item() * 1.002 + 1e-4
    assert tf32.output_error.item() >= exact.output_error.item() * 0.99     # the same optimum, not a different fit


def test_the_default_fit_is_ieee_fp32():
    """TF32 products broke a real model's batched fit (benchmarks/fit_precision.py): opt-in only."""
    assert BlastConfig().fit_precision == "fp32"
    assert {f.name: f.default for f in dataclasses.fields(BuildOptions)}["fit_precision"] == "fp32"
