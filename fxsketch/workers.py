"""Scale-out: several worker processes on one shared Optuna study.

Workers on other machines simply run `fxsketch.optimize(..., study=StudyOptions(storage=URL,
study_name=S, load_if_exists=True))` against one RDB storage (PostgreSQL). With `n_workers=N` the
search does the same on one machine (`fxsketch.search.parallel`): it spawns N processes on a shared
journal file (or the given storage), waits, and finishes in the calling process. This module holds
the parts that know nothing of the search: storages, spawning, and a race-proof `study.optimize`.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import pickle
import tempfile
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend

from fxsketch.study_format import REUSED, trial_running

__all__ = ["open_storage", "run_workers", "check_sendable", "fresh_journal", "resolve_callable", "optimize_study"]

log = logging.getLogger(__name__)

JOURNAL = "journal:///"
REDRAWS = 5  # a study draws at most this many times the trials asked for (repeats are not counted)


def open_storage(storage: Any, heartbeat_interval: int | None = None) -> Any:
    """A storage object from a URL: `journal:///path/to/file.log` (a file shared by processes, also
    over NFS), any SQLAlchemy URL (with heartbeats and one retry of a dead worker's trial when
    `heartbeat_interval` is given), or an Optuna storage object / None as they are.

    Raises:
        TypeError: not a URL or storage; ImportError: the database driver is missing;
        ValueError: the database cannot be opened (the message says what a URL looks like).
    """
    if storage is None or isinstance(storage, optuna.storages.BaseStorage):
        return storage
    if not isinstance(storage, str):
        raise TypeError(f"storage must be None, a database URL such as 'sqlite:///study.db', or an "
                        f"optuna.storages.BaseStorage, got {type(storage).__name__}")
    try:
        if storage.startswith(JOURNAL):
            return optuna.storages.JournalStorage(JournalFileBackend(storage[len(JOURNAL) - 1:]))
        if heartbeat_interval:
            return optuna.storages.RDBStorage(
                storage, heartbeat_interval=heartbeat_interval, grace_period=2 * heartbeat_interval,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
        return optuna.storages.get_storage(storage)
    except ImportError as exc:
        raise ImportError(f"cannot open storage {storage!r}: its database driver is not installed ({exc}); "
                          "for PostgreSQL: pip install 'fxsketch[postgres]'") from exc
    except Exception as exc:  # SQLAlchemy's errors, a journal path that cannot be created
        raise ValueError(f"cannot open storage {storage!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}. "
                         "Give a URL such as 'sqlite:///path/study.db' (its directory must exist), "
                         "'postgresql+psycopg://user@host:port/db' of a reachable server, or "
                         "'journal:///path/study.log'") from exc


def optimize_study(study: optuna.Study, objective: Callable[[optuna.Trial], Any], n_trials: int,
                   timeout: float | None, catch: tuple, callbacks: list, redraws: int = 0) -> None:
    """`study.optimize` for `n_trials` counted trials, with each trial the `running_trial` while its
    objective runs. A trial that only reused an earlier result (its values already held: attribute
    `REUSED`) is not counted: the sampler draws again, up to `redraws` (default `REDRAWS`) times
    the budget in all; an objective that ignores the draw (a fixed plan) passes `redraws=1`.
    Survives a known race of Optuna's between processes sharing a study: two of them can pop the
    same enqueued trial, and the second one's result is then refused (a ValueError "Cannot tell a
    COMPLETE trial" before the write, or the storage's `UpdateFinishedTrialError` when both read the
    trial as running, as SQLite allows); that trial is left to the first process and this one goes
    on."""
    counted, attempts, cap = [0], [0], (redraws or REDRAWS) * n_trials
    deadline = None if timeout is None else time.monotonic() + timeout

    def run(trial: optuna.Trial) -> Any:
        attempts[0] += 1
        try:
            with trial_running(trial):
                return objective(trial)
        finally:
            if REUSED not in trial.user_attrs:
                counted[0] += 1

    def enough(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if counted[0] >= n_trials or attempts[0] >= cap:
            study.stop()

    while counted[0] < n_trials and attempts[0] < cap:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return
        try:
            study.optimize(run, n_trials=None, timeout=left, catch=catch, callbacks=[*callbacks, enough])
            return  # the budget is spent, the time is up, or a callback stopped the study
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as exc:
            if isinstance(exc, ValueError) and not str(exc).startswith("Cannot tell a"):
                raise
            log.info("another process finished the same enqueued trial first (%s); going on", exc)


def fresh_journal() -> str:
    """A new journal-file storage URL in a temporary directory (the default for `n_workers > 1`)."""
    return f"{JOURNAL}{os.path.join(tempfile.mkdtemp(prefix='fxsketch-'), 'study.log')}"


def check_sendable(**objects: Any) -> None:
    """Raise a TypeError naming what cannot be pickled into a worker process, and what to do."""
    for name, obj in objects.items():
        if obj is None or isinstance(obj, str):
            continue
        try:
            pickle.dumps(obj)
        except Exception as exc:
            raise TypeError(
                f"{name} cannot be sent to a worker process ({type(exc).__name__}: {exc}). Define it at "
                f"module level in an importable module and pass it, or pass its name as 'package.module:function'"
            ) from None


def resolve_callable(ref: Any) -> Any:
    """A callable given as 'package.module:name' (or a callable, returned as is)."""
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    if not module or not name:
        raise ValueError(f"{ref!r} is not 'package.module:function'")
    return getattr(importlib.import_module(module), name)


def run_workers(target: Callable[..., None], jobs: list[tuple]) -> None:
    """Run `target(*job)` for every job in its own spawned process and wait for all of them; a
    process that fails is reported, and the trials it finished are kept in the study."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=target, args=job, name=f"fxsketch-worker-{i}") for i, job in enumerate(jobs)]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
        if p.exitcode:
            log.warning("%s exited with code %s; its finished trials are kept", p.name, p.exitcode)
