"""``blastfx.compress(model, budget)``: analyze -> plan -> factorize -> substitute."""
from __future__ import annotations

from collections import Counter

from torch import nn

from .calibrate import collect_covariances, collect_output_fisher
from .config import BlastConfig
from .passes.analyze import Analysis, analyze
from .passes.substitute import build_layers, dense_weight, swap_modules
from .plan import Plan, check_budget, make_plan
from .sensitivity import block_errors, layer_spectra
from .sequential import compress_sequential

PLAN_ATTR = "blastfx_plan"


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


def selected_layers(analysis: Analysis, config: BlastConfig) -> list[str]:
    """The linear layers the config compresses (before planning)."""
    return [s.fqn for s in analysis if s.substitutable
            and config.selects(s.fqn, s.repeated, min(s.in_features, s.out_features))]


def _needs_calibration(config: BlastConfig, calibration) -> None:
    if config.needs_loss and calibration is None:
        raise ValueError(f"strategy={config.strategy!r} / objective={config.objective!r} take loss gradients on "
                         "calibration batches: pass calibration=")


def plan_for(model: nn.Module, budget: float, config: BlastConfig | None = None, example_inputs=None,
             analysis: Analysis | None = None, calibration=None, covariances=None, output_fisher=None) -> Plan:
    """The plan :func:`compress` would use, without changing the model. With ``calibration`` and
    ``strategy="error"``, the budget is spread by measured per-layer output error; with
    ``strategy="loss"``, by the output error weighted with the outputs' loss Fisher (an estimated
    loss increase). ``covariances`` / ``output_fisher``: the calibration statistics, if already
    collected (by :func:`compress`, which shares them with the factorization)."""
    config = config or BlastConfig()
    _needs_calibration(config, calibration)
    analysis = analysis or analyze(model, example_inputs)
    spectra = covs = None
    if config.strategy != "uniform" or config.block_choices:
        names = selected_layers(analysis, config)
        covs = covariances
        if covs is None and calibration is not None:
            covs = collect_covariances(model, names, calibration)
    if config.strategy == "loss" and output_fisher is None:
        output_fisher = collect_output_fisher(model, names, calibration)
    if config.strategy != "uniform":
        spectra = layer_spectra(model, names, covs, config.calibration_damping,
                                output_weights=output_fisher if config.strategy == "loss" else None)
    plan = make_plan(analysis, budget, config, spectra)
    if config.block_choices:
        errors = block_errors(model, plan, config, covs)
        plan = make_plan(analysis, budget, config, spectra, block_errors=errors)
        chosen = Counter(lp.blocks for name, lp in plan.layers.items() if name in errors)
        plan.notes.append("blocks chosen per layer by measured " + ("output" if covs else "weight") + " error: "
                          + ", ".join(f"{b}: {k} layers" for b, k in sorted(chosen.items())))
    if not analysis.traced:
        plan.notes.append(f"not traced: {analysis.note}; layers found by module discovery")
    return plan


def compress(model: nn.Module, budget: float = 0.5, *, config: BlastConfig | None = None, example_inputs=None,
             plan: Plan | None = None, calibration=None) -> nn.Module:
    """Replace the model's linear layers by BLAST layers keeping ``budget`` of their parameters.

    Returns the same model object (its class and behaviour kept: HF ``generate``/``save_pretrained``,
    diffusers pipelines), with the plan at ``model.blastfx_plan`` (and in ``model.config.blastfx``
    for HF models, so ``save_pretrained`` records it). Pass ``plan=`` to reuse an edited plan.
    ``calibration``: an iterable of batches (tensor / kwargs dict / args tuple) the model runs on;
    the factorization then minimizes each layer's output error on them (``config.sequential``:
    block by block on the already-compressed model; ``config.objective="loss"``: each output weighted
    by its loss Fisher, which needs batches the model returns a loss on). All-or-nothing: on any error the model is
    left as it was.
    """
    config = config or BlastConfig()
    calibration = None if calibration is None else list(calibration)
    _needs_calibration(config, calibration)
    if plan is not None:
        if not isinstance(plan, Plan):
            raise ValueError(f"plan must be a blastfx.Plan, got {type(plan).__name__}")
        _check_plan_fits(model, plan)
    else:
        check_budget(budget)
    # One pass each over the calibration batches on the dense model, shared by planner and factorization.
    builder_reads = config.init != "random" and not config.sequential     # sequential: per block, later
    planner_reads = plan is None and (config.strategy != "uniform" or bool(config.block_choices))
    analysis = covs = fisher = None
    if calibration is not None and (builder_reads or planner_reads or config.needs_loss):
        if plan is None:
            analysis = analyze(model, example_inputs)
        names = list(plan.layers) if plan is not None else selected_layers(analysis, config)
        if names and (builder_reads or planner_reads):
            covs = collect_covariances(model, names, calibration)
        if names and config.needs_loss:
            fisher = collect_output_fisher(model, names, calibration)
    if plan is None:
        plan = plan_for(model, budget, config, example_inputs, analysis=analysis, calibration=calibration,
                        covariances=covs, output_fisher=fisher)
        _check_plan_fits(model, plan)
    build = dict(init=config.init, method=config.method, iters=config.iters, tol=config.tol,
                 progress=config.progress, calibration_damping=config.calibration_damping,
                 output_weights=fisher if config.objective == "loss" else None)
    if calibration is None or config.init == "random":
        swap_modules(model, build_layers(model, plan, **build))
    elif not config.sequential:
        swap_modules(model, build_layers(model, plan, covariances=covs, **build))
    else:
        compress_sequential(model, plan, calibration, build)
    attach_plan(model, plan)
    return model


def attach_plan(model: nn.Module, plan: Plan) -> None:
    setattr(model, PLAN_ATTR, plan)
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        cfg.blastfx = plan.to_dict()
