"""Calling the user's accuracy and speed functions: a finite float, or a failed trial with the reason."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optuna
import torch
from torch import nn

__all__ = ["TrialFailed", "call_metric"]


class TrialFailed(Exception):
    """The user's accuracy or speed function failed on a trial; the trial is recorded as failed."""


def call_metric(fn: Callable[[nn.Module], Any], module: nn.Module, what: str) -> float:
    """`fn(module)` as a finite float; anything else (an exception, running out of memory, None,
    NaN, inf, a non-number) fails the trial with the reason."""
    try:
        raw = fn(module)
    except optuna.TrialPruned:  # an accuracy function that reports steps may prune its trial
        raise
    except Exception as exc:  # MemoryError and torch.OutOfMemoryError included
        raise TrialFailed(f"{what} raised {type(exc).__name__}: {exc}") from exc
    if isinstance(raw, torch.Tensor) and raw.numel() == 1:
        raw = raw.item()
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise TrialFailed(f"{what} returned {raw!r} ({type(raw).__name__}), not a number")
    value = float(raw)
    if not math.isfinite(value):
        raise TrialFailed(f"{what} returned {'NaN' if math.isnan(value) else value}")
    return value
