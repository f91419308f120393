"""``blastfx.compress(model, budget)`` and ``blastfx.plan_for``: one straight line of stages,

    analyze -> statistics -> plan -> build -> swap

each a package of its own (:mod:`blastfx.analyze`, :mod:`blastfx.statistics`, :mod:`blastfx.plan`,
:mod:`blastfx.build`, :mod:`blastfx.swap`). Statistics are collected once, on the dense model, for
what the planner and the chosen methods declare they read; ``sequential=True`` hands build and swap
to :mod:`blastfx.sequential`, which runs them block by block.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections import Counter

from torch import nn

from . import build, plan as planning, structures
from .analyze import Analysis, analyze
from .build import BuildOptions, build_layers
from .config import SEQUENTIAL_BELOW, BlastConfig
from .plan import BUDGET_TOLERANCE, DEFAULT_STRUCTURE, Plan, auto_start_plan, check_budget, check_plan_fits, make_plan
from .plan.speed import apply_speed, latency_model
from .reconstruct import ReconstructOptions
from .sequential import compress_sequential
from .statistics import LayerStats, calibration_batches, collect_statistics, returns_loss
from .statistics.sensitivity import block_errors, layer_spectra
from .statistics.structure_errors import blast_errors, ladder_errors
from .streaming import check_no_meta, layer_by_layer, streamed
from .structures.blast.layout import BlastShape
from .swap import attach_plan, swap_modules
from .timing import stage


class WeightOnlyWarning(UserWarning):
    """compress is factorizing the weights alone, without calibration data."""


class BudgetWarning(UserWarning):
    """The plan keeps a fraction of the parameters far from the budget asked."""


def _check_config(config) -> BlastConfig:
    if config is None:
        return BlastConfig()
    if not isinstance(config, BlastConfig):
        raise TypeError(f"config must be a blastfx.BlastConfig, got {type(config).__name__}")
    return config


def selected_layers(analysis: Analysis, config: BlastConfig) -> list[str]:
    """The linear layers the config compresses (before planning)."""
    return [s.fqn for s in analysis if s.substitutable
            and config.selects(s.fqn, s.repeated, min(s.in_features, s.out_features))]


def _needs_calibration(config: BlastConfig, calibration) -> None:
    if config.needs_loss and calibration is None:
        raise ValueError(f"strategy={config.strategy!r} / objective={config.objective!r} take loss gradients on "
                         "calibration batches: pass calibration=")


def resolve_recipe(model: nn.Module, config: BlastConfig, batches, budget: float | None = None) -> BlastConfig:
    """``config`` with an ``"auto"`` objective, strategy or sequential resolved (the rule:
    :meth:`BlastConfig.resolved`; ``budget``: the kept fraction aimed at). Whether the model returns a
    loss is probed with one forward pass on the first calibration batch, only when that decides something."""
    probe = batches is not None and config.init != "random" and "auto" in (config.objective, config.strategy)
    if probe:
        with streamed(model, config.compute_device):
            probe = returns_loss(model, batches[0])
    return config.resolved(calibrated=batches is not None, returns_loss=probe, budget=budget)


def _recipe_note(config: BlastConfig, resolved: BlastConfig, batches, budget: float) -> str | None:
    """What the ``"auto"`` parts of the recipe became, and why; ``None`` when nothing was ``"auto"``."""
    unfitted = "no calibration data" if batches is None else "init='random'" if config.init == "random" else None
    parts = []
    if "auto" in (config.objective, config.strategy):
        why = unfitted or ("the model returns a loss on the calibration batches" if resolved.needs_loss
                           else "the model returns no loss on the calibration batches")
        parts.append(f"objective {resolved.objective!r}, strategy {resolved.strategy!r}: {why}")
    if config.sequential == "auto":
        why = ("streaming mode" if resolved.compute_device is not None else unfitted
               or f"budget {budget:g} {'<=' if resolved.sequential else '>'} {SEQUENTIAL_BELOW:g}")
        parts.append(f"sequential {resolved.sequential}: {why}")
    return "recipe (auto): " + "; ".join(parts) if parts else None


def _fitted_objective(config: BlastConfig, batches) -> str | None:
    """What the factorization minimizes: the weight error without calibration, else the config's."""
    if config.init == "random":
        return None
    return "weight" if batches is None else config.objective


