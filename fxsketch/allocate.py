"""Rank allocation: the plan with the least total output error that fits a FLOP/parameter budget.

Each layer's error-versus-rank curve comes for free from its cached decomposition on the
calibration statistics (no evaluation of the model), so allocation is instant even for large
models. The search then starts from this plan.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from fxsketch.calibrate import calibrate
from fxsketch.capture import as_inputs, capture, find_layers, other_modules
from fxsketch.records import LayerRecord
from fxsketch.replacements import FactorCache, dense_cost, get_kind
from fxsketch.spec import load_spec

__all__ = ["allocate", "Budget", "Choice"]

log = logging.getLogger(__name__)

ALLOCATABLE = ("svd", "whitened_svd")


@dataclass(frozen=True)
class Budget:
    """Hard limits on the selected layers: FLOPs and parameters, absolute or as a fraction of dense.

    A float in (0, 1] is a fraction of the selected layers' dense cost; an int is absolute.
    """

    flops: float | int | None = None
    params: float | int | None = None

    def limits(self, dense_flops: int, dense_params: int) -> tuple[float, float]:
        return (_limit(self.flops, dense_flops, "the FLOP budget (budget=/max_flops=)"),
                _limit(self.params, dense_params, "the parameter budget (max_params=)"))


def _limit(value: float | int | None, dense: int, what: str) -> float:
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a positive fraction (<= 1) or an absolute count, got {value!r}")
    if not value > 0:  # also refuses NaN
        raise ValueError(f"{what} must be a positive fraction (<= 1) or an absolute count, got {value!r}")
    return float(value) * dense if isinstance(value, float) and value <= 1 else float(value)


@dataclass(frozen=True)
class Choice:
    """One candidate for one tuning unit: its plan entry, error and cost."""

    entry: dict[str, Any] | None  # None keeps the layers dense
    error: float
    flops: int
    params: int


def unit_choices(unit, records: dict[str, LayerRecord], cache: FactorCache, weights) -> list[Choice]:
    """Every rank of the unit's space (and dense), with the summed relative output error."""
    method = unit.space["method"].first() if "method" in unit.space else unit.method
    if method not in ALLOCATABLE:
        raise ValueError(f"allocation needs a factorization with an error curve ({', '.join(ALLOCATABLE)}); "
                         f"{unit.key} searches {method!r}")
    ranks = [r for r in unit.space["low_rank"].values() if r >= 1]
    kind = get_kind(method)
    errors = [0.0] * len(ranks)
    for name in unit.layers:
        matrix = records[name].weight_matrix(weights[name])
        for i, e in enumerate(cache.output_errors(name, method, matrix, ranks)):
            errors[i] += e
    choices = [Choice(None, 0.0, *_cost(records, unit.layers, None))]
    for rank, error in zip(ranks, errors):
        entry = {"method": method, "low_rank": rank}
        if all(not kind.invalid(records[n], {"low_rank": rank}) for n in unit.layers):
            choices.append(Choice(entry, error, *_cost(records, unit.layers, entry)))
    return choices


def _cost(records, layers, entry) -> tuple[int, int]:
    flops = params = 0
    for name in layers:
        r = records[name]
        cost = dense_cost(r) if entry is None else get_kind(entry["method"]).cost(r, entry)
        flops += cost.flops_per_token * r.tokens
        params += cost.params
    return flops, params


def solve(options: Sequence[Sequence[Choice]], max_flops: float, max_params: float) -> list[Choice]:
    """Greedy multiple-choice knapsack: start from each unit's cheapest choice, then take the upgrade
    with the most error removed per FLOP added while the budget holds."""
    picked = [min(opts, key=lambda c: (c.flops, c.error)) for opts in options]
    flops, params = sum(c.flops for c in picked), sum(c.params for c in picked)
    if flops > max_flops or params > max_params:
        raise ValueError(f"the budget is below the cheapest plan ({flops:,} FLOPs, {params:,} params): "
                         "raise it or select fewer layers")
    while True:
        best = None
        for i, opts in enumerate(options):
            cur = picked[i]
            for c in opts:
                gain, extra = cur.error - c.error, c.flops - cur.flops
                if gain <= 0 or flops + extra > max_flops or params + c.params - cur.params > max_params:
                    continue
                ratio = gain / max(extra, 1)
                if best is None or ratio > best[0]:
                    best = (ratio, i, c)
        if best is None:
            return picked
        _, i, c = best
        flops += c.flops - picked[i].flops
        params += c.params - picked[i].params
        picked[i] = c


