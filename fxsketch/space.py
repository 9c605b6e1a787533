"""Parameter spaces: the values one replacement parameter may take (`Categorical`, `Int`, `Float`).

Every form a spec may write a space in (a ParamSpec, a list of choices, a scalar, a dict with a
`type`, LightningTune's tuple shorthand, an Optuna distribution) becomes a `ParamSpec` through
`as_param_spec`; a ParamSpec validates its bounds when made and draws from an Optuna trial.
"""

from __future__ import annotations

import decimal
import logging
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import optuna

__all__ = ["ParamSpec", "Categorical", "Int", "Float", "as_param_spec", "error_context", "check_bool"]

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
def error_context(prefix: str) -> Iterator[None]:
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


def check_bool(owner: str, name: str, value: Any) -> bool:
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

    def clipped(self, bound: int) -> Categorical | None:
        """The choices that are not numbers above `bound` (None when none is left)."""
        kept = tuple(c for c in self.choices
                     if isinstance(c, bool) or not isinstance(c, (int, float)) or c <= bound)
        if len(kept) == len(self.choices):
            return self
        return Categorical(kept) if kept else None

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
        step, log = _as_int("Int", "step", self.step), check_bool("Int", "log", self.log)
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

    def clipped(self, bound: int) -> Int | None:
        """This range up to `bound` (itself when it stays below; None when nothing is left)."""
        if self.high <= bound:
            return self
        if self.low > bound:
            return None
        return Int(self.low, self.low + (bound - self.low) // self.step * self.step, self.step, self.log)

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
        log = check_bool("Float", "log", self.log)
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
