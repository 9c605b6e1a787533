"""Running a search in this process: the trial context from a job, the study, the strategy.

`optimize` and each worker process do the same three steps: `prepare` the context (capture,
units, calibration, warm start), `open_study`, `run_strategy`.
"""

from __future__ import annotations

import copy
import logging
import time

import optuna
from torch import nn

from fxsketch.calibrate import calibrate
from fxsketch.capture import capture, find_attention, find_layers, find_tables, other_modules
from fxsketch.metrics import TrialFailed, call_metric
from fxsketch.plan import Budget, plan_cost
from fxsketch.replacements import FactorCache, get_kind
from fxsketch.replacements.precision import fast_precisions
from fxsketch.search.context import SearchJob, TrialContext
from fxsketch.search.evaluate import remember
from fxsketch.search.joint import run_joint
from fxsketch.search.layerwise import run_layerwise
from fxsketch.search.progress import print_trial, search_progress
from fxsketch.search.warm import unit_sensitivity, warm_start_plans
from fxsketch.select import match_layers
from fxsketch.spec import load_spec
from fxsketch.units import DEFAULT_METHOD, resolve_units
from fxsketch.workers import open_storage, resolve_callable

__all__ = ["prepare", "free_entries", "open_study", "run_strategy"]

log = logging.getLogger(__name__)


def prepare(model: nn.Module, job: SearchJob, worker: int | None = None) -> TrialContext:
    """The trial context of `job` on `model`: captured, its units resolved, calibrated, with the
    warm start's plans. `worker` is the index of a worker process (None: the calling process,
    which alone keeps a copy of the user's model to time the result against)."""
    batches, options = job.batches, job.search
    default_method = options.default_method or ("whitened_svd" if batches else DEFAULT_METHOD)
    get_kind(default_method)
    configs = load_spec(job.spec)
    gm = capture(model, job.inputs)
    records = find_layers(gm)
    others = other_modules(gm, records)
    units = resolve_units(records, configs, others, default_method, precision=options.objective != "flops")
    if not units:
        selected = {n for c in configs for n in match_layers(records, c.layer_names, other_modules=others)}
        why = [f"{r.name} ({r.module_type}): {r.unsupported or 'no configuration is cheaper than the dense layer'}"
               for r in records if r.name in selected]
        raise ValueError("nothing to tune: " + "; ".join(why))
    stats = calibrate(gm, batches, records) if batches else None
    cache = FactorCache(stats, refit=job.calibration.refit, cache_dir=job.study.cache_dir, smooth=job.calibration.smooth)
    by_name = {r.name: r for r in records}
    selected = plan_cost([by_name[n] for u in units for n in u.layers], {})
    ctx = TrialContext(job, gm, by_name, {u.key: u for u in units}, resolve_callable(job.accuracy_fn),
                       resolve_callable(job.speed_fn), cache, default_method,
                       Budget(options.max_flops, options.max_params, options.max_bytes), plan_cost(records, {}).flops,
                       (selected.flops, selected.params))
    ctx.tables = {r.name: r for r in find_tables(gm) if not r.unsupported}
    ctx.attention = {r.name: r for r in find_attention(gm) if "bf16" in fast_precisions(r)}
    if worker is None:  # the returned model is timed against the model the user has, not its captured graph
        ctx.baseline = copy.deepcopy(model)
    ctx.check_weights()  # records the weights' versions before any evaluation
    if batches and options.warm_start:
        ctx.sensitivity = unit_sensitivity(ctx, units, options.sensitivity, batches)
        ctx.warm = warm_start_plans(ctx, units)
        ctx.warm_joint = not worker  # of parallel workers, the first runs the whole-model warm start
    return ctx


FREE_SHARE = 0.05  # of the accuracy the threshold leaves below the dense model, each free change may take


def free_entries(ctx: TrialContext, dense_accuracy: float) -> dict[str, dict[str, str]]:
    """The plan entries every candidate carries because they are free: the embedding tables as
    int8 rows, then the attention calls in bf16 where the device runs it natively. Each change is
    checked on the model with the changes kept before it (one call of `accuracy_fn` each) and kept
    if it loses at most `FREE_SHARE` of the accuracy the threshold leaves. Every candidate then
    carries them (`SearchJob.fixed`), so the search spends the rest of the margin, and its plans
    meet the bar with them. Nothing is free without a threshold."""
    if ctx.threshold is None or dense_accuracy <= ctx.threshold:
        return {}
    options, fixed, last = ctx.job.search, {}, dense_accuracy
    changes = [("embedding tables as int8 rows", options.int8_tables,
                {name: {"method": "int8_weight"} for name in ctx.tables}),
               ("attention in bf16", options.half_attention,
                {name: {"method": "bf16"} for name in ctx.attention})]
    allowed = FREE_SHARE * (dense_accuracy - ctx.threshold)
    for what, wanted, entries in changes:
        if not (wanted and entries):
            continue
        try:
            found = call_metric(ctx.accuracy_fn, ctx.build({**fixed, **entries}), "accuracy_fn")
        except TrialFailed as exc:
            log.warning("checking the %s failed (%s): left as they are", what, exc)
            continue
        free = last - found <= allowed
        log.info("%s (%s): accuracy %.5f against %.5f before (%s: up to %.5f may go)",
                 what, ", ".join(entries), found, last, "kept" if free else "left as they are", allowed)
        if ctx.job.verbose:
            print(f"{what} ({len(entries)}): accuracy {found:.4f} against {last:.4f}"
                  + ("" if free else f": more than {allowed:.4f} lost, left as they are"))
        if free:
            fixed, last = {**fixed, **entries}, found
    return fixed


def open_study(job: SearchJob, storage: object = None) -> optuna.Study:
    """The job's study (created, or loaded with `load_if_exists`), in `storage` (an opened storage;
    default: the job's)."""
    options = job.search
    storage = storage if storage is not None else open_storage(job.study.storage, job.study.heartbeat_interval)
    study_name = job.study.study_name
    sampler = options.sampler if options.sampler is not None else optuna.samplers.TPESampler(seed=options.seed)
    directions = ["maximize", "maximize"] if options.multi else ["maximize"]
    try:
        return optuna.create_study(storage=storage, study_name=study_name, load_if_exists=job.study.load_if_exists,
                                   directions=directions, sampler=sampler, pruner=options.pruner)
    except optuna.exceptions.DuplicatedStudyError:
        raise ValueError(f"study {study_name!r} already exists in {job.study.storage!r}: pass load_if_exists=True "
                         "to resume it, or choose another study_name") from None


def run_strategy(ctx: TrialContext, study: optuna.Study) -> None:
    """Run this process's `n_trials` of the job's strategy on `study` (after remembering what a
    resumed study already evaluated). With a `timeout`, no trial's metric call runs past it."""
    job = ctx.job
    ctx.deadline = None if job.timeout is None else time.monotonic() + job.timeout
    remember(ctx, study.get_trials(deepcopy=False))
    units = list(ctx.units.values())
    try:
        with search_progress(job.n_trials, job.accuracy_threshold, job.progress) as advance:
            callbacks = [*([print_trial] if job.verbose else []), *([advance] if advance else []),
                         *job.search.callbacks]
            if job.strategy == "joint":
                run_joint(ctx, study, units, job.n_trials, job.timeout, callbacks)
            else:
                run_layerwise(ctx, study, units, job.n_trials, job.timeout, callbacks)
    finally:
        ctx.deadline = None  # finishing (validation, timing) is not cut short
