"""Quantized factors: formats, the op and its reference, and the layer, against float64 math."""
import math

import pytest
import torch

from blastfx.structures.blast.layout import BlastShape
from blastfx.structures.blast.nn import BlastLinear
from blastfx.structures.blast.ops import blast_matmul_reference, blast_to_dense
from blastfx.structures.blast.quant import QuantizedFactors, blast_matmul_quantized, formats, round_factors


def _float_factors(m, n, r, blocks, seed=0, dtype=torch.float64):
    shape = BlastShape.make(m, n, r, blocks, allow_larger=True)
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(shape.b_out, shape.p, r, generator=g, dtype=dtype)
    V = torch.randn(shape.b_in, shape.q, r, generator=g, dtype=dtype) * torch.rand(1, 1, r, generator=g, dtype=dtype)
    S = torch.randn(shape.b_out, shape.b_in, r, generator=g, dtype=dtype)
    U.view(-1, r)[m:] = 0
    V.view(-1, r)[n:] = 0
    return shape, U, S, V


FORMAT_NAMES = ["int8", "float8_e4m3fn", "int4"]


def _quantized(m, n, r, blocks, fmt="int8", seed=0):
    shape, U, S, V = _float_factors(m, n, r, blocks, seed)
    class F:  # noqa: E701 -- the factors record round_factors reads
        pass
    f = F()
    f.U, f.S, f.V, f.shape = U, S, V, shape
    return round_factors(f, fmt), (U, S, V)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_rounding_error_is_bounded_by_the_scale_and_padding_stays_zero(name):
    fmt = formats.get(name)
    q, (U, S, V) = _quantized(50, 37, 6, (3, 2), name)
    Ud, _, Vd = q.dequantized(torch.float64)
    assert q.U.dtype == fmt.storage and q.V.dtype == fmt.storage
    assert q.U.shape == (3, 17, fmt.stored_length(6)) and q.V.shape == (2, 19, fmt.stored_length(6))
    assert q.U_scale.shape == (3, 17) and q.V_scale.shape == (2, 6) and q.U_scale.dtype == torch.float32
    if fmt.integer:        # half a step of each row's (column's) grid
        assert ((Ud - U).abs() <= q.U_scale.double().unsqueeze(-1) / 2 + 1e-12).all()
        assert ((Vd - V).abs() <= q.V_scale.double().unsqueeze(-2) / 2 + 1e-12).all()
    else:                  # e4m3: 3 mantissa bits, relative error at most 2^-4 of each entry (normal range)
        big = U.abs() > U.abs().amax(-1, keepdim=True) / 64
        assert ((Ud - U).abs()[big] <= U.abs()[big] / 16 + 1e-12).all()
    assert Ud.reshape(-1, 6)[50:].abs().sum() == 0 and Vd.reshape(-1, 6)[37:].abs().sum() == 0
    Uc, Vc = formats.codes_of(q.U, 6), formats.codes_of(q.V, 6)
    assert Uc.float().abs().amax() == fmt.qmax and Vc.float().abs().amax() == fmt.qmax


def test_int4_packing_known_answer():
    """Two codes per byte along the last dimension, element 2k in the low nibble, two's complement;
    an odd length padded with a zero code."""
    codes = torch.tensor([[1, -1, 7, -7, 0], [-2, 3, 0, 5, -4]], dtype=torch.int8)
    packed = torch.tensor([[0xF1, 0x97, 0x00], [0x3E, 0x50, 0x0C]], dtype=torch.uint8)
    assert torch.equal(formats.pack_int4(codes), packed)
    assert torch.equal(formats.unpack_int4(packed, 5), codes)
    assert torch.equal(formats.unpack_int4(torch.tensor([0x87], dtype=torch.uint8), 2),
                       torch.tensor([7, -8], dtype=torch.int8))
    fmt = formats.get("int4")
    assert formats.of_storage(torch.uint8) is fmt and fmt.bits == 4 and fmt.qmax == 7
    # encode rounds, clamps to [-7, 7] and packs: x / scale = [0.6, -1.4, 9, -9, 2.5] -> [1, -1, 7, -7, 2]
    x = torch.tensor([[0.3, -0.7, 4.5, -4.5, 1.25]])
    assert torch.equal(fmt.encode(x, torch.tensor(0.5)), torch.tensor([[0xF1, 0x97, 0x02]], dtype=torch.uint8))


@pytest.mark.parametrize("r", [1, 2, 5, 8, 13])
def test_int4_pack_round_trips_random_codes(r):
    g = torch.Generator().manual_seed(r)
    codes = torch.randint(-8, 8, (3, 4, r), generator=g, dtype=torch.int8)
    packed = formats.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 4, (r + 1) // 2)
    assert torch.equal(formats.unpack_int4(packed, r), codes)
    if r % 2:                                                       # the padding nibble is a zero code
        assert (packed[..., -1] >> 4).eq(0).all()
    scale = torch.rand(3, 4, dtype=torch.float64) + 0.5              # dequantize = unpacked codes times scales
    torch.testing.assert_close(formats.dequantize_u(packed, scale, torch.float64, rank=r),
                               codes.double() * scale.unsqueeze(-1), rtol=0, atol=0)


