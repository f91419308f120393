"""Sequential calibration: compress block by block, each layer fitted on the activations the
already-compressed model really produces, towards the outputs the dense model produced.

Layer l of block k receives x_c in the compressed model where the dense model had x_d. Fitting
||W x_d - What x_c|| (error feedback) rather than ||(W - What) x_c|| makes each layer undo part of
the drift earlier blocks introduced. Over all matrices the minimizer is W' = W C_dc C_cc^-1
(C_dc = E[x_d x_c^T], C_cc = E[x_c x_c^T]), and ||W x_d - What x_c||^2 = ||(W' - What) x_c||^2 + const,
so the usual calibrated factorization of W' under C_cc solves it.

W' is a free regression of every output on all in_features inputs, estimated from the calibration
tokens alone, so it is ridge-regularized *towards W* (no drift: W' = W exactly), with a relative ridge
of at least :data:`FEEDBACK_DAMPING`. A ridge towards zero shrinks W wherever the calibration inputs
are weak, and held-out inputs (other lengths, special tokens) are not weak there; a ridge as light as
the whitening's lets the correction fit the calibration tokens' noise. Both made sequential
calibration worse than plain calibration on a sentence encoder (all-MiniLM-L6-v2); with the ridge
towards W it is as good at budget 0.8 and better at 0.5 (``benchmarks/quality_encoder.py``).

The stages are the same as :func:`blastfx.compress`'s: each stage's statistics go into a
:class:`~blastfx.statistics.LayerStats` per layer (input covariance, corrected target, and the
output Fisher measured up front on the dense model), and :func:`blastfx.build.build_layers` and
:func:`blastfx.swap.swap_modules` build and swap them.

Fast path, for a *chain* (the repeated blocks of one container, called one after another on a
hidden-state stream: HF decoders and encoders, DiT blocks): the calibration batches run through the
model once; afterwards each block runs only on the cached dense and compressed streams, stage by stage
(layers that read the same tensor, e.g. q/k/v, form a stage). Other models fall back to one full
forward pass of the compressed model per block, without error feedback (noted on the plan).

Block-wise reconstruction (chain path, ``reconstruct`` options with steps): once all of a block's
stages are built, its factors (and norm weights) are fitted jointly so that the block's output on the
compressed stream matches the dense block's output on the dense stream (:mod:`blastfx.reconstruct`);
the next block then reads the reconstructed block's outputs.

Streaming (``compute_device``, :mod:`blastfx.streaming`): the model stays where it lives; the capture
pass brings the non-block modules and one block at a time to the compute device, and the walk brings
each block there for its calibration, build and reconstruction and sends it home (built layers
included) before the next, so the compute device holds one block and the calibration streams.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import replace

import torch
from torch import nn

from .analyze import block_of, dense_weight
from .build import BuildOptions, build_layers, distributed
from .progress import progress_bar
from .reconstruct import ReconstructOptions, norm_parameters, reconstruct_block
from .statistics import LayerStats, check_reached, collect_covariances, run_batch, singular_covariance_error
from .streaming import Residency, streamed
from .swap import swap_modules
from .timing import stage


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has what it came for."""


# Least relative ridge of the error-feedback correction (see the module docstring): ten times the
# whitening's CALIBRATION_DAMPING, since the correction is a full regression, not a low-rank fit.
FEEDBACK_DAMPING = 0.1


