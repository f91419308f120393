"""Regional compilation: compile each block holding BLAST layers on its own, not the whole model.

Why: compiling a whole 30-layer LLM inlines every layer's BLAST calls (forward and backward) into one
graph, and Inductor generates and compiles kernels for all of it; the cold start took 219 s for
SmolLM2-135M on an H100 (``benchmarks/train_step_profile.py --whole``), most of a short recovery run. The decoder blocks share
their class and code, and dynamo passes parameters as graph inputs, so one compiled block serves every
layer of the same shapes: cold start drops to about one block's worth. This is PyTorch's documented
regional-compilation recipe, applied to the blocks ``compress`` put BLAST layers in.

A budget spread by sensitivity gives every layer its own ranks. Dynamo guards on parameter shapes, so
that would be one graph per layer (twice: training and no-grad): SmolLM2's 30 blocks took 11.5 of a
20-minute recovery run to compile on an H100, and past dynamo's recompile limit (8) the rest silently
ran eagerly. With ``dynamic_ranks`` the blocks' parameter shapes are traced symbolically instead
(``force_parameter_static_shapes=False`` around each call), so after one specialized graph a second,
shape-generic one serves every other layer: 2 graphs for training instead of 6 for 6 distinct
layers on the CPU, a third of the compile time. The recompile limit is raised as well, for what guards
remain (e.g. ranks that are equal in one block and not in another, or layers the plan kept dense: each
mix of dense and BLAST layers is a block structure of its own, which symbolic shapes cannot merge).
Both settings are dynamo config patched around each call of a compiled block only: the process-wide
config is never written, so other compiled code keeps its own limits, and ``undo()`` leaves nothing
behind.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

import torch._dynamo.config as dynamo_config

from ..analyze import block_of
from ..structures.blast.nn import BlastLinear


@dataclass
class CompiledBlocks:
    """Which blocks ``compile_blocks`` compiled; ``undo()`` puts their eager forwards back."""
    model: nn.Module
    names: list[str]

    def undo(self) -> None:
        for name in self.names:
            block = self.model.get_submodule(name)
            if "forward" in vars(block):
                del block.forward


def compile_blocks(model: nn.Module, backend="blast", dynamic_ranks: bool | None = None,
                   **compile_kwargs) -> CompiledBlocks:
    """Compile, in place, the forward of every repeated block (or lone layer) holding a BlastLinear with
    ``torch.compile(..., backend=backend, **compile_kwargs)``. The model stays the user's module (its
    state dict, ``save``, ``generate`` are untouched); ``.undo()`` on the result reverts it.

    ``dynamic_ranks``: trace parameter shapes symbolically (default: when blocks of one class hold
    different shapes, i.e. the plan gave layers their own ranks). Each compiled block runs with dynamo's
    recompile limit raised to at least the number of graphs its blocks could need (only while it runs)."""
    names = sorted({block_of(n) for n, m in model.named_modules() if isinstance(m, BlastLinear)})
    if not names:
        raise ValueError("compile_blocks: the model has no BlastLinear layers; compress it first")
    most = max(_distinct_shapes(model, names).values())
    if dynamic_ranks is None:
        dynamic_ranks = most > 1
    compiled = CompiledBlocks(model, [])
    for name in names:
        block = model.get_submodule(name)
        if "forward" in vars(block):
            compiled.undo()
            raise ValueError(f"compile_blocks: {name}.forward is already overridden on the instance "
                             "(compiled twice?); undo the earlier compile first")
        forward = torch.compile(block.forward, backend=backend, **compile_kwargs)
        block.forward = _scoped(forward, graphs=2 * most + 2, dynamic_ranks=dynamic_ranks)
        compiled.names.append(name)
    return compiled


def _scoped(forward, graphs: int, dynamic_ranks: bool):
    """``forward`` run under the dynamo settings the blocks need: a recompile limit of at least
    ``graphs`` (never below the process-wide one), and symbolic parameter shapes if ``dynamic_ranks``.
    Dynamo reads both while it compiles, which happens inside the call, so patching around the call is
    enough and nothing outlives it."""
    @functools.wraps(forward)
    def run(*args, **kwargs):
        changes = {"recompile_limit": max(graphs, dynamo_config.recompile_limit)}
        if dynamic_ranks:
            changes["force_parameter_static_shapes"] = False
        with dynamo_config.patch(changes):
            return forward(*args, **kwargs)
    return run


def _distinct_shapes(model: nn.Module, names: list[str]) -> dict[type, int]:
    """Per block class: how many distinct parameter-shape sets its blocks hold (dynamo guards on
    parameter shapes, so each set is one graph of the class's shared forward)."""
    shapes: dict[type, set] = {}
    for name in names:
        block = model.get_submodule(name)
        shapes.setdefault(type(block), set()).add(tuple(tuple(p.shape) for p in block.parameters()))
    return {cls: len(s) for cls, s in shapes.items()}
