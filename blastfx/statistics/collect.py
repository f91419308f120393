"""Calibration: stream each target layer's input covariance C = sum x x^T over user batches, and
(for the loss-aware objective) the mean squared loss gradient of each of its output channels.

No activations are stored: a forward hook adds ``x^T x`` (float32, n x n) per call. Batches are
whatever the model takes: a tensor (passed positionally), a dict (passed as keyword arguments),
or a tuple (positional arguments).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..config import FISHER_FLOOR
from ..progress import progress_bar
from .inputs import forward_takes


def run_batch(model: nn.Module, batch, device):
    if torch.is_tensor(batch):
        return model(batch.to(device))
    if isinstance(batch, dict):
        return model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return model(*[v.to(device) if torch.is_tensor(v) else v for v in batch])
    raise ValueError(f"a calibration batch must be a tensor, dict or tuple, got {type(batch).__name__}")


@contextmanager
def _covariance_hooks(model: nn.Module, names, store=None):
    covs: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name):
        def hook(module, args, kwargs=None):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            c = x.T @ x if store is None else (x.T @ x).to(store)
            covs[name] = c if name not in covs else covs[name].add_(c)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        yield covs, counts
    finally:
        for h in handles:
            h.remove()


def check_reached(names, collected) -> None:
    """A clear error for target layers the calibration forward never called (dead or misnamed layers)."""
    missing = [n for n in names if n not in collected]
    if missing:
        raise ValueError(f"calibration batches never reached {len(missing)} target layers (e.g. {missing[0]}): "
                         "are they used in forward?")


@torch.no_grad()
def collect_covariances(model: nn.Module, names, batches, progress: bool = False, store=None) -> dict[str, torch.Tensor]:
    """{layer: mean x x^T over all calibration tokens} for the named linear layers. ``store``: the device
    the sums are kept on (None: the inputs'); a streamed pass keeps them at home, off the compute device."""
    names = list(names)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with _covariance_hooks(model, names, store) as (covs, counts):
            for batch in progress_bar(batches, enabled=progress, desc=f"input covariances of {len(names)} layers"):
                run_batch(model, batch, device)
    finally:
        model.train(was_training)
    check_reached(names, covs)
    return {n: covs[n] / counts[n] for n in names}


def with_labels(model: nn.Module, batch):
    """An HF model given ``input_ids`` and no ``labels`` gets ``labels=input_ids`` (next-token
    cross-entropy), when its forward takes ``labels``."""
    if isinstance(batch, dict) and "input_ids" in batch and "labels" not in batch and forward_takes(model, "labels"):
        return {**batch, "labels": batch["input_ids"]}
    return batch


def _scalar_loss(out) -> torch.Tensor | None:
    """``output.loss`` / ``output["loss"]``, or the output itself if it is a scalar; None otherwise."""
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None and torch.is_tensor(out) and out.dim() == 0:
        loss = out
    return loss if torch.is_tensor(loss) and loss.dim() == 0 else None


def batch_loss(model: nn.Module, batch, device) -> torch.Tensor:
    """The model's own loss on a calibration batch (see :func:`with_labels`), or a scalar output."""
    loss = _scalar_loss(run_batch(model, with_labels(model, batch), device))
    if loss is None:
        raise ValueError("the loss-aware objective needs calibration batches the model returns a scalar loss on "
                         "(HF models: dicts with input_ids; plain modules: a module whose forward returns the loss)")
    return loss


@torch.no_grad()
def returns_loss(model: nn.Module, batch) -> bool:
    """Whether the model returns a scalar loss on ``batch`` (one forward pass in eval mode): what
    decides the ``"auto"`` objective and strategy."""
    was_training = model.training
    model.eval()
    try:
        return _scalar_loss(run_batch(model, with_labels(model, batch), next(model.parameters()).device)) is not None
    finally:
        model.train(was_training)


def collect_output_fisher(model: nn.Module, names, batches, damping: float = FISHER_FLOOR,
                          progress: bool = False) -> dict[str, torch.Tensor]:
    """{layer: mean over calibration tokens of (dL/dy)^2, per output channel (out_features,)}, plus
    ``damping`` times its mean (so no output is left unfitted because its gradient was tiny here).

    Why: to second order, compressing a layer changes the loss by about
    0.5 * sum_t sum_c F_c (dy_tc)^2 (diagonal empirical Fisher F of the layer's outputs), so weighting
    each output row of the factorization error by F_c makes errors of different layers comparable
    (an estimated loss increase) and spends each layer's rank on the outputs the loss depends on.
    Gradients are taken with ``torch.autograd.grad`` w.r.t. the layer outputs only: no parameter's
    ``.grad`` is touched, and ``requires_grad`` is restored. The outputs are held by their gradient
    edges, not as tensors, so an output autograd does not save is freed as soon as it is used."""
    names = list(names)
    device = next(model.parameters()).device
    modules = {n: model.get_submodule(n) for n in names}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    outputs: list[tuple[str, torch.autograd.graph.GradientEdge, torch.Size, torch.device]] = []

    def hook_for(name):
        def hook(module, args, out):
            outputs.append((name, torch.autograd.graph.get_gradient_edge(out), out.shape, out.device))
        return hook

    saved = {n: m.weight.requires_grad for n, m in modules.items()}
    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        for m in modules.values():
            m.weight.requires_grad_(True)          # so every target output is in the graph
        for batch in progress_bar(batches, enabled=progress, desc=f"loss Fisher of {len(names)} layers' outputs"):
            outputs.clear()
            loss = batch_loss(model, batch, device)
            grads = torch.autograd.grad(loss, [edge for _, edge, _, _ in outputs], allow_unused=True)
            for (name, _, shape, where), g in zip(outputs, grads):
                g2 = torch.zeros(shape, device=where) if g is None else g.detach().float().pow(2)
                g2 = g2.reshape(-1, shape[-1])
                sums[name] = g2.sum(0) if name not in sums else sums[name].add_(g2.sum(0))
                counts[name] = counts.get(name, 0) + g2.shape[0]
    finally:
        for h in handles:
            h.remove()
        for n, m in modules.items():
            m.weight.requires_grad_(saved[n])
        outputs.clear()
        model.train(was_training)
    check_reached(names, sums)
    fisher = {n: sums[n] / counts[n] for n in names}
    return {n: f + damping * f.mean() for n, f in fisher.items()}


def singular_covariance_error(names, covariances, damping: float, cause: BaseException | None = None) -> ValueError:
    """The error for a linear solve that failed while fitting ``names``: naming the layers whose damped
    input covariance has no Cholesky factor, or, when every covariance has one, saying that the
    failure lies in the fit itself (with ``cause``'s text) rather than blaming the calibration data."""
    from ..structures.blast.factorize.weighted import damped_cholesky

    bad = []
    for n in names:
        c = covariances[n].float()
        c = c / c.diagonal().mean().clamp_min(1e-30)
        try:
            damped_cholesky(c.unsqueeze(0), damping)
        except torch.linalg.LinAlgError:
            bad.append(n)
    if not bad:
        more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
        return ValueError(f"fitting layer {names[0]!r}{more} failed in a linear solve"
                          + (f" ({cause})" if cause is not None else "") + f", though its input covariance alone "
                          f"passes the damped check (calibration_damping={damping:g}): the system is "
                          f"ill-conditioned. Pass a larger damping, e.g. "
                          f"BlastConfig(calibration_damping={damping * 10:g})")
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return ValueError(f"the input covariance of layer {bad[0]!r}{more} is singular even with calibration_damping="
                      f"{damping:g}: its calibration inputs span too few directions. Pass a larger damping, e.g. "
                      f"BlastConfig(calibration_damping={damping * 10:g}), or more varied calibration data")
