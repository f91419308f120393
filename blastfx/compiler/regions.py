"""Regional compilation: compile each block holding BLAST layers on its own, not the whole model.

Why: compiling a whole 30-layer LLM inlines every layer's BLAST calls (forward and backward) into one
graph, and Inductor generates and compiles kernels for all of it; the cold start took 219 s for
SmolLM2-135M on an H100 (benchmarks/RESULTS.md), most of a short recovery run. The decoder blocks share
their class and code, and dynamo passes parameters as graph inputs, so one compiled block serves every
layer of the same shapes: cold start drops to about one block's worth. This is PyTorch's documented
regional-compilation recipe, applied to the blocks ``compress`` put BLAST layers in.

A budget spread by sensitivity gives every layer its own ranks, so one block class can need one graph
per layer (twice: training and no-grad). Past dynamo's recompile limit (8) it silently runs the rest
eagerly, so the limit is raised to what the blocks need.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import torch._dynamo.config as dynamo_config

from ..api import block_of
from ..nn import BlastLinear


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


def compile_blocks(model: nn.Module, backend="blast", **compile_kwargs) -> CompiledBlocks:
    """Compile, in place, the forward of every repeated block (or lone layer) holding a BlastLinear with
    ``torch.compile(..., backend=backend, **compile_kwargs)``. The model stays the user's module (its
    state dict, ``save``, ``generate`` are untouched); ``.undo()`` on the result reverts it. Raises
    dynamo's (process-wide) recompile limit if the blocks hold more distinct shapes than it allows."""
    names = sorted({block_of(n) for n, m in model.named_modules() if isinstance(m, BlastLinear)})
    if not names:
        raise ValueError("compile_blocks: the model has no BlastLinear layers; compress it first")
    _allow_graphs(2 * max(_distinct_shapes(model, names).values()) + 2)
    compiled = CompiledBlocks(model, [])
    for name in names:
        block = model.get_submodule(name)
        if "forward" in vars(block):
            compiled.undo()
            raise ValueError(f"compile_blocks: {name}.forward is already overridden on the instance "
                             "(compiled twice?); undo the earlier compile first")
        block.forward = torch.compile(block.forward, backend=backend, **compile_kwargs)
        compiled.names.append(name)
    return compiled


def _distinct_shapes(model: nn.Module, names: list[str]) -> dict[type, int]:
    """Per block class: how many distinct parameter-shape sets its blocks hold (dynamo guards on
    parameter shapes, so each set is one graph of the class's shared forward)."""
    shapes: dict[type, set] = {}
    for name in names:
        block = model.get_submodule(name)
        shapes.setdefault(type(block), set()).add(tuple(tuple(p.shape) for p in block.parameters()))
    return {cls: len(s) for cls, s in shapes.items()}


def _allow_graphs(count: int) -> None:
    """Raise dynamo's per-function recompile limit to at least ``count`` (named cache_size_limit in
    older releases)."""
    key = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    if getattr(dynamo_config, key) < count:
        setattr(dynamo_config, key, count)
