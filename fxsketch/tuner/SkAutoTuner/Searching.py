"""Panther's `SkAutoTuner.Searching`: the search-algorithm interface and its Optuna implementation.

`SKAutoTuner` drives any `SearchAlgorithm` one layer (or group) at a time: `reset()`, then
`initialize(space)`, then `get_next_params()` / `update(params, score)` until `is_finished()`.
`OptunaSearch` runs each of those searches as its own Optuna study, through Optuna's ask-and-tell
interface, so its samplers, pruners and storages are Optuna's own objects.
"""

# ruff: noqa: N999  (the module name is the seed API's import path)
from __future__ import annotations

import json
import logging
import math
import zlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from fxsketch.space import Categorical, ParamSpec, as_param_spec

if TYPE_CHECKING:  # pandas is optional: only annotations name it
    import pandas as pd

__all__ = ["OptunaSearch", "SearchAlgorithm"]

log = logging.getLogger(__name__)

INTERRUPTED_ATTR = "fxsketch.interrupted"
_DIRECTIONS = ("maximize", "minimize")


class SearchAlgorithm(ABC):
    """The interface `SKAutoTuner` drives; subclass it for a custom search strategy.

    The space given to `initialize` maps each parameter name to a plain list of choices
    (`Categorical` and legacy lists) or to an `Int`/`Float` spec object. An algorithm may also
    define `get_resource()`; its value is then passed as `resource=` to evaluation functions that
    accept that keyword (for resource-aware schemes such as Hyperband).
    """

    @abstractmethod
    def initialize(self, param_space: dict[str, Any]) -> None:
        """Start a search over `param_space`."""

    @abstractmethod
    def get_next_params(self) -> dict[str, Any] | None:
        """The next parameters to evaluate, or None when the search is over."""

    @abstractmethod
    def update(self, params: dict[str, Any], score: float) -> None:
        """Record the score of `params`."""

    @abstractmethod
    def save_state(self, filepath: str) -> None:
        """Write the algorithm's state to `filepath` (the tuner never calls this itself)."""

    @abstractmethod
    def load_state(self, filepath: str) -> None:
        """Read the state written by `save_state` (the tuner never calls this itself)."""

    @abstractmethod
    def get_best_params(self) -> dict[str, Any] | None:
        """The best parameters of the current search, or None."""

    @abstractmethod
    def get_best_score(self) -> float | None:
        """The best score of the current search, or None."""

    @abstractmethod
    def reset(self) -> None:
        """Forget the current search; the tuner calls this before each layer's search."""

    @abstractmethod
    def is_finished(self) -> bool:
        """Whether the current search is complete."""


