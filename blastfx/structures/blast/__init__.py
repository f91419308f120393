"""BLAST matrices (Block-Level Adaptive STructured, Lee et al., NeurIPS 2024): the geometry
(:mod:`.layout`), the op and its plain-PyTorch reference (:mod:`.ops`, ``torch.ops.blastfx.*``), the
layer (:mod:`.nn`), factorization methods (:mod:`.factorize`), the original release's layouts
(:mod:`.interop`), and the structure record the pipeline uses (:mod:`.structure`)."""
from ..base import register
from .structure import BLAST

register(BLAST)
