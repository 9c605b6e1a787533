"""Per-shape choice between the fused Triton kernel and the two-GEMM cuBLAS chain on CUDA.

Fusion pays where the M×R intermediate and the second launch matter (few rows, small R) and loses
where cuBLAS's tuned GEMMs win (large M at large R, few row tiles to spread over the SMs). Rather
than guess a rule per GPU, the first call for a shape key times both candidates on the real inputs
and remembers the faster one, as `triton.autotune` does for configs. Keys bucket M by powers of
two. Another candidate replaces the chain only when clearly faster (MARGIN), so timing noise does
not flip near-ties. While a CUDA graph is being captured nothing can be timed, so an unseen key
takes the chain, and so does a graph traced by `torch.compile` for a shape that eager never ran.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Hashable, Mapping

import torch

log = logging.getLogger(__name__)

_CHOICES: dict[Hashable, str] = {}
_DEFAULT = "aten"  # the cuBLAS chain: taken during graph capture, and unless beaten by MARGIN
MARGIN = 0.9  # another candidate must take at most this share of the default's time


def choose(key: Hashable, candidates: Mapping[str, Callable[[], object]],
           timer: Callable[[Callable[[], object]], float] | None = None) -> str:
    """The name of the fastest candidate for `key`, timing each once per key (cached)."""
    choice = _CHOICES.get(key)
    if choice is not None:
        return choice
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return _DEFAULT if _DEFAULT in candidates else next(iter(candidates))
    timer = timer or cuda_time
    times = {}
    for name, fn in candidates.items():
        try:
            times[name] = timer(fn)
        except Exception as exc:  # e.g. a kernel that fails to compile here: never picked
            log.warning("lowrank kernel %r failed for %s and is not used for it: %s: %s", name, key,
                        type(exc).__name__, exc)
    if not times:
        raise RuntimeError(f"every lowrank kernel failed for {key}")
    if _DEFAULT in times:  # timing noise must not flip a near-tie away from the default
        times[_DEFAULT] *= MARGIN
    choice = min(times, key=times.__getitem__)
    log.debug("lowrank kernel for %s: %s (%s)", key, choice,
              ", ".join(f"{n} {t * 1e6:.1f} us" for n, t in times.items()))
    _CHOICES[key] = choice
    return choice


def chosen(key: Hashable) -> str:
    """The choice made for `key`, or the default when it was never timed: what a traced graph
    holds, since fake tensors cannot be timed."""
    return _CHOICES.get(key, _DEFAULT)


def cuda_time(fn: Callable[[], object], calls: int = 10, rounds: int = 5) -> float:
    """Median seconds per call over `rounds` bursts of `calls` back-to-back calls, with CUDA
    events: a host-bound call counts its launch overhead, as it does for eager users."""
    fn()  # warm-up: compiles and autotunes the Triton kernel
    torch.cuda.synchronize()
    samples = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(samples)


def clear() -> None:
    """Forget every choice (e.g. after a driver or library update within the process)."""
    _CHOICES.clear()
