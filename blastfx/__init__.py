"""blastfx: compress trained PyTorch models with BLAST matrices and compile them to fused kernels."""
from . import ops  # registers torch.ops.blastfx.*
from .factorize import BlastFactors, factorize
from .layout import BlastShape
from .nn import BlastLinear
from .ops import blast_matmul, blast_matmul_reference, blast_to_dense

__version__ = "0.1.0"

__all__ = ["BlastFactors", "BlastLinear", "BlastShape", "blast_matmul", "blast_matmul_reference",
           "blast_to_dense", "factorize", "__version__"]
