"""``torch.ops.blastfx.blast_matmul``: the BLAST product ``y = x A^T (+ bias)`` as a PyTorch op.

The plain-PyTorch functions here (:func:`blast_matmul_reference` and its backward) are the single
source of truth for what the op computes; every kernel and compiler lowering is tested against them.

Math (per token): ``z_j = x_j V_j``, ``w_i = sum_j s_ij * z_j``, ``y_i = w_i U_i^T``. The mixing step
is a batched product over the rank dimension, so the (b_out, b_in, T, r) tensor the original BLAST
code builds never exists. The backward saves only the op's inputs and recomputes ``z`` and ``w``.

The backward is differentiable again (Hessian-vector products, gradient penalties, ``gradgradcheck``):
its middle, ``blastfx::blast_grad_mix``, is bilinear in (z, gw) and linear in S, and its own
gradient is written with the same ``mix`` and :func:`mix_grad_S` in plain PyTorch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...cpu_products import bmm, gemm_in_fp32  # noqa: F401  (gemm_in_fp32: where the op's products run)
from ...kernels import scope
from .layout import BlastShape

__all__ = ["blast_matmul", "blast_to_dense", "blast_matmul_reference", "blast_matmul_backward_reference", "mix",
           "mix_grad_S", "grad_mix_reference", "check_inputs"]


def check_inputs(x, U, S, V, bias, out_features) -> BlastShape:
    """Validate the op's arguments; the errors name the offending argument and value."""
    shape = BlastShape.from_factors(U, S, V, out_features=out_features)
    tensors = {"x": x, "U": U, "S": S, "V": V} | ({"bias": bias} if bias is not None else {})
    dtypes = {k: t.dtype for k, t in tensors.items()}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"blast_matmul needs one dtype for all inputs, got {dtypes}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"blast_matmul needs floating-point inputs, got x.dtype={x.dtype}")
    return check_placement("blast_matmul", shape, tensors, x, U, V, bias, out_features)


def check_placement(op: str, shape: BlastShape, tensors: dict, x, U, V, bias, out_features) -> BlastShape:
    """The checks every BLAST op makes of its arguments beyond their dtypes: one device, x's width,
    ``out_features`` and the bias against the factors' geometry. Errors name the argument."""
    devices = {k: t.device for k, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"{op} needs all inputs on one device, got {devices}")
    if x.dim() < 1 or x.shape[-1] > shape.n_pad or x.shape[-1] <= shape.n_pad - shape.q:
        raise ValueError(
            f"x has {x.shape[-1] if x.dim() else 'no'} features but V {tuple(V.shape)} holds "
            f"{shape.b_in} blocks of {shape.q} columns")
    if out_features is not None and not (shape.m_pad - shape.p < out_features <= shape.m_pad):
        raise ValueError(f"out_features={out_features} does not fit U {tuple(U.shape)}")
    if bias is not None and tuple(bias.shape) != (shape.out_features,):
        raise ValueError(f"bias must have shape ({shape.out_features},), got {tuple(bias.shape)}")
    return shape


def _pad_to(t: torch.Tensor, size: int) -> torch.Tensor:
    return t if t.shape[-1] == size else F.pad(t, (0, size - t.shape[-1]))


def _in_blocks(x2: torch.Tensor, b_in: int, q: int) -> torch.Tensor:
    """(T, n) -> (b_in, T, q), zero-padding the last block."""
    return _pad_to(x2, b_in * q).view(x2.shape[0], b_in, q).transpose(0, 1)


