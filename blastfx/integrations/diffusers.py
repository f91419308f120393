"""diffusers: the quantization method ``"blastfx"``, and BLAST layers in layerwise casting and group
offloading.

``blastfx.compress`` on a diffusers model (a DiT, PixArt or SD3 transformer, ...) registers a
:class:`BlastfxDiffusersConfig` as the model's ``quantization_config``, so ``save_pretrained``, alone
or from ``pipe.save_pretrained``, writes the plan into the component's config.json; its
``from_pretrained`` (also the one a pipeline's ``from_pretrained`` calls per component) then builds
the BLAST layers on the meta device and loads the factors, once blastfx is imported. A BLAST tensor
missing from the checkpoint is an error, never a random weight. ``model.dequantize()`` gives back
dense layers.

diffusers' layerwise casting (``enable_layerwise_casting``) and group offloading act on a fixed tuple
of layer types, to which :mod:`blastfx.integrations` adds :class:`BlastLinear` when ``diffusers.hooks``
is imported, so BLAST factors are stored in the storage dtype (and offloaded) like the weights of the
layers they replaced.

Importing this module registers the quantization method.
"""
from __future__ import annotations

import enum

from diffusers.configuration_utils import FrozenDict
from diffusers.quantizers import auto as _auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin

from ..structures.blast.nn import BlastLinear
from ._record import QUANT_METHOD, PlanRecord, build_planned_layers, check_checkpoint, finish_load


class Method(str, enum.Enum):
    """diffusers reads ``quant_method.value``; the string itself is ``"blastfx"``."""
    BLASTFX = QUANT_METHOD


class BlastfxDiffusersConfig(PlanRecord, QuantizationConfigMixin):
    """config.json's ``quantization_config`` of a blastfx-compressed diffusers model (see
    :class:`blastfx.integrations.transformers.BlastfxConfig`)."""

    quant_method = Method.BLASTFX


def _source(model) -> str:
    return str(model.config.get("_name_or_path", "") or "the checkpoint")


class BlastfxDiffusersQuantizer(DiffusersQuantizer):
    """Builds the plan's BLAST layers before the weights are loaded (see the module docstring)."""

    requires_calibration = True
    quantization_config: BlastfxDiffusersConfig

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._checkpoint_keys = None

    def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
        self._checkpoint_keys = set(loaded_keys)
        return loaded_keys

    def _process_model_before_weight_loading(self, model, **kwargs):
        plan = self.quantization_config.to_plan()
        if self._checkpoint_keys is not None:
            check_checkpoint(plan, self._checkpoint_keys, _source(model))
        build_planned_layers(model, plan, _source(model))
        return model

    def update_missing_keys(self, model, missing_keys, prefix):
        blast = {f"{name}.{k}" for name, m in model.named_modules() if isinstance(m, BlastLinear)
                 for k, _ in m.named_parameters()}
        missing = sorted(blast & {f"{prefix}{k}" if prefix else k for k in missing_keys})
        if missing:
            raise ValueError(f"{_source(model)}: {len(missing)} BLAST tensors are not in the checkpoint (e.g. "
                             f"{missing[0]}): the weights do not match the blastfx plan in config.json")
        return missing_keys

    def _process_model_after_weight_loading(self, model, **kwargs):
        finish_load(model, self.quantization_config.to_plan(), _source(model))
        return model

    def dequantize(self, model):
        """The dense layers the BLAST layers compute, records dropped."""
        from ..dense import to_dense

        return to_dense(model)

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def _set_config(model, **entries) -> None:
    """Replace entries of the model's frozen config (None removes one)."""
    merged = {k: v for k, v in {**model._internal_dict, **entries}.items() if v is not None}
    model._internal_dict = FrozenDict(merged)


def attach(model, plan) -> None:
    """What ``from_pretrained`` would leave on a loaded model, for a model ``compress`` just changed."""
    from . import bind_model_card

    current = getattr(model, "hf_quantizer", None)
    if current is not None and not isinstance(current, BlastfxDiffusersQuantizer):
        method = getattr(current.quantization_config, "quant_method", "?")
        raise ValueError(f"this model is quantized with {getattr(method, 'value', method)!r} (model.hf_quantizer); "
                         "diffusers records one quantization method per model, so blastfx cannot record its plan: "
                         "compress the unquantized model")
    config = BlastfxDiffusersConfig(plan)
    quantizer = BlastfxDiffusersQuantizer(config, pre_quantized=True)
    _set_config(model, quantization_config=config)
    model.hf_quantizer = quantizer
    model.quantization_method = Method.BLASTFX
    bind_model_card(model)


def refresh(model) -> None:
    """Record the BLAST layers the model has now in its config (before ``save_pretrained`` writes it)."""
    record = model.config.get("quantization_config")
    if isinstance(record, PlanRecord):
        record.refresh(model)
        _set_config(model, quantization_config=record)


def detach(model) -> None:
    """Drop the quantization records (the model has dense layers again)."""
    for name in ("hf_quantizer", "quantization_method"):
        vars(model).pop(name, None)
    model.is_quantized = False
    record = model.config.get("quantization_config")
    if isinstance(record, PlanRecord) or (isinstance(record, dict) and record.get("quant_method") == QUANT_METHOD):
        model._internal_dict = FrozenDict({k: v for k, v in model._internal_dict.items() if k != "quantization_config"})


def register() -> None:
    """Make ``"blastfx"`` a quantization method diffusers knows (idempotent)."""
    for mapping, cls in ((_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, BlastfxDiffusersConfig),
                         (_auto.AUTO_QUANTIZER_MAPPING, BlastfxDiffusersQuantizer)):
        present = mapping.get(QUANT_METHOD)
        if present is None:
            mapping[QUANT_METHOD] = cls
        elif present is not cls:
            raise RuntimeError(f"diffusers already has a quantization method {QUANT_METHOD!r} "
                               f"({present.__module__}.{present.__qualname__})")


register()
