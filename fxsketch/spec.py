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
import decimal
import json
import logging
import math
import numbers
import operator
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import optuna

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

_CHOICE_TYPES = (type(None), bool, int, float, str)
_SPEC_FILE_SUFFIXES = (".json", ".yaml", ".yml")
_LAYER_KEYS = ("layer_names", "params", "separate", "copy_weights")
_SPEC_SHAPE = "{'layers': [{'layer_names': ..., 'params': {...}}, ...]}"
_PARAM_FORMS = (
    "a ParamSpec (Categorical/Int/Float), a list of choices, a scalar, "
    "or a dict with 'type' in ('categorical', 'int', 'float')"
)
_FLOAT_TOL = 1e-8


# --------------------------------------------------------------------------- helpers


@contextmanager
def _error_context(prefix: str) -> Iterator[None]:
    """Prefix any ValueError/TypeError raised inside with `prefix`, so nested errors say where."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        cls = TypeError if isinstance(exc, TypeError) else ValueError
        raise cls(f"{prefix}: {exc}") from exc


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{owner} {name} must be True or False, got {value!r}")
    return value


def _as_int(owner: str, name: str, value: Any) -> int:
    if not _is_int(value):
        raise TypeError(
            f"{owner} {name} must be an integer, got {value!r} ({type(value).__name__}); "
            "use Float for real-valued ranges"
        )
    return int(value)


def _as_float(owner: str, name: str, value: Any) -> float:
    if not _is_real(value):
        hint = " (in YAML write exponents with a dot, e.g. 1.0e-3)" if isinstance(value, str) else ""
        raise TypeError(f"{owner} {name} must be a number, got {value!r} ({type(value).__name__}){hint}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{owner} {name} must be finite, got {result!r}")
    return result


def _check_bounds(owner: str, low: float, high: float, log: bool) -> None:
    if low > high:
        raise ValueError(f"{owner} low ({low}) > high ({high}): give bounds with low <= high")
    if log and low <= 0:
        raise ValueError(f"{owner} with log=True needs low > 0, got low={low}: raise low or set log=False")


def _same_choice(a: Any, b: Any) -> bool:
    """Compare choices like Python does, but keep bools apart from ints (True is not 1 here)."""
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return a == b


# --------------------------------------------------------------------------- param specs


class ParamSpec(ABC):
    """The search space of one tunable parameter; subclasses are immutable value objects."""

    kind: ClassVar[str]

    @abstractmethod
    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        """Ask `trial` for a value of parameter `name` drawn from this space."""

    @abstractmethod
    def values(self) -> list[Any] | None:
        """Every value of the space, in order, or None when the space is continuous."""

    @abstractmethod
    def first(self) -> Any:
        """A deterministic default: the first choice, or the lower bound."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-friendly dict that `as_param_spec` turns back into an equal spec."""

    @abstractmethod
    def contains(self, value: Any) -> bool:
        """Whether `value` lies in this space (used to validate fixed or user-given values)."""


@dataclass(frozen=True)
class Categorical(ParamSpec):
    """A finite set of choices; each must be None, bool, int, float or str (Optuna's rule)."""

    choices: tuple[Any, ...]
    kind: ClassVar[str] = "categorical"

    def __post_init__(self) -> None:
        choices = self.choices
        if isinstance(choices, (str, bytes, Mapping)) or not isinstance(choices, Iterable):
            raise TypeError(f"Categorical choices must be a list or tuple of values, got {choices!r}")
        choices = tuple(choices)
        if not choices:
            raise ValueError("Categorical needs at least one choice: give a non-empty list")
        for choice in choices:
            if not isinstance(choice, _CHOICE_TYPES):
                raise ValueError(
                    f"Categorical choice {choice!r} ({type(choice).__name__}) is not allowed: "
                    "choices must be None, bool, int, float or str"
                )
        object.__setattr__(self, "choices", choices)

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        """Ask `trial` to pick one of the choices."""
        return trial.suggest_categorical(name, list(self.choices))

    def values(self) -> list[Any]:
        """The choices, in order."""
        return list(self.choices)

    def first(self) -> Any:
        """The first choice."""
        return self.choices[0]

    def to_dict(self) -> dict[str, Any]:
        """`{"type": "categorical", "choices": [...]}`."""
        return {"type": self.kind, "choices": list(self.choices)}

    def contains(self, value: Any) -> bool:
        """Whether `value` equals one of the choices (bools never match ints)."""
        return any(_same_choice(value, choice) for choice in self.choices)


