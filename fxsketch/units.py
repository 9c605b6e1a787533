"""Tuning units: the layers a LayerConfig selects, grouped into units that share one set of
values, each with the parameter space those values are drawn from; and drawing one unit's values
from an Optuna trial (define-by-run: the method first, then only the parameters it takes)."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fxsketch.plan import Entry
from fxsketch.records import LayerRecord
from fxsketch.replacements import KINDS, dense_cost, get_kind
from fxsketch.replacements.base import AUTO_MIN_GAIN, AUTO_MIN_WIDTH
from fxsketch.select import match_layers
from fxsketch.spec import Categorical, LayerConfig, ParamSpec, TuningConfigs

if TYPE_CHECKING:  # annotations only: importing fxsketch does not load Optuna
    import optuna

__all__ = ["DEFAULT_METHOD", "Unit", "invalid_reason", "resolve_units", "space_size", "suggest_entry", "unit_methods",
           "warm_params"]

log = logging.getLogger(__name__)

DEFAULT_METHOD = "svd"


@dataclass
class Unit:
    """Layers tuned together with one set of values, and the space those values come from."""

    key: str
    layers: list[str]
    space: dict[str, ParamSpec]
    copy_weights: bool = True
    method: str = DEFAULT_METHOD  # searched when the space names no method
    define_by_run: Callable[[Any, LayerRecord], dict[str, Any]] | None = None  # replaces `space`


def resolve_units(
    records: Sequence[LayerRecord],
    configs: TuningConfigs,
    others: Mapping[str, str] | None = None,
    default_method: str = DEFAULT_METHOD,
    precision: bool = False,
) -> list[Unit]:
    """Resolve each LayerConfig's selector and parameter space into tuning units. With
    `precision`, "auto" spaces also offer the reduced precisions each layer's device runs fast
    (for a search that measures time; a FLOP count does not see them).

    Raises:
        ValueError: a selector matches nothing, two configs select the same layer, or a space names
            an unknown method or a parameter none of its methods take.
    """
    by_name = {r.name: r for r in records}
    owner: dict[str, int] = {}
    units: list[Unit] = []
    for index, cfg in enumerate(configs):
        names = match_layers(records, cfg.layer_names, other_modules=others)
        for name in names:
            if name in owner:
                raise ValueError(f"layer {name!r} is selected by config {owner[name]} and config {index}: "
                                 "narrow one of the selectors so each layer is tuned once")
            owner[name] = index
        chosen = [by_name[n] for n in names if _supported(by_name[n], cfg, default_method)]
        if not cfg.separate and not callable(cfg.params) and len(chosen) > 1:
            # a layer with no automatic configuration of its own would leave the whole group without one
            alone = [r for r in chosen if _unit_space(cfg, [r], default_method, precision) is None]
            if alone and len(alone) < len(chosen):
                _warn_skipped(alone)
                chosen = [r for r in chosen if r not in alone]
        groups = [[r] for r in chosen] if cfg.separate else _joint_groups(chosen, cfg)
        for group in groups:
            if callable(cfg.params):
                key = group[0].name if cfg.separate else f"group{index}:{group[0].name}+{len(group) - 1}"
                units.append(Unit(key, [r.name for r in group], {}, cfg.copy_weights, default_method, cfg.params))
                continue
            space = _unit_space(cfg, group, default_method, precision)
            problem = _space_problem(space, group, default_method) if space is not None else ""
            if problem:
                raise ValueError(f"config {index}: {problem}")
            if space is None:
                _warn_skipped(group)
                continue
            key = group[0].name if cfg.separate else f"group{index}:{group[0].name}+{len(group) - 1}"
            units.append(Unit(key, [r.name for r in group], space, cfg.copy_weights, default_method))
    return units


def _warn_skipped(records: list[LayerRecord]) -> None:
    log.warning("skipping %s: no configuration is at least %.1fx cheaper than the dense layer and keeps its "
                "function (\"auto\" leaves layers narrower than %d dense)",
                ", ".join(f"{r.name} ({r.in_features}->{r.out_features})" for r in records),
                AUTO_MIN_GAIN, AUTO_MIN_WIDTH)


def _space_problem(space: dict[str, ParamSpec], records: list[LayerRecord], default_method: str) -> str:
    """Why no value of `space` can be built for some layer ("" when every layer has one)."""
    spec = space.get("method")
    methods = list(spec.choices) if spec is not None else [default_method]
    for record in records:
        reasons, open_ended = [], False
        for method in methods:
            kind = get_kind(method)
            grid = {p: space[p].values() if p in space else [kind.defaults.get(p)] for p in kind.param_names}
            if any(v is None for v in grid.values()):
                open_ended = True
                continue
            problems = [kind.invalid(record, dict(zip(grid, combo)))
                        for combo in itertools.islice(itertools.product(*grid.values()), 10_000)]
            if not all(problems):
                break
            reasons.append(f"{method}: {problems[0]}")
        else:
            if reasons and not open_ended:
                return f"no value of the space can be built for {record.name} ({'; '.join(reasons)})"
    return ""


def _supported(record: LayerRecord, cfg: LayerConfig, default_method: str) -> bool:
    if record.unsupported:
        log.warning("keeping %s dense: %s", record.name, record.unsupported)
        return False
    return True


def _joint_groups(records: list[LayerRecord], cfg: LayerConfig) -> list[list[LayerRecord]]:
    """One group for explicit params; with "auto", one group per (type, shape), as the seeds do."""
    if not records:
        return []
    if cfg.params != "auto":
        return [records]
    groups: dict[tuple, list[LayerRecord]] = {}
    for r in records:
        groups.setdefault((r.op_type, r.weight_shape), []).append(r)
    return list(groups.values())


def _unit_space(cfg: LayerConfig, group: list[LayerRecord], default_method: str,
                precision: bool = False) -> dict[str, ParamSpec] | None:
    # The most constrained layer of a joint group decides the automatic ranges, so every value
    # drawn is valid and efficient for all of them.
    ref = min(group, key=lambda r: r.out_features * r.in_features / (r.out_features + r.in_features))
    if cfg.params == "auto":
        return _auto_space(group, ref, default_method, precision)
    space = dict(cfg.params)
    methods = unit_methods(space, default_method)
    allowed = {"method"}.union(*(get_kind(m).param_names for m in methods))
    unknown = sorted(set(space) - allowed)
    if unknown:
        owners = {p: [k for k, kind in KINDS.items() if p in kind.param_names] for p in unknown}
        raise ValueError(
            f"params {unknown} are not parameters of {methods} (a config without 'method' searches "
            f"{default_method!r}); they belong to: {owners}. Add a 'method' entry naming those methods."
        )
    for m in methods:
        kind = get_kind(m)
        missing = [p for p in kind.param_names if p not in space and p not in kind.defaults]
        if missing:
            auto = kind.auto_space(ref, precision)
            if auto is None:
                return None
            space.update({p: auto[p] for p in missing})
    return _clip(space, methods, group)


def _auto_space(group: list[LayerRecord], ref: LayerRecord, default_method: str,
                precision: bool) -> dict[str, ParamSpec] | None:
    """`default_method`'s efficient space for `ref`; with `precision`, its reduced precisions and,
    as other values of `method`, every automatic kind (int8) all of `group` runs fast; None when
    nothing beats dense."""
    space = get_kind(default_method).auto_space(ref, precision)
    extra = [k.name for k in KINDS.values() if precision and k.automatic and k.name != default_method
             and all(k.offered(r) for r in group)]
    if not extra:
        return space
    if space is None:
        return {"method": Categorical(extra)}
    return {"method": Categorical([default_method, *extra]), **space}


def _clip(space: dict[str, ParamSpec], methods: list[str], group: list[LayerRecord]) -> dict[str, ParamSpec]:
    """Size-like ranges clipped to what every layer of the group can take (the largest bound over
    the searched methods: no value any of them could use is lost). A range wholly past the bound
    stays as it is: its values are then refused, with the reason, by each trial."""
    bounds: dict[str, int] = {}
    for m in methods:
        per_layer = [get_kind(m).upper_bounds(r) for r in group]
        for p in set().union(*per_layer):
            bound = min(b.get(p, math.inf) for b in per_layer)
            bounds[p] = max(bounds.get(p, bound), bound)
    for p, bound in bounds.items():
        clip = getattr(space.get(p), "clipped", None)
        clipped = clip(bound) if clip is not None else None
        if clipped is not None and clipped is not space[p]:
            log.info("the %s range %s is clipped to %d for %s", p, space[p], bound, ", ".join(r.name for r in group))
            space[p] = clipped
    return space


def unit_methods(space: Mapping[str, ParamSpec], default_method: str) -> list[str]:
    spec = space.get("method")
    if spec is None:
        return [default_method]
    if not isinstance(spec, Categorical):
        raise ValueError(f"'method' must be a list of method names (Categorical), got {spec!r}")
    for m in spec.choices:
        get_kind(m)  # raises with the known methods listed
    return list(spec.choices)


class _PrefixedTrial:
    """A trial whose parameter names carry the unit's prefix, for define-by-run spaces."""

    def __init__(self, trial: optuna.Trial, prefix: str) -> None:
        self._trial, self._prefix = trial, prefix

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._trial, name)
        if name.startswith("suggest_"):
            return lambda param, *args, **kwargs: attr(f"{self._prefix}:{param}", *args, **kwargs)
        return attr


