"""Joint search: every trial is a whole-model plan (each layer with its own values).

This is the strategy for budgets on the whole model, for the allocation warm start to pay off
directly, and for multi-objective search, whose Pareto front is a set of whole-model plans.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
from torch import nn

from fxsketch.measure import plan_cost
from fxsketch import study_format as keys
from fxsketch.metrics import TrialFailed, call_metric
from fxsketch.units import invalid_reason, suggest_entry, warm_params
from fxsketch.workers import optimize_study

__all__ = ["JOINT_KEY", "ParetoPoint", "run_joint", "best_joint", "pareto_points"]

JOINT_KEY = "*"


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


def _suggest_plan(ctx, units, trial) -> tuple[dict, dict, str]:
    plan, flat, reason = {}, {}, ""
    for unit in units:
        entry = suggest_entry(unit, trial, ctx.default_method, ctx.records)
        reason = reason or invalid_reason(ctx.records, unit, entry)
        flat.update({f"{unit.key}.{k}": v for k, v in entry.items()})
        plan.update({name: entry for name in unit.layers})
    return {k: v for k, v in plan.items() if v["method"] != "dense"}, flat, reason


def _over_budget(ctx, plan) -> str:
    if ctx.budget.flops is None and ctx.budget.params is None:
        return ""
    selected = [ctx.records[n] for n in ctx.selected]
    params, flops = plan_cost(selected, plan)
    max_flops, max_params = ctx.budget.limits(*ctx.selected_dense)
    if flops > max_flops:
        return f"over the FLOP budget: {flops:,} > {max_flops:,.0f}"
    if params > max_params:
        return f"over the parameter budget: {params:,} > {max_params:,.0f}"
    return ""


def _joint_trial(ctx, units, trial: optuna.Trial, multi: bool):
    trial.set_user_attr(keys.UNIT, JOINT_KEY)
    plan, flat, reason = _suggest_plan(ctx, units, trial)
    return evaluate_plan(ctx, trial, plan, flat, reason, multi)


def evaluate_plan(ctx, trial: optuna.Trial, plan: dict, flat: dict, reason: str = "", multi: bool = False):
    """Evaluate a whole-model `plan` as joint trial `trial` (pruned when `reason` or a budget says so)."""
    trial.set_user_attr(keys.UNIT, JOINT_KEY)
    trial.set_user_attr(keys.ENTRY, flat)
    trial.set_user_attr(keys.PLAN, plan)
    reason = reason or _over_budget(ctx, plan)
    if reason:
        trial.set_user_attr(keys.NOTE, f"pruned before evaluation: {reason}")
        raise optuna.TrialPruned(reason)
    key = (JOINT_KEY, json.dumps(plan, sort_keys=True))
    hit = ctx.recall(key, plan)
    if hit is not None:
        accuracy, speed, first = hit
        trial.set_user_attr(keys.NOTE, f"same plan as trial {first}: result reused")
    else:
        module = ctx.build(plan)
        try:
            accuracy = call_metric(ctx.accuracy_fn, module, "accuracy_fn")
            speed = ctx.speed(module, plan, accuracy)
        except TrialFailed as exc:
            trial.set_user_attr(keys.NOTE, str(exc))
            raise
        ctx.memo[key] = (accuracy, speed, trial.number)
    trial.set_user_attr(keys.ACCURACY, accuracy)
    trial.set_user_attr(keys.SPEED, speed)
    trial.set_user_attr(keys.SPEED_SOURCE, ctx.speed_label(speed))
    if ctx.threshold is not None:
        trial.set_constraint("accuracy", ctx.threshold - accuracy)
    if multi:
        return accuracy, speed
    score = ctx.score(accuracy, speed)
    trial.set_user_attr(keys.SCORE, score)
    return score


def _enqueue_warm(ctx, study, units) -> None:
    for plan in ctx.warm:
        params = {k: v for unit in units for k, v in warm_params(unit, plan.get(unit.layers[0])).items()}
        if params:
            study.enqueue_trial(params, skip_if_exists=True)


def run_joint(ctx, study, units, n_trials, timeout, callbacks, multi: bool) -> None:
    """Run `n_trials` joint trials (more, on a resumed study)."""
    if ctx.warm:
        _enqueue_warm(ctx, study, units)
    optimize_study(study, lambda trial: _joint_trial(ctx, units, trial, multi), n_trials, timeout, (TrialFailed,),
                   list(callbacks))


def _complete(study):
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.user_attrs.get(keys.UNIT) == JOINT_KEY]


def best_joint(study) -> tuple[dict, float] | None:
    """The plan and accuracy of the best feasible single-objective joint trial, or None."""
    scored = [t for t in _complete(study) if math.isfinite(t.value)]
    if not scored:
        return None
    best = max(scored, key=lambda t: (t.value, t.user_attrs[keys.ACCURACY]))
    return best.user_attrs[keys.PLAN], best.user_attrs[keys.ACCURACY]


def pareto_points(ctx, study, build) -> list[ParetoPoint]:
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
            points.append(ParetoPoint(plan, a, s, plan_cost(selected, plan)[0], t.number, build))
    unique = {json.dumps(p.plan, sort_keys=True): p for p in sorted(points, key=lambda p: -p.trial)}
    return sorted(unique.values(), key=lambda p: (-p.speed, -p.accuracy))
