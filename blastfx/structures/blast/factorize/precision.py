"""The precision of the factorization's large products: IEEE fp32, or TF32 tensor cores on CUDA.

Why: on a GPU a calibrated ALS iteration is a handful of large fp32 products (the layer's weight times
its input covariance times V, its transpose times U, the covariance times V, block by block), each
about m·n·r multiply-adds. In IEEE fp32 they run on the CUDA cores; in TF32 (fp32 range, operands
rounded to 10-bit mantissas, fp32 accumulation) on the tensor cores, several times faster. A product
then carries about 1e-3 relative rounding. That is far below the error of a fit that keeps half the
parameters, but not below what an ill-conditioned Gram amplifies: a real model's input covariances
have outlier channels, and with TF32 products SmolLM2-135M's batched o_proj fit stopped after 10 of
100 iterations with one layer at a weight error of 3e10 (``benchmarks/fit_precision.py``). Each
matrix's best iterate is now kept (:class:`.blocks.BestIterate`), which bounds such fits by their
start, but "fp32" is the default. The small r x r solves, the warm start's eigendecomposition and
the reported errors are not products of this kind and keep their precision. On the CPU both
settings compute the same.

The switch is torch's own (``torch.backends.cuda.matmul.fp32_precision``), set only inside
:func:`matmul_precision` and restored on the way out, so no setting leaks into the caller's process.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

PRECISIONS = ("fp32", "tf32")


def check(precision) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ValueError naming them."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"fit_precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


@contextmanager
def matmul_precision(precision: str, device):
    """Run the block with fp32 CUDA matmuls in ``precision`` ("tf32": tensor cores); a no-op for
    "fp32" and for devices other than CUDA."""
    check(precision)
    if precision == "fp32" or torch.device(device).type != "cuda":
        yield
        return
    settings = torch.backends.cuda.matmul
    before = settings.fp32_precision
    settings.fp32_precision = "tf32"
    try:
        yield
    finally:
        settings.fp32_precision = before