@dataclass(frozen=True)
class Int(ParamSpec):
    """An integer range `low..high` (inclusive) on a grid of `step`, optionally log-sampled."""

    low: int
    high: int
    step: int = 1
    log: bool = False
    kind: ClassVar[str] = "int"

    def __post_init__(self) -> None:
        low, high = _as_int("Int", "low", self.low), _as_int("Int", "high", self.high)
        step, log = _as_int("Int", "step", self.step), _check_bool("Int", "log", self.log)
        _check_bounds("Int", low, high, log)
        if step < 1:
            raise ValueError(f"Int step must be >= 1, got {step}")
        if log and step != 1:
            raise ValueError(f"Int with log=True needs step=1 (Optuna forbids both), got step={step}")
        for name, value in (("low", low), ("high", high), ("step", step)):
            object.__setattr__(self, name, value)

    def suggest(self, trial: optuna.Trial, name: str) -> int:
        """Ask `trial` for an integer in the range."""
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def values(self) -> list[int]:
        """`low, low + step, ...` up to `high`."""
        return list(range(self.low, self.high + 1, self.step))

    def first(self) -> int:
        """The lower bound."""
        return self.low

    def to_dict(self) -> dict[str, Any]:
        """`{"type": "int", "low", "high", "step", "log"}`."""
        return {"type": self.kind, "low": self.low, "high": self.high, "step": self.step, "log": self.log}

    def contains(self, value: Any) -> bool:
        """Whether `value` is an integer on the grid within the bounds."""
        return _is_int(value) and self.low <= value <= self.high and (value - self.low) % self.step == 0


@dataclass(frozen=True)
class Float(ParamSpec):
    """A real range `[low, high]`, continuous or on a grid of `step`, optionally log-sampled."""

    low: float
    high: float
    step: float | None = None
    log: bool = False
    kind: ClassVar[str] = "float"

    def __post_init__(self) -> None:
        low, high = _as_float("Float", "low", self.low), _as_float("Float", "high", self.high)
        log = _check_bool("Float", "log", self.log)
        _check_bounds("Float", low, high, log)
        step = None if self.step is None else _as_float("Float", "step", self.step)
        if step is not None and step <= 0:
            raise ValueError(f"Float step must be > 0 (or None for a continuous range), got {step}")
        if log and step is not None:
            raise ValueError("Float with log=True cannot have a step (Optuna forbids both): drop one")
        for name, value in (("low", low), ("high", high), ("step", step)):
            object.__setattr__(self, name, value)

    def suggest(self, trial: optuna.Trial, name: str) -> float:
        """Ask `trial` for a float in the range."""
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def values(self) -> list[float] | None:
        """The grid `low, low + step, ...` up to `high` when stepped; None when continuous."""
        if self.step is None:
            return None
        low, step = decimal.Decimal(repr(self.low)), decimal.Decimal(repr(self.step))
        count = int((decimal.Decimal(repr(self.high)) - low) / step)
        return [float(low + i * step) for i in range(count + 1)]

    def first(self) -> float:
        """The lower bound."""
        return self.low

    def to_dict(self) -> dict[str, Any]:
        """`{"type": "float", "low", "high", "step", "log"}` (`step` may be None)."""
        return {"type": self.kind, "low": self.low, "high": self.high, "step": self.step, "log": self.log}

    def contains(self, value: Any) -> bool:
        """Whether `value` is a number within the bounds (and near a grid point when stepped)."""
        if not _is_real(value) or not self.low <= value <= self.high:
            return False
        if self.step is None:
            return True
        k = (value - self.low) / self.step
        return abs(k - round(k)) <= _FLOAT_TOL * max(1.0, abs(k))


_SPEC_TYPES: dict[str, type[ParamSpec]] = {cls.kind: cls for cls in (Categorical, Int, Float)}
_SPEC_KEYS: dict[str, tuple[str, ...]] = {
    "categorical": ("choices",),
    "int": ("low", "high", "step", "log"),
    "float": ("low", "high", "step", "log"),
}
_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "categorical": ("choices",),
    "int": ("low", "high"),
    "float": ("low", "high"),
}


