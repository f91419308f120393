"""The BLAST product for a few tokens (T <= 4) on CUDA cores: two GEMV streams, one launch.

Why: at decode a BLAST layer at half the parameters moves half the bytes of its dense layer, so its
time is the time to stream U and V once plus what it costs to cross the dependency between them.
Tensor-core tiles pad T = 1 to 16 rows and stage every weight tile through shared memory; a GEMV
instead loads each weight element once into registers with 16-byte vector loads, keeps many loads
in flight per SM, and multiplies on CUDA cores, which is how a dense GEMV reaches the memory limit.

* **Stage 1, x·V with the s-mix folded in.** A work item is (block-column j, tile of r, chunk of q):
  it streams V[j, chunk, tile] (rows contiguous along r) as an FMA accumulation and adds
  ``s_ij * z_j`` for every block-row i into an fp32 ``w`` with atomics. No partial sums are written
  and nothing is mixed afterwards.
* **Stage 2, w·Uᵀ.** A work item is (block-row i, tile of p): it streams U[i, tile, :] (rows
  contiguous along r) against w_i, adds the bias, casts, and writes y in its (T, m) layout.

``w`` lives in a per-device workspace of two halves; a generation counter on the device picks the
half a call accumulates into, and stage 1 clears the *other* half for the next call, as far as the
call before it wrote there (each call records its extent). So no memset is launched per call and a
CUDA-graph replay finds everything ready. Float atomics make the summation
order vary between runs, so the result is not bitwise reproducible; with
``torch.use_deterministic_algorithms(True)`` the slot kernel of :mod:`.decode` is used instead.

Quantized factors (``QUANT``, :mod:`blastfx.structures.blast.quant`): U and V are loaded as int8 or
float8 codes (``QUANT=8``: one byte per entry, half of bf16's) or packed int4 codes (``QUANT=4``: a tile of
BR codes is BR/2 bytes, two per byte along r; each byte is split in registers into its low and high
nibble, sign-extended, and the two interleaved back into the full tile) and widened to fp32 in
registers; V's per-(j, rank) scale multiplies z after its reduction over q, where ``s_ij``
multiplies anyway, and U's per-row scale multiplies each output after its reduction over r. No
dequantized copy is made. With ``cfg["nibbles"] == "split"`` int4 tiles are not interleaved: the
low nibbles (even ranks) and the high ones (odd ranks) are reduced as two half-width tiles, and the
even and odd elements of w are added and read at stride 2.

Launch modes (``cfg["mode"]``): ``persistent`` runs both stages in one grid no larger than what is
co-resident, with a grid barrier between them; ``two`` is two plain launches; ``pdl`` is two
launches, each a programmatic dependent of the kernel before it (Hopper and newer), so it becomes
resident while that kernel drains. Under ``TRITON_INTERPRET=1`` programs run one after another, so
a grid barrier would wait forever: the one-layer and grouped kernels run their persistent form as
one program (which the barrier lets through), chains run every mode as two plain launches.

Preload (``cfg["preload"]``, persistent mode): a persistent program used to request none of U until
the grid barrier let it through, so every program idled at the barrier with no loads in flight.
With ``preload`` each program loads the whole U tile of its first stage-2 item (all ranks) into
registers before stage 1; only that tile's product with w waits on the barrier.

Late bookkeeping (``cfg["late"]``): stage 1 normally reads the generation counter and clears the
other half before it streams V, two dependent round trips in front of the stream; with ``late`` it
streams and reduces V first, then looks up its half just before the atomics and clears after.

Prefetch (``cfg["prefetch"]``): the fixed cost of a stage (ramp-up until enough loads are in flight,
and the tail) is paid per stage, so the U stream should not wait for the dependency on w. With
``prefetch`` the weights a program will read later are requested into L2 (``prefetch.global.L2``,
nothing held in registers) before it waits: in ``persistent`` mode U at the start (2) or just
before the grid barrier (1); in ``pdl`` mode each stage's weights before ``gdc_wait``, which is
the only point where the previous kernel's results (x, w, the generation counter) may be read.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..structures.blast.layout import BlastShape
from ..structures.blast.quant import formats as factor_formats
from .codes import CODE_DTYPES, CODE_NAMES, _load_factor_tile, _load_nibbles, code_format
from .decode import _index, _prefetch_l2, _prefetch_u, _sm_limits, gdc_launch_dependents, gdc_wait, \
    launch_persistent, pdl_supported
from .state import allocate_state

MAX_T = 4                   # FMA accumulators hold T x tile values per thread; past this, tensor cores win
_WORKSPACES: dict = {}      # per device: (generation + barrier counters, two halves of w)


@triton.jit
def _grid_barrier(sync_ptr, GRID):
    """Every program waits here until all GRID programs arrived; the last to leave resets the
    counters and advances the generation (so the next call uses the other half of w)."""
    tl.debug_barrier()
    tl.atomic_add(sync_ptr + 1, 1, sem="release", scope="gpu")
    arrived = tl.load(sync_ptr + 1, volatile=True)
    while arrived < GRID:
        arrived = tl.load(sync_ptr + 1, volatile=True)
    left = tl.atomic_add(sync_ptr + 2, 1, sem="acq_rel", scope="gpu")
    if left == GRID - 1:
        tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(sync_ptr + 2, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")


@triton.jit
def _clear_other_half(ws_ptr, sync_ptr, gen, pid, GRID, HALF, extent, ZB: tl.constexpr):
    """Clear this program's share of the half the next call uses, as far as the call before wrote
    there; record how far this call writes in its own half (``extent`` floats)."""
    nxt = ws_ptr + ((gen + 1) & 1) * HALF
    dirty = tl.load(sync_ptr + 4 + ((gen + 1) & 1), volatile=True)
    for z0 in range(pid * ZB, dirty, GRID * ZB):
        offs_z = z0 + tl.arange(0, ZB)
        tl.store(nxt + offs_z, tl.zeros((ZB,), tl.float32), mask=offs_z < dirty)
    if pid == 0:
        tl.store(sync_ptr + 4 + (gen & 1), extent)


@triton.jit
def _this_calls_half(ws_ptr, sync_ptr, pid, GRID, HALF, extent, CLEAR: tl.constexpr, ZB: tl.constexpr):
    """The workspace half this call accumulates into (picked by the generation counter); with CLEAR
    (a launch that runs stage 1) also this program's share of clearing the other half."""
    gen = tl.load(sync_ptr, volatile=True)
    if CLEAR:
        _clear_other_half(ws_ptr, sync_ptr, gen, pid, GRID, HALF, extent, ZB)
    return ws_ptr + (gen & 1) * HALF


