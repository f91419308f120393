"""Which implementation runs ``blastfx::blast_matmul`` on CUDA.

The CUDA kernels registered here launch the fused Triton forward (:mod:`.forward`) and the Triton
middle of the backward (:mod:`.backward`) for fp16, bf16 and fp32, and fall back to the plain-PyTorch
reference otherwise (or when told to). CPU always uses
the reference. Importing this module without triton or CUDA is harmless.
"""
from __future__ import annotations

import torch

settings = {"kernels": "triton"}
KERNELS = ("triton", "reference")


def set_kernels(name: str) -> None:
    if name not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {name!r}")
    settings["kernels"] = name


def _cuda_blast_matmul(x, U, S, V, bias=None, out_features=None):
    from ..ops import blast_matmul_reference, check_inputs

    shape = check_inputs(x, U, S, V, bias, out_features)
    if settings["kernels"] == "triton" and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        from . import forward

        return forward.blast_matmul_triton(x, U, S, V, bias, out_features, shape=shape)
    return blast_matmul_reference(x, U, S, V, bias, out_features).contiguous()


def _cuda_grad_mix(z, gw, S):
    from ..ops import grad_mix_reference

    if settings["kernels"] == "triton" and z.dtype in (torch.float16, torch.bfloat16, torch.float32):
        from .backward import grad_mix_triton, kernel_beats_reference

        if kernel_beats_reference(gw.shape[0], z.shape[0]):
            return grad_mix_triton(z, gw, S)
    return tuple(t.contiguous() for t in grad_mix_reference(z, gw, S))


def register() -> bool:
    """Register the CUDA kernel of blastfx::blast_matmul if triton is importable."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:   # find, don't import: keeps `import blastfx` light
        return False
    from ..ops import _blast_matmul_op, _grad_mix_op

    _blast_matmul_op.register_kernel("cuda")(_cuda_blast_matmul)
    _grad_mix_op.register_kernel("cuda")(_cuda_grad_mix)
    return True
