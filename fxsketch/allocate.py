"""Rank allocation: the plan with the least total output error that fits a FLOP/parameter budget.

Each layer's error-versus-rank curve comes for free from its cached decomposition on the
calibration statistics (no evaluation of the model), so allocation is instant even for large
models. The search then starts from this plan.

Relative output errors of different layers are not worth the same to the model: a small error in
a layer whose outputs the rest of the network amplifies costs more than a large one in a layer it
forgives. `sensitivity=` weighs each unit's curve by a measured end-to-end effect: every unit is
replaced alone, at the rank the budget would give it uniformly, and the model's loss of accuracy
(or its output error) divided by that unit's relative error becomes the unit's weight. That costs
one model evaluation per unit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from torch import nn

from fxsketch.calibrate import calibrate, iterate_batches, mask_fn
from fxsketch.capture import as_inputs, capture, find_layers, other_modules
from fxsketch.plan import Budget, plan_cost
from fxsketch.records import LayerRecord, fetch, statistics_dtype
from fxsketch.replacements import FactorCache, get_kind
from fxsketch.spec import load_spec
from fxsketch.units import resolve_units
from fxsketch.recover import float_tensors
from fxsketch.rewrite import apply_plan

__all__ = ["allocate", "Budget", "Choice"]

log = logging.getLogger(__name__)

ALLOCATABLE = ("svd", "whitened_svd")


@dataclass(frozen=True)
class Choice:
    """One candidate for one tuning unit: its plan entry, error and cost."""

    entry: dict[str, Any] | None  # None keeps the layers dense
    error: float
    flops: int
    params: int


def layer_errors(cache: FactorCache, record: LayerRecord, method: str, weight: torch.Tensor, ranks: list[int]
                 ) -> list[float]:
    """The relative output error of `record`'s `method` build at each rank, on the cached statistics:
    of the build `apply_plan` makes (a whitened build with a bias fits around the input mean)."""
    centered = method == "whitened_svd" and cache.centers(record.name, bool(record.bias_target))
    return cache.output_errors(record.name, method, record.weight_matrix(weight), ranks, centered=centered)


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
        for i, e in enumerate(layer_errors(cache, records[name], method, weights[name], ranks)):
            errors[i] += e
    choices = [Choice(None, 0.0, *_cost(records, unit.layers, None))]
    for rank, error in zip(ranks, errors):
        entry = {"method": method, "low_rank": rank}
        if all(not kind.invalid(records[n], {"low_rank": rank}) for n in unit.layers):
            choices.append(Choice(entry, error, *_cost(records, unit.layers, entry)))
    return choices


def _cost(records, layers, entry) -> tuple[int, int]:
    cost = plan_cost([records[n] for n in layers], {} if entry is None else {n: entry for n in layers})
    return cost.flops, cost.params


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
    sensitivity: Any = None,
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
        sensitivity: how much each unit's relative output error is worth.
            None (default): the same for every unit (no model evaluation; deterministic).
            "output": measured, one probe per unit: the unit alone at the rank the budget would
            give it uniformly, the relative error of the model's outputs on (up to 4 of) the
            calibration batches (padding positions left out when the model takes an `attention_mask`).
            A callable `accuracy_fn(module) -> float` (higher is better, as for `optimize`):
            measured the same way, from the drop of its accuracy below the dense model's.
            A mapping `{layer name: weight}`: given weights (a unit's is the sum of its layers').

    Returns:
        `{qualified_name: {"method": ..., "low_rank": R}}`; layers best left dense are omitted.
    """
    batches = list(iterate_batches(calibration_data))
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
                          Budget(budget, max_params), sensitivity=sensitivity, gm=gm, batches=batches)


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

    return {r.name: fetch(gm, r.weight_target) for r in records}


def allocate_units(units, records, cache, weights, budget: Budget, *, sensitivity: Any = None,
                   gm: torch.fx.GraphModule | None = None, batches: Sequence[Any] = ()
                   ) -> dict[str, dict[str, Any]]:
    """`allocate` on already-resolved units (used by `optimize` for its warm start).

    A measured `sensitivity` ("output" or an accuracy function) needs the captured `gm`, and
    "output" the calibration `batches`.
    """
    options = [unit_choices(u, records, cache, weights) for u in units]
    dense_flops = sum(o[0].flops for o in options)
    dense_params = sum(o[0].params for o in options)
    max_flops, max_params = budget.limits(dense_flops, dense_params)
    if sensitivity is not None:
        factors = unit_weights(units, options, records, cache, sensitivity, gm, batches,
                               share=min(1.0, max_flops / max(dense_flops, 1)))
        options = [[replace(c, error=c.error * w) for c in opts] for opts, w in zip(options, factors)]
    picked = solve(options, max_flops, max_params)
    plan = {}
    for unit, choice in zip(units, picked):
        if choice.entry is not None:
            plan.update({name: dict(choice.entry) for name in unit.layers})
    log.info("allocation: %d of %d units factored, %.1f%% of the dense FLOPs, total error %.4f",
             len(plan), len(units), 100 * sum(c.flops for c in picked) / max(dense_flops, 1),
             sum(c.error for c in picked))
    return plan


