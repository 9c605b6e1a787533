"""The study format: the Optuna trial attributes fxsketch writes, and the trial running now.

A stored study resumes by these attribute keys, so they never change; every module reads and
writes them through these names. `running_trial` is the Optuna trial whose evaluation runs in this
context (set by the search around each objective call), for integrations that report to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

__all__ = ["UNIT", "WHOLE_MODEL", "ENTRY", "PLAN", "ACCURACY", "SPEED", "SPEED_SOURCE", "UNTIMED", "SCORE", "NOTE", "WARM", "REUSED", "FINISHED", "FLOPS", "RECOVERY",
           "running_trial", "trial_running"]

UNIT = "fxsketch.unit"  # the tuning unit's key (a layer, a group, or WHOLE_MODEL)
WHOLE_MODEL = "*"  # the UNIT of a whole-model (joint or warm-start) trial
ENTRY = "fxsketch.entry"  # the unit's values: {"method": ..., **params}
PLAN = "fxsketch.plan"  # a whole-model trial's plan
ACCURACY = "fxsketch.accuracy"
SPEED = "fxsketch.speed"
SPEED_SOURCE = "fxsketch.speed_source"  # what the speed is: a per-layer estimate, a FLOP ratio, ...
UNTIMED = "not timed (infeasible)"  # the SPEED_SOURCE of a trial that missed the bar and was not timed
SCORE = "fxsketch.score"
NOTE = "fxsketch.note"  # why a trial was pruned, failed or reused an earlier result
FLOPS = "fxsketch.flops"  # the trial's plan: FLOPs of the selected layers as a fraction of dense
WARM = "fxsketch.warm"  # a whole-model warm-start trial: how its plan was made
FINISHED = "fxsketch.finished"  # a study attribute: the plan a finished search returned, and on what
RECOVERY = "fxsketch.recovery"  # a study attribute: the share of accuracy distillation won back on the probe plan
REUSED = "fxsketch.reused"  # the trial drew values an earlier trial held (its number; -1: pruned before): not counted

running_trial: ContextVar[Any] = ContextVar("fxsketch_running_trial", default=None)


@contextmanager
def trial_running(trial: Any) -> Iterator[None]:
    """Make `trial` the `running_trial` for the duration of the block."""
    token = running_trial.set(trial)
    try:
        yield
    finally:
        running_trial.reset(token)