def _warn_weight_only(config: BlastConfig, batches) -> None:
    """Weight-only factorization of a pretrained model loses most of its quality; say so, and how to
    avoid it. Not for ``init="random"`` (nothing is fitted) nor for methods that cannot use
    calibration data (the structured ones, PrecGD): there the advice would not apply."""
    if batches is not None or config.init == "random" or not _calibrated(config.method):
        return
    warnings.warn(
        "blastfx.compress: without calibration data each weight is factorized on its own (weight-only), which costs "
        "a pretrained model much of its quality (SmolLM2-135M at budget 0.8: over 100,000x the dense perplexity "
        "with weight-only SVD or PrecGD; 1.54x with 8192 calibration tokens). Pass calibration=: token ids "
        "(rows, seq), a list of texts with tokenizer=, or batches the model takes. For a model trained from "
        "scratch afterwards, use BlastConfig(init='random').", WeightOnlyWarning, stacklevel=3)


def _calibrated(method: str) -> bool:
    """Whether a method of that name (in any structure) reads calibration data."""
    return any(method in s.methods and s.methods[method].calibrated for s in map(structures.get, structures.names()))


def _methods(config: BlastConfig, plan: Plan | None, names) -> set:
    """The methods the layers will be fitted with: the plan's, or before planning the config's and its
    overrides' (of the structure the planner gives every layer)."""
    options = BuildOptions.from_config(config)
    if plan is not None:
        return {build.method_of(lp, options) for lp in plan.layers.values()}
    return {build.method_for(structures.get(kind), config.override_for(n).method, config.method)
            for n in names for kind in _candidate_structures(config.structure_for(n))}


def _candidate_structures(structure: str) -> tuple[str, ...]:
    """The structures a layer planned with ``structure`` may become ("auto": BLAST or a ladder family)."""
    if structure != "auto":
        return (structure,)
    return (DEFAULT_STRUCTURE,) + tuple(s.name for s in structures.ladders())


def _check_methods_take_calibration(methods, batches) -> None:
    """Calibration data for a layer whose method fits the weights alone is refused before any forward
    pass: the data would be silently ignored."""
    weight_only = sorted(m.name for m in methods if not m.calibrated)
    if batches is not None and weight_only:
        calibrated = sorted({m for s in map(structures.get, structures.names()) if weight_only[0] in s.methods
                             for m, meth in s.methods.items() if meth.calibrated})
        raise ValueError(f"method={weight_only[0]!r} fits the weights alone and cannot use calibration data: "
                         f"pass no calibration=, or use a method that reads it ({', '.join(map(repr, calibrated))})")


def _smallest_kept(plan: Plan, config: BlastConfig) -> int:
    """Parameters the plan's layers keep at their smallest: rank 1, or the fixed rank of an override; a
    ladder layer its smallest size."""
    kept = plan.dense_total - sum(lp.dense_params for lp in plan.layers.values())
    for name, lp in plan.layers.items():
        if lp.structure != DEFAULT_STRUCTURE:
            s, m, n = structures.get(lp.structure), lp.out_features, lp.in_features
            kept += min([lp.params] + [s.num_params(m, n, size) for size in s.sizes(m, n)])
            continue
        rank = config.override_for(name).rank or 1
        kept += BlastShape.make(lp.out_features, lp.in_features, rank, lp.blocks, allow_larger=True).num_params
    return kept


def _warn_budget_exceeded(plan: Plan, config: BlastConfig) -> None:
    """A budget below what the smallest structure keeps cannot be met: the model comes out bigger
    than asked, so say so (the planner's own 1% misses on tiny layers are only noted on the plan)."""
    budget, limit = plan.budget, plan.budget * (1 + BUDGET_TOLERANCE)
    smallest = _smallest_kept(plan, config) / plan.dense_total if plan.dense_total else 0.0
    if plan.kept_fraction <= limit or smallest <= limit:
        return
    warnings.warn(f"budget {budget:g} asked, but the plan keeps {plan.kept_fraction:.4f} of the compressible "
                  f"parameters ({plan.kept_params} of {plan.dense_total}): even the smallest structure (rank 1 per "
                  f"layer, or an override's fixed rank) keeps {smallest:.4f}. Ask for at least that, or compress "
                  "fewer layers.", BudgetWarning, stacklevel=3)


