"""Saving and loading compressed models.

A checkpoint is a folder holding two files of blastfx's: the weights, ``model-<hash>.safetensors``
(the whole state dict, tied weights stored once), and the manifest ``blastfx.json`` (format, library
version, plan, dtypes, and the sha256 of the weights file). ``load(dir, model)`` verifies the checksum,
re-applies the plan to a freshly built dense model of the same architecture (no factorization) and
loads the tensors, checking names, shapes, dtypes and the factors' zero padding first.

Why this layout: ``save`` never touches a file it did not write, and the folder holds a complete
checkpoint at every instant. The weights go to a new, content-named file beside the old one; the
manifest, replaced last with one ``os.replace``, is the commit: before it the old manifest names the
old weights, after it the new one names the new weights. Only then are the old weights deleted; a
file whose deletion was cut short stays listed (``superseded``) and goes at the next save.

Both this folder and the ones ``save_pretrained`` writes carry a model card (README.md, see
:mod:`blastfx.integrations.model_card`), never replacing one a person wrote.

Transformers and diffusers models: ``model.save_pretrained(dir)`` records the plan as the
``quantization_config`` of config.json, and a plain ``from_pretrained(dir)`` of the model's class
rebuilds the BLAST layers, once blastfx is imported (:mod:`blastfx.integrations.transformers`);
:func:`from_pretrained` is that call with the class read from the config.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import warnings
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from . import structures
from ._version import __version__
from .build import empty_layers
from .plan import LayerPlan, Plan, check_plan_fits
from .structures.blast.nn import BlastLinear
from .swap import PLAN_ATTR, attach_plan, swap_modules

FORMAT = 2
META_FILE = "blastfx.json"
WEIGHTS_NAME = re.compile(r"model-[0-9a-f]{16}\.safetensors")     # the only names save ever deletes
TMP_PREFIX = ".blastfx-"


def model_plan(model: nn.Module) -> Plan:
    """The plan of the BLAST layers ``model`` really has (what a load must rebuild).

    The plan recorded by :func:`blastfx.compress` describes only that call's layers: a model compressed
    twice, or with BLAST layers put in by hand, holds more. Layers are read from the modules; budget,
    strategy and notes come from the recorded plan, whose parameter total grows by the layers it
    did not plan."""
    recorded = getattr(model, PLAN_ATTR, None)
    recorded = recorded if isinstance(recorded, Plan) else None
    found = {name: m for name, m in model.named_modules() if isinstance(m, structures.module_types())}
    if not found:
        raise ValueError("this model has no blastfx plan and no BLAST layers: compress it with blastfx.compress first")
    known = recorded.layers if recorded is not None else {}
    layers = {}
    for name, m in found.items():
        lp = known.get(name)
        structure = structures.of_module(m)         # its size read off the module (BLAST: rank, blocks, factors)
        layers[name] = LayerPlan.of(structure.name, m.out_features, m.in_features, structure.size_of(m),
                                    kind=lp.kind if lp else "linear", bias=m.bias is not None,
                                    method=lp.method if lp else None)
    extra = [name for name in layers if name not in known]
    if recorded is None:
        plan = Plan(layers, 0.0, "manual", sum(lp.dense_params for lp in layers.values()),
                    ["built from the model's BLAST layers: no compress plan was recorded"])
        plan.budget = plan.kept_fraction
        return plan
    plan = dataclasses.replace(recorded, layers=layers, notes=list(recorded.notes),
                               dense_total=recorded.dense_total + sum(layers[name].dense_params for name in extra),
                               dense=[name for name in recorded.dense if name not in layers])
    if extra:
        plan.notes.append(f"{len(extra)} BLAST layers not planned by the last compress call (e.g. {extra[0]}) "
                          "are counted in dense_total")
    return plan


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path, directory: bool = False) -> None:
    """Flush to disk (a rename is only durable once the data and then the folder are)."""
    with contextlib.suppress(OSError):          # folders cannot be opened for fsync on some platforms
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _owned_files(path: Path) -> set[str]:
    """The weights files the folder's current manifest says blastfx wrote (none if it has no readable one)."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(meta, dict):
        return set()
    names = list(meta.get("files", {}) if isinstance(meta.get("files"), dict) else ())
    names += meta.get("superseded", []) if isinstance(meta.get("superseded"), list) else []
    return {n for n in names if isinstance(n, str) and WEIGHTS_NAME.fullmatch(n)}


