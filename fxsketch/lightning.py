"""PyTorch Lightning accuracy functions for `fxsketch.optimize` (the `fxsketch[lightning]` extra).

    from fxsketch.lightning import LightningAccuracy

    acc = LightningAccuracy(lit_module, datamodule, attr="net", metric="val_loss", mode="min",
                            max_steps=30, val_check_interval=10, experiment_dir="runs/exp1")
    result = fxsketch.optimize(lit_module.net, spec, example_inputs=x, accuracy_fn=acc,
                               accuracy_threshold=acc.threshold(0.35), experiment_dir="runs/exp1",
                               search=fxsketch.SearchOptions(pruner=optuna.pruners.MedianPruner()))

Each call puts the candidate model (the rewritten network fxsketch builds for a trial) into a
copy of the user's LightningModule, optionally fine-tunes it briefly with `trainer.fit`, then runs
`trainer.validate` and returns the logged metric. `fxsketch.optimize` maximizes its accuracy
function, so a lower-is-better metric (`mode="min"`, e.g. `val_loss`) is returned negated; convert
a bar on the metric with `threshold()` and a returned score back with `metric_value()`.

During a fit, each validation reports the metric to the running Optuna trial (`trial.report`,
step = the trainer's global step) and asks the study's pruner (`trial.should_prune`); a pruned
trial stops training and raises `optuna.TrialPruned`. The running trial is the `trial=` argument, or
else the trial `fxsketch.optimize` is evaluating (`fxsketch.study_format.running_trial`); in a
plain `study.optimize(objective)`, pass `trial=trial`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
from pathlib import Path
from typing import Any, Iterable

import optuna
import torch
from torch import nn

from fxsketch.display import quiet_logger
from fxsketch.spec import read_config_file
from fxsketch.study_format import running_trial
from fxsketch.tuner import OptunaSearch

__all__ = ["LightningAccuracy", "LightningMetricError", "merge_config"]

INSTALL_HINT = "PyTorch Lightning is needed for fxsketch.lightning: pip install 'fxsketch[lightning]'"

# user attributes this module sets on a trial
METRIC_ATTR = "fxsketch.lightning.metric"
CHECKPOINT_ATTR = "fxsketch.lightning.checkpoint"
PRUNED_ATTR = "fxsketch.lightning.pruned_at_step"

_TRAINER_DEFAULTS = dict(logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0)


class LightningMetricError(ValueError):
    """The validation metric is missing (not logged) or not a finite number."""


def _lightning_for(obj: Any):
    """The Lightning package (`pytorch_lightning` or `lightning.pytorch`) whose LightningModule or
    LightningDataModule `obj` (an instance or a class) derives from; None if neither."""
    cls = obj if isinstance(obj, type) else type(obj)
    for base in cls.__mro__:
        if base.__name__ not in ("LightningModule", "LightningDataModule"):
            continue
        if base.__module__.startswith("pytorch_lightning"):
            import pytorch_lightning as pl
            return pl
        if base.__module__.startswith("lightning.pytorch"):
            import lightning.pytorch as pl
            return pl
    return None


def _overrides(module: nn.Module, pl, name: str) -> bool:
    return getattr(type(module), name, None) is not getattr(pl.LightningModule, name, None)


class _Moved(nn.Module):
    """Stands where a parameterized child of the LightningModule was, when the whole module was
    rewritten (`attr=None`): its weights now live in the candidate, reached through `forward`."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"the LightningModule's submodule {self.name!r} was rewritten by fxsketch into the candidate "
            f"model: call self(...) (the rewritten forward) in the step methods, or optimize the network "
            f"alone and pass attr=<its attribute name> to LightningAccuracy")


def _as_trial(obj: Any) -> optuna.trial.Trial | None:
    """An Optuna trial, or the pending trial of an `fxsketch.tuner.OptunaSearch` (None between trials)."""
    if obj is None or isinstance(obj, optuna.trial.Trial):
        return obj
    if isinstance(obj, OptunaSearch):
        return obj.pending_trial
    raise TypeError(f"trial must be an optuna.trial.Trial or an fxsketch.tuner.OptunaSearch, got {type(obj).__name__}")




