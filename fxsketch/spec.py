"""The tuning-spec language: which layers to tune, and over which parameter values.

A spec is a `TuningConfigs`, an immutable sequence of `LayerConfig`s. Each `LayerConfig`
pairs a layer selector with a search space, a mapping from parameter name to a `ParamSpec`
(`Categorical`, `Int` or `Float`). Specs round-trip through plain dicts, so they can be
written as JSON or YAML files and read back with `load_spec`:

    layers:
      - layer_names: {type: Linear}
        params:
          low_rank: {type: int, low: 8, high: 64, step: 8}
          num_terms: [1, 2, 3]          # a plain list is a categorical (legacy format)
        separate: true
        copy_weights: true
"""

from __future__ import annotations

import copy
import json
import logging
import operator
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fxsketch.space import Categorical, Float, Int, ParamSpec, as_param_spec, check_bool, error_context

__all__ = [
    "ParamSpec",
    "Categorical",
    "Int",
    "Float",
    "as_param_spec",
    "LayerConfig",
    "TuningConfigs",
    "load_spec",
]

logger = logging.getLogger(__name__)

_SPEC_FILE_SUFFIXES = (".json", ".yaml", ".yml")
_LAYER_KEYS = ("layer_names", "params", "separate", "copy_weights")
_SPEC_SHAPE = "{'layers': [{'layer_names': ..., 'params': {...}}, ...]}"


def _normalize_selector(selector: Any) -> Any:
    """Keep a selector as given, but make lists immutable (tuple) and dicts private copies."""
    if isinstance(selector, str):
        return selector
    if isinstance(selector, (list, tuple)):
        bad = [item for item in selector if not isinstance(item, str)]
        if bad:
            raise TypeError(f"layer_names list must hold only strings, got {bad[0]!r}")
        return tuple(selector)
    if isinstance(selector, Mapping):
        return copy.deepcopy(dict(selector))
    if callable(selector):
        return selector
    raise TypeError(
        f"layer_names must be a str, a list of str, a dict or a callable, got {type(selector).__name__}"
    )


def _normalize_params(params: Any) -> Any:
    """Turn `params` into `"auto"`, a dict of ParamSpecs, or a define-by-run callable
    `(trial, record) -> {"method": ..., **params}`, naming the parameter on errors."""
    if callable(params) and not isinstance(params, Mapping):
        return params
    if isinstance(params, str):
        if params != "auto":
            raise ValueError(f"params must be 'auto' or a mapping of name -> spec, got the string {params!r}")
        return params
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be 'auto' or a mapping of name -> spec, got {type(params).__name__}")
    normalized: dict[str, ParamSpec] = {}
    for name, value in params.items():
        if not isinstance(name, str):
            raise TypeError(f"param names must be strings, got {name!r}")
        with error_context(f"params[{name!r}]"):
            normalized[name] = as_param_spec(value)
    return normalized


@dataclass(frozen=True)
class LayerConfig:
    """Which layers to tune (`layer_names`) and the search space of their parameters (`params`).

    Attributes:
        layer_names: a selector: a name/pattern string, a list of them, a dict of criteria, or a
            callable. Its meaning is resolved by the matcher, not here.
        params: `"auto"` (derive the space from the layer) or a dict name -> ParamSpec; an empty
            dict keeps the replacement's defaults.
        separate: tune each selected layer on its own (True) or share one set of values (False).
        copy_weights: initialize the replacement from the original layer's weights.
    """

    layer_names: Any
    params: Any
    separate: bool = True
    copy_weights: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_names", _normalize_selector(self.layer_names))
        object.__setattr__(self, "params", _normalize_params(self.params))
        check_bool("LayerConfig", "separate", self.separate)
        check_bool("LayerConfig", "copy_weights", self.copy_weights)

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-friendly dict; `LayerConfig.from_dict` rebuilds an equal config.

        Raises:
            ValueError: when the selector is a callable, which cannot be serialized.
        """
        selector = self.layer_names
        if isinstance(selector, tuple):
            selector = list(selector)
        elif isinstance(selector, dict):
            selector = copy.deepcopy(selector)
        elif not isinstance(selector, str):
            raise ValueError(
                f"cannot serialize a callable layer_names selector ({selector!r}): "
                "use a str, a list of str or a dict instead"
            )
        params = self.params
        if callable(params):
            raise ValueError(f"cannot serialize a define-by-run params callable ({params!r}): use a dict of specs")
        if not isinstance(params, str):
            params = {name: spec.to_dict() for name, spec in params.items()}
        return {
            "layer_names": selector,
            "params": params,
            "separate": self.separate,
            "copy_weights": self.copy_weights,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerConfig:
        """Build a config from its `to_dict` form (params may also use the legacy list format)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a layer config must be a dict, got {type(data).__name__}")
        unknown = sorted(map(str, set(data) - set(_LAYER_KEYS)))
        if unknown:
            raise ValueError(f"unknown layer config keys {unknown}: valid keys are {list(_LAYER_KEYS)}")
        if "layer_names" not in data:
            raise ValueError("a layer config needs 'layer_names' (a str, a list of str or a dict)")
        if "params" not in data:
            raise ValueError("a layer config needs 'params': a mapping of name -> spec, or 'auto'")
        return cls(**data)


