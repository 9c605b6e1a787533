"""Plans: `{qualified_name: {"method": ..., **params}}`, their entries typed, checked and costed.

A plan is what the search returns and what `rewrite` applies; it is plain JSON so it can be saved,
read and edited by hand. `Entry` is one entry with its kind resolved and its defaults filled in;
`PlanCost` is the one cost model (FLOPs, parameters and bytes moved per forward on the example
inputs); `Budget` is a limit on it.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxsketch.records import LayerRecord, fetch
from fxsketch.replacements import Cost, FactorCache, ReplacementKind, dense_cost, get_kind

__all__ = ["Plan", "Entry", "PlanCost", "Budget", "load_plan", "normalize_plan", "layer_cost", "plan_cost",
           "speed_bound", "check_entry", "build_entry", "find_record"]

log = logging.getLogger(__name__)

Plan = dict[str, dict[str, Any]]
MAX_DEPTH = 16  # the deepest a parameter value may nest lists and dicts
ITEMSIZE = 4  # bytes per element the byte count assumes (float32 weights and activations)


@dataclass(frozen=True)
class Entry:
    """One plan entry: its replacement kind and every parameter, defaults filled in."""

    kind: ReplacementKind
    params: dict[str, Any]

    @classmethod
    def of(cls, entry: Mapping[str, Any], name: str = "") -> Entry:
        """Resolve `{"method": ..., **params}`; an unknown method or parameter is a ValueError
        naming the entry (`name`) and what the kind takes."""
        kind = get_kind(entry["method"])
        given = {k: v for k, v in entry.items() if k != "method"}
        deep = [k for k, v in given.items() if _depth(v) > MAX_DEPTH]
        if deep:
            raise ValueError(f"plan entry {name!r}: parameter {deep[0]!r} is nested more than {MAX_DEPTH} levels "
                             "deep; parameters are numbers, strings or short lists")
        takes = [*kind.param_names, *kind.options]
        unknown = sorted(map(str, set(given) - set(takes)))
        if unknown:
            raise ValueError(f"plan entry {name!r}: {unknown} are not parameters of method {kind.name!r} "
                             f"(it takes {takes or 'none'})")
        return cls(kind, {**kind.defaults, **given})

    @property
    def method(self) -> str:
        return self.kind.name

    def as_dict(self) -> dict[str, Any]:
        """The entry as a plan writes it: `{"method": ..., **every parameter}`."""
        return {"method": self.kind.name, **self.params}

    def cost(self, record: LayerRecord) -> Cost:
        return self.kind.cost(record, self.params)


def _depth(value: Any) -> int:
    """How deep `value` nests lists, tuples and dicts, counted without recursion (stops past MAX_DEPTH)."""
    deepest, level = 0, [value]
    while deepest <= MAX_DEPTH:
        containers = [item for item in level if isinstance(item, (list, tuple, dict))]
        if not containers:
            break
        deepest += 1
        level = [v for c in containers for v in (c.values() if isinstance(c, dict) else c)]
    return deepest


def is_dense(entry: Mapping[str, Any] | None) -> bool:
    """True for no entry or a "dense" one: the layer is left as it is."""
    return entry is None or entry.get("method", "dense") == "dense"


@dataclass(frozen=True)
class PlanCost:
    """What a plan costs per forward on the example inputs, over the layers it was asked about.

    `bytes` counts the weights at their stored width and the activations each layer reads and
    writes (low-rank layers also their rank-wide intermediate) at `ITEMSIZE` bytes an element;
    `weight_bytes` the weights alone (what the layers take on disk and in memory)."""

    flops: int
    params: int
    bytes: int
    weight_bytes: int = 0


def layer_cost(record: LayerRecord, entry: Mapping[str, Any] | None) -> Cost:
    """The cost of `record` under a plan entry (dense when the entry is None or not applicable)."""
    if entry is None or record.unsupported:
        return dense_cost(record)
    return Entry.of(entry, record.name).cost(record)


def plan_cost(records: Sequence[LayerRecord], plan: Mapping[str, Mapping[str, Any]]) -> PlanCost:
    """The cost of `plan` over `records` (a layer not in the plan counts dense)."""
    flops = params = moved = stored = 0
    for record in records:
        cost = layer_cost(record, plan.get(record.name))
        flops += cost.flops_per_token * record.tokens
        params += cost.params
        stored += cost.params * cost.bits // 8
        moved += ITEMSIZE * record.tokens * (record.in_features + record.out_features + 2 * (cost.rank or 0))
    return PlanCost(flops, params, moved + stored, stored)


def speed_bound(records: Sequence[LayerRecord], plan: Mapping[str, Mapping[str, Any]]) -> float:
    """The most `plan` can speed up the layers it replaces: the larger of their compute ratio and
    their byte ratio. Compute counts a FLOP on b-bit operands as b/32 of a float32 one (a SIMD
    register holds 32/b times as many). A whole-model speedup above it beats physics, not the model."""
    replaced = [r for r in records if not r.unsupported and not is_dense(plan.get(r.name))]
    before, after = plan_cost(replaced, {}), plan_cost(replaced, plan)
    work = sum(layer_cost(r, plan.get(r.name)).work * r.tokens for r in replaced)
    if not work or not after.bytes:
        return 1.0
    return max(before.flops / work, before.bytes / after.bytes, 1.0)


@dataclass(frozen=True)
class Budget:
    """Hard limits on the selected layers: FLOPs, parameters and weight bytes (int8 weights take a
    quarter of float32's), absolute or as a fraction of dense.

    A float in (0, 1] is a fraction of the selected layers' dense cost; an int is absolute.
    """

    flops: float | int | None = None
    params: float | int | None = None
    bytes: float | int | None = None

    def limits(self, dense_flops: int, dense_params: int) -> tuple[float, float]:
        return (_limit(self.flops, dense_flops, "the FLOP budget (budget=/max_flops=)"),
                _limit(self.params, dense_params, "the parameter budget (max_params=)"))

    def excess(self, cost: PlanCost, dense: PlanCost, selected: PlanCost, what: str = "") -> str:
        """Why `cost` breaks the budget ("" when it does not). `dense` is the same layers' dense
        cost and `selected` all selected layers' dense cost: layers that are a share of the
        selection get that share of the budget (if every unit keeps its share, the plan does)."""
        if self.flops is None and self.params is None and self.bytes is None:
            return ""
        max_flops, max_params = self.limits(selected.flops, selected.params)
        max_flops *= dense.flops / max(selected.flops, 1)
        max_params *= dense.params / max(selected.params, 1)
        max_bytes = self.byte_limit(selected.weight_bytes) * dense.weight_bytes / max(selected.weight_bytes, 1)
        where = f" for {what}" if what else ""
        if cost.weight_bytes > max_bytes:
            return f"over the weight-byte budget: {cost.weight_bytes:,} > {max_bytes:,.0f}{where}"
        if cost.flops > max_flops:
            return f"over the FLOP budget: {cost.flops:,} > {max_flops:,.0f}{where}"
        if cost.params > max_params:
            return f"over the parameter budget: {cost.params:,} > {max_params:,.0f}{where}"
        return ""


    def byte_limit(self, dense_bytes: int) -> float:
        return _limit(self.bytes, dense_bytes, "the weight-byte budget (max_bytes=)")


def _limit(value: float | int | None, dense: int, what: str) -> float:
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a positive fraction (<= 1) or an absolute count, got {value!r}")
    if not value > 0:  # also refuses NaN
        raise ValueError(f"{what} must be a positive fraction (<= 1) or an absolute count, got {value!r}")
    return float(value) * dense if isinstance(value, float) and value <= 1 else float(value)


def load_plan(path: str | os.PathLike) -> Plan:
    """Read a plan JSON file: the plan dict itself, or `{"plan": {...}, <metadata>}`."""
    if not isinstance(path, (str, os.PathLike)):  # an int would be opened as a file descriptor
        raise TypeError(f"load_plan takes the path of a plan JSON file (str or os.PathLike), got {type(path).__name__}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"plan file {os.fspath(path)!r} does not exist") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"plan file {os.fspath(path)!r} is a directory, not a plan JSON file") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise ValueError(f"plan file {os.fspath(path)!r} is nested too deeply to be a plan (a plan is "
                         "{layer: {'method': ..., **params}})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        hint = (" (it is a zip archive: a .pt2 artifact keeps its plan in fxsketch.deploy.read_metadata(path)['plan'])"
                if raw[:2] == b"PK" else "")
        raise ValueError(f"plan file {os.fspath(path)!r} is not valid JSON ({exc}){hint}; "
                         "write it again with Result.save_plan or fix it by hand") from None
    return normalize_plan(data)


def normalize_plan(plan: Mapping[str, Any] | str | os.PathLike) -> Plan:
    """Check a plan's shape and return a plain dict copy of it."""
    if isinstance(plan, (str, os.PathLike)):
        return load_plan(plan)
    if not isinstance(plan, Mapping):
        raise TypeError(f"a plan is a dict {{qualified_name: {{'method': ..., **params}}}} or a path, got {type(plan).__name__}")
    if "plan" in plan and isinstance(plan["plan"], Mapping):
        plan = plan["plan"]
    if isinstance(plan.get("layers"), list):
        raise ValueError("this is a tuning spec ({'layers': [...]}), not a plan: pass it to optimize/load_spec; "
                         "a plan is {qualified_name: {'method': ..., **params}}")
    out: Plan = {}
    for name, entry in plan.items():
        if not isinstance(entry, Mapping) or "method" not in entry:
            raise ValueError(f"plan entry {name!r} must be a dict with a 'method' key, got {entry!r}")
        Entry.of(entry, str(name))  # an unknown method or parameter is reported here, before any capture
        out[str(name)] = dict(entry)
    return out


def check_entry(record: LayerRecord, entry: Mapping[str, Any]) -> Entry | None:
    """Plan `entry` for `record`, resolved, or None when its kind cannot replace this layer (it
    stays dense, with a warning). Raises ValueError for parameters the kind does not take or
    values it refuses."""
    resolved = Entry.of(entry, record.name)
    reason = resolved.kind.unsupported(record)
    if reason:
        log.warning("keeping %s dense: %s", record.name, reason)
        return None
    problem = resolved.kind.invalid(record, resolved.params)
    if problem:
        raise ValueError(f"plan entry {record.name!r}: {problem}")
    return resolved


def build_entry(gm: nn.Module, record: LayerRecord, entry: Mapping[str, Any], cache: FactorCache,
                copy_weights: bool = True, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> nn.Module | None:
    """The replacement module of plan `entry` for `record`, from `gm`'s weights (or the given
    `weight` and `bias`, as stored); None: the layer stays as it is (see `check_entry`)."""
    resolved = check_entry(record, entry)
    if resolved is None:
        return None
    if weight is None:
        weight = fetch(gm, record.weight_target)
        bias = fetch(gm, record.bias_target) if record.bias_target else None
    weight = weight.T if record.transposed else weight
    return resolved.kind.build(record, weight, bias, resolved.params, cache, copy_weights=copy_weights)


def find_record(records: Mapping[str, LayerRecord], name: str, gm: nn.Module | None = None) -> LayerRecord:
    """The record of layer `name`; a ValueError naming the closest layers (or what the module of
    that name is, when it exists but cannot be rewritten) otherwise."""
    if name in records:
        return records[name]
    close = difflib.get_close_matches(name, list(records), n=5)
    if close:
        hint = f"closest: {', '.join(close)}"
    elif records:
        hint = f"available: {', '.join(list(records)[:10])}"
    else:
        hint = "the model has no Linear/Conv2d layer fxsketch can rewrite"
    try:
        module = gm.get_submodule(name) if gm is not None else None
    except AttributeError:
        module = None
    if module is not None:  # e.g. a quantized Linear: a module of that name exists but is not matchable
        cls = type(module)
        hint = (f"it is a {cls.__module__}.{cls.__qualname__}; fxsketch rewrites float torch.nn.Linear/Conv2d "
                f"layers and functional linear/conv2d calls; {hint}")
    raise ValueError(f"plan names layer {name!r}, which is not a Linear/Conv2d layer of this model ({hint})")
