"""Weights that stay on disk: a model built on the meta device given its tensors from safetensors files,
memory-mapped, so nothing is read until a tensor is used.

Why this is enough for streaming mode: ``safetensors.safe_open(...).get_tensor`` returns a CPU tensor
backed by the file's memory map, and streaming never writes a home tensor (:mod:`.residency` copies
to the compute device and puts the same home tensor back). So each block's pages are read from disk
when the block is brought to the compute device, and being clean file-backed pages, the OS can drop
them again under memory pressure: a model larger than the host's memory compresses, block by block.
What compress builds or changes (the compressed layers, reconstructed norms) lives in ordinary memory.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from contextlib import ExitStack

import torch
from torch import nn

from .residency import module_tensors


def safetensors_files(files) -> list[str]:
    """``files`` (one path, a folder holding ``*.safetensors``, or several paths) as a list of files."""
    paths = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    out = []
    for p in map(os.fspath, paths):
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".safetensors"))
            if not found:
                raise ValueError(f"{p!r} holds no .safetensors file")
            out.extend(found)
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise ValueError(f"safetensors file {p!r} does not exist")
    if not out:
        raise ValueError("no safetensors file given")
    return out


def _meta_tensors(model: nn.Module) -> dict[int, tuple[torch.Tensor, list[str]]]:
    """{id: (tensor, every name it has in the model)} of the model's meta parameters and buffers (a tied
    weight once, under all its names: a checkpoint may hold it under any of them)."""
    names: dict[int, list[str]] = {}
    for kind in ("named_parameters", "named_buffers"):
        for name, tensor in getattr(model, kind)(remove_duplicate=False):
            names.setdefault(id(tensor), []).append(name)
    return {id(t): (t, names[id(t)]) for *_, t in module_tensors([model]) if t.is_meta}


def check_no_meta(model: nn.Module) -> None:
    """A clear error, before anything runs, for a model with weights on the meta device (built there and
    not given its weights): streaming copies weights, and a meta tensor holds none."""
    meta = _meta_tensors(model)
    if meta:
        _, names = next(iter(meta.values()))
        raise ValueError(f"{names[0]!r} (and {len(meta) - 1} more) is on the meta device and holds no values: give the "
                         "model its weights first, e.g. blastfx.streaming.attach_safetensors(model, folder)")


def attach_safetensors(model: nn.Module, files: str | os.PathLike | Iterable) -> nn.Module:
    """Give every meta parameter and buffer of ``model`` its tensor from the safetensors ``files`` (a
    path, a folder of ``*.safetensors``, or several paths), memory-mapped: nothing is read now. Tensors
    not on the meta device are left as they are (a non-persistent buffer, such as a rotary embedding's
    ``inv_freq``, is in no checkpoint: build it on the CPU). Names are the model's state-dict keys;
    the file's tensors must have the model's shapes and dtypes. Every Parameter object is kept (its
    contents swapped), so hooks and references stay valid. All-or-nothing: every name, shape and dtype
    is checked before the first tensor is attached; on an error the model is left on the meta device.
    Returns the model; with ``BlastConfig(sequential=True, compute_device=...)``, compress then reads
    each block from disk when its turn comes."""
    from safetensors import safe_open

    paths = safetensors_files(files)
    wanted = _meta_tensors(model)
    if not wanted:
        raise ValueError("the model has no tensor on the meta device: nothing to attach")
    with ExitStack() as stack:
        opened = [stack.enter_context(safe_open(p, framework="pt")) for p in paths]
        where: dict[str, int] = {}
        for k, f in enumerate(opened):
            for key in f.keys():
                if key in where:
                    raise ValueError(f"tensor {key!r} is in two files: {paths[where[key]]!r} and {paths[k]!r}")
                where[key] = k
        chosen = {}
        for tensor, names in wanted.values():
            key = next((n for n in names if n in where), None)
            if key is None:
                sample = ", ".join(sorted(where)[:3])
                raise ValueError(f"{names[0]!r} is on the meta device and in none of the {len(paths)} safetensors "
                                 f"file(s) (they hold e.g. {sample}); a non-persistent buffer must be built on the CPU")
            value = opened[where[key]].get_tensor(key)
            if value.shape != tensor.shape or value.dtype != tensor.dtype:
                raise ValueError(f"{key!r}: the file holds {value.dtype} {tuple(value.shape)}, the model "
                                 f"{tensor.dtype} {tuple(tensor.shape)}; build the model in the file's dtype")
            chosen[id(tensor)] = (tensor, value)
    done = []
    try:
        for tensor, value in chosen.values():
            new = nn.Parameter(value, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) \
                else value
            torch.utils.swap_tensors(tensor, new)
            done.append((tensor, new))
    except BaseException:
        for tensor, new in reversed(done):
            torch.utils.swap_tensors(tensor, new)
        raise
    return model
