"""Run a function right after a module is imported (at once if it already is).

Why: blastfx registers itself with transformers, peft and diffusers, but importing any of them takes
seconds, which ``import blastfx`` must not cost a user who never touches them. A finder at the front
of ``sys.meta_path`` lets the other finders locate the watched module and wraps its loader, so the
registration runs after the module's own code and before its importer gets it back: a plain
``AutoModelForCausalLM.from_pretrained`` after ``import blastfx`` already knows the quantization method.

A callback that fails warns (:class:`IntegrationWarning`) instead of breaking the import of the
other library.
"""
from __future__ import annotations

import importlib.abc
import sys
import threading
import warnings
from typing import Callable

_lock = threading.RLock()
_pending: dict[str, list[Callable]] = {}


class IntegrationWarning(UserWarning):
    """blastfx could not register itself with another library."""


def _run(name: str, callbacks: list[Callable], module) -> None:
    for callback in callbacks:
        try:
            callback(module)
        except Exception as err:            # never break the other library's import
            warnings.warn(f"blastfx could not register with {name}: {type(err).__name__}: {err}",
                          IntegrationWarning, stacklevel=2)


class _Loader:
    """The real loader, then the callbacks; every other attribute (resource readers, get_source,
    ...) is the real loader's."""

    def __init__(self, loader, name: str):
        self._loader = loader
        self._name = name

    def __getattr__(self, attr):
        return getattr(self._loader, attr)

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        self._loader.exec_module(module)
        with _lock:
            callbacks = _pending.pop(self._name, [])
        _run(self._name, callbacks, module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader, fullname)
        return spec


_finder = _Finder()


def when_imported(name: str, callback: Callable) -> None:
    """Call ``callback(module)`` once module ``name`` is imported: now if it already is, else right
    after its import."""
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            _pending.setdefault(name, []).append(callback)
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
            return
    _run(name, [callback], module)
