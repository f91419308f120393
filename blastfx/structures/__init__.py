"""Structure families, each a sub-package registering itself with :mod:`.base` when imported.

Every sub-package here is imported with this package, so adding a family is adding its folder.
"""
import importlib
import pkgutil

from .base import Method, Structure, get, ladders, method_names, module_types, names, of_module, register, registered

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if _info.ispkg:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["Method", "Structure", "get", "ladders", "method_names", "module_types", "names", "of_module", "register",
           "registered"]
