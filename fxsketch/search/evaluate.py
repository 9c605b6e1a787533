"""One trial protocol for every strategy: check the plan, reuse an earlier result or evaluate it,
and record what happened in the trial's attributes (`fxsketch.study_format`)."""

from __future__ import annotations

import datetime
import json
import logging
import math
from typing import Any

import optuna

from fxsketch import study_format as keys
from fxsketch.metrics import TrialFailed, call_metric
from fxsketch.plan import plan_cost
from fxsketch.search.context import TrialContext

__all__ = ["evaluate", "over_budget", "remember", "ran", "plan_key", "score_at"]

log = logging.getLogger(__name__)

TWIN_PATIENCE_S = 600.0  # a twin trial running longer is taken for a dead worker's and not waited for


def plan_key(values: Any) -> str:
    """The canonical text of a unit's values or a plan: equal values, equal keys."""
    return json.dumps(values, sort_keys=True)


def over_budget(ctx: TrialContext, plan: dict[str, dict[str, Any]], layers: list[str], what: str = "") -> str:
    """Why `plan` over `layers` breaks the budget ("" when it keeps it). Layers that are a share of
    the selection's dense cost get that share of the budget: if every unit keeps it, the plan does."""
    records = [ctx.records[n] for n in layers]
    selected = [ctx.records[n] for n in ctx.selected]
    return ctx.budget.excess(plan_cost(records, plan), plan_cost(records, {}), plan_cost(selected, {}), what)


def evaluate(ctx: TrialContext, trial: optuna.Trial, plan: dict[str, dict[str, Any]], *, unit: str, values: Any,
             reason: str = "", copy_weights: bool = True) -> tuple[float, float] | float:
    """Run `trial` on `plan`, the values `values` of tuning unit `unit` (a layer, a group, or the
    whole model): pruned when `reason` says so, the result of an earlier trial with the same values
    reused, else the plan built and measured. Returns (accuracy, speed) for a multi-objective
    search, else the score."""
    trial.set_user_attr(keys.UNIT, unit)
    selected = [ctx.records[n] for n in ctx.selected]
    trial.set_user_attr(keys.FLOPS, plan_cost(selected, plan).flops / max(ctx.selected_dense[0], 1))
    key = (unit, plan_key(values))
    # one read of the study: what other workers (or an earlier run) finished, and what they run now
    trials = trial.study.get_trials(deepcopy=False)
    remember(ctx, trials)
    twin = _running_twin(trial, trials, unit, key[1])
    repeat = key[1] in ctx.seen.get(unit, ())
    ctx.seen.setdefault(unit, set()).add(key[1])  # a pruned draw counts too: the space runs out
    if reason:
        again = ""
        if repeat or twin is not None:  # pruned before (or right now, elsewhere): not counted again
            trial.set_user_attr(keys.REUSED, -1 if twin is None else twin)
            again = " (drawn before: not counted against n_trials)"
        else:
            ctx.started += 1
        trial.set_user_attr(keys.NOTE, f"pruned before evaluation: {reason}{again}")
        raise optuna.TrialPruned(reason)
    hit = ctx.recall(key, plan, copy_weights)
    if hit is None and twin is not None:  # another worker is evaluating the same values right now: leave them to it
        trial.set_user_attr(keys.REUSED, twin)
        trial.set_user_attr(keys.NOTE, f"same values as trial {twin}, running in another process: not counted "
                                       "against n_trials")
        raise optuna.TrialPruned(f"values being evaluated by trial {twin}")
    if hit is not None:
        accuracy, speed, first = hit
        what = "plan" if unit == keys.WHOLE_MODEL else "values"
        trial.set_user_attr(keys.NOTE, f"same {what} as trial {first}: result reused, not counted against n_trials")
        trial.set_user_attr(keys.REUSED, first)
    else:
        ctx.started += 1  # a configuration the study did not hold: it counts against n_trials
        module = ctx.build(plan, copy_weights=copy_weights)
        try:
            accuracy = call_metric(ctx.accuracy_fn, module, "accuracy_fn", ctx.trial_limit())
            speed = ctx.speed(module, plan, accuracy)
        except TrialFailed as exc:
            trial.set_user_attr(keys.NOTE, str(exc))
            log.warning("trial %d (%s) failed: %s", trial.number, unit, exc)
            raise
        ctx.memo[key] = (accuracy, speed, trial.number)
    trial.set_user_attr(keys.ACCURACY, accuracy)
    trial.set_user_attr(keys.SPEED, speed)
    trial.set_user_attr(keys.SPEED_SOURCE, ctx.speed_label(speed))
    if ctx.threshold is not None:
        trial.set_constraint("accuracy", ctx.threshold - accuracy)  # ≤ 0 is feasible
    if ctx.multi:
        return accuracy, speed
    score = ctx.score(accuracy, speed)
    trial.set_user_attr(keys.SCORE, score)
    return score


