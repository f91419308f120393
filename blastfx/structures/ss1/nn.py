"""``SS1Linear``: an ``nn.Linear`` replacement holding an SS1 shared weight, and ``build_ss1``.

The state dict holds ``weight`` (out_features, shared_in_features), ``bias`` and ``ss1_layout``, an
int64 vector (out_features, in_features, reduction, block_k, block_n, vec, seed): everything the tie
pattern is rebuilt from, so a checkpoint never stores the hash table and never depends on a random
number generator. Loading a state dict adopts its seed (the weights were fitted to that pattern) and
refuses a different geometry with a message naming the field. The shift table is a non-persistent
buffer, so it follows ``.to(device)`` and the op never builds it per call.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn

from .layout import SS1Layout
from .ops import ss1_matmul, ss1_to_dense
from .project import check_damping, check_output_weights, check_weight, project_calibrated, project_weight

__all__ = ["SS1Linear", "build_ss1"]

_FIELDS = ("out_features", "in_features", "reduction", "block_k", "block_n", "vec", "seed")


def _layout_vector(layout: SS1Layout) -> torch.Tensor:
    return torch.tensor([getattr(layout, f) for f in _FIELDS], dtype=torch.int64, device="cpu")


class SS1Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` an SS1 matrix: ``in_features`` cut into tiles of ``block_k``, each
    group of ``reduction`` tiles reading one shared tile at hashed rotations (see
    :mod:`blastfx.structures.ss1`). Stores ``reduction`` times fewer weights than ``nn.Linear``
    (up to tile rounding). Initialised like ``nn.Linear``: every dense entry uniform in
    ``+-1/sqrt(in_features)``, so activations keep their scale."""

    def __init__(self, in_features: int, out_features: int, reduction: int, bias: bool = True, seed: int = 0,
                 block_k: int = 32, block_n: int = 64, vec: int = 8, device=None, dtype=None):
        super().__init__()
        if not isinstance(bias, bool):
            raise ValueError(f"bias must be True or False, got {bias!r}")
        layout = SS1Layout(out_features, in_features, reduction, seed=seed, block_k=block_k, block_n=block_n,
                           vec=vec)
        factory = {"device": device, "dtype": dtype}
        self.layout = layout
        self.weight = nn.Parameter(torch.empty(layout.weight_shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("ss1_layout", _layout_vector(layout).to(self.weight.device))
        self.register_buffer("shifts", layout.shifts(self.weight.device), persistent=False)
        self.reset_parameters()

    # sizes, for code written against nn.Linear
    @property
    def in_features(self) -> int:
        return self.layout.in_features

    @property
    def out_features(self) -> int:
        return self.layout.out_features

    @property
    def reduction(self) -> int:
        return self.layout.reduction

    @property
    def seed(self) -> int:
        return self.layout.seed

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):   # behave like nn.Linear under autocast
            dt = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dt), weight.to(dt)
            bias = bias.to(dt) if bias is not None else None
        return ss1_matmul(x, weight, self.layout, bias, shifts=self.shifts)

    @torch.no_grad()
    def sync_layout(self) -> None:
        """Adopt the ``ss1_layout`` buffer's seed and rebuild the shift table on the weight's device.

        For loaders that set tensors directly rather than through ``load_state_dict`` (transformers
        does; it also leaves non-persistent buffers uninitialized): afterwards the layer computes with
        the tie pattern its weights were fitted to. ``ValueError`` naming the field if the buffer holds
        another geometry."""
        values = self.ss1_layout.tolist()
        if len(values) != len(_FIELDS):
            raise ValueError(f"ss1_layout: expected {len(_FIELDS)} values {_FIELDS}, got {values!r}")
        saved = dict(zip(_FIELDS, (int(v) for v in values)))
        wrong = [f"{f}={saved[f]} (this layer: {getattr(self.layout, f)})" for f in _FIELDS[:-1]
                 if saved[f] != getattr(self.layout, f)]
        if wrong:
            raise ValueError(f"ss1_layout: the loaded SS1 geometry differs: {', '.join(wrong)}")
        layout = replace(self.layout, seed=saved["seed"])
        self.ss1_layout = _layout_vector(layout).to(self.weight.device)
        self.shifts = layout.shifts(self.weight.device)
        self.layout = layout

    def dense_weight(self) -> torch.Tensor:
        """The (out_features, in_features) matrix this layer applies."""
        return ss1_to_dense(self.weight, self.layout, self.shifts)

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The (out_features, in_features) weight this layer applies, as ``BlastLinear.to_dense()``
        gives it: one call works on a layer of either structure."""
        return self.dense_weight()

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function (same device and dtype)."""
        w = self.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        L = self.layout
        return (f"in_features={L.in_features}, out_features={L.out_features}, reduction={L.reduction}, "
                f"bias={self.bias is not None}, seed={L.seed}, block_k={L.block_k}, block_n={L.block_n}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "ss1_layout"
        new_layout = None
        if key in state_dict:
            stored = state_dict[key]
            values = stored.tolist() if isinstance(stored, torch.Tensor) and stored.dim() == 1 else None
            if values is None or len(values) != len(_FIELDS):
                error_msgs.append(f"{key}: expected an int64 vector of {len(_FIELDS)} values {_FIELDS}, "
                                  f"got {stored!r}")
                return
            saved = dict(zip(_FIELDS, (int(v) for v in values)))
            wrong = [f"{f}={saved[f]} (this layer: {getattr(self.layout, f)})" for f in _FIELDS[:-1]
                     if saved[f] != getattr(self.layout, f)]
            if wrong:
                error_msgs.append(f"{key}: the checkpoint's SS1 geometry differs: {', '.join(wrong)}")
                return
            try:
                new_layout = replace(self.layout, seed=saved["seed"])
            except ValueError as e:
                error_msgs.append(f"{key}: {e}")
                return
        before = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(error_msgs) == before:
            # the table follows the loaded weight (``assign=True`` may move it off the meta device)
            layout = new_layout or self.layout
            if layout != self.layout or self.shifts.device != self.weight.device:
                self.shifts = layout.shifts(self.weight.device)
            self.layout = layout

    @classmethod
    def from_dense(cls, linear: nn.Linear, reduction: int, covariance: torch.Tensor | None = None,
                   damping: float = 0.01, output_weights: torch.Tensor | None = None, **geometry) -> "SS1Linear":
        """The SS1 layer closest to ``linear`` (see :func:`build_ss1`; ``geometry``: its ``seed``,
        ``block_k``, ``block_n``, ``vec``); ``linear`` is not modified."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return build_ss1(linear.weight, linear.bias, reduction, covariance=covariance,
                         output_weights=output_weights, damping=damping, **geometry)


@torch.no_grad()
def build_ss1(weight: torch.Tensor, bias: torch.Tensor | None, reduction: int, covariance: torch.Tensor | None = None,
              output_weights: torch.Tensor | None = None, damping: float = 0.01, *, seed: int = 0,
              block_k: int = 32, block_n: int = 64, vec: int = 8) -> SS1Linear:
    """An :class:`SS1Linear` (on ``weight``'s device and dtype) whose matrix is the projection of
    ``weight`` (out_features, in_features): the per-slot mean without ``covariance``, the
    output-error optimum under the damped input covariance with it (``output_weights`` are checked
    but cannot change that optimum; see :mod:`.project`). Everything is checked and computed before
    the layer is made, so a bad argument leaves nothing half-built."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor (out_features, in_features), got "
                         f"{tuple(getattr(weight, 'shape', ())) or type(weight).__name__}")
    out_features, in_features = weight.shape
    layout = SS1Layout(out_features, in_features, reduction, seed=seed, block_k=block_k, block_n=block_n, vec=vec)
    check_weight(weight, layout)
    check_damping(damping)
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_features,)):
        raise ValueError(f"bias must be None or a tensor of shape ({out_features},), got "
                         f"{tuple(getattr(bias, 'shape', ())) or type(bias).__name__}")
    w = weight.detach()
    if covariance is None:
        if output_weights is not None:
            check_output_weights(output_weights, out_features)
        shared = project_weight(w, layout)
    else:
        shared = project_calibrated(w, layout, covariance.detach(), damping, output_weights)
    layer = SS1Linear(in_features, out_features, reduction, bias=bias is not None, seed=seed, block_k=block_k,
                      block_n=block_n, vec=vec, device=weight.device, dtype=weight.dtype)
    layer.weight.copy_(shared)
    if bias is not None:
        layer.bias.copy_(bias.detach())
    return layer
