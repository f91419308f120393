"""A gated MLP of BLAST layers at decode, ``down(silu(gate(x)) * up(x))``, in three launches, not five.

Why: at decode every kernel launch pays a fixed cost (launch, ramp-up, tail: about 5 µs on an H200)
on top of streaming its bytes, and the MLP of a decoder block, run as a grouped gate/up call, a
SiLU·mul and a down call, launches five kernels. The dependency between them is local: row ``c`` of
gate and up (an output of their stage 2) is input feature ``c`` of down, which down's stage 1 needs
only to add ``h[c] * V_down[j, c, :]`` into its partial sums. So one kernel can stream a range of
gate and up rows of U against their ``w``, apply SiLU·mul in registers, and stream the same rows of
V_down into down's ``w``. The chain is then:

1. gate/up stage 1: x·V of both, s-mixed into their ``w`` (the grouped kernel of :mod:`.gemv`);
2. the middle kernel (:func:`_mlp_mid_kernel`): gate/up stage 2, SiLU·mul, down stage 1;
3. down stage 2: ``w_down``·U_downᵀ (the one-layer kernel of :mod:`.gemv`), which also moves the
   workspace's generation on.

All three use one half of the :mod:`.gemv` workspace, laid out ``[w_gate | w_up | w_down]``: stage 1
clears the other half as far as the call before it wrote, and records the whole extent, so ``w_down``
starts at zero like any ``w``. A program of the middle kernel owns a range of rows of one block-row
``i`` of gate/up, which is block-column ``i`` of down (the chain needs gate/up's ``b_out`` and row
block to equal down's ``b_in`` and column block); it keeps down's partial sums over its rows in
registers and adds ``s_down[o, i] * z`` into ``w_down`` with atomics once, at the end.

The gate and up outputs, the SiLU and the product are rounded to the activation dtype where the
reference (:func:`blastfx.compiler.mlp_chain.blast_mlp_chain`'s) rounds them; inside each layer the
chain keeps its partial sums in fp32 where the reference's matmuls round theirs, so the two differ
by those roundings and the summation order. Launch modes as in :mod:`.gemv`: ``two`` (plain launches) or
``pdl`` (each a programmatic dependent of the kernel before it; its ``gdc_wait`` comes before it reads
any activation or workspace).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import gemv
from .codes import _load_factor_tile
from .decode import _index, _sm_limits, gdc_launch_dependents, gdc_wait, pdl_supported

MAX_RANK = 2048             # a program holds a padded row of every factor's rank in registers


@triton.jit
def _round(v, DTYPE: tl.constexpr):
    """v (fp32) rounded to the activation dtype and back, as the reference stores it."""
    return v.to(DTYPE).to(tl.float32)


@triton.jit
def _row_outputs(u_ptr, b_ptr, us_ptr, w, rows, row_ok, R, RC, sup, bias_off, HAS_BIAS: tl.constexpr,
                 DTYPE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, QUANT: tl.constexpr):
    """(BT, ROWS): the rows' outputs ``w · U[rows]ᵀ`` (+ bias), rounded to the activation dtype;
    ``row_ok``: the rows inside the layer's output features. QUANT (8 or 4): U holds codes (RC
    stored entries a row, ``sup`` apart) and each output is scaled by its row's ``us_ptr`` entry."""
    u = _load_factor_tile(u_ptr, rows, row_ok, sup, 1, 0, R, RC, ROWS, COLS, QUANT)
    out = tl.sum(w[:, None, :] * u.to(tl.float32)[None, :, :], axis=2)
    if QUANT:
        out *= tl.load(us_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + bias_off + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    return _round(out, DTYPE)


@triton.jit
def _mlp_mid_kernel(ug_ptr, uu_ptr, bg_ptr, bu_ptr, vd_ptr, sd_ptr, ws_ptr, sync_ptr,
                    T, M, P, RG, RU, RD, PER_BLOCK, ROWS, HALF, W_GATE, W_UP, W_DOWN, B_OUT_D,
                    sug, suu, svd, ssd, usg_ptr, usu_ptr, vsd_ptr, W_NORM, INV_N, EPS,
                    HAS_BG: tl.constexpr, HAS_BU: tl.constexpr, BT: tl.constexpr, BPM: tl.constexpr,
                    RG_P: tl.constexpr, RU_P: tl.constexpr, RD_P: tl.constexpr, PDL: tl.constexpr,
                    AL: tl.constexpr, ALC: tl.constexpr, QUANT: tl.constexpr, PACK: tl.constexpr,
                    NORM: tl.constexpr):
    """Program (i, k): rows ``k * ROWS ...`` of block-row i of gate and up (P rows a block, U blocks
    ``sug`` / ``suu`` elements apart, rows of RG / RU entries; M output features in all, rows past them
    are padding and give h = 0): their outputs, ``h = silu(g) * u``, and
    ``z = h · V_down[i, rows, :]`` (V_down blocks ``svd`` apart, rows of RD), added as
    ``s_down[o, i] * z`` into ``w_down[o]`` for every block-row o of down (S_down blocks ``ssd`` apart,
    one row of RD per (o, i)). Factors are contiguous; w is (B_OUT, BT, R) per layer. AL: a power of
    two (up to 16) dividing the three ranks, so row starts are seen aligned and loads stay 16-byte
    vectors (the JIT marks an integer argument only when 16 divides it; see :mod:`.gemv`).
    QUANT (8 or 4) and PACK as in :mod:`.gemv`: U and V_down hold codes, rows of R / PACK stored
    entries (the code strides ``sug``, ``suu``, ``svd`` count them, ALC divides them); the gate/up
    outputs are scaled per row by ``usg_ptr`` / ``usu_ptr`` (U_scale, (b_out, p)), down's z per rank by
    ``vsd_ptr`` (V_scale, (b_in, r)) after its sum over rows. w_gate, w_up and w_down start W_GATE,
    W_UP and W_DOWN floats into this call's half. NORM: gate's and up's input was an RMSNorm's input
    times its weight, not yet divided by its root mean square; the per-token sums of squares at
    W_NORM give each token's factor ``rsqrt(sum * INV_N + EPS)``, which scales w_gate and w_up (the
    x·V stage and the s-mix are linear in the input)."""
    pid = tl.program_id(0)
    if AL > 1:
        RG = (RG // AL) * AL
        RU = (RU // AL) * AL
        RD = (RD // AL) * AL
        ssd = (ssd // AL) * AL
    if ALC > 1:
        sug = (sug // ALC) * ALC
        suu = (suu // ALC) * ALC
        svd = (svd // ALC) * ALC
    i = pid // PER_BLOCK
    r0 = (pid % PER_BLOCK) * ROWS
    r1 = tl.minimum(P, r0 + ROWS)
    DTYPE: tl.constexpr = sd_ptr.dtype.element_ty           # S is in the activation dtype, codes or not
    if PDL:
        gdc_wait()                  # gate/up's stage 1 (and everything before it) has finished
        gdc_launch_dependents()
    half = ws_ptr + (tl.load(sync_ptr, volatile=True) & 1) * HALF
    offs_t = tl.arange(0, BT)
    t_ok = offs_t < T
    offs_g = tl.arange(0, RG_P)
    offs_u = tl.arange(0, RU_P)
    offs_d = tl.arange(0, RD_P)
    wg = tl.load(half + W_GATE + i * BT * RG + offs_t[:, None] * RG + offs_g[None, :],
                 mask=t_ok[:, None] & (offs_g < RG)[None, :], other=0.0, cache_modifier=".cg")
    wu = tl.load(half + W_UP + i * BT * RU + offs_t[:, None] * RU + offs_u[None, :],
                 mask=t_ok[:, None] & (offs_u < RU)[None, :], other=0.0, cache_modifier=".cg")
    if NORM:
        sumsq = tl.load(half + W_NORM + offs_t, mask=t_ok, other=0.0, cache_modifier=".cg")
        scale = 1.0 / tl.sqrt(sumsq * INV_N + EPS)
        wg *= scale[:, None]
        wu *= scale[:, None]
    z = tl.zeros((BT, RD_P), dtype=tl.float32)
    for c0 in range(r0, r1, BPM):
        rows = c0 + tl.arange(0, BPM)
        row_ok = (rows < r1) & (i * P + rows < M)
        g = _row_outputs(ug_ptr + i * sug, bg_ptr, usg_ptr + i * P, wg, rows, row_ok, RG, RG // PACK, RG // PACK,
                         i * P, HAS_BG, DTYPE, BPM, RG_P, QUANT)
        u = _row_outputs(uu_ptr + i * suu, bu_ptr, usu_ptr + i * P, wu, rows, row_ok, RU, RU // PACK, RU // PACK,
                         i * P, HAS_BU, DTYPE, BPM, RU_P, QUANT)
        h = _round(_round(g / (1.0 + tl.exp(-g)), DTYPE) * u, DTYPE)          # silu(g) * u, as stored
        v = _load_factor_tile(vd_ptr + i * svd, rows, row_ok, RD // PACK, 1, 0, RD, RD // PACK, BPM, RD_P, QUANT)
        z += tl.sum(h[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    d_ok = offs_d < RD
    if QUANT:
        z *= tl.load(vsd_ptr + i * RD + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    for o in range(B_OUT_D):
        s = tl.load(sd_ptr + o * ssd + i * RD + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        tl.atomic_add(half + W_DOWN + o * BT * RD + offs_t[:, None] * RD + offs_d[None, :], s[None, :] * z,
                      mask=t_ok[:, None] & d_ok[None, :], sem="relaxed")


# Stage 1 and 3 configs as in gemv (the grouped and one-layer kernels); the middle kernel's own: BPM
# rows of gate, up and down per loop step, its warps, and programs per SM.
DEFAULT = {**gemv.DEFAULT, "BPM": 4, "warps_mid": 8, "per_sm_mid": 1}
CANDIDATES = (DEFAULT, {**DEFAULT, "BPM": 8, "per_sm_mid": 2},
              {**DEFAULT, "late": True, "mode": "pdl", "prefetch": 1},
              {**DEFAULT, "late": True, "mode": "pdl", "prefetch": 1, "BPM": 8, "per_sm_mid": 2},
              {**DEFAULT, "mode": "pdl", "prefetch": 1, "BQ": 128, "BR": 64, "stages": 3, "BP": 8},
              {**DEFAULT, "mode": "pdl", "prefetch": 1, "BQ": 128, "BR": 64, "stages": 3, "BP": 8, "BPM": 8,
               "per_sm_mid": 2})


def candidates(device) -> list[dict]:
    """The chain configs worth timing on ``device``: PDL ones only where programmatic launch exists."""
    return [c for c in CANDIDATES if c["mode"] != "pdl" or pdl_supported(device)]


def chainable(gate, up, down) -> str | None:
    """Why these layers cannot run as one chain, or None if they can: each (U, S, V, bias, shape), or
    (U, S, V, bias, shape, U_scale, V_scale) with codes (all three alike)."""
    why = gemv.groupable([gate, up, down])
    if why:
        return why
    g, u, d = gate[4], up[4], down[4]
    if (g.out_features, g.b_out, g.p) != (u.out_features, u.b_out, u.p):
        return f"gate ({g.out_features} rows in {g.b_out} blocks) and up ({u.out_features} in {u.b_out}) differ"
    if d.b_in != g.b_out or d.q != g.p:        # then down's input rows are gate's output rows, padding alike
        return (f"down's input blocks ({d.b_in} of {d.q}) are not gate's output blocks ({g.b_out} of {g.p})")
    if max(g.rank, u.rank, d.rank) > MAX_RANK:
        return f"a rank above {MAX_RANK}"
    return None


def _layout(gate, up, down, BT: int, w_gate: int = 0) -> tuple[int, int, int]:
    """(offset of w_up, offset of w_down, extent) in floats of one workspace half, w_gate starting at
    ``w_gate``."""
    g, u, d = gate[4], up[4], down[4]
    w_up = w_gate + g.b_out * BT * g.rank
    w_down = -(-(w_up + u.b_out * BT * u.rank) // 64) * 64
    return w_up, w_down, w_down + d.b_out * BT * d.rank


def _check_call(x2, cfg, interpret, what: str) -> bool:
    """Whether the chain's launches are programmatic dependents (PDL); errors for what cannot run."""
    if x2.shape[0] > gemv.MAX_T:
        raise ValueError(f"the {what} runs at most {gemv.MAX_T} tokens, got T={x2.shape[0]}")
    if cfg["mode"] not in ("two", "pdl"):
        raise ValueError(f"{what} mode must be 'two' or 'pdl', got {cfg['mode']!r}")
    pdl = cfg["mode"] == "pdl" and not interpret
    if pdl and not pdl_supported(x2.device):
        raise RuntimeError(f"{what} mode 'pdl' needs programmatic dependent launch: a Hopper (sm_90) or newer GPU")
    return pdl


def launch_stage1(x2, members, cfg, ws, sync, extent: int, BT: int, pdl: bool, interpret: bool) -> None:
    """The members' x·V, s-mixed into their w at the start of this call's workspace half (the grouped
    kernel of :mod:`.gemv`); it clears the other half and records ``extent`` floats as this call's."""
    launch_group_stage(1, x2, members, cfg, ws, sync, extent, BT, pdl, interpret)


def launch_group_stage(stage: int, x2, members, cfg, ws, sync, extent: int, BT: int, pdl: bool, interpret: bool,
                       w_at: int = 0, y=None, norm=None) -> None:
    """One stage of the grouped kernel of :mod:`.gemv` over ``members``, their w starting ``w_at``
    floats into this call's workspace half. Stage 1: x·V, s-mixed into their w; it clears the other
    half and records ``extent`` floats as this call's. Stage 2: their w·Uᵀ, side by side into the
    columns of ``y``, each token's outputs scaled by an RMSNorm's factor if ``norm`` = (offset of the
    per-token sums of squares in the half, 1 / features, eps); it moves the generation on."""
    sms = _sm_limits(_index(x2.device))[0] if x2.is_cuda else 4
    anchors, anchor_const = gemv.group_anchors(members, cfg, x2)
    _, flags = gemv._launch_flags(cfg, interpret, x2.device, anchors[0].element_size())
    flags["LINE"] = min(flags["LINE"], cfg["BR"] // anchor_const["PACK"])
    stage_cfg = {**cfg, "BQ": max(8, cfg["BQ"] // BT), "BP": max(4, cfg["BP"] // BT)}
    table, items1, items2, _, _ = gemv._group_table(members, x2.device, cfg["per_sm"] * sms, stage_cfg, BT)
    items = items1 if stage == 1 else items2
    warps = cfg["warps"] if stage == 1 else cfg.get("warps2", cfg["warps"])
    launch = {} if interpret else {"num_warps": warps, "num_stages": cfg["stages"]}
    if pdl:
        launch["launch_pdl"] = True
    w_norm, inv_n, eps = norm if norm is not None else (w_at, 0.0, 0.0)
    out = x2 if y is None else y
    gemv._gemv_group_kernel[(items,)](
        x2, out, *anchors, table, ws[w_at:], sync, x2.shape[0], x2.shape[1], out.stride(0), len(members), items1,
        items2, extent, items, ws.numel() // 2, x2.stride(0), w_norm - w_at, inv_n, float(eps), NORM=norm is not None,
        **anchor_const, BT=BT, BQ=stage_cfg["BQ"], BR=stage_cfg["BR"], BP=stage_cfg["BP"], BK=stage_cfg["BK"],
        ZB=1024, LATE=bool(cfg["late"]), STAGE=stage, PRELOAD=False, RK=16,
        **dict(flags, PREFETCH=flags["PREFETCH"] if pdl and stage == 1 else 0, PDL=pdl), **launch)


def rows_per_program(p: int, b_out: int, cfg, BT: int, device) -> tuple[int, int, int]:
    """(programs per block-row, rows per program, rows per loop step) of a kernel that walks the rows
    of ``b_out`` blocks of ``p`` rows with about ``per_sm_mid`` programs per SM."""
    sms = _sm_limits(_index(device))[0] if device.type == "cuda" else 4
    per_block = max(1, -(-cfg["per_sm_mid"] * sms // b_out))
    bpm = max(2, cfg["BPM"] // BT)
    rows = -(-p // per_block)
    rows = -(-rows // bpm) * bpm
    return -(-p // rows), rows, bpm


def launch_mid_and_down(x2, gate, up, down, cfg, ws, sync, offsets, BT: int, pdl: bool, interpret: bool,
                        norm=None, out=None, down_stage2: bool = True) -> torch.Tensor | None:
    """The chain's middle kernel (gate/up w·Uᵀ, SiLU·mul, down x·V) and down's w·Uᵀ, which moves the
    workspace's generation on; ``offsets`` = (w_gate, w_up, w_down) in this call's half. ``norm`` =
    (offset of the per-token sums of squares, 1 / features, eps): gate's and up's w are scaled by the
    RMSNorm's factor of each token first. Returns down's output (in ``out`` if given); without
    ``down_stage2`` only the middle kernel runs (a later kernel reads w_down) and None is returned."""
    T = x2.shape[0]
    g, d = gate[4], down[4]
    w_gate, w_up, w_down = offsets
    half = ws.numel() // 2
    per_block, rows, bpm = rows_per_program(g.p, g.b_out, cfg, BT, x2.device)
    mid = {} if interpret else {"num_warps": cfg["warps_mid"], "num_stages": 1}
    if pdl:
        mid["launch_pdl"] = True
    gb, ub = gate[3], up[3]
    anchor_const = gemv.group_anchors([gate, up, down], cfg, x2)[1]
    quant, pack = anchor_const["QUANT"], anchor_const["PACK"]
    stored = [layer[0].shape[-1] for layer in (gate, up, down)]             # code (or float) entries a row
    scales = [layer[5:] if quant else (x2, x2) for layer in (gate, up, down)]
    w_norm, inv_n, eps = norm if norm is not None else (0, 0.0, 0.0)
    _mlp_mid_kernel[(g.b_out * per_block,)](
        gate[0], up[0], gb if gb is not None else gate[1], ub if ub is not None else up[1], down[2], down[1],
        ws, sync, T, g.out_features, g.p, g.rank, up[4].rank, d.rank, per_block, rows, half, w_gate, w_up, w_down,
        d.b_out, g.p * stored[0], g.p * stored[1], d.q * stored[2], d.b_in * d.rank, scales[0][0], scales[1][0],
        scales[2][1], w_norm, inv_n, eps,
        HAS_BG=gb is not None, HAS_BU=ub is not None, BT=BT, BPM=bpm, RG_P=triton.next_power_of_2(g.rank),
        RU_P=triton.next_power_of_2(up[4].rank), RD_P=triton.next_power_of_2(d.rank), PDL=pdl,
        AL=math.gcd(g.rank, up[4].rank, d.rank, 16), ALC=math.gcd(*stored, 16), QUANT=quant, PACK=pack,
        NORM=norm is not None, **mid)
    if not down_stage2:
        return None
    U, S, V, bias = down[:4]
    us, vs = down[5:] if quant else (None, None)
    return gemv.blast_gemv(x2.new_empty(T, d.in_features), U, S, V, bias, d, cfg, interpret=interpret,
                           only_stage=2, chained=(sync, ws[w_down:], half), U_scale=us, V_scale=vs, out=out)


def blast_mlp_chain_gemv(x2, gate, up, down, cfg: dict | None = None, *, interpret: bool = False) -> torch.Tensor:
    """``down(silu(gate(x2)) * up(x2))`` (T, down.out_features) for T <= :data:`gemv.MAX_T`; each layer is
    (U, S, V, bias, shape) with float factors, or (U, S, V, bias, shape, U_scale, V_scale) with codes
    (as :func:`gemv.blast_gemv` takes them)."""
    cfg = {**DEFAULT, **(cfg or {})}
    why = chainable(gate, up, down)
    if why:
        raise ValueError(f"cannot run these layers as one MLP chain: {why}")
    pdl = _check_call(x2, cfg, interpret, "MLP chain")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    BT = triton.next_power_of_2(x2.shape[0])
    w_up, w_down, extent = _layout(gate, up, down, BT)
    sync, ws = gemv.workspace(x2.device, extent)
    # 1: gate/up x·V into [w_gate | w_up] of this call's half; clears the other half, records the extent
    launch_stage1(x2, [gate, up], cfg, ws, sync, extent, BT, pdl, interpret)
    # 2: gate/up w·Uᵀ, SiLU·mul, down x·V into w_down; 3: down w·Uᵀ (+ bias), moving the generation on
    return launch_mid_and_down(x2, gate, up, down, cfg, ws, sync, (0, w_up, w_down), BT, pdl, interpret)
