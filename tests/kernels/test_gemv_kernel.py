"""The CUDA-core decode kernel (``blastfx.kernels.gemv``) against the plain-PyTorch reference.

On CPU it runs under the Triton interpreter in its two-launch form and in its one-launch form as a
single program (which its grid barrier lets through); on CUDA every form with a full grid, with
CUDA-graph replay. The workspace it accumulates in is
cleared by the call before, so the tests also check that calls of different sizes in a row (a
bigger one after a smaller one, and back) each start from zeros."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from blastfx.kernels import gemv
from blastfx.structures.blast.layout import BlastShape
from blastfx.structures.blast.ops import blast_matmul_reference

from decode_cases import CUDA, DEVICE, blocks_fit, check, factors

TINY = dict(BQ=16, BR=16, BP=16, BK=16)


_factors = factors


def _check(*args, **kwargs):
    check(gemv.blast_gemv, *args, **kwargs)


@settings(max_examples=10 if not CUDA else 40, deadline=None)
@given(T=st.integers(1, gemv.MAX_T), m=st.integers(17, 80), n=st.integers(17, 80), r=st.integers(1, 40),
       b_out=st.integers(1, 4), b_in=st.integers(1, 4), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_matches_reference_on_fuzzed_shapes(T, m, n, r, b_out, b_in, bias, dtype):
    """Ragged dims (padding in the last block), b_out != b_in, ranks not multiples of the tiles."""
    if not blocks_fit(m, n, b_out, b_in):
        return          # a block count that leaves a block all padding is refused by BlastShape
    _check(T, m, n, r, b_out, b_in, dtype, bias, cfg=TINY)


@pytest.mark.parametrize("late", [False, True], ids=["bookkeeping-first", "late"])
def test_q_split_into_chunks_adds_every_chunk_once(late):
    """Small tiles and a wide grid force several q-chunks per block-column, each added atomically."""
    shape = BlastShape.make(64, 96, 24, 2)
    plan = gemv.gemv_plan(shape, 64, TINY)
    assert plan["Q_SPLIT"] > 1
    _check(3, 64, 96, 24, 2, 2, torch.float32, True, cfg={**TINY, "late": late})


@pytest.mark.parametrize("order", [(False,), (True,), (False, True, True, False)], ids=["first", "late", "mixed"])
def test_calls_of_different_sizes_each_start_from_a_cleared_workspace(order):
    """Each call clears, in the other half of the workspace, what the call before wrote there: a big
    call, then small ones, then a big one again all match the reference; also when calls that do
    the bookkeeping before V (``late=False``) and after it (``late=True``) alternate."""
    cases = ((4, 80, 80, 40, 4), (1, 24, 24, 4, 1), (2, 33, 40, 9, 2), (4, 80, 80, 40, 4),
             (3, 64, 48, 33, 3), (1, 80, 80, 40, 4))
    for k, (T, m, n, r, b) in enumerate(cases):
        _check(T, m, n, r, b, b, torch.float32, True, cfg={**TINY, "late": order[k % len(order)]}, seed=T + r)


def test_poisoned_output_is_fully_overwritten(monkeypatch):
    empty = torch.empty

    def poisoned(*a, **k):
        t = empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    _check(4, 50, 70, 20, 3, 2, torch.float32, False, cfg=TINY)


def test_plan_covers_q_and_fills_the_grid():
    shape = BlastShape.make(4096, 4096, 1022, 4)
    plan = gemv.gemv_plan(shape, 264, gemv.DEFAULT)
    assert plan["Q_SPLIT"] * plan["Q_CHUNK"] >= shape.q > (plan["Q_SPLIT"] - 1) * plan["Q_CHUNK"]
    assert shape.b_in * plan["Q_SPLIT"] * plan["R_TILES"] >= 264 * 0.9


def test_rejects_more_tokens_and_unknown_modes():
    shape, U, S, V, b = _factors(32, 32, 8, 2, 2, torch.float32)
    with pytest.raises(ValueError, match=f"at most {gemv.MAX_T} tokens"):
        gemv.blast_gemv(torch.randn(gemv.MAX_T + 1, 32, device=DEVICE), U, S, V, b, shape, interpret=not CUDA)
    with pytest.raises(ValueError, match="GEMV decode mode"):
        gemv.blast_gemv(torch.randn(1, 32, device=DEVICE), U, S, V, b, shape, {"mode": "fast"})
    with pytest.raises(ValueError, match="prefetch must be 0, 1 or"):
        gemv.blast_gemv(torch.randn(1, 32, device=DEVICE), U, S, V, b, shape, {"mode": "pdl", "prefetch": 2})
    with pytest.raises(ValueError, match="prefetch must be 0, 1 or"):
        gemv.blast_gemv(torch.randn(1, 32, device=DEVICE), U, S, V, b, shape, {"prefetch": 3})


@settings(max_examples=8 if not CUDA else 30, deadline=None)
@given(T=st.integers(1, gemv.MAX_T), m=st.integers(17, 80), n=st.integers(17, 80), r=st.integers(1, 40),
       b=st.integers(1, 4), BP=st.sampled_from([8, 16, 64]), preload=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_persistent_form_with_and_without_preloaded_u_matches_reference(T, m, n, r, b, BP, preload, dtype):
    """One launch, stage 1, the grid barrier, stage 2 (on the CPU as one program, which the barrier
    lets through): with ``preload`` the first U tile is read before stage 1 and used after the
    barrier, the other tiles in the loop; tiles of 8 to 64 rows over ragged p."""
    if (b - 1) * math.ceil(m / b) >= m or (b - 1) * math.ceil(n / b) >= n:
        return              # a block count that leaves a block all padding is refused by BlastShape
    _check(T, m, n, r, b, b, dtype, True, cfg={**TINY, "BP": BP, "mode": "persistent", "preload": preload})


def test_persistent_calls_in_a_row_each_start_from_a_cleared_workspace():
    """The one-launch form advances the workspace's generation at its barrier: calls of different
    sizes, preloading and not, alternate with two-launch calls and all match the reference."""
    cases = ((4, 80, 80, 40, 4), (1, 24, 24, 4, 1), (2, 33, 40, 9, 2), (4, 80, 80, 40, 4), (1, 80, 80, 40, 4))
    forms = ({"mode": "persistent", "preload": True}, {"mode": "two"}, {"mode": "persistent"})
    for k, (T, m, n, r, b) in enumerate(cases):
        _check(T, m, n, r, b, b, torch.float32, True, cfg={**TINY, **forms[k % len(forms)]}, seed=T + r)


def test_preload_is_refused_outside_the_one_layer_persistent_kernel():
    shape, U, S, V, b = _factors(32, 32, 8, 2, 2, torch.float32)
    x = torch.randn(1, 32, device=DEVICE)
    with pytest.raises(ValueError, match="preload is True or False, and True only in mode 'persistent'"):
        gemv.blast_gemv(x, U, S, V, b, shape, {"mode": "two", "preload": True})
    with pytest.raises(ValueError, match="preload is True or False"):
        gemv.blast_gemv(x, U, S, V, b, shape, {"mode": "persistent", "preload": "yes"})
    with pytest.raises(ValueError, match="preload is True or False, and True only in mode 'persistent'"):
        gemv.blast_gemv_group(x, [(U, S, V, b, shape)] * 2, {"mode": "pdl", "preload": True}, interpret=not CUDA)
    with pytest.raises(ValueError, match="chained calls do not take it"):      # a kernel without the form
        gemv._launch_flags({**gemv.DEFAULT, "mode": "persistent", "preload": True}, True, x.device, 4)
    assert any(c["preload"] for c in gemv.candidates(torch.device("cpu")))
    assert any(c["preload"] for c in gemv.group_candidates(torch.device("cpu")))


def test_pdl_is_refused_where_programmatic_launch_does_not_exist():
    shape, U, S, V, b = _factors(32, 32, 8, 2, 2, torch.float32)
    x = torch.randn(1, 32)
    with pytest.raises(RuntimeError, match="needs programmatic dependent launch"):
        gemv.blast_gemv(x, U.cpu(), S.cpu(), V.cpu(), b.cpu(), shape, {"mode": "pdl"})
    assert all(c["mode"] != "pdl" for c in gemv.candidates(torch.device("cpu")))
    assert all(not (c["mode"] == "persistent" and c["prefetch"]) for c in gemv.group_candidates(torch.device("cpu")))


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", gemv.CANDIDATES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T", [1, 2, 4])
def test_every_config_matches_reference_on_cuda(T, dtype, cfg):
    _check(T, 1000, 700, 96, 4, 4, dtype, True, cfg)
    _check(T, 4096, 4096, 1022, 4, 4, dtype, True, cfg)
    _check(T, 4096, 11008, 1491, 4, 4, dtype, False, cfg)
    _check(T, 512, 768, 64, 8, 2, dtype, True, cfg)


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", [{**gemv.DEFAULT, "mode": "two"}, {**gemv.DEFAULT, "mode": "persistent", "prefetch": 2},
                                 {**gemv.DEFAULT, "mode": "pdl", "prefetch": 1},
                                 {**gemv.DEFAULT, "mode": "pdl", "prefetch": 1, "late": True},
                                 {**gemv.DEFAULT, "mode": "persistent", "preload": True, "BQ": 128, "BR": 64,
                                  "stages": 3, "BP": 16}],
                         ids=["two", "persistent", "pdl", "pdl-late", "persistent-preload"])
def test_replays_in_a_cuda_graph(cfg):
    shape, U, S, V, b = _factors(2048, 2048, 500, 4, 4, torch.bfloat16)
    x = torch.randn(2, 2048, device="cuda", dtype=torch.bfloat16)
    first = gemv.blast_gemv(x, U, S, V, b, shape, cfg)
    for _ in range(20):     # repeated calls never hang and stay within float-atomic rounding
        torch.testing.assert_close(gemv.blast_gemv(x, U, S, V, b, shape, cfg), first, rtol=2e-2, atol=2e-2)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        gemv.blast_gemv(x, U, S, V, b, shape, cfg)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv.blast_gemv(torch.relu(x) * 2, U, S, V, b, shape, cfg)
        out2 = gemv.blast_gemv(out[:, :2048].contiguous(), U, S, V, b, shape, cfg)
    ref = blast_matmul_reference((torch.relu(x) * 2).double(), U.double(), S.double(), V.double(), b.double(), 2048)
    for _ in range(5):      # an odd number of calls per replay: both workspace halves take turns
        out.fill_(float("nan"))
        out2.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert (out.double() - ref).abs().max() / ref.abs().max() < 3e-2
        ref2 = blast_matmul_reference(out[:, :2048].double(), U.double(), S.double(), V.double(), b.double(), 2048)
        assert (out2.double() - ref2).abs().max() / ref2.abs().max() < 3e-2


def _group_check(T, specs, dtype=torch.float32, cfg=TINY, seed=0, n=48):
    """specs: (m, r, b_out, b_in, bias) per member, all reading one x of width n."""
    members = [(*_factors(m, n, r, bo, bi, dtype, bias, seed + k)[1:], BlastShape.make(m, n, r, (bo, bi),
                                                                                        allow_larger=True))
               for k, (m, r, bo, bi, bias) in enumerate(specs)]
    x = torch.randn(T, n, device=DEVICE, dtype=dtype)
    y_all = gemv.blast_gemv_group(x, members, cfg, interpret=not CUDA)
    assert y_all.shape == (T, sum(shape.out_features for *_, shape in members))
    ys = y_all.split([shape.out_features for *_, shape in members], dim=-1)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
    for y, (U, S, V, b, shape) in zip(ys, members):
        ref = blast_matmul_reference(x.double(), U.double(), S.double(), V.double(),
                                     b.double() if b is not None else None, shape.out_features)
        assert y.shape == (T, shape.out_features) and torch.isfinite(y).all()
        assert (y.double() - ref).abs().max().item() / (ref.abs().max().item() + 1e-6) < tol


@pytest.mark.parametrize("T", [1, 3])
def test_group_of_siblings_matches_each_reference(T):
    """q/k/v-like siblings of different heights, ranks, block counts and biases in one group."""
    _group_check(T, [(40, 16, 4, 4, True), (24, 8, 2, 3, False), (56, 24, 4, 2, True)])


@pytest.mark.parametrize("late", [False, True], ids=["bookkeeping-first", "late"])
def test_group_of_one_and_repeated_groups_start_from_a_cleared_workspace(late):
    for T, specs in ((1, [(40, 16, 4, 4, True)]), (4, [(40, 16, 4, 4, True), (32, 32, 2, 2, False)]),
                     (2, [(16, 8, 1, 1, True)]), (4, [(40, 16, 4, 4, True), (32, 32, 2, 2, False)])):
        _group_check(T, specs, cfg={**TINY, "late": late})


@pytest.mark.parametrize("preload", [False, True], ids=["loop", "preload"])
@pytest.mark.parametrize("T,dtype", [(1, torch.float32), (3, torch.bfloat16)])
def test_group_in_its_persistent_form_matches_each_reference(T, dtype, preload):
    """The grouped kernel's one launch (on the CPU as one program): members of different heights,
    ranks (the preloaded tile spans the widest) and block counts; with ``preload`` the first U tile
    is read before stage 1 from the member the program's first stage-2 item belongs to."""
    cfg = {**TINY, "BP": 8, "mode": "persistent", "preload": preload}
    _group_check(T, [(40, 16, 4, 4, True), (24, 8, 2, 3, False), (56, 24, 4, 2, True)], dtype, cfg)
    _group_check(T, [(16, 32, 1, 1, False), (40, 16, 4, 4, True)], dtype, cfg, seed=3)


