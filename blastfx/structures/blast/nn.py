"""``BlastLinear``: a drop-in ``nn.Linear`` whose weight is a BLAST matrix.

Parameter layout (see :mod:`blastfx.structures.blast.layout` for padding):

* ``U``: (b_out, p, r) -- U[i] is the left factor shared by block-row i,
* ``S``: (b_out, b_in, r) -- S[i, j] is the diagonal coupling block (i, j),
* ``V``: (b_in, q, r) -- V[j] is the right factor shared by block-column j,

so block (i, j) of the weight is ``U[i] @ diag(S[i, j]) @ V[j].T``. Padded rows of U and V (when the
block counts do not divide the features) are zero, never read by the output, and get zero gradients;
that holds only while they are exactly zero (a NaN there reaches every output through 0 * NaN), so
factors from outside (``from_factors``, a loaded checkpoint) are checked with :func:`check_padding`.
The module knows nothing of kernels or compilers: it only calls ``torch.ops.blastfx.blast_matmul``.

There is no ``weight``: reading it raises ``AttributeError`` with a message naming BLAST and what to
do instead. Tools that need a dense weight (QKV fusion, weight-quantization passes, weight-based
LoRA inits) thus fail at the access with that message, while the many that probe with
``hasattr(module, "weight")`` see an ordinary module without one. Building the dense matrix on
access would silently undo the compression (a fused QKV layer would come back dense) and cost a
full (out, in) matrix on every read; :meth:`to_dense` does that when it is really wanted.

Quantized factors (``factor_dtype="int8"``, ``"int4"``, ..., see :mod:`blastfx.structures.blast.quant`):
U and V are then buffers of codes with float32 buffers ``U_scale`` (b_out, p) and ``V_scale`` (b_in, r),
and S and the bias stay parameters in the activation dtype. int4 codes are packed two per byte along
r, so U and V are then (b_out, p, ceil(r/2)) and (b_in, q, ceil(r/2)) ``torch.uint8`` tensors. Codes are not trainable (an optimizer cannot step
an int8 tensor), so the layer refuses to grow or shrink its rank; ``to_dense`` dequantizes.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .layout import BlastShape
from .ops import blast_matmul, blast_to_dense
from .quant import formats as qformats
from .quant.ops import blast_matmul_quantized


def check_padding(shape: BlastShape, U: torch.Tensor, V: torch.Tensor, where: str = "BLAST factors") -> None:
    """``ValueError`` unless the padded rows of U (past ``out_features`` in the last block-row) and of V
    (past ``in_features`` in the last block-column) are exactly zero; NaN and Inf count as nonzero."""
    for name, factor, dim, dim_name, padded in (("U", U, shape.out_features, "out_features", shape.m_pad),
                                                ("V", V, shape.in_features, "in_features", shape.n_pad)):
        if padded == dim:
            continue
        if factor.dtype == torch.uint8:                                         # packed int4 codes
            factor = qformats.codes_of(factor, shape.rank)
        if factor.dtype.is_floating_point and factor.dtype.itemsize == 1:     # float8 codes: count as floats
            factor = factor.float()
        bad = int(factor.detach().reshape(padded, shape.rank)[dim:].count_nonzero())
        if bad:
            raise ValueError(f"{where}: {bad} nonzero (or NaN/Inf) entries in the padding of {name}: rows {dim}.."
                             f"{padded - 1} of its ({padded}, {shape.rank}) view lie past {dim_name}={dim} and "
                             "must be zero")


_ABSENT = object()


def _stored(layer: nn.Module, store: dict, name: str):
    """``layer.<name>`` read from ``store`` (its ``_parameters`` or ``_buffers``) where it is there,
    else as an ordinary attribute (pruning, parametrizations and FSDP's unsharded views move a
    tensor out of the dicts; a bias set to None may be a plain attribute)."""
    value = store.get(name, _ABSENT)
    return getattr(layer, name) if value is _ABSENT else value


class BlastLinear(nn.Module):
    factor_dtype: str | None = None        # set per layer when U and V are stored quantized

    def __init__(self, in_features: int, out_features: int, rank: int, blocks=(1, 1), bias: bool = True,
                 device=None, dtype=None, *, allow_larger: bool = False, factor_dtype: str | None = None):
        super().__init__()
        self.shape = BlastShape.make(out_features, in_features, rank, blocks, allow_larger=allow_larger)
        self.factor_dtype = qformats.check_name(factor_dtype)
        kw = {"device": device, "dtype": dtype}
        if self.quantized:
            self._empty_codes(qformats.get(factor_dtype), device)
            self.S = nn.Parameter(torch.empty(self.shape.factor_shapes["S"], **kw))
        else:       # U, S, V in this order: optimizer states saved by parameter index depend on it
            self.U = nn.Parameter(torch.empty(self.shape.factor_shapes["U"], **kw))
            self.S = nn.Parameter(torch.empty(self.shape.factor_shapes["S"], **kw))
            self.V = nn.Parameter(torch.empty(self.shape.factor_shapes["V"], **kw))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **kw)) if bias else None)
        self.reset_parameters()

    in_features = property(lambda self: self.shape.in_features)
    out_features = property(lambda self: self.shape.out_features)
    rank = property(lambda self: self.shape.rank)
    blocks = property(lambda self: self.shape.blocks)

    @property
    def quantized(self) -> bool:
        """Whether U and V are stored as quantized codes (``factor_dtype`` names the format)."""
        return self.factor_dtype is not None

    def _empty_codes(self, fmt, device) -> None:
        s = self.shape
        self.register_buffer("U", torch.zeros(fmt.stored_shape(s.factor_shapes["U"]), dtype=fmt.storage, device=device))
        self.register_buffer("U_scale", torch.ones(s.b_out, s.p, dtype=qformats.SCALE_DTYPE, device=device))
        self.register_buffer("V", torch.zeros(fmt.stored_shape(s.factor_shapes["V"]), dtype=fmt.storage, device=device))
        self.register_buffer("V_scale", torch.ones(s.b_in, s.rank, dtype=qformats.SCALE_DTYPE, device=device))

    _CODE_BUFFERS = ("U", "U_scale", "V", "V_scale")

    def _apply(self, fn, recurse=True):
        """Casts of the module (``.to(dtype)``, ``.half()``, ``.double()``) leave quantized codes and their
        scales in their dtypes and only move them: PyTorch counts float8 codes as floating point and would
        cast them (losing the rounding), and float32 scales cast to the model's dtype are what neither the
        kernels nor checkpoints take. S and the bias follow the cast as on any module."""
        if not self.quantized:
            return super()._apply(fn, recurse)
        kept = {id(self._buffers[n]) for n in self._CODE_BUFFERS if self._buffers.get(n) is not None}

        def keep_dtype(t):
            out = fn(t)
            if id(t) in kept and isinstance(out, torch.Tensor) and out.dtype != t.dtype:
                out = t.to(device=out.device)
            return out
        return super()._apply(keep_dtype, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Refuse factors stored in another format before anything is copied: codes of one format have
        the shapes of another's (int8 and float8) or of float factors, and ``copy_`` would cast them
        into this layer's dtype without a word."""
        fmt = qformats.get(self.factor_dtype) if self.quantized else None
        wrong = []
        for name in ("U", "V"):
            stored = state_dict.get(prefix + name)
            if not isinstance(stored, torch.Tensor):
                continue
            if fmt is not None and stored.dtype != fmt.storage:
                wrong.append(f"{prefix}{name}: checkpoint {stored.dtype}, this layer's {self.factor_dtype} codes "
                             f"are {fmt.storage}")
            elif fmt is None and (not stored.dtype.is_floating_point or stored.dtype.itemsize == 1):
                wrong.append(f"{prefix}{name}: checkpoint holds {stored.dtype} codes, this layer float factors")
        if wrong:
            error_msgs.append("; ".join(wrong) + ": the checkpoint's factor format differs from this layer's "
                              "(build the model with the checkpoint's factor_dtype)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init for training from scratch, with nn.Linear's output variance.

        nn.Linear draws W ~ U(-1/sqrt(n), 1/sqrt(n)), so Var(W) = 1/(3n). A BLAST entry is
        sum_k U[a,k] s[k] V[b,k]; with s = 1 and U, V independent of variance sigma^2 each,
        Var(W_ab) = r * sigma^4. Setting that to 1/(3n) gives sigma = (3 n r)^(-1/4).
        """
        n, r = self.in_features, self.rank
        bound = math.sqrt(3.0) * (3.0 * n * r) ** -0.25          # uniform(-a, a) has variance a^2 / 3
        if self.quantized:                                       # the same draw, rounded into the codes
            s, fmt = self.shape, qformats.get(self.factor_dtype)
            U = torch.empty(s.factor_shapes["U"], device=self.S.device).uniform_(-bound, bound)
            V = torch.empty(s.factor_shapes["V"], device=self.S.device).uniform_(-bound, bound)
            U.view(s.m_pad, r)[s.out_features:] = 0
            V.view(s.n_pad, r)[s.in_features:] = 0
            (Uc, su), (Vc, sv) = qformats.quantize_u(U, fmt), qformats.quantize_v(V, fmt)
            for name, t in (("U", Uc), ("U_scale", su), ("V", Vc), ("V_scale", sv)):
                getattr(self, name).copy_(t)
        else:
            for factor in (self.U, self.V):
                factor.uniform_(-bound, bound)
            self._zero_padding()
        self.S.fill_(1.0)
        if self.bias is not None:
            self.bias.uniform_(-1 / math.sqrt(n), 1 / math.sqrt(n))

    def check_padding(self, where: str = "BlastLinear") -> None:
        """``ValueError`` unless the padded rows of U and V are zero (see :func:`check_padding`)."""
        check_padding(self.shape, self.U, self.V, where)

    def _zero_padding(self) -> None:
        s = self.shape
        self.U.view(s.m_pad, s.rank)[s.out_features:] = 0
        self.V.view(s.n_pad, s.rank)[s.in_features:] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Tensors straight from the module's dicts, not ``self.U``: this class overrides __getattr__ (for
        # the .weight message), so under torch.compile every ``self.<name>`` would be traced through it
        # and guarded again on every call of the compiled model.
        params, buffers = self._parameters, self._buffers
        quantized = self.factor_dtype is not None
        tensors = buffers if quantized else params
        U, S, V = _stored(self, tensors, "U"), _stored(self, params, "S"), _stored(self, tensors, "V")
        bias = _stored(self, params, "bias")
        autocast = torch.is_autocast_enabled(x.device.type)
        if autocast:                                   # behave like nn.Linear under autocast
            dt = torch.get_autocast_dtype(x.device.type)
            x, S = x.to(dt), S.to(dt)
            bias = bias.to(dt) if bias is not None else None
        out_features = self.shape.out_features
        if quantized:                                  # codes and scales stay as stored
            return blast_matmul_quantized(x, U, buffers["U_scale"], S, V, buffers["V_scale"], bias, out_features)
        if autocast:
            U, V = U.to(dt), V.to(dt)
        return blast_matmul(x, U, S, V, bias, out_features)

    def __getattr__(self, name: str):
        if name == "weight":
            raise AttributeError(
                f"{type(self).__name__} has no dense .weight: it stores a BLAST matrix as factors U {tuple(self.U.shape)},"
                f" S {tuple(self.S.shape)}, V {tuple(self.V.shape)}, so a tool that reads or rewrites a linear "
                "layer's weight (QKV fusion, torchao quantize_, LoRA inits from the weight) cannot work on it. "
                "Apply such tools before blastfx.compress (compress then factorizes their result), use "
                "layer.to_dense() for the matrix, or blastfx.to_dense(model) to turn the model back into dense layers")
        return super().__getattr__(name)

    @torch.no_grad()
    def add_low_rank_(self, B: torch.Tensor, A: torch.Tensor) -> None:
        """W <- W + B @ A, exactly, for B (out_features, k) and A (k, in_features): the rank grows by k.

        Why exact: block (i, j) of B @ A is B_i A_j^T, a BLAST matrix whose couplings are all 1, and two
        BLAST matrices with the same blocks add by concatenating their factors along the rank
        (U_i' = [U_i, B_i], V_j' = [V_j, A_j^T], s_ij' = [s_ij, 1]). The factors become new parameters
        (an optimizer holding the old ones must be rebuilt). :meth:`remove_rank_` undoes it."""
        self._refuse_if_quantized("add_low_rank_")
        s = self.shape
        if B.dim() != 2 or A.dim() != 2 or B.shape[0] != s.out_features or A.shape[1] != s.in_features \
                or B.shape[1] != A.shape[0]:
            raise ValueError(f"add_low_rank_ needs B ({s.out_features}, k) and A (k, {s.in_features}), got B "
                             f"{tuple(B.shape)} and A {tuple(A.shape)}")
        k = A.shape[0]
        limit = min(s.m_pad, s.n_pad)
        if s.rank + k > limit:
            raise ValueError(f"rank {s.rank} + {k} is more than {limit}, the rank at which this BLAST layer "
                             f"(blocks {s.blocks}) already represents every {s.out_features}x{s.in_features} "
                             "matrix: a dense layer would be smaller (blastfx.to_dense)")
        dt, dev = self.U.dtype, self.U.device
        B = torch.nn.functional.pad(B.to(dev, dt), (0, 0, 0, s.m_pad - s.out_features)).reshape(s.b_out, s.p, k)
        A = torch.nn.functional.pad(A.to(dev, dt).T, (0, 0, 0, s.n_pad - s.in_features)).reshape(s.b_in, s.q, k)
        U = torch.cat([self.U, B], dim=2)
        S = torch.cat([self.S, self.S.new_ones(s.b_out, s.b_in, k)], dim=2)
        V = torch.cat([self.V, A], dim=2)
        self._set_factors(U, S, V)

    @torch.no_grad()
    def remove_rank_(self, k: int) -> None:
        """Drop the last ``k`` rank components: exactly undoes an :meth:`add_low_rank_` of rank ``k``
        that was the last one."""
        self._refuse_if_quantized("remove_rank_")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k < self.rank:
            raise ValueError(f"k must be an integer in [1, {self.rank - 1}] (the rank is {self.rank}), got {k!r}")
        r = self.rank - k
        self._set_factors(self.U[..., :r].clone(), self.S[..., :r].clone(), self.V[..., :r].clone())

    def _refuse_if_quantized(self, what: str) -> None:
        if self.quantized:
            raise ValueError(f"{what}: this BLAST layer stores {self.factor_dtype} factors, which cannot change rank "
                             "exactly; merge or edit the float layer first and quantize after "
                             "(blastfx.structures.blast.quant.quantize_model)")

    def _set_factors(self, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
        self._refuse_if_quantized("changing the factors")
        shape = BlastShape.from_factors(U, S, V, self.out_features, self.in_features)
        check_padding(shape, U, V, "BlastLinear factors")
        grad = self.U.requires_grad
        self.shape = shape
        self.U, self.S, self.V = (nn.Parameter(t, requires_grad=grad) for t in (U, S, V))

    def float_factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, S, V) as floating-point tensors in ``dtype`` (default S's): dequantized where stored as
        codes, the parameters themselves otherwise (when no cast is needed)."""
        dtype = dtype or self.S.dtype
        if self.quantized:
            U = qformats.dequantize_u(self.U, self.U_scale, dtype, rank=self.rank)
            V = qformats.dequantize_v(self.V, self.V_scale, dtype)
            return U, self.S.to(dtype), V
        return self.U.to(dtype), self.S.to(dtype), self.V.to(dtype)

    def to_dense(self) -> torch.Tensor:
        """The (out_features, in_features) weight this layer applies."""
        return blast_to_dense(*self.float_factors(), self.out_features, self.in_features)

    def num_parameters(self, include_bias: bool = True) -> int:
        """Parameters really stored (padding included), plus the bias if asked."""
        return self.shape.num_params + (self.bias.numel() if include_bias and self.bias is not None else 0)

    @classmethod
    def from_factors(cls, factors, bias: torch.Tensor | None = None) -> "BlastLinear":
        """Wrap :class:`blastfx.BlastFactors` (or any object with U, S, V and shape); the
        padding must be zero."""
        s = factors.shape
        check_padding(s, factors.U, factors.V, "BlastLinear.from_factors")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.shape = s
        layer.U = nn.Parameter(factors.U.detach().clone())
        layer.S = nn.Parameter(factors.S.detach().clone())
        layer.V = nn.Parameter(factors.V.detach().clone())
        layer.bias = None if bias is None else nn.Parameter(bias.detach().clone().to(factors.U))
        return layer

    @classmethod
    def from_quantized(cls, factors, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> "BlastLinear":
        """Wrap :class:`blastfx.structures.blast.quant.QuantizedFactors`: the codes and scales as
        buffers, S (and the bias) as parameters in ``dtype`` (default S's). The padding must be zero."""
        s = factors.shape
        check_padding(s, factors.U, factors.V, "BlastLinear.from_quantized")
        dtype = dtype or factors.S.dtype
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.shape = s
        layer.factor_dtype = factors.format.name
        layer.register_buffer("U", factors.U.detach().clone())
        layer.register_buffer("U_scale", factors.U_scale.detach().to(qformats.SCALE_DTYPE).clone())
        layer.register_buffer("V", factors.V.detach().clone())
        layer.register_buffer("V_scale", factors.V_scale.detach().to(qformats.SCALE_DTYPE).clone())
        layer.S = nn.Parameter(factors.S.detach().to(dtype).clone())
        layer.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype).clone())
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, blocks=(1, 1), **factorize_kwargs) -> "BlastLinear":
        """Factorize a trained ``nn.Linear``'s weight (see :func:`blastfx.factorize`)."""
        from .factorize import factorize

        W = linear.weight.detach()
        factors = factorize(W, rank, blocks, **factorize_kwargs)
        return cls.from_factors(factors.to(W.dtype), linear.bias)

    def extra_repr(self) -> str:
        s = self.shape
        pad = f", padded to {s.m_pad}x{s.n_pad}" if s.padded else ""
        return (f"in_features={s.in_features}, out_features={s.out_features}, rank={s.rank}, "
                f"blocks=({s.b_out}, {s.b_in}), bias={self.bias is not None}, "
                + (f"factor_dtype={self.factor_dtype}, " if self.quantized else "") +
                f"params={s.num_params} ({s.num_params / s.dense_params:.1%} of dense){pad}")
