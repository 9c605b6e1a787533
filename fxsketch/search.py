"""The search: an Optuna study over per-layer replacement choices under an accuracy constraint.

Each tuning unit (a layer when `separate=True`, a group of layers sharing values otherwise) gets
`n_trials` trials in one study, with the other layers dense. The best feasible choice of every
unit is then combined, validated on the whole model, and backed off layer by layer until the
combination meets the accuracy threshold. With calibration data the search first runs a few
whole-model trials from the rank allocation (the warm start); the result is the best feasible
whole-model plan unless the combined per-unit bests beat it.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import numbers
import os
import time
from pathlib import Path
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
import pandas as pd
import torch
from torch import nn

from fxsketch.allocate import (ALLOCATABLE, Budget, allocate_units, layer_errors, target_error_units, unit_choices,
                               unit_weights)
from fxsketch.calibrate import calibrate, iterate_batches
from fxsketch.capture import as_inputs, capture, find_layers, other_modules
from fxsketch.measure import LayerTimer, Speedup, measure_speedup, plan_cost, speed_bound
from fxsketch.deploy import save
from fxsketch.joint import JOINT_KEY, best_joint, evaluate_plan, pareto_points, run_joint
from fxsketch.records import LayerRecord, fetch
from fxsketch.workers import check_sendable, fresh_journal, open_storage, optimize_study, resolve_callable, run_workers
from fxsketch.recover import distill
from fxsketch.replacements import FactorCache, dense_cost, get_kind
from fxsketch import study_format as keys
from fxsketch.result import Result, trials_frame
from fxsketch.rewrite import apply_plan
from fxsketch.select import match_layers
from fxsketch.spec import load_spec
from fxsketch.metrics import TrialFailed, call_metric
from fxsketch.units import (DEFAULT_METHOD, Unit, invalid_reason, resolve_units, space_size, suggest_entry,
                            unit_methods, warm_params)

__all__ = ["optimize", "SearchInterrupted"]

log = logging.getLogger(__name__)

OBJECTIVES = ("latency", "flops")
STRATEGIES = ("layerwise", "joint")


@dataclass
class _Context:
    """Everything a trial needs; built once per `optimize` call."""

    gm: Any
    records: dict[str, LayerRecord]
    inputs: tuple
    accuracy_fn: Callable[[nn.Module], float]
    threshold: float | None
    speed_fn: Callable[[nn.Module], float] | None
    objective: str
    cache: FactorCache
    dense_flops: int
    default_method: str
    budget: Budget = field(default_factory=Budget)
    warm: list[dict[str, dict[str, Any]]] = field(default_factory=list)  # plans to try first
    warm_joint: bool = True  # run the whole-model warm start (one worker of a parallel call does)
    selected_dense: tuple[int, int] = (0, 0)  # FLOPs and params of the selected layers, dense
    recover: tuple = ([], 0, 0.0, None)  # (batches, steps, lr, loss_fn) of distillation after each build
    sensitivity: dict[str, float] | None = None  # per-layer weights of the warm start's allocations
    selected: list[str] = field(default_factory=list)  # the tuned layers' names
    units: dict[str, Unit] = field(default_factory=dict)
    started: int = 0  # trials this process started (other workers may share the study)
    multi: bool = False  # multi-objective: every trial needs its speed
    timer: LayerTimer | None = None  # per-layer latency estimates (objective "latency")
    baseline: nn.Module | None = None  # a copy of the user's model: what Result.speedup is measured against
    speed_source: str = ""  # how latency trials are timed: per-layer estimates, or whole models when layers can't be

    weight_versions: list[int] = field(default_factory=list)  # of gm's parameters, at the start

    def build(self, plan: dict, copy_weights: bool = True, share: bool = True) -> nn.Module:
        """The model with `plan` applied (and distilled, when recovery is on). With `share` and
        without recovery the kept weights are the captured graph's own storage (trials; see
        `check_weights`); models handed to the user are built with `share=False`."""
        batches, steps, lr, loss_fn = self.recover
        self.check_weights()
        module = apply_plan(self.gm, self.records, plan, self.cache, copy_weights=copy_weights,
                            share_weights=share and not steps)
        if steps and plan:
            distill(module, self.gm, batches, steps=steps, lr=lr, loss_fn=loss_fn)
        return module

    def weights(self, units: list[Unit]) -> dict[str, torch.Tensor]:
        """The captured weight tensor of every layer of `units`, by name."""
        return {n: fetch(self.gm, self.records[n].weight_target) for u in units for n in u.layers}

    def check_weights(self) -> None:
        """Refuse to go on once an evaluation changed the captured weights in place (e.g. an
        accuracy_fn that trains the model it is given): trials share those weights."""
        versions = [p._version for p in self.gm.parameters()]
        if not self.weight_versions:
            self.weight_versions = versions
        elif versions != self.weight_versions:
            raise RuntimeError(
                "accuracy_fn (or speed_fn) changed the weights of the model it was given in place, e.g. "
                "by training it: fxsketch evaluates candidates that share the original weights, so every "
                "later trial would see the change. Evaluate without training, or fine-tune a copy "
                "(copy.deepcopy(model)) inside the function, or use recover_steps= for fxsketch's own "
                "distillation. The trials finished so far are kept in the study.")

    # (unit, values) -> (accuracy, speed, first trial): a repeated draw is not evaluated again
    memo: dict[tuple[str, str], tuple[float, float, int]] = field(default_factory=dict)
    seen: dict[str, set[str]] = field(default_factory=dict)

    def speed(self, module: nn.Module | None, plan: dict, accuracy: float | None = None,
              copy_weights: bool = True) -> float:
        """The speed of `plan` (built as `module`; None builds it, with `copy_weights`, only if
        needed). With objective "latency", an infeasible trial (accuracy below the threshold,
        single objective: its score is -inf whatever its speed) is not timed (NaN), and a feasible
        one gets the per-layer estimate (`LayerTimer`): only layer shapes and values no earlier
        trial timed are measured. The plan `optimize` returns is timed on the whole model."""
        def built() -> nn.Module:
            return module if module is not None else self.build(plan, copy_weights=copy_weights)

        if self.speed_fn is not None:
            return call_metric(self.speed_fn, built(), "speed_fn")
        if self.objective == "flops":
            return self.dense_flops / plan_cost(list(self.records.values()), plan)[1]
        if (accuracy is not None and self.threshold is not None and not self.multi
                and accuracy < self.threshold):
            return math.nan
        if self.timer is None:
            self.timer = LayerTimer(self.gm, self.records, self.inputs, self.cache)
        estimate = self.timer.speedup(plan)
        if estimate is not None:
            self.speed_source = "per-layer estimate"
            return estimate
        self.speed_source = "measured"
        return measure_speedup(self.gm, built(), self.inputs, cap_s=0.5).median

    def recall(self, key: tuple[str, str], plan: dict, copy_weights: bool = True) -> tuple[float, float, int] | None:
        """The remembered (accuracy, speed, first trial) of an earlier trial with the same values, or
        None. A speed that was skipped (NaN: the trial missed a higher threshold, e.g. before a
        resume with a lower one) is measured now when this call's score needs it."""
        hit = self.memo.get(key)
        if hit is None:
            return None
        accuracy, speed, first = hit
        if math.isnan(speed) and (self.multi or (self.threshold is not None and accuracy >= self.threshold)):
            try:
                speed = self.speed(None, plan, accuracy, copy_weights)
            except TrialFailed:  # evaluate it afresh, where failures are recorded
                return None
            self.memo[key] = hit = (accuracy, speed, first)
        return hit

    def speed_label(self, speed: float) -> str:
        """What a trial's speed figure is: a cost ratio, the user's speed_fn, or a latency estimate or
        measurement (a NaN was not timed)."""
        if not math.isfinite(speed):
            return "not timed (infeasible)"
        if self.speed_fn is not None:
            return "speed_fn"
        if self.objective == "flops":
            return "FLOP ratio"
        return self.speed_source or "per-layer estimate"

    def score(self, accuracy: float, speed: float) -> float:
        if self.threshold is None:
            return accuracy
        return speed if accuracy >= self.threshold else -math.inf


