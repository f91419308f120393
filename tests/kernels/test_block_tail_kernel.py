"""The block tail (``blastfx.kernels.block_tail``): o_proj, the residual add, an RMSNorm and the gated
MLP in four launches, against the op's reference in float64. On CPU under the Triton interpreter."""
import pytest
import torch

from blastfx.compiler.block_tail import blast_block_tail
from blastfx.kernels import block_tail, gemv, mlp_chain

from decode_cases import CUDA, DEVICE, TOL, factors

TINY = {**mlp_chain.DEFAULT, "BQ": 16, "BR": 16, "BP": 16, "BK": 16, "BPM": 4}


def _layers(H, I, ranks, blocks, biases, dtype, seed=0, garbage_padding=False):
    """o (H x H, b_mid x b_o_in blocks), gate and up (I x H), down (H x I) as (U, S, V, bias, shape);
    ``garbage_padding``: the padding rows of every U and V hold large values (the reference never
    reads them, nor may the kernels)."""
    (ro, rg, ru, rd), (b_mid, b_inner, b_o_in) = ranks, blocks
    specs = ((H, H, ro, (b_mid, b_o_in)), (I, H, rg, (b_inner, b_mid)), (I, H, ru, (b_inner, b_mid)),
             (H, I, rd, (b_mid, b_inner)))
    out = []
    for k, (rows, cols, r, b) in enumerate(specs):
        shape, U, S, V, bias = factors(rows, cols, r, *b, dtype, biases[k], seed + k)
        if garbage_padding:
            U.view(-1, r)[rows:] = 1e3
            V.view(-1, r)[cols:] = 1e3
        out.append((U, S, V, bias, shape))
    return out


def _reference(x, residual, layers, weight, eps):
    U, S, V, b, shapes = zip(*layers)
    d = lambda t: t.double() if t is not None else None        # noqa: E731
    return blast_block_tail(x.double(), residual.double(), [d(u) for u in U], [d(s) for s in S], [d(v) for v in V],
                            [d(t) for t in b], [s.out_features for s in shapes], weight.double(), eps)


def _check(T, H, I, ranks, blocks, biases, dtype=torch.float32, cfg=TINY, seed=0, garbage_padding=False):
    layers = _layers(H, I, ranks, blocks, biases, dtype, seed, garbage_padding)
    g = torch.Generator().manual_seed(seed + 10)
    x = torch.randn(T, H, generator=g).to(DEVICE, dtype)
    residual = (3 * torch.randn(T, H, generator=g)).to(DEVICE, dtype)
    weight = (1 + 0.5 * torch.randn(H, generator=g)).to(DEVICE, dtype)
    out = block_tail.blast_block_tail_gemv(x, residual, layers[0], weight, 1e-5, *layers[1:], cfg, interpret=not CUDA)
    ref = _reference(x, residual, layers, weight, 1e-5)
    assert out.shape == (T, 2 * H) and out.dtype == dtype and torch.isfinite(out).all()
    for got, want in ((out[:, :H], ref[:, :H]), (out[:, H:], ref[:, H:])):     # h, then the MLP's output
        assert (got.double() - want).abs().max().item() / (want.abs().max().item() + 1e-6) < TOL[dtype]


@pytest.mark.parametrize("T,H,I,ranks,blocks,biases,dtype", [
    (1, 48, 64, (16, 16, 16, 16), (4, 4, 4), (False, False, False, False), torch.float32),
    (3, 40, 96, (8, 8, 24, 16), (2, 3, 4), (True, True, False, True), torch.float32),   # ranks, blocks differ
    (4, 36, 62, (16, 16, 8, 24), (4, 2, 2), (True, True, True, False), torch.float16),   # padding
    (2, 64, 80, (24, 16, 16, 8), (4, 4, 1), (False, True, True, True), torch.bfloat16),  # o with one input block
], ids=["square-blocks", "ranks-and-blocks-differ", "padding", "o-low-rank-input"])
def test_matches_reference(T, H, I, ranks, blocks, biases, dtype):
    _check(T, H, I, ranks, blocks, biases, dtype)