def plan_for(model: nn.Module, budget: float, config: BlastConfig | None = None, example_inputs=None,
             analysis: Analysis | None = None, calibration=None, statistics: dict[str, LayerStats] | None = None,
             tokenizer=None) -> Plan:
    """The plan :func:`compress` would use, without changing the model. With ``calibration`` and
    ``strategy="error"``, the budget is spread by measured per-layer output error; with
    ``strategy="loss"``, by the output error weighted with the outputs' loss Fisher (an estimated
    loss increase). ``calibration`` / ``tokenizer``: as for :func:`compress`. ``statistics``:
    {layer: :class:`~blastfx.statistics.LayerStats`} already collected (what :func:`compress` shares
    with the build stage); what the planner needs and they lack is collected. Warns
    (:class:`BudgetWarning`) when the plan cannot keep the budget because the smallest structure
    possible exceeds it."""
    config = _check_config(config)
    budget = check_budget(budget)
    batches = calibration_batches(model, calibration, tokenizer)
    _needs_calibration(config, batches)
    resolved = resolve_recipe(model, config, batches, budget)
    analysis = analysis or analyze(model, example_inputs)
    names = selected_layers(analysis, resolved)
    if statistics is None:
        statistics = collect_statistics(model, names, batches, planning.needs(resolved), progress=resolved.progress,
                                        compute_device=resolved.compute_device)
    return _plan(model, budget, config, resolved, analysis, batches, statistics)


def _plan(model, budget, config, resolved, analysis, batches, stats: dict[str, LayerStats]) -> Plan:
    """The plan stage: spectra and block probes from the statistics the planner declared, then the
    pure allocation (:func:`blastfx.plan.make_plan`)."""
    stats = {k: s.only(planning.needs(resolved)) for k, s in stats.items()}
    names = selected_layers(analysis, resolved)
    used = resolved.structures_used()
    spectra = sizes = errors = probes = None
    measured = resolved.strategy != "uniform" or "auto" in used
    ladders = [s for s in structures.ladders() if s.name in used or "auto" in used]
    ranked = used - {s.name for s in structures.ladders()}         # BLAST or "auto": sized by rank from spectra
    with layer_by_layer(model, resolved.compute_device) as layers:      # streaming: one layer on the device
        if measured and ranked:
            spectra = layer_spectra(layers, names, stats, resolved.calibration_damping)
        if measured and ladders:
            sizes = {s.name: ladder_errors(layers, names, s, stats, resolved.calibration_damping, budget)
                     for s in ladders}
        if resolved.block_choices and ranked:
            first = auto_start_plan(analysis, budget, resolved, spectra, size_errors=sizes)
            errors = block_errors(layers, _blast_part(first), resolved, stats)
        if "auto" in used:           # BLAST's measured errors where "auto" starts from, at the ranks it plans
            start = auto_start_plan(analysis, budget, resolved, spectra, errors, sizes)
            probes = blast_errors(layers, _blast_part(start, lambda k: resolved.structure_for(k) == "auto"),
                                  resolved, stats)
    plan = make_plan(analysis, budget, resolved, spectra, block_errors=errors, size_errors=sizes, blast_errors=probes)
    if errors is not None:
        chosen = Counter(lp.blocks for name, lp in plan.layers.items() if name in errors)
        measured = any(s.covariance is not None for s in stats.values())
        plan.notes.append("blocks chosen per layer by measured " + ("output" if measured else "weight") + " error: "
                          + ", ".join(f"{b}: {k} layers" for b, k in sorted(chosen.items())))
    if not analysis.traced:
        plan.notes.append(f"not traced: {analysis.note}; layers found by module discovery")
    note = _recipe_note(config, resolved, batches, budget)
    if note:
        plan.notes.append(note)
    plan.objective = _fitted_objective(resolved, batches)
    _warn_budget_exceeded(plan, resolved)
    return apply_speed(plan, latency_model(resolved.latency), _element_size(model), resolved.min_speedup,
                       analysis.groups)


def _blast_part(plan: Plan, keep=None) -> Plan:
    """``plan`` restricted to its BLAST layers (whose name ``keep`` accepts, if given): what a probe measures."""
    return dataclasses.replace(plan, layers={k: lp for k, lp in plan.layers.items()
                                             if lp.structure == DEFAULT_STRUCTURE and (keep is None or keep(k))})


