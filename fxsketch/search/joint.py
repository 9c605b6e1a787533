"""Joint search: every trial is a whole-model plan (each layer with its own values).

This is the strategy for budgets on the whole model, for the allocation warm start to pay off
directly, and for multi-objective search, whose Pareto front is a set of whole-model plans.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from torch import nn

from fxsketch import study_format as keys
from fxsketch.metrics import TrialFailed
from fxsketch.plan import plan_cost
from fxsketch.search.context import TrialContext
from fxsketch.search.evaluate import evaluate, over_budget, plan_key, score_at
from fxsketch.units import Unit, invalid_reason, suggest_entry, warm_params
from fxsketch.workers import optimize_study

__all__ = ["ParetoPoint", "run_joint", "evaluate_plan", "leading_joint", "pareto_points", "flat_values"]


@dataclass
class ParetoPoint:
    """One plan of the accuracy/speed Pareto front."""

    plan: dict[str, dict[str, Any]]
    accuracy: float
    speed: float
    params: int
    trial: int
    _build: Callable[[dict], nn.Module] | None = field(default=None, repr=False)

    @property
    def graph_module(self) -> nn.Module:
        """The model rewritten with this plan (built on first use)."""
        if self._build is None:
            raise RuntimeError("this point was loaded without its model; use fxsketch.rewrite(model, point.plan)")
        return self._build(self.plan)


def flat_values(units: Sequence[Unit], plan: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A whole-model plan as `{"unit.param": value}`, the joint trial's Optuna parameters."""
    return {f"{u.key}.{k}": v for u in units for k, v in plan.get(u.layers[0], {"method": "dense"}).items()}


def evaluate_plan(ctx: TrialContext, trial: optuna.Trial, plan: dict, flat: dict,
                  reason: str = "") -> tuple[float, float] | float:
    """Evaluate a whole-model `plan` as trial `trial` (pruned when `reason` or a budget says so)."""
    trial.set_user_attr(keys.ENTRY, flat)
    trial.set_user_attr(keys.PLAN, plan)
    reason = reason or over_budget(ctx, plan, ctx.selected)
    return evaluate(ctx, trial, plan, unit=keys.WHOLE_MODEL, values=plan, reason=reason)


def _joint_trial(ctx: TrialContext, units: list[Unit], trial: optuna.Trial):
    trial.set_user_attr(keys.UNIT, keys.WHOLE_MODEL)
    plan, flat, reason = {}, {}, ""
    for unit in units:
        entry = suggest_entry(unit, trial, ctx.default_method, ctx.records)
        reason = reason or invalid_reason(ctx.records, unit, entry)
        flat.update({f"{unit.key}.{k}": v for k, v in entry.items()})
        plan.update({name: entry for name in unit.layers})
    plan = {k: v for k, v in plan.items() if v["method"] != "dense"}
    return evaluate_plan(ctx, trial, plan, flat, reason)


def run_joint(ctx: TrialContext, study: optuna.Study, units: list[Unit], n_trials: int, timeout: float | None,
              callbacks: list) -> None:
    """Run `n_trials` joint trials (more, on a resumed study), the warm start's plans first."""
    for plan in ctx.warm:
        params = {k: v for unit in units for k, v in warm_params(unit, plan.get(unit.layers[0])).items()}
        if params:
            study.enqueue_trial(params, skip_if_exists=True)
    optimize_study(study, lambda trial: _joint_trial(ctx, units, trial), n_trials, timeout, (TrialFailed,),
                   list(callbacks))


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.user_attrs.get(keys.UNIT) == keys.WHOLE_MODEL]


def leading_joint(study: optuna.Study, count: int, threshold: float | None = None) -> list[tuple[dict, float]]:
    """The plans and accuracies of the `count` best feasible single-objective joint trials with
    different plans (scored against `threshold`: `score_at`), best first."""
    trials = _complete(study)  # once: other workers' trials finish meanwhile
    scores = {t.number: score_at(t, threshold) for t in trials}
    scored = sorted((t for t in trials if math.isfinite(scores[t.number])),
                    key=lambda t: (scores[t.number], t.user_attrs[keys.ACCURACY]), reverse=True)
    out: dict[str, tuple[dict, float]] = {}
    for t in scored:
        if len(out) == count:
            break
        out.setdefault(plan_key(t.user_attrs[keys.PLAN]), (t.user_attrs[keys.PLAN], t.user_attrs[keys.ACCURACY]))
    return list(out.values())


def pareto_points(ctx: TrialContext, study: optuna.Study, build: Callable[[dict], nn.Module]) -> list[ParetoPoint]:
    """The non-dominated feasible plans (accuracy and speed both maximized), fastest first."""
    trials = [t for t in _complete(study)
              if ctx.threshold is None or t.user_attrs[keys.ACCURACY] >= ctx.threshold]
    selected = [ctx.records[n] for n in ctx.selected]
    points = []
    for t in trials:
        a, s = t.user_attrs[keys.ACCURACY], t.user_attrs[keys.SPEED]
        dominated = any(o is not t and o.user_attrs[keys.ACCURACY] >= a and o.user_attrs[keys.SPEED] >= s
                        and (o.user_attrs[keys.ACCURACY], o.user_attrs[keys.SPEED]) != (a, s)
                        for o in trials)
        if not dominated:
            plan = t.user_attrs[keys.PLAN]
            points.append(ParetoPoint(plan, a, s, plan_cost(selected, plan).params, t.number, build))
    unique = {plan_key(p.plan): p for p in sorted(points, key=lambda p: -p.trial)}
    return sorted(unique.values(), key=lambda p: (-p.speed, -p.accuracy))
