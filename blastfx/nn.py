"""``BlastLinear``: a drop-in ``nn.Linear`` whose weight is a BLAST matrix.

Parameter layout (see :mod:`blastfx.layout` for padding):

* ``U``: (b_out, p, r) -- U[i] is the left factor shared by block-row i,
* ``S``: (b_out, b_in, r) -- S[i, j] is the diagonal coupling block (i, j),
* ``V``: (b_in, q, r) -- V[j] is the right factor shared by block-column j,

so block (i, j) of the weight is ``U[i] @ diag(S[i, j]) @ V[j].T``. Padded rows of U and V (when the
block counts do not divide the features) are zero, never read by the output, and get zero gradients;
that holds only while they are exactly zero (a NaN there reaches every output through 0 * NaN), so
factors from outside (``from_factors``, a loaded checkpoint) are checked with :func:`check_padding`.
The module knows nothing of kernels or compilers: it only calls ``torch.ops.blastfx.blast_matmul``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .layout import BlastShape
from .ops import blast_matmul, blast_to_dense


def check_padding(shape: BlastShape, U: torch.Tensor, V: torch.Tensor, where: str = "BLAST factors") -> None:
    """``ValueError`` unless the padded rows of U (past ``out_features`` in the last block-row) and of V
    (past ``in_features`` in the last block-column) are exactly zero; NaN and Inf count as nonzero."""
    for name, factor, dim, dim_name, padded in (("U", U, shape.out_features, "out_features", shape.m_pad),
                                                ("V", V, shape.in_features, "in_features", shape.n_pad)):
        if padded == dim:
            continue
        bad = int(factor.detach().reshape(padded, shape.rank)[dim:].count_nonzero())
        if bad:
            raise ValueError(f"{where}: {bad} nonzero (or NaN/Inf) entries in the padding of {name}: rows {dim}.."
                             f"{padded - 1} of its ({padded}, {shape.rank}) view lie past {dim_name}={dim} and "
                             "must be zero")


class BlastLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, blocks=(1, 1), bias: bool = True,
                 device=None, dtype=None, *, allow_larger: bool = False):
        super().__init__()
        self.shape = BlastShape.make(out_features, in_features, rank, blocks, allow_larger=allow_larger)
        kw = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(self.shape.factor_shapes["U"], **kw))
        self.S = nn.Parameter(torch.empty(self.shape.factor_shapes["S"], **kw))
        self.V = nn.Parameter(torch.empty(self.shape.factor_shapes["V"], **kw))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **kw)) if bias else None)
        self.reset_parameters()

    in_features = property(lambda self: self.shape.in_features)
    out_features = property(lambda self: self.shape.out_features)
    rank = property(lambda self: self.shape.rank)
    blocks = property(lambda self: self.shape.blocks)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init for training from scratch, with nn.Linear's output variance.

        nn.Linear draws W ~ U(-1/sqrt(n), 1/sqrt(n)), so Var(W) = 1/(3n). A BLAST entry is
        sum_k U[a,k] s[k] V[b,k]; with s = 1 and U, V independent of variance sigma^2 each,
        Var(W_ab) = r * sigma^4. Setting that to 1/(3n) gives sigma = (3 n r)^(-1/4).
        """
        n, r = self.in_features, self.rank
        bound = math.sqrt(3.0) * (3.0 * n * r) ** -0.25          # uniform(-a, a) has variance a^2 / 3
        for factor in (self.U, self.V):
            factor.uniform_(-bound, bound)
        self.S.fill_(1.0)
        self._zero_padding()
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
        U, S, V, bias = self.U, self.S, self.V, self.bias
        if torch.is_autocast_enabled(x.device.type):   # behave like nn.Linear under autocast
            dt = torch.get_autocast_dtype(x.device.type)
            x, U, S, V = x.to(dt), U.to(dt), S.to(dt), V.to(dt)
            bias = bias.to(dt) if bias is not None else None
        return blast_matmul(x, U, S, V, bias, self.out_features)

    def to_dense(self) -> torch.Tensor:
        """The (out_features, in_features) weight this layer applies."""
        return blast_to_dense(self.U, self.S, self.V, self.out_features, self.in_features)

    def num_parameters(self, include_bias: bool = True) -> int:
        """Parameters really stored (padding included), plus the bias if asked."""
        return self.shape.num_params + (self.bias.numel() if include_bias and self.bias is not None else 0)

    @classmethod
    def from_factors(cls, factors, bias: torch.Tensor | None = None) -> "BlastLinear":
        """Wrap :class:`blastfx.factorize.BlastFactors` (or any object with U, S, V and shape); the
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
                f"params={s.num_params} ({s.num_params / s.dense_params:.1%} of dense){pad}")
