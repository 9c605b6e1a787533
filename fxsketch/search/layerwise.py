"""Layerwise search (the seeds' way): each tuning unit in turn, with the other layers dense.

Each unit (a layer, or a group of layers sharing values) gets its share of the trials in one
Optuna study. `fxsketch.search.finish` then combines every unit's best feasible values and
validates them on the whole model.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import optuna

from fxsketch import study_format as keys
from fxsketch.metrics import TrialFailed
from fxsketch.search.context import TrialContext
from fxsketch.search.evaluate import evaluate, over_budget, score_at
from fxsketch.search.warm import warm_joint
from fxsketch.units import Unit, invalid_reason, space_size, suggest_entry, warm_params
from fxsketch.workers import optimize_study

__all__ = ["run_layerwise", "best_entry", "searched"]

log = logging.getLogger(__name__)


def run_layerwise(ctx: TrialContext, study: optuna.Study, units: list[Unit], n_trials: int, timeout: float | None,
                  callbacks: list) -> None:
    """Run the units one after another, splitting this call's `n_trials` evenly over them (after
    the whole-model warm start, when there is one).

    A unit that finishes early (its space exhausted) leaves its share to the units after it.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    used = warm = 0
    if ctx.warm and ctx.warm_joint and ctx.threshold is not None:
        before = ctx.started
        warm_joint(ctx, study, units, n_trials, callbacks)
        used = warm = ctx.started - before
    if n_trials - used < len(units):
        left = max(0, n_trials - used)
        after = f" after the warm start's {warm} whole-model trials" if warm else ""
        log.warning("%d trial(s) left%s for %d tuning units: %d of them get no trial of their own and stay "
                    "dense unless a whole-model trial replaces them (give n_trials >= %d to search every unit)",
                    left, after, len(units), len(units) - left, len(units) + used)
    for i, unit in enumerate(units):
        share = -(-max(0, n_trials - used) // (len(units) - i))  # ceil: earlier units get the remainder
        left = None if deadline is None else deadline - time.monotonic()
        before = ctx.started
        if share and left is not None and left <= 0:
            log.warning("timeout reached: %s was not tuned", unit.key)
        elif share:
            _search_unit(ctx, study, unit, share, left, callbacks)
        elif warm:
            log.info("the warm start's whole-model trials used this call's trials: %s not tuned alone", unit.key)
        else:
            log.info("n_trials=%d leaves no trial for %s", n_trials, unit.key)
        used += ctx.started - before


def _search_unit(ctx: TrialContext, study: optuna.Study, unit: Unit, n_trials: int, timeout: float | None,
                 callbacks: list) -> None:
    size = space_size(unit, ctx.default_method)
    if ctx.warm and "low_rank" in unit.space:
        # no more than this unit's trials: a queued trial it leaves is drawn by the next unit's search
        queued = []
        for plan in ctx.warm:
            params = warm_params(unit, plan.get(unit.layers[0]))
            if params and params not in queued:
                queued.append(params)
        for params in queued[:n_trials]:
            study.enqueue_trial(params, skip_if_exists=True)

    def stop_when_exhausted(study: optuna.Study, trial) -> None:
        if len(ctx.seen.get(unit.key, ())) >= size:
            study.stop()  # every value set of this unit has been tried

    optimize_study(study, lambda trial: _unit_trial(ctx, unit, trial), n_trials, timeout, (TrialFailed,),
                   [*callbacks, stop_when_exhausted])


def _unit_trial(ctx: TrialContext, unit: Unit, trial: optuna.Trial) -> float:
    # A retried trial of a dead worker carries its unit (and fixed values); evaluate that unit.
    unit = ctx.units.get(trial.user_attrs.get(keys.UNIT), unit)
    trial.set_user_attr(keys.UNIT, unit.key)
    entry = suggest_entry(unit, trial, ctx.default_method, ctx.records)
    trial.set_user_attr(keys.ENTRY, entry)
    plan = {name: entry for name in unit.layers}
    reason = invalid_reason(ctx.records, unit, entry) or over_budget(ctx, plan, unit.layers, unit.key)
    return evaluate(ctx, trial, plan, unit=unit.key, values=entry, reason=reason, copy_weights=unit.copy_weights)


def best_entry(study: optuna.Study, key: str, threshold: float | None = None) -> tuple[dict[str, Any], float] | None:
    """The best feasible trial's entry and accuracy for unit `key` (scored against `threshold`:
    `score_at`), or None."""
    best = None
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        score = score_at(t, threshold)
        if t.user_attrs.get(keys.UNIT) != key or not math.isfinite(score):
            continue
        rank = (score, t.user_attrs.get(keys.ACCURACY, -math.inf))
        if best is None or rank > best[0]:
            best = (rank, t.user_attrs[keys.ENTRY], t.user_attrs.get(keys.ACCURACY, math.nan))
    return None if best is None else (best[1], best[2])


def searched(study: optuna.Study, key: str) -> bool:
    """Whether unit `key` had a trial of its own that was evaluated (not only pruned or lost)."""
    return any(t.user_attrs.get(keys.UNIT) == key and keys.ACCURACY in t.user_attrs
               for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
