"""Measurements: honest timings (warmed up, interleaved rounds, disturbed rounds set aside, a spread
beside every median), the physical bound of a speedup, and the exact cost of a plan."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxsketch.capture import input_of
from fxsketch.fuse import activation_of, fusable, mlp_pairs
from fxsketch.kernels import int8_mlp
from fxsketch.kernels.int8 import ACTIVATIONS
from fxsketch.nn import direct_call
from fxsketch.plan import Entry, is_dense, speed_bound
from fxsketch.records import LayerRecord, fetch

__all__ = ["Rounds", "Speedup", "compare_latency", "measure_latency", "measure_speedup", "time_rounds", "LayerTimer"]

TOLERANCE = 0.05  # a figure is stable once its interquartile range lies within ±5% of its median
BUSY = 0.05  # a round is disturbed when the process's threads waited for a CPU this share of its time


@dataclass(frozen=True)
class Speedup:
    """A measured speedup: the median over interleaved rounds of baseline time / candidate time.

    Attributes:
        median: the reported figure (> 1: the candidate is faster).
        low / high: the first and third quartiles of the per-round ratios (the spread).
        rounds: how many rounds the figure comes from.
        stable: the spread lies within ±5% of the median, over at least the minimum number of
            rounds the machine left alone.
        busy: the share of rounds during which this process's threads waited for a CPU (other
            processes held the cores): they are set aside, and when too few rounds are left the
            figure comes from all rounds and is not stable.
        baseline_s / candidate_s: median seconds per call of each side.
        bound: the physical bound of the speedup (max of the FLOP and byte ratios of the replaced
            layers), when known.
        suspect: the figure stayed above `bound` by more than its spread after a re-measurement.
    """

    median: float
    low: float
    high: float
    rounds: int
    stable: bool
    baseline_s: float
    candidate_s: float
    busy: float = 0.0
    bound: float | None = None
    suspect: bool = False

    @property
    def reliable(self) -> bool:
        """Stable (enough undisturbed rounds, a narrow spread) and within its physical bound."""
        return self.stable and not self.suspect

    @property
    def slower(self) -> bool:
        """Slower than the baseline beyond the noise: the whole spread lies below 1."""
        return self.high < 1.0

    @property
    def faster(self) -> bool:
        """Faster than the baseline beyond the noise: the whole spread lies above 1."""
        return self.low > 1.0

    def describe(self) -> str:
        """`1.84x faster than dense (IQR 1.80-1.88 over 9 interleaved rounds)`, naming a figure that is
        slower, within the noise of dense, unstable or suspect as such."""
        if self.faster:
            head = f"{self.median:.2f}x faster than dense"
        elif self.slower:
            head = f"{self.median:.2f}x the speed of dense: SLOWER than dense"
        else:
            head = f"{self.median:.2f}x the speed of dense: no faster than dense within the noise"
        spread = f"IQR {self.low:.2f}-{self.high:.2f} over {self.rounds} interleaved rounds"
        notes = []
        if not self.stable:
            why = (f"other processes held the CPUs in {100 * self.busy:.0f}% of the rounds" if self.busy >= 0.5
                   else "the spread stayed wider than ±5%")
            notes.append(f"unstable, an unreliable figure: {why}; measure again on a quiet machine")
        if self.suspect:
            notes.append(f"suspect: above the replaced layers' bound of {self.bound:.2f}x (FLOP/byte ratio) "
                         "after re-measuring")
        return f"{head} ({spread})" + "".join(f"; {n}" for n in notes)


@dataclass(frozen=True)
class Rounds:
    """What `time_rounds` measured: `times[fn][round]` in seconds, whether the figure settled
    (`stable`), and the share of rounds disturbed by other processes (`busy`)."""

    times: list[list[float]]
    stable: bool
    busy: float

    def median(self, i: int = 0) -> float:
        return statistics.median(self.times[i])

    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.times[0], self.times[1])]


def time_rounds(fns: Sequence[Callable], inputs: tuple, *, tolerance: float = TOLERANCE, min_rounds: int = 5,
                cap_s: float = 2.0) -> Rounds:
    """Seconds per call of each of `fns`, after warm-up, in interleaved rounds.

    Every function is first warmed up (until its calls stop getting faster). A round then calls
    the functions in turn, about 10 ms of calls each (their order alternating round by round), and
    keeps each one's mean time per call: the steady-state speed a caller gets. A round during which
    this process's threads waited for a CPU (Linux scheduler statistics) is set aside: on a machine
    shared with busy processes, multi-threaded ops stall unevenly and the times say nothing about
    the model. Rounds go on until, after `min_rounds` undisturbed ones, the interquartile range of
    the first two functions' time ratio (of the first one's time, for one function) lies within
    ±`tolerance` of its median, or `cap_s` seconds pass (never before `min_rounds` rounds); then,
    with too few undisturbed rounds, all rounds are used and the figure is not stable. CUDA work is
    synchronized before each clock read.
    """
    cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(fn: Callable) -> float:
        t0 = time.perf_counter()
        fn(*inputs)
        sync()
        return time.perf_counter() - t0

    def settled(rows: list[list[float]]) -> bool:
        series = [a / b for a, b in zip(rows[0], rows[1])] if len(rows) > 1 else rows[0]
        low, mid, high = _quartiles(series)
        return mid * (1 - tolerance) <= low and high <= mid * (1 + tolerance)

    start = time.perf_counter()
    clean: list[list[float]] = [[] for _ in fns]
    every: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        per_call = [_warm_up(timed, fn, start + cap_s / 3) for fn in fns]
        calls = max(1, min(50, math.ceil(0.01 / max(sum(per_call), 1e-9))))  # ~10 ms of work per round
        while True:
            order = list(range(len(fns)))
            if len(every[0]) % 2:
                order.reverse()
            spent = [0.0] * len(fns)
            wall, waited = time.perf_counter(), _cpu_wait()
            for _ in range(calls):
                for i in order:
                    spent[i] += timed(fns[i])
            disturbed = _cpu_wait() - waited > BUSY * (time.perf_counter() - wall)
            for i, total in enumerate(spent):
                every[i].append(total / calls)
                if not disturbed:
                    clean[i].append(total / calls)
            stable = len(clean[0]) >= min_rounds and settled(clean)
            capped = len(every[0]) >= min_rounds and time.perf_counter() - start > cap_s
            if stable or capped or len(every[0]) >= 10_000:
                break
    busy = 1 - len(clean[0]) / len(every[0])
    if len(clean[0]) >= min_rounds:
        return Rounds(clean, stable, busy)
    return Rounds(every, False, busy)


def _cpu_wait() -> float:
    """Seconds this process's threads have spent runnable but waiting for a CPU, from Linux's
    scheduler statistics (0.0 where they cannot be read)."""
    total = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):  # a thread that ended, or no schedstat
            continue
    return total * 1e-9


def _warm_up(timed: Callable[[Callable], float], fn: Callable, deadline: float) -> float:
    """Call `fn` until it stops getting faster: from the third call on, until a call is no more than
    5% faster than the best before it (at most 20 calls, or until `deadline`); its last time."""
    best = math.inf
    for n in range(20):
        t = timed(fn)
        if n >= 2 and (t >= 0.95 * best or time.perf_counter() > deadline):
            return t
        best = min(best, t)
    return t


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def measure_speedup(baseline: Callable, candidate: Callable, inputs: tuple, *, bound: float | None = None,
                    tolerance: float = TOLERANCE, min_rounds: int = 5, cap_s: float = 3.0) -> Speedup:
    """How much faster `candidate(*inputs)` runs than `baseline(*inputs)`, timed interleaved (`time_rounds`).

    With `bound` (the most the replaced work allows, `speed_bound`), a figure whose whole spread
    lies above the bound is measured once more with twice the time; if it is still above, the
    result is marked suspect rather than trusted.
    """
    result = _ratio(baseline, candidate, inputs, bound, tolerance, min_rounds, cap_s)
    if bound is not None and result.low > bound:
        result = _ratio(baseline, candidate, inputs, bound, tolerance, 2 * min_rounds, 2 * cap_s)
        if result.low > bound:
            result = replace(result, suspect=True)
    return result


def _ratio(baseline, candidate, inputs, bound, tolerance, min_rounds, cap_s) -> Speedup:
    rounds = time_rounds([baseline, candidate], inputs, tolerance=tolerance, min_rounds=min_rounds, cap_s=cap_s)
    low, mid, high = _quartiles(rounds.ratios())
    return Speedup(mid, low, high, len(rounds.times[0]), rounds.stable, rounds.median(0), rounds.median(1),
                   rounds.busy, bound)


def measure_latency(module: nn.Module, inputs: tuple, *, cap_s: float = 1.0) -> float:
    """Median seconds per call of `module(*inputs)` under `torch.no_grad()`, after warm-up, in rounds
    until its spread is within ±5% or `cap_s` passes (`time_rounds`)."""
    return time_rounds([module], inputs, cap_s=cap_s).median()


def compare_latency(modules: list[nn.Module], inputs: tuple, *, cap_s: float = 2.0) -> list[float]:
    """Median seconds per call of each module, measured in interleaved rounds (`time_rounds`).

    Alternating the modules exposes them all to the same machine noise (other processes,
    frequency changes), so their ratio is steadier than separate measurements.
    """
    rounds = time_rounds(modules, inputs, cap_s=cap_s)
    return [rounds.median(i) for i in range(len(modules))]


class LayerTimer:
    """Speedups of plans estimated from per-layer timings, for the search's trials.

    The dense model is timed once (`measure_latency`). Each replacement is timed interleaved
    with its own dense layer (`time_rounds`), alone on an input of the layer's real shape, and
    cached by geometry and values: its time does not depend on its weights, so layers of one
    shape share a measurement and a repeated value is never timed again. What a measurement
    keeps is the ratio of the two interleaved times; every replacement of one geometry is scaled
    to that geometry's first dense time, so that the noise of separate measurements cannot make a
    faster replacement save less. A plan then runs in about T − Σ (dense layer − replacement) − F
    seconds, T being the dense model's time and F what its fused int8 pairs save
    (`fusion_saving`), and its estimated speedup is T over that, never more than the plan's
    `speed_bound`. Trials use these estimates; `optimize` times the plan it
    returns on the whole model (`measure_speedup`).
    """

    def __init__(self, gm: nn.Module, records: Mapping[str, LayerRecord], inputs: tuple, cache: Any = None, *,
                 layer_cap_s: float = 0.3, model_cap_s: float = 1.0) -> None:
        self.gm, self.records, self.inputs, self.cache = gm, records, inputs, cache
        self.layer_cap_s, self.model_cap_s = layer_cap_s, model_cap_s
        self._model: float | None = None
        # replacement key -> its time over its interleaved dense layer's (None: cannot time)
        self._ratios: dict[Any, float | None] = {}
        self._dense: dict[Any, float] = {}  # geometry and input shapes -> the dense layer's seconds per forward
        self._pairs: dict[str, str] | None = None  # fusable layer pairs (`fxsketch.fuse.mlp_pairs`)
        self._fusions: dict[Any, float | None] = {}  # pair geometry and entries -> seconds the fused op saves
        self.timed = 0  # replacements timed so far

    def model_seconds(self) -> float:
        """Seconds per forward of the dense model (measured once)."""
        if self._model is None:
            self._model = measure_latency(self.gm, self.inputs, cap_s=self.model_cap_s)
        return self._model

    def speedup(self, plan: Mapping[str, Mapping[str, Any]]) -> float | None:
        """The estimated speedup of `plan` over the dense model (None: some layer cannot be timed
        alone, e.g. its input shape is unknown; time the whole model instead)."""
        saved = 0.0
        for name, entry in plan.items():
            if is_dense(entry):
                continue
            one = self.saving(name, entry)
            if one is None:
                return None
            saved += one
        saved += self.fusion_saving(plan)
        total = self.model_seconds()
        bound = speed_bound(list(self.records.values()), plan)
        return total / max(total - saved, total / bound)

    def fusion_saving(self, plan: Mapping[str, Mapping[str, Any]]) -> float:
        """Seconds per forward that running `plan`'s fusable int8 pairs as one op (`fxsketch.fuse`)
        saves beyond the per-layer savings: each pair's two layers and activation timed apart
        against the fused op, interleaved, once per geometry and values (0 for a pair that cannot
        be timed alone)."""
        if self._pairs is None:
            self._pairs = mlp_pairs(self.records.values())
        saved = 0.0
        smoothing = self.cache is not None and self.cache.smooth
        for second, first in self._pairs.items():
            entries = plan.get(first), plan.get(second)
            if entries[0] is not None and entries[1] is not None and fusable(*entries, smoothing):
                saved += self._fused(self.records[first], self.records[second], *entries) or 0.0
        return saved

    def _fused(self, first: LayerRecord, second: LayerRecord, a: Mapping[str, Any],
               b: Mapping[str, Any]) -> float | None:
        shape = _input_meta(first.nodes[0])
        activation = activation_of(input_of(second.nodes[0]))
        key = (tuple(first.weight_shape), tuple(second.weight_shape), shape, activation,
               repr(sorted(a.items())), repr(sorted(b.items())))
        if key not in self._fusions:
            self._fusions[key] = None if shape is None else self._time_fusion(first, second, a, b, activation, shape)
        return self._fusions[key]

    def _time_fusion(self, first, second, a, b, activation, shape) -> float | None:
        """Seconds the fused op saves against the pair run apart, timed interleaved on a random input."""
        layers = []
        for record, entry in ((first, a), (second, b)):
            resolved = Entry.of(entry, record.name)
            matrix, bias = self._weights(record)
            try:
                module = resolved.kind.build(record, matrix, bias, resolved.params, self.cache, copy_weights=False)
            except Exception:  # cannot build without weights: no saving claimed
                return None
            layers.append(module.to(matrix.device).eval())
        one, two = layers
        act, run_one, run_two = ACTIVATIONS[activation][0], direct_call(one), direct_call(two)

        def apart(x):
            return run_two(act(run_one(x)))

        def fused(x):
            return int8_mlp(x, one.weight_q, one.weight_scale, one.bias, one.input_scale, activation, two.weight_q,
                            two.weight_scale, two.bias, two.input_qparams)

        x = torch.randn(shape[0], dtype=shape[1], device=one.weight_q.device)
        rounds = time_rounds([apart, fused], (x,), cap_s=self.layer_cap_s)
        self.timed += 1
        return rounds.median(0) - rounds.median(1)

    def saving(self, name: str, entry: Mapping[str, Any]) -> float | None:
        """Seconds per forward that `entry` saves on layer `name` (negative: it is slower than the
        dense layer; None: it cannot be timed alone)."""
        record = self.records.get(name)
        if record is None or record.unsupported or is_dense(entry):
            return 0.0
        times = self._timed(record, entry)
        return None if times is None else times[0] - times[1]

    def seconds(self, name: str, entry: Mapping[str, Any] | None) -> float | None:
        """Seconds per forward of layer `name` built as `entry` (None or dense: the dense layer),
        on the same scale as `saving`; None when it cannot be timed alone."""
        record = self.records.get(name)
        if record is None or record.unsupported:
            return None
        times = self._timed(record, {"method": "dense"} if entry is None else entry)
        return None if times is None else times[1]

    def _timed(self, record: LayerRecord, entry: Mapping[str, Any]) -> tuple[float, float] | None:
        """(dense seconds, `entry`'s seconds) of `record` per forward, both on its geometry's
        dense reference (None: it cannot be timed alone)."""
        shapes = [_input_meta(n) for n in record.nodes]
        if not shapes or any(m is None for m in shapes):
            return None
        geometry = (record.op_type, tuple(record.weight_shape), record.transposed, record.bias_target is not None,
                    repr(sorted(record.conv.items())), tuple(shapes))
        if is_dense(entry):
            if geometry not in self._dense:
                self._dense[geometry] = self._time(record, None, {}, shapes)[0]
            return self._dense[geometry], self._dense[geometry]
        resolved = Entry.of(entry, record.name)
        key = (resolved.kind.name, repr(sorted(resolved.params.items())), geometry)
        if key not in self._ratios:
            times = self._time(record, resolved.kind, resolved.params, shapes)
            if times is not None:
                self._dense.setdefault(geometry, times[0])
            self._ratios[key] = None if times is None else times[1] / times[0]
        ratio = self._ratios[key]
        return None if ratio is None else (self._dense[geometry], ratio * self._dense[geometry])

    def _weights(self, record: LayerRecord) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's weight as (out × in …) and its bias, as the captured graph holds them."""
        weight = fetch(self.gm, record.weight_target).detach()
        bias = fetch(self.gm, record.bias_target).detach() if record.bias_target else None
        return (weight.T if record.transposed else weight), bias

    def _time(self, record: LayerRecord, kind, params: dict[str, Any], shapes: list) -> tuple[float, float] | None:
        """(dense, replacement) seconds per forward of `record`, timed interleaved on random inputs
        of its shapes (`kind` None: the dense layer alone, both figures its time); None when the
        kind cannot build without weights."""
        matrix, bias = self._weights(record)
        dense_call = _dense_call(record, matrix, bias)
        if kind is None:
            replacement = dense_call
        else:
            try:
                module = kind.build(record, matrix, bias, params, self.cache, copy_weights=False)
            except Exception:  # a kind that cannot build without weights: the caller times the model
                return None
            replacement = dense_call if module is None else direct_call(module.to(matrix.device).eval())
        dense = ours = 0.0
        for shape, dtype in shapes:
            x = torch.randn(shape, dtype=dtype, device=matrix.device)
            fns = [dense_call] if kind is None else [dense_call, replacement]
            rounds = time_rounds(fns, (x,), cap_s=self.layer_cap_s)
            dense += rounds.median(0)
            ours += rounds.median(len(fns) - 1)
        self.timed += kind is not None
        return dense, ours


def _input_meta(node: torch.fx.Node) -> tuple[tuple[int, ...], torch.dtype] | None:
    """(shape, dtype) of the activations a layer node reads, from the capture's shape propagation."""
    try:
        x = input_of(node)
    except Exception:
        return None
    meta = getattr(x, "meta", {}).get("tensor_meta") if isinstance(x, torch.fx.Node) else None
    shape = getattr(meta, "shape", None)
    if shape is None or not all(isinstance(d, int) for d in shape) or not math.prod(shape):
        return None
    return tuple(shape), meta.dtype


def _dense_call(record: LayerRecord, matrix: torch.Tensor, bias: torch.Tensor | None) -> Callable:
    if record.op_type == "Linear":
        return lambda x: F.linear(x, matrix, bias)
    g = record.conv
    return lambda x: F.conv2d(x, matrix, bias, g["stride"], g["padding"], g["dilation"], g.get("groups", 1))
