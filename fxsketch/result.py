"""What `optimize` returns: the rewritten module, the plan, the measurements and the study."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import optuna
import pandas as pd
import torch.fx

from fxsketch import study_format as keys
from fxsketch.fitted import REFERENCE, fitted_factors, save_factors
from fxsketch.measure import Speedup
from fxsketch.plan import layer_cost
from fxsketch.records import LayerRecord
from fxsketch.replacements import get_kind
from fxsketch.report import write_report
from fxsketch.version import __version__

__all__ = ["Result", "trials_frame"]



@dataclass
class Result:
    """The outcome of `fxsketch.optimize`.

    Attributes:
        graph_module: the rewritten model (owns its weights; the input model is untouched).
        plan: `{qualified_name: {"method": ..., **params}}` for every replaced layer.
        accuracy: the rewritten model's accuracy (validated on the whole model).
        dense_accuracy: the original model's accuracy, measured in the same run.
        speedup: how many times faster the rewritten model runs than the original on the example
            inputs: the median of interleaved whole-model timings after warm-up (1.0 when nothing
            was replaced). Below 1 it is slower, and `notes` says so.
        measured_speedup: that measurement in full (`fxsketch.measure.Speedup`): its spread
            (interquartile range), whether it was stable, its physical bound and whether it
            exceeded it (suspect); None when nothing was replaced.
        notes: what the summary must say beside the figures (a plan slower than dense, no plan
            faster than dense on this machine).
        interrupted: the search was stopped by Ctrl-C; this is the best plan found before.
        flops_ratio: FLOPs of the matchable layers before over after, from the exact cost model.
        params_before / params_after: parameters of the matchable layers before and after.
        trials: one row per trial (layer, parameters, accuracy, speed, score, state, note).
        study: the Optuna study (one study; each trial tunes one layer or group).
        validation: the whole-model checks of the combined plan, one dict per back-off step.
        speedup_estimate: with objective "latency", the per-layer estimate the trials use
            (`fxsketch.measure.LayerTimer`) for the returned plan, beside its measured `speedup`.
        tables: the embedding tables the plan stores as int8 rows (`SearchOptions.int8_tables`).
        attention: the attention calls the plan computes in 16 bits (`SearchOptions.half_attention`).
    """

    graph_module: torch.fx.GraphModule
    plan: dict[str, dict[str, Any]]
    accuracy: float | None
    dense_accuracy: float | None
    speedup: float
    flops_ratio: float
    params_before: int
    params_after: int
    trials: pd.DataFrame
    study: optuna.Study
    records: list[LayerRecord] = field(repr=False, default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    accuracy_threshold: float | None = None
    pareto: list = field(default_factory=list)
    sensitivity: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)
    speedup_estimate: float | None = None
    measured_speedup: Speedup | None = None
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False
    tables: list[LayerRecord] = field(repr=False, default_factory=list)
    attention: list[LayerRecord] = field(repr=False, default_factory=list)

    def select(self, min_accuracy: float):
        """The fastest Pareto point (multi-objective search) whose accuracy is at least `min_accuracy`.

        Raises:
            ValueError: the search was not multi-objective, or no point reaches `min_accuracy`.
        """
        if not self.pareto:
            raise ValueError("no Pareto front: run optimize(..., search=SearchOptions(objectives=('accuracy', 'speed')))")
        fit = [p for p in self.pareto if p.accuracy >= min_accuracy]
        if not fit:
            best = max(p.accuracy for p in self.pareto)
            raise ValueError(f"no Pareto point reaches accuracy {min_accuracy}; the most accurate has {best:.4f}")
        return max(fit, key=lambda p: (p.speed, p.accuracy))

    def importance(self) -> pd.DataFrame:
        """Optuna's parameter importances, per tuning unit (one study can mix units' parameters)."""
        rows = []
        done = [t for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
        for unit in sorted({t.user_attrs.get(keys.UNIT) for t in done} - {None}):
            trials = [t for t in done if t.user_attrs.get(keys.UNIT) == unit]
            if len(trials) < 2:
                continue
            scratch = optuna.create_study(directions=self.study.directions)
            scratch.add_trials(trials)
            target = (lambda t: t.user_attrs.get(keys.SPEED, math.nan)) if len(self.study.directions) > 1 else None
            try:
                scores = optuna.importance.get_param_importances(scratch, target=target)
            except (RuntimeError, ValueError):  # a single distinct value, or nothing varied
                continue
            rows += [{"unit": unit, "param": p, "importance": v} for p, v in scores.items()]
        return pd.DataFrame(rows, columns=["unit", "param", "importance"])

    def layer_table(self) -> pd.DataFrame:
        """One row per matchable layer: kind, parameters (those not at the kind's default), rank, weight
        bits, and params/MFLOPs before and after."""
        rows = []
        for r in self.records:
            entry = self.plan.get(r.name)
            before, after = layer_cost(r, None), layer_cost(r, entry)
            defaults = get_kind(entry["method"]).defaults if entry else {}
            rows.append({
                "layer": r.name,
                "type": r.op_type,
                "shape": "×".join(map(str, r.weight_shape)),
                "kind": entry["method"] if entry else "dense",
                "params": ", ".join(f"{k}={v}" for k, v in (entry or {}).items()
                                    if k != "method" and (k not in defaults or defaults[k] != v)) or "-",
                "rank": after.rank if after.rank is not None else "-",
                "bits": after.bits,
                "params before": before.params,
                "params after": after.params,
                "MFLOPs before": round(before.flops_per_token * r.tokens / 1e6, 3),
                "MFLOPs after": round(after.flops_per_token * r.tokens / 1e6, 3),
            })
        return pd.DataFrame(rows)

    def summary(self) -> str:
        """A printable report: accuracy, speed and size before/after, then the per-layer table."""
        acc = "n/a" if self.accuracy is None else f"{self.accuracy:.4f}"
        dense = "n/a" if self.dense_accuracy is None else f"{self.dense_accuracy:.4f}"
        thr = "" if self.accuracy_threshold is None else f" (threshold {self.accuracy_threshold:.4f})"
        lines = [
            f"accuracy     dense {dense} -> optimized {acc}{thr}",
            f"latency      {self._latency_line()}",
            f"FLOPs        {self.flops_ratio:.2f}x fewer in the matchable layers",
            f"parameters   {self.params_before:,} -> {self.params_after:,} in the matchable layers",
            f"trials       {_trial_counts(self.trials)}",
            *([f"tables       {self._tables_line()}"] if self.tables else []),
            *([f"attention    {self._attention_line()}"] if self.attention else []),
            "",
            self.layer_table().to_string(index=False),
        ]
        lines[1:1] = [f"note         {n}" for n in self.notes]
        if not self.sensitivity.empty:
            lines += ["", "sensitivity (relative output error by rank; smallest rank under each error):",
                      self.sensitivity.to_string(index=False, float_format=lambda v: f"{v:.3g}")]
        if self.pareto:
            lines += ["", f"Pareto front ({len(self.pareto)} plans): accuracy / speed "
                      + ", ".join(f"{p.accuracy:.4f}/{p.speed:.2f}" for p in self.pareto)]
        return "\n".join(lines)

    def _tables_line(self) -> str:
        before = sum(r.weight_shape[0] * r.weight_shape[1] * r.dtype.itemsize for r in self.tables)
        after = sum(r.weight_shape[0] * r.weight_shape[1] + r.weight_shape[0] * r.dtype.itemsize for r in self.tables)
        return (f"{len(self.tables)} embedding table(s) stored as int8 rows ({', '.join(r.name for r in self.tables)}): "
                f"{before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")

    def _attention_line(self) -> str:
        kinds = sorted({self.plan[r.name]["method"] for r in self.attention})
        return (f"{len(self.attention)} attention call(s) computed in {'/'.join(kinds)} "
                f"({', '.join(r.name for r in self.attention)})")

    def _latency_line(self) -> str:
        if self.measured_speedup is None:
            if self.plan:
                return "not measured (see the note)"
            return "1.00x: nothing replaced, the model is the dense graph"
        line = self.measured_speedup.describe() + ", whole model on the example inputs"
        if self.speedup_estimate is not None:
            line += f"; the trials' per-layer estimate: {self.speedup_estimate:.2f}x"
        return line

    def __str__(self) -> str:
        return self.summary()

    def report(self, path: str | os.PathLike) -> str:
        """Write the optimization report (HTML with the `plot` extra, else PNG); returns its path."""
        return str(write_report(self, path))

    def save_plan(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON (`{"plan": {...}}` beside metadata; `fxsketch.load_plan` reads it) and
        the replacements' fitted factors beside it (`<stem>.factors.pt`, plain tensors), so that
        `rewrite`, the compile backend and `fxsketch apply` rebuild this model bit for bit."""
        data = {
            "fxsketch_version": __version__,
            "plan": self.plan,
            "accuracy": self.accuracy,
            "dense_accuracy": self.dense_accuracy,
            "speedup": self.speedup,
            "speedup_iqr": [m.low, m.high] if (m := self.measured_speedup) else None,
            "speedup_rounds": m.rounds if m else None,
            "speedup_stable": m.stable if m else None,
            "speedup_suspect": m.suspect if m else None,
            "speedup_bound": m.bound if m else None,
            "speedup_estimate": self.speedup_estimate,
            "notes": self.notes,
            "flops_ratio": self.flops_ratio,
        }
        factors = fitted_factors(self.graph_module)
        if factors:  # beside the JSON: every route rebuilds this model bit for bit without calibration
            data[REFERENCE] = save_factors(path, factors)
        with open(path, "w") as f:
            json.dump(data, f, indent=2, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"cannot write {value!r} to a plan file")


def _trial_counts(trials: pd.DataFrame) -> str:
    """The trials counted against n_trials and their states; draws answered from the study apart."""
    counted = trials[trials["counted"]] if "counted" in trials and not trials.empty else trials
    again = len(trials) - len(counted)
    return f"{len(counted)} ({_state_counts(counted)})" + (f"; {again} more drew values already tried" if again else "")


def _state_counts(trials: pd.DataFrame) -> str:
    if trials.empty:
        return "none"
    return ", ".join(f"{n} {s.lower()}" for s, n in trials["state"].value_counts().items())


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per fxsketch trial of `study`, with parameter names stripped of their layer prefix.
    `counted` is False for a trial that drew values the study already held (answered from the
    study, not counted against `n_trials`)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if keys.UNIT not in t.user_attrs:
            continue
        row: dict[str, Any] = {"number": t.number, "layer": t.user_attrs[keys.UNIT], "state": t.state.name}
        row.update(t.user_attrs.get(keys.ENTRY, {}))
        plan = t.user_attrs.get(keys.PLAN)
        if "method" not in row and isinstance(plan, dict):  # a whole-model trial: the kinds its plan uses
            row["method"] = "+".join(sorted({e.get("method", "dense") for e in plan.values()})) or "dense"
        for key, attr in (("accuracy", keys.ACCURACY), ("speed", keys.SPEED), ("score", keys.SCORE)):
            row[key] = t.user_attrs.get(attr, math.nan)
        row["speed_source"] = t.user_attrs.get(keys.SPEED_SOURCE, "")
        row["flops"] = t.user_attrs.get(keys.FLOPS, math.nan)  # the plan's FLOPs over dense, selected layers
        row["note"] = t.user_attrs.get(keys.NOTE, "")
        row["counted"] = keys.REUSED not in t.user_attrs
        row["duration_s"] = t.duration.total_seconds() if t.duration else math.nan
        rows.append(row)
    columns = ["number", "layer", "state", "method"]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=columns + ["accuracy", "speed", "score", "speed_source", "flops", "note",
                                               "counted", "duration_s"])
    ordered = columns + [c for c in frame.columns if c not in columns]
    return frame.reindex(columns=ordered)
