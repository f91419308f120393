"""Load a script of ``examples/`` as a module, so tests can call its functions."""
import importlib.util
import sys
from pathlib import Path


def load_example(name):
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module                  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module
