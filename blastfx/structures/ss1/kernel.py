"""Triton forward of ``blastfx::ss1_matmul``: a GEMM whose K-loop runs over the *shared* weight tiles.

For output tile ``n`` and shared tile ``g`` a program sums the ``reduction`` input tiles of group
``g``, each loaded at its rotation (``(c + s) mod block_k`` added to the load offsets), into one
(BM, block_k) fp32 tile, then does a single ``tl.dot`` with the (block_k, BN) shared weight tile::

    y[:, n] = sum_g ( sum_{t<reduction} roll(x[:, tile g*reduction+t], -s) ) @ shared[n, g]^T

So the weight is streamed once, ``reduction`` times less of it than a dense GEMM of the same shape,
and the dot count drops by the same factor; the extra work is ``reduction - 1`` vector adds on input
tiles, which are small when T is (decode) and reused from cache across output tiles when it is not
(prefill). Input features past ``in_features`` and rows past T / out_features are masked, so no
padding is ever materialised.

Tiles: a step of the K-loop covers ``KB`` shared columns (``KB // block_k`` shared tiles, each with
its own rotations), so a program keeps more weight bytes in flight than one 32-wide hash tile
gives: at decode the kernel is a stream of the shared weight, and its speed is the bytes in flight
per SM. BN must divide ``block_n`` (all rows of a program share one rotation). The (BM, BN, KB,
warps, stages) tile is timed per (shape, dtype, token bucket) by the autotuner on a GPU, over weight
copies that stream from HBM, from :func:`candidates`. Where nothing is timed (CUDA-graph capture,
``autotune=False``) the first candidate runs: :func:`kernel_config` at decode sizes, the
expand-then-GEMM config at prefill sizes. The expansion is timed in two forms: PyTorch's gather
(``{"path": "dense"}``, the reference's own code) and one Triton launch (``{"path": "expand"}``,
:func:`expand_triton`) that reads each shared tile at its rotation and writes the dense tile, with
no index tensor in memory.
At T <= ``GEMV_MAX_T`` the autotuner also times a CUDA-core form (``{"path": "gemv"}``,
``_ss1_gemv_kernel``): the same folded input, but each shared weight tile is loaded once into
registers with 16-byte vector loads and multiplied on CUDA cores, with no tensor-core tile padding
T = 1 to 16 rows and no staging through shared memory. At decode the layer is one stream of its
shared weight in one launch, so unlike BLAST's two stages it pays a kernel's fixed cost once.
At prefill sizes it also times a *folded GEMM* (``{"path": "fold"}``): the kernel above adds the
rotated input tiles in registers before every tensor-core step, once per output tile, while the
fold depends on an output tile only through the tiles' rotations *relative to the first of their
group* (the first's own rotation can move to the weight tile: a dot is unchanged when the same
permutation reorders both operands' K). So one memory-bound launch writes the group sums for every
tuple of relative rotations (:func:`fold_variants`, ``(block_k / vec) ** (reduction - 1)`` copies of
1/reduction of the input), and one plain GEMM reads, per output tile and shared tile, the copy its
rotations select and the weight tile at the first tile's rotation: half the multiply-adds of a
dense GEMM at reduction 2, an unmodified A operand (straight from memory into the tensor cores) and
half the input traffic of the in-register fold. Offered where the copies stay within
``FOLD_MAX_COPIES`` times the input (reduction 2 at the default 32-wide tiles and 8-wide vectors).
The copies are indexed by rotations in units of ``vec``, so this path relies on the op's promise
that every shift is a multiple of ``vec`` (a layout's always are) more than the others do: a shift
off that grid selects a wrong copy, where the other paths only lose their vector loads.
Under ``TRITON_INTERPRET=1`` (CPU tests) the dot runs on fp32 operands (the interpreter's bf16 dot
is wrong); fp32 inputs always use IEEE dots, never TF32.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from blastfx.kernels import autotune

__all__ = ["ss1_matmul_triton", "expand_triton", "fold_triton", "fold_variants", "kernel_config", "candidates",
           "gemv_configs", "fold_configs", "DENSE", "EXPAND", "GEMV_MAX_T"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DECODE_MAX_T = 16
GEMV_MAX_T = 4              # FMA accumulators hold T x tile values per thread; past this, tensor cores win
FOLD_MAX_COPIES = 2         # the fold path's folded copies may hold at most this many times the input
FOLD_TILE = {"BT": 32, "KB": 256, "num_warps": 4}      # the fold launch: a copy, memory-bound, not tuned


@triton.jit
def _rotated_columns(tile, c, s, BK: tl.constexpr, VEC: tl.constexpr):
    """Columns ``tile * BK + (c + s) mod BK``: column c (only c mod BK counts) of a BK-wide tile read
    at rotation ``s`` (``&`` is mod for a power of two, also for s < 0). Shifts are multiples of VEC,
    so the columns run in aligned groups of VEC: saying so lets the compiler load each group as one
    vector (16 bytes for VEC = 8 in bf16) instead of VEC scalar loads, which cannot be pipelined
    through asynchronous copies."""
    cols = tile * BK + ((c + s) & (BK - 1))
    return tl.max_contiguous(tl.multiple_of(cols, VEC), VEC)


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b``: an IEEE fp32 dot with UPCAST (fp32 inputs, and the interpreter, whose
    low-precision dot is wrong), else the operands' own tensor-core dot."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _ss1_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, T, N, K, K_TILES, SHARED_TILES,
                sxt, sxk, swn, swk, sst, ssn, syt, syn,
                R: tl.constexpr, HASH_BN: tl.constexpr, HAS_BIAS: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KB: tl.constexpr, UPCAST: tl.constexpr,
                VEC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, KB)                       # KB // BK shared tiles per step
    sub = offs_k // BK                              # which of them a column belongs to
    within = offs_k % BK
    j = (pid_n * BN) // HASH_BN                     # the output tile of the hash
    m_ok = offs_m < T
    n_ok = offs_n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for g0 in range(0, SHARED_TILES, KB // BK):
        g = g0 + sub
        g_ok = g < SHARED_TILES
        a = tl.zeros((BM, KB), dtype=tl.float32)
        for t in range(R):
            i = g * R + t
            s = tl.load(s_ptr + i * sst + j * ssn, mask=g_ok & (i < K_TILES), other=0)
            cols = _rotated_columns(i, within, s, BK, VEC)
            xt = tl.load(x_ptr + offs_m[:, None] * sxt + cols[None, :] * sxk,
                         mask=m_ok[:, None] & (g_ok & (cols < K))[None, :], other=0.0)
            a += xt.to(tl.float32)
        wt = tl.load(w_ptr + offs_n[None, :] * swn + (g0 * BK + offs_k)[:, None] * swk,
                     mask=n_ok[None, :] & g_ok[:, None], other=0.0)
        acc = _mma(a if UPCAST else a.to(wt.dtype), wt, acc, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * syt + offs_n[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _fold_input(x_ptr, s_ptr, g, g_ok, within, offs_t, t_ok, j, K, K_TILES, sxt, sxk, sst, ssn,
                R: tl.constexpr, BK: tl.constexpr, KB: tl.constexpr, BT: tl.constexpr, VEC: tl.constexpr):
    """(BT, KB) fp32: for the shared columns of tiles ``g``, the sum of the R input tiles that read
    them, each gathered at its rotation for output tile j (zero past the last input feature)."""
    a = tl.zeros((BT, KB), dtype=tl.float32)
    for t in range(R):
        i = g * R + t
        s = tl.load(s_ptr + i * sst + j * ssn, mask=g_ok & (i < K_TILES), other=0)
        cols = _rotated_columns(i, within, s, BK, VEC)
        xt = tl.load(x_ptr + offs_t[:, None] * sxt + cols[None, :] * sxk,
                     mask=t_ok[:, None] & (g_ok & (cols < K))[None, :], other=0.0)
        a += xt.to(tl.float32)
    return a


@triton.jit
def _ss1_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, T, N, K, K_TILES, SHARED_TILES,
                     sxt, sxk, swn, swk, sst, ssn, syt, syn,
                     R: tl.constexpr, HASH_BN: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KB: tl.constexpr, VEC: tl.constexpr):
    """y[:, tile] for T <= BT tokens on CUDA cores: a program owns BN output rows (inside one hash
    tile, so one set of rotations) and streams their shared weight rows in (BN, KB) tiles, rows
    contiguous along k, against the folded input; one reduction over k at the end."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, KB)
    sub = offs_k // BK
    within = offs_k % BK
    j = (pid_n * BN) // HASH_BN
    n_ok = offs_n < N
    t_ok = offs_t < T
    acc = tl.zeros((BT, BN, KB), dtype=tl.float32)
    for g0 in range(0, SHARED_TILES, KB // BK):
        g = g0 + sub
        g_ok = g < SHARED_TILES
        wt = tl.load(w_ptr + offs_n[:, None] * swn + (g0 * BK + offs_k)[None, :] * swk,
                     mask=n_ok[:, None] & g_ok[None, :], other=0.0)
        a = _fold_input(x_ptr, s_ptr, g, g_ok, within, offs_t, t_ok, j, K, K_TILES, sxt, sxk, sst, ssn, R, BK, KB, BT, VEC)
        acc += a[:, None, :] * wt.to(tl.float32)[None, :, :]
    out = tl.sum(acc, axis=2)                                           # (BT, BN)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_t[:, None] * syt + offs_n[None, :] * syn, out.to(y_ptr.dtype.element_ty),
             mask=t_ok[:, None] & n_ok[None, :])


