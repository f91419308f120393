"""Singular values and leading singular vectors through the Gram matrix of the smaller side, in float64.

Why: compress needs the spectrum of every whitened weight (the planner) and the leading singular
vectors of each (the calibrated warm start). A full SVD of an (m, n) fp32 matrix is the slowest dense
factorization there is (on a CPU, 14 s for 1024 x 2752), where the symmetric eigendecomposition of its
(min, min) Gram matrix costs a fraction of it (0.8 s with the Gram in float64, same machine). In float64
the Gram loses nothing that matters here: its eigenvalues are the squared singular values to about
1e-16 of the largest, far below fp32's rounding of the matrix itself, so the spectra are *more*
accurate than an fp32 SVD's, and the vectors of every singular value above ~1e-7 of the largest are
exact to fp32 precision. For (numerically) zero singular values the vectors on the larger side are
returned as zeros: they carry no energy, and the warm start that uses them is refined by ALS anyway.

GPUs whose float64 runs at a small fraction of their float32 rate (consumer parts: 1/32 to 1/64) form
and decompose the Gram in float32 instead (:func:`gram_dtype`): its eigenvalues are then exact to
about 1e-7 of the largest, which still resolves the spectrum's energy at every rank a plan keeps.
"""
from __future__ import annotations

import torch


# CUDA compute capabilities with full-rate float64 (P100, V100, A100, H100/H200, B200)
FULL_RATE_FP64 = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})


def gram_dtype(device: torch.device, capability: tuple[int, int] | None = None) -> torch.dtype:
    """float64 on the CPU and on GPUs with full-rate float64, else float32. ``capability``: the CUDA
    device's (major, minor), looked up when not given."""
    if device.type != "cuda":
        return torch.float64
    capability = capability if capability is not None else torch.cuda.get_device_capability(device)
    return torch.float64 if tuple(capability) in FULL_RATE_FP64 else torch.float32


def _gram(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(M in the Gram's dtype, its Gram of the smaller side, whether M is wide: the Gram is M Mᵀ, else Mᵀ M)."""
    M64 = M.to(torch.promote_types(M.dtype, gram_dtype(M.device)))
    wide = M.shape[-2] <= M.shape[-1]
    return M64, (M64 @ M64.mT if wide else M64.mT @ M64), wide


def singular_values(M: torch.Tensor) -> torch.Tensor:
    """Singular values of M (..., m, n), descending, in M's dtype (``torch.linalg.svdvals``'s contract)."""
    _, G, _ = _gram(M)
    return torch.linalg.eigvalsh(G).flip(-1).clamp_min(0).sqrt().to(M.dtype)


def top_singular(M: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, sigma, Qh) of M (..., m, n) truncated to k <= min(m, n): M ~ P diag(sigma) Qh, descending,
    in M's dtype."""
    small = min(M.shape[-2:])
    if not 0 < k <= small:
        raise ValueError(f"top_singular: k must be in 1..{small} for a {tuple(M.shape[-2:])} matrix, got {k}")
    M64, G, wide = _gram(M)
    evals, evecs = torch.linalg.eigh(G)
    evals, evecs = evals.flip(-1)[..., :k], evecs.flip(-1)[..., :k]
    sigma = evals.clamp_min(0).sqrt()
    tiny = sigma <= sigma[..., :1] * 1e-7                        # no direction to divide out: zero vectors
    inv = torch.where(tiny, torch.zeros_like(sigma), 1 / sigma.clamp_min(torch.finfo(sigma.dtype).tiny))
    if wide:                                                     # M Mᵀ = P s² Pᵀ, Q = Mᵀ P / s
        P, Q = evecs, (M64.mT @ evecs) * inv.unsqueeze(-2)
    else:                                                        # Mᵀ M = Q s² Qᵀ, P = M Q / s
        P, Q = (M64 @ evecs) * inv.unsqueeze(-2), evecs
    return P.to(M.dtype), sigma.to(M.dtype), Q.mT.to(M.dtype)