def test_calls_in_a_row_with_other_gemv_calls_each_start_from_a_cleared_workspace():
    """The tail shares the GEMV workspace with one-layer calls and MLP chains: each call clears the
    half the next uses, so alternating them (an odd count of each) stays exact."""
    for k in range(3):
        _check(1 + k % 2, 48, 64, (16, 16, 16, 16), (4, 4, 4), (True, False, False, True), seed=k)
        shape, U, S, V, b = factors(40, 48, 16, 4, 4, torch.float32, True, seed=k)
        x = torch.randn(2, 48, device=DEVICE)
        y = gemv.blast_gemv(x, U, S, V, b, shape, TINY, interpret=not CUDA)
        from blastfx.structures.blast.ops import blast_matmul_reference
        ref = blast_matmul_reference(x.double(), U.double(), S.double(), V.double(), b.double(), 40)
        assert (y.double() - ref).abs().max() / ref.abs().max() < 1e-4


def test_poisoned_output_and_workspace_are_overwritten_or_cleared(monkeypatch):
    """The output buffer starts as NaN and the workspace's unused half holds garbage from a wider call:
    the result equals the reference."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        return real_empty(*args, **kwargs).fill_(float("nan"))
    _check(2, 48, 64, (16, 16, 16, 16), (4, 4, 4), (True, True, True, True))       # leaves a dirty half
    monkeypatch.setattr(block_tail.torch, "empty", poisoned)
    _check(1, 40, 96, (8, 8, 24, 16), (2, 3, 4), (True, False, True, False))


def test_refuses_what_it_cannot_chain_by_name():
    layers = _layers(48, 64, (16, 16, 16, 16), (4, 4, 4), (False,) * 4, torch.float32)
    x, res, w = (torch.randn(1, 48, device=DEVICE), torch.randn(1, 48, device=DEVICE), torch.ones(48, device=DEVICE))
    mismatched = _layers(48, 64, (16, 16, 16, 16), (2, 4, 4), (False,) * 4, torch.float32)   # o has 2 row blocks
    assert "o's output blocks (2 of 24" in block_tail.tail_chainable(mismatched[0], *layers[1:])
    with pytest.raises(ValueError, match="cannot run these layers as one block tail: o's output blocks"):
        block_tail.blast_block_tail_gemv(x, res, mismatched[0], w, 1e-5, *layers[1:], TINY, interpret=not CUDA)
    with pytest.raises(ValueError, match=r"the residual must be \(1, 48\) and the norm weight \(48,\)"):
        block_tail.blast_block_tail_gemv(x, res[:, :40], layers[0], w, 1e-5, *layers[1:], TINY, interpret=not CUDA)
    with pytest.raises(ValueError, match="block tail mode must be 'two' or 'pdl'"):
        block_tail.blast_block_tail_gemv(x, res, layers[0], w, 1e-5, *layers[1:], {**TINY, "mode": "persistent"},
                                         interpret=not CUDA)
    with pytest.raises(ValueError, match="runs at most 4 tokens"):
        block_tail.blast_block_tail_gemv(torch.randn(5, 48, device=DEVICE), res, layers[0], w, 1e-5, *layers[1:],
                                         TINY, interpret=not CUDA)


@pytest.mark.parametrize("name", ["int8", "float8_e4m3fn", "int4"])
@pytest.mark.parametrize("T,dtype", [(1, torch.float32), (3, torch.bfloat16)])
def test_quantized_factors_match_the_quantized_reference(T, dtype, name):
    """Codes in all four layers: o's read by its stage 1 and the lead kernel (row scales), gate's and
    up's V codes and column scales by the lead kernel, the rest by the MLP chain's kernels."""
    import torch.nn.functional as F
    from blastfx.compiler.block_tail import rms_norm_reference
    from blastfx.structures.blast.quant import formats
    from blastfx.structures.blast.quant.ops import blast_matmul_quantized_reference as qref
    fmt = formats.get(name)
    layers = []
    for U, S, V, b, shape in _layers(40, 96, (16, 8, 24, 16), (2, 3, 4), (True, True, False, True), dtype, seed=5):
        (Uc, su), (Vc, sv) = formats.quantize_u(U.float(), fmt), formats.quantize_v(V.float(), fmt)
        layers.append((Uc, S, Vc, b, shape, su, sv))
    g = torch.Generator().manual_seed(7)
    x, residual = (torch.randn(T, 40, generator=g).to(DEVICE, dtype) for _ in range(2))
    weight = (1 + 0.5 * torch.randn(40, generator=g)).to(DEVICE, dtype)
    out = block_tail.blast_block_tail_gemv(x, residual, layers[0], weight, 1e-5, *layers[1:], TINY, interpret=not CUDA)
    d = lambda t: t.double() if t is not None else None                  # noqa: E731
    call = lambda a, layer: qref(a, layer[0], layer[5], d(layer[1]), layer[2], layer[6], d(layer[3]),  # noqa: E731
                                 layer[4].out_features)
    h = residual.double() + call(x.double(), layers[0])
    n = rms_norm_reference(h, weight.double(), 1e-5)
    want = torch.cat([h, call(F.silu(call(n, layers[1])) * call(n, layers[2]), layers[3])], dim=-1)
    assert out.shape == (T, 80) and torch.isfinite(out).all()
    for got, ref in ((out[:, :40], want[:, :40]), (out[:, 40:], want[:, 40:])):
        assert (got.double() - ref).abs().max().item() / (ref.abs().max().item() + 1e-6) < TOL[dtype]


def _seam_reference(x, residual, layers, heads, weight, next_weight, eps):
    """float64: h2 = h + mlp(norm(h)), h = residual + o(x); the heads of norm(h2)."""
    from blastfx.compiler.block_tail import rms_norm_reference
    from blastfx.compiler.mlp_chain import blast_mlp_chain
    from blastfx.structures.blast.ops import blast_matmul_reference as ref
    d = lambda t: t.double() if t is not None else None                  # noqa: E731
    call = lambda a, layer: ref(a, d(layer[0]), d(layer[1]), d(layer[2]), d(layer[3]), layer[4].out_features)  # noqa
    h = residual.double() + call(x.double(), layers[0])
    mlp = blast_mlp_chain(rms_norm_reference(h, weight.double(), eps), *([d(m[k]) for m in layers[1:]] for k in range(4)),
                          [m[4].out_features for m in layers[1:]])
    h2 = h + mlp
    n2 = rms_norm_reference(h2, next_weight.double(), eps)
    return torch.cat([h2] + [call(n2, head) for head in heads], dim=-1)


@pytest.mark.parametrize("T,dtype,head_specs", [
    (1, torch.float32, [(40, 16, 2, True), (16, 8, 2, False), (16, 8, 2, False)]),    # q, and narrower k, v (GQA)
    (3, torch.float32, [(40, 8, 4, False), (24, 16, 1, True)]),                        # two heads, b_out differ
    (4, torch.bfloat16, [(40, 16, 2, True), (16, 8, 2, False), (16, 8, 2, False)]),
], ids=["qkv", "two-heads", "qkv-bf16"])
def test_seam_matches_reference(T, dtype, head_specs):
    """A tail and the next block's q/k/v in five launches: the lead kernel for down streams q's, k's
    and v's V rows against h2 * weight, and their stage 2 applies the next norm's scale."""
    H = 40
    layers = _layers(H, 96, (16, 8, 24, 16), (2, 3, 4), (True, True, False, True), dtype, seed=3)
    heads = []
    for k, (m, r, b_out, bias) in enumerate(head_specs):
        shape, U, S, V, b = factors(m, H, r, b_out, 2, dtype, bias, seed=20 + k)
        heads.append((U, S, V, b, shape))
    g = torch.Generator().manual_seed(9)
    x, residual = (torch.randn(T, H, generator=g).to(DEVICE, dtype) for _ in range(2))
    weight, next_weight = ((1 + 0.5 * torch.randn(H, generator=g)).to(DEVICE, dtype) for _ in range(2))
    out = block_tail.blast_block_seam_gemv(x, residual, layers[0], weight, 1e-5, *layers[1:], next_weight, 1e-5,
                                           heads, TINY, interpret=not CUDA)
    want = _seam_reference(x, residual, layers, heads, weight, next_weight, 1e-5)
    assert out.shape == want.shape and out.dtype == dtype and out.is_contiguous() and torch.isfinite(out).all()
    start = 0
    for width in [H] + [m for m, *_ in head_specs]:                     # h2, then each head
        got, ref = out[:, start:start + width], want[:, start:start + width]
        assert (got.double() - ref).abs().max().item() / (ref.abs().max().item() + 1e-6) < TOL[dtype]
        start += width


def test_padding_rows_are_never_read():
    """36 features in blocks of 9 and 18 and 62 = 4 x 16 - 2 intermediate features: every padding row
    of U and V holds 1e3, which reaches the output only through a missing mask."""
    _check(3, 36, 62, (16, 16, 8, 24), (4, 2, 2), (True, True, True, False), garbage_padding=True)
    _check(2, 33, 50, (8, 8, 16, 8), (3, 4, 3), (False, True, False, True), garbage_padding=True)
