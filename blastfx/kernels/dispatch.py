"""Which implementation runs ``blastfx::blast_matmul`` and ``blastfx::blast_grad_mix`` on CUDA.

The CUDA kernels registered here (for ``blastfx::blast_matmul_quantized`` too: the GEMV or the fused
kernels reading the codes, or a float copy where that times faster) launch the fused Triton forward (:mod:`.forward`) and the Triton
middle of the backward (:mod:`.backward`) for fp16, bf16 and fp32, and fall back to the plain-PyTorch
reference otherwise, or when the kernel options in effect say "reference" (:mod:`.scope`; read at
each call, so the choice is the caller's block or compiled graph, not the process's). CPU always uses
the reference. Importing this module without triton or CUDA is harmless.
"""
from __future__ import annotations

import torch

from .scope import resolve_kernels

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def forward_impl(dtype: torch.dtype) -> str:
    """What the CUDA forward runs for ``dtype`` under the options in effect: "triton" or "reference"."""
    return "triton" if resolve_kernels(None) == "triton" and dtype in TRITON_DTYPES else "reference"


def grad_mix_impl(dtype: torch.dtype, b_out: int, b_in: int, kernels: str | None = None) -> str:
    """What the CUDA backward middle runs: "triton" or "reference". ``kernels`` is the op's own
    argument (the choice taken where the forward ran), ``None`` for the options in effect."""
    if resolve_kernels(kernels) != "triton" or dtype not in TRITON_DTYPES:
        return "reference"
    from .backward import kernel_beats_reference

    return "triton" if kernel_beats_reference(b_out, b_in) else "reference"


def _cuda_blast_matmul(x, U, S, V, bias=None, out_features=None):
    from ..structures.blast.ops import blast_matmul_reference, check_inputs

    shape = check_inputs(x, U, S, V, bias, out_features)
    if forward_impl(x.dtype) == "triton":
        from . import forward

        return forward.blast_matmul_triton(x, U, S, V, bias, out_features, shape=shape)
    return blast_matmul_reference(x, U, S, V, bias, out_features).contiguous()


def _cuda_blast_matmul_quantized(x, U, U_scale, S, V, V_scale, bias=None, out_features=None):
    from ..structures.blast.quant.ops import blast_matmul_quantized_reference, check_quantized_inputs

    shape = check_quantized_inputs(x, U, U_scale, S, V, V_scale, bias, out_features)
    if forward_impl(x.dtype) == "triton":
        from . import forward

        return forward.blast_matmul_quantized_triton(x, U, U_scale, S, V, V_scale, bias, out_features, shape=shape)
    return blast_matmul_quantized_reference(x, U, U_scale, S, V, V_scale, bias, out_features).contiguous()


def _cuda_grad_mix(z, gw, S, kernels=None):
    from ..structures.blast.ops import grad_mix_reference

    if grad_mix_impl(z.dtype, gw.shape[0], z.shape[0], kernels) == "triton":
        from .backward import grad_mix_triton

        return grad_mix_triton(z, gw, S)
    return tuple(t.contiguous() for t in grad_mix_reference(z, gw, S))


def register() -> bool:
    """Register the CUDA kernels of the blastfx ops if triton is importable."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:   # find, don't import: keeps `import blastfx` light
        return False
    from ..structures.blast.ops import _blast_matmul_op, _grad_mix_op
    from ..structures.blast.quant.ops import _quantized_op

    _blast_matmul_op.register_kernel("cuda")(_cuda_blast_matmul)
    _quantized_op.register_kernel("cuda")(_cuda_blast_matmul_quantized)
    _grad_mix_op.register_kernel("cuda")(_cuda_grad_mix)
    return True