# --------------------------------------------------------------------------- containers


def _as_layer_config(item: Any) -> LayerConfig:
    if isinstance(item, LayerConfig):
        return item
    if isinstance(item, Mapping):
        return LayerConfig.from_dict(item)
    raise TypeError(f"expected a LayerConfig or a dict, got {type(item).__name__}")


class TuningConfigs:
    """An immutable, ordered collection of LayerConfigs; every edit returns a new object."""

    __slots__ = ("_configs",)

    def __init__(self, configs: Sequence[LayerConfig | Mapping[str, Any]] = ()) -> None:
        """Store `configs` (LayerConfigs, or dicts in `LayerConfig.to_dict` form) as a tuple."""
        if isinstance(configs, (str, bytes, Mapping, LayerConfig)) or not isinstance(configs, Iterable):
            raise TypeError(
                f"TuningConfigs takes a list of LayerConfig, got {type(configs).__name__}; "
                "wrap a single config in a list"
            )
        items = []
        for index, item in enumerate(configs):
            with error_context(f"configs[{index}]"):
                items.append(_as_layer_config(item))
        object.__setattr__(self, "_configs", tuple(items))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("TuningConfigs is immutable: use add/remove/replace to get a new one")

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild through __init__ so copy/pickle work despite the blocked __setattr__.
        return (TuningConfigs, (self._configs,))

    @property
    def configs(self) -> tuple[LayerConfig, ...]:
        """The layer configs, in order."""
        return self._configs

    def _index(self, index: Any) -> int:
        """Turn `index` into a valid non-negative position, with a clear error otherwise."""
        if isinstance(index, bool):
            raise TypeError(f"TuningConfigs index must be an int, got {index!r}")
        try:
            position = operator.index(index)
        except TypeError:
            raise TypeError(f"TuningConfigs index must be an int, got {type(index).__name__}") from None
        size = len(self._configs)
        if not -size <= position < size:
            raise IndexError(f"index {position} is out of range for TuningConfigs with {size} config(s)")
        return position % size

    def __len__(self) -> int:
        return len(self._configs)

    def __getitem__(self, index: int | slice) -> LayerConfig | TuningConfigs:
        if isinstance(index, slice):
            return TuningConfigs(self._configs[index])
        return self._configs[self._index(index)]

    def __iter__(self) -> Iterator[LayerConfig]:
        return iter(self._configs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TuningConfigs):
            return NotImplemented
        return self._configs == other._configs

    __hash__ = None  # type: ignore[assignment]  # LayerConfigs hold dicts, so they are unhashable

    def __repr__(self) -> str:
        return f"TuningConfigs({list(self._configs)!r})"

    def add(self, config: LayerConfig | Mapping[str, Any]) -> TuningConfigs:
        """A new collection with `config` appended."""
        return TuningConfigs((*self._configs, _as_layer_config(config)))

    def remove(self, index: int) -> TuningConfigs:
        """A new collection without the config at `index`."""
        position = self._index(index)
        return TuningConfigs(self._configs[:position] + self._configs[position + 1 :])

    def replace(self, index: int, config: LayerConfig | Mapping[str, Any]) -> TuningConfigs:
        """A new collection with the config at `index` replaced by `config`."""
        position = self._index(index)
        items = list(self._configs)
        items[position] = _as_layer_config(config)
        return TuningConfigs(items)

    def clone(self) -> TuningConfigs:
        """A deep copy (callable selectors are shared, as functions are)."""
        return TuningConfigs(copy.deepcopy(list(self._configs)))

    def merge(self, other: TuningConfigs | Sequence[LayerConfig]) -> TuningConfigs:
        """A new collection with this one's configs followed by `other`'s."""
        other = other if isinstance(other, TuningConfigs) else TuningConfigs(other)
        return TuningConfigs(self._configs + other._configs)

    def filter(self, predicate: Callable[[LayerConfig], bool]) -> TuningConfigs:
        """A new collection of the configs for which `predicate` is true."""
        return TuningConfigs([config for config in self._configs if predicate(config)])

    def map(self, transform: Callable[[LayerConfig], LayerConfig]) -> TuningConfigs:
        """A new collection of `transform(config)` for each config; each result must be a LayerConfig."""
        items = []
        for index, config in enumerate(self._configs):
            result = transform(config)
            if not isinstance(result, LayerConfig):
                raise TypeError(
                    f"map transform must return a LayerConfig, got {type(result).__name__} for config {index}"
                )
            items.append(result)
        return TuningConfigs(items)

    def to_dict(self) -> dict[str, Any]:
        """`{"layers": [LayerConfig.to_dict(), ...]}`, the format of spec files."""
        return {"layers": [config.to_dict() for config in self._configs]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TuningConfigs:
        """Build a collection from `{"layers": [...]}`, naming the failing layer on errors."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a spec must be a dict shaped like {_SPEC_SHAPE}, got {type(data).__name__}")
        extra = sorted(map(str, set(data) - {"layers"}))
        if "layers" not in data:
            found = f" (found keys {sorted(map(str, data))})" if data else ""
            raise ValueError(f"spec is missing the 'layers' key{found}: expected {_SPEC_SHAPE}")
        if extra:
            raise ValueError(f"spec has unexpected top-level keys {extra}: expected only {_SPEC_SHAPE}")
        layers = data["layers"]
        if not isinstance(layers, (list, tuple)):
            kind = type(layers).__name__
            raise ValueError(f"spec 'layers' must be a list, got {kind}: expected {_SPEC_SHAPE}")
        items = []
        for index, item in enumerate(layers):
            with error_context(f"layers[{index}]"):
                items.append(_as_layer_config(item))
        return cls(items)


# --------------------------------------------------------------------------- loading


def _parse_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to be a spec (lists or objects inside each other thousands "
                         "of levels down)") from None


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        import yaml
    except ImportError as exc:
        raise ImportError(
            f"reading {path} needs PyYAML: pip install 'fxsketch[yaml]' (or use a .json spec)"
        ) from exc
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to be a spec (lists or mappings inside each other thousands "
                         "of levels down)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ValueError(f"{path}: invalid YAML{where}: {problem}") from exc


def read_config_file(path: Path, what: str = "spec") -> Any:
    """The parsed content of a .json/.yaml/.yml file, with errors that name the file and line."""
    suffix = path.suffix.lower()
    if suffix not in _SPEC_FILE_SUFFIXES:
        valid = list(_SPEC_FILE_SUFFIXES)
        raise ValueError(f"{path}: unsupported {what} file type {path.suffix!r}: use one of {valid}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text: {exc}") from exc
    return _parse_json(path, text) if suffix == ".json" else _parse_yaml(path, text)


def _load_file(path: Path) -> TuningConfigs:
    """Read a .json/.yaml/.yml spec file holding `{"layers": [...]}`."""
    data = read_config_file(path)
    if data is None:
        raise ValueError(f"{path}: the file is empty: expected {_SPEC_SHAPE}")
    with error_context(str(path)):
        return TuningConfigs.from_dict(data)


def load_spec(spec: Any) -> TuningConfigs:
    """Turn any accepted form of a tuning spec into a non-empty TuningConfigs.

    Accepts a TuningConfigs (returned as is), a LayerConfig, a list/tuple of LayerConfigs or
    dicts, a `{"layers": [...]}` dict, or a path (str or os.PathLike) to a .json/.yaml/.yml
    file holding that dict.

    Raises:
        FileNotFoundError: when the spec file does not exist.
        ValueError: for an unsupported file type, a malformed file, a badly shaped or invalid
            spec, or a spec with no layer configs.
        ImportError: for a YAML file when PyYAML is not installed.
        TypeError: for any other kind of `spec`.
    """
    if isinstance(spec, TuningConfigs):
        configs = spec
    elif isinstance(spec, LayerConfig):
        configs = TuningConfigs([spec])
    elif isinstance(spec, (list, tuple)):
        configs = TuningConfigs(spec)
    elif isinstance(spec, Mapping):
        configs = TuningConfigs.from_dict(spec)
    elif isinstance(spec, (str, os.PathLike)):
        configs = _load_file(Path(spec))
    else:
        raise TypeError(
            f"cannot load a spec from {type(spec).__name__}: give a TuningConfigs, a LayerConfig, a list "
            "of them, a {'layers': [...]} dict, or a path to a .json/.yaml/.yml file"
        )
    if not len(configs):
        raise ValueError("the spec has no layer configs: add at least one entry under 'layers'")
    logger.debug("loaded a tuning spec with %d layer config(s)", len(configs))
    return configs