@triton.jit
def _prefetch_v_items(v_ptr, pid, items, GRID, Q, R, B_IN, Q_CHUNK, R_TILES, svj, svq, svr,
                      BR: tl.constexpr, LINE: tl.constexpr):
    """L2 prefetch of the V tiles of program ``pid``'s stage-1 items (one address per 128-byte line)."""
    offs_l = tl.arange(0, BR // LINE) * LINE
    offs_q = tl.arange(0, 16)
    for item in range(pid, items, GRID):
        rt = item % R_TILES
        jq = item // R_TILES
        j = jq % B_IN
        q0 = (jq // B_IN) * Q_CHUNK
        q_lim = tl.minimum(Q, q0 + Q_CHUNK)
        cols = rt * BR + offs_l
        for c0 in range(q0, q_lim, 16):
            rows = c0 + offs_q
            inside = (rows[:, None] < q_lim) & (cols[None, :] < R)     # outside: the block's own start
            _prefetch_l2(v_ptr + j * svj + tl.where(inside, rows[:, None] * svq + cols[None, :] * svr, 0))


@triton.jit
def _xv_mix_item_split(item, x_ptr, v_ptr, s_ptr, w_ptr, T, N, Q, R, B_IN, B_OUT, Q_CHUNK, R_TILES,
                       sxt, sxn, ssi, ssj, ssr, svj, svq, svr, BT: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr,
                       vs_ptr, svsj, svsr, sync_ptr, HALF, LATE: tl.constexpr, RC):
    """``_xv_mix_item`` for packed int4 V with the nibbles kept apart (even ranks, odd ranks)."""
    offs_t = tl.arange(0, BT)
    tmask = offs_t < T
    rt = item % R_TILES
    jq = item // R_TILES
    j = jq % B_IN
    q0 = (jq // B_IN) * Q_CHUNK
    q_lim = tl.minimum(Q, q0 + Q_CHUNK)
    offs_e = rt * BR + 2 * tl.arange(0, BR // 2)                       # the even ranks; odd = even + 1
    emask = offs_e < R
    omask = offs_e + 1 < R
    acc_e = tl.zeros((BT, BQ, BR // 2), dtype=tl.float32)
    acc_o = tl.zeros((BT, BQ, BR // 2), dtype=tl.float32)
    for c0 in range(q0, q0 + Q_CHUNK, BQ):
        offs_c = c0 + tl.arange(0, BQ)
        col = j * Q + offs_c
        cmask = (offs_c < q_lim) & (col < N)
        lo, hi = _load_nibbles(v_ptr + j * svj, offs_c, cmask, svq, svr, rt * BR, RC, BR)
        xt = tl.load(x_ptr + offs_t[:, None] * sxt + col[None, :] * sxn,
                     mask=tmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)[:, :, None]
        acc_e += xt * lo.to(tl.float32)[None, :, :]
        acc_o += xt * hi.to(tl.float32)[None, :, :]
    z_e = tl.sum(acc_e, axis=1) * tl.load(vs_ptr + j * svsj + offs_e * svsr, mask=emask, other=0.0)[None, :]
    z_o = tl.sum(acc_o, axis=1) * tl.load(vs_ptr + j * svsj + (offs_e + 1) * svsr, mask=omask, other=0.0)[None, :]
    if LATE:
        w_ptr += (tl.load(sync_ptr, volatile=True) & 1) * HALF
    for i in range(B_OUT):
        s_e = tl.load(s_ptr + i * ssi + j * ssj + offs_e * ssr, mask=emask, other=0.0).to(tl.float32)
        s_o = tl.load(s_ptr + i * ssi + j * ssj + (offs_e + 1) * ssr, mask=omask, other=0.0).to(tl.float32)
        w_row = w_ptr + i * BT * R + offs_t[:, None] * R
        tl.atomic_add(w_row + offs_e[None, :], s_e[None, :] * z_e, mask=tmask[:, None] & emask[None, :], sem="relaxed")
        tl.atomic_add(w_row + offs_e[None, :] + 1, s_o[None, :] * z_o, mask=tmask[:, None] & omask[None, :],
                      sem="relaxed")


@triton.jit
def _xv_mix_item(item, x_ptr, v_ptr, s_ptr, w_ptr, T, N, Q, R, B_IN, B_OUT, Q_CHUNK, R_TILES,
                 sxt, sxn, ssi, ssj, ssr, svj, svq, svr, BT: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr,
                 vs_ptr, svsj, svsr, QUANT: tl.constexpr, sync_ptr, HALF, LATE: tl.constexpr, RC,
                 SPLIT: tl.constexpr = False):
    """One stage-1 work item (j, r-tile, q-chunk): stream V[j, chunk, tile] against x_j and add
    ``s_ij * z_j`` into w_i (B_OUT, BT, R) for every block-row i. QUANT (8 or 4): V holds int8 or
    packed int4 codes (then ``svr`` steps bytes of two codes), z is scaled by ``V_scale[j, tile]``.
    LATE: ``w_ptr`` is the workspace, and the half this call accumulates into is looked up only
    once V is reduced, so the generation counter's round trip is not in front of the V stream.
    SPLIT (int4): the even and odd ranks of the tile are reduced as two half-width tiles straight
    from the low and high nibbles and added into w at stride 2."""
    if SPLIT:
        _xv_mix_item_split(item, x_ptr, v_ptr, s_ptr, w_ptr, T, N, Q, R, B_IN, B_OUT, Q_CHUNK, R_TILES,
                           sxt, sxn, ssi, ssj, ssr, svj, svq, svr, BT, BQ, BR, vs_ptr, svsj, svsr, sync_ptr, HALF, LATE,
                           RC)
        return
    offs_t = tl.arange(0, BT)
    tmask = offs_t < T
    rt = item % R_TILES                 # neighbouring programs read neighbouring r-tiles of a row
    jq = item // R_TILES
    j = jq % B_IN
    q0 = (jq // B_IN) * Q_CHUNK
    q_lim = tl.minimum(Q, q0 + Q_CHUNK)
    offs_r = rt * BR + tl.arange(0, BR)
    rmask = offs_r < R
    acc = tl.zeros((BT, BQ, BR), dtype=tl.float32)
    for c0 in range(q0, q0 + Q_CHUNK, BQ):
        offs_c = c0 + tl.arange(0, BQ)
        col = j * Q + offs_c
        cmask = (offs_c < q_lim) & (col < N)
        v = _load_factor_tile(v_ptr + j * svj, offs_c, cmask, svq, svr, rt * BR, R, RC, BQ, BR, QUANT)
        xt = tl.load(x_ptr + offs_t[:, None] * sxt + col[None, :] * sxn,
                     mask=tmask[:, None] & cmask[None, :], other=0.0)
        acc += xt.to(tl.float32)[:, :, None] * v.to(tl.float32)[None, :, :]
    z = tl.sum(acc, axis=1)                                             # (BT, BR)
    if QUANT:
        z *= tl.load(vs_ptr + j * svsj + offs_r * svsr, mask=rmask, other=0.0).to(tl.float32)[None, :]
    if LATE:
        w_ptr += (tl.load(sync_ptr, volatile=True) & 1) * HALF
    for i in range(B_OUT):
        s = tl.load(s_ptr + i * ssi + j * ssj + offs_r * ssr, mask=rmask, other=0.0)
        tl.atomic_add(w_ptr + i * BT * R + offs_t[:, None] * R + offs_r[None, :],
                      s.to(tl.float32)[None, :] * z, mask=tmask[:, None] & rmask[None, :], sem="relaxed")


@triton.jit
def _wu_item(item, u_ptr, b_ptr, y_ptr, w_ptr, T, M, P, R, P_TILES, sui, sup, sur, syt, sym, has_bias,
             BT: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr, us_ptr, susi, susp, QUANT: tl.constexpr, RC,
             SPLIT: tl.constexpr = False, token_scale=None, SCALED: tl.constexpr = False):
    """One stage-2 work item (i, p-tile): stream U[i, tile, :] against w_i; bias, cast, store.
    QUANT (8 or 4): U holds int8 or packed int4 codes (then ``sur`` steps bytes of two codes), each
    output row is scaled by ``U_scale[i, row]``. SCALED: each token's outputs are scaled by its
    ``token_scale`` entry (BT) before the bias."""
    offs_t = tl.arange(0, BT)
    tmask = offs_t < T
    i = item // P_TILES
    offs_p = (item % P_TILES) * BP + tl.arange(0, BP)
    pmask = offs_p < P
    if SPLIT:                           # packed int4: even ranks from low nibbles, odd from high
        acc_e = tl.zeros((BT, BP, BK // 2), dtype=tl.float32)
        acc_o = tl.zeros((BT, BP, BK // 2), dtype=tl.float32)
        for k0 in range(0, R, BK):
            offs_e = k0 + 2 * tl.arange(0, BK // 2)
            lo, hi = _load_nibbles(u_ptr + i * sui, offs_p, pmask, sup, sur, k0, RC, BK)
            w_row = w_ptr + i * BT * R + offs_t[:, None] * R + offs_e[None, :]
            w_e = tl.load(w_row, mask=tmask[:, None] & (offs_e < R)[None, :], other=0.0, cache_modifier=".cg")
            w_o = tl.load(w_row + 1, mask=tmask[:, None] & (offs_e + 1 < R)[None, :], other=0.0, cache_modifier=".cg")
            acc_e += w_e[:, None, :] * lo.to(tl.float32)[None, :, :]
            acc_o += w_o[:, None, :] * hi.to(tl.float32)[None, :, :]
        out = tl.sum(acc_e, axis=2) + tl.sum(acc_o, axis=2)
    else:
        acc = tl.zeros((BT, BP, BK), dtype=tl.float32)
        for k0 in range(0, R, BK):
            offs_k = k0 + tl.arange(0, BK)
            kmask = offs_k < R
            u = _load_factor_tile(u_ptr + i * sui, offs_p, pmask, sup, sur, k0, R, RC, BP, BK, QUANT)
            wv = tl.load(w_ptr + i * BT * R + offs_t[:, None] * R + offs_k[None, :],
                         mask=tmask[:, None] & kmask[None, :], other=0.0, cache_modifier=".cg")
            acc += wv[:, None, :] * u.to(tl.float32)[None, :, :]
        out = tl.sum(acc, axis=2)                                       # (BT, BP)
    _wu_store(out, i, offs_p, b_ptr, y_ptr, T, M, P, syt, sym, has_bias, BT, us_ptr, susi, susp, QUANT,
              token_scale, SCALED)


@triton.jit
def _wu_store(out, i, offs_p, b_ptr, y_ptr, T, M, P, syt, sym, has_bias, BT: tl.constexpr, us_ptr, susi, susp,
              QUANT: tl.constexpr, token_scale, SCALED: tl.constexpr):
    """A stage-2 item's epilogue: U's row scales (codes), the tokens' scales, the bias, the cast and
    the store of ``out`` (BT, BP) into y's rows of block-row i."""
    offs_t = tl.arange(0, BT)
    tmask = offs_t < T
    pmask = offs_p < P
    if QUANT:
        out *= tl.load(us_ptr + i * susi + offs_p * susp, mask=pmask, other=0.0).to(tl.float32)[None, :]
    if SCALED:
        out *= token_scale[:, None]
    rows = i * P + offs_p
    omask = pmask & (rows < M)
    if has_bias:
        out += tl.load(b_ptr + rows, mask=omask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_t[:, None] * syt + rows[None, :] * sym, out.to(y_ptr.dtype.element_ty),
             mask=tmask[:, None] & omask[None, :])


@triton.jit
def _preload_u(u_ptr, item, valid, P, R, RC, P_TILES, sui, sup, sur, BP: tl.constexpr, RK: tl.constexpr,
               QUANT: tl.constexpr):
    """The whole U tile of stage-2 item ``item`` (BP rows, all RK >= R ranks) loaded into registers;
    all zeros where not ``valid`` (a program without a stage-2 item)."""
    offs_p = (item % P_TILES) * BP + tl.arange(0, BP)
    rows = tl.where(valid, P, 0)                   # no rows at all for a program without an item
    return _load_factor_tile(u_ptr + (item // P_TILES) * sui, offs_p, offs_p < rows, sup, sur, 0, R, RC, BP, RK,
                             QUANT)


@triton.jit
def _wu_preloaded_item(u, item, b_ptr, y_ptr, w_ptr, T, M, P, R, P_TILES, syt, sym, has_bias, BT: tl.constexpr,
                       BP: tl.constexpr, RK: tl.constexpr, us_ptr, susi, susp, QUANT: tl.constexpr,
                       token_scale=None, SCALED: tl.constexpr = False):
    """Stage-2 item ``item`` from its U tile already in registers (:func:`_preload_u`): one product
    with all of w_i, then the epilogue (``token_scale`` and SCALED as in :func:`_wu_item`)."""
    offs_t = tl.arange(0, BT)
    i = item // P_TILES
    offs_k = tl.arange(0, RK)
    wv = tl.load(w_ptr + i * BT * R + offs_t[:, None] * R + offs_k[None, :],
                 mask=(offs_t < T)[:, None] & (offs_k < R)[None, :], other=0.0, cache_modifier=".cg")
    out = tl.sum(wv[:, None, :] * u.to(tl.float32)[None, :, :], axis=2)
    _wu_store(out, i, (item % P_TILES) * BP + tl.arange(0, BP), b_ptr, y_ptr, T, M, P, syt, sym, has_bias, BT,
              us_ptr, susi, susp, QUANT, token_scale, SCALED)


@triton.jit
def _advance_generation(sync_ptr, GRID):
    """Two-launch form: the last stage-2 program to finish advances the generation.
    Relaxed, not acquire-release: what must precede the count is this program's read of the
    generation, and that read has completed (w's addresses, and through them the output, depend on
    it), and the barrier before the count keeps every thread's read ahead of it; a release would
    make every program wait for its output stores to land before it exits. The next call sees the
    new generation by stream order (in PDL mode after its ``gdc_wait``)."""
    tl.debug_barrier()
    done = tl.atomic_add(sync_ptr + 3, 1, sem="relaxed", scope="gpu")
    if done == GRID - 1:
        tl.atomic_xchg(sync_ptr + 3, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")


@triton.jit
def _gemv_decode_kernel(x_ptr, u_ptr, s_ptr, v_ptr, b_ptr, y_ptr, ws_ptr, sync_ptr,
                        T, N, M, P, Q, R, RC, B_IN, Q_SPLIT, Q_CHUNK, R_TILES, P_TILES, GRID, HALF,
                        sxt, sxn, sui, sup, sur, ssi, ssj, ssr, svj, svq, svr, syt, sym,
                        us_ptr, vs_ptr, susi, susp, svsj, svsr,
                        HAS_BIAS: tl.constexpr, BT: tl.constexpr, B_OUT: tl.constexpr,
                        BQ: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr,
                        ZB: tl.constexpr, STAGE: tl.constexpr, QUANT: tl.constexpr, PACK: tl.constexpr,
                        PREFETCH: tl.constexpr, PDL: tl.constexpr, LINE: tl.constexpr, ADVANCE: tl.constexpr,
                        LATE: tl.constexpr, SPLIT: tl.constexpr, AL_R: tl.constexpr, AL: tl.constexpr,
                        AL_S: tl.constexpr, AL_SC: tl.constexpr, LINE_U: tl.constexpr,
                        PRELOAD: tl.constexpr, RK: tl.constexpr):
    """STAGE 1: x·V and the s-mix into w; STAGE 2: w·Uᵀ; STAGE 3: both, grid barrier between.
    w is (B_OUT, BT, R) fp32 in the workspace half picked by the generation counter's parity.
    PDL: only weights are touched before ``gdc_wait``; the generation counter is read after it.
    ADVANCE (two-launch form): this launch moves the generation on when its last program ends:
    stage 2 of a full call, or stage 1 launched alone (which leaves its half for the next call to
    clear, as a full call does); stage 2 launched alone leaves the workspace as it found it, except
    as the last launch of a chain (``blast_gemv(..., chained=...)``), which ends a call.
    PACK: codes per stored element along r (2 for int4); RC: the stored columns, ceil(R / PACK).
    AL_R, AL, AL_S, AL_SC: powers of two (up to 16) that divide R; RC and U's and V's row and block
    strides; S's strides; the scales' strides. The JIT marks an integer argument only when 16 divides it, so a rank such as 1016 would leave
    every mask and row start unaligned to the compiler and turn each 16-byte load into eight 2-byte
    ones; the hints give it back what the host knows.
    LATE: stage 1 streams V first and reads the generation counter and clears the other half after
    it (see ``_xv_mix_item``); otherwise both come first, one round trip each in front of the stream.
    PRELOAD (STAGE 3): the U tile of this program's first stage-2 item (all RK >= R ranks) is loaded
    into registers before stage 1, so its bytes stream with V's and only w's product waits on the
    grid barrier."""
    pid = tl.program_id(0)
    if AL_R > 1:                    # (v // A) * A: the same value, and a product the compiler sees
        R = (R // AL_R) * AL_R      # divisible by A (a hint on an argument itself is not kept)
    if AL > 1:
        RC = (RC // AL) * AL
        svj = (svj // AL) * AL
        svq = (svq // AL) * AL
        sui = (sui // AL) * AL
        sup = (sup // AL) * AL
    if AL_S > 1:
        ssi = (ssi // AL_S) * AL_S
        ssj = (ssj // AL_S) * AL_S
    if AL_SC > 1:
        svsj = (svsj // AL_SC) * AL_SC
        susi = (susi // AL_SC) * AL_SC
    if PDL:
        if PREFETCH:
            if STAGE == 1:
                _prefetch_v_items(v_ptr, pid, B_IN * R_TILES * Q_SPLIT, GRID, Q, RC, B_IN, Q_CHUNK, R_TILES,
                                  svj, svq, svr, BR // PACK, LINE)
            else:
                _prefetch_u(u_ptr, pid, B_OUT * P_TILES, GRID, P_TILES, P, RC, sui, sup, sur, BP, LINE_U)
        gdc_wait()
        gdc_launch_dependents()     # a dependent touches only its weights until its own wait
    if (STAGE == 3) & (PREFETCH == 2):
        _prefetch_u(u_ptr, pid, B_OUT * P_TILES, GRID, P_TILES, P, RC, sui, sup, sur, BP, LINE_U)
    if (STAGE == 3) & PRELOAD:
        u_first = _preload_u(u_ptr, pid, pid < B_OUT * P_TILES, P, R, RC, P_TILES, sui, sup, sur, BP, RK, QUANT)
    w_ptr = ws_ptr
    if not LATE:
        w_ptr = _this_calls_half(ws_ptr, sync_ptr, pid, GRID, HALF, B_OUT * BT * R, STAGE != 2, ZB)
    if STAGE != 2:
        for item in range(pid, B_IN * R_TILES * Q_SPLIT, GRID):
            _xv_mix_item(item, x_ptr, v_ptr, s_ptr, w_ptr, T, N, Q, R, B_IN, B_OUT, Q_CHUNK, R_TILES,
                         sxt, sxn, ssi, ssj, ssr, svj, svq, svr, BT, BQ, BR, vs_ptr, svsj, svsr, QUANT,
                         sync_ptr, HALF, LATE, RC, SPLIT)
    if LATE:
        w_ptr = _this_calls_half(ws_ptr, sync_ptr, pid, GRID, HALF, B_OUT * BT * R, STAGE != 2, ZB)
    if STAGE == 3:
        if PREFETCH == 1:
            _prefetch_u(u_ptr, pid, B_OUT * P_TILES, GRID, P_TILES, P, RC, sui, sup, sur, BP, LINE_U)
        _grid_barrier(sync_ptr, GRID)
    if STAGE != 1:
        first = pid
        if (STAGE == 3) & PRELOAD:
            if pid < B_OUT * P_TILES:
                _wu_preloaded_item(u_first, pid, b_ptr, y_ptr, w_ptr, T, M, P, R, P_TILES, syt, sym, HAS_BIAS, BT,
                                   BP, RK, us_ptr, susi, susp, QUANT)
            first = pid + GRID
        for item in range(first, B_OUT * P_TILES, GRID):
            _wu_item(item, u_ptr, b_ptr, y_ptr, w_ptr, T, M, P, R, P_TILES, sui, sup, sur, syt, sym, HAS_BIAS,
                     BT, BP, BK, us_ptr, susi, susp, QUANT, RC, SPLIT)
    if ADVANCE:
        _advance_generation(sync_ptr, GRID)


# Per-member fields of a group's table (int64): where its tensors are (in elements from the anchor of
# their kind: codes or float factors, float factors and biases, scales), geometry, work-item ranges.
FIELDS = ("u", "s", "v", "bias", "y_col", "M", "P", "Q", "R", "B_IN", "B_OUT", "Q_CHUNK", "R_TILES",
          "P_TILES", "items1", "items2", "w_off", "has_bias", "u_scale", "v_scale")
_NF = tl.constexpr(len(FIELDS))


@triton.jit
def _member(table_ptr, item, G, FIELD: tl.constexpr):
    """Index of the group member whose work items (field FIELD: their first index) contain ``item``."""
    g = 0
    for gg in range(1, G):
        g += (item >= tl.load(table_ptr + gg * _NF + FIELD)).to(tl.int32)
    return g


@triton.jit
def _factor_address(anchor_ptr, row, FIELD: tl.constexpr, ALIGN: tl.constexpr):
    """A member's factor as the anchor pointer plus its element offset from the table row, hinted a
    multiple of ALIGN elements (16 bytes; :func:`groupable` checks it). Why not the address itself:
    an address loaded from memory and cast to a pointer carries no alignment the compiler can see,
    so every factor load would be a 2-byte scalar load instead of a 16-byte vector load; an aligned
    pointer argument plus a hinted offset keeps the vector loads of the one-layer kernel."""
    return anchor_ptr + tl.multiple_of(tl.load(row + FIELD), ALIGN)


@triton.jit
def _group_wu_item(item, table_ptr, G, anchor_ptr, float_ptr, scale_ptr, x_ptr, y_ptr, w_base, T, YS,
                   BT: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr, RK: tl.constexpr, PACK: tl.constexpr,
                   AL_RC: tl.constexpr, ALIGN: tl.constexpr, ALIGN_F: tl.constexpr, ALIGN_SC: tl.constexpr,
                   QUANT: tl.constexpr, SPLIT: tl.constexpr, token_scale, NORM: tl.constexpr, u, PRELOADED: tl.constexpr):
    """Stage-2 item ``item`` of a group: its member's row of the table gives where its tensors are
    and its geometry; then ``_wu_item``, or with PRELOADED ``_wu_preloaded_item`` on the U tile ``u``
    already in registers."""
    row = table_ptr + _member(table_ptr, item, G, 15) * _NF
    P = tl.load(row + 6).to(tl.int32)
    RC = (tl.load(row + 8).to(tl.int32) // (PACK * AL_RC)) * AL_RC
    us_ptr = x_ptr
    if QUANT:
        us_ptr = _factor_address(scale_ptr, row, 18, ALIGN_SC)
    local = item - tl.load(row + 15).to(tl.int32)
    b_ptr = _factor_address(float_ptr, row, 3, ALIGN_F)
    y_cols = y_ptr + tl.load(row + 4)
    w_ptr = w_base + tl.multiple_of(tl.load(row + 16), 8)
    M = tl.load(row + 5).to(tl.int32)
    P_TILES = tl.load(row + 13).to(tl.int32)
    has_bias = tl.load(row + 17) != 0
    if PRELOADED:
        _wu_preloaded_item(u, local, b_ptr, y_cols, w_ptr, T, M, P, RC * PACK, P_TILES, YS, 1, has_bias, BT, BP, RK,
                           us_ptr, P, 1, QUANT, token_scale, NORM)
    else:
        _wu_item(local, _factor_address(anchor_ptr, row, 0, ALIGN), b_ptr, y_cols, w_ptr, T, M, P, RC * PACK, P_TILES,
                 P * RC, RC, 1, YS, 1, has_bias, BT, BP, BK, us_ptr, P, 1, QUANT, RC, SPLIT, token_scale, NORM)


@triton.jit
def _gemv_group_kernel(x_ptr, y_ptr, anchor_ptr, float_ptr, scale_ptr, table_ptr, ws_ptr, sync_ptr, T, N, YS, G,
                       ITEMS1, ITEMS2, EXTENT, GRID, HALF, sxt, W_NORM, INV_N, EPS, NORM: tl.constexpr,
                       ALIGN: tl.constexpr, ALIGN_F: tl.constexpr,
                       ALIGN_SC: tl.constexpr, AL_RC: tl.constexpr, AL_Q: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr,
                       BP: tl.constexpr, BK: tl.constexpr, ZB: tl.constexpr, STAGE: tl.constexpr,
                       PREFETCH: tl.constexpr, PDL: tl.constexpr, LINE: tl.constexpr, LATE: tl.constexpr,
                       LINE_U: tl.constexpr, QUANT: tl.constexpr, PACK: tl.constexpr, SPLIT: tl.constexpr,
                       PRELOAD: tl.constexpr, RK: tl.constexpr):
    """Several BLAST layers that read the same x (q/k/v, gate/up) in one stream of work items: the
    same two stages as ``_gemv_decode_kernel``, each item first looking up its member in the table.
    Factors are contiguous (strides derived from the geometry, ranks multiples of 8); y is one
    (T, YS) buffer, each member writing its columns. U and V are found from ``anchor_ptr`` (the first
    member's U), S and biases from ``float_ptr`` (its S), the scales of quantized factors (QUANT, PACK,
    SPLIT as in ``_gemv_decode_kernel``) from ``scale_ptr`` (its U_scale); each anchor's offsets are
    hinted multiples of its ALIGN. AL_RC and AL_Q: powers of two (up to 16 bytes' worth of stored
    entries, up to 16) that divide every member's stored row length (its rank / PACK) and every
    member's Q: the table's values carry no divisibility the compiler can see, and a row of codes
    seen aligned to 8 entries is read in 8-byte loads where 16 allow 16-byte ones. PDL and PREFETCH as in ``_gemv_decode_kernel`` (two-launch form:
    one item per program). NORM (stage 2): the members' input was an RMSNorm's input times its weight,
    not yet divided by its root mean square; the per-token sums of squares W_NORM floats into this
    call's half give each token's factor ``rsqrt(sum * INV_N + EPS)``, which scales the outputs
    before the bias (x·V and the s-mix are linear in the input). PRELOAD and RK (STAGE 3) as in
    ``_gemv_decode_kernel``, RK covering the widest member's rank."""
    pid = tl.program_id(0)
    if PDL:
        if PREFETCH:
            if STAGE == 1:
                row = table_ptr + _member(table_ptr, pid, G, 14) * _NF
                Q = tl.load(row + 7).to(tl.int32)
                RC = tl.load(row + 8).to(tl.int32) // PACK
                local = pid - tl.load(row + 14).to(tl.int32)
                _prefetch_v_items(_factor_address(anchor_ptr, row, 2, ALIGN), local, local + 1, 1, Q, RC,
                                  tl.load(row + 9).to(tl.int32), tl.load(row + 11).to(tl.int32),
                                  tl.load(row + 12).to(tl.int32), Q * RC, RC, 1, BR // PACK, LINE)
            else:
                row = table_ptr + _member(table_ptr, pid, G, 15) * _NF
                P = tl.load(row + 6).to(tl.int32)
                RC = tl.load(row + 8).to(tl.int32) // PACK
                local = pid - tl.load(row + 15).to(tl.int32)
                _prefetch_u(_factor_address(anchor_ptr, row, 0, ALIGN), local, local + 1, 1,
                            tl.load(row + 13).to(tl.int32), P, RC, P * RC, RC, 1, BP, LINE_U)
        gdc_wait()
        gdc_launch_dependents()
    if (STAGE == 3) & PRELOAD:
        row = table_ptr + _member(table_ptr, pid, G, 15) * _NF
        P = tl.load(row + 6).to(tl.int32)
        RC = (tl.load(row + 8).to(tl.int32) // (PACK * AL_RC)) * AL_RC
        u_first = _preload_u(_factor_address(anchor_ptr, row, 0, ALIGN), pid - tl.load(row + 15).to(tl.int32),
                             pid < ITEMS2, P, RC * PACK, RC, tl.load(row + 13).to(tl.int32), P * RC, RC, 1, BP, RK,
                             QUANT)
    w_base = ws_ptr
    if not LATE:
        w_base = _this_calls_half(ws_ptr, sync_ptr, pid, GRID, HALF, EXTENT, STAGE != 2, ZB)
    if STAGE != 2:
        for item in range(pid, ITEMS1, GRID):
            row = table_ptr + _member(table_ptr, item, G, 14) * _NF
            v_ptr = _factor_address(anchor_ptr, row, 2, ALIGN)
            s_ptr = _factor_address(float_ptr, row, 1, ALIGN_F)
            Q = (tl.load(row + 7).to(tl.int32) // AL_Q) * AL_Q           # (v // A) * A: seen divisible by A
            RC = (tl.load(row + 8).to(tl.int32) // (PACK * AL_RC)) * AL_RC
            R = RC * PACK
            B_IN = tl.load(row + 9).to(tl.int32)
            vs_ptr = x_ptr
            if QUANT:
                vs_ptr = _factor_address(scale_ptr, row, 19, ALIGN_SC)
            _xv_mix_item(item - tl.load(row + 14).to(tl.int32), x_ptr, v_ptr, s_ptr,
                         w_base + tl.multiple_of(tl.load(row + 16), 8), T, N, Q, R, B_IN,
                         tl.load(row + 10).to(tl.int32),
                         (tl.load(row + 11).to(tl.int32) // BQ) * BQ, tl.load(row + 12).to(tl.int32),
                         sxt, 1, B_IN * R, R, 1, Q * RC, RC, 1, BT, BQ, BR, vs_ptr, R, 1, QUANT, sync_ptr, HALF,
                         LATE, RC, SPLIT)
    if LATE:
        w_base = _this_calls_half(ws_ptr, sync_ptr, pid, GRID, HALF, EXTENT, STAGE != 2, ZB)
    if STAGE == 3:
        _grid_barrier(sync_ptr, GRID)
    if STAGE != 1:
        offs_t = tl.arange(0, BT)
        token_scale = tl.full((BT,), 1.0, tl.float32)
        if NORM:
            sumsq = tl.load(w_base + W_NORM + offs_t, mask=offs_t < T, other=0.0, cache_modifier=".cg")
            token_scale = 1.0 / tl.sqrt(sumsq * INV_N + EPS)
        first = pid
        if (STAGE == 3) & PRELOAD:
            if pid < ITEMS2:
                _group_wu_item(pid, table_ptr, G, anchor_ptr, float_ptr, scale_ptr, x_ptr, y_ptr, w_base, T, YS, BT, BP,
                               BK, RK, PACK, AL_RC, ALIGN, ALIGN_F, ALIGN_SC, QUANT, SPLIT, token_scale, NORM,
                               u_first, True)
            first = pid + GRID
        for item in range(first, ITEMS2, GRID):
            _group_wu_item(item, table_ptr, G, anchor_ptr, float_ptr, scale_ptr, x_ptr, y_ptr, w_base, T, YS, BT, BP,
                           BK, RK, PACK, AL_RC, ALIGN, ALIGN_F, ALIGN_SC, QUANT, SPLIT, token_scale, NORM, None, False)
    if STAGE == 2:
        _advance_generation(sync_ptr, GRID)


def workspace(device: torch.device, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sync counters, w workspace of two zeroed halves of at least ``half`` floats) for ``device``.
    Counters: generation, barrier arrivals, barrier departures, stage-2 completions, and the extent
    last written in each half. Calls on one stream share it safely: each call clears the half the
    next call uses. A larger need gets a new workspace; the old one is kept alive, since a captured
    CUDA graph may still point at it."""
    key = (device.type, device.index)
    if key not in _WORKSPACES or _WORKSPACES[key][1].numel() < 2 * half:
        half = max(-(-half // 1024) * 1024, 1 << 16)     # halves start 4 KB-aligned: w loads stay vector loads
        _WORKSPACES.setdefault(("retired", key), []).extend([_WORKSPACES[key]] if key in _WORKSPACES else [])
        _WORKSPACES[key] = allocate_state(lambda: (torch.zeros(8, dtype=torch.int32, device=device),
                                                   torch.zeros(2 * half, dtype=torch.float32, device=device)), device)
    return _WORKSPACES[key]


def gemv_plan(shape: BlastShape, grid: int, cfg: dict) -> dict:
    """Split x·V into items (j, r-tile, q-chunk): the fewest q-chunks (each costs B_OUT atomics per
    r element) that give every one of ``grid`` programs about equal work."""
    BR, BQ = cfg["BR"], cfg["BQ"]
    r_tiles = triton.cdiv(shape.rank, BR)
    q_blocks = triton.cdiv(shape.q, BQ)
    best = None
    for q_split in range(1, q_blocks + 1):
        chunk = triton.cdiv(q_blocks, q_split) * BQ
        split = triton.cdiv(shape.q, chunk)
        items = shape.b_in * r_tiles * split
        cost = triton.cdiv(items, grid) * chunk + 0.02 * split * BQ       # longest program's rows
        if best is None or cost < best[0]:
            best = (cost, split, chunk)
    _, q_split, q_chunk = best
    return dict(Q_SPLIT=q_split, Q_CHUNK=q_chunk, R_TILES=r_tiles, P_TILES=triton.cdiv(shape.p, cfg["BP"]))


# Tiles of 16-32 KB per loop step keep enough loads in flight per SM to stream at full bandwidth.
# per_sm: programs per SM of the persistent grid (and what the x·V split aims to fill in both modes).
# prefetch: 0 none; persistent mode: 1 U into L2 before the barrier, 2 U at the start (streams with V);
# pdl mode: 1 each stage's weights before its gdc_wait.
# preload (persistent mode): each program's first U tile is loaded into registers before stage 1.
DEFAULT = dict(mode="two", BQ=32, BR=512, BP=16, BK=512, warps=4, stages=1, per_sm=2, prefetch=0, late=False,
               nibbles="interleave", preload=False)
CANDIDATES = (DEFAULT, {**DEFAULT, "BQ": 64, "BR": 128, "BP": 32, "BK": 256, "per_sm": 4},
              {**DEFAULT, "BR": 256, "warps": 8, "warps2": 4}, {**DEFAULT, "mode": "persistent"},
              {**DEFAULT, "mode": "persistent", "BQ": 64, "BR": 256},
              {**DEFAULT, "mode": "persistent", "prefetch": 1}, {**DEFAULT, "mode": "persistent", "prefetch": 2},
              {**DEFAULT, "mode": "pdl", "prefetch": 1}, {**DEFAULT, "mode": "pdl"},
              {**DEFAULT, "mode": "pdl", "prefetch": 1, "BR": 256, "warps": 8, "warps2": 4},
              # narrow r-tiles: more work items per block-column, so fewer q-chunks fill the grid and
              # stage 1 issues several times fewer atomics (B_OUT per r element per q-chunk)
              {**DEFAULT, "BQ": 64, "BR": 64}, {**DEFAULT, "mode": "pdl", "prefetch": 1, "BQ": 64, "BR": 64},
              # built from the fastest tiles of each stage timed alone on an H200 (benchmarks/decode_stages.py
              # --sweep): stage 1 tall-narrow V tiles (128 x 64, 16 KB), stage 2 eight U rows by 512
              {**DEFAULT, "BQ": 128, "BR": 64, "stages": 3, "BP": 8},
              {**DEFAULT, "BQ": 64, "BR": 128, "per_sm": 4, "BP": 8},
              {**DEFAULT, "BP": 8},
              {**DEFAULT, "mode": "pdl", "prefetch": 1, "BQ": 128, "BR": 64, "stages": 3, "BP": 8},
              # late: stage 1 streams V before the workspace bookkeeping (in a block of seven Llama-2-7B
              # linears on an H200, programmatic dependent launches with it gave 1.14x dense, 1.12x without)
              {**DEFAULT, "late": True, "mode": "pdl", "prefetch": 1},
              {**DEFAULT, "late": True, "mode": "pdl", "prefetch": 1, "BQ": 128, "BR": 64, "stages": 3, "BP": 8},
              {**DEFAULT, "late": True, "mode": "persistent"},
              # the persistent kernel with the tall-narrow tile: compiled for sm_90, the tiles above with
              # BR = 256-512 use all 255 registers and spill 300-500 bytes a thread in x·V, this one
              # needs about 165 and spills nothing (tests/kernels/test_register_spills.py)
              *({**DEFAULT, "mode": "persistent", "prefetch": pf, "late": late, "BQ": 128, "BR": 64, "stages": 3,
                 "BP": 8} for pf, late in ((0, False), (1, False), (2, False), (0, True))),
              # the same with each program's first U tile loaded into registers before stage 1: U streams
              # with V and only w's product waits on the barrier (BP = 16: one U tile a program at
              # 4096 x 4096, b = 4)
              *({**DEFAULT, "mode": "persistent", "preload": True, "BQ": 128, "BR": 64, "stages": 3, "BP": bp}
                for bp in (8, 16)))


def candidates(device, int4: bool = False) -> list[dict]:
    """The configs worth timing on ``device``: PDL ones only where programmatic launch exists. For
    packed int4 codes each also with ``nibbles="split"``: the even and odd ranks reduced as two
    half-width tiles from the low and high nibbles, instead of the nibbles interleaved back into
    one tile (which of the two a GPU runs faster is measured, not assumed)."""
    usable = [c for c in CANDIDATES if c["mode"] != "pdl" or pdl_supported(device)]
    return usable + ([{**c, "nibbles": "split"} for c in usable] if int4 else [])


def group_candidates(device, int4: bool = False) -> list[dict]:
    """The configs a GEMV group is timed with: a group prefetches only in ``pdl`` mode; ``int4``
    as for :func:`candidates`."""
    return [c for c in candidates(device, int4) if not (c["mode"] == "persistent" and c["prefetch"])]


def _launch_flags(cfg: dict, interpret: bool, device, element_size: int,
                  persistent_kernel: bool = False) -> tuple[str, dict]:
    """(launch mode, the PREFETCH/PDL/LINE/LINE_U constants) for ``cfg``: LINE elements per L2 prefetch
    address of a V row, LINE_U of a U row (one 128-byte line each; the callers narrow LINE for narrow
    r-tiles). ``persistent_kernel``: the caller's kernel has the persistent form (the one-layer and
    grouped kernels), with ``preload``. The interpreter runs neither prefetch nor PDL (no inline PTX
    there): the persistent form of such a kernel as one program (:func:`_grid`), every other mode
    as two plain launches."""
    mode = cfg["mode"]
    if mode not in ("persistent", "two", "pdl"):
        raise ValueError(f"GEMV decode mode must be 'persistent', 'two' or 'pdl', got {mode!r}")
    if cfg["nibbles"] not in ("interleave", "split"):
        raise ValueError(f"GEMV nibbles must be 'interleave' or 'split', got {cfg['nibbles']!r}")
    if cfg["prefetch"] not in (0, 1, 2) or (cfg["prefetch"] == 2 and mode != "persistent"):
        raise ValueError(f"GEMV prefetch must be 0, 1 or (persistent mode) 2, got {cfg['prefetch']!r} in mode {mode!r}")
    if cfg["preload"] not in (False, True) or (cfg["preload"] and mode != "persistent"):
        raise ValueError(f"GEMV preload is True or False, and True only in mode 'persistent' (it moves U's loads "
                         f"ahead of the grid barrier), got {cfg['preload']!r} in mode {mode!r}")
    if cfg["preload"] and not persistent_kernel:
        raise ValueError("preload is a config of the GEMV kernels' persistent form (blast_gemv, blast_gemv_group); "
                         "chained calls do not take it")
    line = 128 // element_size
    if interpret:
        one_program = persistent_kernel and mode == "persistent"
        return "persistent" if one_program else "two", dict(PREFETCH=0, PDL=False, LINE=line, LINE_U=line)
    if mode == "pdl" and not pdl_supported(device):
        raise RuntimeError("GEMV mode 'pdl' needs programmatic dependent launch: a Hopper (sm_90) or newer GPU "
                           "and a triton that exposes gdc_wait")
    prefetch = 0 if mode == "two" else int(cfg["prefetch"])
    return mode, dict(PREFETCH=prefetch, PDL=mode == "pdl", LINE=line, LINE_U=line)


def _grid(cfg: dict, mode: str, x2, interpret: bool) -> int:
    """Programs of the persistent grid, and what the x·V split aims to fill in every mode: ``per_sm``
    a streaming multiprocessor; one for the persistent form under the interpreter, which runs
    programs one after another, so that a single program passes its grid barrier."""
    if interpret and mode == "persistent":
        return 1
    return cfg["per_sm"] * (_sm_limits(_index(x2.device))[0] if x2.is_cuda else 4)


def blast_gemv(x2, U, S, V, bias, shape: BlastShape, cfg: dict | None = None, *, interpret: bool = False,
               only_stage: int | None = None, U_scale=None, V_scale=None, chained=None, out=None):
    """y (T, out_features) for T <= MAX_T. ``only_stage`` (1 or 2, mode "two"): launch just that
    stage, to see where the time goes; the output is then not the product. ``chained`` = (sync
    counters, w of this layer in the first workspace half, floats per half), with ``only_stage=2``:
    the last stage of a chain of kernels (:mod:`.mlp_chain`) that wrote this layer's w there; it
    moves the workspace's generation on, as a whole call does. ``U_scale`` (b_out, p)
    and ``V_scale`` (b_in, r), both or neither: U and V are codes with these scales, int8 or packed
    int4 (uint8, last dimension ceil(r/2), see :mod:`blastfx.structures.blast.quant.formats`).
    ``out``: a (T, out_features) tensor of x2's dtype and device (a view, e.g. columns of a wider
    buffer, is fine) to write y into instead of a new one."""
    bits, pack = code_format(U, V, U_scale, V_scale, shape.rank, "blast_gemv")
    quant = bits > 0
    cfg = {**DEFAULT, **(cfg or {})}
    T, n = x2.shape
    if T > MAX_T:
        raise ValueError(f"the GEMV decode kernel takes at most {MAX_T} tokens, got T={T}")
    mode, flags = _launch_flags(cfg, interpret, x2.device, U.element_size(), persistent_kernel=True)
    # a V tile row is BR / pack stored elements, narrower than a line for narrow tiles of 1-byte codes
    # (int8 at BR = 64, packed int4): at least one prefetch address a row
    flags["LINE"] = min(flags["LINE"], cfg["BR"] // pack)
    if only_stage is not None and mode == "persistent":
        raise ValueError("only_stage needs a two-launch mode ('two' or 'pdl')")
    if chained is not None and only_stage != 2:
        raise ValueError("chained runs stage 2 of a chain: pass only_stage=2")
    BT = triton.next_power_of_2(T)
    # the FMA accumulators hold BT x tile values per thread: keep that constant as T grows
    cfg.update(BQ=max(8, cfg["BQ"] // BT), BP=max(4, cfg["BP"] // BT))
    grid = _grid(cfg, mode, x2, interpret)
    plan = gemv_plan(shape, grid, cfg)
    if chained is None:
        sync, ws = workspace(x2.device, shape.b_out * BT * shape.rank)
        half = ws.numel() // 2
    else:
        sync, ws, half = chained
    if out is not None and (tuple(out.shape) != (T, shape.out_features) or out.dtype != x2.dtype
                            or out.device != x2.device):
        raise ValueError(f"out must be a ({T}, {shape.out_features}) {x2.dtype} tensor on {x2.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    y = torch.empty(T, shape.out_features, device=x2.device, dtype=x2.dtype) if out is None else out
    const = dict(HAS_BIAS=bias is not None, BT=BT, B_OUT=shape.b_out, BQ=cfg["BQ"], BR=cfg["BR"], BP=cfg["BP"],
                 BK=cfg["BK"], ZB=1024, QUANT=bits, PACK=pack, LATE=bool(cfg["late"]),
                 SPLIT=bits == 4 and cfg["nibbles"] == "split", AL_R=math.gcd(shape.rank, 16),
                 AL=math.gcd(U.shape[-1], V.stride(0), V.stride(1), U.stride(0), U.stride(1), 16),
                 AL_S=math.gcd(S.stride(0), S.stride(1), 16),
                 AL_SC=math.gcd(*(U_scale.stride() + V_scale.stride() if quant else ()), 16),
                 PRELOAD=bool(cfg["preload"]), RK=max(16, triton.next_power_of_2(shape.rank)), **flags)
    us, vs = (U_scale, V_scale) if quant else (y, y)           # not read without QUANT
    launch = {} if interpret else {"num_warps": cfg["warps"], "num_stages": cfg["stages"]}
    if mode == "pdl":
        launch["launch_pdl"] = True

    def args(g):
        return (x2, U, S, V, bias if bias is not None else y, y, ws, sync, T, n, shape.out_features,
                shape.p, shape.q, shape.rank, U.shape[-1], shape.b_in, plan["Q_SPLIT"], plan["Q_CHUNK"], plan["R_TILES"],
                plan["P_TILES"], g, half, x2.stride(0), x2.stride(1), *U.stride(), *S.stride(),
                *V.stride(), y.stride(0), y.stride(1), us, vs, *(us.stride() if quant else (0, 0)),
                *(vs.stride() if quant else (0, 0)))

    if mode != "persistent":
        g1 = shape.b_in * plan["R_TILES"] * plan["Q_SPLIT"]
        g2 = shape.b_out * plan["P_TILES"]
        if only_stage in (None, 1):
            _gemv_decode_kernel[(g1,)](*args(g1), STAGE=1, ADVANCE=only_stage == 1, **const, **launch)
        if only_stage in (None, 2):
            if not interpret:
                launch = {**launch, "num_warps": cfg.get("warps2", cfg["warps"])}
            _gemv_decode_kernel[(g2,)](*args(g2), STAGE=2, ADVANCE=only_stage is None or chained is not None,
                                       **const, **launch)
        return y
    key = (_index(x2.device) if x2.is_cuda else None, shape, BT, x2.dtype, tuple(sorted(cfg.items())),
           bias is not None, bits)
    launch_persistent(_gemv_decode_kernel, key, args(grid), grid, x2.device, f"GEMV decode config {cfg}",
                      interpret, STAGE=3, ADVANCE=False, **const, **launch)
    return y


_TABLES: dict = {}          # group tables by the members' addresses and geometry (built outside capture)


def _tensors(member) -> tuple:
    """A group member's factors, bias (if it has one) and scales (if its factors are codes)."""
    U, S, V, b = member[:4]
    return (U, S, V) + ((b,) if b is not None else ()) + tuple(member[5:])


def _kinds(member) -> dict:
    """A member's tensors by the anchor their table offsets count from: "codes" (U and V, float
    factors or codes), "floats" (S, bias), "scales" (U_scale, V_scale of quantized factors)."""
    U, S, V, b = member[:4]
    return {"codes": (U, V), "floats": (S,) + ((b,) if b is not None else ()), "scales": tuple(member[5:])}


def groupable(members) -> str | None:
    """Why these members cannot run as one GEMV group, or None if they can. A member is
    (U, S, V, bias, shape), or (U, S, V, bias, shape, U_scale, V_scale) with U and V codes of a
    format in :data:`CODE_NAMES`. The group kernel derives strides from the geometry and reads
    16-byte vectors at 16-byte-aligned offsets from the first member's tensor of each kind."""
    if len({len(member) for member in members}) != 1 or len(members[0]) not in (5, 7):
        return "members mix float and quantized factors (or are not (U, S, V, bias, shape[, U_scale, V_scale]))"
    for kind in ("codes", "floats", "scales"):
        dtypes = {t.dtype for member in members for t in _kinds(member)[kind]}
        if len(dtypes) > 1:
            return f"members mix dtypes of their {kind}: {sorted(map(str, dtypes))}"
    quantized = len(members[0]) == 7
    if quantized and members[0][0].dtype not in CODE_DTYPES:
        return f"codes of dtype {members[0][0].dtype}: the kernel reads {CODE_NAMES}"
    if not quantized and members[0][0].dtype != members[0][1].dtype:
        return f"float factors U ({members[0][0].dtype}) and S ({members[0][1].dtype}) differ in dtype"
    for k, member in enumerate(members):
        if not all(t.is_contiguous() for t in _tensors(member)):
            return f"member {k} has non-contiguous factors"
        if member[4].rank % 8:
            return f"member {k} has rank {member[4].rank}, not a multiple of 8"
        if any(t.data_ptr() % 16 for t in _tensors(member)):
            return f"member {k} has a factor, bias or scale not 16-byte aligned (a view at an offset?)"
    return None


def _anchors(members) -> dict:
    """The group's anchor of each kind (the first member's U, S and U_scale) by the kind's name."""
    first = members[0]
    return {"codes": first[0], "floats": first[1], "scales": first[5] if len(first) == 7 else None}


def group_anchors(members, cfg: dict, unused) -> tuple[tuple, dict]:
    """((codes, floats, scales) anchor arguments, their constants) of ``_gemv_group_kernel`` for
    ``members``: the alignments its offsets are hinted with and the code format (QUANT, PACK, SPLIT).
    ``unused``: a tensor passed where the group has no scales."""
    anchors = _anchors(members)
    bits, pack = 0, 1
    if anchors["scales"] is not None:
        fmt = factor_formats.of_storage(anchors["codes"].dtype)
        bits, pack = fmt.bits, fmt.per_element
    scales = anchors["scales"] if bits else unused
    align = 16 // anchors["codes"].element_size()          # stored entries a 16-byte vector holds
    return (anchors["codes"], anchors["floats"], scales), dict(
        AL_RC=math.gcd(*(member[0].shape[-1] for member in members), align),
        AL_Q=math.gcd(*(member[4].q for member in members), 16),
        ALIGN=align, ALIGN_F=16 // anchors["floats"].element_size(),
        ALIGN_SC=16 // scales.element_size(), QUANT=bits, PACK=pack, SPLIT=bits == 4 and cfg.get("nibbles") == "split")


def _group_table(members, device, grid: int, cfg: dict, BT: int):
    """(table, totals) for ``members``: each member's tensor offsets from the anchor of their kind,
    geometry and the ranges of the two stages' work items; cached by the members' addresses and geometry, so a CUDA-graph capture (which
    cannot copy a new table to the device) finds the one the warm-up call built."""
    key = (grid, BT, tuple(sorted(cfg.items())),
           tuple(tuple(t.dtype for t in _kinds(members[0])[k]) for k in ("codes", "floats", "scales")),
           tuple(tuple(t.data_ptr() if t is not None else 0 for t in member[:4] + tuple(member[5:])) + (member[4],)
                 for member in members))
    if key not in _TABLES:
        total = sum(member[4].num_params for member in members)
        rows, items1, items2, w_off, y_col = [], 0, 0, 0, 0
        anchors = _anchors(members)

        def offset(t, kind):                    # elements from the anchor (exact: both are 16-byte aligned)
            if t is None:
                return 0
            anchor = anchors[kind]
            return (t.data_ptr() - anchor.data_ptr()) // anchor.element_size()

        for member in members:
            U, S, V, b, shape = member[:5]
            us, vs = member[5:] if len(member) == 7 else (None, None)
            plan = gemv_plan(shape, max(1, grid * shape.num_params // total), cfg)
            rows.append([offset(U, "codes"), offset(S, "floats"), offset(V, "codes"), offset(b, "floats"), y_col,
                         shape.out_features, shape.p, shape.q, shape.rank, shape.b_in, shape.b_out,
                         plan["Q_CHUNK"], plan["R_TILES"], plan["P_TILES"], items1, items2, w_off, b is not None,
                         offset(us, "scales"), offset(vs, "scales")])
            items1 += shape.b_in * plan["R_TILES"] * plan["Q_SPLIT"]
            items2 += shape.b_out * plan["P_TILES"]
            w_off += shape.b_out * BT * shape.rank
            y_col += shape.out_features
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a GEMV group's table is built on its first call, which must not be captured")
        table = allocate_state(lambda: torch.tensor(rows, dtype=torch.int64).to(device), device)
        _TABLES[key] = (table, items1, items2, w_off, y_col)
    return _TABLES[key]


def blast_gemv_group(x2, members, cfg: dict | None = None, *, interpret: bool = False) -> torch.Tensor:
    """y (T, sum out_g): the outputs of BLAST layers ``members`` that all read ``x2`` (T <= MAX_T),
    side by side in member order; one stream of work items over every member's V, then over every
    member's U, in one launch (``persistent``) or two. A member is (U, S, V, bias, shape), or
    (U, S, V, bias, shape, U_scale, V_scale) for quantized factors (codes as :func:`blast_gemv`
    takes them); a group holds one kind or the other."""
    cfg = {**DEFAULT, **(cfg or {})}
    T, n = x2.shape
    if T > MAX_T:
        raise ValueError(f"the GEMV decode kernel takes at most {MAX_T} tokens, got T={T}")
    why = groupable(members)
    if why:
        raise ValueError(f"cannot run these layers as one GEMV group: {why}")
    if len(members[0]) == 7:
        fmt = factor_formats.of_storage(members[0][0].dtype)
        for k, (U, _, V, _, shape, *_) in enumerate(members):
            stored = fmt.stored_length(shape.rank)
            if U.shape[-1] != stored or V.shape[-1] != stored:
                raise ValueError(f"member {k}: codes of U {tuple(U.shape)} and V {tuple(V.shape)} do not hold rank "
                                 f"{shape.rank}: their last dimension must be {stored}")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(T, sum(member[4].out_features for member in members), device=x2.device, dtype=x2.dtype)
    anchors, anchor_const = group_anchors(members, cfg, y)
    mode, flags = _launch_flags(cfg, interpret, x2.device, anchors[0].element_size(), persistent_kernel=True)
    # narrow r-tiles: at least one prefetch address a row
    flags["LINE"] = min(flags["LINE"], cfg["BR"] // anchor_const["PACK"])
    if flags["PREFETCH"] == 2:
        raise ValueError("a GEMV group prefetches only in mode 'pdl' (prefetch=1)")
    BT = triton.next_power_of_2(T)
    cfg.update(BQ=max(8, cfg["BQ"] // BT), BP=max(4, cfg["BP"] // BT))
    grid = _grid(cfg, mode, x2, interpret)
    table, items1, items2, extent, width = _group_table(members, x2.device, grid, cfg, BT)
    sync, ws = workspace(x2.device, extent)
    const = dict(BT=BT, BQ=cfg["BQ"], BR=cfg["BR"], BP=cfg["BP"], BK=cfg["BK"], ZB=1024, LATE=bool(cfg["late"]),
                 NORM=False, PRELOAD=bool(cfg["preload"]),
                 RK=max(16, triton.next_power_of_2(max(member[4].rank for member in members))),
                 **anchor_const, **dict(flags, PREFETCH=flags["PREFETCH"] if mode == "pdl" else 0))
    launch = {} if interpret else {"num_warps": cfg["warps"], "num_stages": cfg["stages"]}
    if mode == "pdl":
        launch["launch_pdl"] = True

    def args(g):
        return (x2, y, *anchors, table, ws, sync, T, n, width, len(members),
                items1, items2, extent, g, ws.numel() // 2, x2.stride(0), 0, 0.0, 0.0)

    if mode != "persistent":
        _gemv_group_kernel[(items1,)](*args(items1), STAGE=1, **const, **launch)
        if not interpret:
            launch = {**launch, "num_warps": cfg.get("warps2", cfg["warps"])}
        _gemv_group_kernel[(items2,)](*args(items2), STAGE=2, **const, **launch)
    else:
        key = ("group", _index(x2.device) if x2.is_cuda else None, BT, x2.dtype, tuple(sorted(cfg.items())),
               anchors[0].dtype)
        launch_persistent(_gemv_group_kernel, key, args(grid), grid, x2.device, f"GEMV group config {cfg}", interpret,
                          STAGE=3, **const, **launch)
    return y
