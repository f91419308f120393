"""``torch.compile(model, backend="blast")``: Inductor with BLAST-aware graph passes and kernels.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so an installed
blastfx works without being imported first; ``import blastfx`` also registers it (:func:`register`),
so a checkout on ``PYTHONPATH`` that was never installed works too. Lowering choice, two ways (:mod:`.lowering` says why):

* extern: ``blastfx::blast_matmul`` stays one opaque custom op (autograd, fake and reference
  single-sourced in ``blastfx.structures.blast.ops``); on CUDA its kernel is ``blastfx.kernels.dispatch``, which runs
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
(default), "inline" or "extern"; ``"group_siblings"``: "auto" (default: BLAST layers reading the same
input run as one grouped call at decode sizes on CUDA, in graphs without autograd; :mod:`.grouping`),
"always" or "never"; ``"chain_mlp"``: the same three values for gated MLPs of BLAST layers,
``down(silu(gate(x)) * up(x))``, run as one chained call of three launches (:mod:`.mlp_chain`; it
goes first, so the siblings it chains are not also grouped); ``"chain_norm"``: the same three values,
default "never", for a block's tail, o_proj, the residual add, an RMSNorm and a chained MLP, run as
one ``blastfx::blast_block_tail`` call of four launches (:mod:`.block_tail`; after the MLP chain),
and a tail with the next block's grouped q/k/v across the residual add and norm as one
``blastfx::blast_block_seam`` call of five (:mod:`.block_seam`; after grouping). It is off unless
asked for: the autotuner times each fused form against its parts (the add and norm as one launch,
:mod:`blastfx.kernels.add_norm`, as the graph runs them without the rewrite), and on a
Llama-2-7B-shaped model on an H200 it kept the parts everywhere, the model decoding at 1.21x dense
with the rewrite against 1.23x without it, timed in one process. Any other key
is passed to Inductor as a config patch.

``"kernels"`` and ``"autotune"`` belong to the compiled model, not the process
(:mod:`blastfx.kernels.scope`): each graph the backend returns runs its calls inside
``blastfx.kernels.options(...)`` with them (the op's CUDA kernel reads them when it runs), and its
backward graph carries the kernels choice as an argument of ``blastfx::blast_grad_mix``. A model
compiled without them runs its forward with the options in effect where it is called.
"""
from __future__ import annotations

import contextlib
import functools

from torch._functorch import config as functorch_config

from ..kernels.scope import KernelOptions, active, binding
from .block_seam import seam_block_boundaries
from .block_tail import chain_block_tails
from .grouping import check_group_mode, group_sibling_calls
from .lowering import check_mode, inline_blast_calls
from .mlp_chain import chain_mlp_calls
from .patterns import fuse_naive_blast
from .regions import CompiledBlocks, compile_blocks

stats = {"naive_fused": 0, "graphs": 0}
CHAIN_NORM_DEFAULT = "never"   # block tails and seams: measured slower end to end (see the module docstring)
_BLAST_OPTIONS = ("fuse_naive", "kernels", "autotune", "lowering", "group_siblings", "chain_mlp", "chain_norm")
_MODES = {None: {}, "default": {}, "reduce-overhead": {"triton.cudagraphs": True},
          "max-autotune": {"max_autotune": True, "triton.cudagraphs": True},
          "max-autotune-no-cudagraphs": {"max_autotune": True}}


