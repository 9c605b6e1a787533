"""A search spread over worker processes on one shared study (`StudyOptions(n_workers=N)`).

The calling process creates the study, then each worker receives the model and a copy of the
`SearchJob` with its share of the trials, prepares its own trial context and runs the strategy;
the calling process waits and finishes. Workers never time the result nor call back the user.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import optuna
import torch
from torch import nn

from fxsketch.allocator import tune_allocator
from fxsketch.search.context import SearchJob
from fxsketch.search.run import open_study, prepare, run_strategy
from fxsketch.workers import check_sendable, run_workers

__all__ = ["run_parallel", "worker_main"]

log = logging.getLogger(__name__)


def run_parallel(model: nn.Module, job: SearchJob, study: optuna.Study, storage: str) -> None:
    """Spread `job`'s trials over its `n_workers` processes sharing `study` (kept in `storage`, a
    URL every process can open); returns when all are done."""
    check_sendable(model=model, spec=job.spec, accuracy_fn=job.accuracy_fn, speed_fn=job.speed_fn,
                   sampler=job.search.sampler, pruner=job.search.pruner, calibration_data=job.batches)
    if job.search.callbacks:
        log.warning("callbacks run in the calling process only: they are not sent to worker processes")
    n = job.study.n_workers
    shares = [job.n_trials // n + (1 if i < job.n_trials % n else 0) for i in range(n)]
    threads = max(1, (os.cpu_count() or 1) // n)
    jobs = [(model, worker_job(job, i, share, storage, study.study_name), i, threads)
            for i, share in enumerate(shares) if share]
    run_workers(worker_main, jobs)


def worker_job(job: SearchJob, index: int, n_trials: int, storage: str, study_name: str) -> SearchJob:
    """Worker `index`'s job: its share of the trials on the shared study, its own seed, quiet (the
    first one shows the progress bar of its share when the caller's would show)."""
    seed = job.search.seed
    return dataclasses.replace(
        job, n_trials=n_trials, verbose=False, progress=job.progress and index == 0,
        search=dataclasses.replace(job.search, seed=None if seed is None else seed + index, callbacks=()),
        study=dataclasses.replace(job.study, storage=storage, study_name=study_name, load_if_exists=True,
                                  n_workers=1))


def worker_main(model: nn.Module, job: SearchJob, index: int, threads: int) -> None:
    """A worker process: prepare, open the shared study, run its share of the strategy."""
    torch.set_num_threads(threads)
    if job.search.tune_allocator:
        tune_allocator()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ctx = prepare(model, job, worker=index)
    run_strategy(ctx, open_study(job))