class OptunaSearch(SearchAlgorithm):
    """Optuna-backed search: one study per layer (or group), TPE by default.

    Args:
        n_trials: the maximum number of trials of each study; a resumed study that already holds
            k finished trials runs only `n_trials - k` more.
        sampler: an Optuna sampler (TPE, Random, Grid, CMA-ES, ...), shared by every study.
            Default: a TPESampler per study, seeded from `seed` and the study's name so that
            one layer's draws never depend on another layer's budget.
        direction: "maximize" or "minimize" the score.
        study_name: base name of the studies; the tuner names each `"{study_name}:{layer}"`
            (the layer or group name alone when `study_name` is None).
        storage: an Optuna storage URL (`"sqlite:///study.db"`) or object, for persistence.
        load_if_exists: resume studies that already exist in `storage`.
        seed: seeds the default sampler.
        pruner: an Optuna pruner (fxsketch extension; default: Optuna's MedianPruner), acting on
            values reported with `report_intermediate`.
    """

    def __init__(
        self,
        n_trials: int = 100,
        sampler: optuna.samplers.BaseSampler | None = None,
        direction: str = "maximize",
        study_name: str | None = None,
        storage: str | optuna.storages.BaseStorage | None = None,
        load_if_exists: bool = False,
        seed: int | None = None,
        *,
        pruner: optuna.pruners.BasePruner | None = None,
    ) -> None:
        if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
            raise ValueError(f"n_trials must be a positive integer, got {n_trials!r}")
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
        self.n_trials = n_trials
        self.sampler = sampler
        self.direction = direction
        self.study_name = study_name
        self.storage = storage
        self.load_if_exists = load_if_exists
        self.seed = seed
        self.pruner = pruner
        self.studies: dict[str, optuna.Study] = {}
        self._study: optuna.Study | None = None
        self._space: dict[str, ParamSpec] = {}
        self._trial: optuna.Trial | None = None
        self._storage_obj: optuna.storages.BaseStorage | None = None

    # ------------------------------------------------------------------ the search protocol

    def initialize(self, param_space: dict[str, Any], study_suffix: str | None = None) -> None:
        """Create (or, with `load_if_exists`, resume) the study searching `param_space`.

        Args:
            param_space: name -> list of choices, Categorical, Int or Float.
            study_suffix: the tuner passes the layer or group name; the study is then named
                `"{study_name}:{study_suffix}"` (just the suffix when `study_name` is None).

        Raises:
            ValueError: the study exists in the storage and `load_if_exists` is False.
        """
        self._space = {name: _check_space_entry(name, spec) for name, spec in param_space.items()}
        self._abandon_pending()
        name = self._full_name(study_suffix)
        try:
            self._study = optuna.create_study(
                storage=self._get_storage(), sampler=self._sampler_for(name or ""), pruner=self.pruner,
                study_name=name, direction=self.direction, load_if_exists=self.load_if_exists)
        except optuna.exceptions.DuplicatedStudyError:
            raise ValueError(f"study {name!r} already exists in {self.storage!r}: pass load_if_exists=True "
                             "to resume it, or choose another study_name") from None
        self.studies[self._study.study_name] = self._study
        done = self.finished_trials()
        if done:
            log.info("resuming study %r: %d of %d trials already finished", self._study.study_name, done,
                     self.n_trials)

    def get_next_params(self) -> dict[str, Any] | None:
        """Ask the study for a trial and draw every parameter; None when the study is complete."""
        study = self.study
        if self.is_finished():
            return None
        self._abandon_pending()
        self._trial = study.ask()
        return {name: spec.suggest(self._trial, name) for name, spec in self._space.items()}

    @property
    def pending_trial(self) -> optuna.Trial | None:
        """The trial asked for by `get_next_params` and not yet told (None between trials)."""
        return self._trial

    def update(self, params: dict[str, Any], score: float) -> None:
        """Tell the study the score of the pending trial."""
        trial = self._pending("update")
        self._trial = None
        self._tell(trial, values=float(score))

    def is_finished(self) -> bool:
        """True once the study holds `n_trials` finished trials, or a grid sampler's grid is done."""
        if self._study is None:
            return False
        if isinstance(self.sampler, optuna.samplers.GridSampler) and self.sampler.is_exhausted(self._study):
            return True
        return self.finished_trials() >= self.n_trials

    def finished_trials(self) -> int:
        """Trials of the current study that finished (interrupted trials excluded)."""
        if self._study is None:
            return 0
        done = self._study.get_trials(deepcopy=False,
                                      states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
        return sum(1 for t in done if not t.user_attrs.get(INTERRUPTED_ATTR))

    def get_best_params(self) -> dict[str, Any] | None:
        """The parameters of the current study's best completed trial, or None."""
        best = self._best_trial()
        return None if best is None else dict(best.params)

    def get_best_score(self) -> float | None:
        """The score of the current study's best completed trial, or None."""
        best = self._best_trial()
        return None if best is None else best.value

    def reset(self) -> None:
        """Leave the current study (finished studies stay listed in `studies`)."""
        self._abandon_pending()
        self._study = None
        self._space = {}

    def save_state(self, filepath: str) -> None:
        """Write the current study's settings and finished trials as JSON."""
        study = self.study
        trials = [{
            "params": t.params,
            "distributions": {k: optuna.distributions.distribution_to_json(d) for k, d in t.distributions.items()},
            "value": _json_number(t.value),
            "state": t.state.name,
        } for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))]
        state = {"format": "fxsketch.OptunaSearch/1", "study_name": study.study_name, "direction": self.direction,
                 "n_trials": self.n_trials, "trials": trials}
        with open(filepath, "w") as f:
            json.dump(state, f, indent=2)

    def load_state(self, filepath: str) -> None:
        """Start a study holding the trials saved by `save_state` (in `storage` if one is set)."""
        try:
            with open(filepath, encoding="utf-8") as f:
                state = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"{filepath} is not a state file written by OptunaSearch.save_state (it is not JSON: "
                             f"{type(exc).__name__})") from None
        if not isinstance(state, dict) or state.get("format") != "fxsketch.OptunaSearch/1":
            raise ValueError(f"{filepath} was not written by OptunaSearch.save_state")
        self.direction, self.n_trials = state["direction"], state["n_trials"]
        self._abandon_pending()
        self._study = optuna.create_study(storage=self._get_storage(), sampler=self._sampler_for(state["study_name"]),
                                          pruner=self.pruner, study_name=state["study_name"],
                                          direction=self.direction, load_if_exists=self.load_if_exists)
        for t in state["trials"]:
            dists = {k: optuna.distributions.json_to_distribution(d) for k, d in t["distributions"].items()}
            value = None if t["value"] is None else float(t["value"])
            self._study.add_trial(optuna.trial.create_trial(
                params=t["params"], distributions=dists, value=value if t["state"] == "COMPLETE" else None,
                state=TrialState[t["state"]]))
        self.studies[self._study.study_name] = self._study

    # ------------------------------------------------------------------ Optuna extras

    @property
    def study(self) -> optuna.Study:
        """The current (after tuning: the last) Optuna study."""
        if self._study is None:
            raise RuntimeError("no study yet: run SKAutoTuner.tune() (or initialize()) first")
        return self._study

    def get_trials_dataframe(self) -> pd.DataFrame:
        """All trials of every study this search ran, with a `study` column (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("get_trials_dataframe needs pandas: pip install pandas") from exc
        frames = []
        for name, study in self.studies.items():
            frame = study.trials_dataframe()
            frame.insert(0, "study", name)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def set_user_attr(self, key: str, value: Any) -> None:
        """Set a user attribute on the pending trial (RuntimeError when none is pending)."""
        self._pending("set_user_attr").set_user_attr(key, value)

    def report_intermediate(self, value: float, step: int) -> None:
        """Report an intermediate value of the pending trial to the pruner (ignored outside a trial)."""
        if self._trial is None:
            log.debug("report_intermediate(%r, %r) outside a trial: ignored", value, step)
            return
        self._trial.report(float(value), int(step))

    def should_prune(self) -> bool:
        """Whether the pruner stops the pending trial; raise `optuna.TrialPruned` when it does."""
        return self._trial is not None and self._trial.should_prune()

    # ------------------------------------------------------------------ used by SKAutoTuner

    def end_trial(self, state: TrialState, interrupted: bool = False) -> None:
        """Finish the pending trial as PRUNED or FAIL (the tuner's path for non-scored trials)."""
        trial = self._pending("end_trial")
        self._trial = None
        if interrupted:
            trial.set_user_attr(INTERRUPTED_ATTR, True)
        self._tell(trial, state=state)

    # ------------------------------------------------------------------ helpers

    def _pending(self, what: str) -> optuna.Trial:
        if self._trial is None:
            raise RuntimeError(f"{what}: no pending trial; call get_next_params() first")
        return self._trial

    def _abandon_pending(self) -> None:
        if self._trial is not None and self._study is not None:
            self._trial.set_user_attr(INTERRUPTED_ATTR, True)
            self._tell(self._trial, state=TrialState.FAIL)
        self._trial = None

    def _tell(self, trial: optuna.Trial, **outcome: Any) -> None:
        try:
            self.study.tell(trial, **outcome)
        except RuntimeError as exc:
            # GridSampler calls Study.stop() once its grid is done, which Optuna only allows inside
            # study.optimize; the trial is stored by then, and is_finished() sees the grid is done.
            if "Study.stop" not in str(exc):
                raise

    def _full_name(self, suffix: str | None) -> str | None:
        if suffix is None:
            return self.study_name
        return f"{self.study_name}:{suffix}" if self.study_name else suffix

    def _get_storage(self) -> optuna.storages.BaseStorage | None:
        if isinstance(self.storage, str):
            if self._storage_obj is None:
                self._storage_obj = optuna.storages.get_storage(self.storage)
            return self._storage_obj
        return self.storage

    def _sampler_for(self, name: str) -> optuna.samplers.BaseSampler:
        if self.sampler is not None:
            return self.sampler
        seed = None if self.seed is None else (self.seed + zlib.crc32(name.encode())) % 2**31
        return optuna.samplers.TPESampler(seed=seed)

    def _best_trial(self) -> optuna.trial.FrozenTrial | None:
        if self._study is None:
            return None
        done = self._study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not done:
            return None
        pick = max if self.direction == "maximize" else min
        return pick(done, key=lambda t: t.value)


def _check_space_entry(name: str, spec: Any) -> ParamSpec:
    """A space entry as a ParamSpec: a list is a Categorical, an Optuna distribution its spec."""
    if isinstance(spec, (list, tuple)):
        return Categorical(spec)
    if isinstance(spec, (ParamSpec, optuna.distributions.BaseDistribution)):
        return as_param_spec(spec)
    raise TypeError(f"search space entry {name!r} must be a list of choices, a Categorical/Int/Float or an "
                    f"Optuna distribution, got {spec!r}")


def _json_number(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return str(value)
