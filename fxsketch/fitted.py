"""A plan's fitted factors: the tensors of each replacement module as the search left them
(calibrated, refit, distilled), saved beside the plan JSON so that every route (`rewrite`, the
compile backend, `fxsketch apply`) rebuilds the optimized model bit for bit without calibration
data. They are plain tensors in one `torch.save` file, read with `weights_only=True` after its
SHA-256 (recorded in the JSON) is checked: a file from elsewhere can run no code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["MODULES", "REFERENCE", "factors_of", "fitted_factors", "install_factors", "load_factors",
           "save_factors"]

MODULES = "fxsketch_modules"  # GraphModule.meta: {layer: the path of its replacement module}
REFERENCE = "fitted_factors"  # the plan JSON's key: {"file": ..., "sha256": ..., "layers": [...]}
Factors = dict[str, dict[str, torch.Tensor]]  # {layer: {tensor name: tensor}}


def fitted_factors(gm: nn.Module) -> Factors:
    """The tensors of every replacement module of a rewritten GraphModule, by layer."""
    paths = getattr(gm, "meta", {}).get(MODULES, {})
    return {name: {key: t.detach() for key, t in gm.get_submodule(path).state_dict().items()}
            for name, path in paths.items()}


def save_factors(plan_path: str | os.PathLike, factors: Factors) -> dict[str, Any]:
    """Write `factors` beside the plan JSON at `plan_path` (`<stem>.factors.pt`); returns the
    reference the JSON records."""
    path = Path(plan_path)
    target = path.with_name(f"{path.stem}.factors.pt")
    flat = {f"{layer}\n{key}": t.contiguous().cpu() for layer, tensors in factors.items() for key, t in tensors.items()}
    buffer = io.BytesIO()
    torch.save(flat, buffer)
    target.write_bytes(buffer.getvalue())
    return {"file": target.name, "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(), "layers": sorted(factors)}


def load_factors(plan_path: str | os.PathLike, reference: Mapping[str, Any]) -> Factors:
    """The factors a plan JSON at `plan_path` refers to (its `REFERENCE` entry), checked."""
    if not isinstance(reference, Mapping) or not isinstance(reference.get("file"), str):
        raise ValueError(f"plan file {os.fspath(plan_path)!r}: {REFERENCE!r} must be {{'file': ..., 'sha256': ...}}")
    name = reference["file"]
    if Path(name).name != name:
        raise ValueError(f"plan file {os.fspath(plan_path)!r} names factors file {name!r}: it must be a file name "
                         "beside the plan, not a path")
    target = Path(plan_path).with_name(name)
    try:
        raw = target.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"plan file {os.fspath(plan_path)!r} keeps its fitted factors in {name!r}, which is "
                                "not beside it: copy both files together (Result.save_plan writes them)") from None
    if hashlib.sha256(raw).hexdigest() != reference.get("sha256"):
        raise ValueError(f"factors file {os.fspath(target)!r} is not the one plan {os.fspath(plan_path)!r} was "
                         "saved with (its SHA-256 differs): save the plan again with Result.save_plan")
    try:
        flat = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file or one holding more than tensors
        raise ValueError(f"factors file {os.fspath(target)!r} holds something other than plain tensors: "
                         f"{type(exc).__name__}") from None
    factors: Factors = {}
    for key, tensor in flat.items():
        layer, _, name_ = key.partition("\n")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"factors file {os.fspath(target)!r} holds a {type(tensor).__name__} for {key!r}")
        factors.setdefault(layer, {})[name_] = tensor
    return factors


def factors_of(source: Any) -> Factors:
    """The fitted factors that come with a plan: a Result's (from its rewritten model), a plan
    JSON's (from the file it names), none for a plain dict."""
    graph_module = getattr(source, "graph_module", None)
    if graph_module is not None:
        return fitted_factors(graph_module)
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
        data = _json(source)
        if isinstance(data, Mapping) and REFERENCE in data:
            return load_factors(source, data[REFERENCE])
    return {}


def install_factors(module: nn.Module, tensors: Mapping[str, torch.Tensor], layer: str) -> nn.Module:
    """Load a layer's stored tensors into its freshly built replacement `module` (same structure;
    an optional buffer the module was built without, such as a smoothed layer's `input_scale`, is
    taken from the stored tensors)."""
    for key, value in tensors.items():
        if key in module._buffers and module._buffers[key] is None:
            module._buffers[key] = torch.empty_like(value, device=_device_of(module, value))
    expected = module.state_dict()
    if set(expected) != set(tensors) or any(expected[k].shape != tensors[k].shape for k in expected):
        raise ValueError(f"the stored factors of layer {layer!r} do not fit its plan entry (stored "
                         f"{_shapes(tensors)}, the entry builds {_shapes(expected)}): the plan and its factors "
                         "file do not belong together, or the model changed")
    module.load_state_dict(tensors, strict=True)
    return module


def _device_of(module: nn.Module, fallback: torch.Tensor) -> torch.device:
    tensor = next(iter(module.state_dict().values()), None)
    return tensor.device if tensor is not None else fallback.device


def _shapes(tensors: Mapping[str, torch.Tensor]) -> str:
    return ", ".join(f"{k} {tuple(t.shape)}" for k, t in sorted(tensors.items()))


def _json(path: str | os.PathLike) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None  # not JSON: load_plan reports it
