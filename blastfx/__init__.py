"""blastfx: compress trained PyTorch models with BLAST matrices and compile them to fused kernels."""
from . import structures  # noqa: F401 -- registers each structure family, and with BLAST torch.ops.blastfx.*
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
from .timing import StageTimes, stage_times
from . import integrations as _integrations
from .plan import LayerPlan, Plan
from .llm.recovery import FinetuneState, finetune, teacher_generate

_dispatch.register()


def _register_backend() -> None:
    """backend="blast" for a checkout that was never pip-installed. Installed, the entry point
    registers it when dynamo first looks, so import time does not pay for importing dynamo."""
    from importlib.metadata import entry_points

    if not any(ep.name == "blast" for ep in entry_points(group="torch_dynamo_backends")):
        from .compiler import register
        register()


def __getattr__(name: str):
    """``blastfx.inference_options`` without importing the compiler (and dynamo) with blastfx."""
    if name == "inference_options":
        from .compiler import inference_options
        return inference_options
    raise AttributeError(f"module 'blastfx' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"inference_options"})


_register_backend()
_integrations.install()      # transformers, peft, diffusers: each registered when (if) it is imported

__all__ = ["Analysis", "BlastConfig", "BudgetWarning", "WeightOnlyWarning", "BlastFactors", "BlastLinear", "BlastShape", "FinetuneState", "LayerOverride",
           "LayerPlan", "Plan", "StageTimes", "analyze", "blast_matmul", "blast_matmul_reference", "blast_to_dense", "compress",
           "factorize", "finetune", "from_pretrained", "inference_options", "load", "plan_for", "save", "stage_times", "teacher_generate", "to_dense",
           "__version__"]