def _prune_reason(ctx: _Context, unit: Unit, entry: dict[str, Any]) -> str:
    problem = invalid_reason(ctx.records, unit, entry)
    if problem:
        return problem
    return _over_budget(ctx, unit, get_kind(entry["method"]), {k: v for k, v in entry.items() if k != "method"})


def _over_budget(ctx: _Context, unit: Unit, kind, params: dict[str, Any]) -> str:
    """Budgets hold per unit as a share of its dense cost: if every unit keeps it, the plan does."""
    if ctx.budget == Budget():
        return ""
    dense = [dense_cost(ctx.records[n]) for n in unit.layers]
    ours = [kind.cost(ctx.records[n], params) for n in unit.layers]
    tokens = [ctx.records[n].tokens for n in unit.layers]
    max_flops, max_params = ctx.budget.limits(*ctx.selected_dense)
    share_f = sum(d.flops_per_token * t for d, t in zip(dense, tokens)) / max(ctx.selected_dense[0], 1)
    share_p = sum(d.params for d in dense) / max(ctx.selected_dense[1], 1)
    flops = sum(c.flops_per_token * t for c, t in zip(ours, tokens))
    n_params = sum(c.params for c in ours)
    if flops > max_flops * share_f:
        return f"over the FLOP budget: {flops:,} > {max_flops * share_f:,.0f} for {unit.key}"
    if n_params > max_params * share_p:
        return f"over the parameter budget: {n_params:,} > {max_params * share_p:,.0f} for {unit.key}"
    return ""


def _run_trial(ctx: _Context, unit: Unit, trial: optuna.Trial) -> float:
    # A retried trial of a dead worker carries its unit (and fixed values); evaluate that unit.
    unit = ctx.units.get(trial.user_attrs.get(keys.UNIT), unit)
    trial.set_user_attr(keys.UNIT, unit.key)
    ctx.started += 1
    entry = suggest_entry(unit, trial, ctx.default_method, ctx.records)
    trial.set_user_attr(keys.ENTRY, entry)
    values = json.dumps(entry, sort_keys=True)
    ctx.seen.setdefault(unit.key, set()).add(values)
    reason = _prune_reason(ctx, unit, entry)
    if reason:
        trial.set_user_attr(keys.NOTE, f"pruned before evaluation: {reason}")
        raise optuna.TrialPruned(reason)
    hit = ctx.recall((unit.key, values), {name: entry for name in unit.layers}, unit.copy_weights)
    if hit is not None:
        accuracy, speed, first = hit
        trial.set_user_attr(keys.NOTE, f"same values as trial {first}: result reused")
    else:
        accuracy, speed = _evaluate(ctx, unit, entry, trial)
        ctx.memo[(unit.key, values)] = (accuracy, speed, trial.number)
    score = ctx.score(accuracy, speed)
    trial.set_user_attr(keys.ACCURACY, accuracy)
    trial.set_user_attr(keys.SPEED, speed)
    trial.set_user_attr(keys.SPEED_SOURCE, ctx.speed_label(speed))
    trial.set_user_attr(keys.SCORE, score)
    if ctx.threshold is not None:
        trial.set_constraint("accuracy", ctx.threshold - accuracy)  # ≤ 0 is feasible
    return score


