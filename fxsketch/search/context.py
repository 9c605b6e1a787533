"""What a search is given (`SearchJob`) and what its trials share (`TrialContext`).

The job is frozen: it is what `optimize` checked, and what each worker process receives. The
context is built from it once per process (`fxsketch.search.run.prepare`); its first fields are
set up then and never change, the last ones are the caches and counters trials update.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


from fxsketch.measure import LayerTimer, measure_speedup
from fxsketch.plan import Budget, plan_cost
from fxsketch.metrics import TrialFailed, call_metric
from fxsketch.options import CalibrationOptions, SearchOptions, StudyOptions
from fxsketch.records import LayerRecord, fetch
from fxsketch.recover import distill, factor_parameters, float_factors, quantize_trained, with_taps
from fxsketch.replacements import FactorCache
from fxsketch.rewrite import apply_plan
from fxsketch.sequential import sequential_stats
from fxsketch import study_format as keys
from fxsketch.units import Unit

__all__ = ["SearchJob", "TrialContext"]


@dataclass(frozen=True)
class SearchJob:
    """Everything a search needs besides the model, checked (`batches` is the calibration data as
    a list; `accuracy_fn`/`speed_fn` may be 'package.module:function' names, for workers)."""

    spec: Any
    inputs: tuple
    accuracy_fn: Any
    accuracy_threshold: float | None
    speed_fn: Any
    n_trials: int
    timeout: float | None
    batches: list | None
    verbose: bool
    search: SearchOptions
    calibration: CalibrationOptions
    study: StudyOptions
    progress: bool = False  # a progress bar (this process's trials)
    fixed: dict = field(default_factory=dict)  # entries every candidate carries (the tables and attention found free)

    @property
    def strategy(self) -> str:
        """The strategy that runs: a multi-objective search is always joint."""
        return "joint" if self.search.multi else self.search.strategy


@dataclass
class TrialContext:
    """Everything a trial needs; built once per process from a `SearchJob`."""

    job: SearchJob
    gm: torch.fx.GraphModule
    records: dict[str, LayerRecord]
    units: dict[str, Unit]
    accuracy_fn: Callable[[nn.Module], float]
    speed_fn: Callable[[nn.Module], float] | None
    cache: FactorCache
    default_method: str
    budget: Budget
    dense_flops: int  # of the whole captured model
    selected_dense: tuple[int, int]  # FLOPs and params of the selected layers, dense
    baseline: nn.Module | None = None  # a copy of the user's model: what Result.speedup is measured against
    warm: list[dict[str, dict[str, Any]]] = field(default_factory=list)  # plans to try first
    warm_joint: bool = True  # run the whole-model warm start (one worker of a parallel call does)
    sensitivity: dict[str, float] | None = None  # per-layer weights of the warm start's allocations
    tables: dict[str, LayerRecord] = field(default_factory=dict)  # embedding tables a plan may store as int8
    attention: dict[str, LayerRecord] = field(default_factory=dict)  # attention calls the device runs natively in bf16

    # caches and counters, updated by the trials
    started: int = 0  # trials this process evaluated or pruned (a reused configuration does not count)
    known: set[int] = field(default_factory=set)  # numbers of the study's finished trials the memo holds
    timer: LayerTimer | None = None  # per-layer latency estimates (objective "latency")
    speed_source: str = ""  # how latency trials are timed: per-layer estimates, or whole models
    weight_versions: list[int] = field(default_factory=list)  # of gm's parameters, at the start
    deadline: float | None = None  # time.monotonic() when the job's `timeout` runs out (set as trials start)
    # (unit, values) -> (accuracy, speed, first trial): a repeated draw is not evaluated again
    memo: dict[tuple[str, str], tuple[float, float, int]] = field(default_factory=dict)
    seen: dict[str, set[str]] = field(default_factory=dict)
    last_fit: tuple[str, FactorCache] | None = None  # the last plan's sequential fit, by its text

    def trial_limit(self) -> float | None:
        """Seconds a trial's metric call may take: the trial timeout, and no later than the deadline."""
        limits = [t for t in (self.job.search.trial_timeout,
                              None if self.deadline is None else self.deadline - time.monotonic()) if t is not None]
        return max(min(limits), 1e-3) if limits else None

    @property
    def threshold(self) -> float | None:
        return self.job.accuracy_threshold

    @property
    def objective(self) -> str:
        return self.job.search.objective

    @property
    def multi(self) -> bool:
        """Multi-objective: every trial needs its speed."""
        return self.job.search.multi

    @property
    def inputs(self) -> tuple:
        return self.job.inputs

    @property
    def selected(self) -> list[str]:
        """The tuned layers' names."""
        return [n for u in self.units.values() for n in u.layers]

    def build(self, plan: dict, copy_weights: bool = True, share: bool = True, recover: bool | None = None) -> nn.Module:
        """The model with `plan` applied, distilled (`distill`) when `recover` (None: when every
        candidate is, `recover_steps` with `recover_at="each"`); a plan that replaces anything also
        carries the job's `fixed` entries (int8 embedding tables, 16-bit attention). With `share` and without
        distillation the kept weights are the captured graph's own storage (trials; see
        `check_weights`); models handed to the user are built with `share=False`."""
        recovery = self.job.calibration
        steps = recovery.recover_steps if (self.recovers_each if recover is None else recover) else 0
        self.check_weights()
        cache = self.fit_cache(plan) if copy_weights else self.cache
        records = {**self.records, **self.tables, **self.attention} if self.tables or self.attention else self.records
        plan = {**self.job.fixed, **plan} if plan else plan
        module = apply_plan(self.gm, records, plan, cache, copy_weights=copy_weights,
                            share_weights=share and not steps)
        if not (steps and plan):
            return module
        twin_plan = float_factors(plan)
        twin = (module if twin_plan == plan
                else apply_plan(self.gm, records, twin_plan, cache, copy_weights=copy_weights))
        if not factor_parameters(twin):  # every layer whole in a precision: nothing to train
            return module
        self.distill(twin)
        if twin is not module:  # int8 factors: trained in float, then quantized
            quantize_trained(module, twin)
        return module

    @property
    def recovers_each(self) -> bool:
        """Every candidate is distilled before it is judged (`recover_at="each"`)."""
        recovery = self.job.calibration
        return bool(recovery.recover_steps) and recovery.recover_at == "each"

    def distill(self, student: nn.Module) -> float:
        """Train `student`'s factors against the captured model for `recover_steps` steps, on
        `recover_data` (default: the calibration batches), matching its outputs and the values of
        the `recover_taps` nodes. Returns the last step's loss."""
        recovery = self.job.calibration
        teacher, taps = self.gm, self.tap_names()
        if taps:
            student, teacher = with_taps(student, taps), with_taps(self.gm, taps)
        return distill(student, teacher, recovery.recover_data or self.job.batches, steps=recovery.recover_steps,
                       lr=recovery.recover_lr, loss_fn=recovery.recover_loss_fn, schedule=recovery.recover_schedule)

    def tap_names(self) -> list[str]:
        """The `recover_taps` node names, checked against the captured graph (ValueError naming
        the missing ones): a wrong name fails before any trial, not in the first distillation."""
        taps = self.job.calibration.recover_taps
        taps = list(taps(self.gm) if callable(taps) else taps or ())
        nodes = {n.name for n in self.gm.graph.nodes}
        missing = [t for t in taps if not isinstance(t, str) or t not in nodes]
        if missing:
            shown = ", ".join(sorted(nodes)[:12]) + (", ..." if len(nodes) > 12 else "")
            raise ValueError(f"recover_taps names no node of the captured graph: {missing}; pass node names of "
                             f"`fxsketch.capture(model, example_inputs).graph` (they include {shown})")
        return taps

    def fit_cache(self, plan: dict) -> FactorCache:
        """The factors to build `plan` from: with sequential calibration and low-rank entries, fitted
        to the inputs each layer receives under `plan` (`sequential_stats`); else the study's cache."""
        calibration = self.job.calibration
        if not (calibration.sequential and self.job.batches and any("low_rank" in e for e in plan.values())):
            return self.cache
        key = json.dumps(plan, sort_keys=True)
        if self.last_fit is None or self.last_fit[0] != key:  # finishing builds one plan several times
            stats = sequential_stats(self.gm, self.job.batches, plan, list(self.records.values()),
                                     refit=calibration.refit, smooth=calibration.smooth)
            self.last_fit = (key, FactorCache(stats, refit=calibration.refit, smooth=calibration.smooth))
        return self.last_fit[1]

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
            return call_metric(self.speed_fn, built(), "speed_fn", self.trial_limit())
        if self.objective == "flops":
            return self.dense_flops / plan_cost(list(self.records.values()), plan).flops
        if (accuracy is not None and self.threshold is not None and not self.multi
                and accuracy < self.threshold):
            return math.nan
        estimate = self.layer_timer().speedup(plan)
        if estimate is not None:
            self.speed_source = "per-layer estimate"
            return estimate
        self.speed_source = "measured"
        return measure_speedup(self.gm, built(), self.inputs, cap_s=0.5).median

    def layer_timer(self) -> LayerTimer:
        """The per-layer latency estimates of this search (made on first use)."""
        if self.timer is None:
            self.timer = LayerTimer(self.gm, self.records, self.inputs, self.cache)
        return self.timer

    @property
    def timed(self) -> bool:
        """Whether speed is latency that the per-layer estimates stand for (no user speed_fn)."""
        return self.speed_fn is None and self.objective == "latency"

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
            return keys.UNTIMED
        if self.speed_fn is not None:
            return "speed_fn"
        if self.objective == "flops":
            return "FLOP ratio"
        return self.speed_source or "per-layer estimate"

    def score(self, accuracy: float, speed: float) -> float:
        """A single-objective trial's value: the speed of a feasible plan, -inf otherwise (the
        accuracy itself without a threshold)."""
        if self.threshold is None:
            return accuracy
        return speed if accuracy >= self.threshold else -math.inf
