"""The MLP chain (``blastfx.kernels.mlp_chain``): ``down(silu(gate(x)) * up(x))`` in three launches,
against the op's reference in float64. On CPU it runs under the Triton interpreter, programs one
after another; on CUDA also in its PDL form and in a CUDA graph. It shares the GEMV workspace, so
the tests also interleave it with one-layer and grouped GEMV calls."""
import pytest
import torch
import torch.nn.functional as F

from blastfx.compiler.mlp_chain import blast_mlp_chain
from blastfx.kernels import gemv, mlp_chain

from decode_cases import CUDA, DEVICE, TOL, factors

TINY = {**mlp_chain.DEFAULT, "BQ": 16, "BR": 16, "BP": 16, "BK": 16, "BPM": 4}


def _layers(n, m, ranks, blocks, biases, dtype, seed=0, garbage_padding=False):
    """gate and up (m x n) and down (n x m) as (U, S, V, bias, shape); ``garbage_padding``: the padding
    rows of gate's and up's U and of down's V hold values (the reference never reads them: it cuts
    gate's and up's outputs to m features and pads down's input with zeros; nor may the chain)."""
    (rg, ru, rd), (b_mid, b_down_out) = ranks, blocks
    out = []
    for k, (rows, cols, r, b) in enumerate(((m, n, rg, (b_mid, 1)), (m, n, ru, (b_mid, 1)), (n, m, rd, (b_down_out, b_mid)))):
        shape, U, S, V, bias = factors(rows, cols, r, *b, dtype, biases[k], seed + k)
        if garbage_padding and k < 2 and shape.m_pad > rows:
            U.view(-1, r)[rows:] = 3.0
        if garbage_padding and k == 2 and shape.n_pad > cols:
            V.view(-1, r)[cols:] = 3.0
        out.append((U, S, V, bias, shape))
    return out


def _member(made):
    """(U, S, V, bias, shape) from what ``factors`` returns, (shape, U, S, V, bias)."""
    shape, *tensors = made
    return (*tensors, shape)


def _reference(x, layers):
    U, S, V, b, shapes = zip(*layers)
    return blast_mlp_chain(x.double(), [u.double() for u in U], [s.double() for s in S], [v.double() for v in V],
                           [t.double() if t is not None else None for t in b], [s.out_features for s in shapes])


def _check(T, n, m, ranks, blocks, biases, dtype=torch.float32, cfg=TINY, seed=0, garbage_padding=False):
    layers = _layers(n, m, ranks, blocks, biases, dtype, seed, garbage_padding)
    x = torch.randn(T, n, device=DEVICE, dtype=dtype)
    y = mlp_chain.blast_mlp_chain_gemv(x, *layers, cfg, interpret=not CUDA)
    ref = _reference(x, layers)
    assert y.shape == (T, n) and y.dtype == dtype and torch.isfinite(y).all()
    assert (y.double() - ref).abs().max().item() / (ref.abs().max().item() + 1e-6) < TOL[dtype]


@pytest.mark.parametrize("T,n,m,ranks,blocks,biases", [
    (1, 48, 64, (16, 16, 16), (4, 4), (False, False, False)),
    (3, 40, 96, (8, 24, 16), (2, 3), (True, False, True)),        # gate and up of different ranks, b_out != b_in
    (4, 36, 62, (16, 8, 24), (4, 2), (True, True, False)),        # padding: 62 = 4 x 16 - 2, 36 = 2 x 18
    (2, 30, 50, (8, 8, 8), (1, 1), (False, True, True)),          # one block: low-rank layers
], ids=["square-blocks", "ranks-and-blocks-differ", "padding", "low-rank"])
def test_matches_reference(T, n, m, ranks, blocks, biases):
    _check(T, n, m, ranks, blocks, biases, seed=T)


def test_padding_rows_of_gate_and_up_are_never_read_into_down():
    """The reference truncates gate's and up's outputs to their features before down reads them; the
    chain computes whole blocks, so it must zero h past the last feature, whatever U holds there."""
    _check(2, 36, 62, (16, 8, 24), (4, 2), (True, True, True), garbage_padding=True)


def test_padded_mlps_are_chainable_with_the_shapes_the_op_reads_from_the_factors():
    """The op knows down's geometry only from its factors (no in_features: the padded width), so a
    gate with padded outputs must still chain with it."""
    from blastfx.structures.blast.layout import BlastShape
    gate, up, down = _layers(36, 62, (16, 8, 24), (4, 2), (False,) * 3, torch.float32)
    U, S, V, b, _ = down
    as_op_sees = BlastShape.from_factors(U, S, V, out_features=36)
    assert as_op_sees.in_features != gate[-1].out_features                  # 64 (padded) against 62
    assert mlp_chain.chainable(gate, up, (U, S, V, b, as_op_sees)) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rounds_where_the_reference_does(dtype):
    _check(2, 48, 64, (16, 24, 16), (4, 4), (True, False, True), dtype=dtype, seed=5)


