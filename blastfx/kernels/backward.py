"""Triton middle of the BLAST backward: one pass over z and gw for all three of its products.

The backward (``blastfx.structures.blast.ops.blast_matmul_backward_reference``) needs ``w = mix(S, z)`` (for dU),
``gz = mix(S^T, gw)`` (for dx and dV) and ``dS[i, j] = sum_t gw_i * z_j``. In plain PyTorch those are
batched matmuls over the rank: r batches of (b x b) @ (b x T) products and a T-long reduction into
b x b outputs, each wrapped in permute copies. On an H100 that made one SmolLM2 distillation step
spend 116 ms in copies and 125 ms in badly shaped batched GEMMs (``benchmarks/train_step_profile.py``).
Here each program owns an r-slice and a range of T, reads z and gw once from their native (b, T, r)
layout, writes w and gz, keeps dS's products in registers and leaves one fp32 dS partial for a small
sum over T-ranges. Checked against ``blastfx.structures.blast.ops.grad_mix_reference``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .forward import INTERPRET


@triton.jit
def _grad_mix_stream_kernel(z_ptr, g_ptr, s_ptr, w_ptr, gz_ptr, ds_ptr, T, R, B_OUT, B_IN, T_PER,
                            szj, szt, szr, sgi, sgt, sgr, ssi, ssj, ssr,
                            BI: tl.constexpr, BJ: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr):
    """Each program streams a T-range of one r-slice and keeps dS's products in registers as
    (BI, BJ, BT, BR) fp32, so the reduction over T (a cross-thread one) runs once, not per tile."""
    pid_s = tl.program_id(0)
    offs_r = tl.program_id(1) * BR + tl.arange(0, BR)
    offs_i = tl.arange(0, BI)
    offs_j = tl.arange(0, BJ)
    i3 = offs_i[:, None, None]
    j3 = offs_j[:, None, None]
    r3 = offs_r[None, None, :]
    s_mask = (offs_i[:, None, None] < B_OUT) & (offs_j[None, :, None] < B_IN) & (offs_r[None, None, :] < R)
    s = tl.load(s_ptr + offs_i[:, None, None] * ssi + offs_j[None, :, None] * ssj + offs_r[None, None, :] * ssr,
                mask=s_mask, other=0.0).to(tl.float32)[:, :, None, :]                  # (BI, BJ, 1, BR)
    acc = tl.zeros((BI, BJ, BT, BR), dtype=tl.float32)
    t_start = pid_s * T_PER
    t_end = tl.minimum(t_start + T_PER, T)
    for t0 in range(t_start, t_end, BT):
        t3 = t0 + tl.arange(0, BT)[None, :, None]
        tr = (t3 < t_end) & (r3 < R)
        z = tl.load(z_ptr + j3 * szj + t3 * szt + r3 * szr, mask=(j3 < B_IN) & tr, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + i3 * sgi + t3 * sgt + r3 * sgr, mask=(i3 < B_OUT) & tr, other=0.0).to(tl.float32)
        w = tl.sum(s * z[None, :, :, :], axis=1)                                        # (BI, BT, BR)
        gz = tl.sum(s * g[:, None, :, :], axis=0)                                       # (BJ, BT, BR)
        acc += g[:, None, :, :] * z[None, :, :, :]
        tl.store(w_ptr + (i3 * T + t3) * R + r3, w.to(w_ptr.dtype.element_ty), mask=(i3 < B_OUT) & tr)
        tl.store(gz_ptr + (j3 * T + t3) * R + r3, gz.to(gz_ptr.dtype.element_ty), mask=(j3 < B_IN) & tr)
    ds = tl.sum(acc, axis=2)                                                            # (BI, BJ, BR)
    tl.store(ds_ptr + ((pid_s * B_OUT + offs_i[:, None, None]) * B_IN + offs_j[None, :, None]) * R
             + offs_r[None, None, :], ds, mask=s_mask)


# Up to this many block pairs (b_out * b_in, padded to powers of two) the CUDA op runs this kernel:
# 3.9-6.9x the reference on an H100 at b = 4 (benchmarks/grad_mix_speed.py). Above
# it the register-held products shrink to one row of T per tile, and the reference's batched GEMMs
# win (an earlier one-tile-per-program kernel ran b = 16 at 0.36x the reference).
STREAM_MAX_BLOCK_PAIRS = 16


def kernel_beats_reference(b_out: int, b_in: int) -> bool:
    """Whether the CUDA op should run :func:`grad_mix_triton` for these block counts (see above)."""
    return triton.next_power_of_2(b_out) * triton.next_power_of_2(b_in) <= STREAM_MAX_BLOCK_PAIRS


def grad_mix_triton(z: torch.Tensor, gw: torch.Tensor, S: torch.Tensor):
    """(w, gz, dS) as :func:`blastfx.structures.blast.ops.grad_mix_reference`: z (b_in, T, r), gw (b_out, T, r), S (b_out, b_in, r).
    Correct for any b; fast for b_out * b_in <= STREAM_MAX_BLOCK_PAIRS (see there)."""
    b_in, T, R = z.shape
    b_out = gw.shape[0]
    if gw.shape[1:] != z.shape[1:] or tuple(S.shape) != (b_out, b_in, R):
        raise ValueError(f"grad_mix: z {tuple(z.shape)}, gw {tuple(gw.shape)} and S {tuple(S.shape)} do not fit")
    if T == 0 or R == 0:                                # an empty batch: nothing to launch
        return z.new_empty(b_out, T, R), gw.new_empty(b_in, T, R), torch.zeros_like(S)
    BI, BJ = triton.next_power_of_2(b_out), triton.next_power_of_2(b_in)
    BR = 64
    BT = max(1, min(8, 8192 // (BI * BJ * BR)))          # (BI, BJ, BT, BR) fp32 products stay in registers
    n_r = triton.cdiv(R, BR)
    programs = 4 * (torch.cuda.get_device_properties(z.device).multi_processor_count if z.is_cuda else 1)
    n_split = max(1, min(triton.cdiv(T, BT), triton.cdiv(programs, n_r)))
    t_per = triton.cdiv(triton.cdiv(T, n_split), BT) * BT
    n_split = triton.cdiv(T, t_per)
    w = torch.empty(b_out, T, R, device=z.device, dtype=z.dtype)
    gz = torch.empty(b_in, T, R, device=z.device, dtype=gw.dtype)
    partial = torch.empty(n_split, b_out, b_in, R, device=z.device, dtype=torch.float32)
    opts = {} if INTERPRET else {"num_warps": 8}
    _grad_mix_stream_kernel[(n_split, n_r)](z, gw, S, w, gz, partial, T, R, b_out, b_in, t_per,
                                            *z.stride(), *gw.stride(), *S.stride(),
                                            BI=BI, BJ=BJ, BT=BT, BR=BR, **opts)
    return w, gz, partial.sum(0).to(S.dtype)
