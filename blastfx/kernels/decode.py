"""The BLAST product at decode sizes (T <= 64) in one launch, or two tightly chained ones.

Why: at T <= 16 a BLAST layer moves half the bytes of its dense layer, but the three-stage paths
launch two or three kernels, and on a fast-memory GPU each launch's ramp-up and tail cost as much as
streaming a quarter of the weights. The kernel has two stages:

1. **x·V** (split over block-columns j, chunks of q and tiles of r, so every SM streams a share of V):
   each work item writes its partial ``z`` tile to its own slot with plain stores; the last slot of an
   r-tile to land (a per-tile counter) mixes the slots in a fixed order into ``w_i = sum_j s_ij z_j``.
   No float atomics, so the result is deterministic; the counter is reset by the program that mixed,
   so the next call (or CUDA-graph replay) finds it zero and no memset launch is needed.
2. **w·Uᵀ**: each work item (block-row i, tile of p) streams its tile of U with bias, cast and the
   (T, m) layout in the epilogue.

Launch modes (``cfg["mode"]``, timed by the autotuner): ``persistent`` runs both stages in one grid no
larger than what is co-resident, with a grid barrier between them (self-resetting counters) and U
prefetched into L2 during the wait; co-residency is what makes the barrier safe, so the grid is
sized from the compiled kernel's registers and shared memory (:func:`resident_programs`), never from
a guess. ``pdl`` launches stage 2 as a programmatic dependent of stage 1, so it is resident and
prefetching U while stage 1 drains. ``two`` is two plain launches. Under ``TRITON_INTERPRET=1`` the
interpreter runs programs one after another, so every mode runs as two plain launches there; the
CPU tests check that form, the CUDA tests every mode.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:                      # triton without grid dependency control: PDL mode is not offered
    gdc_launch_dependents = gdc_wait = None

from ..structures.blast.layout import BlastShape
from .codes import _load_factor_tile, code_format
from .state import allocate_state

_COUNTERS: dict = {}


@triton.jit
def _prefetch_l2(ptrs):
    """``prefetch.global.L2`` of each address (one per 128-byte line); no registers held, nothing waited on."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_u(u_ptr, pid, items, GRID, P_TILES, P, R, sui, sup, sur, BP: tl.constexpr, LINE: tl.constexpr):
    """L2 prefetch of every U tile that program ``pid`` will read in stage 2 (one address per line)."""
    offs_l = tl.arange(0, 16) * LINE
    for item in range(pid, items, GRID):
        i = item // P_TILES
        offs_p = (item % P_TILES) * BP + tl.arange(0, BP)
        for k0 in range(0, R, 16 * LINE):
            kk = k0 + offs_l
            inside = (offs_p[:, None] < P) & (kk[None, :] < R)        # outside: the tile's own start
            _prefetch_l2(u_ptr + i * sui + tl.where(inside, offs_p[:, None] * sup + kk[None, :] * sur, 0))


@triton.jit
def _prefetch_v(v_ptr, pid, items, GRID, R_TILES, Q_SPLIT: tl.constexpr, Q_CHUNK, Q, R, svj, svq, svr,
                BR: tl.constexpr):
    """L2 prefetch of every V tile that program ``pid`` will read in stage 1 (one address per row: a
    row of BR <= 64 elements is at most one 128-byte line)."""
    offs_q = tl.arange(0, 64)
    for item in range(pid, items, GRID):
        rt = item % R_TILES
        slot = item // R_TILES
        j = slot // Q_SPLIT
        q0 = (slot % Q_SPLIT) * Q_CHUNK
        for c0 in range(q0, q0 + Q_CHUNK, 64):
            rows = c0 + offs_q
            inside = rows < tl.minimum(Q, q0 + Q_CHUNK)
            _prefetch_l2(v_ptr + j * svj + rt * BR * svr + tl.where(inside, rows * svq, 0))


