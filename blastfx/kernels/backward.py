"""Triton middle of the BLAST backward: one pass over z and gw for all three of its products.

The backward (``blastfx.ops.blast_matmul_backward_reference``) needs ``w = mix(S, z)`` (for dU),
``gz = mix(S^T, gw)`` (for dx and dV) and ``dS[i, j] = sum_t gw_i * z_j``. In plain PyTorch those are
batched matmuls over the rank: r batches of (b x b) @ (b x T) products and a T-long reduction into
b x b outputs, each wrapped in permute copies. On an H100 that made one SmolLM2 distillation step
spend 116 ms in copies and 125 ms in badly shaped batched GEMMs (benchmarks/RESULTS.md, section 4).
Here each program owns a (T-tile, r-tile), reads z and gw once from their native (b, T, r) layout,
writes w and gz, and leaves its fp32 dS partial for one small sum over T-tiles. Checked against
``blastfx.ops.grad_mix_reference``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .forward import INTERPRET


@triton.jit
def _grad_mix_kernel(z_ptr, g_ptr, s_ptr, w_ptr, gz_ptr, ds_ptr, T, R, B_OUT,
                     szj, szt, szr, sgi, sgt, sgr, ssi, ssj, ssr,
                     B_IN: tl.constexpr, BI: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr):
    pid_t = tl.program_id(0)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_r = tl.program_id(1) * BR + tl.arange(0, BR)
    offs_i = tl.arange(0, BI)
    tr_mask = (offs_t[:, None] < T) & (offs_r[None, :] < R)                     # (BT, BR)
    ir_mask = (offs_i[:, None] < B_OUT) & (offs_r[None, :] < R)                 # (BI, BR)
    itr_mask = (offs_i[:, None, None] < B_OUT) & tr_mask[None, :, :]            # (BI, BT, BR)
    g = tl.load(g_ptr + offs_i[:, None, None] * sgi + offs_t[None, :, None] * sgt + offs_r[None, None, :] * sgr,
                mask=itr_mask, other=0.0).to(tl.float32)
    w = tl.zeros((BI, BT, BR), dtype=tl.float32)
    for j in tl.static_range(B_IN):
        z = tl.load(z_ptr + j * szj + offs_t[:, None] * szt + offs_r[None, :] * szr, mask=tr_mask,
                    other=0.0).to(tl.float32)
        s = tl.load(s_ptr + offs_i[:, None] * ssi + j * ssj + offs_r[None, :] * ssr, mask=ir_mask,
                    other=0.0).to(tl.float32)
        w += s[:, None, :] * z[None, :, :]
        gz = tl.sum(s[:, None, :] * g, axis=0)                                   # (BT, BR)
        tl.store(gz_ptr + j * T * R + offs_t[:, None] * R + offs_r[None, :], gz.to(gz_ptr.dtype.element_ty),
                 mask=tr_mask)
        ds = tl.sum(g * z[None, :, :], axis=1)                                   # (BI, BR)
        tl.store(ds_ptr + ((pid_t * B_OUT + offs_i[:, None]) * B_IN + j) * R + offs_r[None, :], ds, mask=ir_mask)
    tl.store(w_ptr + offs_i[:, None, None] * T * R + offs_t[None, :, None] * R + offs_r[None, None, :],
             w.to(w_ptr.dtype.element_ty), mask=itr_mask)


def grad_mix_triton(z: torch.Tensor, gw: torch.Tensor, S: torch.Tensor, BT: int = 32, BR: int = 32):
    """(w, gz, dS) as :func:`blastfx.ops.grad_mix_reference`: z (b_in, T, r), gw (b_out, T, r), S (b_out, b_in, r)."""
    b_in, T, R = z.shape
    b_out = gw.shape[0]
    if gw.shape[1:] != z.shape[1:] or tuple(S.shape) != (b_out, b_in, R):
        raise ValueError(f"grad_mix: z {tuple(z.shape)}, gw {tuple(gw.shape)} and S {tuple(S.shape)} do not fit")
    BI = triton.next_power_of_2(b_out)
    BT = min(BT, max(16, 4096 // (BI * BR)))            # keep the (BI, BT, BR) tiles register-sized
    w = torch.empty(b_out, T, R, device=z.device, dtype=z.dtype)
    gz = torch.empty(b_in, T, R, device=z.device, dtype=gw.dtype)
    n_t = triton.cdiv(T, BT)
    partial = torch.empty(n_t, b_out, b_in, R, device=z.device, dtype=torch.float32)
    grid = (n_t, triton.cdiv(R, BR))
    opts = {} if INTERPRET else {"num_warps": 4}
    _grad_mix_kernel[grid](z, gw, S, w, gz, partial, T, R, b_out, *z.stride(), *gw.stride(), *S.stride(),
                           B_IN=b_in, BI=BI, BT=BT, BR=BR, **opts)
    return w, gz, partial.sum(0).to(S.dtype)