def test_int4_lengths_are_checked():
    packed = formats.pack_int4(torch.zeros(2, 3, 5, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"do not hold r=7: their last dimension must be 4"):
        formats.codes_of(packed, 7)
    with pytest.raises(ValueError, match="unpacking them needs the rank r"):
        formats.dequantize_u(packed, torch.ones(2, 3))
    with pytest.raises(ValueError, match="int4 codes must lie in"):
        formats.pack_int4(torch.tensor([8]))
    with pytest.raises(ValueError, match=r"do not hold r=8"):
        formats.dequantize_v(packed, torch.ones(2, 8))


def test_format_names_are_checked():
    with pytest.raises(ValueError, match="factor_dtype must be one of .*'int4'.* got 'int3'"):
        formats.get("int3")
    assert formats.check_name(None) is None
    with pytest.raises(ValueError, match="'model'"):
        formats.check_name("model")
    assert formats.check_name("model", allow_model=True) == "model"


@pytest.mark.parametrize("name,r", [("int8", 6), ("float8_e4m3fn", 6), ("int4", 6), ("int4", 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_op_is_the_dequantized_product_in_float64(name, r, bias):
    q, _ = _quantized(50, 37, r, (3, 2), name)
    x = torch.randn(2, 3, 37, dtype=torch.float64)
    b = torch.randn(50, dtype=torch.float64) if bias else None
    # float64 truth: codes (unpacked by the plain reference) times scales by hand, then the dense matrix
    U = formats.codes_of(q.U, r).double() * q.U_scale.double()[..., None]
    V = formats.codes_of(q.V, r).double() * q.V_scale.double()[:, None, :]
    W = blast_to_dense(U, q.S, V, 50, 37)
    want = x @ W.T + (b if bias else 0)
    y = blast_matmul_quantized(x, q.U, q.U_scale, q.S, q.V, q.V_scale, b, 50)
    assert y.shape == (2, 3, 50) and y.dtype == torch.float64
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    y32 = blast_matmul_quantized(x.float(), q.U, q.U_scale, q.S.float(), q.V, q.V_scale,
                                 b.float() if bias else None, 50)
    torch.testing.assert_close(y32.double(), want, rtol=1e-4, atol=1e-4)


def test_op_errors_name_the_argument():
    q, _ = _quantized(50, 37, 6, (3, 2))
    x = torch.randn(2, 37, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"U_scale must have shape \(3, 17\)"):
        blast_matmul_quantized(x, q.U, q.U_scale[:, :5], q.S, q.V, q.V_scale, None, 50)
    with pytest.raises(ValueError, match=r"U and V in one format"):
        blast_matmul_quantized(x, q.U, q.U_scale, q.S, q.V.to(torch.float8_e4m3fn), q.V_scale, None, 50)
    with pytest.raises(ValueError, match="must be stored as one of"):
        blast_matmul_quantized(x, q.U.double(), q.U_scale, q.S, q.V.double(), q.V_scale, None, 50)
    with pytest.raises(ValueError, match="one dtype for x, S and bias"):
        blast_matmul_quantized(x.float(), q.U, q.U_scale, q.S, q.V, q.V_scale, None, 50)
    with pytest.raises(ValueError, match="V_scale must be floating point"):
        blast_matmul_quantized(x, q.U, q.U_scale, q.S, q.V, q.V_scale.to(torch.int32), None, 50)
    q4, _ = _quantized(50, 37, 6, (3, 2), "int4")
    with pytest.raises(ValueError, match=r"int4 codes V of shape \(2, 19, 4\) do not match r=6 \(S's last dimension\)"):
        blast_matmul_quantized(x, q4.U, q4.U_scale, q4.S, torch.cat([q4.V, q4.V[..., :1]], -1), q4.V_scale, None, 50)
    with pytest.raises(ValueError, match=r"int4 codes U of shape \(3, 17, 3\) do not match r=4 .*last dimension 2"):
        blast_matmul_quantized(x, q4.U, q4.U_scale, q4.S[..., :4], q4.V, q4.V_scale[:, :4], None, 50)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_gradients_of_x_s_and_bias(name):
    q, _ = _quantized(24, 20, 5, (2, 2), name)
    x = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    S = q.S.clone().requires_grad_(True)
    b = torch.randn(24, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, S, b: blast_matmul_quantized(x, q.U, q.U_scale, S, q.V, q.V_scale, b, 24),
                             (x, S, b))
    # and they are the float op's gradients at the dequantized factors
    U, _, V = q.dequantized(torch.float64)
    g = torch.randn(3, 24, dtype=torch.float64)
    got = torch.autograd.grad(blast_matmul_quantized(x, q.U, q.U_scale, S, q.V, q.V_scale, b, 24), (x, S, b), g)
    want = torch.autograd.grad(blast_matmul_reference(x, U, S, V, b, 24), (x, S, b), g)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w)


def test_quantized_layer_forward_state_and_refusals():
    q, _ = _quantized(50, 37, 6, (3, 2))
    layer = BlastLinear.from_quantized(q, torch.randn(50), dtype=torch.float32)
    assert layer.quantized and layer.factor_dtype == "int8"
    state = layer.state_dict()
    assert {k: v.dtype for k, v in state.items()} == {
        "U": torch.int8, "V": torch.int8, "U_scale": torch.float32, "V_scale": torch.float32,
        "S": torch.float32, "bias": torch.float32}
    assert [n for n, _ in layer.named_parameters()] == ["S", "bias"]
    x = torch.randn(4, 37)
    W = q.to_dense(torch.float64)
    torch.testing.assert_close(layer(x).double(), x.double() @ W.T + layer.bias.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.to_dense().double(), W, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="int8 factors, which cannot change rank"):
        layer.add_low_rank_(torch.randn(50, 2), torch.randn(2, 37))
    with pytest.raises(ValueError, match="int8 factors"):
        layer.remove_rank_(1)
    assert "factor_dtype=int8" in repr(layer)


def test_int4_layer_state_forward_and_padding_check():
    q, _ = _quantized(50, 37, 7, (3, 2), "int4")
    layer = BlastLinear.from_quantized(q, torch.randn(50), dtype=torch.float32)
    assert layer.factor_dtype == "int4" and "factor_dtype=int4" in repr(layer)
    assert {k: (tuple(v.shape), v.dtype) for k, v in layer.state_dict().items()} == {
        "U": ((3, 17, 4), torch.uint8), "V": ((2, 19, 4), torch.uint8), "U_scale": ((3, 17), torch.float32),
        "V_scale": ((2, 7), torch.float32), "S": ((3, 2, 7), torch.float32), "bias": ((50,), torch.float32)}
    x = torch.randn(4, 37)
    W = q.to_dense(torch.float64)
    torch.testing.assert_close(layer(x).double(), x.double() @ W.T + layer.bias.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.to_dense().double(), W, rtol=1e-6, atol=1e-6)
    bad = q.U.clone()
    bad[2, 16, 1] = 0x10                    # code 3 of the last (padding) row of U: must be zero
    with pytest.raises(ValueError, match="1 nonzero .* in the padding of U"):
        BlastLinear.from_quantized(type(q)(bad, q.U_scale, q.S, q.V, q.V_scale, q.shape, q.format))


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_empty_quantized_layer_matches_a_built_one_and_loads_it(name):
    q, _ = _quantized(50, 37, 6, (3, 2), name)
    built = BlastLinear.from_quantized(q, None, dtype=torch.bfloat16)
    empty = torch.nn.utils.skip_init(BlastLinear, 37, 50, 6, (3, 2), bias=False, dtype=torch.bfloat16,
                                     allow_larger=True, factor_dtype=name)
    assert {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in built.state_dict().items()}
    empty.load_state_dict(built.state_dict())
    x = torch.randn(3, 37, dtype=torch.bfloat16)
    assert torch.equal(empty(x), built(x))
    fresh = BlastLinear(37, 50, 6, (3, 2), factor_dtype=name, allow_larger=True)   # random init, rounded
    assert fresh.U.dtype == formats.get(name).storage
    assert formats.codes_of(fresh.U, 6).reshape(-1, 6)[50:].abs().sum() == 0
    assert torch.isfinite(fresh(torch.randn(2, 37))).all()


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantized_layer_under_torch_compile(name):
    q, _ = _quantized(50, 37, 8, (3, 2), name)
    layer = BlastLinear.from_quantized(q, torch.randn(50), dtype=torch.float32)
    x = torch.randn(5, 37)
    compiled = torch.compile(layer, backend="blast")
    torch.testing.assert_close(compiled(x), layer(x))


def test_quantized_factors_index_and_length():
    q, _ = _quantized(24, 20, 4, (2, 2))
    batched = QuantizedFactors(*(t.unsqueeze(0).expand(2, *t.shape) for t in (q.U, q.U_scale, q.S, q.V, q.V_scale)),
                               q.shape, q.format)
    assert len(batched) == 2 and torch.equal(batched[1].to_dense(), q.to_dense())
    with pytest.raises(TypeError):
        len(q)
    assert math.isclose(float(q.to_dense().abs().sum()), float(batched.to_dense()[0].abs().sum()))


def test_rank_multiple_makes_a_row_of_codes_whole_16_byte_vectors():
    for name, multiple in (("int4", 32), ("int8", 16), ("float8_e4m3fn", 16)):
        fmt = formats.get(name)
        assert fmt.rank_multiple == multiple
        row_bytes = fmt.stored_length(multiple) * torch.empty((), dtype=fmt.storage).element_size()
        assert row_bytes == 16