def _evaluate(ctx: _Context, unit: Unit, entry: dict[str, Any], trial: optuna.Trial) -> tuple[float, float]:
    plan = {name: entry for name in unit.layers}
    module = ctx.build(plan, copy_weights=unit.copy_weights)
    try:
        accuracy = call_metric(ctx.accuracy_fn, module, "accuracy_fn")
        return accuracy, ctx.speed(module, plan, accuracy)
    except TrialFailed as exc:
        trial.set_user_attr(keys.NOTE, str(exc))
        log.warning("trial %d (%s) failed: %s", trial.number, unit.key, exc)
        raise


def _ran(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.state != optuna.trial.TrialState.FAIL or keys.NOTE in trial.user_attrs


def _seed_memo(ctx: _Context, study: optuna.Study) -> None:
    """A resumed study's finished configurations are remembered, so none is evaluated twice."""

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        attrs = t.user_attrs
        if keys.ACCURACY not in attrs or keys.UNIT not in attrs:
            continue
        entry = attrs.get(keys.PLAN) if attrs[keys.UNIT] == "*" else attrs.get(keys.ENTRY)
        values = json.dumps(entry, sort_keys=True)
        ctx.memo.setdefault((attrs[keys.UNIT], values), (attrs[keys.ACCURACY], attrs[keys.SPEED], t.number))
        ctx.seen.setdefault(attrs[keys.UNIT], set()).add(values)


def _best_entry(study: optuna.Study, key: str) -> tuple[dict[str, Any], float] | None:
    """The best feasible trial's entry and accuracy for unit `key`, or None."""
    best = None
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get(keys.UNIT) != key or not math.isfinite(t.value):
            continue
        rank = (t.value, t.user_attrs.get(keys.ACCURACY, -math.inf))
        if best is None or rank > best[0]:
            best = (rank, t.user_attrs[keys.ENTRY], t.user_attrs.get(keys.ACCURACY, math.nan))
    return None if best is None else (best[1], best[2])


def _create_study(storage, study_name, load_if_exists, sampler, pruner, seed, multi=False) -> optuna.Study:
    if sampler is None:
        sampler = optuna.samplers.TPESampler(seed=seed)
    directions = ["maximize", "maximize"] if multi else ["maximize"]
    try:
        return optuna.create_study(storage=storage, study_name=study_name, load_if_exists=load_if_exists,
                                   directions=directions, sampler=sampler, pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        raise ValueError(f"study {study_name!r} already exists in {storage!r}: pass load_if_exists=True "
                         "to resume it, or choose another study_name") from None


def _validate(ctx: _Context, plan: dict, accuracies: dict[str, float], verbose: bool, floor: float | None = None,
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


def optimize(
    model: nn.Module,
    spec: Any,
    *,
    example_inputs: Any,
    accuracy_fn: Callable[[nn.Module], float],
    accuracy_threshold: float | None = None,
    speed_fn: Callable[[nn.Module], float] | None = None,
    objective: str = "latency",
    n_trials: int = 20,
    timeout: float | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    load_if_exists: bool = False,
    seed: int | None = None,
    verbose: bool = False,
    callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = (),
    default_method: str | None = None,
    calibration_data: Iterable[Any] | None = None,
    refit: bool = True,
    max_flops: float | int | None = None,
    max_params: float | int | None = None,
    warm_start: bool = True,
    allocation_sensitivity: Any = None,
    recover_steps: int = 0,
    recover_lr: float = 1e-3,
    recover_loss_fn: Callable[[Any, Any, tuple], torch.Tensor] | None = None,
    strategy: str = "layerwise",
    objectives: Sequence[str] | None = None,
    n_workers: int = 1,
    heartbeat_interval: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    experiment_dir: str | os.PathLike | None = None,
    _worker: int | None = None,
) -> Result | None:
    """Find the fastest plan that keeps `accuracy_fn(model) >= accuracy_threshold`, and apply it.

    Args:
        model: the model to speed up; it is never modified.
        spec: what to tune: a TuningConfigs, a LayerConfig, a list of them, a dict
            `{"layers": [...]}`, or a path to a .json/.yaml file holding that dict.
        example_inputs: inputs for capture and latency measurement (a tensor or a tuple).
        accuracy_fn: `model -> float`, higher is better.
        accuracy_threshold: the accuracy bar; None maximizes accuracy instead (the seeds' rule).
        speed_fn: `model -> float`, higher is better; replaces the built-in speed measure.
        objective: "latency" (speedup vs dense in this process: trials use per-layer timings,
            cached by layer shape and values (`fxsketch.measure.LayerTimer`), and infeasible
            trials are not timed; the returned plan is timed on the whole model, interleaved with
            the dense one, as `Result.speedup`) or "flops" (exact cost model; deterministic).
        n_trials: the trials this call runs, split evenly over the tuning units (a layer, or a
            group with `separate=False`); a unit whose space runs out early passes its share on.
            Resuming a stored study adds these to the ones it holds (as `study.optimize` does),
            and configurations it already evaluated are not evaluated again.
        timeout: seconds for the whole search; units not reached stay dense.
        sampler, pruner: Optuna objects, passed straight through (default: seeded TPE that is
            told the accuracy constraint).
        storage, study_name, load_if_exists: Optuna storage (a URL or a storage object); several
            workers can share one study.
        seed: seeds the default sampler.
        verbose: print a line per trial and the validation steps.
        callbacks: Optuna callbacks called after each trial (progress bars, early stops).
        default_method: the replacement kind searched when a config names no `method`
            (default: "whitened_svd" with calibration data, else "svd").
        calibration_data: an iterable of input batches; enables activation-aware kinds
            (`whitened_svd`), least-squares refits of the other kinds, and the warm start.
        refit: with calibration data, refit each replacement's trainable factors to the layer's
            outputs (closed-form least squares).
        max_flops, max_params: hard budgets for the selected layers, as a fraction of their dense
            cost (float ≤ 1) or absolute; a trial over budget is pruned before evaluation.
        warm_start: with calibration data: (layerwise, with a threshold) first run whole-model
            trials of `fxsketch.allocate`'s plan at a bisected FLOP budget and a descent from the
            best feasible one (see `_warm_joint`), then start each unit from its cheapest ranks
            under 1% and 5% output error and the allocations at 25/50% of the FLOPs; (joint) start
            from those plans.
        allocation_sensitivity: how the warm start's allocations weigh each unit's output error
            (`fxsketch.allocate`'s `sensitivity`: None, "output", an accuracy function or a
            mapping); a measured one is probed once, at half the FLOPs, and reused.
        recover_steps, recover_lr: distill each candidate (and the final model) for this many
            Adam steps on the calibration data against the original model before judging it.
        recover_loss_fn: the distillation loss `(outputs, targets, inputs) -> scalar tensor`
            (default relative MSE; `fxsketch.recover.masked_mse()` leaves padding out).
        strategy: "layerwise" tunes each unit on its own with the others dense, then combines
            and validates (the seeds' way); "joint" makes every trial a whole-model plan (each
            unit with its own values), so budgets and the warm start apply to the whole model.
        objectives: ("accuracy", "speed") searches both (joint) and returns the Pareto front
            (`Result.pareto`, `Result.select`); the threshold, if given, is a constraint.
        n_workers: run the trials in this many processes on one shared storage (a journal file
            by default); `accuracy_fn` and `speed_fn` must be picklable (module-level functions)
            or given as 'package.module:function'.
        heartbeat_interval: seconds between worker heartbeats on an RDB storage URL; a trial of a
            worker that died is then failed and retried once by another worker.
        cache_dir: keep the per-layer decompositions in this directory, so a resumed search (or
            another worker, or a later run on the same weights) does not recompute them.
        experiment_dir: one folder for the whole experiment: the study database (`study.db`, resumed
            when it exists), the factor cache, and at the end the best plan (`best_plan.json`) and
            the saved best model (`best_model.pt2`).

    Returns:
        A Result with the rewritten GraphModule, the plan, measurements and the trials.
    """
    if experiment_dir is not None:
        experiment_dir = Path(experiment_dir)
        experiment_dir.mkdir(parents=True, exist_ok=True)
        storage = storage if storage is not None else f"sqlite:///{experiment_dir / 'study.db'}"
        study_name, load_if_exists = study_name or "fxsketch", True
        cache_dir = cache_dir if cache_dir is not None else experiment_dir / "factors"
    call = dict(locals())  # what worker processes are started with, when n_workers > 1
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    multi = _check_objectives(objectives)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    strategy = "joint" if multi else strategy
    accuracy_fn, speed_fn = resolve_callable(accuracy_fn), resolve_callable(speed_fn)
    _check_arguments(accuracy_fn, speed_fn, n_trials, accuracy_threshold, timeout, sampler, pruner, callbacks)
    Budget(max_flops, max_params).limits(1, 1)
    if not isinstance(n_workers, int) or n_workers < 1:
        raise ValueError(f"n_workers must be a positive integer, got {n_workers!r}")
    batches = list(iterate_batches(calibration_data)) if calibration_data is not None else None
    default_method = default_method or ("whitened_svd" if batches else DEFAULT_METHOD)
    get_kind(default_method)
    inputs = as_inputs(example_inputs)
    configs = load_spec(spec)
    storage = open_storage(storage, heartbeat_interval) if n_workers == 1 else storage
    gm = capture(model, inputs)
    records = find_layers(gm)
    others = other_modules(gm, records)
    units = resolve_units(records, configs, others, default_method)
    if not units:
        selected = {n for c in configs for n in match_layers(records, c.layer_names, other_modules=others)}
        why = [f"{r.name} ({r.module_type}): {r.unsupported or 'no configuration is cheaper than the dense layer'}"
               for r in records if r.name in selected]
        raise ValueError("nothing to tune: " + "; ".join(why))
    cache = FactorCache(calibrate(gm, batches, records) if batches else None, refit=refit, cache_dir=cache_dir)
    ctx = _Context(gm, {r.name: r for r in records}, inputs, accuracy_fn, accuracy_threshold, speed_fn,
                   objective, cache, plan_cost(records, {})[1], default_method, Budget(max_flops, max_params))
    ctx.selected = [n for u in units for n in u.layers]
    ctx.units = {u.key: u for u in units}
    ctx.multi = multi
    if _worker is None:  # the returned model is timed against the model the user has, not its captured graph
        ctx.baseline = copy.deepcopy(model)
    ctx.check_weights()  # records the weights' versions before any evaluation
    selected = [ctx.records[n] for n in ctx.selected]
    ctx.selected_dense = (sum(dense_cost(r).flops_per_token * r.tokens for r in selected),
                          sum(dense_cost(r).params for r in selected))
    if allocation_sensitivity is not None and not (batches and warm_start):
        raise ValueError("allocation_sensitivity weighs the warm start's allocations: it needs calibration_data= "
                         "and warm_start=True")
    if batches and warm_start:
        ctx.sensitivity = _unit_sensitivity(ctx, units, allocation_sensitivity, batches)
        ctx.warm = _warm_start_plans(ctx, units)
        ctx.warm_joint = not _worker  # of parallel workers, the first runs the whole-model warm start
    if recover_steps:
        if not batches:
            raise ValueError("recover_steps needs calibration_data to distill on")
        ctx.recover = (batches, recover_steps, recover_lr, recover_loss_fn)
    dense_accuracy = None if _worker is not None else _dense_accuracy(accuracy_fn, ctx.build({}), accuracy_threshold)
    if n_workers > 1:
        check_sendable(model=model, spec=spec, accuracy_fn=call["accuracy_fn"], speed_fn=call["speed_fn"],
                       sampler=sampler, pruner=pruner, calibration_data=batches)
        storage = call["storage"] = storage if storage is not None else fresh_journal()
        study_name = call["study_name"] = study_name or f"fxsketch-{os.getpid()}-{int(time.time())}"
        storage = open_storage(storage, heartbeat_interval)
    optuna_verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # fxsketch reports trials itself
    try:
        study = _create_study(storage, study_name, load_if_exists, sampler, pruner, seed, multi)
        if n_workers > 1:
            _parallel(study, call)
            return _finish(ctx, study, units, records, dense_accuracy, verbose, strategy, multi)
        _seed_memo(ctx, study)
        interrupted = False
        try:
            if strategy == "joint":
                printer = [_print_trial] if verbose else []
                run_joint(ctx, study, units, n_trials, timeout, [*printer, *callbacks], multi)
            else:
                _search(ctx, study, units, n_trials, timeout, verbose, callbacks)
        except KeyboardInterrupt:
            _interrupted(study, call["storage"])
            interrupted = True
    finally:
        optuna.logging.set_verbosity(optuna_verbosity)
    if _worker is not None:
        return None
    result = _finish(ctx, study, units, records, dense_accuracy, verbose, strategy, multi)
    result.interrupted = result.interrupted or interrupted
    if experiment_dir is not None:
        _keep_best(result, experiment_dir, inputs)
    return result


def _keep_best(result: Result, folder: Path, inputs: tuple) -> None:
    result.save_plan(folder / "best_plan.json")
    try:
        save(result.graph_module, folder / "best_model.pt2", inputs)
    except Exception as exc:  # the plan is kept either way; say why the model is not
        log.warning("could not save the best model to %s: %s", folder / "best_model.pt2", exc)


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C before any trial finished; the message says how to resume (`study_name` names the study)."""

    def __init__(self, message: str, study_name: str | None = None) -> None:
        super().__init__(message)
        self.study_name = study_name


def _interrupted(study: optuna.Study, storage: Any) -> None:
    """Ctrl-C: keep what finished and return the best plan so far, or say how to resume."""
    finished = sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished() and _ran(t))
    resume = (f"resume with storage={storage!r}, study_name={study.study_name!r}, load_if_exists=True"
              if storage is not None else "pass storage= (e.g. 'sqlite:///study.db') and study_name= to make it resumable")
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        raise SearchInterrupted(f"interrupted before any trial finished; {resume}", study.study_name)
    # marked so that the CLI can leave this hint out: it gives its own, in its flags
    log.warning("interrupted after %d finished trials: returning the best plan so far; %s", finished, resume,
                extra={"fxsketch_resume": True})


def _check_arguments(accuracy_fn, speed_fn, n_trials, threshold, timeout, sampler, pruner, callbacks) -> None:
    """Refuse wrong arguments before any work, naming the value and what is allowed."""
    if not callable(accuracy_fn):
        raise TypeError("accuracy_fn must be a callable taking a model and returning a float")
    if speed_fn is not None and not callable(speed_fn):
        raise TypeError(f"speed_fn must be a callable taking a model and returning a float (or None), "
                        f"got {type(speed_fn).__name__}")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int):
        raise TypeError(f"n_trials must be an int >= 1, got {n_trials!r}")
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise TypeError(f"accuracy_threshold must be None or a number, got {threshold!r}")
        if math.isnan(threshold):
            raise ValueError("accuracy_threshold must be a number or None, got nan")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be None or a positive number of seconds, got {timeout!r}")
    if sampler is not None and not isinstance(sampler, optuna.samplers.BaseSampler):
        raise TypeError(f"sampler must be an optuna.samplers.BaseSampler (e.g. TPESampler()), got {type(sampler).__name__}")
    if pruner is not None and not isinstance(pruner, optuna.pruners.BasePruner):
        raise TypeError(f"pruner must be an optuna.pruners.BasePruner, got {type(pruner).__name__}")
    bad = [c for c in callbacks if not callable(c)]
    if bad:
        raise TypeError(f"callbacks must be callables (study, trial) -> None, got {bad[0]!r}")


def _dense_accuracy(accuracy_fn, gm, threshold) -> float:
    try:
        dense = call_metric(accuracy_fn, gm, "accuracy_fn")
    except TrialFailed as exc:
        raise RuntimeError(f"{exc} on the original (dense) model: fix accuracy_fn before searching") from exc
    if threshold is not None and dense < threshold:
        log.warning("the dense model's accuracy %.4f is below the threshold %.4f: no plan is likely to meet it",
                    dense, threshold)
    return dense


def _parallel(study: optuna.Study, call: dict[str, Any]) -> None:
    """Spread this call's trials over worker processes sharing `study`; they return when done."""
    if call["callbacks"]:
        log.warning("callbacks run in the calling process only: they are not sent to worker processes")
    job = {k: v for k, v in call.items() if k not in ("n_workers", "_worker", "callbacks", "verbose", "n_trials",
                                                     "storage", "study_name", "load_if_exists", "seed")}
    job["calibration_data"] = list(job["calibration_data"]) if job["calibration_data"] is not None else None
    run_workers(call["n_workers"], call["n_trials"], call["storage"], study.study_name, job, call["seed"])


def _check_objectives(objectives: Sequence[str] | None) -> bool:
    if objectives is None:
        return False
    if sorted(objectives) != ["accuracy", "speed"]:
        raise ValueError(f"objectives must be ('accuracy', 'speed'), got {tuple(objectives)!r}")
    return True


def _search(ctx, study, units, n_trials, timeout, verbose, callbacks) -> None:
    """Run the units one after another, splitting this call's `n_trials` evenly over them.

    A unit that finishes early (its space exhausted) leaves its share to the units after it.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    printer = [_print_trial] if verbose else []
    used = warm = 0
    if ctx.warm and ctx.warm_joint and ctx.threshold is not None:
        before = ctx.started
        _warm_joint(ctx, study, units, n_trials, [*printer, *callbacks])
        used = warm = ctx.started - before
    for i, unit in enumerate(units):
        share = -(-max(0, n_trials - used) // (len(units) - i))  # ceil: earlier units get the remainder
        left = None if deadline is None else deadline - time.monotonic()
        before = ctx.started
        if share and left is not None and left <= 0:
            log.warning("timeout reached: %s was not tuned", unit.key)
        elif share:
            _search_unit(ctx, study, unit, share, left, [*printer, *callbacks])
        elif warm:
            log.info("the warm start's whole-model trials used this call's trials: %s not tuned alone", unit.key)
        else:
            log.warning("n_trials=%d leaves no trial for %s", n_trials, unit.key)
        used += ctx.started - before


def _unit_sensitivity(ctx: _Context, units: list[Unit], sensitivity: Any, batches) -> dict[str, float] | None:
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


def _warm_start_plans(ctx: _Context, units: list[Unit]) -> list[dict[str, dict[str, Any]]]:
    """Plans to try first: each layer's cheapest rank under 1% and 5% output error, then the
    allocations at 25% and 50% of the FLOPs (with a FLOP budget: the allocations under it)."""
    usable = _allocatable(units)
    if not usable:
        return []

    weights = ctx.weights(usable)
    plans = [target_error_units(usable, ctx.records, ctx.cache, weights, tol) for tol in (0.01, 0.05)]
    budgets = [Budget(f, ctx.budget.params) for f in (0.25, 0.5)]
    if ctx.budget.flops is not None:
        budgets.insert(0, ctx.budget)
        plans = []  # with a FLOP budget, start from plans that respect it
    for budget in budgets:
        try:
            plans.append(allocate_units(usable, ctx.records, ctx.cache, weights, budget,
                                        sensitivity=ctx.sensitivity))
        except ValueError as exc:
            log.info("no warm start at %s: %s", budget, exc)
    return plans


WARM_TRIALS = 6  # the most whole-model warm-start trials before the per-unit search (a third of n_trials)


def _allocatable(units: list[Unit]) -> list[Unit]:
    return [u for u in units if "low_rank" in u.space and unit_methods(u.space, u.method)[0] in ALLOCATABLE
            and ("method" not in u.space or u.space["method"].first() in ALLOCATABLE)]


def _warm_joint(ctx: _Context, study: optuna.Study, units: list[Unit], n_trials: int, callbacks) -> None:
    """The layerwise search's warm start, in whole-model trials.

    1. The allocation (`fxsketch.allocate` on the cached decompositions) at a FLOP budget found by
       bisection: a feasible plan moves the budget down, an infeasible one up (at most a third of
       `n_trials`, and `WARM_TRIALS`), so the search holds a feasible, cheap plan at once.
    2. Descent from the best feasible plan: each trial moves one unit one value cheaper (from
       dense: to its largest rank that saves FLOPs), the unit whose step adds the least predicted
       output error per FLOP saved first; a feasible step is kept, a unit whose step fails is not
       moved again. It stops when no unit can move, or after half the trials left: the per-unit
       search (which starts from the warm-start ranks of each unit) gets the rest.

    `_finish` returns the best of these plans unless the per-unit bests, combined and backed off,
    are faster. Skipped when the study already holds whole-model trials (a resumed study, a call on
    another machine), and in every `n_workers` process but the first."""

    usable = [u for u in _allocatable(units) if u.space["low_rank"].values()]
    limit = min(WARM_TRIALS, n_trials // 3)
    if not usable or limit < 1 or any(t.user_attrs.get(keys.UNIT) == JOINT_KEY
                                      for t in study.get_trials(deepcopy=False)):
        return
    weights = ctx.weights(usable)
    dense_usable = sum(dense_cost(ctx.records[n]).flops_per_token * ctx.records[n].tokens for u in usable for n in u.layers)
    max_flops = ctx.budget.limits(*ctx.selected_dense)[0]
    upper = min(1.0, (max_flops - (ctx.selected_dense[0] - dense_usable)) / max(dense_usable, 1))
    if upper <= 0:
        return
    trial = _joint_runner(ctx, study, units, callbacks)
    lo, hi, budget, used, best = 0.0, upper, min(0.5, upper), 0, None
    for _ in range(4 * limit):  # plans repeat at nearby budgets: those cost no trial
        if used >= limit or hi - lo < 0.01:
            break
        try:
            plan = allocate_units(usable, ctx.records, ctx.cache, weights, Budget(budget, ctx.budget.params),
                                  sensitivity=ctx.sensitivity)
        except ValueError:  # below the cheapest plan
            plan = {}
        fresh = plan and (JOINT_KEY, json.dumps(plan, sort_keys=True)) not in ctx.memo
        score = trial(plan, f"warm start: the allocation at {budget:.1%} of the tuned layers' FLOPs") if plan else -math.inf
        used += bool(fresh)
        if math.isfinite(score) and (best is None or score > best[1]):
            best = (plan, score)
        lo, hi = (lo, budget) if math.isfinite(score) else (budget, hi)
        budget = (lo + hi) / 2
    if best is None:
        return
    plan, rejected, stop = best[0], set(), used + (n_trials - used) // 2
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


def _joint_runner(ctx: _Context, study: optuna.Study, units: list[Unit], callbacks):
    """`run(plan, note) -> score`: one whole-model trial of `plan` (a repeated plan reuses its result)."""
    def run(plan: dict, note: str) -> float:
        hit = ctx.recall((JOINT_KEY, json.dumps(plan, sort_keys=True)), plan)
        if hit is not None:
            return ctx.score(*hit[:2])
        flat = {f"{u.key}.{k}": v for u in units for k, v in plan.get(u.layers[0], {"method": "dense"}).items()}
        out = {"score": -math.inf}

        def objective(trial):
            ctx.started += 1
            trial.set_user_attr(keys.WARM, note)
            out["score"] = evaluate_plan(ctx, trial, plan, flat)
            return out["score"]

        optimize_study(study, objective, 1, None, (TrialFailed,), list(callbacks))
        return out["score"]

    return run


def _cheaper_step(ctx: _Context, usable: list[Unit], plan: dict, weights, rejected: set) -> tuple | None:
    """The unit (not in `rejected`) and entry of the next cheaper value whose predicted output error
    grows least per FLOP saved (from the cached decompositions); None when no unit can move."""
    best = None
    for unit in usable:
        if unit.key in rejected:
            continue
        method = unit.space["method"].first() if "method" in unit.space else unit.method
        current = plan.get(unit.layers[0])
        lower = [r for r in sorted(unit.space["low_rank"].values())
                 if (current is None or r < current["low_rank"])
                 and not invalid_reason(ctx.records, unit, {"method": method, "low_rank": r})]
        if not lower:
            continue
        entry = {"method": method, "low_rank": lower[-1]}

        def cost_error(e):
            if e is None:
                return sum(dense_cost(ctx.records[n]).flops_per_token * ctx.records[n].tokens for n in unit.layers), 0.0
            kind = get_kind(e["method"])
            flops = sum(kind.cost(ctx.records[n], e).flops_per_token * ctx.records[n].tokens for n in unit.layers)
            error = sum(layer_errors(ctx.cache, ctx.records[n], e["method"], weights[n], [e["low_rank"]])[0]
                        for n in unit.layers)
            return flops, error

        try:
            (f0, e0), (f1, e1) = cost_error(current), cost_error(entry)
        except ValueError:  # e.g. no statistics for a layer: no error curve to rank it by
            continue
        if f1 >= f0:
            continue
        ratio = max(e1 - e0, 0.0) / (f0 - f1)
        if best is None or ratio < best[0]:
            best = (ratio, unit, entry)
    return None if best is None else best[1:]


def _enqueue_warm(ctx: _Context, study: optuna.Study, unit: Unit) -> None:
    for plan in ctx.warm:
        params = warm_params(unit, plan.get(unit.layers[0]))
        if params:
            study.enqueue_trial(params, skip_if_exists=True)


def _search_unit(ctx, study, unit, n_trials, timeout, callbacks) -> None:
    size = space_size(unit, ctx.default_method)
    if ctx.warm and "low_rank" in unit.space:
        _enqueue_warm(ctx, study, unit)

    def stop_when_exhausted(study: optuna.Study, trial) -> None:
        if len(ctx.seen.get(unit.key, ())) >= size:
            study.stop()  # every value set of this unit has been tried

    optimize_study(study, lambda trial: _run_trial(ctx, unit, trial), n_trials, timeout, (TrialFailed,),
                   [*callbacks, stop_when_exhausted])


def _print_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    attrs = trial.user_attrs
    entry = ", ".join(f"{k}={v}" for k, v in attrs.get(keys.ENTRY, {}).items())
    if trial.state == optuna.trial.TrialState.COMPLETE:
        score = f" score={attrs[keys.SCORE]:.4f}" if keys.SCORE in attrs else ""
        source = attrs.get(keys.SPEED_SOURCE)
        print(f"trial {trial.number:3d} {attrs.get(keys.UNIT)} [{entry}] accuracy={attrs[keys.ACCURACY]:.4f} "
              f"speed={attrs[keys.SPEED]:.3f}{f' ({source})' if source else ''}{score}")
    else:
        print(f"trial {trial.number:3d} {attrs.get(keys.UNIT)} [{entry}] {trial.state.name.lower()}: "
              f"{attrs.get(keys.NOTE, '')}")


def _finish(ctx: _Context, study, units, records, dense_accuracy, verbose, strategy, multi) -> Result:
    trials = trials_frame(study)
    if not trials.empty and (trials["state"] == "FAIL").all():
        reasons = trials["note"].value_counts()
        summary = "; ".join(f"{n}× {reason}" for reason, n in reasons.items())
        raise RuntimeError(f"every trial failed ({len(trials)}): {summary}")
    pareto = pareto_points(ctx, study, functools.partial(ctx.build, share=False)) if multi else []
    plan, accuracies = _chosen_plan(ctx, study, units, strategy, pareto)
    warm = best_joint(study) if strategy == "layerwise" and ctx.threshold is not None else None
    if warm is None:
        plan, accuracy, steps, module = _validate(ctx, plan, accuracies, verbose)
    else:  # the best whole-model (warm-start) plan, unless the per-unit bests combined beat it
        floor, tried = ctx.speed(None, warm[0]), []
        done = _validate(ctx, plan, accuracies, verbose, floor=floor, steps=tried) if plan else None
        if done is None:
            if verbose:
                print(f"the warm-start plan ({len(warm[0])} layers, speed {floor:.3f}) is faster than the "
                      "per-unit bests combined: validating it")
            done = _validate(ctx, dict(warm[0]), {}, verbose)
            for step in done[2]:
                step["source"] = "warm start (whole-model trial)"
            done = (done[0], done[1], tried + done[2], done[3])
        plan, accuracy, steps, module = done
    if plan and not ctx.recover[1]:  # the returned model owns its weights (the same values)
        module = ctx.build(plan, share=False)
    notes: list[str] = []
    interrupted = False
    try:
        measured = _time_result(ctx, plan, module)
        if measured is not None and measured.median < 1.0 and not measured.reliable:  # the load may have passed
            measured = _time_result(ctx, plan, module, cap_s=6.0)
        if measured is not None and _slower(measured) and ctx.objective == "latency" and ctx.speed_fn is None:
            plan, accuracy, module, measured = _back_off_slow(ctx, plan, accuracy, module, measured, steps, verbose)
            if not plan:
                notes.append("no plan was faster than dense on this machine: the model stays dense")
                accuracy = dense_accuracy
    except KeyboardInterrupt:  # Ctrl-C while timing: keep the validated plan, unmeasured
        interrupted, measured = True, None
        notes.append("interrupted while timing the returned model: its speed was not measured")
    if measured is not None and not measured.faster:
        notes.append(f"the returned plan is not faster than dense on this machine: {measured.describe()}")
    for note in notes:
        log.warning(note)
    if measured is not None and measured.faster and not measured.reliable:
        log.warning("the measured speedup is not reliable: %s", measured.describe())
    params_before, flops_before = plan_cost(records, {})
    params_after, flops_after = plan_cost(records, plan)
    estimate = ctx.timer.speedup(plan) if ctx.timer is not None and plan else None
    sensitivity = sensitivity_table(ctx, units)
    return Result(graph_module=module, plan=plan, accuracy=accuracy, dense_accuracy=dense_accuracy,
                  speedup=measured.median if measured else (math.nan if plan else 1.0),
                  flops_ratio=flops_before / flops_after, params_before=params_before, measured_speedup=measured,
                  notes=notes, interrupted=interrupted,
                  params_after=params_after, trials=trials, study=study, records=records, validation=steps,
                  accuracy_threshold=ctx.threshold, pareto=pareto, sensitivity=sensitivity,
                  speedup_estimate=estimate)


def _time_result(ctx: _Context, plan: dict, module: nn.Module, cap_s: float = 3.0) -> Speedup | None:
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


def _back_off_slow(ctx: _Context, plan: dict, accuracy, module: nn.Module, measured: Speedup,
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
        measured = _time_result(ctx, plan, module)
        if not _slower(measured):
            break
    return plan, accuracy, module, measured


def _chosen_plan(ctx, study, units, strategy, pareto) -> tuple[dict, dict[str, float]]:
    """The plan to validate: per-unit bests combined, the best joint plan, or a Pareto point."""
    if pareto:
        point = pareto[0] if ctx.threshold is not None else max(pareto, key=lambda p: (p.accuracy, p.speed))
        return dict(point.plan), {}
    if strategy == "joint":
        best = best_joint(study)
        if best is None:
            log.warning("no plan met the accuracy threshold: the model stays dense")
            return {}, {}
        return dict(best[0]), {}
    plan: dict[str, dict[str, Any]] = {}
    accuracies: dict[str, float] = {}
    for unit in units:
        best = _best_entry(study, unit.key)
        if best is None:
            log.warning("no trial of %s met the accuracy threshold: it stays dense", unit.key)
            continue
        for name in unit.layers:
            plan[name], accuracies[name] = dict(best[0]), best[1]
    return {k: v for k, v in plan.items() if v["method"] != "dense"}, accuracies


def sensitivity_table(ctx: _Context, units: list[Unit]) -> pd.DataFrame:
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