def mix(S: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``w_i = sum_j S[i, j] * z_j`` for S (b_out, b_in, r), z (b_in, T, r) -> (b_out, T, r).

    One batched matmul over the rank: (r, b_out, b_in) @ (r, b_in, T). No (b_out, b_in, T, r) temporary.
    """
    return bmm(S.permute(2, 0, 1), z.permute(2, 0, 1)).permute(1, 2, 0)


def mix_grad_S(g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``dS[i, j] = sum_t g_i * z_j`` for g (b_out, T, r), z (b_in, T, r) -> (b_out, b_in, r): the gradient
    of ``mix(S, z)`` with respect to S when its output's gradient is g."""
    return bmm(g.permute(2, 0, 1), z.permute(2, 1, 0)).permute(1, 2, 0)


def blast_matmul_reference(x, U, S, V, bias=None, out_features=None):
    """``x @ to_dense(U, S, V).T + bias`` without forming the dense matrix."""
    shape = BlastShape.from_factors(U, S, V, out_features=out_features)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    z = bmm(_in_blocks(x2, shape.b_in, shape.q), V)                # (b_in, T, r)
    w = mix(S, z)                                                    # (b_out, T, r)
    y = bmm(w, U.transpose(1, 2))                                    # (b_out, T, p)
    y = y.transpose(0, 1).reshape(x2.shape[0], shape.m_pad)[:, : shape.out_features]
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, shape.out_features)


def blast_matmul_backward_reference(grad_y, x, U, S, V, out_features=None, needs=(True,) * 5, kernels=None):
    """Gradients (dx, dU, dS, dV, dbias) of :func:`blast_matmul_reference`; ``None`` where not needed.

    Memory: only the inputs are saved by the forward; ``z`` and ``w`` are recomputed here, each
    (b, T, r), the same size as the activations the forward already produced. ``kernels``: passed to
    ``blastfx::blast_grad_mix`` ("triton" / "reference" on CUDA; ``None``: the options in effect).
    """
    shape = BlastShape.from_factors(U, S, V, out_features=out_features)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    T = x2.shape[0]
    g2 = grad_y.reshape(T, shape.out_features)
    gy = _pad_to(g2, shape.m_pad).view(T, shape.b_out, shape.p).transpose(0, 1)   # (b_out, T, p)
    xb = _in_blocks(x2, shape.b_in, shape.q)                                          # (b_in, T, q)
    need_x, need_U, need_S, need_V, need_b = needs
    z = bmm(xb, V)                                                                     # (b_in, T, r)
    gw = bmm(gy, U)                                                                    # (b_out, T, r)
    w, gz, dS = torch.ops.blastfx.blast_grad_mix(z, gw, S, kernels)
    dU = bmm(gy.transpose(1, 2), w) if need_U else None
    dS = dS if need_S else None
    dx = dV = None
    if need_x or need_V:
        if need_V:
            dV = bmm(xb.transpose(1, 2), gz)
        if need_x:
            dx = bmm(gz, V.transpose(1, 2)).transpose(0, 1).reshape(T, shape.n_pad)[:, :n]
            dx = dx.reshape(x.shape)
    db = g2.sum(0) if need_b else None
    return dx, dU, dS, dV, db


def grad_mix_reference(z: torch.Tensor, gw: torch.Tensor, S: torch.Tensor):
    """The backward's middle: ``w = mix(S, z)`` (for dU), ``gz = mix(S^T, gw)`` (for dx, dV) and
    ``dS[i, j] = sum_t gw_i * z_j``."""
    return mix(S, z), mix(S.transpose(0, 1), gw), mix_grad_S(gw, z)