def suggest_entry(unit: Unit, trial: optuna.Trial, default_method: str, records=None) -> dict[str, Any]:
    """Define-by-run: the method first, then only the parameters that method takes."""
    if unit.define_by_run is not None:
        entry = dict(unit.define_by_run(_PrefixedTrial(trial, unit.key), records[unit.layers[0]]))
        entry.setdefault("method", default_method)
        kind = get_kind(entry["method"])
        unknown = set(entry) - {"method"} - set(kind.param_names)
        if unknown:
            raise ValueError(f"the params callable of {unit.key} returned {sorted(unknown)}, which method "
                             f"{kind.name!r} does not take (it takes {list(kind.param_names)})")
        return Entry.of(entry, unit.key).as_dict()
    space = unit.space
    method = space["method"].suggest(trial, f"{unit.key}:method") if "method" in space else default_method
    kind = get_kind(method)
    entry: dict[str, Any] = {"method": method}
    for p in kind.param_names:
        entry[p] = space[p].suggest(trial, f"{unit.key}:{p}") if p in space else kind.defaults[p]
    return entry


def space_size(unit: Unit, default_method: str) -> float:
    """How many distinct value sets a unit's space holds (inf for continuous or define-by-run ones)."""
    if unit.define_by_run is not None:
        return math.inf
    total = 0.0
    for m in unit_methods(unit.space, default_method):
        size = 1.0
        for p in get_kind(m).param_names:
            values = unit.space[p].values() if p in unit.space else [None]
            size *= math.inf if values is None else len(values)
        total += size
    return total


