"""`optimize`: check the arguments, build the job, run it here or in workers, finish."""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import optuna
from torch import nn

from fxsketch.allocator import tune_allocator
from fxsketch.calibrate import iterate_batches
from fxsketch.capture import as_inputs
from fxsketch.display import progress_wanted, step
from fxsketch.metrics import TrialFailed, call_metric
from fxsketch.options import CalibrationOptions, SearchOptions, StudyOptions, merge_legacy
from fxsketch.plan import Budget
from fxsketch.result import Result
from fxsketch.search.context import SearchJob
from fxsketch.search.evaluate import ran
from fxsketch.search.finish import finish, keep_best
from fxsketch.search.parallel import run_parallel
from fxsketch.search.recovery import finish_recovered, recovery_rate, working_threshold
from fxsketch.search.run import free_entries, open_study, prepare, run_strategy
from fxsketch.workers import fresh_journal, open_storage, resolve_callable

__all__ = ["optimize", "SearchInterrupted"]

log = logging.getLogger(__name__)


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C before any trial finished; the message says how to resume (`study_name` names the study)."""

    def __init__(self, message: str, study_name: str | None = None) -> None:
        super().__init__(message)
        self.study_name = study_name


def optimize(
    model: nn.Module,
    spec: Any,
    *,
    example_inputs: Any,
    accuracy_fn: Callable[[nn.Module], float] | str,
    accuracy_threshold: float | None = None,
    speed_fn: Callable[[nn.Module], float] | str | None = None,
    n_trials: int = 20,
    timeout: float | None = None,
    calibration_data: Iterable[Any] | None = None,
    experiment_dir: str | os.PathLike | None = None,
    verbose: bool = False,
    progress: bool | None = None,
    search: SearchOptions | None = None,
    calibration: CalibrationOptions | None = None,
    study: StudyOptions | None = None,
    **moved: Any,
) -> Result:
    """Find the fastest plan that keeps `accuracy_fn(model) >= accuracy_threshold`, and apply it.

    Args:
        model: the model to speed up; it is never modified.
        spec: what to tune: a TuningConfigs, a LayerConfig, a list of them, a dict
            `{"layers": [...]}`, or a path to a .json/.yaml file holding that dict.
        example_inputs: inputs for capture and latency measurement (a tensor or a tuple).
        accuracy_fn: `model -> float`, higher is better (or 'package.module:function').
        accuracy_threshold: the accuracy bar; None maximizes accuracy instead (the seeds' rule).
        speed_fn: `model -> float`, higher is better; replaces the built-in speed measure.
        n_trials: the trials this call runs, split evenly over the tuning units (a layer, or a
            group with `separate=False`); a unit whose space runs out early passes its share on.
            Resuming a stored study adds these to the ones it holds, and configurations it already
            evaluated are not evaluated again.
        timeout: seconds for the whole search; units not reached stay dense.
        calibration_data: an iterable of input batches; enables activation-aware kinds
            (`whitened_svd`), least-squares refits of the other kinds, and the warm start.
        experiment_dir: one folder for the whole experiment: the study database (`study.db`,
            resumed when it exists), the factor cache, and at the end the best plan
            (`best_plan.json`) and the saved best model (`best_model.pt2`).
        verbose: print a line per trial and the validation steps.
        progress: show a progress bar (the unit in progress, trials done, the best result so far)
            and a spinner during long steps, on standard error; None (default): when it is a terminal.
        search: how the search runs (`SearchOptions`: objective, strategy, budgets, sampler, ...).
        calibration: refits and distillation (`CalibrationOptions`).
        study: storage, resuming and worker processes (`StudyOptions`).
        **moved: the keywords that moved into the option groups (`objective=`, `storage=`, ...)
            still work, with a DeprecationWarning.

    Returns:
        A Result with the rewritten GraphModule, the plan, measurements and the trials.
    """
    groups = merge_legacy({"search": search, "calibration": calibration, "study": study}, moved)
    search, calibration, study = groups["search"], groups["calibration"], groups["study"]
    if experiment_dir is not None:
        experiment_dir = Path(experiment_dir)
        experiment_dir.mkdir(parents=True, exist_ok=True)
        study = StudyOptions(
            storage=study.storage if study.storage is not None else f"sqlite:///{experiment_dir / 'study.db'}",
            study_name=study.study_name or "fxsketch", load_if_exists=True, n_workers=study.n_workers,
            heartbeat_interval=study.heartbeat_interval,
            cache_dir=study.cache_dir if study.cache_dir is not None else experiment_dir / "factors")
    _check_arguments(accuracy_fn, speed_fn, n_trials, accuracy_threshold, timeout, search)
    batches = list(iterate_batches(calibration_data)) if calibration_data is not None else None
    if search.allocation_sensitivity not in (None, "auto") and not (batches and search.warm_start):
        raise ValueError("allocation_sensitivity weighs the warm start's allocations: it needs calibration_data= "
                         "and warm_start=True")
    if calibration.recover_steps and not batches:
        raise ValueError("recover_steps needs calibration_data to distill on")
    recovering = calibration.recover_at == "finish"
    if recovering and (accuracy_threshold is None or search.multi):
        raise ValueError("recover_at='finish' distills the plan found to lift it to the accuracy bar: it needs "
                         "accuracy_threshold= and a single objective (use recover_at='each' otherwise)")
    if search.tune_allocator:
        tune_allocator()
    job = SearchJob(spec, as_inputs(example_inputs), accuracy_fn, accuracy_threshold, speed_fn, n_trials, timeout,
                    batches, verbose, search, calibration, study, progress_wanted(progress))
    storage = study.storage
    if study.n_workers > 1:
        storage = storage if storage is not None else fresh_journal()
        job = _shared(job, storage)
    opened = open_storage(storage, study.heartbeat_interval)  # a wrong URL fails before any work
    with step("capturing the model" + (" and calibrating" if batches else ""), job.progress):
        ctx = prepare(model, job)
        if calibration.recover_steps:
            ctx.tap_names()  # a wrong name fails here, before any trial
        dense_accuracy = _dense_accuracy(ctx.accuracy_fn, ctx.build({}), accuracy_threshold)
        ctx.job = job = dataclasses.replace(job, fixed=free_entries(ctx, dense_accuracy))
    optuna_verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # fxsketch reports trials itself
    interrupted = False
    try:
        trials = open_study(job, opened)
        if recovering:
            with step("measuring what distillation wins back", job.progress):
                rate = recovery_rate(ctx, trials, dense_accuracy)
            ctx.job = job = dataclasses.replace(
                job, accuracy_threshold=working_threshold(accuracy_threshold, dense_accuracy, rate))
        try:
            if study.n_workers > 1:
                run_parallel(model, job, trials, storage)
            else:
                run_strategy(ctx, trials)
        except KeyboardInterrupt:
            _interrupted(trials, storage)
            interrupted = True
    finally:
        optuna.logging.set_verbosity(optuna_verbosity)
    with step("validating the best plan and timing it", job.progress):
        result = (finish_recovered(ctx, trials, dense_accuracy, accuracy_threshold) if recovering
                  else finish(ctx, trials, dense_accuracy))
    result.interrupted = result.interrupted or interrupted
    if experiment_dir is not None:
        keep_best(result, experiment_dir, job.inputs)
    return result


def _shared(job: SearchJob, storage: str) -> SearchJob:
    """The job with a storage and a study name every worker process can open."""
    name = job.study.study_name or f"fxsketch-{os.getpid()}-{int(time.time())}"
    return dataclasses.replace(job, study=dataclasses.replace(job.study, storage=storage, study_name=name))


def _interrupted(study: optuna.Study, storage: Any) -> None:
    """Ctrl-C: keep what finished and return the best plan so far, or say how to resume."""
    finished = sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished() and ran(t))
    resume = (f"resume with storage={storage!r}, study_name={study.study_name!r}, load_if_exists=True"
              if storage is not None else "pass storage= (e.g. 'sqlite:///study.db') and study_name= to make it resumable")
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        raise SearchInterrupted(f"interrupted before any trial finished; {resume}", study.study_name)
    # marked so that the CLI can leave this hint out: it gives its own, in its flags
    log.warning("interrupted after %d finished trials: returning the best plan so far; %s", finished, resume,
                extra={"fxsketch_resume": True})


def _check_arguments(accuracy_fn, speed_fn, n_trials, threshold, timeout, search: SearchOptions) -> None:
    """Refuse wrong arguments before any work, naming the value and what is allowed."""
    accuracy_fn, speed_fn = resolve_callable(accuracy_fn), resolve_callable(speed_fn)
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
    if search.sampler is not None and not isinstance(search.sampler, optuna.samplers.BaseSampler):
        raise TypeError(f"sampler must be an optuna.samplers.BaseSampler (e.g. TPESampler()), "
                        f"got {type(search.sampler).__name__}")
    if search.pruner is not None and not isinstance(search.pruner, optuna.pruners.BasePruner):
        raise TypeError(f"pruner must be an optuna.pruners.BasePruner, got {type(search.pruner).__name__}")
    budget = Budget(search.max_flops, search.max_params, search.max_bytes)
    budget.limits(1, 1)
    budget.byte_limit(1)


def _dense_accuracy(accuracy_fn: Callable, gm: nn.Module, threshold: float | None) -> float:
    try:
        dense = call_metric(accuracy_fn, gm, "accuracy_fn")
    except TrialFailed as exc:
        raise RuntimeError(f"{exc} on the original (dense) model: fix accuracy_fn before searching") from exc
    if threshold is not None and dense < threshold:
        log.warning("the dense model's accuracy %.4f is below the threshold %.4f: no plan is likely to meet it",
                    dense, threshold)
    return dense
