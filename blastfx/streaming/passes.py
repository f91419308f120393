"""Whole-model passes over a streamed model: the calibration forwards (and the loss-gradient pass) run
as usual, with only the model's non-block modules and the one block being called on the compute device.

The blocks (:func:`units`) are the children of the model's outermost ``ModuleList`` / ``Sequential``
containers: an HF decoder's layers, a DiT's transformer blocks, a Sequential model's children. The
rest (embeddings, final norm, head) stays on the compute device for the whole pass. A forward
pre-hook brings a block in when it is called and sends the one before it home, so at most one block
is resident at any time, whatever the model's forward does between block calls.

A backward pass would keep every block's weights on the compute device (autograd saves them for the
backward), so :meth:`StreamedPasses.saved_tensors_at_home` keeps what autograd saves at home: a
saved weight by reference to its home tensor (nothing copied, brought back when the backward needs
it), any other saved tensor copied home. The compute device then holds one block and the
activations in flight.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .residency import Residency, concrete_device

_WEIGHT, _MOVED = "weight", "moved"


def units(model: nn.Module) -> list[str]:
    """The names of the modules a streamed pass brings in one at a time (see the module docstring), in
    model order."""
    found: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for key, child in module.named_children():
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(module, (nn.ModuleList, nn.Sequential)):
                found.append(name)
            else:
                visit(name, child)
    visit("", model)
    return found


def to_device(value, device):
    """``value`` with every tensor in it (through tuples, lists and dicts) on ``device``; a container with
    nothing to move is returned as it is, one with something moved rebuilt as its own type."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        items = [to_device(v, device) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        items = {k: to_device(v, device) for k, v in value.items()}
        if all(items[k] is v for k, v in value.items()):
            return value
        try:
            return type(value)(items)
        except TypeError:
            return items
    return value


def home_device(model: nn.Module) -> torch.device:
    """Where the model's weights live (its first parameter's or buffer's device; the CPU if it has none)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


class StreamedPasses:
    """While entered: the model's non-block modules on ``device``, each block brought in when called
    (the one before it sent home), the model's inputs moved to ``device``. On exit everything is home
    again, exactly as it was (see :class:`~.residency.Residency`)."""

    def __init__(self, model: nn.Module, device):
        self.model, self.device = model, concrete_device(device)
        self.home = home_device(model)
        self.blocks = [model.get_submodule(n) for n in units(model)]
        self.rest = Residency([model], self.device, skip=self.blocks)
        self.current: Residency | None = None
        self.homes: dict[int, torch.Tensor] = {}          # storage address of a resident copy -> home tensor
        self.handles: list = []

    def __enter__(self) -> "StreamedPasses":
        try:
            self.rest.enter()
            self.homes = self.rest.copies()
            self.handles.append(self.model.register_forward_pre_hook(self._inputs_in, with_kwargs=True))
            for block in self.blocks:
                self.handles.append(block.register_forward_pre_hook(self._bring_in, with_kwargs=True, prepend=True))
                self.handles.append(block.register_forward_hook(self._send_home))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self._leave_current()
        self.rest.leave()
        self.homes = {}

    def _inputs_in(self, module, args, kwargs):
        return to_device(args, self.device), to_device(kwargs, self.device)

    def _bring_in(self, module, args, kwargs):
        if self.current is None or self.current.modules[0] is not module:
            self._leave_current()
            self.current = Residency([module], self.device).enter()
            self.homes.update(self.current.copies())
        return to_device(args, self.device), to_device(kwargs, self.device)

    def _send_home(self, module, args, out) -> None:
        if self.current is not None and self.current.modules[0] is module:
            self._leave_current()

    def _leave_current(self) -> None:
        if self.current is not None:
            for address in self.current.copies():
                self.homes.pop(address, None)
            current, self.current = self.current, None
            current.leave()

    @contextlib.contextmanager
    def saved_tensors_at_home(self):
        """Within: what autograd saves for the backward kept at home (see the module docstring)."""
        def pack(tensor):
            if tensor.device != self.device or tensor.layout != torch.strided:
                return tensor
            home = self.homes.get(tensor.untyped_storage().data_ptr())
            if home is not None and home.dtype == tensor.dtype:
                return _WEIGHT, home, tensor.size(), tensor.stride(), tensor.storage_offset()
            return _MOVED, tensor.to(self.home, copy=True)

        def unpack(saved):
            if torch.is_tensor(saved):
                return saved
            if saved[0] == _WEIGHT:
                _, home, size, stride, offset = saved
                return home.to(self.device, copy=True).as_strided(size, stride, offset)
            return saved[1].to(self.device)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield


def streamed(model: nn.Module, device):
    """:class:`StreamedPasses` over ``model`` on ``device``; with ``device`` None (no streaming) a
    context that does nothing and gives None."""
    return contextlib.nullcontext() if device is None else StreamedPasses(model, device)
