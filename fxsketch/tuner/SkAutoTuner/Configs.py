"""Panther's `SkAutoTuner.Configs`: the spec types (fxsketch's own) and the two resolvers.

`LayerNameResolver` turns a `layer_names` selector into qualified layer names of one model;
`ParamsResolver` turns each `LayerConfig` into `fxsketch.units.Unit`s with explicit search spaces
(`params="auto"` expanded from the layer dimensions). Both sit on fxsketch's capture, selector
(`fxsketch.select.match_layers`) and unit (`fxsketch.units.resolve_units`) machinery; they only
add the seed API's rules:

* a list entry is an exact qualified name (`"fc1"` never selects `fc10`);
* a string is a regex searched in the name (a substring when it is not a valid regex);
* any module type can be selected: a selected module that no replacement kind supports
  (`ConvTranspose2d`, `Embedding`, a grouped Conv2d) stays dense, with one warning per resolution;
* parameters no replacement kind takes (`dropout`, `learning_rate`) are kept in the space as
  "extra" parameters, sampled and handed to the evaluation functions.
"""

# ruff: noqa: N999  (the module name is the seed API's import path)
from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from fxsketch.capture import capture, find_layers
from fxsketch.records import MATCHABLE_TYPES, LayerRecord
from fxsketch.replacements import KINDS, get_kind
from fxsketch.select import match_layers
from fxsketch.spec import (
    Categorical,
    Float,
    Int,
    LayerConfig,
    ParamSpec,
    TuningConfigs,
    load_spec,
)
from fxsketch.units import Unit, resolve_units, unit_methods

__all__ = ["Categorical", "Float", "Int", "LayerConfig", "LayerNameResolver", "ParamsResolver", "TuningConfigs"]

_NOT_IN_GRAPH = 1 << 40  # graph order of selectable modules that have no matchable graph node


class LayerNameResolver:
    """The selectable layers of one model, and selector resolution over them.

    Selectable layers are the Linear/Conv2d layers fxsketch captures (including functional calls
    on parameters) plus every other module that owns parameters, so that selecting, say, a
    ConvTranspose2d is not an error but a layer kept dense.

    Args:
        model: the model; it is captured (a private copy) and never modified.
        example_inputs: needed only when `torch.fx.symbolic_trace` cannot trace the model.
    """

    def __init__(self, model: nn.Module, example_inputs: Any = None) -> None:
        self.model = model
        self.graph_module = capture(model, example_inputs)
        self.records: list[LayerRecord] = find_layers(self.graph_module)
        self._candidates = self.records + _unsupported_records(model, {r.name for r in self.records})
        self._by_name = {r.name: r for r in self._candidates}

    @property
    def layer_names(self) -> list[str]:
        """Every selectable name, in `named_modules()` order (functional calls last)."""
        ordered = sorted(self._candidates, key=lambda r: (r.module_order, r.graph_order))
        return [r.name for r in ordered]

    def record(self, name: str) -> LayerRecord:
        """The normalized description of layer `name` (a KeyError names the closest layers)."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a selectable layer ({_closest(name, list(self._by_name))})") from None

    def get_layer(self, name: str) -> nn.Module | None:
        """The user's module named `name` (None for a functional call on a bare parameter)."""
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            return None

    def layer_type(self, name: str) -> str:
        """The class name of layer `name` (`"function"` for a functional call)."""
        return self.record(name).module_type

    def is_supported(self, name: str) -> bool:
        """Whether some replacement kind can rewrite layer `name`."""
        record = self.record(name)
        return record.op_type in MATCHABLE_TYPES and not record.unsupported

    def resolve(self, selector: Any) -> list[str]:
        """The names `selector` selects, in graph order (layers outside the graph last).

        Raises:
            ValueError: the selector matches nothing, or a list entry is not an exact layer name.
            TypeError: the selector has an unsupported form.
        """
        if isinstance(selector, str):
            key = "pattern" if _is_regex(selector) else "contains"
            return match_layers(self._candidates, {key: selector}, other_modules=self._others())
        if isinstance(selector, (list, tuple)):
            return self._resolve_exact(selector)
        return match_layers(self._candidates, selector, other_modules=self._others())

    def _resolve_exact(self, names: Sequence[Any]) -> list[str]:
        if not names:
            raise ValueError("layer_names is an empty list: name at least one layer")
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"layer_names list entries must be str, got {name!r}")
            if name not in self._by_name:
                raise ValueError(
                    f"layer_names entry {name!r} is not the qualified name of a layer "
                    f"({_closest(name, self.layer_names)}); list entries are exact names, so to "
                    f"select by regex or substring pass the string {name!r} or {{'pattern': [...]}}"
                )
        return list(dict.fromkeys(names))

    def _others(self) -> dict[str, str]:
        types = self.graph_module.meta.get("fxsketch_module_types", {})
        return {n: t for n, t in types.items() if n not in self._by_name}


def _unsupported_records(model: nn.Module, taken: set[str]) -> list[LayerRecord]:
    """Records for modules that own parameters but are not captured Linear/Conv2d layers."""
    out = []
    for order, (name, module) in enumerate(model.named_modules()):
        own = dict(module.named_parameters(recurse=False))
        if not name or name in taken or not own:
            continue
        kind = type(module).__name__
        weight = own.get("weight", next(iter(own.values())))
        out.append(LayerRecord(name=name, op_type=kind, module_type=kind, weight_shape=tuple(weight.shape),
                               module_order=order, graph_order=_NOT_IN_GRAPH + order,
                               unsupported=f"no replacement kind supports {kind}"))
    return out


def _is_regex(text: str) -> bool:
    try:
        re.compile(text)
    except re.error:
        return False
    return True


