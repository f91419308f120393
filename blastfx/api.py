"""``blastfx.compress(model, budget)``: analyze -> plan -> factorize -> substitute."""
from __future__ import annotations

import warnings
from collections import Counter

from torch import nn

from .calibrate import collect_covariances, collect_output_fisher, returns_loss
from .calibration_data import calibration_batches
from .config import BlastConfig
from .layout import BlastShape
from .passes.analyze import Analysis, analyze
from .passes.substitute import build_layers, dense_weight, swap_modules
from .nn import BlastLinear
from .plan import BUDGET_TOLERANCE, Plan, check_budget, make_plan
from .sensitivity import block_errors, layer_spectra
from .sequential import compress_sequential

PLAN_ATTR = "blastfx_plan"
CALIBRATED_METHODS = ("als", "lowrank")          # the factorization methods that can use calibration data


class WeightOnlyWarning(UserWarning):
    """compress is factorizing the weights alone, without calibration data."""


class BudgetWarning(UserWarning):
    """The plan keeps a fraction of the parameters far from the budget asked."""


def _check_plan_fits(model: nn.Module, plan: Plan) -> None:
    for name, lp in plan.layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"plan layer {name!r} is not in this model") from None
        if not hasattr(module, "weight") or module.weight.dim() != 2:
            raise ValueError(f"plan layer {name!r} is a {type(module).__name__}, not a linear layer")
        m, n = dense_weight(module).shape
        if (m, n) != (lp.out_features, lp.in_features):
            raise ValueError(f"plan layer {name!r} is {lp.out_features}x{lp.in_features} but the model's is {m}x{n}")
        lp.shape  # noqa: B018 -- raises ValueError if the structure cannot be represented


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


def resolve_recipe(model: nn.Module, config: BlastConfig, batches) -> BlastConfig:
    """``config`` with an ``"auto"`` objective or strategy resolved (the rule: :meth:`BlastConfig.resolved`).
    Whether the model returns a loss is probed with one forward pass on the first calibration batch,
    only when that decides something."""
    probe = batches is not None and config.init != "random" and "auto" in (config.objective, config.strategy)
    return config.resolved(calibrated=batches is not None, returns_loss=probe and returns_loss(model, batches[0]))


def _recipe_note(config: BlastConfig, resolved: BlastConfig, batches) -> str | None:
    if "auto" not in (config.objective, config.strategy):
        return None
    why = ("no calibration data" if batches is None else "init='random'" if config.init == "random"
           else "the model returns a loss on the calibration batches" if resolved.needs_loss
           else "the model returns no loss on the calibration batches")
    return f"recipe (auto): objective {resolved.objective!r}, strategy {resolved.strategy!r}: {why}"


def _fitted_objective(config: BlastConfig, batches) -> str | None:
    """What the factorization minimizes: the weight error without calibration, else the config's."""
    if config.init == "random":
        return None
    return "weight" if batches is None else config.objective


def _warn_weight_only(config: BlastConfig, batches) -> None:
    """Weight-only factorization of a pretrained model loses most of its quality; say so, and how to
    avoid it. Not for ``init="random"`` (nothing is fitted) nor for methods that cannot use
    calibration data (the structured ones, PrecGD): there the advice would not apply."""
    if batches is not None or config.init == "random" or config.method not in CALIBRATED_METHODS:
        return
    warnings.warn(
        "blastfx.compress: without calibration data each weight is factorized on its own (weight-only), which costs "
        "a pretrained model much of its quality (SmolLM2-135M at budget 0.8: over 100,000x the dense perplexity "
        "with weight-only SVD or PrecGD; 1.54x with 8192 calibration tokens). Pass calibration=: token ids "
        "(rows, seq), a list of texts with tokenizer=, or batches the model takes. For a model trained from "
        "scratch afterwards, use BlastConfig(init='random').", WeightOnlyWarning, stacklevel=3)


def _smallest_kept(plan: Plan, config: BlastConfig) -> int:
    """Parameters the plan's layers keep at their smallest: rank 1, or the fixed rank of an override."""
    kept = plan.dense_total - sum(lp.dense_params for lp in plan.layers.values())
    for name, lp in plan.layers.items():
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
             analysis: Analysis | None = None, calibration=None, covariances=None, output_fisher=None,
             tokenizer=None) -> Plan:
    """The plan :func:`compress` would use, without changing the model. With ``calibration`` and
    ``strategy="error"``, the budget is spread by measured per-layer output error; with
    ``strategy="loss"``, by the output error weighted with the outputs' loss Fisher (an estimated
    loss increase). ``calibration`` / ``tokenizer``: as for :func:`compress`. ``covariances`` /
    ``output_fisher``: the calibration statistics, if already collected (by :func:`compress`, which
    shares them with the factorization). Warns (:class:`BudgetWarning`) when the plan cannot keep
    the budget because the smallest structure possible exceeds it."""
    config = _check_config(config)
    budget = check_budget(budget)
    batches = calibration_batches(model, calibration, tokenizer)
    _needs_calibration(config, batches)
    return _plan(model, budget, config, resolve_recipe(model, config, batches), example_inputs, analysis, batches,
                 covariances, output_fisher)


