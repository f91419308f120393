"""``torch.ops.blastfx.ss1_matmul``: the SS1 product ``y = x W^T (+ bias)`` as a PyTorch op.

The plain-PyTorch functions here are the source of truth for what SS1 computes; the Triton kernel
(:mod:`.kernel`) is tested against :func:`ss1_matmul_reference`.

The tie pattern is one gather: ``W = shared.gather(slot)`` per output tile (:func:`ss1_to_dense`),
and its adjoint one scatter-add (:func:`ss1_fold`), which is also what the backward and the
projections need: the gradient of a shared slot is the sum of the dense gradients tied to it. The
reference either builds the dense matrix (one gather, one GEMM: cheapest for many tokens) or folds
the input onto the shared slots per output tile, as the kernel does (cheapest for few tokens); both
are exact and tested against an entry-by-entry construction.

The op takes the small (k_tiles, n_tiles) shift table rather than a layout object, so it has a plain
schema that ``torch.compile`` can trace and a fake (meta) implementation; the slot index is derived
from the table per call (elementwise, ``n_tiles x in_features``). On CUDA the op runs the Triton
kernel (unless ``blastfx.kernels.options(kernels="reference")`` is in effect), elsewhere the
reference. The backward is plain PyTorch (a GEMM each for dx and the dense weight gradient, then the
fold), so it is differentiable again.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .layout import SS1Layout, _power_of_two, slots_from_shifts

__all__ = ["ss1_matmul", "ss1_matmul_reference", "ss1_to_dense", "ss1_fold", "check_inputs"]


def check_inputs(x, weight, shifts, bias, reduction, block_k, block_n, vec: int = 1) -> tuple[int, int]:
    """Validate the op's arguments; errors name the argument and its value. Returns (out, in).
    Shift values are not checked against ``vec`` (that would sync a GPU)."""
    _power_of_two("reduction", reduction)
    _power_of_two("block_k", block_k, minimum=16)
    _power_of_two("block_n", block_n, minimum=16)
    _power_of_two("vec", vec)
    if vec > block_k:
        raise ValueError(f"vec={vec} must not exceed block_k={block_k}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor with a feature dimension, got {getattr(x, 'shape', x)!r}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"ss1_matmul needs floating-point inputs, got x.dtype={x.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, shared_in_features), got shape {tuple(weight.shape)}")
    if shifts.dim() != 2 or shifts.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"shifts must be a 2-D int64/int32 tensor (k_tiles, n_tiles), got shape "
                         f"{tuple(shifts.shape)} dtype {shifts.dtype}")
    tensors = {"x": x, "weight": weight} | ({"bias": bias} if bias is not None else {})
    dtypes = {k: t.dtype for k, t in tensors.items()}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"ss1_matmul needs one dtype for x, weight and bias, got {dtypes}")
    devices = {k: t.device for k, t in (tensors | {"shifts": shifts}).items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"ss1_matmul needs all inputs on one device, got {devices}")
    out_features, in_features = weight.shape[0], x.shape[-1]
    k_tiles = math.ceil(in_features / block_k)
    n_tiles = math.ceil(out_features / block_n)
    if in_features < 1 or out_features < 1:
        raise ValueError(f"empty feature dimension: x has {in_features} features, weight {out_features} rows")
    if tuple(shifts.shape) != (k_tiles, n_tiles):
        raise ValueError(f"shifts has shape {tuple(shifts.shape)}, but {in_features} input features and "
                         f"{out_features} outputs with block_k={block_k}, block_n={block_n} need "
                         f"({k_tiles}, {n_tiles})")
    shared_in = math.ceil(k_tiles / reduction) * block_k
    if weight.shape[1] != shared_in:
        raise ValueError(f"weight has {weight.shape[1]} columns, but {in_features} input features with "
                         f"reduction={reduction}, block_k={block_k} share {shared_in}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    return out_features, in_features


def _check_layout(layout: SS1Layout, weight: torch.Tensor, in_features: int | None = None):
    if not isinstance(layout, SS1Layout):
        raise ValueError(f"layout must be an SS1Layout, got {type(layout).__name__}")
    if tuple(weight.shape) != layout.weight_shape:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, but {layout} stores {layout.weight_shape}")
    if in_features is not None and in_features != layout.in_features:
        raise ValueError(f"x has {in_features} features, but the layout has in_features={layout.in_features}")


def _tiled(t: torch.Tensor, n_tiles: int, block_n: int) -> torch.Tensor:
    """(out, c) -> (n_tiles, block_n, c), zero rows padding the last output tile."""
    pad = n_tiles * block_n - t.shape[0]
    if pad:
        t = F.pad(t, (0, 0, 0, pad))
    return t.reshape(n_tiles, block_n, t.shape[-1])


def _expand(weight, shifts, in_features, reduction, block_k, block_n) -> torch.Tensor:
    out_features = weight.shape[0]
    n_tiles = shifts.shape[1]
    slots = slots_from_shifts(shifts, in_features, reduction, block_k)            # (n_tiles, in)
    w = _tiled(weight, n_tiles, block_n)
    dense = w.gather(2, slots[:, None, :].expand(n_tiles, block_n, in_features))
    return dense.reshape(n_tiles * block_n, in_features)[:out_features]


def _fold(dense, shifts, reduction, block_k, block_n, shared_in) -> torch.Tensor:
    out_features, in_features = dense.shape
    n_tiles = shifts.shape[1]
    slots = slots_from_shifts(shifts, in_features, reduction, block_k)
    d = _tiled(dense, n_tiles, block_n)
    folded = d.new_zeros(n_tiles, block_n, shared_in).scatter_add(
        2, slots[:, None, :].expand(n_tiles, block_n, in_features), d)
    return folded.reshape(n_tiles * block_n, shared_in)[:out_features]


def ss1_to_dense(weight: torch.Tensor, layout: SS1Layout, shifts: torch.Tensor | None = None) -> torch.Tensor:
    """The dense (out_features, in_features) matrix that the shared ``weight`` represents."""
    _check_layout(layout, weight)
    shifts = layout.shifts(weight.device) if shifts is None else shifts
    return _expand(weight, shifts, layout.in_features, layout.reduction, layout.block_k, layout.block_n)


def ss1_fold(dense: torch.Tensor, layout: SS1Layout, shifts: torch.Tensor | None = None) -> torch.Tensor:
    """The adjoint of :func:`ss1_to_dense`: each shared slot gets the sum of the dense entries tied to
    it. ``ss1_fold(ones)`` counts the ties; ``ss1_fold(grad_W)`` is the shared weight's gradient."""
    if tuple(dense.shape) != (layout.out_features, layout.in_features):
        raise ValueError(f"dense has shape {tuple(dense.shape)}, expected "
                         f"({layout.out_features}, {layout.in_features}) for {layout}")
    shifts = layout.shifts(dense.device) if shifts is None else shifts
    return _fold(dense, shifts, layout.reduction, layout.block_k, layout.block_n, layout.shared_in_features)


