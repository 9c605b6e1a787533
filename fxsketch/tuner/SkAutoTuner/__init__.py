"""`fxsketch.tuner.SkAutoTuner`: Panther's SKAutoTuner package, on fxsketch.

    from fxsketch.tuner.SkAutoTuner import SKAutoTuner, TuningConfigs, LayerConfig
    from fxsketch.tuner.SkAutoTuner.Configs import Int, Categorical, LayerNameResolver, ParamsResolver
    from fxsketch.tuner.SkAutoTuner.Searching import OptunaSearch

The package is also callable, for the older guide's `SkAutoTuner(parameter_bounds=...,
objective_function=...)`: calling it builds a `fxsketch.tuner.legacy.LegacyAutoTuner`.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from fxsketch.spec import LayerConfig, TuningConfigs
from fxsketch.tuner.legacy import LegacyAutoTuner
from fxsketch.tuner.SkAutoTuner import Configs, Searching, Visualizer  # noqa: F401  (documented submodules)
from fxsketch.tuner.SkAutoTuner.autotuner import SKAutoTuner

__all__ = ["LayerConfig", "SKAutoTuner", "TuningConfigs"]


class _CallablePackage(types.ModuleType):
    """A module type whose instances can be called: `SkAutoTuner(parameter_bounds=..., ...)`."""

    def __call__(self, *args: Any, **kwargs: Any) -> LegacyAutoTuner:
        """Build the legacy bounds-based tuner (see `fxsketch.tuner.legacy.LegacyAutoTuner`)."""
        return LegacyAutoTuner(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
