"""Building: a fitted (or empty) module for every planned layer, by its structure and method (:mod:`.builder`)."""
from .builder import MAX_BATCH_ELEMENTS, BuildOptions, build_layers, empty_layers, method_for, method_of, needs

__all__ = ["MAX_BATCH_ELEMENTS", "BuildOptions", "build_layers", "empty_layers", "method_for", "method_of", "needs"]