def _reference(x, weight, shifts, bias, reduction, block_k, block_n, form: str | None = None) -> torch.Tensor:
    """Two exact forms of the same product; ``form=None`` takes the one that touches less memory.

    * "dense": ``x W^T`` with W gathered from the shared weight (out x in entries).
    * "folded": per output tile ``j``, the input folded onto the shared slots, ``z_j = fold_j(x)``
      (each slot the sum of the input features tied to it: the kernel's rotated-tile sum), then
      ``y_j = z_j shared_j^T``; (n_tiles, T, shared_in) entries, far fewer than the dense weight when
      T is small (decode).
    """
    out_features, in_features = weight.shape[0], x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    T, n_tiles, shared_in = x2.shape[0], shifts.shape[1], weight.shape[1]
    if form is None:
        form = "folded" if T * n_tiles * shared_in < out_features * in_features else "dense"
    if form == "dense":
        return F.linear(x, _expand(weight, shifts, in_features, reduction, block_k, block_n), bias)
    if form != "folded":
        raise ValueError(f"form must be 'dense', 'folded' or None, got {form!r}")
    slots = slots_from_shifts(shifts, in_features, reduction, block_k)                # (n_tiles, in)
    z = x2.new_zeros(n_tiles, T, shared_in).scatter_add_(
        2, slots[:, None, :].expand(n_tiles, T, in_features), x2.expand(n_tiles, T, in_features))
    y = torch.bmm(z, _tiled(weight, n_tiles, block_n).transpose(1, 2))               # (n_tiles, T, block_n)
    y = y.transpose(0, 1).reshape(T, n_tiles * block_n)[:, :out_features]
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, out_features)


