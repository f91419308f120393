"""Planning: which layers become which structure at which size, for a budget.

:class:`Plan` / :class:`LayerPlan` (:mod:`.layers`) are the data; :func:`make_plan` (:mod:`.allocation`)
is the pure planner; :mod:`.checks` holds the checks of a budget and of a plan against a model, and
what statistics the planner reads.
"""
from .allocation import auto_start_plan, block_candidates, fit_blocks, make_plan, rank_at
from .checks import BUDGET_TOLERANCE, check_budget, check_plan_fits, needs
from .layers import DEFAULT_STRUCTURE, KINDS, PLAN_FORMAT, LayerPlan, Plan, full_rank

__all__ = ["auto_start_plan", "BUDGET_TOLERANCE", "DEFAULT_STRUCTURE", "KINDS", "PLAN_FORMAT", "LayerPlan", "Plan", "block_candidates", "check_budget",
           "check_plan_fits", "fit_blocks", "full_rank", "make_plan", "needs", "rank_at"]