def test_group_refuses_members_it_cannot_stream():
    n = 48
    shape = BlastShape.make(40, n, 12, 4)           # rank 12: not a multiple of 8
    U, S, V, b = _factors(40, n, 12, 4, 4, torch.float32)[1:]
    with pytest.raises(ValueError, match="rank 12, not a multiple of 8"):
        gemv.blast_gemv_group(torch.randn(1, n, device=DEVICE), [(U, S, V, b, shape)], interpret=not CUDA)
    shape16 = BlastShape.make(40, n, 16, 4)
    U, S, V, b = _factors(40, n, 16, 4, 4, torch.float32)[1:]
    with pytest.raises(ValueError, match="mix dtypes"):
        gemv.blast_gemv_group(torch.randn(1, n, device=DEVICE), [(U, S, V, b, shape16), (U.half(), S.half(),
                              V.half(), None, shape16)], interpret=not CUDA)
    assert "non-contiguous" in gemv.groupable([(U, S, V.transpose(1, 2).contiguous().transpose(1, 2), b, shape16)])
    flat = torch.zeros(U.numel() + 1, device=DEVICE)
    shifted = flat[1:].view_as(U)                   # contiguous, but 4 bytes past a 16-byte boundary
    assert "16-byte aligned" in gemv.groupable([(shifted, S, V, b, shape16)])