def _plan(model, budget, config, resolved, example_inputs, analysis, batches, covariances, output_fisher) -> Plan:
    analysis = analysis or analyze(model, example_inputs)
    spectra = covs = None
    names = selected_layers(analysis, resolved)
    if resolved.strategy != "uniform" or resolved.block_choices:
        covs = covariances
        if covs is None and batches is not None:
            covs = collect_covariances(model, names, batches, progress=resolved.progress)
    if resolved.strategy == "loss" and output_fisher is None:
        output_fisher = collect_output_fisher(model, names, batches, progress=resolved.progress)
    if resolved.strategy != "uniform":
        spectra = layer_spectra(model, names, covs, resolved.calibration_damping,
                                output_weights=output_fisher if resolved.strategy == "loss" else None)
    plan = make_plan(analysis, budget, resolved, spectra)
    if resolved.block_choices:
        errors = block_errors(model, plan, resolved, covs)
        plan = make_plan(analysis, budget, resolved, spectra, block_errors=errors)
        chosen = Counter(lp.blocks for name, lp in plan.layers.items() if name in errors)
        plan.notes.append("blocks chosen per layer by measured " + ("output" if covs else "weight") + " error: "
                          + ", ".join(f"{b}: {k} layers" for b, k in sorted(chosen.items())))
    if not analysis.traced:
        plan.notes.append(f"not traced: {analysis.note}; layers found by module discovery")
    note = _recipe_note(config, resolved, batches)
    if note:
        plan.notes.append(note)
    plan.objective = _fitted_objective(resolved, batches)
    _warn_budget_exceeded(plan, resolved)
    return plan


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
    ids (rows, seq), or a list of texts with ``tokenizer=`` (see :mod:`blastfx.calibration_data`).
    With the default ``"auto"`` objective and strategy, batches the model returns a loss on (HF
    models given ``input_ids``) select the loss-aware recipe, others the output-error objective
    (:meth:`BlastConfig.resolved`); ``plan.objective`` / ``plan.strategy`` say what was used.
    Without calibration a :class:`WeightOnlyWarning` says what that costs.

    All-or-nothing: on any error, an interrupt included, the model is left as it was.
    """
    config = _check_config(config)
    if plan is not None:
        if not isinstance(plan, Plan):
            raise ValueError(f"plan must be a blastfx.Plan, got {type(plan).__name__}")
        _check_plan_fits(model, plan)
    else:
        budget = check_budget(budget)
    batches = calibration_batches(model, calibration, tokenizer)
    _needs_calibration(config, batches)
    resolved = resolve_recipe(model, config, batches)
    _warn_weight_only(resolved, batches)
    # One pass each over the calibration batches on the dense model, shared by planner and factorization.
    builder_reads = resolved.init != "random" and not resolved.sequential     # sequential: per block, later
    planner_reads = plan is None and (resolved.strategy != "uniform" or bool(resolved.block_choices))
    fisher_needed = ((resolved.objective == "loss" and resolved.init != "random")
                     or (planner_reads and resolved.strategy == "loss"))
    analysis = covs = fisher = None
    if batches is not None and (builder_reads or planner_reads or fisher_needed):
        if plan is None:
            analysis = analyze(model, example_inputs)
        names = list(plan.layers) if plan is not None else selected_layers(analysis, resolved)
        if names and (builder_reads or planner_reads):
            covs = collect_covariances(model, names, batches, progress=resolved.progress)
        if names and fisher_needed:
            fisher = collect_output_fisher(model, names, batches, progress=resolved.progress)
    if plan is None:
        plan = _plan(model, budget, config, resolved, example_inputs, analysis, batches, covs, fisher)
        _check_plan_fits(model, plan)
    build = dict(init=resolved.init, method=resolved.method, iters=resolved.iters, tol=resolved.tol,
                 progress=resolved.progress, calibration_damping=resolved.calibration_damping,
                 output_weights=fisher if resolved.objective == "loss" else None)
    if batches is None or resolved.init == "random":
        old = swap_modules(model, build_layers(model, plan, **build))
    elif not resolved.sequential:
        old = swap_modules(model, build_layers(model, plan, covariances=covs, **build))
    else:
        old = compress_sequential(model, plan, batches, build)
    try:
        plan.objective = _fitted_objective(resolved, batches)
        if getattr(model, "hf_quantizer", None) is not None:      # e.g. read from GGUF: floats now, saveable
            from .hf import forget_gguf_quantization
            forget_gguf_quantization(model)
        attach_plan(model, plan)
        if any(isinstance(m, BlastLinear) and name not in plan.layers for name, m in model.named_modules()):
            from .io import model_plan      # compressed before: the recorded plan covers every BLAST layer
            attach_plan(model, model_plan(model))
    except BaseException:
        swap_modules(model, old)
        raise
    return model


def attach_plan(model: nn.Module, plan: Plan) -> None:
    """Record the plan on the model, and where its library saves it (transformers and diffusers: the
    quantization config, see :mod:`blastfx.integrations`). All or nothing: that record is made, or
    refused, before the plan is set."""
    from .integrations import record_plan

    record_plan(model, plan)
    setattr(model, PLAN_ATTR, plan)