def allocate(
    model: nn.Module,
    spec: Any,
    calibration_data: Iterable[Any],
    *,
    budget: float | int = 0.5,
    max_params: float | int | None = None,
    example_inputs: Any = None,
    method: str = "whitened_svd",
) -> dict[str, dict[str, Any]]:
    """The plan with the least total normalized output error under a FLOP (and parameter) budget.

    Args:
        model: the model (never modified).
        spec: which layers and ranks (as for `optimize`; "auto" ranks work well).
        calibration_data: an iterable of input batches, used for the per-layer statistics.
        budget: FLOPs of the selected layers, as a fraction of dense (float ≤ 1) or absolute.
        max_params: parameters of the selected layers, as a fraction or absolute.
        example_inputs: inputs for capture (default: the first calibration batch).
        method: "whitened_svd" (default) or "svd", when a config names no method.

    Returns:
        `{qualified_name: {"method": ..., "low_rank": R}}`; layers best left dense are omitted.
    """
    from fxsketch.search import resolve_units

    batches = list(_batches(calibration_data))
    if not batches:
        raise ValueError("calibration_data is empty: pass an iterable of input batches")
    inputs = as_inputs(example_inputs if example_inputs is not None else batches[0])
    gm = capture(model, inputs)
    records = find_layers(gm)
    units = resolve_units(records, load_spec(spec), other_modules(gm, records), method)
    by_name = {r.name: r for r in records}
    for unit in units:
        _check_ranks(unit, by_name)
    cache = FactorCache(calibrate(gm, batches, records))
    return allocate_units(units, {r.name: r for r in records}, cache, _weights(gm, records),
                          Budget(budget, max_params))


def _batches(calibration_data: Any) -> Iterable[Any]:
    """`iter(calibration_data)`, with an error that says what calibration data is."""
    try:
        if isinstance(calibration_data, (str, bytes)):
            raise TypeError
        return iter(calibration_data)
    except TypeError:
        raise TypeError(f"calibration_data must be an iterable of input batches (tensors or tuples of "
                        f"positional inputs), got {type(calibration_data).__name__}") from None


def _check_ranks(unit, records: dict[str, LayerRecord]) -> None:
    """Refuse a unit none of whose ranks can be built: it could only stay dense, which the budget
    error that would follow would not explain."""
    if "low_rank" not in unit.space or unit.space["low_rank"].values() is None:
        return
    ranks = unit.space["low_rank"].values()
    svd = get_kind("svd")
    if any(not svd.invalid(records[n], {"low_rank": r}) for r in ranks for n in unit.layers):
        return
    full = min(min(records[n].out_features, records[n].in_features) for n in unit.layers)
    shown = str(ranks) if len(ranks) <= 10 else f"[{ranks[0]}, {ranks[1]}, ..., {ranks[-1]}]"
    raise ValueError(f"{unit.key}: none of the ranks {shown} can be built: low_rank must be an integer in "
                     f"[1, {full}] for {', '.join(unit.layers)}")


def _weights(gm, records):
    from fxsketch.rewrite import _fetch

    return {r.name: _fetch(gm, r.weight_target) for r in records}


def allocate_units(units, records, cache, weights, budget: Budget) -> dict[str, dict[str, Any]]:
    """`allocate` on already-resolved units (used by `optimize` for its warm start)."""
    options = [unit_choices(u, records, cache, weights) for u in units]
    dense_flops = sum(o[0].flops for o in options)
    dense_params = sum(o[0].params for o in options)
    max_flops, max_params = budget.limits(dense_flops, dense_params)
    picked = solve(options, max_flops, max_params)
    plan = {}
    for unit, choice in zip(units, picked):
        if choice.entry is not None:
            plan.update({name: dict(choice.entry) for name in unit.layers})
    log.info("allocation: %d of %d units factored, %.1f%% of the dense FLOPs, total error %.4f",
             len(plan), len(units), 100 * sum(c.flops for c in picked) / max(dense_flops, 1),
             sum(c.error for c in picked))
    return plan


def target_error_units(units, records, cache, weights, tolerance: float) -> dict[str, dict[str, Any]]:
    """Per unit, the cheapest rank whose relative output error stays under `tolerance` per layer
    (units that cannot reach it stay dense): the plan that spends FLOPs only where they matter."""
    plan = {}
    for unit in units:
        fit = [c for c in unit_choices(unit, records, cache, weights)
               if c.entry is not None and c.error <= tolerance * len(unit.layers)]
        if fit:
            best = min(fit, key=lambda c: c.flops)
            plan.update({name: dict(best.entry) for name in unit.layers})
    return plan