def _closest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5)
    if close:
        return "closest: " + ", ".join(close)
    return "available: " + ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")


class ParamsResolver:
    """Resolves LayerConfigs into `fxsketch.units.Unit`s with explicit spaces (`"auto"` expanded).

    The spaces come from `fxsketch.units.resolve_units`; this class adds the seed API's rules on
    top: selection through `LayerNameResolver`, unsupported layers kept dense with one warning,
    extra parameters kept in the space, and a group's key `"a+b+c"` (its study name).

    Args:
        layers: the LayerNameResolver of the model being tuned.
        default_method: the replacement kind used when a config's params name no `method`
            (`"sketch"`, Panther's SKLinear/SKConv2d, for the seed API).
    """

    def __init__(self, layers: LayerNameResolver, default_method: str = "sketch") -> None:
        get_kind(default_method)
        self.layers = layers
        self.default_method = default_method

    def methods(self, config: LayerConfig) -> list[str]:
        """The replacement kinds a config searches."""
        params = config.params if isinstance(config.params, Mapping) else {}
        return unit_methods(params, self.default_method)

    def extra_params(self, config: LayerConfig) -> list[str]:
        """The names in `config.params` that none of its replacement kinds takes."""
        if isinstance(config.params, str):
            return []
        accepted = self.accepted_params(config)
        return [p for p in config.params if p not in accepted]

    def accepted_params(self, config: LayerConfig) -> list[str]:
        """`method` and every parameter of the kinds `config` searches."""
        names = ["method"]
        for m in self.methods(config):
            names += [p for p in get_kind(m).param_names if p not in names]
        return names

    def units(self, configs: Any) -> list[Unit]:
        """Every tuning unit of `configs`, in config order; warns once about unsupported layers."""
        return [unit for units in self.config_units(configs) for unit in units]

    def resolve(self, configs: Any) -> TuningConfigs:
        """`configs` with explicit layer-name lists and explicit spaces, one config per space."""
        return units_to_configs(self.config_units(configs))

    def config_units(self, configs: Any) -> list[list[Unit]]:
        """The tuning units of each config (an empty list when it selects only unsupported layers).

        Raises:
            ValueError: a selector matches nothing, two configs select the same layer, or a config
                has a define-by-run params function.
        """
        configs = load_spec(configs)
        owner: dict[str, int] = {}
        unsupported: list[str] = []
        out: list[list[Unit]] = []
        for index, config in enumerate(configs):
            if callable(config.params):
                raise ValueError(  # noqa: TRY004  (the seed API raises ValueError for a bad config)
                    f"config {index} has a define-by-run params function: SKAutoTuner searches explicit "
                    "parameter spaces (lists, Categorical/Int/Float, tuples, Optuna distributions), one "
                    "SearchAlgorithm per layer; run a define-by-run spec with fxsketch.optimize(model, spec, ...)")
            names = self.layers.resolve(config.layer_names)
            for name in names:
                if name in owner:
                    raise ValueError(f"layer {name!r} is selected by config {owner[name]} and config {index}: "
                                     "narrow one of the selectors so each layer is tuned once")
                owner[name] = index
            supported = [n for n in names if self.layers.is_supported(n)]
            unsupported += [n for n in names if n not in supported]
            out.append(self._units_of(config, supported) if supported else [])
        if unsupported:
            self._warn_unsupported(unsupported)
        return out

    def _units_of(self, config: LayerConfig, names: list[str]) -> list[Unit]:
        """`resolve_units` over the selected names, with the seed's keys and extras in the space."""
        extras = self.extra_params(config)
        params = config.params if isinstance(config.params, str) else {
            k: v for k, v in config.params.items() if k not in extras}
        explicit = LayerConfig(list(names), params, config.separate, config.copy_weights)
        return [replace(unit, key=unit.layers[0] if config.separate else "+".join(unit.layers),
                        space={**unit.space, **{p: config.params[p] for p in extras}})
                for unit in resolve_units(self.layers.records, TuningConfigs([explicit]), None, self.default_method)]

    def _warn_unsupported(self, names: list[str]) -> None:
        described = ", ".join(self._describe_unsupported(n) for n in names)
        kinds = ", ".join(sorted(k for k in KINDS if k != "dense"))
        warnings.warn(f"selected layers that stay dense because no replacement kind supports them: {described}. "
                      f"Supported types: {', '.join(MATCHABLE_TYPES)} (groups=1, zero padding for Conv2d), "
                      f"replaced by the kinds {kinds}.", UserWarning, stacklevel=4)

    def _describe_unsupported(self, name: str) -> str:
        record = self.layers.record(name)
        reason = f": {record.unsupported}" if record.op_type in MATCHABLE_TYPES else ""
        return f"{name} ({record.module_type}{reason})"


def units_to_configs(per_config: Sequence[Sequence[Unit]]) -> TuningConfigs:
    """LayerConfigs equivalent to each config's units: separate units sharing a space are listed together."""
    configs: list[LayerConfig] = []
    for units in per_config:
        last: tuple | None = None
        for unit in units:
            separate = unit.layers == [unit.key]
            signature = tuple((name, repr(spec)) for name, spec in unit.space.items())
            if separate and signature == last:
                prev = configs[-1]
                configs[-1] = LayerConfig([*prev.layer_names, unit.key], prev.params, True, prev.copy_weights)
                continue
            configs.append(LayerConfig(list(unit.layers), dict(unit.space), separate, unit.copy_weights))
            last = signature if separate else None
    return TuningConfigs(configs)


def algorithm_space(space: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """The space as a search algorithm receives it: Categorical as a plain list, Int/Float as is."""
    return {name: list(spec.choices) if isinstance(spec, Categorical) else spec for name, spec in space.items()}
