"""Reconstruction: after a block is factorized, fit its factors jointly to the dense block's outputs (:mod:`.block`)."""
from .block import ReconstructOptions, ReconstructResult, block_parameters, norm_parameters, reconstruct_block

__all__ = ["ReconstructOptions", "ReconstructResult", "block_parameters", "norm_parameters", "reconstruct_block"]
