"""Calibration: stream each target layer's input covariance C = sum x x^T over user batches.

No activations are stored: a forward hook adds ``x^T x`` (float32, n x n) per call. Batches are
whatever the model takes: a tensor (passed positionally), a dict (passed as keyword arguments),
or a tuple (positional arguments).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def run_batch(model: nn.Module, batch, device) -> None:
    if torch.is_tensor(batch):
        model(batch.to(device))
    elif isinstance(batch, dict):
        model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    elif isinstance(batch, (tuple, list)):
        model(*[v.to(device) if torch.is_tensor(v) else v for v in batch])
    else:
        raise ValueError(f"a calibration batch must be a tensor, dict or tuple, got {type(batch).__name__}")


@contextmanager
def _covariance_hooks(model: nn.Module, names):
    covs: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name):
        def hook(module, args, kwargs=None):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            c = x.T @ x
            covs[name] = c if name not in covs else covs[name].add_(c)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        yield covs, counts
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_covariances(model: nn.Module, names, batches) -> dict[str, torch.Tensor]:
    """{layer: mean x x^T over all calibration tokens} for the named linear layers."""
    names = list(names)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with _covariance_hooks(model, names) as (covs, counts):
            for batch in batches:
                run_batch(model, batch, device)
    finally:
        model.train(was_training)
    missing = [n for n in names if n not in covs]
    if missing:
        raise ValueError(f"calibration batches never reached {len(missing)} target layers (e.g. {missing[0]}): "
                         "are they used in forward?")
    return {n: covs[n] / counts[n] for n in names}


def text_batches(tokenizer, tokens: int = 8192, seq_len: int = 512, texts=None, batch_size: int = 4):
    """Calibration batches of ``input_ids`` from text (default: the non-held-out Wikipedia articles)."""
    if texts is None:
        from .data import split_articles
        texts = split_articles()[0]
    from .evaluate import token_windows
    windows = token_windows(tokenizer, texts, seq_len, max_windows=max(1, tokens // seq_len))
    return [{"input_ids": windows[i:i + batch_size]} for i in range(0, len(windows), batch_size)]
