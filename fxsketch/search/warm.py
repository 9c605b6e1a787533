"""The warm start: plans from the rank allocation to try before (or instead of) searching.

With calibration data every tuned layer's error-versus-rank curve is known from its cached
decomposition, so `fxsketch.allocate` proposes whole-model plans at a FLOP budget for free. The
layerwise search first runs a few of them as whole-model trials (`warm_joint`); both strategies
start their Optuna studies from them (`warm_start_plans`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import optuna

from fxsketch import study_format as keys
from fxsketch.allocate import (
    ALLOCATABLE, allocate_units, entry_sensitivity, layer_errors, target_error_units, unit_choices, unit_weights,
)
from fxsketch.fuse import mlp_pairs
from fxsketch.metrics import TrialFailed
from fxsketch.plan import Budget, plan_cost
from fxsketch.replacements import get_kind
from fxsketch.search.context import TrialContext
from fxsketch.search.evaluate import plan_key
from fxsketch.search.joint import evaluate_plan, flat_values
from fxsketch.units import Unit, invalid_reason, unit_methods
from fxsketch.workers import optimize_study

__all__ = ["unit_sensitivity", "warm_start_plans", "warm_joint", "precision_plan", "precision_candidates", "probe_plan",
           "WARM_TRIALS"]

log = logging.getLogger(__name__)


def unit_sensitivity(ctx: TrialContext, units: list[Unit], sensitivity: Any, batches) -> dict[str, float] | None:
    """`allocation_sensitivity` as per-layer weights: a measured one ("output", an accuracy
    function) is probed once here, at half the FLOPs, so later allocations cost no evaluation."""
    if sensitivity is None or isinstance(sensitivity, Mapping):
        return None if sensitivity is None else dict(sensitivity)
    usable = _allocatable(units)
    if not usable:
        return None
    weights = ctx.weights(usable)
    options = [unit_choices(u, ctx.records, ctx.cache, weights) for u in usable]
    factors = unit_weights(usable, options, ctx.records, ctx.cache, sensitivity, ctx.gm, list(batches), share=0.5)
    return {name: w / len(u.layers) for u, w in zip(usable, factors) for name in u.layers}


def warm_start_plans(ctx: TrialContext, units: list[Unit]) -> list[dict[str, dict[str, Any]]]:
    """Plans to try first: every layer in reduced precision (`precision_candidates`, without a FLOP
    budget), each layer's cheapest rank under 1% and 5% output error, then the allocations at 25%
    and 50% of the FLOPs (with a FLOP budget: the allocations under it)."""
    first = [plan for plan, _ in precision_candidates(ctx, units)] if ctx.budget.flops is None else []
    usable = _allocatable(units)
    if not usable:
        return first

    weights = ctx.weights(usable)
    plans = [target_error_units(usable, ctx.records, ctx.cache, weights, tol) for tol in (0.01, 0.05)]
    budgets = [Budget(f, ctx.budget.params, ctx.budget.bytes) for f in (0.25, 0.5)]
    if ctx.budget.flops is not None:
        budgets.insert(0, ctx.budget)
        plans = []  # with a FLOP budget, start from plans that respect it
    for budget in budgets:
        try:
            plans.append(allocate_units(usable, ctx.records, ctx.cache, weights, budget,
                                        sensitivity=ctx.sensitivity))
        except ValueError as exc:
            log.info("no warm start at %s: %s", budget, exc)
    return first + plans


def precision_plan(units: list[Unit], smooth: bool = True) -> dict[str, dict[str, Any]]:
    """Every unit whose space offers an automatic precision kind (int8) as its method, in it:
    the plan that changes precision only, which often keeps accuracy where low rank does not.
    `smooth=False` marks int8 entries unsmoothed (`fxsketch.replacements.precision.smoothing`)."""
    plan = {}
    for unit in units:
        spec = unit.space.get("method") if unit.define_by_run is None else None
        offered = [m for m in (spec.values() or []) if get_kind(m).automatic] if spec is not None else []
        if offered:
            entry = {"method": offered[0], **({} if smooth or offered[0] != "int8" else {"smooth": False})}
            plan.update({name: dict(entry) for name in unit.layers})
    return plan


def precision_candidates(ctx: TrialContext, units: list[Unit]) -> list[tuple[dict[str, dict[str, Any]], str]]:
    """The precision plans to try, fastest first, each with its note: with calibration data, first
    unsmoothed with static inputs where two int8 layers meet at an activation (`static_pairs`: the
    rewrite runs each pair as one op); where the int8 layers would be smoothed (smoothing on),
    unsmoothed (no multiply before each int8 layer; often accurate enough); then as the kinds build
    them by default."""
    precise = precision_plan(units)
    if not precise:
        return []
    note = "warm start: every tuned layer in reduced precision"
    plain = precision_plan(units, smooth=False)
    smooths = ctx.cache.smooth and any(ctx.cache.second_moment(n) is not None for n in precise)
    static = static_pairs(ctx, plain)
    return ([(static, note + ", unsmoothed, static inputs after int8 activations")] if static != plain else []) \
        + ([(plain, note + ", unsmoothed")] if smooths and plain != precise else []) + [(precise, note)]


def static_pairs(ctx: TrialContext, plan: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`plan` with each int8 layer that takes an activation of another int8 layer's output
    (`fxsketch.fuse.mlp_pairs`) unsmoothed and static, where calibration recorded its input range."""
    out = dict(plan)
    for second, first in mlp_pairs(ctx.records.values()).items():
        both = all(plan.get(n, {}).get("method") == "int8" for n in (first, second))
        if both and ctx.cache.input_range(second) is not None:
            out[second] = {**plan[second], "smooth": False, "static": True}
    return out


