"""Kernels of ``blastfx::blast_matmul`` and the options that choose among them.

Each Triton kernel is checked against :func:`blastfx.structures.blast.ops.blast_matmul_reference`. Which one runs on
CUDA is decided per call (``.dispatch``, ``.autotune``) from the kernel options in effect, which are
scoped, never process-wide:

* a block of code: ``with blastfx.kernels.options(kernels="reference"): loss = model(x)`` runs every
  BLAST call inside the block on the plain-PyTorch reference, and the backward of those calls too,
  wherever ``loss.backward()`` is called; ``autotune=False`` skips timing and runs the default path.
  Blocks nest; arguments left ``None`` keep the enclosing choice; leaving the block restores it, on
  errors and interrupts too.
* one compiled model: ``torch.compile(model, backend="blast", options={"kernels": "reference",
  "autotune": False})`` binds the choice to that model's graphs, forward and backward; another
  model compiled without options keeps the defaults ("triton", autotune on). A model compiled
  without options runs its forward with the block around the call, but its backward graph cannot
  know that block: to train a compiled model on non-default kernels, give the options to
  ``torch.compile``.

``kernels`` applies to calls kept as the op: under ``torch.compile`` with lowering "inline" (or
"auto" at prefill sizes on CUDA) Inductor generates the code and no op kernel runs.
Importing this package needs neither triton nor CUDA.
"""
from .scope import DEFAULTS, KERNELS, KernelOptions, current, options

__all__ = ["DEFAULTS", "KERNELS", "KernelOptions", "current", "options"]
