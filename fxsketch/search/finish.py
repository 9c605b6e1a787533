"""Finishing a search: the plan to return, validated on the whole model, timed, and reported.

The layerwise strategy's per-unit bests are combined and backed off layer by layer until the
whole model meets the accuracy threshold; the best whole-model plan competes with them. The plan
kept is timed against the user's own model; with objective "latency" a plan that is reliably
slower than dense is backed off too, down to dense if need be.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch
from torch import nn

from fxsketch.allocate import layer_errors
from fxsketch.deploy import save
from fxsketch.measure import Speedup, measure_speedup, time_rounds
from fxsketch import study_format as keys
from fxsketch.metrics import TrialFailed, call_metric
from fxsketch.plan import plan_cost, speed_bound
from fxsketch.records import fetch
from fxsketch.result import Result, trials_frame
from fxsketch.search.context import TrialContext
from fxsketch.search.joint import ParetoPoint, leading_joint, pareto_points
from fxsketch.search.layerwise import best_entry, searched
from fxsketch.units import Unit

__all__ = ["finish", "keep_best", "sensitivity_table", "time_result"]

log = logging.getLogger(__name__)


def _validate(ctx: TrialContext, plan: dict, accuracies: dict[str, float], verbose: bool, floor: float | None = None,
              steps: list[dict[str, Any]] | None = None):
    """Check the combined plan on the whole model; drop the most harmful layers until it holds.

    Layers leave in order of the accuracy their own best trial kept, lowest first. With `floor`
    (the speed of a feasible plan held elsewhere), stop and return None as soon as the plan to
    check is no faster than that: backing off further only makes it slower (the checks made so
    far are then left in `steps`).
    """
    steps = [] if steps is None else steps
    plan = dict(plan)
    accuracy = math.nan
    for victim in [None, *sorted(plan, key=lambda n: accuracies.get(n, math.inf))]:
        if victim is not None:
            plan.pop(victim)
        if floor is not None and (not plan or ctx.speed(None, plan) <= floor):
            return None
        module = ctx.build(plan)
        try:
            accuracy = call_metric(ctx.accuracy_fn, module, "accuracy_fn")
        except TrialFailed as exc:
            raise RuntimeError(f"validating the combined plan failed: {exc}") from exc
        steps.append({"layers": len(plan), "dropped": victim, "accuracy": accuracy})
        if verbose:
            print(f"validation: {len(plan)} layer(s) replaced -> accuracy {accuracy:.4f}"
                  + (f" (kept {victim} dense)" if victim else ""))
        if ctx.threshold is None or accuracy >= ctx.threshold:
            break
    return plan, accuracy, steps, module


def finish(ctx: TrialContext, study: optuna.Study, dense_accuracy: float | None) -> Result:
    """The Result of a search whose trials are in `study`: the chosen plan validated, backed off
    where needed, timed, with the trials, tables and notes."""
    units, records = list(ctx.units.values()), list(ctx.records.values())
    verbose, strategy = ctx.job.verbose, ctx.job.strategy
    trials = trials_frame(study)
    if not trials.empty and (trials["state"] == "FAIL").all():
        reasons = trials["note"].value_counts()
        summary = "; ".join(f"{n}× {reason}" for reason, n in reasons.items())
        raise RuntimeError(f"every trial failed ({len(trials)}): {summary}")
    pareto = pareto_points(ctx, study, functools.partial(ctx.build, share=False)) if ctx.multi else []
    for point in pareto:
        point.plan = {**ctx.job.fixed, **point.plan}
    plan, accuracies = _chosen_plan(ctx, study, units, strategy, pareto)
    notes = _unit_notes(study, units, ctx.threshold) if strategy == "layerwise" and not pareto else []
    basis = _basis(ctx, study)
    held = study.user_attrs.get(keys.FINISHED) if not pareto else None
    decided = isinstance(held, dict) and held.get("basis") == basis
    if decided:  # another process finished on the same trials and settings: check its plan here
        module = ctx.build(dict(held["plan"]))
        try:
            accuracy = call_metric(ctx.accuracy_fn, module, "accuracy_fn")
        except TrialFailed as exc:
            raise RuntimeError(f"validating the study's finished plan failed: {exc}") from exc
        decided = ctx.threshold is None or accuracy >= ctx.threshold
        if decided:
            plan = dict(held["plan"])
            steps = [{"layers": len(plan), "dropped": None, "accuracy": accuracy,
                      "source": "the plan this study holds as finished, on the same trials"}]
    warm = (_fastest_joint(ctx, study) if strategy == "layerwise" and ctx.threshold is not None and not decided
            else None)
    if not decided and warm is None:
        plan, accuracy, steps, module = _validate(ctx, plan, accuracies, verbose)
    elif not decided:  # the best whole-model (warm-start) plan, unless the per-unit bests combined beat it
        floor, tried = ctx.speed(None, warm[0]), []
        done = _validate(ctx, plan, accuracies, verbose, floor=floor, steps=tried) if plan else None
        if done is None:
            if verbose:
                print(f"the warm-start plan ({len(warm[0])} layers, speed {floor:.3f}) is faster than the "
                      "per-unit bests combined: validating it")
            done = _validate(ctx, dict(warm[0]), {}, verbose)
            for step in done[2]:
                step["source"] = "warm start (whole-model trial)"
            notes = []  # what the per-unit search did not reach does not bear on this plan
            done = (done[0], done[1], tried + done[2], done[3])
        plan, accuracy, steps, module = done
    if plan and not ctx.recovers_each:  # the returned model owns its weights (the same values)
        module = ctx.build(plan, share=False)
    interrupted = False
    try:
        measured = time_result(ctx, plan, module)
        if measured is not None and measured.median < 1.0 and not measured.reliable:  # the load may have passed
            measured = time_result(ctx, plan, module, cap_s=6.0)
        if (measured is not None and _slower(measured) and ctx.objective == "latency" and ctx.speed_fn is None
                and not decided):
            plan, accuracy, module, measured = _back_off_slow(ctx, plan, accuracy, module, measured, steps, verbose)
            if not plan:
                notes.append("no plan was faster than dense on this machine: the model stays dense")
                accuracy = dense_accuracy
    except KeyboardInterrupt:  # Ctrl-C while timing: keep the validated plan, unmeasured
        interrupted, measured = True, None
        notes.append("interrupted while timing the returned model: its speed was not measured")
    if measured is not None and not measured.faster:
        notes.append(f"the returned plan is not faster than dense on this machine: {measured.describe()}")
    if not pareto and not interrupted:
        study.set_user_attr(keys.FINISHED, {"basis": basis, "plan": plan, "accuracy": accuracy})
    for note in notes:
        log.warning(note)
    if measured is not None and measured.faster and not measured.reliable:
        log.warning("the measured speedup is not reliable: %s", measured.describe())
    if plan:  # what every candidate was built with (`SearchJob.fixed`) is part of the plan returned
        plan = {**ctx.job.fixed, **plan}
    before, after = plan_cost(records, {}), plan_cost(records, plan)
    estimate = ctx.timer.speedup(plan) if ctx.timer is not None and plan else None
    sensitivity = sensitivity_table(ctx, units)
    return Result(graph_module=module, plan=plan, accuracy=accuracy, dense_accuracy=dense_accuracy,
                  speedup=measured.median if measured else (math.nan if plan else 1.0),
                  flops_ratio=before.flops / after.flops, params_before=before.params, measured_speedup=measured,
                  notes=notes, interrupted=interrupted,
                  params_after=after.params, trials=trials, study=study, records=records, validation=steps,
                  accuracy_threshold=ctx.threshold, pareto=pareto, sensitivity=sensitivity,
                  speedup_estimate=estimate, tables=[r for name, r in ctx.tables.items() if name in plan],
                  attention=[r for name, r in ctx.attention.items() if name in plan])


def _basis(ctx: TrialContext, study: optuna.Study) -> dict[str, Any]:
    """What a finished plan was decided on: the study's evaluated trials and the bar. Processes
    that finish on the same basis return the same plan."""
    done = [t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if keys.REUSED not in t.user_attrs]
    options, calibration = ctx.job.search, ctx.job.calibration
    return {"trials": len(done), "last": max(done, default=-1), "threshold": ctx.threshold,
            "objective": ctx.objective, "strategy": ctx.job.strategy,
            "units": sorted([key, sorted(u.layers), repr(u.space)] for key, u in ctx.units.items()),
            "budget": [options.max_flops, options.max_params, options.max_bytes], "method": ctx.default_method,
            "int8_tables": options.int8_tables, "half_attention": options.half_attention,
            "calibration": [calibration.refit, calibration.sequential, calibration.recover_steps, calibration.recover_lr,
                            bool(ctx.job.batches), calibration.smooth, calibration.recover_at]}


def time_result(ctx: TrialContext, plan: dict, module: nn.Module, cap_s: float = 3.0) -> Speedup | None:
    """The returned model timed against (a copy of) the user's own model, interleaved, in rounds until
    its spread is within ±5% or `cap_s` passes (None: nothing was replaced, the model is dense). The
    captured graph can itself run faster or slower than the model it came from."""
    if not plan:
        return None
    baseline = ctx.baseline if ctx.baseline is not None else ctx.gm
    return measure_speedup(baseline, module, ctx.inputs, bound=speed_bound(list(ctx.records.values()), plan),
                           cap_s=cap_s)


def _slower(measured: Speedup) -> bool:
    """A reliable measurement whose median is below dense: with objective "latency" such a plan is not
    kept (an unreliable one is reported, never acted on)."""
    return measured.median < 1.0 and measured.reliable


def _back_off_slow(ctx: TrialContext, plan: dict, accuracy, module: nn.Module, measured: Speedup,
                   steps: list[dict[str, Any]], verbose: bool):
    """Put layers back to dense, the one saving least time first, until the whole model is no longer
    slower than dense (`_slower`); each step is checked against the accuracy threshold too.
    Returns (plan, accuracy, module, measured); an empty plan when nothing helped."""
    def gain(name: str) -> float:
        saved = ctx.timer.saving(name, plan[name]) if ctx.timer is not None else None
        return saved if saved is not None else -math.inf

    plan = dict(plan)
    if verbose:
        print(f"latency: {measured.describe()}: backing off")
    for victim in sorted(plan, key=gain):
        plan.pop(victim)
        if verbose:
            print(f"latency: putting {victim} back to dense")
        if not plan:
            return {}, accuracy, ctx.build({}, share=False), None
        module = ctx.build(plan, share=False)
        try:
            accuracy = call_metric(ctx.accuracy_fn, module, "accuracy_fn")
        except TrialFailed as exc:
            raise RuntimeError(f"validating the backed-off plan failed: {exc}") from exc
        steps.append({"layers": len(plan), "dropped": victim, "accuracy": accuracy, "reason": "slower than dense"})
        if ctx.threshold is not None and accuracy < ctx.threshold:
            continue
        measured = time_result(ctx, plan, module)
        if not _slower(measured):
            break
    return plan, accuracy, module, measured


LEADING_TIMED = 3  # feasible whole-model plans timed on the whole model before one is returned


def _fastest_joint(ctx: TrialContext, study: optuna.Study) -> tuple[dict, float] | None:
    """The feasible whole-model plan (and its accuracy) to return: of the `LEADING_TIMED` best by
    their trials' speed, the one that runs fastest on the whole model, timed interleaved. Trials
    are scored by per-layer estimates, which do not tell plans a few per cent apart, and one
    disturbed layer timing can put a plan first."""
    leading = leading_joint(study, LEADING_TIMED, ctx.threshold)
    if len(leading) < 2 or ctx.objective != "latency" or ctx.speed_fn is not None:
        return leading[0] if leading else None
    rounds = time_rounds([ctx.build(dict(plan)) for plan, _ in leading], ctx.inputs, cap_s=3.0)
    fastest = min(range(len(leading)), key=rounds.median)
    log.info("the %d leading whole-model plans, timed on the whole model: %s ms per call; returning plan %d",
             len(leading), ", ".join(f"{rounds.median(i) * 1e3:.2f}" for i in range(len(leading))), fastest + 1)
    return leading[fastest]


def _chosen_plan(ctx: TrialContext, study: optuna.Study, units: list[Unit], strategy: str,
                 pareto: list[ParetoPoint]) -> tuple[dict, dict[str, float]]:
    """The plan to validate: per-unit bests combined, the best joint plan, or a Pareto point."""
    if pareto:
        point = pareto[0] if ctx.threshold is not None else max(pareto, key=lambda p: (p.accuracy, p.speed))
        return dict(point.plan), {}
    if strategy == "joint":
        best = _fastest_joint(ctx, study)
        if best is None:
            log.warning("no plan met the accuracy threshold: the model stays dense")
            return {}, {}
        return dict(best[0]), {}
    plan: dict[str, dict[str, Any]] = {}
    accuracies: dict[str, float] = {}
    for unit in units:
        best = best_entry(study, unit.key, ctx.threshold)
        if best is None:
            continue  # said in the Result's notes (`_unit_notes`)
        for name in unit.layers:
            plan[name], accuracies[name] = dict(best[0]), best[1]
    return {k: v for k, v in plan.items() if v["method"] != "dense"}, accuracies


def _unit_notes(study: optuna.Study, units: list[Unit], threshold: float | None) -> list[str]:
    """What the per-unit search could not do: units with no evaluated trial of their own (not
    searched) apart from units whose trials all missed the accuracy bar."""
    unsearched = [u.key for u in units if not searched(study, u.key)]
    unmet = [u.key for u in units if u.key not in unsearched and best_entry(study, u.key, threshold) is None]
    notes = []
    for keys_, what in ((unsearched, "not searched (no trial of its own ran; raise n_trials or timeout)"),
                        (unmet, "searched, but no trial met the accuracy threshold")):
        if keys_:
            shown = ", ".join(keys_[:8]) + (f" and {len(keys_) - 8} more" if len(keys_) > 8 else "")
            notes.append(f"{len(keys_)} unit(s) {what}: {shown}")
    return notes


def sensitivity_table(ctx: TrialContext, units: list[Unit]) -> pd.DataFrame:
    """Per tuned layer: the relative output error of its factorization at a few ranks, and the
    smallest rank keeping it under 1% / 5% / 10% (from the cached decompositions, no evaluation)."""

    method = "whitened_svd" if ctx.cache.stats else "svd"
    rows = []
    for name in ctx.selected:
        record = ctx.records[name]
        if method == "whitened_svd" and name not in ctx.cache.stats:
            continue
        full = min(record.out_features, record.in_features)
        ranks = sorted({max(1, round(full * f)) for f in (0.05, 0.1, 0.25, 0.5)} | set(range(1, full + 1)))
        weight = fetch(ctx.gm, record.weight_target)
        if method == "svd":  # no statistics: the error at rank r is the exact SVD's tail energy
            energy = ctx.cache.svd(name, record.weight_matrix(weight), full)[1].to(torch.float64).square()
            tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
            errors = dict(zip(ranks, (tail[ranks] / tail[0].clamp_min(1e-300)).tolist()))
        else:
            errors = dict(zip(ranks, layer_errors(ctx.cache, record, method, weight, ranks)))
        row = {"layer": name, "method": method}
        row.update({f"err@{round(100 * f)}%": errors[max(1, round(full * f))] for f in (0.05, 0.1, 0.25, 0.5)})
        for tol in (0.01, 0.05, 0.10):
            row[f"rank<{round(100 * tol)}%"] = next((r for r in ranks if errors[r] <= tol), full)
        rows.append(row)
    ctx.cache.clear()
    return pd.DataFrame(rows)


def keep_best(result: Result, folder: Path, inputs: tuple) -> None:
    """Save the best plan and model into an experiment folder (the model only when it can be saved)."""
    result.save_plan(folder / "best_plan.json")
    try:
        save(result.graph_module, folder / "best_model.pt2", inputs)
    except Exception as exc:  # the plan is kept either way; say why the model is not
        log.warning("could not save the best model to %s: %s", folder / "best_model.pt2", exc)