def probe_plan(ctx: TrialContext, units: list[Unit], share: float) -> dict[str, dict[str, Any]]:
    """The allocation at `share` of the allocatable units' FLOPs, its factors int8 where the units
    offer that (`precision_plan`): a plan typical of the low-rank trials, to measure on (`{}` when
    no unit can be allocated)."""
    usable = _allocatable(units)
    if not usable:
        return {}
    try:
        plan = allocate_units(usable, ctx.records, ctx.cache, ctx.weights(usable),
                              Budget(share, ctx.budget.params, ctx.budget.bytes), sensitivity=ctx.sensitivity)
    except ValueError as exc:
        log.info("no allocation at %.0f%% of the FLOPs: %s", 100 * share, exc)
        return {}
    precise = precision_plan(units)
    return _lifted(plan, usable, precise) if precise else plan


def _lifted(plan: dict[str, dict[str, Any]], units: list[Unit], precise: dict[str, dict[str, Any]]) -> dict:
    """`plan` with its low-rank factors in int8 where `precise` has the layer in int8 and the unit's
    space offers it, and the layers it leaves dense in `precise`'s entry: the allocation on top of
    a precision that kept accuracy (all of it, or the units least sensitive to it)."""
    out = dict(precise)
    for unit in units:
        for name in unit.layers:
            entry = plan.get(name)
            if entry is None:
                continue
            space = unit.space.get("precision")
            lift = name in precise and space is not None and space.contains("int8")
            smooth = {k: v for k, v in precise.get(name, {}).items() if k == "smooth"}
            out[name] = {**entry, "precision": "int8", **smooth} if lift else entry
    return out


def _faster_only(ctx: TrialContext, plan: dict, precise: dict, units: list[Unit]) -> dict[str, dict[str, Any]]:
    """`plan` with each unit's low-rank entry that the per-layer timings do not find at least
    `STEP_GAIN` faster than its entry in `precise` put back to that entry: an allocation's rank
    can save FLOPs and still run slower than the whole int8 layer, and would then cost accuracy
    for nothing."""
    out = dict(plan)
    for unit in units:
        entry, base = plan.get(unit.layers[0]), precise.get(unit.layers[0])
        if entry is None or base is None or "low_rank" not in entry:
            continue
        ours, theirs = _unit_seconds(ctx, unit, entry, precise), _unit_seconds(ctx, unit, base, precise)
        if ours is not None and theirs is not None and ours >= (1 - STEP_GAIN) * theirs:
            out.update({n: dict(precise[n]) for n in unit.layers})
    return out


