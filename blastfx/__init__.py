"""blastfx: compress trained PyTorch models with BLAST matrices and compile them to fused kernels."""
from . import structures  # registers each structure family, and with BLAST torch.ops.blastfx.*
from ._version import __version__
from .kernels import dispatch as _dispatch
from .api import BudgetWarning, WeightOnlyWarning, compress, plan_for
from .config import BlastConfig, LayerOverride
from .structures.blast.factorize import BlastFactors, factorize
from .structures.blast.layout import BlastShape
from .structures.blast.nn import BlastLinear
from .structures.blast.ops import blast_matmul, blast_matmul_reference, blast_to_dense
from .analyze import Analysis, analyze
from .io import from_pretrained, load, save
from .dense import to_dense
from . import compiler as _compiler
from . import integrations as _integrations
from .plan import LayerPlan, Plan
from .llm.recovery import FinetuneState, finetune, teacher_generate

_dispatch.register()
_compiler.register()         # backend="blast", also for a checkout that was never pip-installed
_integrations.install()      # transformers, peft, diffusers: each registered when (if) it is imported

__all__ = ["Analysis", "BlastConfig", "BudgetWarning", "WeightOnlyWarning", "BlastFactors", "BlastLinear", "BlastShape", "FinetuneState", "LayerOverride",
           "LayerPlan", "Plan", "analyze", "blast_matmul", "blast_matmul_reference", "blast_to_dense", "compress",
           "factorize", "finetune", "from_pretrained", "load", "plan_for", "save", "teacher_generate", "to_dense",
           "__version__"]
