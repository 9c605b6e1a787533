"""Calling the user's accuracy and speed functions: a finite float, or a failed trial with the reason."""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import optuna
import torch
from torch import nn

__all__ = ["TrialFailed", "call_metric", "time_limit"]

log = logging.getLogger(__name__)
_NOTED: set[tuple[str, str]] = set()  # (metric, function) pairs already told about returning a tensor


class TrialFailed(Exception):
    """The user's accuracy or speed function failed on a trial; the trial is recorded as failed."""


class _OutOfTime(BaseException):
    """Raised inside the user's function when its time is up (a BaseException, so that the
    function's own `except Exception` cannot swallow it)."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Interrupt the block after `seconds` with `_OutOfTime` (SIGALRM: Python-level code, the
    main thread, POSIX; elsewhere, for None, and while another alarm is set (a test runner's),
    the block runs unbounded). A call stuck inside native code is interrupted only once it
    returns to Python. The signal handler in place before is restored."""
    if (seconds is None or threading.current_thread() is not threading.main_thread()
            or not hasattr(signal, "setitimer") or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
        yield
        return
    active = [True]

    def expire(signum: int, frame: Any) -> None:
        if active[0]:  # an alarm that lands after the block has left does nothing
            raise _OutOfTime

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
        yield
    finally:
        active[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)


def call_metric(fn: Callable[[nn.Module], Any], module: nn.Module, what: str, limit_s: float | None = None) -> float:
    """`fn(module)` as a finite float; anything else (an exception, running out of memory, None,
    NaN, inf, a non-number, not returning within `limit_s` seconds) fails the trial with the reason."""
    try:
        with time_limit(limit_s):
            raw = fn(module)
    except _OutOfTime:
        raise TrialFailed(f"{what} did not return within {limit_s:.3g} s (the trial's time limit)") from None
    except optuna.TrialPruned:  # an accuracy function that reports steps may prune its trial
        raise
    except Exception as exc:  # MemoryError and torch.OutOfMemoryError included
        raise TrialFailed(f"{what} raised {type(exc).__name__}: {exc}") from exc
    if isinstance(raw, torch.Tensor) and raw.numel() == 1:
        if (what, getattr(fn, "__qualname__", repr(fn))) not in _NOTED:
            _NOTED.add((what, getattr(fn, "__qualname__", repr(fn))))
            log.warning("%s returned a tensor (%s); fxsketch takes its .item(). Return a float to say what "
                        "the score is, e.g. `return float(acc)`", what, raw.dtype)
        raw = raw.item()
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise TrialFailed(f"{what} returned {raw!r} ({type(raw).__name__}), not a number")
    value = float(raw)
    if not math.isfinite(value):
        raise TrialFailed(f"{what} returned {'NaN' if math.isnan(value) else value}")
    return value