@triton.jit
def _ss1_expand_kernel(w_ptr, s_ptr, d_ptr, N, K, K_TILES, swn, swk, sst, ssn, sdn, sdk,
                       R: tl.constexpr, HASH_BN: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       KB: tl.constexpr, VEC: tl.constexpr):
    """The dense (N, K) weight from the shared one, one (BN, KB) tile per program: each input tile's
    columns read from its group's shared tile at the rotation for this output tile, and written
    contiguously. One read of the shared weight (from L2 after its first output tile) and one write
    of the dense weight, in vector loads and stores, with no index tensor in memory."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = pid_k * KB + tl.arange(0, KB)
    i = offs_k // BK                                    # the input tile of each dense column
    j = (pid_n * BN) // HASH_BN                         # BN divides HASH_BN: one output tile a program
    k_ok = offs_k < K
    s = tl.load(s_ptr + i * sst + j * ssn, mask=i < K_TILES, other=0)
    # shared column of dense column i * BK + c: (i // R) * BK + (c - s) mod BK, the inverse rotation
    # of the kernel's input gather
    src = _rotated_columns(i // R, offs_k, -s, BK, VEC)
    mask = (offs_n < N)[:, None] & k_ok[None, :]
    tile = tl.load(w_ptr + offs_n[:, None] * swn + src[None, :] * swk, mask=mask, other=0.0)
    tl.store(d_ptr + offs_n[:, None] * sdn + offs_k[None, :] * sdk, tile, mask=mask)


@triton.jit
def _ss1_fold_kernel(x_ptr, f_ptr, T, K, SHARED_TILES, sxt, sxk, sfv, sft, sfk,
                     R: tl.constexpr, G: tl.constexpr, BK: tl.constexpr, VEC: tl.constexpr,
                     BT: tl.constexpr, KB: tl.constexpr):
    """Folded copy ``v`` of the input, (BT, KB) of it a program: shared column ``g * BK + c`` holds
    ``sum_u x[:, (g*R + u) * BK + (c + d_u) mod BK]`` with ``d_0 = 0`` and ``d_u`` (u >= 1) the
    u-th base-G digit of v times VEC: the group's sum for one tuple of rotations relative to its
    first tile. Summed in fp32, stored in the copy's dtype (the rounding the in-register fold makes
    before its dot); zero past the last input feature."""
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    v = tl.program_id(2)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_k = pid_k * KB + tl.arange(0, KB)
    g = offs_k // BK
    within = offs_k % BK
    t_ok = offs_t < T
    g_ok = g < SHARED_TILES
    a = tl.zeros((BT, KB), dtype=tl.float32)
    rest = v
    for u in tl.static_range(R):
        d = 0
        if u > 0:
            d = (rest % G) * VEC
            rest = rest // G
        cols = _rotated_columns(g * R + u, within, d, BK, VEC)
        xt = tl.load(x_ptr + offs_t[:, None] * sxt + cols[None, :] * sxk,
                     mask=t_ok[:, None] & (g_ok & (cols < K))[None, :], other=0.0)
        a += xt.to(tl.float32)
    tl.store(f_ptr + v.to(tl.int64) * sfv + offs_t[:, None] * sft + offs_k[None, :] * sfk, a.to(f_ptr.dtype.element_ty),
             mask=t_ok[:, None] & g_ok[None, :])


@triton.jit
def _ss1_folded_gemm_kernel(f_ptr, w_ptr, s_ptr, b_ptr, y_ptr, T, N, K_TILES, SHARED_TILES,
                            sfv, sft, swn, swk, sst, ssn, syt, syn,
                            R: tl.constexpr, G: tl.constexpr, HASH_BN: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KB: tl.constexpr,
                            UPCAST: tl.constexpr, VEC: tl.constexpr, SWAP_AB: tl.constexpr):
    """y = sum_g copy[v(g, j)][:, g] @ rot(shared[:, g], -s0(g, j))^T for the output tile j of this
    program: the copy of :func:`_ss1_fold_kernel` that the group's relative rotations select, and
    the shared weight tile read at the rotation of the group's first input tile. Both operands are
    plain tile loads (the copy's columns are contiguous within each shared tile, the weight's run in
    aligned vectors of VEC), so the K-loop is an ordinary pipelined GEMM over the shared tiles.

    A program's outputs must share one hash tile, so BN <= block_n (64 by default). With SWAP_AB the
    product is computed transposed, outputs as the tensor cores' M and tokens as their N
    (y^T = W_rot @ copy^T): a (64 outputs, 256 tokens) tile then issues the widest Hopper MMA
    instead of 64-wide ones."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    within = tl.arange(0, BK)
    j = (pid_n * BN) // HASH_BN
    m_ok = offs_m < T
    n_ok = offs_n < N
    if SWAP_AB:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    # a K step covers KB // BK shared tiles, one dot each: the copy index and the rotation are
    # scalars per tile, so the operand addresses are a plain tile's (a base plus the tile offsets)
    for g0 in range(0, SHARED_TILES, KB // BK):
        for sub in tl.static_range(KB // BK):
            g = g0 + sub
            g_ok = g < SHARED_TILES
            s0 = tl.load(s_ptr + (g * R) * sst + j * ssn, mask=g_ok, other=0)
            v = 0
            radix = 1
            for u in tl.static_range(1, R):
                i = g * R + u
                su = tl.load(s_ptr + i * sst + j * ssn, mask=g_ok & (i < K_TILES), other=0)
                v += ((su - s0) & (BK - 1)) // VEC * radix
                radix *= G
            copy = f_ptr + v.to(tl.int64) * sfv + g * BK
            k_ok = g * BK + within < SHARED_TILES * BK          # the step's last tiles may be past the end
            wcols = _rotated_columns(g, within, -s0, BK, VEC)
            if SWAP_AB:         # (outputs, K) @ (K, tokens)
                wt = tl.load(w_ptr + offs_n[:, None] * swn + wcols[None, :] * swk, mask=n_ok[:, None] & k_ok[None, :],
                             other=0.0)
                a = tl.load(copy + offs_m[None, :] * sft + within[:, None], mask=m_ok[None, :] & k_ok[:, None], other=0.0)
                acc = _mma(wt, a, acc, UPCAST)
            else:               # (tokens, K) @ (K, outputs)
                a = tl.load(copy + offs_m[:, None] * sft + within[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                wt = tl.load(w_ptr + offs_n[None, :] * swn + wcols[:, None] * swk, mask=n_ok[None, :] & k_ok[:, None],
                             other=0.0)
                acc = _mma(a, wt, acc, UPCAST)
    if SWAP_AB:
        acc = tl.trans(acc)                                 # (tokens, outputs), as y stores it
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * syt + offs_n[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def fold_variants(reduction: int, block_k: int, vec: int) -> int:
    """Folded copies the fold path writes: one per tuple of rotations of a group's other
    ``reduction - 1`` tiles relative to its first, each a multiple of ``vec`` below ``block_k``."""
    return (block_k // vec) ** (reduction - 1)


def fold_fits(reduction: int, block_k: int, vec: int) -> bool:
    """Whether the fold path is offered: reduction > 1 (else there is nothing to fold) and the
    copies (each 1/reduction of the input) hold at most ``FOLD_MAX_COPIES`` times the input."""
    return reduction > 1 and fold_variants(reduction, block_k, vec) <= FOLD_MAX_COPIES * reduction


def fold_triton(x2: torch.Tensor, shared_in: int, reduction: int, block_k: int, vec: int,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (variants, T, shared_in) folded copies of the (T, in_features) input ``x2`` that
    ``_ss1_folded_gemm_kernel`` reads (copy ``v``: see ``_ss1_fold_kernel``), in one launch."""
    T, in_features = x2.shape
    G = block_k // vec
    V = fold_variants(reduction, block_k, vec)
    f = torch.empty(V, T, shared_in, device=x2.device, dtype=dtype or x2.dtype)
    BT, KB = FOLD_TILE["BT"], max(FOLD_TILE["KB"], block_k)
    _ss1_fold_kernel[(triton.cdiv(T, BT), triton.cdiv(shared_in, KB), V)](
        x2, f, T, in_features, shared_in // block_k, x2.stride(0), x2.stride(1), f.stride(0), f.stride(1),
        f.stride(2), R=reduction, G=G, BK=block_k, VEC=vec, BT=BT, KB=KB,
        **({} if INTERPRET else {"num_warps": FOLD_TILE["num_warps"]}))
    return f


def expand_triton(weight: torch.Tensor, shifts: torch.Tensor, in_features: int, reduction: int, block_k: int,
                  block_n: int, vec: int = 1, BN: int = 16, KB: int = 256, num_warps: int = 4) -> torch.Tensor:
    """The dense (out_features, in_features) weight of a shared ``weight``, as ``ops._expand`` gives it
    (the reference), in one Triton launch; ``vec`` as for :func:`ss1_matmul_triton`."""
    out_features = weight.shape[0]
    BN = min(BN, block_n)
    if BN < 1 or BN & (BN - 1):
        raise ValueError(f"expand BN={BN} must be a power of two dividing block_n={block_n}")
    if KB < block_k or KB & (KB - 1):
        raise ValueError(f"expand KB={KB} must be a power-of-two multiple of block_k={block_k}")
    dense = torch.empty(out_features, in_features, device=weight.device, dtype=weight.dtype)
    _ss1_expand_kernel[(triton.cdiv(out_features, BN), triton.cdiv(in_features, KB))](
        weight, shifts, dense, out_features, in_features, math.ceil(in_features / block_k),
        weight.stride(0), weight.stride(1), shifts.stride(0), shifts.stride(1), dense.stride(0), dense.stride(1),
        R=reduction, HASH_BN=block_n, BN=BN, BK=block_k, KB=KB, VEC=vec,
        **({} if INTERPRET else {"num_warps": num_warps}))
    return dense


def gemv_configs(T: int, block_n: int, block_k: int) -> list[dict]:
    """The CUDA-core configs timed at T <= GEMV_MAX_T: (BN, KB) tiles of 8-16 KB of bf16 per loop
    step at T = 1, so each SM keeps enough weight bytes in flight; BN shrinks with T (here, not in
    the launcher) to keep the FMA accumulators (T x BN x KB) at the same register count."""
    if T > GEMV_MAX_T:
        return []
    bt = triton.next_power_of_2(T)
    tiles = [(16, 256, 4, 1), (16, 512, 4, 1), (8, 512, 4, 2), (32, 256, 8, 1), (16, 256, 4, 3)]
    out = []
    for bn, kb, w, st in tiles:
        c = {"path": "gemv", "BN": min(max(1, bn // bt), block_n), "KB": max(kb, block_k), "num_warps": w,
             "num_stages": st}
        if c not in out:
            out.append(c)
    return out


def kernel_config(T: int, block_n: int, block_k: int = 32, interpret: bool = INTERPRET) -> dict:
    """The default tile for T tokens (BN never exceeds the hash's ``block_n``; KB is a multiple of
    ``block_k``): the base an explicit ``config`` overrides, and the first kernel tile of
    :func:`candidates` (at decode sizes the first candidate, so what runs untimed)."""
    if interpret:                                   # small tiles keep the CPU interpreter fast
        return {"BM": 16, "BN": min(16, block_n), "KB": block_k}
    if T <= DECODE_MAX_T:
        return {"BM": 16, "BN": min(32, block_n), "KB": max(block_k, 128), "num_warps": 4, "num_stages": 4}
    return {"BM": 64, "BN": min(64, block_n), "KB": max(block_k, 64), "num_warps": 4, "num_stages": 3}


DENSE = {"path": "dense"}      # the config that expands the shared weight and runs one cuBLAS GEMM
EXPAND = {"path": "expand"}    # the same with the expansion in one Triton launch (expand_triton)


def fold_configs(T: int, block_n: int, block_k: int, reduction: int, vec: int) -> list[dict]:
    """The folded-GEMM tiles timed for T tokens (none at T <= GEMV_MAX_T, where one launch of the
    CUDA-core form wins, nor where :func:`fold_fits` says no): at prefill sizes the 128-256 token
    tiles and the deeper K steps a pipelined Hopper GEMM runs fastest with, in both orientations
    (``swap_ab``: outputs as the MMA's M); BN (outputs) stays inside a hash tile."""
    if T <= GEMV_MAX_T or not fold_fits(reduction, block_k, vec):
        return []
    if T <= DECODE_MAX_T:               # few tokens: outputs as the MMA's M (swap_ab), tokens as its N
        tiles = [(16, 64, 128, 4, 4, True), (16, 64, 256, 4, 3, True), (16, 64, 128, 4, 4, False)]
    else:
        tiles = [(128, 64, 64, 8, 3, False), (128, 64, 128, 8, 3, False), (64, 64, 64, 4, 4, False),
                 (256, 64, 64, 8, 3, False), (128, 64, 64, 4, 4, True), (128, 64, 128, 4, 3, True),
                 (64, 64, 64, 4, 4, True)]
    out = []
    for bm, bn, kb, w, st, swap in tiles:
        c = {"path": "fold", "BM": bm, "BN": min(bn, block_n), "KB": max(kb, block_k), "num_warps": w,
             "num_stages": st, **({"swap_ab": True} if swap else {})}
        if c not in out:
            out.append(c)
    return out


def candidates(T: int, block_n: int, block_k: int, reduction: int = 1, vec: int = 1) -> list[dict]:
    """Configs the autotuner times for T tokens. Decode: narrow output tiles for enough programs, K
    steps of 128-256 shared columns for enough bytes in flight; prefill: larger M tiles. Every list
    also holds ``{"path": "dense"}``: the shared weight expanded to the dense one (one gather) and a
    cuBLAS GEMM. At prefill sizes that runs first: there the GEMM is compute-bound and the kernel,
    which builds its A operand from rotated gathers of x in registers, reaches a fraction of the
    tensor cores' rate (measured on an H200: 0.12x dense at T >= 1024), while the expansion costs
    one write of the dense weight. Past the CUDA-core sizes the folded GEMM's tiles
    (:func:`fold_configs`) are timed too, where the reduction and ``vec`` allow it."""
    first = kernel_config(T, block_n, block_k, interpret=False)
    if T <= DECODE_MAX_T:
        tiles = [(16, 128, 4, 4), (16, 256, 4, 3), (32, 256, 4, 3), (64, 128, 4, 4), (64, 256, 8, 3),
                 (32, block_k, 4, 4)]
        more = [{"BM": 16, "BN": bn, "KB": kb, "num_warps": w, "num_stages": st} for bn, kb, w, st in tiles]
    else:
        tiles = [(64, 64, 64, 4, 4), (128, 64, 64, 8, 3), (128, 64, 128, 8, 3), (64, 64, 128, 4, 3)]
        more = [{"BM": bm, "BN": bn, "KB": kb, "num_warps": w, "num_stages": st} for bm, bn, kb, w, st in tiles]
    out = [first]
    for c in more:
        c = {**c, "BN": min(c["BN"], block_n), "KB": max(c["KB"], block_k)}
        if c not in out:
            out.append(c)
    fold = fold_configs(T, block_n, block_k, reduction, vec)
    if T <= DECODE_MAX_T:
        return out + gemv_configs(T, block_n, block_k) + fold + [DENSE]
    return [DENSE, EXPAND] + out + fold


def _launch_gemv(x2, weight, shifts, bias, y, reduction, block_k, block_n, vec, cfg):
    """The CUDA-core kernel with tile ``cfg`` (BN, KB and launch options) into ``y``; BN is taken as
    given for every T (:func:`gemv_configs` scales it down with T; a config passed by hand keeps its
    accumulators at T x BN x KB)."""
    T, in_features = x2.shape
    if T > GEMV_MAX_T:
        raise ValueError(f"config path='gemv' takes at most {GEMV_MAX_T} tokens, got T={T}")
    BN, KB = cfg.pop("BN"), cfg.pop("KB", block_k)
    if BN < 1 or BN & (BN - 1) or block_n % BN:
        raise ValueError(f"config BN={BN} must be a power of two dividing block_n={block_n}")
    if KB < block_k or KB % block_k or KB & (KB - 1):
        raise ValueError(f"config KB={KB} must be a power-of-two multiple of block_k={block_k}")
    out_features = weight.shape[0]
    _ss1_gemv_kernel[(triton.cdiv(out_features, BN),)](
        x2, weight, shifts, bias if bias is not None else weight, y, T, out_features, in_features,
        math.ceil(in_features / block_k), weight.shape[1] // block_k,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), shifts.stride(0), shifts.stride(1),
        y.stride(0), y.stride(1),
        R=reduction, HASH_BN=block_n, HAS_BIAS=bias is not None, BT=triton.next_power_of_2(T), BN=BN, BK=block_k,
        KB=KB, VEC=vec, **({} if INTERPRET else cfg))
    return y


LAUNCH_KEYS = {"num_warps", "num_stages"}
PATH_KEYS = {"kernel": {"BM", "BN", "KB"}, "gemv": {"BN", "KB"}, "fold": {"BM", "BN", "KB", "swap_ab"}}


def _check_keys(path: str, cfg: dict) -> None:
    """A config's keys are its path's tile keys and launch options: anything else (a typo, another
    path's key) is an error here rather than a launch error on a GPU and silence in the interpreter."""
    unknown = set(cfg) - PATH_KEYS[path] - LAUNCH_KEYS
    if unknown:
        raise ValueError(f"config path={path!r} takes no {sorted(unknown)} (only "
                         f"{sorted(PATH_KEYS[path] | LAUNCH_KEYS)})")
    if "swap_ab" in cfg and not isinstance(cfg["swap_ab"], bool):
        raise ValueError(f"config swap_ab must be True or False, got {cfg['swap_ab']!r}")


def _tensor_core_tile(cfg: dict, block_k: int, block_n: int) -> tuple[int, int, int]:
    """Pop and check (BM, BN, KB) of a tensor-core config: BN inside one hash tile, KB whole shared
    tiles."""
    BM, BN, KB = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("KB", block_k)
    if BM < 16 or BM & (BM - 1):
        raise ValueError(f"config BM={BM} must be a power of two of at least 16 (a tensor-core tile)")
    if BN < 16 or BN > block_n or block_n % BN:
        raise ValueError(f"config BN={BN} must be a power of two dividing block_n={block_n}, at least 16")
    if KB < block_k or KB % block_k or KB & (KB - 1):
        raise ValueError(f"config KB={KB} must be a power-of-two multiple of block_k={block_k}")
    return BM, BN, KB


def _launch_fold(x2, weight, shifts, bias, y, reduction, block_k, block_n, vec, tile, cfg, grid):
    """The folded GEMM (``{"path": "fold"}``): the folded copies of the input in one launch, then one
    GEMM over them with tile (BM, BN, KB) and launch options ``cfg``."""
    if not fold_fits(reduction, block_k, vec):
        raise ValueError(
            f"config path='fold' needs reduction > 1 and at most {FOLD_MAX_COPIES}x the input in folded copies: "
            f"reduction={reduction} with block_k={block_k}, vec={vec} makes {fold_variants(reduction, block_k, vec)} "
            f"copies of 1/{reduction} of it")
    BM, BN, KB = tile
    swap = cfg.pop("swap_ab", False)
    f = fold_triton(x2, weight.shape[1], reduction, block_k, vec, dtype=weight.dtype)
    _ss1_folded_gemm_kernel[grid](
        f, weight, shifts, bias if bias is not None else weight, y, x2.shape[0], weight.shape[0],
        math.ceil(x2.shape[1] / block_k), weight.shape[1] // block_k,
        f.stride(0), f.stride(1), weight.stride(0), weight.stride(1), shifts.stride(0), shifts.stride(1),
        y.stride(0), y.stride(1),
        R=reduction, G=block_k // vec, HASH_BN=block_n, HAS_BIAS=bias is not None, BM=BM, BN=BN, BK=block_k,
        KB=KB, UPCAST=INTERPRET or x2.dtype == torch.float32, VEC=vec, SWAP_AB=swap, **({} if INTERPRET else cfg))
    return y


def _launch(x2, weight, shifts, bias, y, reduction, block_k, block_n, vec, cfg):
    """Run one config into ``y`` (T, out): the kernel with its tile, or the GEMM on the expanded
    weight (``{"path": "dense"}``, ``{"path": "expand"}``)."""
    cfg = dict(cfg)
    path = cfg.pop("path", "kernel")
    if path not in ("kernel", "dense", "expand", "gemv", "fold"):
        raise ValueError(f"config path={path!r}: expected 'kernel', 'gemv', 'fold', 'dense' or 'expand'")
    if path in PATH_KEYS:
        _check_keys(path, cfg)
    if path == "gemv":
        return _launch_gemv(x2, weight, shifts, bias, y, reduction, block_k, block_n, vec, cfg)
    if path in ("dense", "expand"):
        from .ops import _expand
        unknown = set(cfg) - ({"BN", "KB", "num_warps"} if path == "expand" else set())
        if unknown:
            raise ValueError(f"config path={path!r} takes no {sorted(unknown)}"
                             + (" (only BN, KB, num_warps)" if path == "expand" else ""))
        dense = (_expand(weight, shifts, x2.shape[1], reduction, block_k, block_n) if path == "dense" else
                 expand_triton(weight, shifts, x2.shape[1], reduction, block_k, block_n, vec, **cfg))
        return torch.addmm(bias, x2, dense.t(), out=y) if bias is not None else torch.mm(x2, dense.t(), out=y)
    BM, BN, KB = _tensor_core_tile(cfg, block_k, block_n)
    T, in_features = x2.shape
    out_features = weight.shape[0]
    grid = (triton.cdiv(T, BM), triton.cdiv(out_features, BN))
    if path == "fold":
        return _launch_fold(x2, weight, shifts, bias, y, reduction, block_k, block_n, vec, (BM, BN, KB), cfg, grid)
    _ss1_kernel[grid](
        x2, weight, shifts, bias if bias is not None else weight, y, T, out_features, in_features,
        math.ceil(in_features / block_k), weight.shape[1] // block_k,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), shifts.stride(0), shifts.stride(1),
        y.stride(0), y.stride(1),
        R=reduction, HASH_BN=block_n, HAS_BIAS=bias is not None, BM=BM, BN=BN, BK=block_k, KB=KB,
        UPCAST=INTERPRET or x2.dtype == torch.float32, VEC=vec, **({} if INTERPRET else cfg))
    return y


def tuning_key(T: int, weight: torch.Tensor, in_features: int, reduction: int, block_k: int, block_n: int,
               vec: int, dtype, has_bias: bool, device) -> tuple:
    """The autotuner's key of an SS1 call (what :func:`blastfx.kernels.autotune.report` lists its
    chosen path under)."""
    return ("ss1", autotune.token_bucket(T), tuple(weight.shape), in_features, reduction, block_k, block_n, vec,
            dtype, has_bias, str(device))


def ss1_matmul_triton(x: torch.Tensor, weight: torch.Tensor, shifts: torch.Tensor, bias: torch.Tensor | None,
                      reduction: int, block_k: int, block_n: int, config: dict | None = None,
                      vec: int = 1) -> torch.Tensor:
    """Same contract as the op (arguments already checked by ``ops.check_inputs``; ``vec``: every
    shift is a multiple of it, as the op's argument promises). ``config``
    overrides keys of the tile, or is ``{"path": "dense"}`` / ``{"path": "expand"}`` (tests,
    benchmarks); without it a GPU
    runs the autotuned config for this (shape, dtype, token bucket), the interpreter
    :func:`kernel_config`."""
    if x.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"ss1_matmul_triton needs CUDA tensors (or TRITON_INTERPRET=1), got x on {x.device}; "
                         f"blastfx.structures.ss1.ss1_matmul runs the reference there")
    lead, in_features = x.shape[:-1], x.shape[-1]
    out_features = weight.shape[0]
    x2 = x.reshape(-1, in_features)
    T = x2.shape[0]
    y = torch.empty(T, out_features, device=x.device, dtype=x.dtype)
    if T == 0:
        return y.reshape(*lead, out_features)
    if config is not None or INTERPRET:
        path = (config or {}).get("path")
        if path in ("dense", "expand"):
            base = {}                               # the config names its path; these take no tile
        else:
            if path != "gemv":
                base = kernel_config(T, block_n, block_k)
            elif T <= GEMV_MAX_T:
                base = gemv_configs(T, block_n, block_k)[0]
            else:
                base = {}                           # too many tokens for the CUDA-core form: _launch says so
        cfg = {**base, **(config or {})}
    else:
        key = tuning_key(T, weight, in_features, reduction, block_k, block_n, vec, x.dtype, bias is not None,
                         x.device)
        copies = autotune.WeightCopies((weight,), x.device)
        configs = candidates(T, block_n, block_k, reduction, vec)
        _, cfg = autotune.choose(key, [(c.get("path", "kernel"), c) for c in configs],
                                 lambda _p, c, k: _launch(x2, copies[k][0], shifts, bias, y, reduction,
                                                          block_k, block_n, vec, c), copies=copies.count)
    _launch(x2, weight, shifts, bias, y, reduction, block_k, block_n, vec, cfg)
    return y.reshape(*lead, out_features)
