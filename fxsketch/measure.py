"""Measurements: latency of a module on example inputs, and the exact cost of a plan."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxsketch.records import LayerRecord
from fxsketch.rewrite import _fetch
from fxsketch.replacements import dense_cost, get_kind

__all__ = ["compare_latency", "measure_latency", "plan_cost", "layer_cost", "LayerTimer"]


def measure_latency(
    module: nn.Module, inputs: tuple, *, warmup: int = 3, min_repeats: int = 5, budget_s: float = 0.25
) -> float:
    """Median seconds per call of `module(*inputs)` under `torch.no_grad()`.

    Repeats until `budget_s` has passed (at least `min_repeats` times) so small and large models
    both get a stable median; CUDA work is synchronized before each clock read.
    """
    return compare_latency([module], inputs, warmup=warmup, min_repeats=min_repeats, budget_s=budget_s)[0]


def compare_latency(
    modules: list[nn.Module], inputs: tuple, *, warmup: int = 3, min_repeats: int = 5, budget_s: float = 0.25
) -> list[float]:
    """Median seconds per call of each module, measured in interleaved rounds.

    Alternating the modules call by call exposes them all to the same machine noise (other
    processes, frequency changes), so their ratio is steadier than two separate measurements.
    """
    cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times: list[list[float]] = [[] for _ in modules]
    with torch.no_grad():
        for _ in range(warmup):
            for m in modules:
                m(*inputs)
        sync()
        start = time.perf_counter()
        while len(times[0]) < min_repeats or time.perf_counter() - start < budget_s * len(modules):
            for m, bucket in zip(modules, times):
                t0 = time.perf_counter()
                m(*inputs)
                sync()
                bucket.append(time.perf_counter() - t0)
            if len(times[0]) >= 10_000:
                break
    return [statistics.median(t) for t in times]


def layer_cost(record: LayerRecord, entry: Mapping[str, Any] | None):
    """The cost of `record` under a plan entry (dense when the entry is None or not applicable)."""
    if entry is None or record.unsupported:
        return dense_cost(record)
    kind = get_kind(entry["method"])
    params = {**kind.defaults, **{k: v for k, v in entry.items() if k != "method"}}
    return kind.cost(record, params)


def plan_cost(records: list[LayerRecord], plan: Mapping[str, Mapping[str, Any]]) -> tuple[int, int]:
    """(parameters, FLOPs per forward on the example inputs) over every matchable layer."""
    params = flops = 0
    for record in records:
        cost = layer_cost(record, plan.get(record.name))
        params += cost.params
        flops += cost.flops_per_token * record.tokens
    return params, flops


class LayerTimer:
    """Speedups of plans estimated from per-layer timings, for the search's trials.

    Every time here is the fastest of a few calls: the least disturbed by other processes, so the
    model's and its layers' times, taken at different moments, stay comparable (medians under
    changing load are not: the dense layers could add up to more than the model). The dense model
    is timed once (on first use), and so is each dense layer shape. Each
    replacement is timed alone on an input of its layer's real shape and cached by geometry and
    values: a replacement's time does not depend on its weights, so layers of one shape share a
    measurement and a repeated value is never timed again. A plan then runs in about
    T − Σ (dense layer − replacement) seconds, T being the dense model's time, and its speedup is
    T over that. A trial thus times only the layer shapes and values no earlier trial timed, never
    the whole model; `optimize` still times the plan it returns on the whole model, interleaved
    with the dense one.
    """

    def __init__(self, gm: nn.Module, records: Mapping[str, LayerRecord], inputs: tuple, cache: Any = None, *,
                 repeats: int = 3, dense_repeats: int = 5, model_budget_s: float = 0.0) -> None:
        self.gm, self.records, self.inputs, self.cache = gm, records, inputs, cache
        self.repeats, self.dense_repeats, self.model_budget_s = repeats, dense_repeats, model_budget_s
        self._model: float | None = None
        self._dense: dict[Any, float] = {}  # dense layer geometry -> seconds
        self._saved: dict[Any, float | None] = {}  # replacement key -> dense − replacement seconds (None: cannot time)
        self.timed = 0  # replacements timed so far

    def model_seconds(self) -> float:
        """Seconds per forward of the dense model (measured once)."""
        if self._model is None:
            self._model = fastest(self.gm, self.inputs, warmup=1, repeats=self.dense_repeats,
                                  budget_s=self.model_budget_s)
        return self._model

    def speedup(self, plan: Mapping[str, Mapping[str, Any]]) -> float | None:
        """The estimated speedup of `plan` over the dense model (None: some layer cannot be timed
        alone, e.g. its input shape is unknown; time the whole model instead)."""
        saved = 0.0
        for name, entry in plan.items():
            record = self.records.get(name)
            if record is None or record.unsupported or entry.get("method", "dense") == "dense":
                continue
            one = self._layer(record, entry)
            if one is None:
                return None
            saved += one
        total = self.model_seconds()
        return total / max(total - saved, 0.02 * total)

    def _layer(self, record: LayerRecord, entry: Mapping[str, Any]) -> float | None:
        kind = get_kind(entry["method"])
        params = {**kind.defaults, **{k: v for k, v in entry.items() if k != "method"}}
        shapes = [_input_meta(n) for n in record.nodes]
        if not shapes or any(m is None for m in shapes):
            return None
        geometry = (record.op_type, tuple(record.weight_shape), record.transposed, record.bias_target is not None,
                    repr(sorted(record.conv.items())))
        key = (kind.name, repr(sorted(params.items())), geometry, tuple(shapes))
        if key not in self._saved:
            self._saved[key] = self._time(record, kind, params, geometry, shapes)
        return self._saved[key]

    def _time(self, record: LayerRecord, kind, params: dict[str, Any], geometry, shapes: list) -> float | None:
        weight = _fetch(self.gm, record.weight_target).detach()
        bias = _fetch(self.gm, record.bias_target).detach() if record.bias_target else None
        matrix = weight.T if record.transposed else weight
        try:
            module = kind.build(record, matrix, bias, params, self.cache, copy_weights=False)
        except Exception:  # a kind that cannot build without weights: the caller times the model
            return None
        if module is None:
            return 0.0
        replacement = _replacement_call(module.to(weight.device).eval())
        saved = 0.0
        for shape, dtype in shapes:
            x = torch.randn(shape, dtype=dtype, device=weight.device)
            slot = (geometry, shape, dtype)
            if slot not in self._dense:
                self._dense[slot] = fastest(_dense_call(record, matrix, bias), (x,), warmup=1,
                                            repeats=self.dense_repeats)
            saved += self._dense[slot] - fastest(replacement, (x,), warmup=1, repeats=self.repeats)
        self.timed += 1
        return saved


def fastest(fn: Callable, inputs: tuple, *, warmup: int = 1, repeats: int = 3, budget_s: float = 0.0) -> float:
    """The fastest of `repeats` timed calls of `fn(*inputs)` under `torch.no_grad()` (more while
    `budget_s` has not passed), after `warmup` untimed ones; CUDA work is synchronized."""
    cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    best, n = math.inf, 0
    with torch.no_grad():
        for _ in range(warmup):
            fn(*inputs)
        sync()
        start = time.perf_counter()
        while n < repeats or (time.perf_counter() - start < budget_s and n < 10_000):
            t0 = time.perf_counter()
            fn(*inputs)
            sync()
            best = min(best, time.perf_counter() - t0)
            n += 1
    return best


def _input_meta(node: torch.fx.Node) -> tuple[tuple[int, ...], torch.dtype] | None:
    """(shape, dtype) of the activations a layer node reads, from the capture's shape propagation."""
    from fxsketch.capture import input_of

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


def _replacement_call(module: nn.Module) -> Callable:
    """How the rewritten graph calls `module` (plain low-rank layers as a direct op call)."""
    from fxsketch.kernels import lowrank_conv2d, lowrank_linear
    from fxsketch.nn import LowRankConv2d, LowRankLinear

    if type(module) is LowRankLinear:
        return lambda x: lowrank_linear(x, module.B, module.A, module.bias)
    if type(module) is LowRankConv2d:
        return lambda x: lowrank_conv2d(x, module.B, module.A, module.bias, module.stride, module.padding,
                                        module.dilation)
    return module
