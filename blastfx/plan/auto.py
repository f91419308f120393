"""``structure="auto"``: each layer BLAST, a ladder family (every registered structure with ``sizes``:
SS1) or dense, and the whole never worse than one family alone on the objective the allocation
minimizes.

The choice is made between whole plans, each within the budget:

* ``"per layer"``: the plan ``structure="blast"`` makes, with each BLAST layer made a ladder layer
  where that family's measured output error at no more than the layer's allotted parameters is below
  BLAST's measured output error at them (a factorization at the planned rank, fitted as the builder
  fits it, :func:`blastfx.statistics.structure_errors.blast_errors`); the parameters a ladder layer
  frees go back to the ranks of the layers still BLAST. Each layer keeps the allotment the strategy
  gave it, so this plan is the BLAST plan with some layers swapped for something measured better at
  their size;
* ``"blast"``: the plan ``structure="blast"`` makes (the resolved strategy's allocation);
* one per ladder family, by its name (``"ss1"``): the plan ``structure=<name>`` makes;
* ``"mixed"``, under the measured strategies ("error", "loss") only: one allocation over every
  family's error curves (:func:`blastfx.plan.choice.choose_structures`), which can move parameters
  between layers, e.g. to a layer that one family makes exact with few of them. Its BLAST points are
  the whitened spectrum's tails, an upper bound of BLAST's error. Under ``"uniform"`` the strategy's
  point is that every layer keeps its share: a plan moving parameters between layers by summed
  relative errors measured worse than equal shares (strategy "error" against "uniform"), so no
  plan of this kind competes there.

They are compared on the calibration objective: the sum over layers of the output error, each
relative to the layer's output energy (strategies "uniform", "error") or weighted by the outputs'
loss Fisher (strategy "loss", an estimated loss increase). Dense layers count 0, ladder layers their
family's measured error at their size, BLAST layers the least of their measured error at the largest
measured rank not above theirs and the spectrum's tail at their rank (the best rank-r matrix is a
BLAST matrix of rank r). ``"per layer"`` is never above ``"blast"`` there, and the least of all wins
(ties to the earlier in the list above).

Pure, like the rest of the planner: errors and spectra arrive as numbers.
"""
from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Callable

from .. import structures
from .allocation import _balance, note_budget_miss
from .layers import DEFAULT_STRUCTURE, LayerPlan, Plan

Errors = dict  # {layer: ({size: error}, energy)}
SizeErrors = dict  # {ladder structure: Errors}


def blast_error(name: str, lp: LayerPlan, blast_errors: Errors, spectra: dict | None) -> float:
    """BLAST layer ``name``'s output error at its planned rank, or a bound of it from above: the least
    of the error measured at the largest measured rank not above it (more rank fits no worse) and the
    tail energy of its whitened spectrum at that rank (the best rank-r matrix is a BLAST matrix of
    rank r); ``inf`` when neither is known."""
    bounds = []
    measured = blast_errors.get(name, ({}, 0.0))[0]
    ranks = [r for r in measured if r <= lp.rank]
    if ranks:
        bounds.append(measured[max(ranks)])
    if spectra is not None and name in spectra:
        s2 = spectra[name].double().pow(2)
        bounds.append(float(s2[lp.rank:].sum()) if lp.rank < len(s2) else 0.0)
    return min(bounds, default=math.inf)


def ladder_error(name: str, lp: LayerPlan, size_errors: SizeErrors) -> float:
    """The measured output error of ladder layer ``name`` at its size (its family's exact size: 0)."""
    structure = structures.get(lp.structure)
    size = structure.knob(lp)
    if size == structure.exact(lp.out_features, lp.in_features):
        return 0.0
    return size_errors.get(lp.structure, {}).get(name, ({}, 0.0))[0].get(size, math.inf)


def _energy(name: str, blast_errors: Errors, size_errors: SizeErrors) -> float:
    """The layer's output energy, as a ladder family measured it, else as BLAST's probe did."""
    return next((errors[name][1] for errors in size_errors.values() if name in errors),
                blast_errors.get(name, ({}, 1.0))[1])


def objective(plan: Plan, names, blast_errors: Errors, size_errors: SizeErrors, spectra, relative: bool) -> float:
    """The calibration objective of ``plan`` over the layers ``names`` (see the module docstring)."""
    total = 0.0
    for k in names:
        lp = plan.layers.get(k)
        if lp is None:                           # kept dense
            continue
        error = (blast_error(k, lp, blast_errors, spectra) if lp.structure == DEFAULT_STRUCTURE
                 else ladder_error(k, lp, size_errors))
        energy = _energy(k, blast_errors, size_errors)
        total += error / max(energy, 1e-300) if relative else error
    return total


