"""The one-pass dequantization kernel against the PyTorch reference (:mod:`...quant.formats`), bit for
bit: int8, packed int4 (odd r: a pad nibble) and float8 codes, into fp32, fp16 and bf16, on shapes
whose rows and r are not multiples of the kernel's tiles; on CPU under the Triton interpreter."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from blastfx.kernels import dequantize
from blastfx.structures.blast.quant import formats
from blastfx.structures.blast.quant.ops import dequantized as reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NAMES = ("int8", "int4", "float8_e4m3fn")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _same(got, want):
    """Bit for bit; under the interpreter, which casts to bf16 by truncation rather than rounding to
    nearest as the GPU does, bf16 within one unit in the last place (toward zero)."""
    if CUDA or got.dtype != torch.bfloat16:
        return torch.equal(got, want)
    ulp = want.float().abs() * 2.0 ** -7
    return bool(((got.float() - want.float()).abs() <= ulp).all()) and bool((got.float().abs() <= want.float().abs()).all())


def _factors(b_out, p, b_in, q, r, name, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(b_out, p, r, generator=g) * torch.rand(b_out, p, 1, generator=g) * 3
    V = torch.randn(b_in, q, r, generator=g) * torch.rand(b_in, 1, r, generator=g) * 3
    fmt = formats.get(name)
    (Uc, su), (Vc, sv) = formats.quantize_u(U, fmt), formats.quantize_v(V, fmt)
    return [t.to(DEVICE) for t in (Uc, su, Vc, sv)]


@settings(max_examples=12 if not CUDA else 60, deadline=None)
@given(b_out=st.integers(1, 4), p=st.integers(1, 70), b_in=st.integers(1, 4), q=st.integers(1, 70),
       r=st.integers(1, 300), name=st.sampled_from(NAMES), dtype=st.sampled_from(DTYPES))
def test_matches_the_reference_bit_for_bit(b_out, p, b_in, q, r, name, dtype):
    Uc, su, Vc, sv = _factors(b_out, p, b_in, q, r, name)
    U, V = dequantize.dequantized(Uc, su, Vc, sv, dtype)
    U_ref, V_ref = reference(Uc, su, Vc, sv, dtype)
    assert U.dtype == V.dtype == dtype and U.shape == U_ref.shape == (b_out, p, r) and V.shape == (b_in, q, r)
    assert _same(U, U_ref) and _same(V, V_ref)


@pytest.mark.parametrize("name", NAMES)
def test_a_poisoned_output_is_fully_overwritten(monkeypatch, name):
    """Every element is written (none left from the allocation): the output buffer is filled with NaN first."""
    real_empty = torch.empty
    monkeypatch.setattr(dequantize.torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    Uc, su, Vc, sv = _factors(3, 37, 2, 45, 131, name, seed=1)
    U, V = dequantize.dequantized(Uc, su, Vc, sv, torch.bfloat16)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()
    U_ref, V_ref = reference(Uc, su, Vc, sv, torch.bfloat16)
    assert _same(U, U_ref) and _same(V, V_ref)


def test_float64_and_float_factors_take_the_reference():
    Uc, su, Vc, sv = _factors(2, 5, 2, 6, 7, "int8")
    U, V = dequantize.dequantized(Uc, su, Vc, sv, torch.float64)
    U_ref, V_ref = reference(Uc, su, Vc, sv, torch.float64)
    assert U.dtype == torch.float64 and torch.equal(U, U_ref) and torch.equal(V, V_ref)
    assert not dequantize.supported(torch.zeros(2, 2), torch.bfloat16)


def test_codes_that_do_not_hold_r_are_refused():
    Uc, su, Vc, sv = _factors(2, 5, 2, 6, 8, "int4")
    with pytest.raises(ValueError, match=r"int4 codes of shape \(2, 5, 4\) do not hold r=9: .* must be 5"):
        dequantize.dequantize_u(Uc, su, torch.bfloat16, 9)


@pytest.mark.parametrize("name", NAMES)
def test_empty_factors_give_empty_copies(name):
    fmt = formats.get(name)
    Uc = torch.zeros(2, 0, fmt.stored_length(6), dtype=fmt.storage, device=DEVICE)
    Vc = torch.zeros(2, 0, fmt.stored_length(6), dtype=fmt.storage, device=DEVICE)
    U = dequantize.dequantize_u(Uc, torch.ones(2, 0, device=DEVICE), torch.bfloat16, 6)
    V = dequantize.dequantize_v(Vc, torch.ones(2, 6, device=DEVICE), torch.bfloat16)
    assert U.shape == (2, 0, 6) and V.shape == (2, 0, 6) and U.dtype == V.dtype == torch.bfloat16
