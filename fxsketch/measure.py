"""Measurements: latency of a module on example inputs, and the exact cost of a plan."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fxsketch.records import LayerRecord
from fxsketch.replacements import dense_cost, get_kind

__all__ = ["compare_latency", "measure_latency", "plan_cost", "layer_cost"]


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