@triton.jit
def _blast_decode_kernel(x_ptr, u_ptr, s_ptr, v_ptr, b_ptr, y_ptr, z_ptr, w_ptr, cnt_ptr, bar_ptr,
                         T, N, M, P, Q, R, B_IN, Q_CHUNK, R_TILES, P_TILES, GRID,
                         sxt, sxn, sui, sup, sur, ssi, ssj, ssr, svj, svq, svr, szs, szt, szr, swi, swt, swr,
                         syt, sym, us_ptr, susi, susp, vs_ptr, svsj, svsr, RC,
                         HAS_BIAS: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr, BQ: tl.constexpr,
                         BP: tl.constexpr, BK: tl.constexpr, STAGE: tl.constexpr, UPCAST: tl.constexpr,
                         PREFETCH: tl.constexpr, LINE: tl.constexpr, Q_SPLIT: tl.constexpr, NSLOT: tl.constexpr,
                         PDL: tl.constexpr, B_OUT: tl.constexpr, B_OUT_P2: tl.constexpr, QUANT: tl.constexpr,
                         PACK: tl.constexpr):
    """STAGE 1: x·V into z slots, the last slot of each r-tile to finish mixes the tile into w;
    STAGE 2: w·Uᵀ; STAGE 3: both, with the grid barrier between.
    PDL: launched as a programmatic dependent of the previous kernel: prefetch weights into L2, then
    wait for the previous kernel's results (``gdc_wait``), and let the next kernel start early.
    QUANT (8 or 4): U and V hold int8 / float8 or packed int4 codes (PACK codes a stored element, RC
    stored elements a row), converted to the dot's dtype in registers (exact); V's per-(j, rank)
    scale multiplies each z tile after its reduction over q, U's per-row scale each output after its
    reduction over r."""
    pid = tl.program_id(0)
    offs_t = tl.arange(0, BT)
    tmask = offs_t < T
    if (STAGE == 3) & (PREFETCH == 2):
        # U and V stream from HBM together; stage 2 then reads U from L2
        _prefetch_u(u_ptr, pid, B_OUT * P_TILES, GRID, P_TILES, P, RC, sui, sup, sur, BP, LINE)
    if STAGE != 2:
        items = B_IN * Q_SPLIT * R_TILES
        if PDL:     # only weights are touched before the wait: x may still be being written
            _prefetch_v(v_ptr, pid, items, GRID, R_TILES, Q_SPLIT, Q_CHUNK, Q, R, svj, svq, svr, BR // PACK)
            gdc_wait()
        for item in range(pid, items, GRID):
            rt = item % R_TILES                    # neighbours read neighbouring r-tiles of the same rows
            slot = item // R_TILES                 # slot = j * Q_SPLIT + (q chunk)
            j = slot // Q_SPLIT
            q0 = (slot % Q_SPLIT) * Q_CHUNK
            offs_r = rt * BR + tl.arange(0, BR)
            rmask = offs_r < R
            q_lim = tl.minimum(Q, q0 + Q_CHUNK)
            z = tl.zeros((BT, BR), dtype=tl.float32)
            for c0 in range(q0, q0 + Q_CHUNK, BQ):
                offs_c = c0 + tl.arange(0, BQ)
                col = j * Q + offs_c
                xt = tl.load(x_ptr + offs_t[:, None] * sxt + col[None, :] * sxn,
                             mask=tmask[:, None] & (offs_c[None, :] < q_lim) & (col[None, :] < N), other=0.0)
                vt = _load_factor_tile(v_ptr + j * svj, offs_c, offs_c < q_lim, svq, svr, rt * BR, R, RC, BQ, BR,
                                       QUANT)
                if UPCAST:
                    z = tl.dot(xt.to(tl.float32), vt.to(tl.float32), z, input_precision="ieee")
                else:       # codes become the activation dtype here (exact); float factors are it already
                    z = tl.dot(xt, vt.to(xt.dtype), z)
            if QUANT:
                z *= tl.load(vs_ptr + j * svsj + offs_r * svsr, mask=rmask, other=0.0).to(tl.float32)[None, :]
            zmask = tmask[:, None] & rmask[None, :]
            tl.store(z_ptr + slot * szs + offs_t[:, None] * szt + offs_r[None, :] * szr, z, mask=zmask)
            # the last of the r-tile's NSLOT partial sums to land mixes them, in slot order (deterministic)
            tl.debug_barrier()
            done = tl.atomic_add(cnt_ptr + rt, 1, sem="acq_rel", scope="gpu")
            if done == NSLOT - 1:
                offs_i = tl.arange(0, B_OUT_P2)
                smask = (offs_i[:, None] < B_OUT) & rmask[None, :]
                w = tl.zeros((B_OUT_P2, BT, BR), dtype=tl.float32)
                for sl in tl.static_range(NSLOT):         # unrolled: every slot's loads in flight at once
                    zt = tl.load(z_ptr + sl * szs + offs_t[:, None] * szt + offs_r[None, :] * szr, mask=zmask,
                                 other=0.0, cache_modifier=".cg")
                    sv = tl.load(s_ptr + offs_i[:, None] * ssi + (sl // Q_SPLIT) * ssj + offs_r[None, :] * ssr,
                                 mask=smask, other=0.0)
                    w += sv.to(tl.float32)[:, None, :] * zt[None, :, :]
                tl.store(w_ptr + offs_i[:, None, None] * swi + offs_t[None, :, None] * swt
                         + offs_r[None, None, :] * swr, w.to(w_ptr.dtype.element_ty),
                         mask=(offs_i[:, None, None] < B_OUT) & zmask[None, :, :])
                tl.atomic_xchg(cnt_ptr + rt, 0, sem="relaxed", scope="gpu")    # ready for the next call
        if PDL:
            gdc_launch_dependents()
    if STAGE != 1:
        items2 = B_OUT * P_TILES
        offs_k = tl.arange(0, BK)
        if PDL:     # stage 2 is resident while stage 1 drains: its U streams into L2 meanwhile
            _prefetch_u(u_ptr, pid, items2, GRID, P_TILES, P, RC, sui, sup, sur, BP, LINE)
            gdc_wait()
        if STAGE == 3:
            if PREFETCH == 1:
                # pull this program's U tiles towards L2 while the barrier is pending: HBM stays busy
                # during the wait and the tail of stage 1 instead of idling
                _prefetch_u(u_ptr, pid, B_OUT * P_TILES, GRID, P_TILES, P, RC, sui, sup, sur, BP, LINE)
            tl.debug_barrier()                                  # every thread's w stores are issued
            tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
            arrived = tl.load(bar_ptr, volatile=True)
            while arrived < GRID:
                arrived = tl.load(bar_ptr, volatile=True)
            left = tl.atomic_add(bar_ptr + 1, 1, sem="acq_rel", scope="gpu")
            if left == GRID - 1:                                # the last to leave resets both counters
                tl.atomic_xchg(bar_ptr, 0, sem="relaxed", scope="gpu")
                tl.atomic_xchg(bar_ptr + 1, 0, sem="relaxed", scope="gpu")
        for item in range(pid, items2, GRID):
            i = item // P_TILES
            offs_p = (item % P_TILES) * BP + tl.arange(0, BP)
            acc = tl.zeros((BT, BP), dtype=tl.float32)
            for k0 in range(0, R, BK):
                kk = k0 + offs_k
                kmask = kk < R
                wt = tl.load(w_ptr + i * swi + offs_t[:, None] * swt + kk[None, :] * swr,
                             mask=tmask[:, None] & kmask[None, :], other=0.0, cache_modifier=".cg")
                if QUANT:       # codes: loaded as rows of r (packed along r), unpacked, then transposed
                    ut = tl.trans(_load_factor_tile(u_ptr + i * sui, offs_p, offs_p < P, sup, sur, k0, R, RC, BP,
                                                    BK, QUANT))
                else:
                    ut = tl.load(u_ptr + i * sui + offs_p[None, :] * sup + kk[:, None] * sur,
                                 mask=(offs_p[None, :] < P) & kmask[:, None], other=0.0)
                if UPCAST:
                    acc = tl.dot(wt.to(tl.float32), ut.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(wt, ut.to(wt.dtype), acc)
            rows = i * P + offs_p
            rmask2 = (offs_p < P) & (rows < M)
            if QUANT:
                acc *= tl.load(us_ptr + i * susi + offs_p * susp, mask=offs_p < P, other=0.0).to(tl.float32)[None, :]
            if HAS_BIAS:
                acc += tl.load(b_ptr + rows, mask=rmask2, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + offs_t[:, None] * syt + rows[None, :] * sym, acc.to(y_ptr.dtype.element_ty),
                     mask=tmask[:, None] & rmask2[None, :])


def _counters(device: torch.device, count: int) -> torch.Tensor:
    """int32 counters per device (2 for the grid barrier, then one per r-tile), zero between calls:
    the kernel resets each on its way out, so no memset is launched per call."""
    key = (device.type, device.index)
    if key not in _COUNTERS or _COUNTERS[key].numel() < count:
        _COUNTERS[key] = allocate_state(lambda: torch.zeros(max(count, 4096), dtype=torch.int32, device=device), device)
    return _COUNTERS[key]


@functools.lru_cache(maxsize=None)
def _sm_limits(device_index: int) -> tuple[int, int, int, int]:
    props = torch.cuda.get_device_properties(device_index)
    smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    threads = getattr(props, "max_threads_per_multi_processor", 2048)
    return props.multi_processor_count, smem, regs, threads


def resident_programs(compiled, device: torch.device) -> int:
    """How many programs of ``compiled`` are co-resident on the whole GPU (occupancy from its registers,
    shared memory and warps). A grid no larger than this can wait on a barrier without deadlock."""
    sms, smem, regs, threads = _sm_limits(_index(device))
    if getattr(compiled, "n_regs", None) is None and hasattr(compiled, "_init_handles"):
        compiled._init_handles()                                # loads the binary: registers are known then
    warps = compiled.metadata.num_warps
    per_sm = min(threads // (32 * warps), 32)
    n_regs = max(int(getattr(compiled, "n_regs", 0) or 0), 1)
    per_sm = min(per_sm, regs // (n_regs * 32 * warps))
    shared = int(getattr(compiled.metadata, "shared", 0) or 0)
    if shared:
        per_sm = min(per_sm, smem // shared)
    return sms * per_sm


def decode_plan(shape: BlastShape, grid: int, cfg: dict) -> dict:
    """Split x·V into ~``grid``-multiples of equal work items: choose Q_SPLIT so that
    b_in * Q_SPLIT * r_tiles fills the grid with the least idle share."""
    BR, BQ = cfg["BR"], cfg["BQ"]
    r_tiles = triton.cdiv(shape.rank, BR)
    best = None
    for q_split in range(1, max(1, triton.cdiv(shape.q, BQ)) + 1):
        q_chunk = triton.cdiv(triton.cdiv(shape.q, q_split), BQ) * BQ
        q_split_eff = triton.cdiv(shape.q, q_chunk)
        items = shape.b_in * q_split_eff * r_tiles
        rounds = triton.cdiv(items, grid)
        cost = rounds * q_chunk + 0.05 * q_split_eff * BQ    # longest program's rows; slots cost a little
        if best is None or cost < best[0]:
            best = (cost, q_split_eff, q_chunk)
        if items >= 4 * grid or shape.b_in * (q_split + 1) > max(cfg.get("slots", 8), shape.b_in):
            break
    _, q_split, q_chunk = best
    return dict(Q_SPLIT=q_split, Q_CHUNK=q_chunk, R_TILES=r_tiles, P_TILES=triton.cdiv(shape.p, cfg["BP"]))


MAX_T = 64                  # one tile of tokens; past this the batched-GEMM paths win anyway
# mode: "persistent" (one launch, grid barrier), "pdl" (two launches, the second resident and
# prefetching while the first drains), "two" (two plain launches). prefetch (persistent only):
# 0 none, 1 U into L2 before the barrier, 2 U into L2 at the start (streams with V).
# slots: most partial-z slots per block-column mix (each costs stage 2 an L2 read of T x r).
DEFAULT = dict(mode="persistent", BR=32, BQ=128, BP=32, BK=128, warps=4, stages=3, per_sm=1, prefetch=1, slots=8)
PDL_DEFAULT = dict(DEFAULT, mode="pdl", BR=32, BQ=64, BP=16, BK=128, warps=4, stages=4, per_sm=4)
# what the autotuner times at decode sizes (blastfx.kernels.forward.candidates)
CANDIDATES = (DEFAULT, {**DEFAULT, "slots": 4}, {**DEFAULT, "BP": 16, "per_sm": 2},
              {**DEFAULT, "warps": 8, "BQ": 256, "stages": 3}, PDL_DEFAULT, {**PDL_DEFAULT, "mode": "two"},
              {**PDL_DEFAULT, "mode": "two", "slots": 4, "BP": 32}, {**PDL_DEFAULT, "mode": "two", "BR": 64, "BQ": 128})


def candidates(device) -> list[dict]:
    """The configs of :data:`CANDIDATES` that run on ``device`` (PDL only where it is supported)."""
    return [c for c in CANDIDATES if c["mode"] != "pdl" or pdl_supported(device)]


def pdl_supported(device) -> bool:
    """Programmatic dependent launch needs Hopper or newer and a triton that exposes it."""
    return (gdc_wait is not None and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def blast_decode(x2, U, S, V, bias, shape: BlastShape, cfg: dict | None = None, *, interpret: bool = False,
                 only_stage: int | None = None, U_scale=None, V_scale=None):
    """y (T, out_features) for T <= MAX_T; ``cfg["mode"]`` picks the launch scheme (see DEFAULT).
    Under the interpreter every mode runs as two plain launches (programs run one at a time there).
    ``only_stage`` (1 or 2, two-launch modes) launches just that stage: a profile of where the time
    goes (``benchmarks/decode_stages.py``); the output is then not the product. ``U_scale`` (b_out, p)
    and ``V_scale`` (b_in, r), both or neither: U and V are codes with these scales (as
    :func:`.gemv.blast_gemv` takes them), read in registers; no dequantized copy is made."""
    bits, pack = code_format(U, V, U_scale, V_scale, shape.rank, "blast_decode")
    cfg = {**DEFAULT, **(cfg or {})}
    T, n = x2.shape
    if T > MAX_T:
        raise ValueError(f"the one-launch decode kernel takes at most {MAX_T} tokens, got T={T}")
    mode = "two" if interpret else cfg["mode"]
    if mode not in ("persistent", "pdl", "two"):
        raise ValueError(f"decode mode must be 'persistent', 'pdl' or 'two', got {mode!r}")
    if mode == "pdl" and not pdl_supported(x2.device):
        raise RuntimeError("programmatic dependent launch needs a Hopper (sm_90) or newer GPU")
    y = torch.empty(T, shape.out_features, device=x2.device, dtype=x2.dtype)
    sms = _sm_limits(_index(x2.device))[0] if x2.is_cuda else 4
    plan = decode_plan(shape, cfg["per_sm"] * sms, cfg)
    const = dict(HAS_BIAS=bias is not None, BT=max(16, triton.next_power_of_2(T)), BR=cfg["BR"], BQ=cfg["BQ"],
                 BP=cfg["BP"], BK=cfg["BK"], UPCAST=interpret or x2.dtype == torch.float32,
                 PREFETCH=int(cfg["prefetch"]) if mode == "persistent" else 0, LINE=128 // U.element_size(),
                 Q_SPLIT=plan["Q_SPLIT"], NSLOT=shape.b_in * plan["Q_SPLIT"], PDL=mode == "pdl",
                 B_OUT=shape.b_out, B_OUT_P2=triton.next_power_of_2(shape.b_out), QUANT=bits, PACK=pack)
    launch = {} if interpret else {"num_warps": cfg["warps"], "num_stages": cfg["stages"]}
    z = torch.empty(shape.b_in * plan["Q_SPLIT"], T, shape.rank, device=x2.device, dtype=torch.float32)
    w = torch.empty(shape.b_out, T, shape.rank, device=x2.device, dtype=x2.dtype)
    us, vs = (U_scale, V_scale) if bits else (y, y)              # not read without QUANT
    counters = _counters(x2.device, 2 + plan["R_TILES"])
    cnt, bar = counters[2:], counters[:2]

    def args(grid):
        return (x2, U, S, V, bias if bias is not None else y, y, z, w, cnt, bar,
                T, n, shape.out_features, shape.p, shape.q, shape.rank, shape.b_in,
                plan["Q_CHUNK"], plan["R_TILES"], plan["P_TILES"], grid,
                x2.stride(0), x2.stride(1), *U.stride(), *S.stride(), *V.stride(),
                *z.stride(), *w.stride(), y.stride(0), y.stride(1), us, *(us.stride() if bits else (0, 0)),
                vs, *(vs.stride() if bits else (0, 0)), U.shape[-1])

    if mode != "persistent":
        if mode == "pdl":
            launch["launch_pdl"] = True
        for stage, grid in ((1, shape.b_in * plan["Q_SPLIT"] * plan["R_TILES"]), (2, shape.b_out * plan["P_TILES"])):
            if only_stage in (None, stage):
                _blast_decode_kernel[(grid,)](*args(grid), STAGE=stage, **const, **launch)
        return y
    if only_stage is not None:
        raise ValueError("only_stage needs a two-launch mode ('two' or 'pdl')")
    grid = cfg["per_sm"] * sms
    key = (_index(x2.device), shape, T, x2.dtype, tuple(sorted(cfg.items())), bias is not None,
           tuple(x2.stride()), tuple(U.stride()), tuple(V.stride()), tuple(S.stride()), U.dtype)
    launch_persistent(_blast_decode_kernel, key, args(grid), grid, x2.device, f"decode kernel config {cfg}",
                      STAGE=3, **const, **launch)
    return y


def launch_persistent(kernel, key, args, grid: int, device, what: str, interpret: bool = False, **kwargs) -> None:
    """Launch ``kernel`` on a grid that waits on a grid barrier. The first time ``key`` is seen the
    kernel is compiled without running and its co-resident program count checked: a grid larger
    than that would deadlock, so it raises instead of launching. Under the interpreter, which runs
    programs one after another, only a grid of one program gets through its barrier."""
    if interpret:
        if grid != 1:
            raise ValueError(f"{what}: under the interpreter a grid barrier lets only one program through, got {grid}")
        kernel[(1,)](*args, **kwargs)
        return
    if key not in _CHECKED:
        compiled = kernel.warmup(*args, **kwargs, grid=(grid,))
        resident = resident_programs(compiled, device)
        if resident < grid:
            raise RuntimeError(f"{what} fits {resident} co-resident programs, fewer than its grid of {grid}: "
                               "a grid barrier would deadlock")
        _CHECKED.add(key)
    kernel[(grid,)](*args, **kwargs)


_CHECKED: set = set()


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()
