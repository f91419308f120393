"""Kernel options held in a context variable, so a choice covers a block of code or one compiled graph
and never leaks into the rest of the process.

Two layers, both :class:`contextvars.ContextVar`:

* the *active* options, read when a forward kernel runs (``blastfx.kernels.dispatch``,
  ``.autotune``); ``with options(...)`` sets them for the block. The backward does not read them
  where it runs (CUDA backward runs on an autograd thread, outside the caller's context): the op's
  autograd formula takes the ``kernels`` choice when the forward runs and passes it to
  ``blastfx::blast_grad_mix`` as an argument. So an eager call's backward uses its forward's choice.
* the options *bound* to a graph being compiled (:func:`binding`). The blast backend compiles under
  them, and while AOTAutograd traces the formula it takes the bound choice instead
  (:func:`backward_kernels`): the compiled backward graph carries the graph's own choice, or ``None``
  (read where the backward kernel runs) when the model was compiled without one.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, fields, replace

import torch

KERNELS = ("triton", "reference")


@dataclass(frozen=True)
class KernelOptions:
    """Which kernels the op runs; ``None`` fields inherit from the enclosing scope (finally the defaults).

    ``kernels``: "triton" (the fused Triton / cuBLAS paths on CUDA) or "reference" (the plain-PyTorch
    reference of ``blastfx.structures.blast.ops``). ``autotune``: time the forward's candidate paths once per shape and
    token bucket (True) or always run the untimed default path (False).
    """
    kernels: str | None = None
    autotune: bool | None = None

    def __post_init__(self):
        if self.kernels is not None and self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.autotune is not None and not isinstance(self.autotune, bool):
            raise ValueError(f"autotune must be True or False, got {self.autotune!r}")

    def over(self, base: KernelOptions) -> KernelOptions:
        """These options with the fields they leave unset taken from ``base``."""
        return replace(base, **{f.name: getattr(self, f.name) for f in fields(self)
                                if getattr(self, f.name) is not None})


DEFAULTS = KernelOptions(kernels="triton", autotune=True)
_active: contextvars.ContextVar[KernelOptions] = contextvars.ContextVar("blastfx_kernel_options",
                                                                         default=DEFAULTS)
_bound: contextvars.ContextVar[KernelOptions | None] = contextvars.ContextVar("blastfx_graph_kernel_options",
                                                                               default=None)


def current() -> KernelOptions:
    """The options in effect here, every field resolved."""
    return _active.get()


@contextlib.contextmanager
def options(*, kernels: str | None = None, autotune: bool | None = None):
    """Run the block with these kernel options (arguments left ``None`` keep the enclosing choice)::

        with blastfx.kernels.options(kernels="reference"):
            loss = model(x).loss
            loss.backward()
    """
    with active(KernelOptions(kernels=kernels, autotune=autotune)):
        yield


@contextlib.contextmanager
def active(opts: KernelOptions):
    """:func:`options` for a :class:`KernelOptions` object."""
    token = _active.set(opts.over(_active.get()))
    try:
        yield
    finally:
        _active.reset(token)


@contextlib.contextmanager
def binding(opts: KernelOptions):
    """Compile a graph with ``opts`` bound to it: active for the compile, and what
    :func:`backward_kernels` reports to the autograd formulas traced meanwhile."""
    token = _bound.set(opts)
    try:
        with active(opts):
            yield
    finally:
        _bound.reset(token)


def backward_kernels() -> str | None:
    """The ``kernels`` argument for the backward of an op call whose forward runs now: the options
    in effect for an eager call (its backward may run on another thread, which does not see them);
    while the blast backend compiles a graph, that graph's own choice or ``None``; while another
    compiler traces, ``None``. A traced value becomes a constant of the backward graph, so only a
    graph's own options may be traced in, never the block that happened to surround the compile."""
    bound = _bound.get()
    if bound is not None:
        return bound.kernels
    return None if torch.compiler.is_compiling() else _active.get().kernels


def resolve_kernels(kernels: str | None) -> str:
    """An op's explicit ``kernels`` argument if given (validated), else the active choice. On every
    op call's path: no objects built for the common ``None``."""
    if kernels is None:
        return _active.get().kernels
    return KernelOptions(kernels=kernels).kernels
