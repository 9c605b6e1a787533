"""Tuning-results files: JSON written by fxsketch; Panther's pickles read only when trusted.

The JSON file holds `best_params` (layer -> parameters), `best_scores` (layer or group -> score),
`copy_weights` (layer -> bool) and `results` (one row per trial). Non-finite numbers are written
as the strings "inf", "-inf" and "nan", so the file is strict JSON.
"""

# ruff: noqa: TRY004  (a malformed results file is a ValueError, whatever is wrong in it)
from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Mapping
from typing import Any

__all__ = ["FORMAT", "dump_results", "read_results"]

FORMAT = "fxsketch.tuner.results"
VERSION = 1
_NUMERIC = ("accuracy", "speed", "score")
_PICKLE_REFUSAL = (
    "{path} is a pickle file (the format Panther's SKAutoTuner wrote). Unpickling can run arbitrary "
    "code stored in the file, so fxsketch does not read pickles by default. If you wrote this file "
    "yourself and trust it, call load_tuning_results({path!r}, trusted=True); then "
    "save_tuning_results() converts it to fxsketch's JSON format."
)


def dump_results(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write `state` (best_params, best_scores, copy_weights, results, default_method) as JSON."""
    data = {"format": FORMAT, "version": VERSION, **_encode(dict(state))}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


def read_results(path: str | os.PathLike, trusted: bool = False) -> dict[str, Any]:
    """Read a results file into `{"best_params", "best_scores", "copy_weights", "results"}`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the content is not a results file, or it is a pickle and `trusted` is False.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a tuning results file is a path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"tuning results file {path!r} is a directory, not a file written by "
                                "save_tuning_results")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tuning results file {path!r} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:1] == b"\x80":
        if not trusted:
            raise ValueError(_PICKLE_REFUSAL.format(path=path))
        return _from_pickle(path, raw)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a tuning results file (invalid JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tuning results file: expected a JSON object with "
                         f"\"format\": \"{FORMAT}\" (written by save_tuning_results)")
    version = data.get("version", VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
        raise ValueError(f"{path} has tuning results format version {version!r}; this fxsketch reads versions up "
                         f"to {VERSION}: upgrade fxsketch")
    try:
        return _check(path, _decode(data))
    except ValueError as exc:
        if str(exc).startswith(path):
            raise
        raise ValueError(f"{path}: {exc}") from None


def _from_pickle(path: str, raw: bytes) -> dict[str, Any]:
    try:
        data = pickle.loads(raw)  # the user declared the file trusted
    except Exception as exc:  # noqa: BLE001  (unpickling can raise anything)
        raise ValueError(f"{path} could not be unpickled: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("best_params"), Mapping):
        raise ValueError(f"{path} holds no 'best_params' mapping: it is not a tuning results pickle")
    rows = data.get("results", [])
    if isinstance(rows, Mapping):  # {layer: [row, ...]}
        rows = [{"layer_name": layer, **row} for layer, layer_rows in rows.items() for row in layer_rows]
    return _check(path, {"best_params": data["best_params"], "best_scores": dict(data.get("best_scores", {})),
                         "copy_weights": dict(data.get("copy_weights", {})),
                         "results": [_panther_row(r) for r in rows]})


def _panther_row(row: Any) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise ValueError(f"a results row must be a dict, got {type(row).__name__}")
    params = row.get("params")
    if not isinstance(params, Mapping):
        params = {k: v for k, v in row.items() if k not in (*_NUMERIC, "layer_name", "state", "trial")}
    return {"layer_name": row.get("layer_name", ""), "trial": row.get("trial", 0), "params": dict(params),
            **{k: _float(row.get(k)) for k in _NUMERIC}, "state": row.get("state", "COMPLETE"),
            "note": row.get("note", "")}


def _check(path: str, data: Mapping[str, Any]) -> dict[str, Any]:
    best = data.get("best_params")
    if not isinstance(best, Mapping) or not all(isinstance(v, Mapping) for v in best.values()):
        raise ValueError(f"{path}: 'best_params' must map layer names to parameter dicts")
    rows = data.get("results", [])
    if not isinstance(rows, list) or not all(isinstance(r, Mapping) and "params" in r for r in rows):
        raise ValueError(f"{path}: 'results' must be a list of trial rows with 'params'")
    for key in ("best_scores", "copy_weights"):
        if not isinstance(data.get(key, {}), Mapping):
            raise ValueError(f"{path}: {key!r} must map layer names to values, got {type(data[key]).__name__}")
    bad = {k: v for k, v in data.get("copy_weights", {}).items() if isinstance(v, (str, list, dict, type(None)))}
    if bad:
        raise ValueError(f"{path}: 'copy_weights' values must be true or false, got {bad}")
    return {"best_params": {str(k): dict(v) for k, v in best.items()},
            "best_scores": {str(k): _float(v) for k, v in dict(data.get("best_scores", {})).items()},
            "copy_weights": {str(k): bool(v) for k, v in dict(data.get("copy_weights", {})).items()},
            "results": [dict(r) for r in rows]}


def _float(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number (or \"inf\", \"-inf\", \"nan\"), got {value!r}") from None


def _number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _encode(state: dict[str, Any]) -> dict[str, Any]:
    state["best_scores"] = {k: _number(v) for k, v in state.get("best_scores", {}).items()}
    state["results"] = [{k: _number(v) if k in _NUMERIC else v for k, v in r.items()} for r in state.get("results", [])]
    return state


def _decode(data: dict[str, Any]) -> dict[str, Any]:
    rows = data.get("results", [])
    if isinstance(rows, list):
        data["results"] = [{k: _row_float(i, k, v) if k in _NUMERIC else v for k, v in r.items()}
                           if isinstance(r, dict) else r for i, r in enumerate(rows)]
    return data


def _row_float(index: int, key: str, value: Any) -> float:
    try:
        return _float(value)
    except ValueError as exc:
        raise ValueError(f"'results'[{index}][{key!r}]: {exc}") from None