def invalid_reason(records: Mapping[str, LayerRecord], unit: Unit, entry: Mapping[str, Any]) -> str:
    """Why `entry` cannot or should not be built for the unit's layers ("" when it can)."""
    resolved = Entry.of(entry, unit.key)
    given = {k: v for k, v in entry.items() if k != "method"}
    for name in unit.layers:
        record = records[name]
        problem = resolved.kind.invalid(record, resolved.params)
        if problem:
            return f"{name}: {problem}"
        if resolved.method != "dense" and resolved.cost(record).work >= dense_cost(record).work:
            return f"{name}: {resolved.method} {given} is not cheaper than the dense layer"
    return ""


def warm_params(unit: Unit, entry: Mapping[str, Any] | None) -> dict[str, Any]:
    """The trial parameters that make `unit` draw a warm-start plan's `entry` ({} when its space
    holds no such value)."""
    if entry is None or unit.define_by_run is not None:
        return {}
    method = entry.get("method", unit.method)
    params: dict[str, Any] = {}
    if "method" in unit.space:
        if not unit.space["method"].contains(method):
            return {}
        params[f"{unit.key}:method"] = method
    kind = get_kind(method)
    for p in kind.param_names:
        if p in unit.space:
            value = entry.get(p, kind.defaults.get(p))
            if not unit.space[p].contains(value):
                return {}
            params[f"{unit.key}:{p}"] = value
    return params