def unit_weights(units, options, records, cache, sensitivity: Any, gm=None, batches: Sequence[Any] = (),
                 share: float = 0.5) -> list[float]:
    """Each unit's weight: how much the model loses per unit of the unit's relative output error.

    A mapping gives it (summed over the unit's layers; missing layers weigh 1). Otherwise each unit
    is probed alone at its choice whose FLOPs are nearest `share` of its dense FLOPs: the loss is
    the drop of `sensitivity(module)` below the dense model's score (a callable), or the relative
    error of the model's outputs on `batches` ("output"). Weights are floored at a thousandth of
    the median so that a probe lost in noise cannot make a unit free.
    """
    if isinstance(sensitivity, Mapping):
        return [float(sum(sensitivity.get(n, 1.0) for n in u.layers)) for u in units]
    if gm is None:
        raise ValueError("a measured sensitivity needs the captured model")
    if sensitivity == "output":
        if not batches:
            raise ValueError('sensitivity="output" needs the calibration batches')
        score = _output_score(gm, batches)
    elif callable(sensitivity):
        score = sensitivity
    else:
        raise ValueError(f'sensitivity must be None, "output", an accuracy function (module -> float, higher is '
                         f"better) or a mapping {{layer: weight}}, got {sensitivity!r}")
    base = _number(score(gm), "the dense model")
    raw = []
    for unit, opts in zip(units, options):
        dense, rest = opts[0], [c for c in opts if c.entry is not None]
        if not rest:
            raw.append(None)
            continue
        probe = min(rest, key=lambda c: (abs(c.flops - share * dense.flops), c.flops))
        module = apply_plan(gm, records, {n: dict(probe.entry) for n in unit.layers}, cache)
        loss = base - _number(score(module), f"the probe of {unit.key}")
        raw.append(max(loss, 0.0) / max(probe.error, 1e-12))
        log.debug("sensitivity of %s: loss %.5f at rank %s (relative error %.5f)", unit.key, loss,
                  probe.entry["low_rank"], probe.error)
    known = sorted(w for w in raw if w is not None and w > 0)
    floor = 1e-3 * known[len(known) // 2] if known else 1.0
    return [1.0 if w is None else max(w, floor) for w in raw]


def _number(value: Any, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"the sensitivity function must return a number; for {what} it returned {value!r}") from None
    if math.isnan(value):
        raise ValueError(f"the sensitivity function returned NaN for {what}")
    return value


PROBE_BATCHES = 4  # calibration batches a sensitivity="output" probe runs (evenly spaced)


def _output_score(gm: torch.fx.GraphModule, batches: Sequence[Any]) -> Callable[[nn.Module], float]:
    """score(module) = −(relative squared error of its floating outputs against `gm`'s), over
    `batches`, real-token rows only when the model takes an attention mask."""

    find_mask = mask_fn(gm, "auto")
    if len(batches) > PROBE_BATCHES:  # evenly spaced: calibration batches may be sorted by length
        step = len(batches) / PROBE_BATCHES
        batches = [batches[int(i * step)] for i in range(PROBE_BATCHES)]
    inputs = [as_inputs(b) for b in batches]
    masks = [find_mask(i) if find_mask else None for i in inputs]

    def rows(out, mask):
        picked = []
        for t in float_tensors(out):
            if mask is not None and t.dim() >= 2 and tuple(t.shape[:2]) == tuple(mask.shape):
                t = t[mask != 0]
            picked.append(t.detach().to(statistics_dtype(t.device, t.dtype)))
        return picked

    with torch.no_grad():
        reference = [rows(gm(*i), m) for i, m in zip(inputs, masks)]

    def score(module: nn.Module) -> float:
        err = 0.0
        with torch.no_grad():
            for i, m, ref in zip(inputs, masks, reference):
                for o, r in zip(rows(module(*i), m), ref):
                    err += float((o - r).square().sum() / r.square().sum().clamp_min(1e-300))
        return -err / max(len(inputs), 1)

    return score


def entry_sensitivity(gm: torch.fx.GraphModule, records: Mapping[str, LayerRecord], plans: Mapping[str, Mapping],
                      cache: FactorCache, batches: Sequence[Any]) -> dict[str, float]:
    """Each plan's measured effect on its own: the relative squared error of `gm`'s outputs with only
    that plan applied (on a few calibration batches, real tokens only), by key. The search ranks
    units by it for reduced precision, whose error the factorizations' spectra do not predict."""
    score = _output_score(gm, batches)
    return {key: -score(apply_plan(gm, records, dict(plan), cache, share_weights=True)) for key, plan in plans.items()}


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
