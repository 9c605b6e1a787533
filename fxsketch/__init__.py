"""fxsketch: faster, smaller PyTorch models by rewriting their FX graphs with tuned low-rank layers.

    result = fxsketch.optimize(model, spec, example_inputs=x, accuracy_fn=acc, accuracy_threshold=0.9)

Importing fxsketch registers the `fxsketch::` ops (needed to load saved `.pt2` files); it never
initializes CUDA, and it loads the search (and with it Optuna and pandas) only when `optimize` or
`Result` is first used.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

import torch

from fxsketch import kernels  # noqa: F401  (registers the fxsketch:: ops)
from fxsketch.allocate import allocate
from fxsketch.allocator import tune_allocator
from fxsketch.backend import backend
from fxsketch.calibrate import LayerStats, calibrate
from fxsketch.capture import CaptureError, capture, find_layers, other_modules
from fxsketch.deploy import ArtifactError, load, package, save
from fxsketch.nn import LowRankConv2d, LowRankLinear, SKConv2d, SKLinear
from fxsketch.records import LayerRecord
from fxsketch.replacements import KINDS, get_kind, register_kind
from fxsketch.recover import distill, masked_mse, rewrite_sequential
from fxsketch.options import CalibrationOptions, SearchOptions, StudyOptions
from fxsketch.plan import load_plan
from fxsketch.rewrite import rewrite
from fxsketch.select import match_layers
from fxsketch.sequential import sequential_stats
from fxsketch.spec import Categorical, Float, Int, LayerConfig, ParamSpec, TuningConfigs, load_spec
from fxsketch.version import __version__  # noqa: F401  (fxsketch.__version__)

# torch's own export code (deep copies of its tree specs) trips torch's LeafSpec deprecation; the
# warning is about torch internals, not about anything a user of fxsketch can change
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)

_SEARCH = {"optimize": "fxsketch.search", "Result": "fxsketch.result"}  # loaded on first use


def __getattr__(name: str) -> Any:
    if name in _SEARCH:
        value = getattr(importlib.import_module(_SEARCH[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fxsketch' has no attribute {name!r}")


def select(model: torch.nn.Module, selector: Any, example_inputs: Any = None) -> list[str]:
    """The qualified names of the Linear/Conv2d layers `selector` picks, in graph order.

    Args:
        model: a model or a captured GraphModule.
        selector: a name, regex or substring; a list of them; a dict with `pattern`, `type`,
            `contains`, `indices` or `range`; or a callable taking a `LayerRecord`.
        example_inputs: needed only for models that `torch.fx.symbolic_trace` cannot trace.

    Raises:
        ValueError: the selector matches nothing (the message names the closest layers).
    """
    gm = capture(model, example_inputs)
    records = find_layers(gm)
    return match_layers(records, selector, other_modules=other_modules(gm, records))


__all__ = [
    "ArtifactError", "CalibrationOptions", "CaptureError", "SearchOptions", "StudyOptions", "Categorical", "Float", "Int", "KINDS", "LayerConfig", "LayerRecord",
    "LowRankConv2d", "LowRankLinear", "ParamSpec", "SKConv2d", "SKLinear", "TuningConfigs",
    "LayerStats", "Result", "allocate", "backend", "calibrate", "capture", "distill", "masked_mse",
    "rewrite_sequential", "sequential_stats", "find_layers", "optimize", "package", "get_kind", "load", "load_plan", "load_spec", "register_kind", "rewrite", "save", "select",
    "tune_allocator",
]
