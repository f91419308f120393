"""Rounding one factor into codes, given how its errors reach the layer's output.

Two choices decide how much a rounded factor loses, beyond the refits of :mod:`.fit`:

* **The scale.** Mapping a row's absolute maximum to the largest code wastes most of a 4-bit grid
  on one entry. :func:`searched_scales` tries scales from ``CLIP_GRID`` times the maximum and keeps,
  per scaled slice, the one whose rounding error (weighted by how strongly each entry reaches the
  output) is least. At int8 the maximum is nearly always kept; at int4 a clipped scale usually wins.
* **Error feedback.** Rounding each entry to its nearest code ignores that the entries of a row act
  together on correlated inputs. :func:`error_feedback_codes` rounds one column at a time and moves
  each column's error onto the columns not yet rounded, through the Cholesky factor of the inverse
  Hessian (the optimal-brain-surgeon update of GPTQ, Frantar et al. 2023), most sensitive columns
  first. With the Hessian of a row's output error it minimizes that error column by column.

Both are the plain PyTorch definition; rounding runs once at compression, so nothing here is a kernel.
"""
from __future__ import annotations

import torch

from .formats import FactorFormat, _scale

CLIP_GRID = tuple(1.0 - 0.02 * k for k in range(26))     # 1.0 down to 0.5 of the slice's maximum
FEEDBACK_DAMPING = 0.01       # added to the Hessian's diagonal, relative to its mean (GPTQ's default)
FEEDBACK_BLOCK = 128          # columns rounded between two updates of the remaining columns
SEARCH_CHUNK = 1 << 24        # elements searched at once (the grid's temporaries are a few times this)


def searched_scales(x: torch.Tensor, dim: int, fmt: FactorFormat, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-slice scales of ``x`` (one per index of the other dimensions, ``dim`` reduced away) that
    minimize ``sum(weight * (x - scale * nearest(x / scale))^2)`` over the slice, among ``CLIP_GRID``
    times ``amax / qmax``. ``weight`` broadcasts against ``x`` (nonnegative; None: all ones). An
    all-zero slice gets scale 1, as :func:`.formats._scale` gives it. Large tensors are searched a
    slice of the leading dimension at a time, so the grid's temporaries stay small beside ``x``."""
    dim = dim % x.dim()
    if dim > 0 and x.shape[0] > 1 and x.numel() > SEARCH_CHUNK:
        step = max(1, SEARCH_CHUNK * x.shape[0] // x.numel())
        w_rows = weight is not None and weight.dim() == x.dim() and weight.shape[0] == x.shape[0]
        return torch.cat([searched_scales(x[k:k + step], dim, fmt, weight[k:k + step] if w_rows else weight)
                          for k in range(0, x.shape[0], step)])
    return _searched(x, dim, fmt, weight)


def _searched(x, dim, fmt, weight):
    base = _scale(x.abs().amax(dim=dim, keepdim=True), fmt)
    best_err = best = None
    for clip in CLIP_GRID:                      # 1.0 first: an all-zero slice keeps it (no error to beat)
        scale = base * clip
        err = (x - scale * fmt.nearest(x / scale)).square()
        err = (err if weight is None else err * weight).sum(dim=dim, keepdim=True)
        if best is None:
            best_err, best = err, scale
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, scale, best)
    return best.squeeze(dim)


def _inverse_hessian_factor(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1, (..., c, c). Matrices whose damped Cholesky fails
    get ten times the damping until it succeeds (a few tries; a zero Hessian is damped to a multiple
    of the identity, so the feedback is then plain rounding)."""
    if not bool(torch.isfinite(H).all()):
        raise ValueError("the rounding's Hessian has non-finite entries: the factors or the calibration "
                         "statistics hold NaN or inf")
    c = H.shape[-1]
    eye = torch.eye(c, dtype=H.dtype, device=H.device)
    mean = H.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(H.dtype).tiny ** 0.5)
    damping = FEEDBACK_DAMPING * mean
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + damping[..., None, None] * eye)
        if not bool((info != 0).any()):
            break
        damping = torch.where(info != 0, damping * 10, damping)
    else:
        raise torch.linalg.LinAlgError(f"the rounding's Hessian stayed singular after damping it by "
                                       f"{FEEDBACK_DAMPING * 1e5:g} of its mean diagonal")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def error_feedback_codes(x: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, fmt: FactorFormat,
                         block: int = FEEDBACK_BLOCK) -> torch.Tensor:
    """Codes (float, ``x``'s shape) of ``x`` (..., rows, cols) rounded column by column with error
    feedback: each row's error ``e`` is judged by ``e H e^T`` with ``hessian`` (..., cols, cols)
    shared by the rows of a matrix, and ``scale`` (..., rows) is each row's fixed scale. Columns go
    in decreasing order of the Hessian's diagonal. The result is the codes; ``codes * scale`` is the
    rounded ``x``."""
    cols = x.shape[-1]
    order = torch.argsort(hessian.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)      # (..., cols)
    w = torch.take_along_dim(x, order.unsqueeze(-2), -1)             # a new tensor: updated in place below
    H = torch.take_along_dim(torch.take_along_dim(hessian, order.unsqueeze(-1), -2), order.unsqueeze(-2), -1)
    Hinv = _inverse_hessian_factor(H)
    codes = torch.empty_like(w)
    s = scale.unsqueeze(-1)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        wb = w[..., b0:b1]                       # a view: the in-block updates land in w
        errors = torch.empty_like(wb)
        for c in range(b1 - b0):
            k = b0 + c
            q = fmt.nearest(wb[..., c:c + 1] / s)
            codes[..., k:k + 1] = q
            e = (wb[..., c:c + 1] - q * s) / Hinv[..., k, k].unsqueeze(-1).unsqueeze(-1)
            wb[..., c:] -= e * Hinv[..., k, k:b1].unsqueeze(-2)
            errors[..., c:c + 1] = e
        if b1 < cols:
            w[..., b1:] -= errors @ Hinv[..., b0:b1, b1:]
    return torch.take_along_dim(codes, torch.argsort(order, dim=-1).unsqueeze(-2), -1)
