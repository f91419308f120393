"""``torch.compile(model, backend="blast")``: Inductor with BLAST-aware graph passes and kernels.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so it works without
importing blastfx first. Lowering choice, two ways (:mod:`.lowering` says why):

* extern: ``blastfx::blast_matmul`` stays one opaque custom op (autograd, fake and reference
  single-sourced in ``blastfx.ops``); on CUDA its kernel is ``blastfx.kernels.dispatch``, which runs
  the fastest of the Triton / cuBLAS-backed paths for the shape and token bucket
  (``blastfx.kernels.autotune``). Used for decode sizes, where the tuner's split-reduction kernels
  can win and CUDA graphs hide the op's Python cost. Tuning happens on the first eager (warm-up) call
  of a shape, never during graph capture.
* inline: a call with a prefill-sized token count on CUDA is rewritten in the dynamo graph into two
  batched GEMMs and a pointwise mix that Inductor fuses with the bias, cast and output layout, so the
  generated code launches them with no Python per layer (training differentiates these ops).

Options (``options={...}``): ``"fuse_naive"`` (default True) rewrites the original BLAST code's
three-stage forward into the op; ``"kernels"``: "triton" (default on CUDA) or "reference";
``"autotune"`` (default True: time the kernel paths once per shape); ``"lowering"``: "auto"
(default), "inline" or "extern"; any other key is passed to Inductor as a config patch.
"""
from __future__ import annotations

import contextlib

from torch._functorch import config as functorch_config

from .lowering import check_mode, inline_blast_calls
from .patterns import fuse_naive_blast
from .regions import CompiledBlocks, compile_blocks

stats = {"naive_fused": 0, "graphs": 0}
_BLAST_OPTIONS = ("fuse_naive", "kernels", "autotune", "lowering")
_MODES = {None: {}, "default": {}, "reduce-overhead": {"triton.cudagraphs": True},
          "max-autotune": {"max_autotune": True, "triton.cudagraphs": True},
          "max-autotune-no-cudagraphs": {"max_autotune": True}}


def blast_backend(gm, example_inputs, mode=None, options=None):
    import blastfx  # noqa: F401 -- registers torch.ops.blastfx.* when used via the entry point alone
    from torch._inductor.compile_fx import compile_fx

    from ..kernels import dispatch

    options = dict(options or {})
    if mode not in _MODES:
        raise ValueError(f"backend 'blast' supports modes {sorted(m for m in _MODES if m)}, got {mode!r}")
    blast_opts = {k: options.pop(k) for k in _BLAST_OPTIONS if k in options}
    lowering = check_mode(blast_opts.get("lowering", "auto"))
    if "kernels" in blast_opts:
        dispatch.set_kernels(blast_opts["kernels"])
    if "autotune" in blast_opts:
        from ..kernels import autotune
        autotune.settings["enabled"] = bool(blast_opts["autotune"])
    stats["graphs"] += 1
    if blast_opts.get("fuse_naive", True):
        stats["naive_fused"] += fuse_naive_blast(gm)
    inlined = inline_blast_calls(gm, lowering)
    # AOTAutograd's cache keys a Python function call by name, not code: a graph with inlined calls
    # skips it, so an upgraded lowering is never served from a stale entry (Inductor's own cache keys
    # the traced ops and stays on).
    no_aot_cache = functorch_config.patch(enable_autograd_cache=False) if inlined else contextlib.nullcontext()
    with no_aot_cache:
        return compile_fx(gm, example_inputs, config_patches={**_MODES[mode], **options})


__all__ = ["CompiledBlocks", "blast_backend", "compile_blocks", "fuse_naive_blast", "stats"]
