"""``torch.compile(model, backend="blast")``: Inductor with BLAST-aware graph passes and kernels.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so it works without
importing blastfx first. Lowering choice: ``blastfx::blast_matmul`` stays one opaque custom op (its
autograd, fake and reference stay single-sourced in ``blastfx.ops``); on CUDA that op's kernel is
``blastfx.kernels.dispatch``, which runs the fastest of the Triton / cuBLAS-backed paths for the
shape and token bucket (``blastfx.kernels.autotune``), so Inductor's generated code calls it as an
extern kernel. A custom lowering or template would have to re-derive that choice inside Inductor's
scheduler; the extern call keeps it in one place. It keeps CUDA graphs (``mode="reduce-overhead"``)
and dynamic shapes working: tuning happens on the first eager (warm-up) call of a shape, never
during graph capture, and the choice is per call from the token count.

Options (``options={...}``): ``"fuse_naive"`` (default True) rewrites the original BLAST code's
three-stage forward into the op; ``"kernels"``: "triton" (default on CUDA) or "reference";
``"autotune"`` (default True: time the kernel paths once per shape); any other key is passed to Inductor as a config patch.
"""
from __future__ import annotations

from .patterns import fuse_naive_blast

stats = {"naive_fused": 0, "graphs": 0}
_BLAST_OPTIONS = ("fuse_naive", "kernels", "autotune")
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
    if "kernels" in blast_opts:
        dispatch.set_kernels(blast_opts["kernels"])
    if "autotune" in blast_opts:
        from ..kernels import autotune
        autotune.settings["enabled"] = bool(blast_opts["autotune"])
    stats["graphs"] += 1
    if blast_opts.get("fuse_naive", True):
        stats["naive_fused"] += fuse_naive_blast(gm)
    return compile_fx(gm, example_inputs, config_patches={**_MODES[mode], **options})


__all__ = ["blast_backend", "fuse_naive_blast", "stats"]