def per_layer(blast: Plan, adjustable: list[str], target: int, config, blast_errors: Errors,
              size_errors: SizeErrors, spectra) -> Plan:
    """``blast`` with each adjustable BLAST layer made a ladder layer where a family's measured error at
    no more than the layer's planned parameters is below BLAST's there (the least such error; ties to
    fewer parameters, then to the later size measured); the freed parameters go to the ranks of the
    layers still BLAST."""
    plan = copy.deepcopy(blast)
    families = [s for s in structures.ladders() if s.name in size_errors]
    for k in adjustable:
        lp = plan.layers.get(k)
        if lp is None or lp.structure != DEFAULT_STRUCTURE:
            continue
        m, n = lp.out_features, lp.in_features
        fits = [(e, s.num_params(m, n, size), i, -j, size)
                for i, s in enumerate(families)
                for j, (size, e) in enumerate(size_errors[s.name].get(k, ({}, 0.0))[0].items())
                if s.num_params(m, n, size) <= lp.params]
        if not fits:
            continue
        error, _, i, _, size = min(fits, key=lambda f: f[:4])
        if error < blast_error(k, lp, blast_errors, spectra):
            family = families[i]
            plan.layers[k] = LayerPlan.of(family.name, m, n, family.fields(size), kind=lp.kind, bias=lp.bias)
    still_blast = [k for k in adjustable if k in plan.layers and plan.layers[k].structure == DEFAULT_STRUCTURE]
    if still_blast:
        _balance(plan, still_blast, target, config.rank_multiple)
    return plan


def choose_auto(make: Callable[[str], Plan], adjustable: list[str], target: int, config, spectra=None,
                size_errors: SizeErrors | None = None, blast_errors: Errors | None = None) -> Plan:
    """The plan of least calibration objective among the candidates of the module docstring.
    ``make(structure)``: the plan of one family ("blast", a ladder family's name; "auto" for the mixed
    allocation) for the same layers and budget. ``adjustable``: the layers whose size the planner
    sets. ``blast_errors``: {layer: ({rank: error}, energy)} measured at the ranks ``make("blast")``
    plans (:func:`blastfx.statistics.structure_errors.blast_errors`); ``size_errors``: {ladder family:
    {layer: ({size: error}, energy)}} (:func:`blastfx.statistics.structure_errors.ladder_errors`)."""
    if size_errors is None or blast_errors is None:
        raise ValueError("structure='auto' needs the layers' measured errors of each ladder family (size_errors=) "
                         "and BLAST errors at the BLAST plan's ranks (blast_errors=, "
                         "blastfx.statistics.structure_errors)")
    blast = make(DEFAULT_STRUCTURE)
    unmeasured = [k for k, lp in blast.layers.items() if k in adjustable and lp.rank not in
                  blast_errors.get(k, ({}, 0.0))[0]]
    if unmeasured:
        raise ValueError(f"structure='auto': blast_errors has no error for {unmeasured[0]!r} at rank "
                         f"{blast.layers[unmeasured[0]].rank}, the rank the BLAST plan gives it")
    candidates = {"per layer": per_layer(blast, adjustable, target, config, blast_errors, size_errors, spectra),
                  "blast": blast, **{s.name: make(s.name) for s in structures.ladders()}}
    if config.strategy != "uniform" and spectra is not None:
        candidates["mixed"] = make("auto")
    relative = config.strategy != "loss"
    names = sorted(set(blast.layers) | set(blast.dense))
    scores = {key: objective(p, names, blast_errors, size_errors, spectra, relative) for key, p in candidates.items()}
    best = min(scores, key=lambda key: (scores[key], list(candidates).index(key)))
    plan = candidates[best]
    note_budget_miss(plan)                  # the BLAST plan's note, if any, is not this plan's
    counts = Counter(lp.structure for k, lp in plan.layers.items() if k in names)
    unit = "relative output errors" if relative else "loss-weighted output errors"
    plan.notes.append(
        "structure 'auto': " + ", ".join([f"{counts[s]} {s.upper()}" for s in sorted(counts)]
                                          + [f"{len([k for k in plan.dense if k in names])} dense"])
        + f" (the {best!r} plan; sum of {unit}: "
        + ", ".join(f"{key} {score:.4g}" for key, score in scores.items()) + ")")
    return plan


__all__ = ["blast_error", "choose_auto", "ladder_error", "objective", "per_layer"]
