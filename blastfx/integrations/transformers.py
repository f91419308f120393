"""The transformers quantization method ``"blastfx"``.

``blastfx.compress`` on a ``PreTrainedModel`` sets ``config.quantization_config`` to a
:class:`BlastfxConfig` (the plan inside) and ``model.hf_quantizer``, so ``save_pretrained`` writes the
plan into config.json beside the factors. A plain ``from_pretrained`` of that folder, once blastfx is
imported, goes through :class:`BlastfxHfQuantizer`: the dense model is built on the meta device as
usual, the planned layers are swapped for empty BLAST layers there (nothing dense is ever allocated
for them), and transformers loads the factors with ``dtype=`` and ``device_map=`` honoured.

Never random weights: the checkpoint's tensor names are checked against the plan before anything is
loaded, and after loading every BLAST parameter must have come from the checkpoint. A folder of the
older layout (the plan under config.json's ``blastfx`` key, no ``quantization_config``) is read as
this method, with a warning.

``model.dequantize()`` replaces the BLAST layers by the dense layers they compute
(:func:`blastfx.to_dense`) and drops the quantization config.

Importing this module registers the quantization method (``import blastfx`` arranges that for when
transformers is imported).
"""
from __future__ import annotations

import functools
import warnings

import torch
from safetensors import safe_open
from transformers.quantizers import auto as _auto
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..structures import module_types
from ._record import QUANT_METHOD, PlanRecord, build_planned_layers, check_checkpoint, finish_load

LEGACY_KEY = "blastfx"          # where the plan lived in config.json before the quantization config


class BlastfxConfig(PlanRecord, QuantizationConfigMixin):
    """config.json's ``quantization_config`` of a blastfx-compressed transformers model: the plan
    (which layers are BLAST, with which blocks and rank), and the blastfx version that wrote it."""


def _checkpoint_keys(model, files) -> set[str] | None:
    """The names the tensors of safetensors ``files`` (headers only) load into: transformers renames
    some on load (ViT's ``encoder.layer.0.attention.attention.query`` is ``layers.0.attention.q_proj``).
    None when they cannot be listed or renamed as transformers would; the check after loading remains."""
    if not files or not all(str(f).endswith(".safetensors") for f in files):
        return None
    keys: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            keys.update(handle.keys())
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
        meta = model.state_dict()
        prefix = getattr(model, "base_model_prefix", None) or None
        return {rename_source_key(k, renamings, [], prefix, meta)[0] for k in keys}
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


def _source(model) -> str:
    return str(getattr(model.config, "name_or_path", "") or "the checkpoint")


def _spare_ancestors_from_init(model, names, keys) -> None:
    """After loading, transformers runs each module's ``_init_weights`` unless the module is flagged
    initialized, and a parent's may reach into a child's ``.weight`` (GPT-2 rescales ``c_proj.weight``),
    which a BLAST child does not have. Flag the ancestors of the BLAST layers whose own tensors all
    come from the checkpoint: they have nothing of their own to initialize (their children are
    initialized, or skipped as loaded, on their own)."""
    from transformers import PreTrainedModel

    for name in names:
        parts = name.split(".")
        for depth in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:depth])
            module = model.get_submodule(prefix)
            if isinstance(module, PreTrainedModel):
                break
            own = [f"{prefix}.{k}" for k, v in module._parameters.items() if v is not None]
            own += [f"{prefix}.{k}" for k, v in module._buffers.items()
                    if v is not None and k not in module._non_persistent_buffers_set]
            if all(k in keys for k in own) if keys is not None else not own:
                module._is_hf_initialized = True


