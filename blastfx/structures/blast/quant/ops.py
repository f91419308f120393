"""``torch.ops.blastfx.blast_matmul_quantized``: the BLAST product with U and V stored quantized.

The reference (:func:`blast_matmul_quantized_reference`) is the source of truth: dequantize U and V
(:mod:`.formats`) into the activation dtype, then the plain BLAST reference
(:func:`blastfx.structures.blast.ops.blast_matmul_reference`). On CUDA the kernels read the codes
(int8, float8, or packed int4 unpacked in registers) and apply the scales there: the decode GEMV
(:mod:`blastfx.kernels.gemv`) up to 4 tokens, the fused tensor-core kernels beyond, each timed against
a float copy of the factors run on the float paths (:mod:`blastfx.kernels.forward`).

Autograd gives gradients for x, S and the bias (LoRA adapters over a quantized layer, activations
flowing through it); the codes and scales get none: they are a fixed rounding of a fitted layer.
"""
from __future__ import annotations

from typing import Optional

import torch

from ....kernels import scope
from ..layout import BlastShape
from ..ops import blast_matmul_backward_reference, blast_matmul_reference, check_placement
from . import formats

__all__ = ["blast_matmul_quantized", "blast_matmul_quantized_reference", "check_quantized_inputs", "dequantized",
           "quantized_shape"]


def quantized_shape(U, S, V, out_features=None) -> BlastShape:
    """The geometry of quantized factors: the format from the codes' dtype, r from S (packed codes
    do not say it), each code tensor's last dimension checked against r. ``ValueError`` naming the
    tensor and both lengths otherwise."""
    if U.dtype != V.dtype:
        raise ValueError(f"blast_matmul_quantized needs U and V in one format, got U.dtype={U.dtype}, "
                         f"V.dtype={V.dtype}")
    fmt = formats.of_storage(U.dtype)
    if S.dim() != 3:
        raise ValueError(f"S must be 3-D (b_out, b_in, r), got shape {tuple(S.shape)}")
    r = S.shape[-1]
    logical = []
    for name, codes in (("U", U), ("V", V)):
        if codes.dim() != 3 or codes.shape[-1] != fmt.stored_length(r):
            raise ValueError(f"{fmt.name} codes {name} of shape {tuple(codes.shape)} do not match r={r} (S's last "
                             f"dimension): {name} must be 3-D with last dimension {fmt.stored_length(r)}"
                             + (f" (r packed {fmt.per_element} per byte)" if fmt.packed else ""))
        logical.append(torch.empty(*codes.shape[:-1], r, device="meta"))
    return BlastShape.from_factors(logical[0], S, logical[1], out_features=out_features)


def check_quantized_inputs(x, U, U_scale, S, V, V_scale, bias, out_features) -> BlastShape:
    """Validate the op's arguments; the errors name the offending argument and value."""
    shape = quantized_shape(U, S, V, out_features)
    for name, scale, want in (("U_scale", U_scale, (shape.b_out, shape.p)), ("V_scale", V_scale, (shape.b_in, shape.rank))):
        if tuple(scale.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(scale.shape)}")
        if not scale.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point, got {name}.dtype={scale.dtype}")
    floats = {"x": x, "S": S} | ({"bias": bias} if bias is not None else {})
    dtypes = {k: t.dtype for k, t in floats.items()}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"blast_matmul_quantized needs one dtype for x, S and bias, got {dtypes}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"blast_matmul_quantized needs floating-point inputs, got x.dtype={x.dtype}")
    tensors = floats | {"U": U, "U_scale": U_scale, "V": V, "V_scale": V_scale}
    return check_placement("blast_matmul_quantized", shape, tensors, x, U, V, bias, out_features)


def dequantized(U, U_scale, V, V_scale, dtype):
    """(U, V) in ``dtype``: codes times scales (computed in float32, or float64 for float64); r, which
    packed codes need, is ``V_scale``'s last dimension."""
    rank = V_scale.shape[-1]
    return formats.dequantize_u(U, U_scale, dtype, rank=rank), formats.dequantize_v(V, V_scale, dtype)


def blast_matmul_quantized_reference(x, U, U_scale, S, V, V_scale, bias=None, out_features=None):
    """``x @ A^T + bias`` for the BLAST matrix of the dequantized factors, in x's dtype."""
    Ud, Vd = dequantized(U, U_scale, V, V_scale, x.dtype)
    return blast_matmul_reference(x, Ud, S, Vd, bias, out_features)


@torch.library.custom_op("blastfx::blast_matmul_quantized", mutates_args=())
def _quantized_op(x: torch.Tensor, U: torch.Tensor, U_scale: torch.Tensor, S: torch.Tensor, V: torch.Tensor,
                  V_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  out_features: Optional[int] = None) -> torch.Tensor:
    check_quantized_inputs(x, U, U_scale, S, V, V_scale, bias, out_features)
    return blast_matmul_quantized_reference(x, U, U_scale, S, V, V_scale, bias, out_features).contiguous()


@_quantized_op.register_fake
def _(x, U, U_scale, S, V, V_scale, bias=None, out_features=None):
    shape = check_quantized_inputs(x, U, U_scale, S, V, V_scale, bias, out_features)
    return x.new_empty(*x.shape[:-1], shape.out_features)


def _setup_context(ctx, inputs, output):
    x, U, U_scale, S, V, V_scale, bias, out_features = inputs
    ctx.save_for_backward(x, U, U_scale, S, V, V_scale)
    ctx.out_features = out_features
    ctx.has_bias = bias is not None
    ctx.kernels = scope.backward_kernels()


def _backward(ctx, grad_y):
    x, U, U_scale, S, V, V_scale = ctx.saved_tensors
    need = ctx.needs_input_grad
    Ud, Vd = dequantized(U, U_scale, V, V_scale, x.dtype)
    dx, _, dS, _, db = blast_matmul_backward_reference(
        grad_y, x, Ud, S, Vd, ctx.out_features, (need[0], False, need[3], False, ctx.has_bias and need[6]),
        ctx.kernels)
    return dx, None, None, dS, None, None, db, None


_quantized_op.register_autograd(_backward, setup_context=_setup_context)


def blast_matmul_quantized(x, U, U_scale, S, V, V_scale, bias=None, out_features=None):
    """``y = x A^T + bias`` for the BLAST matrix of quantized factors: codes U (b_out, p, r) with
    ``U_scale`` (b_out, p), S (b_out, b_in, r) in x's dtype, codes V (b_in, q, r) with ``V_scale``
    (b_in, r); int4 codes are packed, U (b_out, p, ceil(r/2)) and V (b_in, q, ceil(r/2)) of
    ``torch.uint8`` (:mod:`.formats`). ``out_features`` trims padded output rows (default ``b_out * p``)."""
    return torch.ops.blastfx.blast_matmul_quantized(x, U, U_scale, S, V, V_scale, bias, out_features)