def corrected_target(w: torch.Tensor, c_cc: torch.Tensor, c_dc: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    """W (C_dc + r I)(C_cc + r I)^-1, r = damping * mean(diag C_cc): the matrix M minimizing
    E||W x_d - M x_c||^2 + r ||M - W||^2, i.e. whose output error on the compressed inputs equals, up
    to a constant, the error against the dense layer's outputs on the dense inputs, ridge-regularized
    towards the dense weight (so that without drift, C_dc = C_cc, it is W for any damping)."""
    c = c_cc.double()
    ridge = damping * c.diagonal().mean() * torch.eye(len(c), dtype=c.dtype, device=c.device)
    rhs = (w.double() @ (c_dc.double() + ridge)).T            # (C + rI) M^T = (C_dc + rI)^T W^T (C symmetric)
    return torch.linalg.solve(c + ridge, rhs).T.to(torch.float32)


def feedback_damping(calibration_damping: float) -> float:
    """The relative ridge of the corrected targets: the config's damping, at least FEEDBACK_DAMPING."""
    return max(calibration_damping, FEEDBACK_DAMPING)


def _stream_and_rest(args, kwargs):
    """Split a block call into its hidden-state stream and everything else (None if not a stream call)."""
    if args and torch.is_tensor(args[0]):
        return args[0], ("args", args[1:], kwargs)
    if torch.is_tensor(kwargs.get("hidden_states")):
        return kwargs["hidden_states"], ("kw", args, {k: v for k, v in kwargs.items() if k != "hidden_states"})
    return None, None


def _without_caches(rest):
    """A replayed block must not read or extend a KV cache filled by the capture pass."""
    kind, args, kwargs = rest
    drop = lambda v: None if "Cache" in type(v).__name__ else v      # noqa: E731
    kwargs = {k: drop(v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kind, tuple(drop(v) for v in args), kwargs


def _call(block: nn.Module, hidden: torch.Tensor, rest) -> torch.Tensor:
    kind, args, kwargs = rest
    out = block(hidden, *args, **kwargs) if kind == "args" else block(*args, hidden_states=hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _chain_blocks(model: nn.Module, names) -> list[str] | None:
    """Every block of the one container holding ``names`` (blocks without a target layer included:
    the streams must pass through them too), or None if the layers are not all in one container."""
    owners = [block_of(n) for n in names]
    parents = {b.rpartition(".")[0] for b in owners}
    if len(parents) != 1 or any(b == n for b, n in zip(owners, names)):
        return None
    parent = parents.pop()
    container = model.get_submodule(parent) if parent else model
    return [f"{parent}.{k}" if parent else str(k) for k in range(len(container))] \
        if isinstance(container, (nn.ModuleList, nn.Sequential)) else None


@torch.no_grad()
def _capture(model: nn.Module, blocks: list[str], batches, device, progress: bool = False):
    """One forward pass per batch with every block hooked. Returns the first block's input stream per
    batch, {block: [(input on batch 0 else None, other arguments)] per batch}, the blocks' call order
    on batch 0 and the last block's output on batch 0; None if a block is not called on a stream."""
    streams, rests, order, last_out = [], {b: [] for b in blocks}, [], []

    def pre_for(name):
        def hook(module, args, kwargs):
            hidden, rest = _stream_and_rest(args, kwargs)
            if hidden is None:
                raise _Stop
            if name == blocks[0]:
                streams.append(hidden.detach().clone())
            first = len(streams) == 1
            if first:
                order.append(name)
            rests[name].append((hidden.detach().clone() if first else None, _without_caches(rest)))
        return hook

    def post(module, args, out):
        if len(streams) == 1:
            last_out.append((out[0] if isinstance(out, (tuple, list)) else out).detach().clone())

    handles = [model.get_submodule(b).register_forward_pre_hook(pre_for(b), with_kwargs=True) for b in blocks]
    handles.append(model.get_submodule(blocks[-1]).register_forward_hook(post))
    try:
        for batch in progress_bar(batches, enabled=progress, desc=f"capturing the inputs of {len(blocks)} blocks"):
            run_batch(model, batch, device)
    except _Stop:
        return None
    finally:
        for h in handles:
            h.remove()
    return streams, rests, order, last_out[0] if last_out else None


@torch.no_grad()
def _replays_the_model(model, blocks, rests, last_out, compute_device=None) -> bool:
    """Does running the blocks one after another on batch 0's stream reproduce what the model computed?"""
    for k, b in enumerate(blocks):
        hidden, rest = rests[b][0]
        expected = rests[blocks[k + 1]][0][0] if k + 1 < len(blocks) else last_out
        block = model.get_submodule(b)
        with _resident(block, compute_device):
            got = _call(block, hidden, rest)
        if got.shape != expected.shape or (got - expected).norm() > 1e-4 * expected.norm() + 1e-6:
            return False
    return True


@torch.no_grad()
def _layer_inputs(block: nn.Module, prefix: str, names, hidden, rest) -> dict[str, torch.Tensor]:
    """Each named layer's input in one call of the block, in call order; the call ends once all are in."""
    sink: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args):
            sink.setdefault(name, args[0])
            if len(sink) == len(names):
                raise _Stop
        return hook
    handles = [block.get_submodule(n[len(prefix) + 1:]).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        _call(block, hidden, rest)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return sink


def _stages(block: nn.Module, prefix: str, names, hidden, rest) -> list[list[str]]:
    """The block's target layers grouped by the tensor they read, in call order (q/k/v, o, gate/up, down).
    Tensors are compared by identity, which the held inputs keep meaningful (no address reuse)."""
    if not names:                           # a block the plan left dense: only the streams pass through it
        return []
    inputs = _layer_inputs(block, prefix, names, hidden, rest)
    check_reached(names, inputs)
    stages: list[list[str]] = []
    last = None
    for name, x in inputs.items():
        if stages and x is last:
            stages[-1].append(name)
        else:
            stages.append([name])
        last = x
    return stages


@torch.no_grad()
def _stage_statistics(dense_block, block, prefix, names, dense_stream, stream, rests):
    """{layer: (C_cc, C_dc)}, means over all calibration tokens (as collect_covariances), for one stage."""
    sums = {n: [0.0, 0.0] for n in names}
    count = 0
    for hd, hc, (_, rest) in zip(dense_stream, stream, rests):
        xd = _layer_inputs(dense_block, prefix, names, hd, rest)
        xc = _layer_inputs(block, prefix, names, hc, rest)
        for n in names:
            d, c = (x[n].reshape(-1, x[n].shape[-1]).float() for x in (xd, xc))
            sums[n][0] = sums[n][0] + c.T @ c
            sums[n][1] = sums[n][1] + d.T @ c
        count += c.shape[0]                 # tokens: every layer of a stage reads the same tensor
    return {n: (cc / count, dc / count) for n, (cc, dc) in sums.items()}


def _resident(module: nn.Module, compute_device, replaced: dict | None = None):
    """``module`` on the compute device for the block (streaming), else where it is. ``replaced``:
    collects the original home tensors of those sent home changed (see :class:`Residency`)."""
    return contextlib.nullcontext() if compute_device is None else Residency([module], compute_device,
                                                                              replaced=replaced)


def compress_sequential(model: nn.Module, plan, batches, stats: dict[str, LayerStats],
                        options: BuildOptions, reconstruct: ReconstructOptions | None = None,
                        compute_device=None) -> dict[str, nn.Module]:
    """Calibrate, build and swap block by block (see the module docstring). ``stats``: what was measured
    up front on the dense model (the output Fisher, where the objective uses it); each layer's input
    covariance and target are measured here. ``reconstruct``: block-wise reconstruction after each
    block of a chain (None or 0 steps: none). ``compute_device``: stream the model through it, one
    block at a time (None: compute where the model is). All-or-nothing: if a later block fails (or is
    interrupted) every swap is undone, every norm weight reconstruction changed is restored and every
    weight is back where it was. Returns the replaced modules, by name."""
    device = next(model.parameters()).device if compute_device is None else torch.device(compute_device)
    blocks = _chain_blocks(model, list(plan.layers))
    swapped: dict[str, nn.Module] = {}
    norms: dict[nn.Parameter, torch.Tensor] = {}            # originals of what reconstruction changes in place
    homes: dict[int, tuple] = {}                            # streaming: their original home tensors
    reconstruct = reconstruct if reconstruct is not None and reconstruct.steps != 0 else None
    was_training = model.training
    model.eval()
    try:
        chain = None
        with streamed(model, compute_device), stage("capture"):
            captured = _capture(model, blocks, batches, device, options.progress) if blocks is not None else None
        if captured is not None:
            streams, rests, order, last_out = captured
            if order == blocks and last_out is not None \
                    and _replays_the_model(model, blocks, rests, last_out, compute_device):
                chain = (streams, {b: [(None, rest) for _, rest in calls] for b, calls in rests.items()})
            del captured, rests, last_out           # the blocks' inputs on batch 0 served the check only
        if chain is None:
            _sequential_full_passes(model, plan, batches, stats, options, swapped, compute_device)
        else:
            _sequential_chain(model, plan, blocks, *chain, stats, options, swapped, reconstruct, norms,
                              compute_device, homes)
    except BaseException:
        with torch.no_grad():
            for p, value in norms.items():
                p.copy_(value)
        for tensor, home in homes.values():                # never written: the original storage, as it was
            tensor.data = home
        swap_modules(model, swapped)
        raise
    finally:
        model.train(was_training)
    if chain is None:
        plan.notes.append("sequential: the blocks are not a chain; each block calibrated on the compressed "
                          "model's activations without error feedback" + (" or reconstruction" if reconstruct else ""))
    return swapped


def _blocks_bar(blocks, options: BuildOptions, what: str):
    return progress_bar(blocks, enabled=options.progress, desc=what, unit="block")


def _stage_stats(model, measured: dict, upfront: dict[str, LayerStats], damping: float) -> dict[str, LayerStats]:
    """{layer: LayerStats} of one stage: C_cc as the covariance, the corrected target, the up-front rest."""
    out = {}
    for n, (cc, dc) in measured.items():
        try:
            target = corrected_target(dense_weight(model.get_submodule(n)), cc, dc, damping)
        except torch.linalg.LinAlgError as err:
            raise singular_covariance_error([n], {n: cc}, damping, err) from err
        out[n] = (upfront.get(n) or LayerStats()).merged(covariance=cc, target=target)
    return out


def _reconstruction_note(results, what: str = "reconstruction") -> str:
    kept = [r for r in results if r.kept]
    before = sum(r.error_before for r in results) / len(results)
    after = sum(r.error_after for r in results) / len(results)
    return (f"{what}: {len(kept)} of {len(results)} blocks improved, {sum(r.steps for r in results)} steps "
            f"in {sum(r.seconds for r in results):.0f} s; mean relative squared error of the block outputs "
            f"{before:.4g} -> {after:.4g}")


def _sequential_chain(model, plan, blocks, streams, rests, stats, options, swapped, reconstruct=None,
                      norms=None, compute_device=None, homes=None) -> None:
    dense_stream = streams
    stream = [s.clone() for s in streams]
    quiet = replace(options, progress=False)            # one bar over the blocks, none per stage
    results = []
    for b in _blocks_bar(blocks, options, "sequential calibration with error feedback"):
        with _resident(model.get_submodule(b), compute_device, homes):
            dense_stream, stream = _calibrate_block(model, plan, b, dense_stream, stream, rests, stats, quiet,
                                                    swapped, reconstruct, norms, results)
    floats = [r for what, r in results if what == "float"]
    if floats:
        plan.notes.append(_reconstruction_note(floats))
    rounded = [r for what, r in results if what == "codes"]
    if rounded:
        plan.notes.append(_reconstruction_note(rounded, "reconstruction around the quantized factors (float factors "
                                                        "reconstructed first, then rounded)"))


def _calibrate_block(model, plan, b, dense_stream, stream, rests, stats, quiet, swapped, reconstruct, norms,
                     results):
    """One block of the chain: its stages calibrated, built and swapped, then reconstructed; returns the
    dense and the compressed streams after it. With reconstruction, layers the plan quantizes are built
    with float factors, reconstructed as such (codes have no gradient, so a quantized layer would
    train its S alone), then rounded with the objective their fit used (their input covariance on the
    compressed stream, the output Fisher) and the block reconstructed once more around the codes
    (:func:`_round_after_reconstruction`); ``results`` gets one entry per pass, (pass, result)."""
    block = model.get_submodule(b)
    dense_block = copy.deepcopy(block)
    names = [n for n in plan.layers if block_of(n) == b]
    codes = {n: plan.layers[n].factor_dtype for n in names
             if reconstruct is not None and plan.layers[n].factor_dtype is not None}
    build_plan = _with_float_factors(plan, codes) if codes else plan
    fitted: dict[str, LayerStats] = {}
    for layers in _stages(block, b, names, stream[0], rests[b][0][1]):
        with stage("statistics"):
            measured = _stage_statistics(dense_block, block, b, layers, dense_stream, stream, rests[b])
            stage_stats = _stage_stats(model, measured, stats, feedback_damping(quiet.calibration_damping))
        with stage("build"):
            built = build_layers(model, build_plan, stage_stats, quiet, names=set(layers))
        swapped.update(swap_modules(model, built))
        fitted.update({n: stage_stats[n] for n in layers if n in codes})
    with torch.no_grad(), stage("forward"):
        dense_stream = [_call(dense_block, h, rest) for h, (_, rest) in zip(dense_stream, rests[b])]
    if reconstruct is not None and names:
        for p in norm_parameters(block):
            norms.setdefault(p, p.detach().clone())

        def fit_block(what: str):
            with stage("reconstruct"):
                results.append((what, reconstruct_block(block, stream, dense_stream,
                                                        lambda blk, h, k, b=b: _call(blk, h, rests[b][k][1]),
                                                        reconstruct, desc=f"reconstructing {b}")))
                distributed.same_everywhere(block, quiet.distribute)     # ranks stepped on their own

        fit_block("float")
        if codes:
            _round_after_reconstruction(model, codes, fitted, quiet)
            fit_block("codes")
    with torch.no_grad(), stage("forward"):
        stream = [_call(block, h, rest) for h, (_, rest) in zip(stream, rests[b])]
    return dense_stream, stream


def _with_float_factors(plan, codes: dict):
    """A shallow copy of ``plan`` whose layers in ``codes`` are planned with float factors."""
    out = copy.copy(plan)
    out.layers = {n: replace(lp, factor_dtype=None) if n in codes else lp for n, lp in plan.layers.items()}
    return out


def _round_after_reconstruction(model, codes: dict, fitted: dict, options: BuildOptions) -> None:
    """Swap each reconstructed float layer of ``codes`` ({name: factor_dtype}) for its quantized form,
    the rounding's refits weighted as the layer's fit was (``fitted``: its stage's statistics). The
    float layers it replaces are dropped: what the model held before the block (its dense layers)
    stays recorded where the caller's undo finds it."""
    from .structures.blast.quant import quantize_layer

    with stage("build"):
        rounded = {n: quantize_layer(model.get_submodule(n), fmt, calibration=fitted[n].covariance,
                                     calibration_damping=options.calibration_damping,
                                     output_weights=fitted[n].output_fisher)
                   for n, fmt in codes.items()}
    swap_modules(model, rounded)


def _sequential_full_passes(model, plan, batches, stats, options, swapped, compute_device=None) -> None:
    groups: dict[str, list[str]] = {}
    for name in plan.layers:
        groups.setdefault(block_of(name), []).append(name)
    quiet = replace(options, progress=False)
    for block in _blocks_bar(list(groups), options, "sequential calibration, one full pass per block"):
        names = groups[block]
        with streamed(model, compute_device):
            covs = collect_covariances(model, names, batches)
        block_stats = {n: (stats.get(n) or LayerStats()).merged(covariance=covs[n]) for n in names}
        with _resident(model.get_submodule(block), compute_device):
            swapped.update(swap_modules(model, build_layers(model, plan, block_stats, quiet, names=set(names))))
