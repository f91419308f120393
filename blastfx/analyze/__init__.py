"""Graph analysis: every linear call site of a model (:mod:`.sites`), from a captured graph (:mod:`.capture`)."""
from .capture import example_inputs_for
from .sites import Analysis, LinearSite, analyze, block_of, dense_weight

__all__ = ["Analysis", "LinearSite", "analyze", "block_of", "dense_weight", "example_inputs_for"]
