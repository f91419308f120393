"""What the kernels' launchers accept as codes (``blastfx.kernels.codes.code_format``): the bits and
packing each format launches with, and a clear refusal of scales without codes, codes of a format
no kernel reads, and codes too short or too long for the rank."""
import pytest
import torch

from blastfx.kernels.codes import CODE_DTYPES, CODE_NAMES, code_format
from blastfx.structures.blast.quant import formats


def _quantized(name, r=9):
    fmt = formats.get(name)
    U, V = torch.randn(2, 5, r), torch.randn(3, 4, r)
    return (*formats.quantize_u(U, fmt), *formats.quantize_v(V, fmt))


def test_float_factors_launch_without_codes():
    U, V = torch.randn(2, 5, 9), torch.randn(3, 4, 9)
    assert code_format(U, V, None, None, 9, "k") == (0, 1)


@pytest.mark.parametrize("name,expected", [("int8", (8, 1)), ("int4", (4, 2)), ("float8_e4m3fn", (8, 1))])
def test_each_format_launches_with_its_bits_and_packing(name, expected):
    Uc, su, Vc, sv = _quantized(name)
    assert Uc.dtype in CODE_DTYPES and name in CODE_NAMES
    assert code_format(Uc, Vc, su, sv, 9, "k") == expected


def test_bad_codes_and_scales_are_refused_by_name():
    Uc, su, Vc, sv = _quantized("int4")                  # rank 9: 5 bytes a row
    with pytest.raises(ValueError, match="the_kernel takes U_scale and V_scale together"):
        code_format(Uc, Vc, su, None, 9, "the_kernel")
    with pytest.raises(ValueError, match=r"the_kernel reads quantized factors as codes of \('int8', 'int4', "
                                         r"'float8_e4m3fn'\), got U.dtype=torch.float32"):
        code_format(Uc.float(), Vc.float(), su, sv, 9, "the_kernel")
    with pytest.raises(ValueError, match="got U.dtype=torch.uint8, V.dtype=torch.int8"):
        code_format(Uc, _quantized("int8")[2], su, sv, 9, "the_kernel")
    with pytest.raises(ValueError, match=r"do not hold rank 9: their last dimension must be 5"):
        code_format(Uc[..., :4], Vc[..., :4], su, sv, 9, "the_kernel")
    with pytest.raises(ValueError, match=r"do not hold rank 7: their last dimension must be 4"):
        code_format(Uc, Vc, su, sv, 7, "the_kernel")