def grad_mix_backward_reference(z, gw, S, grad_w, grad_gz, grad_dS, needs=(True,) * 3):
    """Gradients (dz, dgw, dS) of :func:`grad_mix_reference` for its outputs' gradients; ``None`` where
    not needed (or where every output's gradient is ``None``). Each output is a mix or a ``mix_grad_S``,
    whose gradients are mixes and ``mix_grad_S`` again:

    * ``w = mix(S, z)``: dz += mix(S^T, grad_w), dS += mix_grad_S(grad_w, z)
    * ``gz = mix(S^T, gw)``: dgw += mix(S, grad_gz), dS += mix_grad_S(gw, grad_gz)
    * ``dS = mix_grad_S(gw, z)``: dgw += mix(grad_dS, z), dz += mix(grad_dS^T, gw)

    Plain PyTorch, so differentiable once more.
    """
    need_z, need_gw, need_S = needs

    def total(*terms):
        terms = [t for t in terms if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    dz = dgw = dS = None
    if need_z:
        dz = total(None if grad_w is None else mix(S.transpose(0, 1), grad_w),
                   None if grad_dS is None else mix(grad_dS.transpose(0, 1), gw))
    if need_gw:
        dgw = total(None if grad_gz is None else mix(S, grad_gz),
                    None if grad_dS is None else mix(grad_dS, z))
    if need_S:
        dS = total(None if grad_w is None else mix_grad_S(grad_w, z),
                   None if grad_gz is None else mix_grad_S(gw, grad_gz))
    return dz, dgw, dS


@torch.library.custom_op("blastfx::blast_grad_mix", mutates_args=())
def _grad_mix_op(z: torch.Tensor, gw: torch.Tensor, S: torch.Tensor,
                 kernels: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An op of its own so that CUDA runs one Triton pass over z and gw (``blastfx.kernels.backward``)
    instead of rank-batched matmuls and their permute copies, and compiled graphs keep it opaque.
    ``kernels`` ("triton" / "reference", ``None``: the options in effect) picks the CUDA kernel; a
    compiled graph bound to kernel options passes them here, so its backward keeps its choice."""
    scope.resolve_kernels(kernels)                  # validates
    return tuple(t.contiguous() for t in grad_mix_reference(z, gw, S))


@_grad_mix_op.register_fake
def _(z, gw, S, kernels=None):
    scope.resolve_kernels(kernels)
    return z.new_empty(gw.shape[0], *z.shape[1:]), gw.new_empty(z.shape[0], *gw.shape[1:]), torch.empty_like(S)


def _grad_mix_setup_context(ctx, inputs, output):
    z, gw, S, _kernels = inputs
    ctx.save_for_backward(z, gw, S)


def _grad_mix_backward(ctx, grad_w, grad_gz, grad_dS):
    z, gw, S = ctx.saved_tensors
    return (*grad_mix_backward_reference(z, gw, S, grad_w, grad_gz, grad_dS, tuple(ctx.needs_input_grad[:3])), None)


_grad_mix_op.register_autograd(_grad_mix_backward, setup_context=_grad_mix_setup_context)


@torch.library.custom_op("blastfx::blast_matmul", mutates_args=())
def _blast_matmul_op(x: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor,
                     bias: Optional[torch.Tensor] = None, out_features: Optional[int] = None) -> torch.Tensor:
    check_inputs(x, U, S, V, bias, out_features)
    return blast_matmul_reference(x, U, S, V, bias, out_features).contiguous()


@_blast_matmul_op.register_fake
def _(x, U, S, V, bias=None, out_features=None):
    shape = check_inputs(x, U, S, V, bias, out_features)
    return x.new_empty(*x.shape[:-1], shape.out_features)


def _setup_context(ctx, inputs, output):
    x, U, S, V, bias, out_features = inputs
    ctx.save_for_backward(x, U, S, V)
    ctx.out_features = out_features
    ctx.has_bias = bias is not None
    ctx.kernels = scope.backward_kernels()      # taken where the forward runs (see kernels.scope)


def _backward(ctx, grad_y):
    x, U, S, V = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:4]) + (ctx.has_bias and ctx.needs_input_grad[4],)
    dx, dU, dS, dV, db = blast_matmul_backward_reference(grad_y, x, U, S, V, ctx.out_features, needs,
                                                          ctx.kernels)
    return dx, dU, dS, dV, db, None


_blast_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def blast_matmul(x, U, S, V, bias=None, out_features=None):
    """``y = x A^T + bias`` for the BLAST matrix A given by factors U (b_out, p, r), S (b_out, b_in, r),
    V (b_in, q, r). ``out_features`` trims padded output rows (default ``b_out * p``)."""
    return torch.ops.blastfx.blast_matmul(x, U, S, V, bias, out_features)


def blast_to_dense(U, S, V, out_features=None, in_features=None):
    """The dense (out_features, in_features) matrix the factors represent (reference math)."""
    shape = BlastShape.from_factors(U, S, V, out_features, in_features)
    US = U.unsqueeze(1) * S.unsqueeze(2)                                    # (b_out, b_in, p, r)
    blocks = torch.matmul(US, V.transpose(1, 2).unsqueeze(0))                # (b_out, b_in, p, q)
    dense = blocks.permute(0, 2, 1, 3).reshape(shape.m_pad, shape.n_pad)
    return dense[: shape.out_features, : shape.in_features]