def blast_backend(gm, example_inputs, mode=None, options=None):
    import blastfx  # noqa: F401 -- registers torch.ops.blastfx.* when used via the entry point alone
    from torch._inductor.compile_fx import compile_fx

    options = dict(options or {})
    if mode not in _MODES:
        raise ValueError(f"backend 'blast' supports modes {sorted(m for m in _MODES if m)}, got {mode!r}")
    blast_opts = {k: options.pop(k) for k in _BLAST_OPTIONS if k in options}
    lowering = check_mode(blast_opts.get("lowering", "auto"))
    kernel_opts = KernelOptions(kernels=blast_opts.get("kernels"), autotune=blast_opts.get("autotune"))
    stats["graphs"] += 1
    if blast_opts.get("fuse_naive", True):
        stats["naive_fused"] += fuse_naive_blast(gm)
    inlined = inline_blast_calls(gm, lowering)
    group_mode = check_group_mode(blast_opts.get("group_siblings", "auto"))
    chain_mode = check_group_mode(blast_opts.get("chain_mlp", "auto"), "chain_mlp")
    norm_mode = check_group_mode(blast_opts.get("chain_norm", CHAIN_NORM_DEFAULT), "chain_norm")
    if _without_autograd(example_inputs):      # the chained and grouped ops have no backward
        chain_mlp_calls(gm, chain_mode)
        chain_block_tails(gm, norm_mode)
        group_sibling_calls(gm, group_mode)
        seam_block_boundaries(gm, norm_mode)
    # AOTAutograd's cache keys a Python function call by name, not code: a graph with inlined calls
    # skips it, so an upgraded lowering is never served from a stale entry (Inductor's own cache keys
    # the traced ops and stays on).
    # The bound kernels choice is a constant of the traced backward that the cache key does not see.
    no_aot_cache = (functorch_config.patch(enable_autograd_cache=False)
                    if inlined or kernel_opts.kernels is not None else contextlib.nullcontext())
    with no_aot_cache, binding(kernel_opts):
        compiled = compile_fx(gm, example_inputs, config_patches={**_MODES[mode], **options})
    return compiled if kernel_opts == KernelOptions() else _run_with(compiled, kernel_opts)


def _without_autograd(example_inputs) -> bool:
    """The graph runs without autograd: grad mode is off where it is compiled (dynamo guards on it),
    or no input requires a gradient."""
    import torch

    return not torch.is_grad_enabled() or not any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


def _run_with(compiled, kernel_opts: KernelOptions):
    """``compiled`` with every call inside ``blastfx.kernels.options`` of ``kernel_opts``: the op's CUDA
    kernel reads the options when the graph runs, long after this compile returned."""
    @functools.wraps(compiled)        # keeps the calling-convention attributes dynamo reads (_boxed_call)
    def run(*args, **kwargs):
        with active(kernel_opts):
            return compiled(*args, **kwargs)
    return run


def inference_options(cudagraphs: bool = True, **options) -> dict:
    """``options`` for ``torch.compile(model, backend="blast", options=...)`` (or a transformers
    ``CompileConfig(backend="blast", mode=None, options=...)``) that serve a model which no longer
    changes: CUDA graphs (``cudagraphs``), and dynamo's guards on nn modules skipped
    (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``); ``options`` adds to them.

    Why: dynamo re-checks every module attribute and parameter a compiled frame read, on every call,
    before the CUDA graph replays. A BLAST layer holds three tensors where ``nn.Linear`` holds one, so
    a compressed model spends more CPU time per call than the dense one did. Where each step waits for
    its result (HF ``generate`` syncs on its stopping checks every token) that time is not hidden
    behind the GPU.

    The price is what the guard filter's name says: nothing dynamo read from nn modules is checked
    before a compiled graph runs. Compile one model per process with these options, or call
    ``torch._dynamo.reset()`` before compiling another model of the same class (it would reuse the
    first one's graph unchecked), and again after changing the model's structure, tensor shapes,
    train/eval mode, hooks or adapters (new values written in place, e.g. ``load_state_dict``, need
    nothing). Call this once per ``torch.compile``: torch.compile pops the guard filter from the dict
    it is given."""
    import torch

    if "mode" in options:
        raise ValueError("inference_options takes Inductor/blast options, not a mode: torch.compile accepts a mode "
                         "or options, not both (CUDA graphs are the cudagraphs argument)")
    return {"triton.cudagraphs": bool(cudagraphs),
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, **options}


def register() -> None:
    """Make ``backend="blast"`` known to dynamo unless the installed entry point already does."""
    import torch._dynamo

    if "blast" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(compiler_fn=blast_backend, name="blast")


__all__ = ["CompiledBlocks", "blast_backend", "inference_options", "register", "compile_blocks", "fuse_naive_blast", "stats"]
