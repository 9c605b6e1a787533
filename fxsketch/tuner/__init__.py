"""`fxsketch.tuner`: Panther's tuner API on fxsketch; switch by changing one import.

    from fxsketch.tuner import SKAutoTuner, LayerConfig, TuningConfigs, Categorical, Int, Float
    from fxsketch.tuner import SearchAlgorithm, OptunaSearch, ModelVisualizer
    from fxsketch.tuner import SkAutoTuner   # the older guide's callable tuner

`LayerConfig`, `TuningConfigs`, `Categorical`, `Int` and `Float` are fxsketch's own spec types.
Trials are built with fxsketch's rewrite, so they run on the fxsketch ops; the user's model is
never modified. See docs/migrating-from-panther.md for the differences from Panther.
"""

from __future__ import annotations

from fxsketch.spec import Categorical, Float, Int, LayerConfig, TuningConfigs
from fxsketch.tuner import SkAutoTuner  # noqa: F401  (the package, callable for the legacy API)
from fxsketch.tuner.SkAutoTuner.autotuner import SKAutoTuner
from fxsketch.tuner.SkAutoTuner.Searching import OptunaSearch, SearchAlgorithm
from fxsketch.tuner.SkAutoTuner.Visualizer import ModelVisualizer

__all__ = [
    "Categorical",
    "Float",
    "Int",
    "LayerConfig",
    "ModelVisualizer",
    "OptunaSearch",
    "SKAutoTuner",
    "SearchAlgorithm",
    "TuningConfigs",
]