def _unit_seconds(ctx: TrialContext, unit: Unit, entry: dict | None, plan: dict) -> float | None:
    """Seconds per forward of `unit`'s layers built as `entry` in `plan`, by the per-layer timings,
    less what the fused int8 pairs of `plan` with the unit at `entry` save (`fusion_saving`: an
    entry that breaks a pair loses it). None: some layer cannot be timed alone."""
    timer = ctx.layer_timer()
    times = [timer.seconds(n, entry) for n in unit.layers]
    if any(t is None for t in times):
        return None
    placed = {k: v for k, v in plan.items() if k not in unit.layers}
    placed.update({n: entry for n in unit.layers} if entry is not None else {})
    return sum(times) - timer.fusion_saving(placed)


STEP_GAIN = 0.03  # a timed step (descent, an allocation's rank) runs at least this much faster than what it replaces
WARM_TRIALS = 6  # the most whole-model warm-start trials before the per-unit search (a third of n_trials)


def _allocatable(units: list[Unit]) -> list[Unit]:
    return [u for u in units if "low_rank" in u.space and unit_methods(u.space, u.method)[0] in ALLOCATABLE
            and ("method" not in u.space or u.space["method"].first() in ALLOCATABLE)]


def warm_joint(ctx: TrialContext, study: optuna.Study, units: list[Unit], n_trials: int, callbacks: list) -> None:
    """The layerwise search's warm start, in whole-model trials.

    0. Without a FLOP budget, the precision plans (`precision_candidates`, unsmoothed first): the
       first that keeps accuracy is the base every later plan builds on; when none does, as many
       units as keep it, the least sensitive first (`_precision_subset`).
    1. The allocation (`fxsketch.allocate` on the cached decompositions) at a FLOP budget found by
       bisection: a feasible plan moves the budget down, an infeasible one up (at most a third of
       `n_trials`, and `WARM_TRIALS`), so the search holds a feasible, cheap plan at once.
    2. Descent from the best feasible plan: each trial moves one unit one value cheaper (from
       dense or a whole int8 layer: to its largest rank that saves FLOPs, or where speed is
       latency, that runs faster by the per-layer timings: `_cheaper_step`), the unit whose step
       adds the least predicted output error per cost saved first; a feasible step is kept, a
       unit whose step fails is not moved again. It stops when no unit can move, or after half the
       trials left: the per-unit search (which starts from the warm-start ranks of each unit) gets the
       rest. When fewer trials are left than units, the per-unit search could not reach them all: the
       descent takes every trial left.

    `fxsketch.search.finish` returns the best of these plans unless the per-unit bests, combined and backed off,
    are faster. Skipped when the study already holds whole-model trials (a resumed study, a call on
    another machine), and in every `n_workers` process but the first."""

    usable = [u for u in _allocatable(units) if u.space["low_rank"].values()]
    limit = min(WARM_TRIALS, n_trials // 3)
    if not usable or limit < 1 or any(t.user_attrs.get(keys.UNIT) == keys.WHOLE_MODEL
                                      for t in study.get_trials(deepcopy=False)):
        return
    weights = ctx.weights(usable)
    dense_usable = plan_cost([ctx.records[n] for u in usable for n in u.layers], {}).flops
    max_flops = ctx.budget.limits(*ctx.selected_dense)[0]
    upper = min(1.0, (max_flops - (ctx.selected_dense[0] - dense_usable)) / max(dense_usable, 1))
    if upper <= 0:
        return
    trial = _joint_runner(ctx, study, units, callbacks)
    lo, hi, budget, used, best = 0.0, upper, min(0.5, upper), 0, None
    candidates = precision_candidates(ctx, units) if ctx.budget.flops is None else []
    precise = {}
    for plan, note in candidates:  # first the precision alone; if it keeps accuracy, every allocation builds on it
        fresh = (keys.WHOLE_MODEL, plan_key(plan)) not in ctx.memo
        score = trial(plan, note)
        used += bool(fresh)
        if math.isfinite(score):
            best, precise = (plan, score), plan
            break
    if candidates and not precise:  # some layers are too sensitive: as many as keep the bar, the least sensitive first
        best, used = _precision_subset(ctx, units, candidates[-1][0], trial, used, limit)
        precise = best[0] if best is not None else {}
    for _ in range(4 * limit):  # plans repeat at nearby budgets: those cost no trial
        if used >= limit or hi - lo < 0.01:
            break
        try:
            plan = allocate_units(usable, ctx.records, ctx.cache, weights,
                                  Budget(budget, ctx.budget.params, ctx.budget.bytes), sensitivity=ctx.sensitivity)
        except ValueError:  # below the cheapest plan
            plan = {}
        plan = _lifted(plan, usable, precise) if plan and precise else plan
        plan = _faster_only(ctx, plan, precise, usable) if plan and precise and ctx.timed else plan
        fresh = plan and (keys.WHOLE_MODEL, plan_key(plan)) not in ctx.memo
        score = trial(plan, f"warm start: the allocation at {budget:.1%} of the tuned layers' FLOPs") if plan else -math.inf
        used += bool(fresh)
        if math.isfinite(score) and (best is None or score > best[1]):
            best = (plan, score)
        lo, hi = (lo, budget) if math.isfinite(score) else (budget, hi)
        budget = (lo + hi) / 2
    if best is None:
        return
    left = n_trials - used
    # with fewer trials left than units the per-unit search cannot reach every unit; the descent,
    # which moves the unit that costs least accuracy per FLOP, gets them all
    plan, rejected, stop = best[0], set(), used + (left if left < len(units) else left // 2)
    while used < stop:
        step = _cheaper_step(ctx, usable, plan, weights, rejected)
        if step is None:
            break
        unit, entry = step
        candidate = {**plan, **{n: dict(entry) for n in unit.layers}}
        score = trial(candidate, f"warm start: descent, {unit.key} to {entry}")
        used += 1
        if math.isfinite(score):
            plan = candidate
        else:
            rejected.add(unit.key)


def _precision_subset(ctx: TrialContext, units: list[Unit], precise: dict, trial, used: int, limit: int):
    """The largest feasible precision plan over the units least sensitive to it: units ranked by
    the measured output error of each one alone in reduced precision (on the calibration data),
    the count bisected in whole-model trials. Returns (best plan and score or None, trials used)."""
    ranked = [u for u in units if all(n in precise for n in u.layers)]
    if len(ranked) < 2 or not ctx.job.batches or used >= limit:
        return None, used
    errors = entry_sensitivity(ctx.gm, ctx.records, {u.key: {n: precise[n] for n in u.layers} for u in ranked},
                               ctx.cache, ctx.job.batches)
    ranked.sort(key=lambda u: errors[u.key])
    log.info("sensitivity to reduced precision, least first: %s",
             ", ".join(f"{u.key} {errors[u.key]:.2e}" for u in ranked))
    feasible, infeasible, best = 0, len(ranked), None
    while used < limit and infeasible - feasible > 1:
        count = (feasible + infeasible) // 2
        plan = {n: precise[n] for u in ranked[:count] for n in u.layers}
        fresh = (keys.WHOLE_MODEL, plan_key(plan)) not in ctx.memo
        score = trial(plan, f"warm start: the {count} units least sensitive to reduced precision")
        used += bool(fresh)
        if math.isfinite(score):
            feasible, best = count, (plan, score)
        else:
            infeasible = count
    return best, used


def _joint_runner(ctx: TrialContext, study: optuna.Study, units: list[Unit], callbacks: list):
    """`run(plan, note) -> score`: one whole-model trial of `plan` (a repeated plan reuses its result)."""
    def run(plan: dict, note: str) -> float:
        hit = ctx.recall((keys.WHOLE_MODEL, plan_key(plan)), plan)
        if hit is not None:
            return ctx.score(*hit[:2])
        flat = flat_values(units, plan)
        out = {"score": -math.inf}

        def objective(trial):
            trial.set_user_attr(keys.WARM, note)
            out["score"] = evaluate_plan(ctx, trial, plan, flat)
            return out["score"]

        optimize_study(study, objective, 1, None, (TrialFailed,), list(callbacks), redraws=1)  # one fixed plan
        return out["score"]

    return run


def _cheaper_step(ctx: TrialContext, usable: list[Unit], plan: dict, weights, rejected: set) -> tuple | None:
    """The unit (not in `rejected`) and entry of its next cheaper value, the unit whose predicted
    output error (from the cached decompositions) grows least per unit of cost saved; None when no
    unit can move. The cost is the layers' time where speed is latency (the per-layer estimates:
    the next value is the largest rank at least `STEP_GAIN` faster than the current entry, so a
    rank that saves FLOPs but runs slower, such as an int8 factor pair above an int8 layer's
    break-even, is never a step), else their FLOPs."""
    best = None
    for unit in usable:
        if unit.key in rejected:
            continue
        method = unit.space["method"].first() if "method" in unit.space else unit.method
        current = plan.get(unit.layers[0])
        rank = None if current is None else current.get("low_rank")  # a precision-only entry has none
        precision = {} if current is None or "precision" not in unit.space else {
            "precision": current.get("precision", "int8" if rank is None else "float"),
            **{k: v for k, v in current.items() if k == "smooth"}}
        lower = [{"method": method, "low_rank": r, **precision} for r in sorted(unit.space["low_rank"].values())
                 if (rank is None or r < rank)
                 and not invalid_reason(ctx.records, unit, {"method": method, "low_rank": r, **precision})]
        step = _timed_step(ctx, unit, current, lower, plan) if ctx.timed else _flops_step(ctx, unit, current, lower)
        if step is None:
            continue
        entry, saved = step
        try:
            grown = _error(ctx, unit, entry, weights) - _error(ctx, unit, current, weights)
        except ValueError:  # e.g. no statistics for a layer: no error curve to rank it by
            continue
        if saved <= 0:
            continue
        ratio = max(grown, 0.0) / saved
        if best is None or ratio < best[0]:
            best = (ratio, unit, entry)
    return None if best is None else best[1:]


def _timed_step(ctx: TrialContext, unit: Unit, current: dict | None, lower: list[dict],
                plan: dict) -> tuple[dict, float] | None:
    """(the largest-rank entry of `lower`, ascending, whose layers run at least `STEP_GAIN` faster
    than `current`'s in `plan`, seconds it saves), by bisection on the per-layer timings; None when
    even the cheapest is not that much faster. Layers that cannot be timed alone step by FLOPs."""
    def seconds(entry):
        return _unit_seconds(ctx, unit, entry, plan)

    if not lower:
        return None
    now = seconds(current)
    if now is None:
        return _flops_step(ctx, unit, current, lower)
    goal = now * (1 - STEP_GAIN)
    low = seconds(lower[0])
    if low is None or low >= goal:
        return None
    lo, hi, found = 0, len(lower), low  # lower[lo] is fast enough; lower[hi] (if any) is not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        t = seconds(lower[mid])
        if t is not None and t < goal:
            lo, found = mid, t
        else:
            hi = mid
    return lower[lo], now - found


def _flops_step(ctx: TrialContext, unit: Unit, current: dict | None, lower: list[dict]) -> tuple[dict, float] | None:
    """(the largest-rank entry of `lower`, ascending, FLOPs it saves against `current`)."""
    if not lower:
        return None
    records = [ctx.records[n] for n in unit.layers]
    before = plan_cost(records, {} if current is None else {n: current for n in unit.layers}).flops
    return lower[-1], before - plan_cost(records, {n: lower[-1] for n in unit.layers}).flops


def _error(ctx: TrialContext, unit: Unit, entry: dict | None, weights) -> float:
    """The predicted output error of `unit` at `entry` (0 for a whole layer: no rank cut)."""
    if entry is None or "low_rank" not in entry:
        return 0.0
    return sum(layer_errors(ctx.cache, ctx.records[n], entry["method"], weights[n], [entry["low_rank"]])[0]
               for n in unit.layers)