class LightningAccuracy:
    """An accuracy function for `fxsketch.optimize` built from a LightningModule (and DataModule).

    Args:
        module: a LightningModule instance (copied for each call, never modified), or a callable
            returning a fresh one (e.g. the class, if its arguments have defaults). It must define
            `validation_step` logging `metric`; for a fit also `training_step` and
            `configure_optimizers`. Its step methods run the candidate model.
        datamodule: a LightningDataModule (or a callable returning one), or None when
            `val_dataloaders` / `train_dataloaders` (or the module's own `*_dataloader` hooks) supply data.
        attr: the attribute (dotted path) of `module` holding the network that was passed to
            `fxsketch.optimize`; each candidate is put there. None: the whole LightningModule was
            passed, and the candidate replaces its `forward` (the steps must call `self(...)`).
        metric: the name logged in `validation_step` (`self.log(metric, ...)`).
        mode: "max" (higher is better, returned as is) or "min" (lower is better, returned negated,
            since fxsketch maximizes accuracy; use `threshold()` for `accuracy_threshold`).
        max_epochs, max_steps: fine-tune each candidate with `trainer.fit` for at most this many
            epochs / optimizer steps before validating; both None (default): validate only.
        val_check_interval: during a fit, validate every this many training steps (an int; a float
            is a fraction of an epoch); each validation is a pruning step. Default: once per epoch.
        early_stopping: during a fit, stop when `metric` has not improved for this many validations
            (an int), or an `EarlyStopping` callback (copied for each call).
        callbacks: extra Lightning callbacks for the fit (copied for each call).
        prune: report each validation of a fit to the running Optuna trial and stop the trial when
            the study's pruner says so (raises `optuna.TrialPruned`).
        experiment_dir: with `save_checkpoints`, each trial's checkpoint is written to
            `experiment_dir/checkpoints/trial-NNNN.ckpt` (use the `experiment_dir` given to `optimize`).
        save_checkpoints: write per-trial checkpoints (default: True when `experiment_dir` is given).
        seed: seed Lightning (`seed_everything`) before each call, so trials train alike.
        trainer_kwargs: extra `Trainer` arguments (e.g. `accelerator="cpu"`, `limit_val_batches=4`);
            defaults: no logger, progress bar, model summary, Lightning checkpointing or sanity check.
        verbose: let Lightning print its informational messages (GPU available, ...) on each call.
    """

    def __init__(
        self,
        module: Any,
        datamodule: Any = None,
        *,
        attr: str | None = None,
        metric: str = "val_acc",
        mode: str = "max",
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        val_check_interval: int | float | None = None,
        early_stopping: int | Any = None,
        callbacks: Iterable[Any] = (),
        prune: bool = True,
        experiment_dir: str | os.PathLike | None = None,
        save_checkpoints: bool | None = None,
        seed: int | None = None,
        trainer_kwargs: dict[str, Any] | None = None,
        verbose: bool = False,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' (higher is better) or 'min' (lower is better, e.g. val_loss), "
                             f"got {mode!r}")
        if not isinstance(metric, str) or not metric:
            raise TypeError(f"metric must be the name logged in validation_step, got {metric!r}")
        for name, value in (("max_epochs", max_epochs), ("max_steps", max_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        template = module
        if callable(module) and not isinstance(module, nn.Module):
            template = module()  # a factory (or the class): build one to check it
        self._pl = _lightning_for(template)
        if self._pl is None:
            if _lightning_for_installed() is None:
                raise ImportError(INSTALL_HINT)
            raise TypeError(f"module must be a LightningModule (or a callable returning one), "
                            f"got {type(template).__name__}")
        self._factory = None if isinstance(module, nn.Module) else module
        self._template = template if isinstance(module, nn.Module) else None
        pl = self._pl
        if isinstance(template, type) or not isinstance(template, pl.LightningModule):
            raise TypeError(f"module must be a LightningModule instance or a callable returning one, "
                            f"got {template!r}")
        self.fit = max_epochs is not None or max_steps is not None
        missing = [m for m in ("validation_step",) + (("training_step", "configure_optimizers") if self.fit else ())
                   if not _overrides(template, pl, m)]
        if missing:
            raise TypeError(f"{type(template).__name__} does not define {', '.join(missing)}: LightningAccuracy "
                            f"validates with validation_step (logging {metric!r})"
                            + (" and fine-tunes with training_step/configure_optimizers" if self.fit else ""))
        if attr is not None:
            try:
                template.get_submodule(attr)
            except AttributeError:
                children = [n for n, _ in template.named_children()]
                raise ValueError(f"{type(template).__name__} has no submodule {attr!r} (its children: {children})") from None
        if datamodule is not None and _lightning_for(datamodule) is None and callable(datamodule):
            datamodule = datamodule()
        if datamodule is not None and not isinstance(datamodule, pl.LightningDataModule):
            raise TypeError(f"datamodule must be a LightningDataModule of the same Lightning package as the "
                            f"module ({pl.__name__}), got {type(datamodule).__name__}")
        if datamodule is None and val_dataloaders is None and not _overrides(template, pl, "val_dataloader"):
            raise ValueError("no validation data: pass datamodule=..., val_dataloaders=..., or define "
                             "val_dataloader() in the LightningModule")
        if (self.fit and datamodule is None and train_dataloaders is None
                and not _overrides(template, pl, "train_dataloader")):
            raise ValueError("max_epochs/max_steps fine-tune each candidate, which needs training data: pass "
                             "datamodule=..., train_dataloaders=..., or define train_dataloader()")
        if isinstance(early_stopping, bool) or (isinstance(early_stopping, int) and early_stopping < 1):
            raise ValueError(f"early_stopping must be a patience >= 1 or an EarlyStopping callback, got {early_stopping!r}")
        if early_stopping is not None and not self.fit:
            raise ValueError("early_stopping acts during a fit: give max_epochs or max_steps too")
        self.datamodule = datamodule
        self.attr, self.metric, self.mode = attr, metric, mode
        self.sign = 1.0 if mode == "max" else -1.0
        self.train_dataloaders, self.val_dataloaders = train_dataloaders, val_dataloaders
        self.max_epochs, self.max_steps, self.val_check_interval = max_epochs, max_steps, val_check_interval
        self.early_stopping, self.callbacks = early_stopping, list(callbacks)
        self.prune, self.seed = prune, seed
        self.experiment_dir = Path(experiment_dir) if experiment_dir is not None else None
        self.save_checkpoints = self.experiment_dir is not None if save_checkpoints is None else save_checkpoints
        if self.save_checkpoints and self.experiment_dir is None:
            raise ValueError("save_checkpoints=True needs experiment_dir= (the checkpoints go to experiment_dir/checkpoints)")
        self.trainer_kwargs = {**_TRAINER_DEFAULTS, **(trainer_kwargs or {})}
        self.verbose = verbose
        self.calls = 0
        self.last_trainer = None  # the Trainer of the latest call (for inspection)

    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike | dict[str, Any],
        module_class: Any,
        datamodule_class: Any = None,
        overrides: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> "LightningAccuracy":
        """LightningTune's config-driven setup: build from a base config (a .yaml/.json path or a dict).

        The config has up to three sections, each a dict of keyword arguments or LightningTune's
        `{"class_path": ..., "init_args": {...}}` form: `model` (for `module_class`), `data` (for
        `datamodule_class`) and `trainer` (`max_epochs`, `max_steps`, `val_check_interval` set the
        per-trial fit; the rest go to the `Trainer`). `overrides` maps dotted keys such as
        `"model.init_args.hidden_size"` or `"trainer.max_steps"` to values merged over the base
        (what LightningTune merged its sampled values into). Other keyword arguments are passed on.
        """
        base = _read_base_config(config)
        merged = merge_config(base, overrides or {})
        unknown = set(merged) - {"model", "data", "trainer"}
        if unknown:
            raise ValueError(f"unknown base config sections {sorted(unknown)}: use 'model', 'data' and 'trainer'")
        model_args, data_args = _init_args(merged, "model"), _init_args(merged, "data")
        trainer = dict(_init_args(merged, "trainer"))
        if data_args and datamodule_class is None:
            raise ValueError("the base config has a 'data' section but no datamodule_class was given")
        for key in ("max_epochs", "max_steps", "val_check_interval"):
            if key in trainer:
                kwargs.setdefault(key, trainer.pop(key))
        kwargs["trainer_kwargs"] = {**trainer, **(kwargs.get("trainer_kwargs") or {})}
        for section, given in (("model", module_class), ("data", datamodule_class)):
            named = (merged.get(section) or {}).get("class_path") if isinstance(merged.get(section), dict) else None
            if named and given is not None and named.rpartition(".")[2] != given.__name__:
                raise ValueError(f"the base config's {section}.class_path is {named!r}, but "
                                 f"{given.__name__} was given: pass the class it names")
        datamodule = datamodule_class(**data_args) if datamodule_class is not None else None
        acc = cls(functools.partial(module_class, **model_args), datamodule, **kwargs)
        acc.config = merged
        return acc

    # ------------------------------------------------------------------ the sign convention

    def threshold(self, value: float) -> float:
        """The `accuracy_threshold` for `optimize` meaning "metric at least (max) / at most (min) value"."""
        return self.sign * value

    def metric_value(self, score: float) -> float:
        """The metric behind a returned score (e.g. `Result.accuracy`)."""
        return self.sign * score

    # ------------------------------------------------------------------ evaluation

    def __call__(self, model: nn.Module, trial: Any = None) -> float:
        """Validate `model` (after a short fit, if configured) inside the LightningModule; the score.

        `trial` (for pruning and checkpoint names): an Optuna trial, or the `OptunaSearch` of an
        `fxsketch.tuner.SKAutoTuner` (its pending trial); default: the trial `fxsketch.optimize` is evaluating.

        Raises:
            LightningMetricError: `metric` was not logged, or is NaN/inf.
            optuna.TrialPruned: the study's pruner stopped the trial during the fit.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"LightningAccuracy takes the candidate nn.Module, got {type(model).__name__}")
        trial = _as_trial(trial)
        if trial is None and (self.prune or self.save_checkpoints):
            trial = running_trial.get()  # set by fxsketch.optimize around each evaluation
        with contextlib.ExitStack() as stack:
            if not self.verbose:
                stack.enter_context(quiet_logger(self._pl.__name__))  # its tips and GPU notices
            return self._evaluate(model, trial)

    def _evaluate(self, model: nn.Module, trial: optuna.trial.Trial | None) -> float:
        pl = self._pl
        self.calls += 1
        if self.seed is not None:
            pl.seed_everything(self.seed, verbose=False)
        candidate = copy.deepcopy(model) if self.fit else model  # a fit must not train shared weights
        was_training = candidate.training
        lit = self._assemble(candidate)
        if self.fit:
            lit.train()  # the copy trains (dropout, batch norm), as a fresh fit would
        pruning = _PruningState()
        callbacks = self._fit_callbacks(trial, pruning) if self.fit else []
        callbacks.append(_checkpoint_info(pl, self, trial))
        kwargs = dict(self.trainer_kwargs)
        if self.fit:
            kwargs.update(max_epochs=self.max_epochs if self.max_epochs is not None else (-1 if self.max_steps else None),
                          max_steps=self.max_steps if self.max_steps is not None else -1)
            if self.val_check_interval is not None:
                kwargs["val_check_interval"] = self.val_check_interval
                if isinstance(self.val_check_interval, int):
                    kwargs["check_val_every_n_epoch"] = None  # count steps across epochs
        trainer = pl.Trainer(callbacks=callbacks, **kwargs)
        self.last_trainer = trainer
        try:
            if self.fit:
                trainer.fit(lit, **self._data("train"))
                if pruning.step is not None:
                    return self._pruned(trial, pruning)
            trainer.validate(lit, **self._data("val"), verbose=False)
            value = self._read_metric(trainer)
            if trial is not None:
                trial.set_user_attr(METRIC_ATTR, value)
            if self.save_checkpoints and trial is not None:
                path = self.experiment_dir / "checkpoints" / f"trial-{trial.number:04d}.ckpt"
                path.parent.mkdir(parents=True, exist_ok=True)
                trainer.save_checkpoint(path)
                trial.set_user_attr(CHECKPOINT_ATTR, str(path))
            return self.sign * value
        finally:
            if not self.fit:
                candidate.train(was_training)

    def _data(self, stage: str) -> dict[str, Any]:
        if self.datamodule is not None:
            return {"datamodule": self.datamodule}
        if stage == "train":
            out = {}
            if self.train_dataloaders is not None:
                out["train_dataloaders"] = self.train_dataloaders
            if self.val_dataloaders is not None:
                out["val_dataloaders"] = self.val_dataloaders
            return out
        return {"dataloaders": self.val_dataloaders} if self.val_dataloaders is not None else {}

    def _assemble(self, candidate: nn.Module):
        """A copy of the LightningModule running `candidate` (the copy shares nothing else with the
        user's module; the candidate is not copied)."""
        template = self._template if self._template is not None else self._factory()
        fresh = self._template is None
        memo: dict[int, Any] = {}
        trainer = template.__dict__.get("_trainer")
        if trainer is not None:
            memo[id(trainer)] = None
        if self.attr is not None:
            memo[id(template.get_submodule(self.attr))] = candidate
            lit = template if fresh else copy.deepcopy(template, memo)
            if fresh:
                _set_submodule(lit, self.attr, candidate)
            return lit
        for name, child in template.named_children():
            if any(True for _ in child.parameters()):
                memo[id(child)] = _Moved(name)
        lit = copy.deepcopy(template, memo)
        lit._parameters.clear()  # top-level parameters were captured into the candidate too
        lit.fxsketch_model = candidate
        object.__setattr__(lit, "forward", candidate)  # self(...) runs the candidate
        return lit

    def _fit_callbacks(self, trial, pruning) -> list[Any]:
        pl = self._pl
        callbacks = [copy.deepcopy(c) for c in self.callbacks]
        if isinstance(self.early_stopping, int):
            callbacks.append(pl.callbacks.EarlyStopping(monitor=self.metric, mode=self.mode,
                                                        patience=self.early_stopping))
        elif self.early_stopping is not None:
            callbacks.append(copy.deepcopy(self.early_stopping))
        if self.prune and trial is not None:
            callbacks.append(_pruning_callback(pl, self, trial, pruning))
        return callbacks

    def _read_metric(self, trainer) -> float:
        metrics = trainer.callback_metrics
        if self.metric not in metrics:
            raise LightningMetricError(
                f"metric {self.metric!r} was not logged during validation (logged: {sorted(metrics) or 'nothing'}); "
                f"log it in validation_step with self.log({self.metric!r}, value)")
        raw = metrics[self.metric]
        value = float(raw.item() if isinstance(raw, torch.Tensor) else raw)
        if not math.isfinite(value):
            raise LightningMetricError(f"validation metric {self.metric!r} is {value} (the candidate diverged or the "
                                       f"metric is undefined on the validation data)")
        return value

    def _pruned(self, trial, pruning) -> float:
        trial.set_user_attr(PRUNED_ATTR, pruning.step)
        raise optuna.TrialPruned(f"TrialPruned: {self.metric}={pruning.value:.6g} at step {pruning.step} "
                                 f"(reported {pruning.reports} validation(s); the pruner stopped the trial)")

    def __repr__(self) -> str:
        how = f"fit(max_epochs={self.max_epochs}, max_steps={self.max_steps}) + validate" if self.fit else "validate"
        return f"LightningAccuracy({how}, metric={self.metric!r}, mode={self.mode!r})"


def _lightning_for_installed():
    for name in ("pytorch_lightning", "lightning.pytorch"):
        try:
            return __import__(name)
        except ImportError:
            continue
    return None


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


class _PruningState:
    def __init__(self) -> None:
        self.step: int | None = None
        self.value = math.nan
        self.reports = 0


def _pruning_callback(pl, acc: LightningAccuracy, trial: optuna.trial.Trial, state: _PruningState):
    class FxsketchPruning(pl.Callback):
        """Reports each validation of the fit to the Optuna trial; stops the fit when pruned."""

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking or str(getattr(trainer.state.fn, "value", trainer.state.fn)) != "fit":
                return
            raw = trainer.callback_metrics.get(acc.metric)
            if raw is None:
                return  # _read_metric says so after the fit
            value = float(raw)
            if not math.isfinite(value):
                return
            step = trainer.global_step
            trial.report(acc.sign * value, step)
            state.reports += 1
            if trial.should_prune():
                state.step, state.value = step, value
                trainer.should_stop = True

    return FxsketchPruning()


def _checkpoint_info(pl, acc: LightningAccuracy, trial):
    class FxsketchCheckpointInfo(pl.Callback):
        """Puts the trial's number, parameters and fxsketch attributes in each saved checkpoint."""

        def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
            info = {"metric": acc.metric, "mode": acc.mode, "attr": acc.attr}
            if trial is not None:
                info.update(trial=trial.number, params=dict(trial.params), user_attrs=dict(trial.user_attrs))
            checkpoint["fxsketch"] = info

    return FxsketchCheckpointInfo()


def _read_base_config(config: Any) -> dict[str, Any]:
    if isinstance(config, (str, os.PathLike)):
        config = read_config_file(Path(config), what="base config")
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise TypeError(f"a base config must be a dict (or a .yaml/.json file holding one), got {type(config).__name__}")
    return config


def merge_config(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with each dotted key of `overrides` (e.g. "model.init_args.lr") set."""
    merged = copy.deepcopy(base)
    for dotted, value in overrides.items():
        node = merged
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"cannot set {dotted!r}: {part!r} is {child!r}, not a section")
            node = child
        node[leaf] = value
    return merged


def _init_args(config: dict[str, Any], section: str) -> dict[str, Any]:
    """A section's keyword arguments: its `init_args` in the class_path form, else the section itself."""
    value = config.get(section) or {}
    if not isinstance(value, dict):
        raise ValueError(f"base config section {section!r} must be a mapping, got {value!r}")
    if "init_args" in value or "class_path" in value:
        stray = set(value) - {"class_path", "init_args"}
        if stray:
            raise ValueError(f"base config section {section!r} mixes class_path/init_args with {sorted(stray)}: "
                             f"put them under {section}.init_args")
        return dict(value.get("init_args") or {})
    return dict(value)
