"""Residency: some modules' parameters and buffers put on the compute device for a while, then sent home.

Why one place: streaming mode keeps the model where it lives (the CPU) and brings one block at a time
to the accelerator, so every move of a weight goes through :class:`Residency`. Entering copies each
tensor to the compute device (always a copy, so the home tensors are never written while resident).
Leaving must be exact and cheap: a tensor the work did not change gets its original home tensor back
(no copy back; storage shared as before, so tied or memory-mapped weights stay so); one changed in
place (reconstruction's norm weights) is copied home; one swapped in meanwhile (a built BLAST layer)
is moved home. Whether a tensor changed is read from its version counter, which every in-place
operation bumps and replacing ``.data`` does not.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from ..timing import stage


def concrete_device(device) -> torch.device:
    """``device`` with its index filled in ("cuda" -> "cuda:0", the current one), as tensors report it:
    what tensor devices are compared with."""
    device = torch.device(device)
    if device.index is None and device.type not in ("cpu", "meta"):
        return torch.empty(0, device=device).device
    return device


def module_tensors(modules: Iterable[nn.Module], skip: Iterable[nn.Module] = ()):
    """Every (module, kind, name, tensor) of the parameters and buffers under ``modules``, once per
    tensor object (tied weights once), not descending into the modules in ``skip``."""
    skipped = {id(m) for m in skip}
    seen_modules, seen_tensors = set(), set()
    stack = list(modules)[::-1]
    while stack:
        module = stack.pop()
        if id(module) in skipped or id(module) in seen_modules:
            continue
        seen_modules.add(id(module))
        for kind in ("_parameters", "_buffers"):
            for name, tensor in getattr(module, kind).items():
                if tensor is not None and id(tensor) not in seen_tensors:
                    seen_tensors.add(id(tensor))
                    yield module, kind, name, tensor
        stack.extend(list(module._modules.values())[::-1])


class Residency:
    """The parameters and buffers of ``modules`` (not those under ``skip``) on ``device`` between
    :meth:`enter` and :meth:`leave` (or as a context manager). Tensors are moved by replacing their
    ``.data``, so every Parameter object, hook and reference to it stays valid. ``replaced``: a dict
    that collects {id: (tensor, original home tensor)} for the tensors sent home with a new value, so
    that a caller undoing the work can give them their original storage back."""

    def __init__(self, modules: Iterable[nn.Module], device, skip: Iterable[nn.Module] = (),
                 replaced: dict | None = None):
        self.modules, self.skip = list(modules), list(skip)
        self.device = concrete_device(device)
        self.replaced = replaced
        self.homes: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}   # id -> (tensor, home data, version)
        self.resident = False

    def enter(self) -> "Residency":
        if self.resident:
            raise RuntimeError("Residency.enter: already resident")
        self.homes = {}
        self.resident = True
        try:
            with stage("residency"):
                for _, _, _, tensor in module_tensors(self.modules, self.skip):
                    home = tensor.data
                    tensor.data = home.to(self.device, copy=True)
                    self.homes[id(tensor)] = (tensor, home, tensor._version)
        except BaseException:
            self.leave()
            raise
        return self

    def copies(self) -> dict[int, torch.Tensor]:
        """{storage address of a resident copy: its home tensor}, while resident."""
        return {tensor.untyped_storage().data_ptr(): home for tensor, home, _ in self.homes.values()
                if tensor.device == self.device}

    def leave(self) -> None:
        """Every recorded tensor home (its original home tensor if unchanged, else a copy of its new
        value); tensors swapped in meanwhile moved to the home device of the tensors they replaced."""
        if not self.resident:
            return
        self.resident = False
        with stage("residency"):
            self._send_home()
        self.homes = {}

    def _send_home(self) -> None:
        home_device = next((home.device for _, home, _ in self.homes.values()), None)
        for tensor, home, version in self.homes.values():
            if tensor._version == version:
                tensor.data = home
            else:
                tensor.data = tensor.data.to(home.device)
                if self.replaced is not None:
                    self.replaced.setdefault(id(tensor), (tensor, home))
        if home_device is not None:
            for _, _, _, tensor in module_tensors(self.modules, self.skip):
                if id(tensor) not in self.homes and tensor.device != home_device:
                    tensor.data = tensor.data.to(home_device)

    def __enter__(self) -> "Residency":
        return self.enter()

    def __exit__(self, *exc) -> None:
        self.leave()


class LayerByLayer:
    """A stand-in for the model where code reads layers one at a time through ``get_submodule`` and uses
    each weight right away (the planner's measurements: spectra, probes): the layer asked for is brought
    to the compute device and the one asked for before sent home. A weight already read stays valid
    (its compute copy lives as long as something references it). Close it (or use it as a context
    manager) to send the last one home."""

    def __init__(self, model: nn.Module, device):
        self.model, self.device = model, concrete_device(device)
        self.current: Residency | None = None

    def get_submodule(self, name: str) -> nn.Module:
        module = self.model.get_submodule(name)
        if self.current is None or self.current.modules[0] is not module:
            self.close()
            self.current = Residency([module], self.device).enter()
        return module

    def close(self) -> None:
        current, self.current = self.current, None
        if current is not None:
            current.leave()

    def __enter__(self) -> "LayerByLayer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def layer_by_layer(model: nn.Module, device):
    """:class:`LayerByLayer` over ``model`` on ``device``; with ``device`` None the model itself, in a
    context that does nothing."""
    return contextlib.nullcontext(model) if device is None else LayerByLayer(model, device)
