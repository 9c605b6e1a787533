"""The search's option groups: plain frozen objects `optimize` takes beside its dozen keywords.

    fxsketch.optimize(model, spec, example_inputs=x, accuracy_fn=acc, accuracy_threshold=0.9,
                      search=SearchOptions(objective="flops", max_flops=0.5),
                      study=StudyOptions(storage="sqlite:///study.db", study_name="bert"))

Each group is validated when it is made, so a wrong value fails at the line that wrote it. The
same objects are what worker processes receive. Keywords that moved here from `optimize` still
work there, with a DeprecationWarning naming the group (`LEGACY_KEYWORDS`).
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import optuna

__all__ = ["SearchOptions", "CalibrationOptions", "StudyOptions", "LEGACY_KEYWORDS", "OBJECTIVES", "STRATEGIES"]

OBJECTIVES = ("latency", "flops")
RECOVER_AT = ("each", "finish")
STRATEGIES = ("layerwise", "joint")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SearchOptions:
    """How the search runs.

    Args:
        objective: "latency" (speedup against dense in this process: trials use per-layer timings,
            the returned plan is timed on the whole model) or "flops" (the exact cost model).
        strategy: "layerwise" tunes each unit with the others dense, then combines and validates;
            "joint" makes every trial a whole-model plan.
        objectives: ("accuracy", "speed") searches both (joint) and returns the Pareto front.
        sampler, pruner: Optuna objects, passed straight through (default: seeded TPE).
        seed: seeds the default sampler (workers get seed + their index).
        callbacks: Optuna callbacks `(study, trial) -> None` called after each trial.
        default_method: the kind searched when a config names no `method` (default:
            "whitened_svd" with calibration data, else "svd").
        max_flops, max_params, max_bytes: budgets for the selected layers (FLOPs, parameters, bytes
            of the stored weights: int8 counts one byte a weight), a fraction of their dense cost
            (float ≤ 1) or absolute (int); a trial over budget is pruned before evaluation.
        warm_start: with calibration data, start from the rank allocation's plans.
        allocation_sensitivity: how the warm start's allocations weigh each unit's output error:
            "auto" (default) measures it ("output": one probe per unit on the calibration data) when
            there is a warm start; None leaves every unit's relative error as it is; or "output",
            an accuracy function or a mapping (see `fxsketch.allocate`).
        trial_timeout: seconds one trial's `accuracy_fn` (and `speed_fn`) may take; a call past it
            fails the trial with that note and the search goes on (Python-level code in the main
            thread on POSIX: a call stuck in native code stops only when it returns to Python).
        int8_tables: store the model's embedding tables as int8 rows (one scale per row,
            `int8_weight` entries in the plan) if that is free: the dense model with them loses at
            most 5% of the accuracy the threshold leaves (one more call of `accuracy_fn` before the
            trials). Every candidate then has them, so returned plans meet the bar with them.
            A quarter of the tables' bytes for a lookup's work; not done without a threshold.
        half_attention: compute the model's attention calls (`scaled_dot_product_attention`) in
            bf16 (`{"method": "bf16"}` entries in the plan) where the device runs bf16 natively
            (CUDA; CPUs with AVX512-BF16 or AMX) and that is free, judged as `int8_tables` is (after
            them, with their loss counted). Not done without a threshold.
        tune_allocator: before the search, set the process's glibc malloc as `fxsketch.load` sets
            it (`fxsketch.tune_allocator`, process-wide), so that trials are timed as the saved
            model will run; False leaves the allocator alone.
    """

    objective: str = "latency"
    strategy: str = "layerwise"
    objectives: tuple[str, ...] | None = None
    sampler: optuna.samplers.BaseSampler | None = None
    pruner: optuna.pruners.BasePruner | None = None
    seed: int | None = None
    callbacks: tuple[Callable, ...] = ()
    default_method: str | None = None
    max_flops: float | int | None = None
    max_params: float | int | None = None
    max_bytes: float | int | None = None
    warm_start: bool = True
    allocation_sensitivity: Any = "auto"
    trial_timeout: float | None = None
    int8_tables: bool = True
    half_attention: bool = True
    tune_allocator: bool = True

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.objectives is not None:
            if isinstance(self.objectives, str) or sorted(self.objectives) != ["accuracy", "speed"]:
                raise ValueError(f"objectives must be ('accuracy', 'speed'), got {self.objectives!r}")
            object.__setattr__(self, "objectives", tuple(self.objectives))
        if self.seed is not None and not _is_count(self.seed):
            raise TypeError(f"seed must be None or an int, got {self.seed!r}")
        callbacks = tuple(self.callbacks)
        bad = [c for c in callbacks if not callable(c)]
        if bad:
            raise TypeError(f"callbacks must be callables (study, trial) -> None, got {bad[0]!r}")
        object.__setattr__(self, "callbacks", callbacks)
        if self.default_method is not None and not isinstance(self.default_method, str):
            raise TypeError(f"default_method must be a replacement kind's name, got {self.default_method!r}")
        for flag in ("warm_start", "int8_tables", "half_attention", "tune_allocator"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.trial_timeout is not None and (isinstance(self.trial_timeout, bool)
                                               or not isinstance(self.trial_timeout, (int, float))
                                               or not self.trial_timeout > 0):
            raise ValueError(f"trial_timeout must be None or a positive number of seconds, got {self.trial_timeout!r}")

    @property
    def sensitivity(self) -> Any:
        """`allocation_sensitivity` with "auto" resolved ("output"; it only acts with a warm start)."""
        return "output" if self.allocation_sensitivity == "auto" else self.allocation_sensitivity

    @property
    def multi(self) -> bool:
        """Both accuracy and speed are objectives (a Pareto front is returned)."""
        return self.objectives is not None


@dataclass(frozen=True)
class CalibrationOptions:
    """What the calibration data is used for beyond statistics.

    Args:
        refit: refit each replacement's trainable factors to the layer's outputs (least squares).
        sequential: fit every candidate's low-rank layers in graph order, each to the original
            layer's outputs from the inputs it receives once the layers before it are replaced
            (`fxsketch.rewrite_sequential`): each layer undoes part of the error made upstream, so
            the same FLOPs keep more accuracy. Costs about two forward passes of the calibration
            data per candidate, held in memory at once; False fits each layer on its own.
        smooth: int8 layers divide each input feature by a factor drawn from the calibration
            statistics, their weights multiplied by it (`FactorCache.smoothing`), so that features
            with outliers do not take the per-tensor activation scale for themselves (on MiniLM,
            every Linear int8: fidelity 0.9915 -> 0.9952). Costs one multiply of the input per layer.
        recover_steps, recover_lr: distill each candidate (and the final model) for this many Adam
            steps on the calibration data against the original model before judging it. int8
            factors are trained in float and quantized after; a plan of whole layers in a reduced
            precision has nothing to train and is judged as built.
        recover_loss_fn: the distillation loss `(outputs, targets, inputs) -> scalar tensor`
            (default relative MSE; `fxsketch.recover.masked_mse()` leaves padding out).
        recover_at: "each" distills every candidate before judging it (costs `recover_steps`
            training steps a trial); "finish" judges candidates as fitted against a lower working
            bar and distills only the plan returned: the search first measures which share of the
            accuracy loss distillation wins back (one probe plan, distilled), lowers the bar so
            that a plan found at it should reach the real one once distilled, then distills the
            plan found and checks it against the real bar, falling back to more accurate plans
            (and, last, to the best plan found at the real bar) when it falls short. Needs
            `recover_steps` and a single-objective search with an accuracy threshold.
        recover_data: the batches distillation trains on (default: the calibration data); more
            sentences than the statistics need keep a long distillation from overfitting them.
        recover_taps: names of graph nodes whose values distillation matches besides the
            outputs (e.g. every transformer block's output), or a callable `GraphModule -> names`.
        recover_schedule: "constant" or "cosine" (the learning rate annealed to 0; see `distill`).
    """

    refit: bool = True
    sequential: bool = True
    smooth: bool = True
    recover_steps: int = 0
    recover_lr: float = 1e-3
    recover_loss_fn: Callable[[Any, Any, tuple], Any] | None = None
    recover_at: str = "each"
    recover_data: Any = None
    recover_taps: Sequence[str] | Callable[[Any], Sequence[str]] | None = None
    recover_schedule: str = "constant"

    def __post_init__(self) -> None:
        if not isinstance(self.refit, bool):
            raise TypeError(f"refit must be True or False, got {self.refit!r}")
        for flag in ("sequential", "smooth"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if not _is_count(self.recover_steps) or self.recover_steps < 0:
            raise ValueError(f"recover_steps must be an int >= 0, got {self.recover_steps!r}")
        if (isinstance(self.recover_lr, bool) or not isinstance(self.recover_lr, numbers.Real)
                or not math.isfinite(self.recover_lr) or self.recover_lr <= 0):
            raise ValueError(f"recover_lr must be a positive number, got {self.recover_lr!r}")
        if self.recover_loss_fn is not None and not callable(self.recover_loss_fn):
            raise TypeError(f"recover_loss_fn must be a callable (outputs, targets, inputs) -> loss, "
                            f"got {type(self.recover_loss_fn).__name__}")
        if self.recover_at not in RECOVER_AT:
            raise ValueError(f"recover_at must be one of {RECOVER_AT}, got {self.recover_at!r}")
        if self.recover_at == "finish" and not self.recover_steps:
            raise ValueError("recover_at='finish' distills the plan returned: set recover_steps > 0 too")
        if self.recover_schedule not in ("constant", "cosine"):
            raise ValueError(f"recover_schedule must be 'constant' or 'cosine', got {self.recover_schedule!r}")
        if self.recover_data is not None:
            if isinstance(self.recover_data, (str, bytes, torch.Tensor)) or not isinstance(self.recover_data, Iterable):
                raise TypeError(f"recover_data must be None or an iterable of input batches, "
                                f"got {type(self.recover_data).__name__}")
            object.__setattr__(self, "recover_data", tuple(self.recover_data))
            if not self.recover_data:
                raise ValueError("recover_data is empty: pass input batches, or None to distill on the calibration data")
        taps = self.recover_taps
        if taps is not None and not callable(taps):
            if isinstance(taps, str):
                taps = (taps,)
            if not isinstance(taps, Iterable) or not all(isinstance(t, str) for t in taps):
                raise TypeError(f"recover_taps must be None, node names or a callable GraphModule -> names, "
                                f"got {self.recover_taps!r}")
            object.__setattr__(self, "recover_taps", tuple(taps))


@dataclass(frozen=True)
class StudyOptions:
    """Where the trials are kept and who runs them.

    Args:
        storage: an Optuna storage URL ('sqlite:///study.db', 'postgresql+psycopg://...',
            'journal:///path/study.log') or storage object; None keeps the study in memory.
        study_name: the study's name in the storage.
        load_if_exists: resume the named study when it exists.
        n_workers: run the trials in this many processes on one shared storage (a journal file by
            default); `accuracy_fn` and `speed_fn` must then be picklable or 'package.module:function'.
        heartbeat_interval: seconds between worker heartbeats on an RDB storage: a trial of a
            worker that died is failed and retried once by another worker.
        cache_dir: keep the per-layer decompositions in this directory across runs and workers.
    """

    storage: str | optuna.storages.BaseStorage | None = None
    study_name: str | None = None
    load_if_exists: bool = False
    n_workers: int = 1
    heartbeat_interval: int | None = None
    cache_dir: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        if not _is_count(self.n_workers) or self.n_workers < 1:
            raise ValueError(f"n_workers must be a positive integer, got {self.n_workers!r}")
        if self.study_name is not None and not isinstance(self.study_name, str):
            raise TypeError(f"study_name must be None or a string, got {self.study_name!r}")
        if not isinstance(self.load_if_exists, bool):
            raise TypeError(f"load_if_exists must be True or False, got {self.load_if_exists!r}")
        if self.heartbeat_interval is not None and (not _is_count(self.heartbeat_interval)
                                                    or self.heartbeat_interval < 1):
            raise ValueError(f"heartbeat_interval must be None or a positive number of seconds, "
                             f"got {self.heartbeat_interval!r}")


GROUPS = {"search": SearchOptions, "calibration": CalibrationOptions, "study": StudyOptions}
NEW_OPTIONS = {"trial_timeout", "int8_tables", "half_attention", "smooth", "tune_allocator", "recover_at", "recover_data",
               "recover_taps", "recover_schedule"}  # options that were never keywords of optimize itself
LEGACY_KEYWORDS = {f.name: group for group, cls in GROUPS.items() for f in fields(cls) if f.name not in NEW_OPTIONS}


def merge_legacy(given: Mapping[str, Any], legacy: Mapping[str, Any]) -> dict[str, Any]:
    """The option groups with `optimize`'s old keywords (`legacy`) folded in.

    `given` maps group names to what the caller passed (an object or None). A keyword also set
    on its group's object is refused: it is not clear which one the caller meant.
    Raises TypeError for a keyword `optimize` never took."""
    unknown = sorted(set(legacy) - set(LEGACY_KEYWORDS))
    if unknown:
        raise TypeError(f"optimize() got unexpected keyword argument(s) {unknown}: its keywords are model, spec, "
                        f"example_inputs, accuracy_fn, accuracy_threshold, speed_fn, n_trials, timeout, "
                        f"calibration_data, experiment_dir, verbose, and the option groups search=SearchOptions(...), "
                        f"calibration=CalibrationOptions(...), study=StudyOptions(...)")
    out = {}
    for group, cls in GROUPS.items():
        obj = given.get(group)
        if obj is not None and not isinstance(obj, cls):
            raise TypeError(f"{group}= must be a fxsketch.{cls.__name__}, got {type(obj).__name__}")
        moved = {k: v for k, v in legacy.items() if LEGACY_KEYWORDS[k] == group}
        if obj is not None and moved:
            raise TypeError(f"{sorted(moved)} given both as keyword(s) and in {group}=: set them in "
                            f"{cls.__name__}(...) only")
        if moved:
            fix = ", ".join(f"{k}=..." for k in moved)
            _deprecated(f"optimize({', '.join(moved)}=...) is deprecated: pass {group}={cls.__name__}({fix})")
            obj = cls(**{k: _frozen(v) for k, v in moved.items()})
        out[group] = obj if obj is not None else cls()
    return out


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _deprecated(message: str) -> None:
    """A DeprecationWarning pointing at the caller of `optimize`."""
    warnings.warn(message, DeprecationWarning, stacklevel=4)
