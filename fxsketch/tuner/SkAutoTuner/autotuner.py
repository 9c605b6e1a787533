"""Panther's `SKAutoTuner`, running on fxsketch: an adapter from the seed API to fxsketch's units.

Each layer (or `separate=False` group) is an `fxsketch.units.Unit` searched by the search
algorithm; `SKAutoTuner._search` is the whole trial loop (ask, build the plan entry, evaluate,
tell). A trial's model is the captured graph with that unit rewritten by
`fxsketch.rewrite.apply_plan` (the other layers dense), so every trial runs on the fxsketch ops. The user's model is never modified: the
methods that return a model return a new `torch.fx.GraphModule` in which each replaced layer sits
under its original qualified name.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import statistics
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import optuna
import torch.fx
from optuna.trial import TrialState
from torch import nn

from fxsketch import study_format as keys
from fxsketch.replacements import FactorCache, get_kind
from fxsketch.rewrite import apply_plan
from fxsketch.spec import TuningConfigs, load_spec
from fxsketch.tuner.SkAutoTuner.Configs import (
    LayerNameResolver,
    ParamsResolver,
    algorithm_space,
    units_to_configs,
)
from fxsketch.tuner.SkAutoTuner.results import dump_results, read_results
from fxsketch.tuner.SkAutoTuner.Searching import OptunaSearch
from fxsketch.units import Unit, invalid_reason

if TYPE_CHECKING:  # pandas is optional: only annotations name it
    import pandas as pd

__all__ = ["SKAutoTuner"]

log = logging.getLogger(__name__)

_REQUIRED_METHODS = ("initialize", "get_next_params", "update", "get_best_params", "get_best_score",
                     "reset", "is_finished")
_NO_RESOURCE = object()


class SKAutoTuner:
    """Auto-tuner for sketched layers: Panther's API on fxsketch's rewrite.

    Args:
        model: the model to tune; never modified.
        configs: the layers to tune and their spaces (a TuningConfigs, or any form `load_spec` takes).
        accuracy_eval_func: `model -> float`, higher is better. It may also accept keywords
            `params` (every sampled value of the trial, extra parameters included) and `resource`
            (the search algorithm's `get_resource()`, when it has one).
        search_algorithm: a SearchAlgorithm (default: `OptunaSearch()`, TPE).
        verbose: print one line per trial and a summary per layer.
        accuracy_threshold: with `optimization_eval_func`, the score is the speed when accuracy >=
            threshold, else -inf; otherwise the score is the accuracy.
        optimization_eval_func: `model -> float` to maximize (e.g. throughput) under the threshold.
        num_runs_per_param: evaluate each trial this many times and average.
        optmization_eval_func: the misspelling of a later Panther revision; deprecated alias.
        example_inputs: fxsketch extension, for models `torch.fx.symbolic_trace` cannot trace
            (they are then captured with `torch.export`).
        default_method: fxsketch extension: the replacement kind used when `params` names no
            `method` (default `"sketch"`, Panther's SKLinear/SKConv2d; `"svd"` is another).

    Raises:
        ValueError: a selector matches nothing, a layer is selected twice, or `params` holds a
            parameter no replacement kind takes while no evaluation function accepts `params`.
    """

    def __init__(
        self,
        model: nn.Module,
        configs: Any,
        accuracy_eval_func: Callable[..., float],
        search_algorithm: Any = None,
        verbose: bool = False,
        accuracy_threshold: float | None = None,
        optimization_eval_func: Callable[..., float] | None = None,
        num_runs_per_param: int = 1,
        *,
        optmization_eval_func: Callable[..., float] | None = None,
        example_inputs: Any = None,
        default_method: str = "sketch",
    ) -> None:
        optimization_eval_func = _deprecated_alias(optimization_eval_func, optmization_eval_func)
        _check_arguments(model, accuracy_eval_func, optimization_eval_func, num_runs_per_param)
        self.model = model
        self.accuracy_eval_func = accuracy_eval_func
        self.optimization_eval_func = optimization_eval_func
        self.accuracy_threshold = accuracy_threshold
        self.num_runs_per_param = num_runs_per_param
        self.verbose = verbose
        self.search_algorithm = OptunaSearch() if search_algorithm is None else search_algorithm
        _check_algorithm(self.search_algorithm)
        self.default_method = default_method
        self._keywords = {id(f): _keywords(f) for f in (accuracy_eval_func, optimization_eval_func) if f}
        self._warn_score_rule()
        self._resolver = LayerNameResolver(model, example_inputs)
        self._params = ParamsResolver(self._resolver, default_method)
        self._records = {r.name: r for r in self._resolver.records}
        self._cache = FactorCache()
        self._results: list[dict[str, Any]] = []
        self._best_params: dict[str, dict[str, Any]] = {}
        self._best_scores: dict[str, float] = {}
        self._copy_weights: dict[str, bool] = {}
        self._tuned = False
        self.setConfigs(configs)

    # ------------------------------------------------------------------ configuration

    def getResolver(self) -> LayerNameResolver:
        """The layer name resolver of the model, for advanced layer inspection."""
        return self._resolver

    def getConfigs(self) -> TuningConfigs:
        """The resolved configurations: explicit layer-name lists and explicit spaces."""
        return self._configs

    def setConfigs(self, configs: Any) -> None:
        """Set new configurations; layer names and parameters are resolved at once.

        Results and best parameters found so far are kept; tuning again replaces those of the
        layers it tunes.
        """
        spec = load_spec(configs)
        per_config = self._params.config_units(spec)
        self._check_extras(spec, per_config)
        self._units = [unit for units in per_config for unit in units]
        self._auto = {u.key for config, units in zip(spec, per_config) if config.params == "auto" for u in units}
        self._configs = units_to_configs(per_config)

    # ------------------------------------------------------------------ tuning

    def tune(self) -> dict[str, dict[str, Any]]:
        """Search every layer (or group) in turn; returns the best parameters per layer name."""
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            for unit in self._units:
                self._search(unit)
            self._tuned = True
        finally:
            optuna.logging.set_verbosity(verbosity)
        return self.get_best_params()

    def apply_best_params(self) -> torch.fx.GraphModule:
        """A new model with each tuned layer replaced using its best parameters.

        The user's model is not modified: the result is a new `torch.fx.GraphModule` in which
        each replaced layer is reachable under its original qualified name
        (`result.get_submodule("fc1")`). Layers without a feasible trial stay dense.

        Raises:
            RuntimeError: nothing was tuned or loaded yet.
        """
        if not self._best_params and not self._tuned:
            raise RuntimeError("no best parameters yet: call tune() or load_tuning_results() first")
        if not self._best_params:
            warnings.warn("no layer had a feasible trial: the returned model is a dense copy", UserWarning,
                          stacklevel=2)
        plan = {name: plan_entry(params, self.default_method, f"the best parameters of {name}")
                for name, params in self._best_params.items()}
        return self._apply(plan, self._copy_weights)

    def replace_without_tuning(self) -> torch.fx.GraphModule:
        """A new model with every configured layer replaced using the first value of each spec.

        The first choice of a Categorical, the low bound of an Int/Float. No trial is run and
        the user's model is not modified (the result is a new GraphModule).
        """
        plan: dict[str, dict[str, Any]] = {}
        copy_weights: dict[str, bool] = {}
        for unit in self._units:
            entry = self._entry(unit, {name: spec.first() for name, spec in unit.space.items()})
            for name in unit.layers:
                plan[name], copy_weights[name] = entry, unit.copy_weights
        return self._apply(plan, copy_weights)

    # ------------------------------------------------------------------ results

    def get_best_params(self) -> dict[str, dict[str, Any]]:
        """The best parameters of each tuned layer (group members share their group's values)."""
        return {name: dict(params) for name, params in self._best_params.items()}

    def get_results_dataframe(self) -> pd.DataFrame:
        """Every trial as a pandas DataFrame: `layer_name`, one column per parameter, `score`,
        `accuracy`, `speed` (then `trial`, `state`, `note`).

        Raises:
            ImportError: pandas is not installed.
        """
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("get_results_dataframe() needs pandas: pip install pandas") from exc
        params = list(dict.fromkeys(k for r in self._results for k in r["params"]))
        rows = [{"layer_name": r["layer_name"], **r["params"], "score": r["score"], "accuracy": r["accuracy"],
                 "speed": r["speed"], "trial": r["trial"], "state": r["state"], "note": r["note"]}
                for r in self._results]
        columns = ["layer_name", *params, "score", "accuracy", "speed", "trial", "state", "note"]
        return pd.DataFrame(rows, columns=columns)

    def save_tuning_results(self, file_path: str | os.PathLike) -> None:
        """Write the results and best parameters as JSON (fxsketch never writes pickles)."""
        dump_results(file_path, {"default_method": self.default_method, "best_params": self._best_params,
                                 "best_scores": self._best_scores, "copy_weights": self._copy_weights,
                                 "results": self._results})

    def load_tuning_results(self, file_path: str | os.PathLike, trusted: bool = False) -> None:
        """Load results written by `save_tuning_results` (replacing the current ones).

        Args:
            file_path: the JSON file.
            trusted: also read a Panther pickle file. Unpickling runs code from the file, so
                this is refused unless the user says the file is trusted.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the file is not a results file, names layers this model lacks, or is a
                pickle while `trusted` is False.
        """
        data = read_results(file_path, trusted)
        unknown = [name for name in data["best_params"] if name not in self._records]
        if unknown:
            raise ValueError(f"{os.fspath(file_path)} holds parameters for {unknown}, which are not replaceable "
                             f"layers of this model (layers: {', '.join(self._records)})")
        self._best_params = data["best_params"]
        self._best_scores = data["best_scores"]
        self._copy_weights = {n: data["copy_weights"].get(n, True) for n in self._best_params}
        self._results = data["results"]
        self._tuned = True

    # ------------------------------------------------------------------ one unit's search

    def _search(self, unit: Unit) -> None:
        """The trial loop: ask the algorithm for values, evaluate their plan entry, tell the score."""
        alg = self.search_algorithm
        alg.reset()
        space = algorithm_space(unit.space)
        if isinstance(alg, OptunaSearch):
            alg.initialize(space, study_suffix=unit.key)
        else:
            alg.initialize(space)
        rows: list[dict[str, Any]] = []
        while not alg.is_finished() and (params := alg.get_next_params()) is not None:
            try:
                row = self._trial(unit, dict(params), len(rows))
            except BaseException:  # an interrupt: the pending Optuna trial must not count as finished
                if isinstance(alg, OptunaSearch):
                    alg.end_trial(TrialState.FAIL, interrupted=True)
                raise
            _tell(alg, row, self._worst())
            rows.append(row)
            self._results.append(row)
            if self.verbose:
                print(_trial_line(row))
        self._record_best(unit, rows)

    def _trial(self, unit: Unit, params: dict[str, Any], number: int) -> dict[str, Any]:
        """One trial's results row; a failing or pruned trial is recorded, not raised."""
        row = {"layer_name": unit.key, "layers": list(unit.layers), "trial": number, "params": params,
               "accuracy": math.nan, "speed": math.nan, "score": math.nan, "state": "COMPLETE", "note": ""}
        try:
            row.update(self._evaluate(unit, params))
        except optuna.TrialPruned as exc:
            row.update(state="PRUNED", note=str(exc) or "pruned by the pruner")
        except Exception as exc:  # noqa: BLE001  (a failing trial is recorded and the search goes on)
            row.update(state="FAIL", note=f"{type(exc).__name__}: {exc}")
            log.warning("trial %d of %s failed: %s", number, unit.key, row["note"])
        return row

    def _evaluate(self, unit: Unit, params: dict[str, Any]) -> dict[str, float]:
        """Build the unit's candidate from `params` and score it (averaged over num_runs_per_param)."""
        entry = self._entry(unit, params)
        if unit.key in self._auto:
            reason = invalid_reason(self._records, unit, entry)
            if reason:
                raise optuna.TrialPruned(reason)
        module = self._apply({name: entry for name in unit.layers}, {name: unit.copy_weights for name in unit.layers})
        resource = self._resource()
        accuracies, speeds = [], []
        for _ in range(self.num_runs_per_param):
            accuracies.append(self._call(self.accuracy_eval_func, module, params, resource, "accuracy_eval_func"))
            if self.optimization_eval_func is not None:
                speeds.append(self._call(self.optimization_eval_func, module, params, resource,
                                         "optimization_eval_func"))
        accuracy = statistics.fmean(accuracies)
        speed = statistics.fmean(speeds) if speeds else math.nan
        return {"accuracy": accuracy, "speed": speed, "score": self._score(accuracy, speed)}

    def _record_best(self, unit: Unit, rows: list[dict[str, Any]]) -> None:
        alg = self.search_algorithm
        best, score = alg.get_best_params(), alg.get_best_score()
        if best is None and rows and all(r["state"] == "FAIL" for r in rows):
            raise RuntimeError(f"every trial of {unit.key} failed; the first failure: {rows[0]['note']}")
        if best is None or score is None or not math.isfinite(score):
            log.warning("no trial of %s met the accuracy threshold: it stays dense", unit.key)
            for name in unit.layers:
                self._best_params.pop(name, None)
            if self.verbose:
                print(f"[{unit.key}] no feasible trial in {len(rows)} trial(s): the layer stays dense")
            return
        for name in unit.layers:
            self._best_params[name] = dict(best)
            self._copy_weights[name] = unit.copy_weights
        self._best_scores[unit.key] = float(score)
        if self.verbose:
            print(f"[{unit.key}] best {_format(best)} score={score:.6g} ({len(rows)} trial(s) run)")

    # ------------------------------------------------------------------ helpers

    def _entry(self, unit: Unit, params: Mapping[str, Any]) -> dict[str, Any]:
        """The plan entry for a trial's values, which must come from the unit's space."""
        unknown = [k for k in params if k not in unit.space]
        if unknown:
            raise ValueError(f"the search algorithm returned {unknown}, which are not in the space "
                             f"{list(unit.space)} of {unit.key}")
        if "method" in unit.space and "method" not in params:
            raise ValueError(f"the search algorithm returned no 'method' for {unit.key}")
        return plan_entry(params, unit.method, f"the search algorithm's values for {unit.key}")

    def _apply(self, plan: dict[str, dict[str, Any]], copy_weights: Mapping[str, bool]) -> torch.fx.GraphModule:
        """Rewrite the captured graph with `plan`; layers with copy_weights=False get a fresh init."""
        copied = {n: e for n, e in plan.items() if copy_weights.get(n, True)}
        fresh = {n: e for n, e in plan.items() if n not in copied}
        module = apply_plan(self._resolver.graph_module, self._records, copied, self._cache, copy_weights=True)
        if fresh:
            module = apply_plan(module, self._records, fresh, self._cache, copy_weights=False)
        module.meta["fxsketch_plan"] = {n: dict(e) for n, e in plan.items()}
        return module

    def _resource(self) -> Any:
        get_resource = getattr(self.search_algorithm, "get_resource", None)
        return get_resource() if callable(get_resource) else _NO_RESOURCE

    def _call(self, fn: Callable[..., Any], module: nn.Module, params: dict[str, Any], resource: Any,
              what: str) -> float:
        accepted = self._keywords.get(id(fn), frozenset())
        kwargs: dict[str, Any] = {}
        if "params" in accepted:
            kwargs["params"] = dict(params)
        if "resource" in accepted and resource is not _NO_RESOURCE:
            kwargs["resource"] = resource
        value = float(fn(module, **kwargs))
        if math.isnan(value):
            raise ValueError(f"{what} returned NaN")
        return value

    def _worst(self) -> float:
        """The score of a failed, pruned or infeasible trial in the algorithm's direction."""
        return math.inf if getattr(self.search_algorithm, "direction", "maximize") == "minimize" else -math.inf

    def _score(self, accuracy: float, speed: float) -> float:
        if self.accuracy_threshold is None or self.optimization_eval_func is None:
            return accuracy
        return speed if accuracy >= self.accuracy_threshold else self._worst()

    def _warn_score_rule(self) -> None:
        has_threshold = self.accuracy_threshold is not None
        if has_threshold != (self.optimization_eval_func is not None):
            given, missing = (("accuracy_threshold", "optimization_eval_func") if has_threshold
                              else ("optimization_eval_func", "accuracy_threshold"))
            warnings.warn(f"{given} is set but {missing} is not: the score is the accuracy. Speed-under-"
                          f"accuracy tuning needs both accuracy_threshold and optimization_eval_func.",
                          UserWarning, stacklevel=3)

    def _check_extras(self, spec: TuningConfigs, per_config: list[list[Unit]]) -> None:
        """Extra parameters are only sampled for an evaluation function that receives them."""
        if any("params" in kw for kw in self._keywords.values()):
            return
        for index, (config, units) in enumerate(zip(spec, per_config)):
            extras = self._params.extra_params(config)
            if units and extras:
                methods = self._params.methods(config)
                accepted = sorted({p for m in methods for p in get_kind(m).param_names})
                raise ValueError(
                    f"parameter(s) {extras} of config {index} are not parameters of the "
                    f"replacement kind(s) {methods}, which take {accepted}. To co-tune them, give "
                    "accuracy_eval_func or optimization_eval_func a `params` keyword argument: it receives "
                    "every sampled value of the trial.")


def plan_entry(params: Mapping[str, Any], default_method: str, where: str) -> dict[str, Any]:
    """The plan entry `params` stand for: the method (`default_method` when unnamed) and its
    parameters, defaults filled in; extra parameters are left out, since no replacement takes them.

    Raises:
        ValueError: a parameter of the method has neither a value nor a default.
    """
    kind = get_kind(params.get("method", default_method))
    missing = [p for p in kind.param_names if p not in params and p not in kind.defaults]
    if missing:
        raise ValueError(f"{where} lack {missing[0]!r} (method {kind.name})")
    return {"method": kind.name, **{p: params.get(p, kind.defaults.get(p)) for p in kind.param_names}}


def _tell(alg: Any, row: Mapping[str, Any], worst: float) -> None:
    """Tell the algorithm a trial's score (`worst` for a failed or pruned trial); an OptunaSearch
    also finishes the trial in its state and keeps the accuracy, speed and note on it."""
    if not isinstance(alg, OptunaSearch):
        alg.update(row["params"], row["score"] if row["state"] == "COMPLETE" else worst)
        return
    alg.set_user_attr("fxsketch.layer", row["layer_name"])
    for key in ("accuracy", "speed"):
        alg.set_user_attr(f"fxsketch.{key}", None if math.isnan(row[key]) else row[key])
    if row["note"]:
        alg.set_user_attr(keys.NOTE, row["note"])
    if row["state"] == "COMPLETE":
        alg.update(row["params"], row["score"])
    else:
        alg.end_trial(TrialState[row["state"]])


def _deprecated_alias(canonical: Callable | None, misspelled: Callable | None) -> Callable | None:
    if misspelled is None:
        return canonical
    warnings.warn("optmization_eval_func is a misspelling kept for Panther compatibility; "
                  "use optimization_eval_func", DeprecationWarning, stacklevel=3)
    if canonical is not None:
        raise TypeError("pass optimization_eval_func or optmization_eval_func, not both")
    return misspelled


def _check_arguments(model: Any, accuracy_fn: Any, speed_fn: Any, runs: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(accuracy_fn):
        raise TypeError("accuracy_eval_func must be a callable taking a model and returning a float")
    if speed_fn is not None and not callable(speed_fn):
        raise TypeError("optimization_eval_func must be a callable taking a model and returning a float")
    if not isinstance(runs, int) or isinstance(runs, bool) or runs < 1:
        raise ValueError(f"num_runs_per_param must be a positive integer, got {runs!r}")


def _check_algorithm(alg: Any) -> None:
    missing = [m for m in _REQUIRED_METHODS if not callable(getattr(alg, m, None))]
    if missing:
        raise TypeError(f"search_algorithm {type(alg).__name__} lacks {missing}: implement the SearchAlgorithm "
                        "interface (fxsketch.tuner.SearchAlgorithm)")


def _keywords(fn: Callable[..., Any]) -> frozenset[str]:
    """Which of the optional keywords `params` and `resource` `fn` accepts."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return frozenset({"params", "resource"})
    named = {p.name for p in parameters
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return frozenset(named & {"params", "resource"})


def _format(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _trial_line(row: Mapping[str, Any]) -> str:
    head = f"[{row['layer_name']}] trial {row['trial']}: {_format(row['params'])}"
    if row["state"] != "COMPLETE":
        return f"{head} -> {row['state'].lower()}: {row['note']}"
    return f"{head} -> accuracy={row['accuracy']:.4f} speed={row['speed']:.4g} score={row['score']:.4g}"
