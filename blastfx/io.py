"""Saving and loading compressed models.

``save(model, dir)`` writes ``model.safetensors`` (the whole state dict, tied weights stored once)
and ``blastfx.json`` (format, library version, plan, dtypes). ``load(dir, model)`` re-applies the plan
to a freshly built dense model of the same architecture (no factorization) and loads the tensors,
checking names, shapes and dtypes first. Writes are atomic: a temporary directory renamed into place.

HF models: ``model.save_pretrained(dir)`` already records the plan (``config.blastfx``);
``from_pretrained(dir)`` rebuilds the BLAST layers and loads the weights.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from ._version import __version__
from .api import attach_plan
from .passes.substitute import build_layers, swap_modules
from .plan import Plan

FORMAT = 1
META_FILE, WEIGHTS_FILE = "blastfx.json", "model.safetensors"


def _plan_of(model) -> Plan:
    plan = getattr(model, "blastfx_plan", None)
    if not isinstance(plan, Plan):
        raise ValueError("this model has no blastfx plan: compress it with blastfx.compress first")
    return plan


def save(model: nn.Module, path) -> Path:
    """Write a compressed model to directory ``path`` atomically (replacing what is there)."""
    plan = _plan_of(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_model(model, str(tmp / WEIGHTS_FILE))
        meta = {"format": FORMAT, "blastfx_version": __version__, "model_class": type(model).__qualname__,
                "plan": plan.to_dict(),
                "dtypes": sorted({str(p.dtype) for p in model.state_dict().values()})}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_meta(path) -> dict:
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{path} is not a blastfx checkpoint: {META_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt {meta_path}: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} has format {meta.get('format') if isinstance(meta, dict) else '?'}; "
                         f"this blastfx (version {__version__}) reads format {FORMAT}")
    return meta


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise ValueError(f"checkpoint weights {file} are missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"corrupt checkpoint weights {file}: {err}") from None


def load_into(model: nn.Module, plan: Plan, tensors: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Give ``model`` the plan's (empty) BLAST layers and load ``tensors``; all-or-nothing."""
    from .api import _check_plan_fits

    _check_plan_fits(model, plan)
    new = build_layers(model, plan, empty=True, progress=False)
    old = swap_modules(model, new)
    try:
        expected = model.state_dict()
        problems = [f"{k}: checkpoint {tuple(v.shape)} {v.dtype}, model {tuple(expected[k].shape)} {expected[k].dtype}"
                    for k, v in tensors.items() if k in expected and
                    (v.shape != expected[k].shape or v.dtype != expected[k].dtype)]
        unexpected = sorted(set(tensors) - set(expected))
        missing = set(expected) - set(tensors)
        # tied weights are stored once: a missing key is fine if it shares storage with a present one
        ptrs = {expected[k].data_ptr() for k in tensors if k in expected}
        missing = sorted(k for k in missing if expected[k].data_ptr() not in ptrs)
        if problems or unexpected or missing:
            raise ValueError(f"checkpoint {source} does not fit this model: "
                             + "; ".join(problems[:5] + [f"unexpected {unexpected[:5]}"] * bool(unexpected)
                                         + [f"missing {missing[:5]}"] * bool(missing)))
        model.load_state_dict(tensors, strict=False)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
    except BaseException:
        swap_modules(model, old)
        raise
    attach_plan(model, plan)
    return model


def load(path, model: nn.Module) -> nn.Module:
    """Load a checkpoint written by :func:`save` into ``model`` (a dense model of the same architecture,
    e.g. freshly constructed). Returns the model, compressed, with the saved weights."""
    meta = read_meta(path)
    plan = Plan.from_dict(meta["plan"])
    return load_into(model, plan, _read_tensors(Path(path) / WEIGHTS_FILE), str(path))


def from_pretrained(path, model_class=None, **kwargs):
    """Load an HF model saved with ``save_pretrained`` after :func:`blastfx.compress`.

    ``model_class`` defaults to the class named in the config's ``architectures``. The dense model is
    built from the config (no weights read), given the plan's BLAST layers, then loaded.
    """
    import transformers

    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(path, **kwargs)
    plan_dict = getattr(config, "blastfx", None)
    if plan_dict is None:
        raise ValueError(f"{path} has no blastfx plan in its config.json: was it compressed with blastfx?")
    if model_class is None:
        archs = getattr(config, "architectures", None) or []
        if not archs or not hasattr(transformers, archs[0]):
            raise ValueError(f"cannot tell the model class of {path}: pass model_class=")
        model_class = getattr(transformers, archs[0])
    model = model_class._from_config(config, torch_dtype=getattr(config, "torch_dtype", None))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} holds no .safetensors weights")
    tensors = {}
    for f in files:
        tensors.update(_read_tensors(f))
    return load_into(model.eval(), Plan.from_dict(plan_dict), tensors, str(path))