def _running_twin(trial: optuna.Trial, trials: list[optuna.trial.FrozenTrial], unit: str, values: str) -> int | None:
    """The number of another trial, still running (another worker's), that drew the same values
    for the same unit; None if there is none. Every trial sets its values before it looks, so of
    two twins the one that looks second always sees the first and yields (both yield, and the
    values are drawn again later, only when both look at once)."""
    for other in trials:
        attrs = other.user_attrs
        if (other.state != optuna.trial.TrialState.RUNNING or other.number == trial.number
                or attrs.get(keys.UNIT) != unit):
            continue
        started = other.datetime_start
        if started is not None and (datetime.datetime.now() - started).total_seconds() > TWIN_PATIENCE_S:
            continue  # running that long: most likely a dead worker's, which nobody will finish
        if _values(attrs) == values:
            return other.number
    return None


def _values(attrs: dict[str, Any]) -> str:
    """The key of a trial's values from its attributes: its plan (whole model) or its unit's entry."""
    return plan_key(attrs.get(keys.PLAN) if attrs.get(keys.UNIT) == keys.WHOLE_MODEL else attrs.get(keys.ENTRY))


def score_at(trial: optuna.trial.FrozenTrial, threshold: float | None) -> float:
    """A finished single-objective trial's score against `threshold`: its speed where its accuracy
    meets it, else -inf (None: the score it was given). Trials judged against a lower working bar
    (`recover_at="finish"`) are ranked again this way when a higher one is tried."""
    if threshold is None:
        return trial.value
    accuracy, speed = trial.user_attrs.get(keys.ACCURACY), trial.user_attrs.get(keys.SPEED)
    if accuracy is None or speed is None or not accuracy >= threshold or not math.isfinite(speed):
        return -math.inf
    return speed


def ran(trial: optuna.trial.FrozenTrial) -> bool:
    """The trial was evaluated (or failed while evaluating), not pruned or lost."""
    return trial.state != optuna.trial.TrialState.FAIL or keys.NOTE in trial.user_attrs


def remember(ctx: TrialContext, trials: list[optuna.trial.FrozenTrial]) -> None:
    """The finished configurations among `trials` (a resumed study's, other workers') are
    remembered, so none is evaluated twice; values pruned before evaluation count as seen."""
    for t in trials:
        attrs = t.user_attrs
        if (t.number in ctx.known or keys.UNIT not in attrs or keys.REUSED in attrs
                or t.state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)):
            continue
        if t.state == optuna.trial.TrialState.PRUNED:  # pruned before evaluation: its values are seen
            if str(attrs.get(keys.NOTE, "")).startswith("pruned before evaluation"):
                ctx.known.add(t.number)
                ctx.seen.setdefault(attrs[keys.UNIT], set()).add(_values(attrs))
            continue
        if keys.ACCURACY not in attrs:
            continue
        ctx.known.add(t.number)
        values = _values(attrs)
        ctx.memo.setdefault((attrs[keys.UNIT], values), (attrs[keys.ACCURACY], attrs[keys.SPEED], t.number))
        ctx.seen.setdefault(attrs[keys.UNIT], set()).add(values)