def test_group_finds_factors_before_and_after_the_anchor():
    """The kernel reads each factor at its element offset from the first member's U (the anchor): the
    members' factors lie in one buffer on both sides of it, in shuffled slots."""
    n, T = 48, 2
    specs = [(40, 16, 4, 4), (24, 8, 2, 3), (56, 24, 4, 2)]
    shapes = [BlastShape.make(m, n, r, (bo, bi), allow_larger=True) for m, r, bo, bi in specs]
    sizes = [[math.prod(shape.factor_shapes[k]) for k in "USV"] + [shape.out_features] for shape in shapes]
    slot = max(map(max, sizes)) + 4                  # fp32 elements; a multiple of 4 is 16 bytes
    slot += -slot % 4
    buffer = torch.randn(12 * slot, device=DEVICE) * 0.1
    order = [5, 0, 9, 2, 7, 11, 4, 1, 10, 3, 8, 6]   # slot of each factor: member 0's U (the anchor) in the middle
    members = []
    for m, shape in enumerate(shapes):
        views = [buffer[order[4 * m + k] * slot:][:size].view(shape.factor_shapes["USV"[k]] if k < 3 else (size,))
                 for k, size in enumerate(sizes[m])]
        members.append((*views, shape))
    anchor = members[0][0].data_ptr()
    offsets = [t.data_ptr() - anchor for U, S, V, b, _ in members for t in (U, S, V, b)]
    assert min(offsets) < 0 < max(offsets)
    assert gemv.groupable(members) is None
    x = torch.randn(T, n, device=DEVICE)
    y = gemv.blast_gemv_group(x, members, TINY, interpret=not CUDA)
    for y_k, (U, S, V, b, shape) in zip(y.split([s.out_features for s in shapes], dim=-1), members):
        ref = blast_matmul_reference(x.double(), U.double(), S.double(), V.double(), b.double(), shape.out_features)
        assert (y_k.double() - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_group_table_is_per_dtype():
    """The same addresses and shapes in another dtype are another table: its offsets count elements."""
    n, shape = 48, BlastShape.make(40, 48, 16, 4)
    sizes = [math.prod(shape.factor_shapes[k]) for k in "USV"]
    buffer = torch.empty(4 * max(sizes) * 2, device=DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        flat = buffer.view(dtype)
        flat.copy_(torch.randn(flat.shape) * 0.1)            # values that are numbers in this dtype
        step = 2 * max(sizes) * (4 // flat.element_size())     # the same byte offsets in both dtypes
        U, S, V = (flat[k * step:][:size].view(shape.factor_shapes[name])
                   for k, (name, size) in enumerate(zip("USV", sizes)))
        x = torch.randn(1, n, device=DEVICE, dtype=dtype)
        y = gemv.blast_gemv_group(x, [(U, S, V, None, shape)], TINY, interpret=not CUDA)
        ref = blast_matmul_reference(x.double(), U.double(), S.double(), V.double(), None, 40)
        assert (y.double() - ref).abs().max().item() < 3e-2 * ref.abs().max().item()


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", gemv.group_candidates(torch.device("cuda" if CUDA else "cpu")), ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("T", [1, 4])
def test_group_matches_reference_on_cuda(T, cfg):
    _group_check(T, [(4096, 1024, 4, 4, False), (1024, 512, 4, 4, False), (1024, 512, 4, 4, True)],
                 torch.bfloat16, cfg, n=4096)


@pytest.mark.parametrize("cfg", [{**TINY, "mode": "two"}] + ([{"mode": "pdl"}] if CUDA else []),
                         ids=lambda c: c["mode"])
def test_stage_probes_leave_the_workspace_ready_for_the_next_call(cfg):
    """``only_stage`` launches (a profile of where the time goes) may repeat any number of times;
    a full call after them still starts from a cleared workspace and equals the reference."""
    if cfg["mode"] == "pdl" and not gemv.pdl_supported(torch.device(DEVICE)):
        cfg = {**cfg, "mode": "two"}
    shape, U, S, V, b = _factors(48, 40, 24, 2, 2, torch.float32)
    x = torch.randn(2, 40, device=DEVICE)
    for stage in (1, 1, 2, 1, 2, 2, 1):
        gemv.blast_gemv(x, U, S, V, b, shape, cfg, interpret=not CUDA, only_stage=stage)
    ref = blast_matmul_reference(x.double(), U.double(), S.double(), V.double(), b.double(), 48)
    y = gemv.blast_gemv(x, U, S, V, b, shape, cfg, interpret=not CUDA)
    assert (y.double() - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