def _unlink(file: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(file)


def save(model: nn.Module, path) -> Path:
    """Write the compressed ``model`` to folder ``path`` (created if needed).

    Only blastfx's own files in the folder are replaced (see the module docstring); other files stay.
    At every instant the folder holds the complete old checkpoint or the complete new one, whatever
    interrupts the save. ``NotADirectoryError`` if ``path`` is an existing file."""
    plan = model_plan(model)
    for name, m in model.named_modules():
        if isinstance(m, BlastLinear):
            m.check_padding(f"layer {name!r}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "cannot save a checkpoint: the path exists and is not a folder",
                                 str(path))
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    old = _owned_files(path)
    temps: list[Path] = []
    weights = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".tmp", dir=path)
        os.close(fd)
        temps.append(Path(tmp))
        save_model(model, tmp)
        _fsync(Path(tmp))
        sha = _sha256(Path(tmp))
        weights = f"model-{sha[:16]}.safetensors"
        os.replace(tmp, path / weights)
        meta = {"format": FORMAT, "blastfx_version": __version__, "model_class": type(model).__qualname__,
                "plan": plan.to_dict(), "dtypes": sorted({str(p.dtype) for p in model.state_dict().values()}),
                "files": {weights: {"sha256": sha}}, "superseded": sorted(old - {weights})}
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".tmp", dir=path)
        temps.append(Path(tmp))
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(meta, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / META_FILE)          # the commit
        _fsync(path, directory=True)
    except BaseException:
        for tmp in temps:
            _unlink(tmp)
        # an interrupt can land right after the commit: the manifest on disk, not a flag, says what it holds
        if weights is not None and weights not in old and weights not in _owned_files(path):
            _unlink(path / weights)
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()                     # only if empty
        raise
    for name in sorted(old - {weights}):
        _unlink(path / name)
    _write_card(model, path)
    return path


def _write_card(model: nn.Module, path: Path) -> None:
    """The model card, after the commit: the checkpoint is complete whether or not it can be written."""
    from .integrations import card_for
    from .integrations.model_card import write_model_card

    name = type(model).__name__
    load = (f"import blastfx\n\n"
            f"model = {name}(...)  # a freshly built, dense {name} of the same architecture\n"
            f"model = blastfx.load(\"path/to/{path.name}\", model)")
    try:
        write_model_card(path, card_for(model, path, load_code=load))
    except OSError as err:
        warnings.warn(f"{path}: checkpoint saved, but its model card could not be written: {err}", UserWarning,
                      stacklevel=3)


def read_meta(path) -> dict:
    """The checked manifest of checkpoint folder ``path``; ``ValueError`` naming the file otherwise."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{path} is not a blastfx checkpoint: {META_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"corrupt {meta_path}: {err}") from None
    if isinstance(meta, dict) and meta.get("format") == 1 and "plan" in meta:
        # the first format: one model.safetensors, no checksum; still read, with a warning
        warnings.warn(f"{meta_path} is an older blastfx checkpoint without a checksum: its weights are not "
                      "verified; save it again to add one", UserWarning, stacklevel=3)
        return {**meta, "files": {"model.safetensors": {"sha256": None}}}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} has format {meta.get('format') if isinstance(meta, dict) else '?'}; "
                         f"this blastfx (version {__version__}) reads format {FORMAT}")
    files = meta.get("files")
    if (not isinstance(files, dict) or not files
            or not all(isinstance(k, str) and WEIGHTS_NAME.fullmatch(k) and isinstance(v, dict)
                       and isinstance(v.get("sha256"), str) for k, v in files.items())):
        raise ValueError(f"corrupt {meta_path}: field 'files' must map model-<hash>.safetensors names to "
                         f"{{\"sha256\": ...}}, got {files!r}")
    if "plan" not in meta:
        raise ValueError(f"corrupt {meta_path}: field 'plan' is missing")
    return meta


def _read_tensors(file: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise ValueError(f"checkpoint weights {file} are missing")
    if sha256 is not None and _sha256(file) != sha256:
        raise ValueError(f"corrupt checkpoint weights {file}: its sha256 does not match the checksum in "
                         f"{META_FILE} (the file was changed or damaged after it was saved)")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"corrupt checkpoint weights {file}: {err}") from None


def load_into(model: nn.Module, plan: Plan, tensors: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Give ``model`` the plan's (empty) BLAST layers and load ``tensors``; all-or-nothing."""
    try:
        check_plan_fits(model, plan)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    new = empty_layers(model, plan)
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
        for name, layer in new.items():
            if isinstance(layer, BlastLinear):
                layer.check_padding(f"checkpoint {source}, layer {name!r}")
        if hasattr(model, "tie_weights"):
            model.tie_weights()
    except BaseException:
        swap_modules(model, old)
        raise
    attach_plan(model, plan)
    return model


def load(path, model: nn.Module) -> nn.Module:
    """Load a checkpoint written by :func:`save` into ``model`` (a dense model of the same architecture,
    e.g. freshly constructed). Returns the model, compressed, with the saved weights. ``ValueError``,
    with the model left as it was, if the checkpoint is damaged or does not fit."""
    path = Path(path)
    meta = read_meta(path)
    plan = Plan.from_dict(meta["plan"], path / META_FILE)
    tensors = {}
    for name, info in meta["files"].items():
        tensors.update(_read_tensors(path / name, info["sha256"]))
    return load_into(model, plan, tensors, str(path))


def from_pretrained(path, model_class=None, **kwargs):
    """Load a model saved with ``save_pretrained`` after :func:`blastfx.compress`: the class's own
    ``from_pretrained(path, **kwargs)`` (``dtype=``, ``device_map=`` and the rest as usual), the class
    read from the config's ``architectures`` unless ``model_class`` is given. The BLAST layers are
    built on the meta device and the factors loaded into them; nothing dense is allocated for them."""
    from .integrations.transformers import from_pretrained as hf_from_pretrained

    return hf_from_pretrained(path, model_class, **kwargs)