class BlastfxHfQuantizer(HfQuantizer):
    """Builds the plan's BLAST layers before the weights are loaded (see the module docstring)."""

    requires_calibration = True          # a folder of dense weights cannot be loaded "as blastfx"
    quantization_config: BlastfxConfig

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        plan = self.quantization_config.to_plan()
        build_planned_layers(model, plan, _source(model))        # on the meta device: a failure below costs nothing
        keys = _checkpoint_keys(model, checkpoint_files)
        if keys is not None:
            check_checkpoint(plan, keys, _source(model))
        _spare_ancestors_from_init(model, plan.layers, keys)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # transformers flags every tensor it loaded; a BLAST tensor without the flag was missing and is garbage
        if any(getattr(p, "_is_hf_initialized", False) for p in model.parameters()):
            unloaded = [f"{name}.{k}" for name, m in model.named_modules() if isinstance(m, module_types())
                        for k, p in m.named_parameters() if not getattr(p, "_is_hf_initialized", False)]
            if unloaded:
                raise ValueError(f"{_source(model)}: {len(unloaded)} BLAST tensors were not in the checkpoint (e.g. "
                                 f"{unloaded[0]}): the weights do not match the blastfx plan in config.json")
        finish_load(model, self.quantization_config.to_plan(), _source(model))
        _mark_quantized_configs(model)
        return model

    def get_state_dict_and_metadata(self, model, *args, **kwargs):
        """Called by ``save_pretrained`` before it writes config.json: the config records the layers the
        model has now (see :meth:`PlanRecord.refresh`)."""
        self.quantization_config.refresh(model)
        model.config.quantization_config = self.quantization_config
        return None, {}

    def dequantize(self, model, dtype=None):
        """The dense layers the BLAST layers compute (in ``dtype``, default the factors'), records dropped."""
        from ..dense import to_dense

        return to_dense(model, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def _mark_quantized_configs(model) -> None:
    """``config._is_quantized`` on every sub-model, as transformers does for a loaded quantized model:
    attention code then takes the compute dtype from the config, not from a ``Linear`` weight (the
    BLAST layers have none)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config._is_quantized = True


def attach(model, plan) -> None:
    """What ``from_pretrained`` would leave on a loaded model, for a model ``compress`` just changed:
    the quantization config, the quantizer, the model card on ``save_pretrained``."""
    from . import bind_model_card

    current = getattr(model, "hf_quantizer", None)
    if current is not None and not isinstance(current, BlastfxHfQuantizer):
        method = getattr(current.quantization_config, "quant_method", "?")
        raise ValueError(f"this model is quantized with {getattr(method, 'value', method)!r} (model.hf_quantizer); "
                         "transformers records one quantization method per model, so blastfx cannot record its "
                         "plan: dequantize it first (model.dequantize()) or compress the unquantized model")
    config = BlastfxConfig(plan)
    quantizer = BlastfxHfQuantizer(config, pre_quantized=True)
    model.config.quantization_config = config
    vars(model.config).pop(LEGACY_KEY, None)
    model.hf_quantizer = quantizer
    model.quantization_method = QUANT_METHOD
    _mark_quantized_configs(model)
    bind_model_card(model)


def detach(model) -> None:
    """Drop the quantization records (the model has dense layers again)."""
    from transformers import PreTrainedModel

    for name in ("hf_quantizer", "quantization_method"):
        vars(model).pop(name, None)
    model.is_quantized = False
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            vars(module.config).pop("_is_quantized", None)
            if isinstance(getattr(module.config, "quantization_config", None), BlastfxConfig) or (
                    isinstance(getattr(module.config, "quantization_config", None), dict)
                    and module.config.quantization_config.get("quant_method") == QUANT_METHOD):
                del module.config.quantization_config


def upgrade_legacy_config(config) -> None:
    """A config of the older layout (plan under ``blastfx``, no ``quantization_config``) gets the
    equivalent quantization config, in place, with a warning; any other config is left alone."""
    plan = vars(config).get(LEGACY_KEY) if hasattr(config, "__dict__") else None
    if plan is None or getattr(config, "quantization_config", None) is not None:
        return
    config.quantization_config = BlastfxConfig(plan).to_dict()
    del config.blastfx
    warnings.warn(f"{getattr(config, 'name_or_path', '') or 'this config'}: a blastfx folder of the older layout "
                  "(plan under config.json's 'blastfx' key); loading it as quantization method 'blastfx'. Save it "
                  "again to write the current layout.", UserWarning, stacklevel=4)


def _guard_legacy_folders(modeling_utils) -> None:
    """Route a plain ``from_pretrained`` of an older-layout folder through the quantizer (without this,
    transformers knows nothing of the plan and returns the dense layers randomly initialized)."""
    original = getattr(modeling_utils, "get_hf_quantizer", None)
    if original is None:
        warnings.warn("this transformers has no modeling_utils.get_hf_quantizer: folders saved by older blastfx "
                      "(plan under config.json's 'blastfx' key) load only through blastfx.from_pretrained",
                      UserWarning, stacklevel=2)
        return
    if getattr(original, "_blastfx_legacy_guard", False):
        return

    @functools.wraps(original)
    def get_hf_quantizer(config, *args, **kwargs):
        upgrade_legacy_config(config)
        return original(config, *args, **kwargs)

    get_hf_quantizer._blastfx_legacy_guard = True
    modeling_utils.get_hf_quantizer = get_hf_quantizer


def register() -> None:
    """Make ``"blastfx"`` a quantization method transformers knows (idempotent)."""
    import transformers.modeling_utils as modeling_utils

    for mapping, cls in ((_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, BlastfxConfig),
                         (_auto.AUTO_QUANTIZER_MAPPING, BlastfxHfQuantizer)):
        present = mapping.get(QUANT_METHOD)
        if present is None:
            mapping[QUANT_METHOD] = cls
        elif present is not cls:
            raise RuntimeError(f"transformers already has a quantization method {QUANT_METHOD!r} "
                               f"({present.__module__}.{present.__qualname__})")
    _guard_legacy_folders(modeling_utils)


def from_pretrained(path, model_class=None, **kwargs):
    """``model_class.from_pretrained(path, **kwargs)`` (``dtype=``, ``device_map=``, ...), the class
    taken from the config's ``architectures`` when not given. ``ValueError`` if the folder holds no
    blastfx plan (a dense model is not what this call promises)."""
    import transformers

    register()
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
    record = getattr(config, "quantization_config", None)
    method = record.get("quant_method") if isinstance(record, dict) else getattr(record, "quant_method", None)
    if method != QUANT_METHOD and LEGACY_KEY not in vars(config):
        raise ValueError(f"{path}: config.json has no blastfx plan (quantization_config with quant_method "
                         f"{QUANT_METHOD!r}): was it saved after blastfx.compress?")
    if model_class is None:
        archs = getattr(config, "architectures", None) or []
        if not archs or not hasattr(transformers, archs[0]):
            raise ValueError(f"cannot tell the model class of {path} from its config.json (architectures="
                             f"{archs!r}): pass model_class=")
        model_class = getattr(transformers, archs[0])
    return model_class.from_pretrained(path, **kwargs)

register()