def ss1_matmul_reference(x: torch.Tensor, weight: torch.Tensor, layout: SS1Layout,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ ss1_to_dense(weight, layout).T + bias`` for ``x`` of any leading shape (plain PyTorch)."""
    _check_layout(layout, weight, x.shape[-1])
    shifts = layout.shifts(weight.device)
    check_inputs(x, weight, shifts, bias, layout.reduction, layout.block_k, layout.block_n)
    return _reference(x, weight, shifts, bias, layout.reduction, layout.block_k, layout.block_n)


def ss1_matmul(x: torch.Tensor, weight: torch.Tensor, layout: SS1Layout, bias: torch.Tensor | None = None,
               shifts: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x W^T + bias`` through ``torch.ops.blastfx.ss1_matmul`` (Triton on CUDA, the reference
    elsewhere). ``shifts``: the layout's table already on ``weight``'s device (a layer keeps it as a
    buffer, so no table is built per call)."""
    _check_layout(layout, weight, x.shape[-1])
    shifts = layout.shifts(weight.device) if shifts is None else shifts
    return torch.ops.blastfx.ss1_matmul(x, weight, shifts, bias, layout.reduction, layout.block_k, layout.block_n,
                                        layout.vec)


# ---------------------------------------------------------------------------------------------
# The op


@torch.library.custom_op("blastfx::ss1_matmul", mutates_args=())
def _ss1_matmul_op(x: torch.Tensor, weight: torch.Tensor, shifts: torch.Tensor, bias: Optional[torch.Tensor],
                   reduction: int, block_k: int, block_n: int, vec: int = 1) -> torch.Tensor:
    """``vec``: a promise that every shift is a multiple of it (a layout's table is, for its own
    ``vec``), so a kernel may load rotated input tiles in aligned vectors of ``vec`` elements; 1
    promises nothing. The reference ignores it."""
    check_inputs(x, weight, shifts, bias, reduction, block_k, block_n, vec)
    return _reference(x, weight, shifts, bias, reduction, block_k, block_n).contiguous()


@_ss1_matmul_op.register_fake
def _(x, weight, shifts, bias, reduction, block_k, block_n, vec=1):
    out_features, _ = check_inputs(x, weight, shifts, bias, reduction, block_k, block_n, vec)
    return x.new_empty(*x.shape[:-1], out_features)


def _setup_context(ctx, inputs, output):
    x, weight, shifts, bias, reduction, block_k, block_n = inputs[:7]
    ctx.save_for_backward(x, weight, shifts)
    ctx.geometry = (reduction, block_k, block_n)
    ctx.has_bias = bias is not None


def backward_reference(grad_y, x, weight, shifts, reduction, block_k, block_n, needs=(True, True, True)):
    """Gradients (dx, dweight, dbias) of the op; ``None`` where not needed. Plain PyTorch."""
    out_features, in_features = weight.shape[0], x.shape[-1]
    g2 = grad_y.reshape(-1, out_features)
    x2 = x.reshape(-1, in_features)
    dx = dw = db = None
    if needs[0]:
        dense = _expand(weight, shifts, in_features, reduction, block_k, block_n)
        dx = (g2 @ dense).reshape(x.shape)
    if needs[1]:
        dw = _fold(g2.t() @ x2, shifts, reduction, block_k, block_n, weight.shape[1])
    if needs[2]:
        db = g2.sum(0)
    return dx, dw, db


def _backward(ctx, grad_y):
    x, weight, shifts = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[3])
    dx, dw, db = backward_reference(grad_y, x, weight, shifts, *ctx.geometry, needs=needs)
    return dx, dw, None, db, None, None, None, None


_ss1_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def _cuda_ss1_matmul(x, weight, shifts, bias, reduction, block_k, block_n, vec=1):
    from blastfx.kernels import current

    check_inputs(x, weight, shifts, bias, reduction, block_k, block_n, vec)
    if current().kernels == "reference":
        return _reference(x, weight, shifts, bias, reduction, block_k, block_n).contiguous()
    from .kernel import ss1_matmul_triton
    return ss1_matmul_triton(x, weight, shifts, bias, reduction, block_k, block_n, vec=vec)


if importlib.util.find_spec("triton") is not None:      # find, don't import: importing this stays light
    _ss1_matmul_op.register_kernel("cuda")(_cuda_ss1_matmul)