def _element_size(model: nn.Module) -> int:
    """Bytes per weight entry as the model is stored (what a decode call streams per parameter)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.element_size()
    return 4


def compress(model: nn.Module, budget: float = 0.5, *, config: BlastConfig | None = None, example_inputs=None,
             plan: Plan | None = None, calibration=None, tokenizer=None) -> nn.Module:
    """Replace the model's linear layers by BLAST layers keeping ``budget`` of their parameters.

    Returns the same model object (its class and behaviour kept: HF ``generate``/``save_pretrained``,
    diffusers pipelines), with the plan at ``model.blastfx_plan`` (and, for transformers and diffusers
    models, in ``model.config.quantization_config``, so ``save_pretrained`` records it and a plain
    ``from_pretrained`` rebuilds it). Pass ``plan=`` to reuse an edited plan.

    ``calibration``: what the layers' inputs are measured on, so that the factorization minimizes
    each layer's output error rather than its weight error (much better on trained models): an
    iterable of batches (tensor / kwargs dict / args tuple) the model runs on, a 2-D tensor of token
    ids (rows, seq), or a list of texts with ``tokenizer=`` (see :mod:`blastfx.statistics.inputs`).
    With the default ``"auto"`` objective and strategy, batches the model returns a loss on (HF
    models given ``input_ids``) select the loss-aware recipe, others the output-error objective
    (:meth:`BlastConfig.resolved`); ``plan.objective`` / ``plan.strategy`` say what was used.
    Without calibration a :class:`WeightOnlyWarning` says what that costs.

    A model larger than the GPU: keep it on the CPU and pass ``BlastConfig(sequential=True,
    compute_device="cuda")``; only the block being worked on (and the non-block modules during the
    calibration passes) is moved to the GPU (:mod:`blastfx.streaming`).

    All-or-nothing: on any error, an interrupt included, the model is left as it was.
    """
    config = _check_config(config)
    if config.compute_device is not None:       # streaming copies weights: a meta tensor has none
        check_no_meta(model)
    if plan is not None:
        if not isinstance(plan, Plan):
            raise ValueError(f"plan must be a blastfx.Plan, got {type(plan).__name__}")
        check_plan_fits(model, plan)
    else:
        budget = check_budget(budget)
    batches = calibration_batches(model, calibration, tokenizer)
    _needs_calibration(config, batches)
    resolved = resolve_recipe(model, config, batches, plan.budget if plan is not None else budget)
    sequential = resolved.sequential and batches is not None and resolved.init != "random"
    if resolved.compute_device is not None and batches is None:
        raise ValueError(f"compute_device={resolved.compute_device!r} streams the model through sequential calibration, "
                         "which needs calibration data: pass calibration=")
    _warn_weight_only(resolved, batches)

    # analyze
    with stage("analyze"):
        analysis = analyze(model, example_inputs) if plan is None else None
    names = list(plan.layers) if plan is not None else selected_layers(analysis, resolved)
    methods = _methods(resolved, plan, names) if resolved.init != "random" else set()
    _check_methods_take_calibration(methods, batches)
    # statistics: one pass per statistic over the calibration batches, shared by planner and builder
    for_build = build.needs(resolved, methods)
    if sequential:                              # per block, in compress_sequential; the Fisher up front
        for_build &= {"output_fisher"}
    for_plan = planning.needs(resolved) if plan is None else frozenset()
    with stage("statistics"):
        stats = collect_statistics(model, names, batches, for_build | for_plan, progress=resolved.progress,
                                   compute_device=resolved.compute_device)
    # plan
    if plan is None:
        with stage("plan"):
            plan = _plan(model, budget, config, resolved, analysis, batches, stats)
        check_plan_fits(model, plan)
    # build and swap
    options = BuildOptions.from_config(resolved)
    stats = {k: s.only(for_build) for k, s in stats.items()}
    if sequential:
        with stage("sequential"):
            old = compress_sequential(model, plan, batches, stats, options, ReconstructOptions.from_config(resolved),
                                      resolved.compute_device)
    else:
        with stage("build"):
            built = build_layers(model, plan, stats, options)
        old = swap_modules(model, built)
    try:
        plan.objective = _fitted_objective(resolved, batches)
        if getattr(model, "hf_quantizer", None) is not None:      # e.g. read from GGUF: floats now, saveable
            from .llm.hf import forget_gguf_quantization
            forget_gguf_quantization(model)
        attach_plan(model, plan)
        if any(isinstance(m, structures.module_types()) and name not in plan.layers
               for name, m in model.named_modules()):
            from .io import model_plan      # compressed before: the recorded plan covers every compressed layer
            attach_plan(model, model_plan(model))
    except BaseException:
        swap_modules(model, old)
        raise
    return model
