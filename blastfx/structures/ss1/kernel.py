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

Tiles: decode (T <= 16) uses 16-row tiles and narrow output tiles for more programs; prefill 64-row
tiles. The output tile BN must divide ``block_n`` (all rows of a program share one rotation).
Under ``TRITON_INTERPRET=1`` (CPU tests) the dot runs on fp32 operands (the interpreter's bf16 dot
is wrong); fp32 inputs always use IEEE dots, never TF32.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["ss1_matmul_triton", "kernel_config"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DECODE_MAX_T = 16


@triton.jit
def _ss1_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, T, N, K, K_TILES, SHARED_TILES,
                sxt, sxk, swn, swk, sst, ssn, syt, syn,
                R: tl.constexpr, HASH_BN: tl.constexpr, HAS_BIAS: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    j = (pid_n * BN) // HASH_BN                     # the output tile of the hash
    m_ok = offs_m < T
    n_ok = offs_n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for g in range(0, SHARED_TILES):
        a = tl.zeros((BM, BK), dtype=tl.float32)
        for t in range(R):
            i = g * R + t
            s = tl.load(s_ptr + i * sst + j * ssn, mask=i < K_TILES, other=0)
            cols = i * BK + ((offs_k + s) & (BK - 1))   # & is mod for a power of two, also for s < 0
            xt = tl.load(x_ptr + offs_m[:, None] * sxt + cols[None, :] * sxk,
                         mask=m_ok[:, None] & (cols[None, :] < K), other=0.0)
            a += xt.to(tl.float32)
        wt = tl.load(w_ptr + offs_n[None, :] * swn + (g * BK + offs_k)[:, None] * swk,
                     mask=n_ok[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(a, wt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(wt.dtype), wt, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * syt + offs_n[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def kernel_config(T: int, block_n: int, interpret: bool = INTERPRET) -> dict:
    """Tile sizes and launch options for T tokens (BN never exceeds the hash's ``block_n``)."""
    if interpret:                                   # small tiles keep the CPU interpreter fast
        return {"BM": 16, "BN": min(16, block_n)}
    if T <= DECODE_MAX_T:
        return {"BM": 16, "BN": min(32, block_n), "num_warps": 4, "num_stages": 4}
    return {"BM": 64, "BN": min(64, block_n), "num_warps": 4, "num_stages": 3}


def ss1_matmul_triton(x: torch.Tensor, weight: torch.Tensor, shifts: torch.Tensor, bias: torch.Tensor | None,
                      reduction: int, block_k: int, block_n: int, config: dict | None = None) -> torch.Tensor:
    """Same contract as the op (arguments already checked by ``ops.check_inputs``); ``config``
    overrides :func:`kernel_config` keys (tests, benchmarks)."""
    lead, in_features = x.shape[:-1], x.shape[-1]
    out_features = weight.shape[0]
    x2 = x.reshape(-1, in_features)
    T = x2.shape[0]
    y = torch.empty(T, out_features, device=x.device, dtype=x.dtype)
    if T == 0:
        return y.reshape(*lead, out_features)
    cfg = {**kernel_config(T, block_n), **(config or {})}
    BM, BN = cfg.pop("BM"), cfg.pop("BN")
    if BN > block_n or block_n % BN:
        raise ValueError(f"config BN={BN} must be a power of two dividing block_n={block_n}")
    k_tiles = math.ceil(in_features / block_k)
    grid = (triton.cdiv(T, BM), triton.cdiv(out_features, BN))
    _ss1_kernel[grid](
        x2, weight, shifts, bias if bias is not None else weight, y, T, out_features, in_features,
        k_tiles, weight.shape[1] // block_k,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), shifts.stride(0), shifts.stride(1),
        y.stride(0), y.stride(1),
        R=reduction, HASH_BN=block_n, HAS_BIAS=bias is not None, BM=BM, BN=BN, BK=block_k,
        UPCAST=INTERPRET or x.dtype == torch.float32, **({} if INTERPRET else cfg))
    return y.reshape(*lead, out_features)
