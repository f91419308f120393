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
from .codes import _load_factor_tile
from .decode import gdc_launch_dependents, gdc_wait

DEFAULT = mlp_chain.DEFAULT
CANDIDATES = mlp_chain.CANDIDATES
candidates = mlp_chain.candidates


@triton.jit
def _follow_z(z, xw, v_ptr, rows, row_ok, R, BPM: tl.constexpr, R_P: tl.constexpr, QUANT: tl.constexpr,
              PACK: tl.constexpr):
    """``z + xw · V[rows, :]`` for one following layer (V rows of R entries, codes with QUANT)."""
    v = _load_factor_tile(v_ptr, rows, row_ok, R // PACK, 1, 0, R, R // PACK, BPM, R_P, QUANT)
    return z + tl.sum(xw[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)


@triton.jit
def _add_mixed(z, w_ptr, s_ptr, vs_ptr, i, R, B_OUT, ss, offs_t, t_ok, BT: tl.constexpr, R_P: tl.constexpr,
               QUANT: tl.constexpr):
    """Add ``s[o, i] * z`` into w[o] (B_OUT, BT, R) of one following layer for every block-row o; with
    QUANT, z is first scaled by the layer's V_scale[i, :]."""
    offs_r = tl.arange(0, R_P)
    r_ok = offs_r < R
    if QUANT:
        z *= tl.load(vs_ptr + i * R + offs_r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    for o in range(B_OUT):
        s = tl.load(s_ptr + o * ss + i * R + offs_r, mask=r_ok, other=0.0).to(tl.float32)
        tl.atomic_add(w_ptr + o * BT * R + offs_t[:, None] * R + offs_r[None, :], s[None, :] * z,
                      mask=t_ok[:, None] & r_ok[None, :], sem="relaxed")


@triton.jit
def _lead_kernel(uo_ptr, bo_ptr, res_ptr, nw_ptr, h_ptr, ws_ptr, sync_ptr,
                 v1_ptr, s1_ptr, vs1_ptr, v2_ptr, s2_ptr, vs2_ptr, v3_ptr, s3_ptr, vs3_ptr,
                 T, H, P, RO, R1, R2, R3, PER_BLOCK, ROWS, HALF, W_O, W1, W2, W3, W_NORM, B_OUT1, B_OUT2, B_OUT3,
                 suo, sv1, sv2, sv3, ss1, ss2, ss3, sres, sh, uso_ptr,
                 HAS_BO: tl.constexpr, BT: tl.constexpr, BPM: tl.constexpr, RO_P: tl.constexpr,
                 R1_P: tl.constexpr, R2_P: tl.constexpr, R3_P: tl.constexpr, NF: tl.constexpr, PDL: tl.constexpr,
                 AL: tl.constexpr, ALC: tl.constexpr, QUANT: tl.constexpr, PACK: tl.constexpr):
    """Program (i, k): rows ``k * ROWS ...`` of block-row i of the leading layer (o_proj, or down; P
    rows a block, U blocks ``suo`` apart, rows of RO, its w at W_O; H output features, rows past them
    are padding): ``y = w · U[rows]ᵀ`` (+ bias), ``h = residual + y`` stored at ``h_ptr``, ``sum(h²)``
    per token added at W_NORM, and ``z = (h * weight) · V[i, rows, :]`` for each of the NF (2 or 3)
    following layers (gate and up, or q, k and v: V blocks ``sv*`` apart, rows of R*), added as
    ``s[o, i] * z`` into their w at W* (S blocks ``ss*`` apart) for every block-row o. Factors are
    contiguous; AL: a power of two (up to 16) dividing the ranks. QUANT (8 or 4) and PACK as in
    :mod:`.gemv`: the U and V read hold codes, rows of R / PACK stored entries (the code strides
    ``suo``, ``sv*`` count them, ALC divides them); the leading layer's outputs are scaled per row by
    ``uso_ptr`` (U_scale), each following layer's z per rank by its ``vs*_ptr`` (V_scale)."""
    pid = tl.program_id(0)
    if AL > 1:
        RO = (RO // AL) * AL
        R1 = (R1 // AL) * AL
        R2 = (R2 // AL) * AL
        R3 = (R3 // AL) * AL
        ss1 = (ss1 // AL) * AL
        ss2 = (ss2 // AL) * AL
        ss3 = (ss3 // AL) * AL
    if ALC > 1:
        suo = (suo // ALC) * ALC
        sv1 = (sv1 // ALC) * ALC
        sv2 = (sv2 // ALC) * ALC
        sv3 = (sv3 // ALC) * ALC
    i = pid // PER_BLOCK
    r0 = (pid % PER_BLOCK) * ROWS
    r1 = tl.minimum(P, r0 + ROWS)
    DTYPE: tl.constexpr = h_ptr.dtype.element_ty
    if PDL:
        gdc_wait()                  # the leading layer's stage 1 (and everything before it) has finished
        gdc_launch_dependents()
    half = ws_ptr + (tl.load(sync_ptr, volatile=True) & 1) * HALF
    offs_t = tl.arange(0, BT)
    t_ok = offs_t < T
    offs_o = tl.arange(0, RO_P)
    wo = tl.load(half + W_O + i * BT * RO + offs_t[:, None] * RO + offs_o[None, :],
                 mask=t_ok[:, None] & (offs_o < RO)[None, :], other=0.0, cache_modifier=".cg")
    z1 = tl.zeros((BT, R1_P), dtype=tl.float32)
    z2 = tl.zeros((BT, R2_P), dtype=tl.float32)
    z3 = tl.zeros((BT, R3_P), dtype=tl.float32)
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
        z1 = _follow_z(z1, xw, v1_ptr + i * sv1, rows, row_ok, R1, BPM, R1_P, QUANT, PACK)
        z2 = _follow_z(z2, xw, v2_ptr + i * sv2, rows, row_ok, R2, BPM, R2_P, QUANT, PACK)
        if NF == 3:
            z3 = _follow_z(z3, xw, v3_ptr + i * sv3, rows, row_ok, R3, BPM, R3_P, QUANT, PACK)
    tl.atomic_add(half + W_NORM + offs_t, sumsq, mask=t_ok, sem="relaxed")
    _add_mixed(z1, half + W1, s1_ptr, vs1_ptr, i, R1, B_OUT1, ss1, offs_t, t_ok, BT, R1_P, QUANT)
    _add_mixed(z2, half + W2, s2_ptr, vs2_ptr, i, R2, B_OUT2, ss2, offs_t, t_ok, BT, R2_P, QUANT)
    if NF == 3:
        _add_mixed(z3, half + W3, s3_ptr, vs3_ptr, i, R3, B_OUT3, ss3, offs_t, t_ok, BT, R3_P, QUANT)


def launch_lead(lead, follow, residual2, norm_weight, h_out, cfg, ws, sync, w_lead: int, w_follow, w_norm: int,
                BT: int, pdl: bool, interpret: bool) -> None:
    """The lead kernel for ``lead`` (o_proj or down, its w at ``w_lead``) and the 2 or 3 ``follow``
    layers reading the norm of ``residual2 + lead's output`` (their w at ``w_follow``), writing that
    sum into ``h_out``; every layer (U, S, V, bias, shape[, U_scale, V_scale])."""
    sl = lead[4]
    T, H = residual2.shape
    per_block, rows, bpm = mlp_chain.rows_per_program(sl.p, sl.b_out, cfg, BT, residual2.device)
    options = {} if interpret else {"num_warps": cfg["warps_mid"], "num_stages": 1}
    if pdl:
        options["launch_pdl"] = True
    quant, pack = (gemv.group_anchors([lead, *follow], cfg, residual2)[1][k] for k in ("QUANT", "PACK"))
    slots = list(follow) + [follow[0]] * (3 - len(follow))              # an unused third slot repeats the first
    offsets = list(w_follow) + [w_follow[0]] * (3 - len(follow))
    stored = [layer[0].shape[-1] for layer in (lead, *slots)]             # code (or float) entries a row
    factors = []
    for layer in slots:
        factors += [layer[2], layer[1], layer[6] if quant else residual2]
    shapes = [layer[4] for layer in slots]
    _lead_kernel[(sl.b_out * per_block,)](
        lead[0], lead[3] if lead[3] is not None else lead[1], residual2, norm_weight, h_out, ws, sync, *factors,
        T, H, sl.p, sl.rank, *(s.rank for s in shapes), per_block, rows, ws.numel() // 2, w_lead, *offsets, w_norm,
        *(s.b_out for s in shapes), sl.p * stored[0], *(s.q * c for s, c in zip(shapes, stored[1:])),
        *(s.b_in * s.rank for s in shapes), residual2.stride(0), h_out.stride(0), lead[5] if quant else residual2,
        HAS_BO=lead[3] is not None, BT=BT, BPM=bpm, RO_P=triton.next_power_of_2(sl.rank),
        **{f"R{k}_P": triton.next_power_of_2(s.rank) for k, s in enumerate(shapes, start=1)}, NF=len(follow),
        PDL=pdl, AL=math.gcd(sl.rank, *(s.rank for s in shapes), 16), ALC=math.gcd(*stored, 16), QUANT=quant,
        PACK=pack, **options)


def tail_chainable(o, gate, up, down) -> str | None:
    """Why these layers cannot run as one block tail, or None if they can: each (U, S, V, bias, shape),
    or all four (U, S, V, bias, shape, U_scale, V_scale) with codes of one format; the MLP must chain
    (:func:`mlp_chain.chainable`), o stream like a group member (:func:`gemv.groupable`), and o's row
    blocks be gate's and up's column blocks."""
    why = mlp_chain.chainable(gate, up, down) or gemv.groupable([o, gate, up, down])
    if why:
        return why
    g, u = gate[4], up[4]
    if (g.b_in, g.q) != (u.b_in, u.q):
        return f"gate's input blocks ({g.b_in} of {g.q}) are not up's ({u.b_in} of {u.q})"
    if down[4].out_features != o[4].out_features:
        return f"down has {down[4].out_features} outputs where o has {o[4].out_features}"
    return _meets(o[4], g, "o", "gate")


def _meets(lead, follow, lead_name: str, follow_name: str) -> str | None:
    """Why the lead kernel cannot stream ``follow`` (a BlastShape) from ``lead``'s output rows, or None:
    row c of lead's output must be input feature c of follow, in the same blocks."""
    if lead.out_features != follow.in_features or lead.b_out != follow.b_in or lead.p != follow.q:
        return (f"{lead_name}'s output blocks ({lead.b_out} of {lead.p}, {lead.out_features} features) are not "
                f"{follow_name}'s input blocks ({follow.b_in} of {follow.q}, {follow.in_features} features)")
    if max(lead.rank, follow.rank) > mlp_chain.MAX_RANK:
        return f"a rank above {mlp_chain.MAX_RANK}"
    return None


def _aligned(n: int) -> int:
    return -(-n // 64) * 64


def _start(x2, residual2, o, norm_weight, eps, gate, up, down, cfg, interpret, what, width: int, extra: int = 0,
           keep_h: bool = True):
    """Checks, the output (T, ``width``), the workspace layout ``[w_o | w_gate | w_up | w_down | extra |
    sums of squares]`` and the first three launches of a block tail (o's x·V; the lead kernel into gate
    and up, writing h into the output's first columns, or with ``keep_h=False`` into a buffer of its
    own; the MLP chain's middle kernel with the norm's scale). Returns (state: the workspace, layout
    and flags the caller's launches need, output, h)."""
    cfg = {**DEFAULT, **(cfg or {})}
    why = tail_chainable(o, gate, up, down)
    if why:
        raise ValueError(f"cannot run these layers as one {what}: {why}")
    pdl = mlp_chain._check_call(x2, cfg, interpret, what)
    H, T = o[4].out_features, x2.shape[0]
    if tuple(residual2.shape) != (T, H) or tuple(norm_weight.shape) != (H,):
        raise ValueError(f"the residual must be ({T}, {H}) and the norm weight ({H},), got "
                         f"{tuple(residual2.shape)} and {tuple(norm_weight.shape)}")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    residual2, norm_weight = residual2.contiguous(), norm_weight.contiguous()
    BT = triton.next_power_of_2(T)
    w_gate = _aligned(o[4].b_out * BT * o[4].rank)
    w_up, w_down, end = mlp_chain._layout(gate, up, down, BT, w_gate)
    w_extra = _aligned(end)
    w_norm = _aligned(w_extra + extra)
    extent = w_norm + 2 * BT                    # two rows of sums: this block's norm and (a seam's) the next
    sync, ws = gemv.workspace(x2.device, extent)
    out = torch.empty(T, width, device=x2.device, dtype=x2.dtype)
    h = out[:, :H] if keep_h else torch.empty(T, H, device=x2.device, dtype=x2.dtype)
    # 1: o's x·V into w_o; clears the other half, records the whole extent
    mlp_chain.launch_stage1(x2, [o], cfg, ws, sync, extent, BT, pdl, interpret)
    # 2: o's w·Uᵀ, + residual -> h, sums of squares, gate's and up's x·V of h * weight
    launch_lead(o, (gate, up), residual2, norm_weight, h, cfg, ws, sync, 0, (w_gate, w_up), w_norm, BT, pdl, interpret)
    # 3: the MLP chain's middle kernel with the norm's scale (down's x·V into w_down)
    mlp_chain.launch_mid_and_down(h, gate, up, down, cfg, ws, sync, (w_gate, w_up, w_down), BT, pdl, interpret,
                                  norm=(w_norm, 1.0 / H, float(eps)), down_stage2=False)
    state = dict(cfg=cfg, pdl=pdl, ws=ws, sync=sync, w_down=w_down, w_extra=w_extra, w_norm=w_norm)
    return state, out, h


def blast_block_tail_gemv(x2, residual2, o, norm_weight, eps: float, gate, up, down, cfg: dict | None = None, *,
                          interpret: bool = False) -> torch.Tensor:
    """``cat([h, down(silu(gate(n)) * up(n))], -1)`` with ``h = residual2 + o(x2)`` and ``n`` the RMSNorm
    of h times ``norm_weight`` (``eps`` inside the root), (T, 2 * features) for T <= :data:`gemv.MAX_T`;
    each layer (U, S, V, bias, shape) with float factors, or (U, S, V, bias, shape, U_scale, V_scale)
    with codes (as :func:`gemv.blast_gemv` takes them)."""
    H = o[4].out_features
    state, out, _ = _start(x2, residual2, o, norm_weight, eps, gate, up, down, cfg, interpret, "block tail", 2 * H)
    # 4: down's w·Uᵀ into the right half of out; moves the workspace's generation on
    U, S, V, bias = down[:4]
    us, vs = down[5:] if len(down) == 7 else (None, None)
    gemv.blast_gemv(out[:, :H], U, S, V, bias, down[4], state["cfg"], interpret=interpret, only_stage=2,
                    chained=(state["sync"], state["ws"][state["w_down"]:], state["ws"].numel() // 2),
                    U_scale=us, V_scale=vs, out=out[:, H:])
    return out


def seam_chainable(o, gate, up, down, heads) -> str | None:
    """Why a block tail and the next block's 2 or 3 sibling layers ``heads`` (q/k/v) cannot run as one
    seam, or None if they can: the tail must chain (:func:`tail_chainable`), the heads stream as a
    group with the rest (:func:`gemv.groupable`), and down's row blocks be their column blocks."""
    if not 2 <= len(heads) <= 3:
        return f"a seam takes 2 or 3 following layers, got {len(heads)}"
    why = tail_chainable(o, gate, up, down) or gemv.groupable([o, gate, up, down, *heads])
    if why:
        return why
    return next((why for k, head in enumerate(heads) if (why := _meets(down[4], head[4], "down", f"head {k}"))), None)


def blast_block_seam_gemv(x2, residual2, o, norm_weight, eps: float, gate, up, down, next_norm_weight,
                          next_eps: float, heads, cfg: dict | None = None, *, interpret: bool = False) -> torch.Tensor:
    """A block tail and the next block's first layers: ``cat([h2, *(head(n2) for head in heads)], -1)``
    with ``h = residual2 + o(x2)``, ``h2 = h + down(silu(gate(n)) * up(n))``, ``n`` and ``n2`` the RMSNorms
    of h and h2 times ``norm_weight`` and ``next_norm_weight``; (T, features + the heads' outputs) for
    T <= :data:`gemv.MAX_T`; layers as for :func:`blast_block_tail_gemv`. Five launches: the tail's
    first three, then a lead kernel for down (its w·Uᵀ, the residual add, the next norm's sums of
    squares, the heads' x·V) and the heads' w·Uᵀ as one group, scaled by the next norm."""
    why = seam_chainable(o, gate, up, down, heads)
    if why:
        raise ValueError(f"cannot run these layers as one block seam: {why}")
    H = o[4].out_features
    if tuple(next_norm_weight.shape) != (H,):
        raise ValueError(f"the next norm weight must be ({H},), got {tuple(next_norm_weight.shape)}")
    BT = triton.next_power_of_2(x2.shape[0])
    width = sum(head[4].out_features for head in heads)
    sizes = [head[4].b_out * BT * head[4].rank for head in heads]         # floats of each head's w
    extent = sum(sizes)
    state, out, h = _start(x2, residual2, o, norm_weight, eps, gate, up, down, cfg, interpret, "block seam",
                           H + width, extra=extent, keep_h=False)
    cfg, ws, sync, pdl = state["cfg"], state["ws"], state["sync"], state["pdl"]
    h2, ys = out[:, :H], out[:, H:]
    # 4: down's w·Uᵀ, + h -> h2, the next norm's sums of squares, the heads' x·V of h2 * next weight
    w_heads = state["w_extra"]
    offsets = [w_heads + sum(sizes[:k]) for k in range(len(heads))]
    launch_lead(down, heads, h, next_norm_weight.contiguous(), h2, cfg, ws, sync, state["w_down"], offsets,
                state["w_norm"] + BT, BT, pdl, interpret)
    # 5: the heads' w·Uᵀ as one group (their w from w_heads), scaled by the next norm; ends the call
    mlp_chain.launch_group_stage(2, h2, list(heads), cfg, ws, sync, extent, BT, pdl, interpret, w_at=w_heads, y=ys,
                                 norm=(state["w_norm"] + BT, 1.0 / H, next_eps))
    return out
