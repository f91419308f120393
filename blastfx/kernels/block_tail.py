"""The tail of a decoder block at decode, chained across its RMSNorm: o_proj, the residual add, the
norm and the gated MLP in four launches.

Why: after attention a Llama-style block runs ``h = residual + o(a)``, ``x = rmsnorm(h) * weight`` and
``down(silu(gate(x)) * up(x))``: o's two stages, a norm kernel and the MLP chain's three launches
(:mod:`.mlp_chain`), each paying a fixed cost of several microseconds on top of its bytes. Row ``c``
of o's output is input feature ``c`` of gate and up, as in the MLP chain, so one kernel can stream a
range of o's U rows against its ``w``, add the residual, keep the rows (the new residual stream) and
stream the same rows of gate's and up's V. The norm needs the whole row, but only as one scalar per
token: gate's and up's x·V stage and s-mix are linear in their input, so the kernel feeds them
``h * weight``, adds each token's sum of squares into the workspace, and the MLP chain's middle kernel
scales gate's and up's ``w`` by ``rsqrt(mean(h²) + eps)`` when it reads them. The launches:

1. o's x·V, s-mixed into ``w_o`` (the grouped kernel of :mod:`.gemv`, one member);
2. the lead kernel (:func:`_lead_kernel`): o's w·Uᵀ, the residual add, the sums of squares, gate's
   and up's x·V into ``w_gate`` and ``w_up``;
3. the MLP chain's middle kernel, with the norm's scale;
4. down's w·Uᵀ, which moves the workspace's generation on.

One half of the :mod:`.gemv` workspace holds ``[w_o | w_gate | w_up | w_down | sums of squares]``.
The result is ``h`` and the MLP's output side by side, (T, 2 * features): the caller adds them.
Roundings: o's output and ``h`` are rounded to the activation dtype where the reference rounds them;
the normalized input is not (the reference rounds it twice, before and after the weight), so the two
differ by those roundings and the summation order.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import gemv, mlp_chain
from .decode import gdc_launch_dependents, gdc_wait

DEFAULT = mlp_chain.DEFAULT
CANDIDATES = mlp_chain.CANDIDATES
candidates = mlp_chain.candidates


@triton.jit
def _lead_kernel(uo_ptr, bo_ptr, res_ptr, nw_ptr, h_ptr, vg_ptr, sg_ptr, vu_ptr, su_ptr, ws_ptr, sync_ptr,
                 T, H, P, RO, RG, RU, PER_BLOCK, ROWS, HALF, W_GATE, W_UP, W_NORM, B_OUT_G, B_OUT_U,
                 suo, svg, svu, ssg, ssu, sres, sh, uso_ptr, vsg_ptr, vsu_ptr,
                 HAS_BO: tl.constexpr, BT: tl.constexpr, BPM: tl.constexpr, RO_P: tl.constexpr,
                 RG_P: tl.constexpr, RU_P: tl.constexpr, PDL: tl.constexpr, AL: tl.constexpr,
                 ALC: tl.constexpr, QUANT: tl.constexpr, PACK: tl.constexpr):
    """Program (i, k): rows ``k * ROWS ...`` of block-row i of o (P rows a block, U_o blocks ``suo``
    apart, rows of RO; H output features, rows past them are padding): ``y = w_o · U_o[rows]ᵀ``
    (+ bias), ``h = residual + y`` stored at ``h_ptr``, ``sum(h²)`` per token added at W_NORM, and
    ``z = (h * weight) · V[i, rows, :]`` for gate and up (V blocks ``svg`` / ``svu`` apart, rows of RG
    / RU), added as ``s[o, i] * z`` into their w (S blocks ``ssg`` / ``ssu`` apart) for every block-row
    o. Factors are contiguous; AL: a power of two (up to 16) dividing the three ranks. QUANT (8 or 4)
    and PACK as in :mod:`.gemv`: U_o, V_gate and V_up hold codes, rows of R / PACK stored entries (the
    code strides ``suo``, ``svg``, ``svu`` count them, ALC divides them); o's outputs are scaled per
    row by ``uso_ptr`` (U_scale), gate's and up's z per rank by ``vsg_ptr`` / ``vsu_ptr`` (V_scale)."""
    pid = tl.program_id(0)
    if AL > 1:
        RO = (RO // AL) * AL
        RG = (RG // AL) * AL
        RU = (RU // AL) * AL
        ssg = (ssg // AL) * AL
        ssu = (ssu // AL) * AL
    if ALC > 1:
        suo = (suo // ALC) * ALC
        svg = (svg // ALC) * ALC
        svu = (svu // ALC) * ALC
    i = pid // PER_BLOCK
    r0 = (pid % PER_BLOCK) * ROWS
    r1 = tl.minimum(P, r0 + ROWS)
    DTYPE: tl.constexpr = h_ptr.dtype.element_ty
    if PDL:
        gdc_wait()                  # o's stage 1 (and everything before it) has finished
        gdc_launch_dependents()
    half = ws_ptr + (tl.load(sync_ptr, volatile=True) & 1) * HALF
    offs_t = tl.arange(0, BT)
    t_ok = offs_t < T
    offs_o = tl.arange(0, RO_P)
    offs_g = tl.arange(0, RG_P)
    offs_u = tl.arange(0, RU_P)
    wo = tl.load(half + i * BT * RO + offs_t[:, None] * RO + offs_o[None, :],
                 mask=t_ok[:, None] & (offs_o < RO)[None, :], other=0.0, cache_modifier=".cg")
    zg = tl.zeros((BT, RG_P), dtype=tl.float32)
    zu = tl.zeros((BT, RU_P), dtype=tl.float32)
    sumsq = tl.zeros((BT,), dtype=tl.float32)
    for c0 in range(r0, r1, BPM):
        rows = c0 + tl.arange(0, BPM)
        row_ok = (rows < r1) & (i * P + rows < H)
        y = mlp_chain._row_outputs(uo_ptr + i * suo, bo_ptr, uso_ptr + i * P, wo, rows, row_ok, RO, RO // PACK,
                                   RO // PACK, i * P, HAS_BO, DTYPE, BPM, RO_P, QUANT)
        cols = i * P + rows
        ok = t_ok[:, None] & row_ok[None, :]
        res = tl.load(res_ptr + offs_t[:, None] * sres + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        h = mlp_chain._round(res + y, DTYPE)
        tl.store(h_ptr + offs_t[:, None] * sh + cols[None, :], h.to(DTYPE), mask=ok)
        sumsq += tl.sum(h * h, axis=1)
        xw = h * tl.load(nw_ptr + cols, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        vg = gemv._load_factor_tile(vg_ptr + i * svg, rows, row_ok, RG // PACK, 1, 0, RG, RG // PACK, BPM, RG_P,
                                    QUANT)
        zg += tl.sum(xw[:, :, None] * vg.to(tl.float32)[None, :, :], axis=1)
        vu = gemv._load_factor_tile(vu_ptr + i * svu, rows, row_ok, RU // PACK, 1, 0, RU, RU // PACK, BPM, RU_P,
                                    QUANT)
        zu += tl.sum(xw[:, :, None] * vu.to(tl.float32)[None, :, :], axis=1)
    tl.atomic_add(half + W_NORM + offs_t, sumsq, mask=t_ok, sem="relaxed")
    g_ok = offs_g < RG
    if QUANT:
        zg *= tl.load(vsg_ptr + i * RG + offs_g, mask=g_ok, other=0.0).to(tl.float32)[None, :]
        zu *= tl.load(vsu_ptr + i * RU + offs_u, mask=offs_u < RU, other=0.0).to(tl.float32)[None, :]
    for o in range(B_OUT_G):
        s = tl.load(sg_ptr + o * ssg + i * RG + offs_g, mask=g_ok, other=0.0).to(tl.float32)
        tl.atomic_add(half + W_GATE + o * BT * RG + offs_t[:, None] * RG + offs_g[None, :], s[None, :] * zg,
                      mask=t_ok[:, None] & g_ok[None, :], sem="relaxed")
    u_ok = offs_u < RU
    for o in range(B_OUT_U):
        s = tl.load(su_ptr + o * ssu + i * RU + offs_u, mask=u_ok, other=0.0).to(tl.float32)
        tl.atomic_add(half + W_UP + o * BT * RU + offs_t[:, None] * RU + offs_u[None, :], s[None, :] * zu,
                      mask=t_ok[:, None] & u_ok[None, :], sem="relaxed")


def tail_chainable(o, gate, up, down) -> str | None:
    """Why these layers cannot run as one block tail, or None if they can: each (U, S, V, bias, shape),
    or all four (U, S, V, bias, shape, U_scale, V_scale) with codes of one format; the MLP must chain
    (:func:`mlp_chain.chainable`), o stream like a group member (:func:`gemv.groupable`), and o's row
    blocks be gate's and up's column blocks."""
    why = mlp_chain.chainable(gate, up, down) or gemv.groupable([o, gate, up, down])
    if why:
        return why
    so, g, u = o[4], gate[4], up[4]
    if (g.b_in, g.q) != (u.b_in, u.q):
        return f"gate's input blocks ({g.b_in} of {g.q}) are not up's ({u.b_in} of {u.q})"
    if so.out_features != g.in_features or so.b_out != g.b_in or so.p != g.q:
        return (f"o's output blocks ({so.b_out} of {so.p}, {so.out_features} features) are not gate's input "
                f"blocks ({g.b_in} of {g.q}, {g.in_features} features)")
    if so.rank > mlp_chain.MAX_RANK:
        return f"a rank above {mlp_chain.MAX_RANK}"
    return None


def blast_block_tail_gemv(x2, residual2, o, norm_weight, eps: float, gate, up, down, cfg: dict | None = None, *,
                          interpret: bool = False) -> torch.Tensor:
    """``cat([h, down(silu(gate(n)) * up(n))], -1)`` with ``h = residual2 + o(x2)`` and ``n`` the RMSNorm
    of h times ``norm_weight`` (``eps`` inside the root), (T, 2 * features) for T <= :data:`gemv.MAX_T`;
    each layer (U, S, V, bias, shape) with float factors, or (U, S, V, bias, shape, U_scale, V_scale)
    with codes (as :func:`gemv.blast_gemv` takes them)."""
    cfg = {**DEFAULT, **(cfg or {})}
    why = tail_chainable(o, gate, up, down)
    if why:
        raise ValueError(f"cannot run these layers as one block tail: {why}")
    pdl = mlp_chain._check_call(x2, cfg, interpret, "block tail")
    H = o[4].out_features
    T = x2.shape[0]
    if tuple(residual2.shape) != (T, H) or tuple(norm_weight.shape) != (H,):
        raise ValueError(f"the residual must be ({T}, {H}) and the norm weight ({H},), got "
                         f"{tuple(residual2.shape)} and {tuple(norm_weight.shape)}")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    residual2, norm_weight = residual2.contiguous(), norm_weight.contiguous()
    BT = triton.next_power_of_2(T)
    so, g, u = o[4], gate[4], up[4]
    w_gate = -(-(so.b_out * BT * so.rank) // 64) * 64
    w_up, w_down, w_norm = mlp_chain._layout(gate, up, down, BT, w_gate)
    w_norm = -(-w_norm // 64) * 64
    extent = w_norm + BT
    sync, ws = gemv.workspace(x2.device, extent)
    out = torch.empty(T, 2 * H, device=x2.device, dtype=x2.dtype)
    # 1: o's x·V into w_o; clears the other half, records the whole extent
    mlp_chain.launch_stage1(x2, [o], cfg, ws, sync, extent, BT, pdl, interpret)
    # 2: o's w·Uᵀ, + residual -> h, sums of squares, gate's and up's x·V of h * weight
    per_block, rows, bpm = mlp_chain.rows_per_program(so.p, so.b_out, cfg, BT, x2.device)
    lead = {} if interpret else {"num_warps": cfg["warps_mid"], "num_stages": 1}
    if pdl:
        lead["launch_pdl"] = True
    anchor_const = gemv.group_anchors([o, gate, up], cfg, x2)[1]
    quant = anchor_const["QUANT"]
    stored = [layer[0].shape[-1] for layer in (o, gate, up)]             # code (or float) entries a row
    scales = [layer[5:] if quant else (x2, x2) for layer in (o, gate, up)]
    _lead_kernel[(so.b_out * per_block,)](
        o[0], o[3] if o[3] is not None else o[1], residual2, norm_weight, out, gate[2], gate[1], up[2], up[1], ws,
        sync, T, H, so.p, so.rank, g.rank, u.rank, per_block, rows, ws.numel() // 2, w_gate, w_up, w_norm,
        g.b_out, u.b_out, so.p * stored[0], g.q * stored[1], u.q * stored[2], g.b_in * g.rank, u.b_in * u.rank,
        residual2.stride(0), out.stride(0), scales[0][0], scales[1][1], scales[2][1],
        HAS_BO=o[3] is not None, BT=BT, BPM=bpm, RO_P=triton.next_power_of_2(so.rank),
        RG_P=triton.next_power_of_2(g.rank), RU_P=triton.next_power_of_2(u.rank), PDL=pdl,
        AL=math.gcd(so.rank, g.rank, u.rank, 16), ALC=math.gcd(*stored, 16), QUANT=quant, PACK=anchor_const["PACK"],
        **lead)
    # 3: the MLP chain's middle kernel with the norm's scale; 4: down's w·Uᵀ into the right half of out
    mlp_chain.launch_mid_and_down(out[:, :H], gate, up, down, cfg, ws, sync, (w_gate, w_up, w_down), BT, pdl,
                                  interpret, norm=(w_norm, 1.0 / H, float(eps)), out=out[:, H:])
    return out
