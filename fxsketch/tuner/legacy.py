"""The older Panther guide's tuner: Bayesian optimisation of an objective over parameter bounds.

    tuner = SkAutoTuner(parameter_bounds={"num_terms": (2, 16), "low_rank": (16, 128)},
                        objective_function=evaluate, n_initial_points=5, n_iterations=20)
    best_params, best_score = tuner.optimize()

`fxsketch.tuner.SkAutoTuner` is a package that is also callable: calling it builds a
`LegacyAutoTuner`. The search is Optuna's TPE sampler after `n_initial_points` random trials.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import optuna

__all__ = ["LegacyAutoTuner"]

log = logging.getLogger(__name__)


class LegacyAutoTuner:
    """Maximize `objective_function(*values)` over inclusive bounds.

    Args:
        parameter_bounds: name -> (low, high), inclusive; both ints give integer values, otherwise
            floats. The objective receives the values positionally, in this mapping's order.
        objective_function: returns the score to maximize.
        n_initial_points: random start-up trials before the model-guided ones.
        n_iterations: model-guided (TPE) trials after the start-up ones.
        seed: fxsketch extension: seeds the sampler for reproducible searches.

    Raises:
        ValueError / TypeError: for empty or malformed bounds, or bad trial counts.
    """

    def __init__(
        self,
        parameter_bounds: Mapping[str, tuple[float, float]],
        objective_function: Callable[..., float],
        n_initial_points: int = 5,
        n_iterations: int = 20,
        *,
        seed: int | None = None,
    ) -> None:
        self.parameter_bounds = _check_bounds(parameter_bounds)
        if not callable(objective_function):
            raise TypeError("objective_function must be callable: it receives the parameter values positionally")
        for name, value, low in (("n_initial_points", n_initial_points, 1), ("n_iterations", n_iterations, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.objective_function = objective_function
        self.n_initial_points = n_initial_points
        self.n_iterations = n_iterations
        self.seed = seed
        self.study: optuna.Study | None = None
        self._history: list[dict[str, Any]] = []

    def optimize(self) -> tuple[dict[str, Any], float]:
        """Run `n_initial_points + n_iterations` evaluations; returns (best_params, best_score).

        Each call starts a new search (and a new history).

        Raises:
            RuntimeError: no evaluation returned a number.
        """
        sampler = optuna.samplers.TPESampler(n_startup_trials=self.n_initial_points, seed=self.seed)
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            self.study = optuna.create_study(direction="maximize", sampler=sampler)
            self._history = []
            for _ in range(self.n_initial_points + self.n_iterations):
                self._step(self.study)
        finally:
            optuna.logging.set_verbosity(verbosity)
        done = [t for t in self.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            raise RuntimeError("no evaluation of objective_function returned a number")
        best = max(done, key=lambda t: t.value)
        return dict(best.params), best.value

    def get_evaluation_history(self) -> list[dict[str, Any]]:
        """Every evaluated point, in order: its parameter values and its `score`."""
        return [dict(point) for point in self._history]

    def _step(self, study: optuna.Study) -> None:
        trial = study.ask()
        values = {name: _suggest(trial, name, bounds) for name, bounds in self.parameter_bounds.items()}
        try:
            score = float(self.objective_function(*values.values()))
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        self._history.append({**values, "score": score})
        if math.isnan(score):
            log.warning("objective_function returned NaN for %s: the point is recorded as failed", values)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, score)


def _check_bounds(bounds: Any) -> dict[str, tuple[float, float]]:
    if not isinstance(bounds, Mapping) or not bounds:
        raise ValueError("parameter_bounds must be a non-empty dict of name -> (low, high)")
    checked = {}
    for name, pair in bounds.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"parameter_bounds[{name!r}] must be a (low, high) pair, got {pair!r}")
        low, high = pair
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in pair):
            raise TypeError(f"parameter_bounds[{name!r}] must hold numbers, got {pair!r}")
        if low > high:
            raise ValueError(f"parameter_bounds[{name!r}]: low {low} > high {high}")
        checked[str(name)] = (low, high)
    return checked


def _suggest(trial: optuna.Trial, name: str, bounds: tuple[float, float]) -> int | float:
    low, high = bounds
    if isinstance(low, numbers.Integral) and isinstance(high, numbers.Integral):
        return trial.suggest_int(name, int(low), int(high))
    return trial.suggest_float(name, float(low), float(high))
