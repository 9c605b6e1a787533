"""Small helpers shared by the benchmark scripts: interleaved wall-clock timing."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping

import torch


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    target_s: float = 0.2,
    min_rounds: int = 5,
    max_rounds: int = 500,
    min_sample_s: float = 1e-3,
    warmup: int = 2,
) -> dict[str, float]:
    """Median seconds per call of each zero-argument callable, measured in interleaved rounds.

    After `warmup` calls each, every callable gets an inner repeat count so one sample lasts at least
    `min_sample_s` (timer resolution, per-call jitter), and the number of rounds is chosen so the
    slowest variant spends about `target_s` in total (at least `min_rounds` rounds). Each round times
    one sample of every variant, rotating the order from round to round, so machine noise hits all of
    them alike. Runs under `torch.no_grad()`.
    """
    names = list(fns)
    with torch.no_grad():
        for name in names:
            for _ in range(warmup):
                fns[name]()
        per_call = {}
        for name in names:
            best = math.inf
            for _ in range(2):
                t0 = time.perf_counter()
                fns[name]()
                best = min(best, time.perf_counter() - t0)
            per_call[name] = max(best, 1e-7)
        inner = {n: max(1, math.ceil(min_sample_s / per_call[n])) for n in names}
        slowest_sample = max(inner[n] * per_call[n] for n in names)
        rounds = int(min(max_rounds, max(min_rounds, target_s // slowest_sample)))
        samples: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                fn, n = fns[name], inner[name]
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                samples[name].append((time.perf_counter() - t0) / n)
    return {n: statistics.median(samples[n]) for n in names}


class CpuWatch:
    """CPU seconds that *other* processes used while this one ran (Linux /proc/stat; None elsewhere).

    With as many threads as cores, any foreign load stalls the BLAS threads and skews the timings.
    """

    def __init__(self) -> None:
        self.start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float] | None:
        import resource

        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz  # all but idle and iowait
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy, ru.ru_utime + ru.ru_stime

    def others_cores(self) -> float | None:
        """Average number of cores other processes kept busy since construction."""
        end = self._snapshot()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        return max(0.0, (end[1] - self.start[1]) - (end[2] - self.start[2])) / max(wall, 1e-9)
