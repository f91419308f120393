"""What ``compress(calibration=...)`` accepts, turned into a list of batches the model runs on.

* an iterable of batches: each a tensor (passed positionally), a dict (keyword arguments) or a
  tuple/list (positional arguments), as a DataLoader yields them;
* a 2-D integer tensor of token ids ``(rows, seq)``: split into batches of about
  :data:`BATCH_TOKENS` tokens, given as ``input_ids=`` to models whose forward takes it (HF models,
  which then also return their loss), positionally to others;
* a list of strings with ``tokenizer=``: the texts joined (each ended by the tokenizer's EOS token),
  tokenized, and cut into rows of :data:`TEXT_SEQ_LEN` tokens (fewer if the model's context or the
  texts are shorter), then batched as token ids.

Anything else is a ``TypeError`` / ``ValueError`` naming what was given, raised before the model is
touched.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

BATCH_TOKENS = 2048           # tokens per batch made from token-id rows (4 rows of 512)
TEXT_SEQ_LEN = 512            # tokens per row made from texts

_BATCH_KINDS = "a tensor (passed positionally), a dict (keyword arguments) or a tuple (positional arguments)"


def forward_takes(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` has a parameter called ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def token_id_batches(model: nn.Module, ids: torch.Tensor) -> list:
    """Rows of token ids (rows, seq) as batches of about BATCH_TOKENS tokens."""
    if ids.dim() != 2 or ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"calibration given as one tensor must be token ids, an integer tensor (rows, seq); got a "
                         f"{ids.dtype} tensor of shape {tuple(ids.shape)}. Pass other inputs as a list of batches, "
                         "e.g. calibration=[x] or list(x.split(32))")
    if ids.numel() == 0:
        raise ValueError(f"calibration is an empty tensor of token ids, shape {tuple(ids.shape)}")
    chunks = ids.split(max(1, BATCH_TOKENS // ids.shape[1]))
    if forward_takes(model, "input_ids"):
        return [{"input_ids": c} for c in chunks]
    return list(chunks)


def _max_positions(model: nn.Module, tokenizer) -> int:
    limits = [TEXT_SEQ_LEN]
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value:
        limits.append(value)
    return min(limits)


def text_rows(model: nn.Module, texts: list[str], tokenizer) -> torch.Tensor:
    """The texts joined with EOS, tokenized, as (rows, seq) token ids."""
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a callable tokenizer (e.g. transformers.AutoTokenizer), got "
                        f"{type(tokenizer).__name__}")
    eos = getattr(tokenizer, "eos_token", None) or ""
    encoded = tokenizer("".join(t + eos for t in texts), return_tensors="pt")
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded     # a BatchEncoding, or ids
    ids = torch.as_tensor(ids).reshape(-1)
    if ids.numel() == 0:
        raise ValueError(f"the {len(texts)} calibration texts tokenize to no tokens")
    seq = min(_max_positions(model, tokenizer), ids.numel())
    rows = ids.numel() // seq
    return ids[:rows * seq].view(rows, seq)


def calibration_batches(model: nn.Module, calibration, tokenizer=None) -> list | None:
    """``calibration`` (see the module docstring) as a list of batches; None if it is None."""
    if calibration is None:
        if tokenizer is not None:
            raise ValueError("tokenizer= tokenizes calibration texts, but calibration= is not given")
        return None
    if isinstance(calibration, (str, bytes)):
        raise TypeError(f"calibration is one {type(calibration).__name__}; pass a list of texts with tokenizer=")
    if isinstance(calibration, dict):
        raise TypeError("calibration is one dict; pass a list of batches, e.g. calibration=[batch]")
    if torch.is_tensor(calibration):
        if tokenizer is not None:
            raise ValueError("tokenizer= is only used with calibration texts, but calibration is a tensor")
        return token_id_batches(model, calibration)
    try:
        items = list(calibration)
    except TypeError:
        raise TypeError("calibration must be an iterable of batches, a 2-D tensor of token ids or a list of texts "
                        f"(with tokenizer=), got {type(calibration).__name__}") from None
    if not items:
        raise ValueError(f"calibration is empty (an empty {type(calibration).__name__})")
    if all(isinstance(x, str) for x in items):
        if tokenizer is None:
            raise TypeError(f"calibration is a list of texts ({len(items)}): pass tokenizer= to tokenize them")
        return token_id_batches(model, text_rows(model, items, tokenizer))
    if tokenizer is not None:
        raise ValueError(f"tokenizer= is only used with calibration texts, but calibration holds "
                         f"{type(items[0]).__name__} items")
    for k, batch in enumerate(items):
        if isinstance(batch, str):
            raise TypeError(f"calibration[{k}] is a str among other batches: give either only texts "
                            f"(with tokenizer=) or only batches")
        if not (torch.is_tensor(batch) or isinstance(batch, (dict, tuple, list))):
            raise TypeError(f"calibration[{k}] is a {type(batch).__name__}: each batch must be {_BATCH_KINDS}")
        if torch.is_tensor(batch) and batch.dim() < 2 and not batch.is_floating_point():
            raise ValueError(f"calibration[{k}] is a {batch.dim()}-D integer tensor, shape {tuple(batch.shape)}: token "
                             "ids need a batch dimension, (rows, seq); pass the 2-D tensor itself as calibration=")
    return items