def test_chains_one_layer_and_grouped_calls_in_a_row_each_start_from_a_cleared_workspace():
    """Chains of different sizes between one-layer and grouped GEMV calls, all on one workspace: each
    clears, in the other half, what the call before wrote there (the chain writes three layers' w)."""
    from decode_cases import check
    for k in range(2):
        _check(4, 48, 64, (16, 16, 16), (4, 4), (True, True, True), seed=10 + k)
        check(gemv.blast_gemv, 1, 40, 30, 9, 2, 3, torch.float32, True, cfg=TINY, seed=k)
        _check(1, 30, 50, (8, 8, 8), (1, 1), (False, True, True), seed=20 + k)
        x = torch.randn(3, 48, device=DEVICE)
        members = [_member(factors(m, 48, r, 4, 4, torch.float32, True, 30 + k)) for m, r in ((32, 8), (16, 16))]
        y = gemv.blast_gemv_group(x, members, TINY, interpret=not CUDA)
        from blastfx.structures.blast.ops import blast_matmul_reference
        ref = torch.cat([blast_matmul_reference(x.double(), U.double(), S.double(), V.double(), b.double(), s.out_features)
                         for U, S, V, b, s in members], dim=-1)
        assert (y.double() - ref).abs().max() / ref.abs().max() < 1e-4


def test_poisoned_outputs_and_intermediates_are_fully_overwritten(monkeypatch):
    empty = torch.empty

    def poisoned(*a, **k):
        t = empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    _check(3, 40, 96, (8, 24, 16), (2, 3), (True, False, True), seed=7)


def test_refuses_what_it_cannot_chain_by_name():
    gate, up, down = _layers(48, 64, (16, 16, 16), (4, 4), (False,) * 3, torch.float32)
    x = torch.randn(1, 48, device=DEVICE)
    with pytest.raises(ValueError, match="runs at most 4 tokens, got T=5"):
        mlp_chain.blast_mlp_chain_gemv(torch.randn(5, 48, device=DEVICE), gate, up, down, TINY, interpret=True)
    other_down = _layers(48, 64, (16, 16, 16), (2, 2), (False,) * 3, torch.float32)[2]     # 2 input blocks, gate has 4
    with pytest.raises(ValueError, match=r"down's input blocks \(2 of 32\) are not gate's output blocks \(4 of 16\)"):
        mlp_chain.blast_mlp_chain_gemv(x, gate, up, other_down, TINY, interpret=True)
    narrow_up = _layers(48, 32, (16, 16, 16), (4, 4), (False,) * 3, torch.float32)[1]
    with pytest.raises(ValueError, match="gate .64 rows in 4 blocks. and up .32 in 4. differ"):
        mlp_chain.blast_mlp_chain_gemv(x, gate, narrow_up, down, TINY, interpret=True)
    odd = _layers(48, 64, (12, 16, 16), (4, 4), (False,) * 3, torch.float32)
    with pytest.raises(ValueError, match="rank 12, not a multiple of 8"):
        mlp_chain.blast_mlp_chain_gemv(x, *odd, TINY, interpret=True)
    with pytest.raises(ValueError, match="mode must be 'two' or 'pdl', got 'persistent'"):
        mlp_chain.blast_mlp_chain_gemv(x, gate, up, down, {**TINY, "mode": "persistent"}, interpret=True)


