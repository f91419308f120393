"""blastfx inside other libraries, so a compressed model travels like any other.

* transformers (:mod:`.transformers`): the quantization method ``"blastfx"``. ``compress`` records the
  plan as ``config.quantization_config``; a plain ``from_pretrained`` builds the BLAST layers on the
  meta device and loads the factors; ``model.dequantize()`` gives back dense layers.
* peft (:mod:`.peft`): LoRA on BLAST layers (named targets and ``"all-linear"``); merging is exact.
* diffusers (:mod:`.diffusers`): the same quantization method for diffusers models, so pipelines save
  and load compressed components; layerwise casting and group offloading cast and move BLAST factors.
* a model card (:mod:`.model_card`) in every folder ``save_pretrained`` or :func:`blastfx.save` writes.

:func:`install` (run by ``import blastfx``) imports none of these libraries: each registration runs
when the library is imported, or at once if it already is.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path

from ._imports import IntegrationWarning, when_imported

__all__ = ["IntegrationWarning", "install", "record_plan", "forget_plan", "library_of"]


def _registration(name: str):
    """Import integration module ``name``, which registers itself when its import completes (so an
    import of it that triggered the other library's import, and with it this callback, still ends
    registered)."""
    def callback(_module=None):
        module = importlib.import_module(f"{__name__}.{name}")
        if hasattr(module, "register"):
            module.register()
    return callback


_BLAST_LAYER_TUPLE = "_GO_LC_SUPPORTED_PYTORCH_LAYERS"


def _diffusers_hooks(_module=None) -> None:
    """Add :class:`~blastfx.BlastLinear` to the layer types diffusers' layerwise casting and group
    offloading act on, so BLAST factors are stored in the storage dtype (and offloaded) like the weights
    of the layers they replaced. Each hooks module holds its own reference to the tuple."""
    from ..structures.blast.nn import BlastLinear

    for name in ("diffusers.hooks._common", "diffusers.hooks.layerwise_casting", "diffusers.hooks.group_offloading"):
        module = sys.modules.get(name)
        layers = getattr(module, _BLAST_LAYER_TUPLE, None) if module is not None else None
        if layers is None:
            if name != "diffusers.hooks._common":
                warnings.warn(f"{name} has no {_BLAST_LAYER_TUPLE}: diffusers' layerwise casting and group offloading"
                              " may leave BLAST layers in their dtype and place", IntegrationWarning, stacklevel=2)
        elif BlastLinear not in layers:
            setattr(module, _BLAST_LAYER_TUPLE, (*layers, BlastLinear))


def install() -> None:
    """Register blastfx with transformers, peft and diffusers, each when it is imported."""
    when_imported("transformers.modeling_utils", _registration("transformers"))
    when_imported("peft", _registration("peft"))
    when_imported("diffusers.hooks", _diffusers_hooks)
    when_imported("diffusers.models.modeling_utils", _registration("diffusers"))


def library_of(model) -> str | None:
    """``"transformers"``, ``"diffusers"`` or None: whose model class ``model`` is (checked without
    importing either library: a model of theirs means it is imported already)."""
    hf = sys.modules.get("transformers.modeling_utils")
    if hf is not None and isinstance(model, hf.PreTrainedModel):
        return "transformers"
    df = sys.modules.get("diffusers.models.modeling_utils")
    if df is not None and isinstance(model, df.ModelMixin):
        return "diffusers"
    return None


def record_plan(model, plan) -> None:
    """Record ``plan`` where the model's library saves it, so that the library's own
    ``save_pretrained`` / ``from_pretrained`` round trip rebuilds the BLAST layers: the
    quantization config of transformers and diffusers models, the ``blastfx`` key of any other
    ``config`` with a ``to_dict``. Raises before changing anything if it cannot."""
    library = library_of(model)
    if library == "transformers":
        from .transformers import attach
        attach(model, plan)
    elif library == "diffusers":
        from .diffusers import attach
        attach(model, plan)
    else:
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            cfg.blastfx = plan.to_dict()


def forget_plan(model) -> None:
    """Drop every record :func:`record_plan` (or a load) left, once the model has no BLAST layer."""
    library = library_of(model)
    if library == "transformers":
        from .transformers import detach
        detach(model)
    elif library == "diffusers":
        from .diffusers import detach
        detach(model)
    cfg = getattr(model, "config", None)
    if cfg is not None and not isinstance(cfg, dict) and "blastfx" in getattr(cfg, "__dict__", {}):
        del cfg.blastfx
    vars(model).pop("blastfx_plan", None)
    vars(model).pop("save_pretrained", None)


class SavePretrainedWithCard:
    """What a compressed model's ``save_pretrained`` attribute is: its class's ``save_pretrained`` (the
    config recording the BLAST layers the model has now), then the model card. An object, not a bound
    method, so the model still pickles (``torch.save(model)``) and deep-copies."""

    def __init__(self, model):
        self.model = model

    def __call__(self, save_directory, *args, **kwargs):
        model = self.model
        if library_of(model) == "diffusers":         # diffusers writes config.json before asking its quantizer
            from .diffusers import refresh
            refresh(model)
        result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and os.path.isdir(save_directory):
            from .model_card import write_model_card
            write_model_card(save_directory, card_for(model, Path(save_directory)))
        return result


def bind_model_card(model) -> None:
    """Make this model's ``save_pretrained`` also write the model card (an attribute of this object
    only: its class, and every other model, are left alone)."""
    model.save_pretrained = SavePretrainedWithCard(model)


def card_for(model, folder: Path, load_code: str | None = None) -> str:
    """The model card of compressed ``model`` saved to ``folder``."""
    from ..io import model_plan
    from ..structures.blast.nn import BlastLinear
    from .model_card import model_card

    plan = model_plan(model)
    name = type(model).__name__
    library = library_of(model)
    if load_code is None:
        load_code = (f"import blastfx  # registers the \"blastfx\" quantization method with {library}\n"
                     f"from {library} import {name}\n\n"
                     f"model = {name}.from_pretrained(\"path/to/{folder.name}\")  # dtype=, device_map= as usual\n"
                     "# model.dequantize()  # in place, if you need dense linear layers again")
    params = {id(p): p.numel() for p in model.parameters()}
    blast = {id(p): p.numel() for m in model.modules() if isinstance(m, BlastLinear)
             for p in (m.U, m.S, m.V)}
    return model_card(plan, title=f"{name}, compressed with blastfx", load_code=load_code,
                      total_params=sum(params.values()), blast_params=sum(blast.values()))