def _spec_from_dict(data: Mapping[str, Any]) -> ParamSpec:
    """Build a ParamSpec from its `to_dict` form, checking the type and keys."""
    kind = data.get("type")
    if kind not in _SPEC_TYPES:
        raise ValueError(f"unknown param type {kind!r}: 'type' must be one of {sorted(_SPEC_TYPES)}")
    fields = {key: value for key, value in data.items() if key != "type"}
    allowed = _SPEC_KEYS[kind]
    unknown = sorted(map(str, set(fields) - set(allowed)))
    if unknown:
        raise ValueError(f"unknown keys {unknown} for a {kind!r} param: valid keys are {['type', *allowed]}")
    missing = [key for key in _REQUIRED_KEYS[kind] if key not in fields]
    if missing:
        raise ValueError(f"a {kind!r} param needs keys {missing}")
    return _SPEC_TYPES[kind](**fields)


def as_param_spec(value: Any) -> ParamSpec:
    """Normalize any accepted way of writing a search space into a ParamSpec.

    Accepts a ParamSpec (returned as is), a list/tuple of choices (the legacy format, a
    Categorical), a `{"type": ...}` dict (the `to_dict` form), or a single
    bool/int/float/str (a one-choice Categorical, i.e. a fixed value).

    Raises:
        TypeError: for any other kind of value.
        ValueError: for an invalid space (empty list, bad bounds, unknown dict keys...).
    """
    if isinstance(value, ParamSpec):
        return value
    distribution = _from_optuna(value)
    if distribution is not None:
        return distribution
    if isinstance(value, (list, tuple)):
        shorthand = _from_shorthand(value)
        return shorthand if shorthand is not None else Categorical(value)
    if isinstance(value, Mapping):
        if "type" not in value:
            raise ValueError(
                f"param dict {dict(value)!r} lacks 'type': add 'type' with one of {sorted(_SPEC_TYPES)}"
            )
        return _spec_from_dict(value)
    if isinstance(value, (bool, int, float, str)):
        return Categorical((value,))
    raise TypeError(f"cannot use {value!r} ({type(value).__name__}) as a param spec: give {_PARAM_FORMS}")


_SHORTHAND = {  # LightningTune's tuple shorthand: (kind, *arguments)
    "int": lambda lo, hi: Int(lo, hi),
    "int_log": lambda lo, hi: Int(lo, hi, log=True),
    "uniform": lambda lo, hi: Float(lo, hi),
    "loguniform": lambda lo, hi: Float(lo, hi, log=True),
    "discrete_uniform": lambda lo, hi, q: Float(lo, hi, step=q),
    "categorical": lambda choices: Categorical(choices),
}


def _from_shorthand(value: Sequence[Any]) -> ParamSpec | None:
    """`("int", 8, 64)`, `("loguniform", 1e-5, 1e-2)`, `("categorical", [...])`... or None."""
    if not value or not isinstance(value[0], str) or value[0] not in _SHORTHAND:
        return None
    args = list(value[1:])
    if value[0] == "categorical" and (len(args) != 1 or not isinstance(args[0], (list, tuple))):
        return None
    if value[0] != "categorical" and not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        return None
    try:
        return _SHORTHAND[value[0]](*args)
    except TypeError:
        raise ValueError(f"shorthand {tuple(value)!r} has the wrong number of values: "
                         "write ('int', low, high), ('discrete_uniform', low, high, q), ('categorical', [...])") from None


def _from_optuna(value: Any) -> ParamSpec | None:
    """Optuna's own distribution objects, as the equivalent spec (None for anything else)."""
    if type(value).__module__.split(".")[0] != "optuna":
        return None
    import optuna.distributions as dist

    if isinstance(value, dist.IntDistribution):
        return Int(value.low, value.high, step=value.step, log=value.log)
    if isinstance(value, dist.FloatDistribution):
        return Float(value.low, value.high, step=value.step, log=value.log)
    if isinstance(value, dist.CategoricalDistribution):
        return Categorical(value.choices)
    return None


# --------------------------------------------------------------------------- layer configs


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
        with _error_context(f"params[{name!r}]"):
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
        _check_bool("LayerConfig", "separate", self.separate)
        _check_bool("LayerConfig", "copy_weights", self.copy_weights)

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
            with _error_context(f"configs[{index}]"):
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
            with _error_context(f"layers[{index}]"):
                items.append(_as_layer_config(item))
        return cls(items)


# --------------------------------------------------------------------------- loading


def _parse_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        import yaml
    except ImportError as exc:
        raise ImportError(
            f"reading {path} needs PyYAML: pip install 'fxsketch[yaml]' (or use a .json spec)"
        ) from exc
    try:
        return yaml.safe_load(text)
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
    with _error_context(str(path)):
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