def test_op_reference_is_the_layers_reference_calls():
    gate, up, down = _layers(48, 64, (16, 24, 16), (4, 4), (True, False, True), torch.float64)
    x = torch.randn(2, 5, 48, dtype=torch.float64, device=DEVICE)
    from blastfx.structures.blast.ops import blast_matmul_reference as ref
    want = ref(F.silu(ref(x, *gate[:4], 64)) * ref(x, *up[:4], 64), *down[:4], 48)
    got = _reference(x.reshape(-1, 48), [gate, up, down]).reshape(2, 5, 48)
    torch.testing.assert_close(got, want)
    U, S, V, b, _ = zip(gate, up, down)
    with pytest.raises(ValueError, match="three layers .gate, up, down."):
        blast_mlp_chain(x, list(U[:2]), list(S[:2]), list(V[:2]), list(b[:2]), [64, 64])
    torch.library.opcheck(torch.ops.blastfx.blast_mlp_chain.default, (x, list(U), list(S), list(V), list(b), [64, 64, 48]),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", mlp_chain.CANDIDATES, ids=[f"c{k}" for k in range(len(mlp_chain.CANDIDATES))])
@pytest.mark.parametrize("T", [1, 4])
def test_every_config_matches_reference_on_cuda(T, cfg):
    if cfg["mode"] == "pdl" and not mlp_chain.pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs Hopper or newer")
    _check(T, 1024, 2752, (384, 376, 384), (4, 4), (True, False, True), dtype=torch.bfloat16, cfg=cfg, seed=T)


@pytest.mark.cuda
def test_replays_in_a_cuda_graph_between_other_gemv_calls():
    layers = _layers(1024, 2752, (384, 384, 384), (4, 4), (False,) * 3, torch.bfloat16)
    qkv = [_member(factors(1024, 1024, 256, 4, 4, torch.bfloat16, False, 40 + k)) for k in range(3)]
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    cfg = next(c for c in mlp_chain.candidates(x.device) if c["mode"] == "pdl") if mlp_chain.pdl_supported(x.device) \
        else mlp_chain.DEFAULT
    mlp_chain.blast_mlp_chain_gemv(x, *layers, cfg)
    gemv.blast_gemv_group(x, qkv, gemv.DEFAULT)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h = gemv.blast_gemv_group(x, qkv, gemv.DEFAULT)[:, :1024].contiguous()
        out = mlp_chain.blast_mlp_chain_gemv(h, *layers, cfg)
    for _ in range(3):          # replays alternate the workspace halves
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = _reference(h, layers)
        assert (out.double() - ref).abs().max() / ref.abs().max() < 6e-2


def _quantized(layers, name):
    """Each (U, S, V, bias, shape) with U and V rounded to ``name`` codes: (U, S, V, bias, shape, U_scale,
    V_scale) as the chain takes them."""
    from blastfx.structures.blast.quant import formats
    fmt = formats.get(name)
    out = []
    for U, S, V, b, shape in layers:
        (Uc, su), (Vc, sv) = formats.quantize_u(U.float(), fmt), formats.quantize_v(V.float(), fmt)
        out.append((Uc, S, Vc, b, shape, su, sv))
    return out


@pytest.mark.parametrize("name", ["int8", "float8_e4m3fn", "int4"])
@pytest.mark.parametrize("T,n,m,ranks,blocks,biases,dtype", [
    (1, 48, 64, (16, 16, 16), (4, 4), (False, False, False), torch.float32),
    (3, 40, 96, (8, 24, 16), (2, 3), (True, False, True), torch.bfloat16),
    (4, 36, 62, (16, 8, 24), (4, 2), (True, True, False), torch.float16),     # padding rows and columns
], ids=["square-blocks", "ranks-and-blocks-differ", "padding"])
def test_quantized_factors_match_the_quantized_reference(T, n, m, ranks, blocks, biases, dtype, name):
    """Codes in all three layers: gate/up's codes and row scales read by the grouped stage 1 and the
    middle kernel, down's V codes and column scales by the middle kernel, down's U by stage 3."""
    from blastfx.structures.blast.quant.ops import blast_matmul_quantized_reference as ref
    layers = _quantized(_layers(n, m, ranks, blocks, biases, dtype), name)
    x = torch.randn(T, n, device=DEVICE, dtype=dtype)
    y = mlp_chain.blast_mlp_chain_gemv(x, *layers, TINY, interpret=not CUDA)
    xd = x.double()
    (Ug, Sg, Vg, bg, g, usg, vsg), (Uu, Su, Vu, bu, u, usu, vsu), (Ud, Sd, Vd, bd, d, usd, vsd) = layers
    f64 = (lambda t: t.double() if t is not None else None)
    h = F.silu(ref(xd, Ug, usg, f64(Sg), Vg, vsg, f64(bg), g.out_features)) * ref(xd, Uu, usu, f64(Su), Vu, vsu, f64(bu),
                                                                                  u.out_features)
    want = ref(h, Ud, usd, f64(Sd), Vd, vsd, f64(bd), d.out_features)
    assert y.shape == (T, n) and y.dtype == dtype and torch.isfinite(y).all()
    assert (y.double() - want).abs().max().item() / (want.abs().max().item() + 1e-6) < TOL[dtype]


def test_chain_refuses_float_and_quantized_layers_together():
    layers = _layers(48, 64, (16, 16, 16), (4, 4), (False, False, False), torch.float32)
    mixed = _quantized(layers[:1], "int8") + layers[1:]
    assert "mix float and quantized" in mlp_chain.chainable(*mixed)
    with pytest.raises(ValueError, match="cannot run these layers as one MLP chain: members mix float and quantized"):
        mlp_chain.blast_mlp_chain_gemv(torch.randn(1, 48, device=DEVICE), *mixed, TINY, interpret=not CUDA)
