"""Fused Triton forward of ``blast_matmul``: two kernels, no (b_out, b_in, T, r) tensor.

1. ``_xv_mix_kernel``: for a (T-tile, r-tile) and a range of block-columns j, compute
   ``z_j = x_j V_j`` on tensor cores and immediately mix it into all block-rows,
   ``w_i += s_ij * z_j``, in a (b_out, BT, BR) register accumulator. ``z`` never leaves registers.
   Small T (decode): the block-columns are split over programs (SPLIT_J) so that the grid fills
   the GPU while U, V, S are each streamed from memory once; partial ``w`` are added atomically in fp32.
2. ``_wu_kernel``: ``y_i = w_i U_i^T`` as a tiled GEMM whose epilogue adds the bias, casts to the
   output dtype, drops padded rows and stores straight into the (T, m) layout.

Under ``TRITON_INTERPRET=1`` (CPU tests) operands are upcast to fp32 before ``tl.dot``: the
interpreter's bf16 dot is wrong.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..layout import BlastShape

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DECODE_MAX_T = 16


@triton.jit
def _xv_mix_kernel(x_ptr, v_ptr, s_ptr, w_ptr, T, N, Q, R, B_IN,
                   sxt, sxn, svj, svq, svr, ssi, ssj, ssr, swi, swt, swr,
                   B_OUT: tl.constexpr, B_OUT_P2: tl.constexpr, J_PER_PROG: tl.constexpr,
                   BT: tl.constexpr, BR: tl.constexpr, BQ: tl.constexpr,
                   UPCAST: tl.constexpr, ATOMIC: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_j = tl.program_id(2)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_r = pid_r * BR + tl.arange(0, BR)
    offs_i = tl.arange(0, B_OUT_P2)
    acc = tl.zeros((B_OUT_P2, BT, BR), dtype=tl.float32)
    for jj in range(J_PER_PROG):
        j = pid_j * J_PER_PROG + jj
        q_lim = tl.where(j < B_IN, Q, 0)          # a j past the last block reads nothing
        z = tl.zeros((BT, BR), dtype=tl.float32)
        for c0 in range(0, Q, BQ):
            offs_c = c0 + tl.arange(0, BQ)
            col = j * Q + offs_c
            xm = (offs_t[:, None] < T) & (offs_c[None, :] < q_lim) & (col[None, :] < N)
            xt = tl.load(x_ptr + offs_t[:, None] * sxt + col[None, :] * sxn, mask=xm, other=0.0)
            vm = (offs_c[:, None] < q_lim) & (offs_r[None, :] < R)
            vt = tl.load(v_ptr + j * svj + offs_c[:, None] * svq + offs_r[None, :] * svr, mask=vm, other=0.0)
            if UPCAST:   # fp32 math: IEEE dots (a GPU would use TF32 by default)
                z = tl.dot(xt.to(tl.float32), vt.to(tl.float32), z, input_precision="ieee")
            else:
                z = tl.dot(xt, vt, z)
        sm = (offs_i[:, None] < B_OUT) & (offs_r[None, :] < tl.where(j < B_IN, R, 0))
        s = tl.load(s_ptr + offs_i[:, None] * ssi + j * ssj + offs_r[None, :] * ssr, mask=sm, other=0.0)
        acc += s.to(tl.float32)[:, None, :] * z[None, :, :]
    w_ptrs = w_ptr + offs_i[:, None, None] * swi + offs_t[None, :, None] * swt + offs_r[None, None, :] * swr
    wm = (offs_i[:, None, None] < B_OUT) & (offs_t[None, :, None] < T) & (offs_r[None, None, :] < R)
    if ATOMIC:
        tl.atomic_add(w_ptrs, acc, mask=wm)
    else:
        tl.store(w_ptrs, acc.to(w_ptr.dtype.element_ty), mask=wm)


@triton.jit
def _wu_kernel(w_ptr, u_ptr, b_ptr, y_ptr, T, M, P, R,
               swi, swt, swr, sui, sup, sur, syt, sym,
               HAS_BIAS: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr, BR: tl.constexpr,
               UPCAST: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_p = tl.program_id(1)
    i = tl.program_id(2)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_p = pid_p * BP + tl.arange(0, BP)
    acc = tl.zeros((BT, BP), dtype=tl.float32)
    for k0 in range(0, R, BR):
        offs_k = k0 + tl.arange(0, BR)
        wt = tl.load(w_ptr + i * swi + offs_t[:, None] * swt + offs_k[None, :] * swr,
                     mask=(offs_t[:, None] < T) & (offs_k[None, :] < R), other=0.0)
        ut = tl.load(u_ptr + i * sui + offs_p[None, :] * sup + offs_k[:, None] * sur,
                     mask=(offs_p[None, :] < P) & (offs_k[:, None] < R), other=0.0)
        if UPCAST:
            acc = tl.dot(wt.to(tl.float32), ut.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(wt.to(ut.dtype), ut, acc)
    rows = i * P + offs_p
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=(offs_p < P) & (rows < M), other=0.0).to(tl.float32)[None, :]
    ym = (offs_t[:, None] < T) & (offs_p[None, :] < P) & (rows[None, :] < M)
    tl.store(y_ptr + offs_t[:, None] * syt + rows[None, :] * sym, acc.to(y_ptr.dtype.element_ty), mask=ym)


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def launch_config(T: int, shape: BlastShape, device) -> dict:
    """Tile sizes and block-column split for a token count (decode vs prefill dispatch)."""
    b_out_p2 = triton.next_power_of_2(shape.b_out)
    if T <= DECODE_MAX_T:   # decode: split block-columns over programs to fill the GPU
        BT, BR = 16, 64 if b_out_p2 <= 4 else 32
        r_tiles = triton.cdiv(shape.rank, BR)
        split = max(1, min(shape.b_in, _num_sms(device) // max(r_tiles, 1)))
        return dict(BT=BT, BR=BR, BQ=64, J_PER_PROG=triton.cdiv(shape.b_in, split), BP=64, BRU=64)
    BT = 64 if b_out_p2 <= 4 else 32
    BR = 64 if b_out_p2 <= 4 else 32
    return dict(BT=BT, BR=BR, BQ=64, J_PER_PROG=shape.b_in, BP=128, BRU=64)


def blast_matmul_triton(x, U, S, V, bias=None, out_features=None, config: dict | None = None):
    """The fused forward; same contract as :func:`blastfx.ops.blast_matmul_reference`."""
    shape = BlastShape.from_factors(U, S, V, out_features=out_features)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    T, n = x2.shape
    cfg = {**launch_config(T, shape, x.device), **(config or {})}
    upcast = INTERPRET or x.dtype == torch.float32
    if INTERPRET:
        cfg = {**cfg, "BQ": min(cfg["BQ"], 16), "BRU": min(cfg["BRU"], 16)}
    split = triton.cdiv(shape.b_in, cfg["J_PER_PROG"])
    atomic = split > 1
    w = (torch.zeros if atomic else torch.empty)(
        shape.b_out, T, shape.rank, device=x.device, dtype=torch.float32 if atomic else x.dtype)
    grid1 = (triton.cdiv(T, cfg["BT"]), triton.cdiv(shape.rank, cfg["BR"]), split)
    _xv_mix_kernel[grid1](x2, V, S, w, T, n, shape.q, shape.rank, shape.b_in,
                          x2.stride(0), x2.stride(1), *V.stride(), *S.stride(), *w.stride(),
                          B_OUT=shape.b_out, B_OUT_P2=triton.next_power_of_2(shape.b_out),
                          J_PER_PROG=cfg["J_PER_PROG"], BT=cfg["BT"], BR=cfg["BR"], BQ=cfg["BQ"],
                          UPCAST=upcast, ATOMIC=atomic)
    y = torch.empty(T, shape.out_features, device=x.device, dtype=x.dtype)
    BT2 = max(16, min(64, triton.next_power_of_2(T)))
    grid2 = (triton.cdiv(T, BT2), triton.cdiv(shape.p, cfg["BP"]), shape.b_out)
    _wu_kernel[grid2](w, U, bias if bias is not None else y, y, T, shape.out_features, shape.p, shape.rank,
                      *w.stride(), *U.stride(), y.stride(0), y.stride(1),
                      HAS_BIAS=bias is not None, BT=BT2, BP=cfg["BP"], BR=cfg["BRU"], UPCAST=upcast)
    return y.reshape(*lead, shape.out_features)
