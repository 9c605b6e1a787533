"""fxsketch[lightning]: `fxsketch.lightning.LightningAccuracy`, an accuracy function for
`fxsketch.optimize` built from a LightningModule (validate only, or a short fit per trial), with
lower-is-better metrics, Optuna pruning from validation steps and per-trial checkpoints.

A tiny MLP LightningModule on scikit-learn's digits; a few steps per fit."""

from __future__ import annotations

import copy
import functools
import math

import optuna
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("pytorch_lightning")

import fxsketch  # noqa: E402
import fxsketch as pr  # noqa: E402
from fxsketch import Categorical, LayerConfig  # noqa: E402
from fxsketch.lightning import CHECKPOINT_ATTR, METRIC_ATTR, PRUNED_ATTR, LightningAccuracy, LightningMetricError  # noqa: E402
from conftest import digits, val_loader  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = dict(accelerator="cpu")


class DigitsLit(pl.LightningModule):
    """64 -> 128 -> 10 MLP; logs val_loss and val_acc."""

    def __init__(self, lr: float = 1e-2, log_nan: bool = False) -> None:
        super().__init__()
        self.lr, self.log_nan = lr, log_nan
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch[0])
        loss = nn.functional.cross_entropy(logits, batch[1])
        self.log("val_loss", loss * math.nan if self.log_nan else loss)
        self.log("val_acc", (logits.argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class NoValidation(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(64, 10)

    def forward(self, x):
        return self.net(x)


@functools.lru_cache(maxsize=None)
def _trained_state() -> dict:
    torch.manual_seed(0)
    lit = DigitsLit()
    x, y, _, _ = digits()
    opt = torch.optim.Adam(lit.net.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(lit.net(x), y).backward()
        opt.step()
    return copy.deepcopy(lit.state_dict())


def trained_lit(**kwargs) -> DigitsLit:
    lit = DigitsLit(**kwargs)
    lit.load_state_dict(_trained_state())
    return lit.eval()


def val_data() -> DataLoader:
    _, _, xv, yv = digits()
    return DataLoader(TensorDataset(xv, yv), batch_size=512)  # one batch: the logged mean is exact


def train_data() -> DataLoader:
    x, y, _, _ = digits()
    return DataLoader(TensorDataset(x, y), batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(0))


def direct(net: nn.Module) -> tuple[float, float]:
    """(accuracy, cross-entropy) of `net` on the validation digits, computed without Lightning."""
    _, _, xv, yv = digits()
    with torch.no_grad():
        logits = net(xv)
    return (logits.argmax(1) == yv).float().mean().item(), nn.functional.cross_entropy(logits, yv).item()


class ListSampler(optuna.samplers.BaseSampler):
    """Draws the given values in order (one parameter), so a test knows which trial gets what."""

    def __init__(self, values) -> None:
        self.values = list(values)

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, name, distribution):
        return self.values[trial.number % len(self.values)]


# --------------------------------------------------------------------------- validate only


def test_validate_metric_is_the_models_accuracy_and_loss():
    lit = trained_lit()
    before = copy.deepcopy(lit.state_dict())
    acc = LightningAccuracy(lit, attr="net", metric="val_acc", val_dataloaders=val_data(), trainer_kwargs=CPU)
    loss = LightningAccuracy(lit, attr="net", metric="val_loss", mode="min", val_dataloaders=val_data(),
                             trainer_kwargs=CPU)
    want_acc, want_loss = direct(lit.net)
    assert want_acc > 0.9
    assert acc(lit.net) == pytest.approx(want_acc, abs=1e-6)
    assert loss(lit.net) == pytest.approx(-want_loss, rel=1e-5)  # mode="min": negated, fxsketch maximizes
    assert loss.threshold(0.3) == -0.3 and loss.metric_value(-0.25) == 0.25 and acc.threshold(0.9) == 0.9
    # a different candidate gives its own number; the user's module is untouched
    worse = copy.deepcopy(lit.net)
    with torch.no_grad():
        worse[0].weight.mul_(0.05)
    assert acc(worse) == pytest.approx(direct(worse)[0], abs=1e-6) and acc(worse) < want_acc - 0.05
    assert all(torch.equal(v, lit.state_dict()[k]) for k, v in before.items())
    assert lit.net is not worse and isinstance(lit.net[0], nn.Linear)


def test_whole_lightning_module_rewritten_attr_none():
    """attr=None: the LightningModule itself was captured; the candidate becomes its forward."""
    lit = trained_lit()
    x, _, _, _ = digits()
    gm = fxsketch.capture(lit, x[:8])
    acc = LightningAccuracy(lit, datamodule=None, val_dataloaders=val_data(), trainer_kwargs=CPU)
    assert acc(gm) == pytest.approx(direct(lit.net)[0], abs=1e-6)
    small = fxsketch.rewrite(lit, {"net.0": {"method": "svd", "low_rank": 2}}, x[:8])
    assert acc(small) == pytest.approx(direct(small)[0], abs=1e-6)
    assert direct(small)[0] < direct(lit.net)[0] - 0.05


class DataModule(pl.LightningDataModule):
    def train_dataloader(self):
        return train_data()

    def val_dataloader(self):
        return val_data()


def test_datamodule_and_factory():
    """A DataModule supplies the data; a factory (the class) builds the LightningModule per call."""
    lit = trained_lit()
    acc = LightningAccuracy(DigitsLit, DataModule(), attr="net", trainer_kwargs=CPU)
    assert acc(lit.net) == pytest.approx(direct(lit.net)[0], abs=1e-6)


# --------------------------------------------------------------------------- inside fxsketch.optimize


def test_optimize_val_loss_min_with_checkpoints(tmp_path):
    lit = trained_lit()
    x, _, _, _ = digits()
    acc = LightningAccuracy(lit, attr="net", metric="val_loss", mode="min", val_dataloaders=val_data(),
                            trainer_kwargs=CPU, experiment_dir=tmp_path)
    dense_loss = direct(lit.net)[1]
    bar = dense_loss + 0.15
    spec = LayerConfig(["0"], params={"low_rank": Categorical([2, 8, 24])})
    result = fxsketch.optimize(lit.net, spec, example_inputs=x[:32], accuracy_fn=acc,
                               accuracy_threshold=acc.threshold(bar), objective="flops", n_trials=3,
                               sampler=ListSampler([2, 8, 24]), experiment_dir=tmp_path)
    # the returned model meets the bar on the metric itself, and is rewritten
    assert result.plan and result.plan["0"]["low_rank"] in (8, 24)
    assert acc.metric_value(result.accuracy) <= bar
    assert direct(result.graph_module)[1] == pytest.approx(acc.metric_value(result.accuracy), rel=1e-5)
    assert result.dense_accuracy == pytest.approx(-dense_loss, rel=1e-5)
    # rank 2 is too lossy: infeasible, so not chosen
    trials = {t.user_attrs["fxsketch.entry"]["low_rank"]: t for t in result.study.trials}
    assert sorted(trials) == [2, 8, 24]
    assert trials[2].user_attrs[METRIC_ATTR] > bar
    # one checkpoint per trial, holding the trial's weights: reloaded into a rebuilt plan, same metric
    for rank, t in trials.items():
        assert t.user_attrs["fxsketch.accuracy"] == pytest.approx(-t.user_attrs[METRIC_ATTR])
        path = tmp_path / "checkpoints" / f"trial-{t.number:04d}.ckpt"
        assert t.user_attrs[CHECKPOINT_ATTR] == str(path) and path.exists()
        ckpt = torch.load(path, weights_only=False)
        assert ckpt["fxsketch"]["trial"] == t.number and ckpt["fxsketch"]["metric"] == "val_loss"
        assert ckpt["fxsketch"]["user_attrs"]["fxsketch.entry"] == {"method": "svd", "low_rank": rank, "precision": "float"}
        rebuilt = fxsketch.rewrite(DigitsLit().net, {"0": {"method": "svd", "low_rank": rank}}, x[:8])
        state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items()}
        rebuilt.load_state_dict(state)
        assert direct(rebuilt)[1] == pytest.approx(t.user_attrs[METRIC_ATTR], rel=1e-5)
    assert (tmp_path / "study.db").exists() and (tmp_path / "best_plan.json").exists()


def test_fit_per_trial_improves_the_candidate():
    """max_steps fine-tunes a copy of each candidate before validating; the candidate itself and
    the dense weights it shares are not trained."""
    lit = trained_lit(lr=0.2)
    x, _, _, _ = digits()
    crude = fxsketch.rewrite(lit.net, {"0": {"method": "svd", "low_rank": 3}}, x[:8])
    before = copy.deepcopy(crude.state_dict())
    validate = LightningAccuracy(lit, attr="net", val_dataloaders=val_data(), trainer_kwargs=CPU)
    tune = LightningAccuracy(lit, attr="net", train_dataloaders=train_data(), val_dataloaders=val_data(),
                             max_steps=40, seed=0, trainer_kwargs=CPU)
    plain, tuned = validate(crude), tune(crude)
    assert tune.last_trainer.global_step == 40
    assert tuned > plain + 0.03
    assert all(torch.equal(v, crude.state_dict()[k]) for k, v in before.items())
    assert validate(crude) == plain


# --------------------------------------------------------------------------- pruning


def _zeroed(net: nn.Module) -> nn.Module:
    bad = copy.deepcopy(net)
    with torch.no_grad():
        for p in bad.parameters():
            p.zero_()
    return bad


def test_pruning_from_validation_steps_in_a_study():
    """Each validation during the fit is reported; MedianPruner stops the bad trial at its first."""
    lit = trained_lit(lr=0.05)
    nets = {"good": lit.net, "bad": _zeroed(lit.net)}
    acc = LightningAccuracy(lit, attr="net", train_dataloaders=train_data(), val_dataloaders=val_data(),
                            max_steps=20, val_check_interval=5, seed=0, trainer_kwargs=CPU)
    study = optuna.create_study(direction="maximize", sampler=ListSampler(["good", "bad"]),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    steps = []

    def objective(trial):
        which = trial.suggest_categorical("net", ["good", "bad"])
        try:
            return acc(nets[which], trial=trial)  # a plain study.optimize passes its trial
        finally:
            steps.append(acc.last_trainer.global_step)

    study.optimize(objective, n_trials=2)
    good, bad = study.trials
    assert good.state == optuna.trial.TrialState.COMPLETE and good.value > 0.9
    assert sorted(good.intermediate_values) == [5, 10, 15, 20]
    assert bad.state == optuna.trial.TrialState.PRUNED
    assert bad.user_attrs[PRUNED_ATTR] == 5 and list(bad.intermediate_values) == [5]
    assert steps == [20, 5]  # the pruned fit stopped at its first validation


def test_pruning_inside_optimize():
    """Inside fxsketch.optimize the running trial is found and pruned the same way: optimize lets
    optuna.TrialPruned through (other exceptions of the accuracy function fail the trial)."""
    lit = trained_lit(lr=0.05)
    x, _, _, _ = digits()
    acc = LightningAccuracy(lit, attr="net", train_dataloaders=train_data(), val_dataloaders=val_data(),
                            max_steps=15, val_check_interval=5, seed=0, trainer_kwargs=CPU)
    spec = LayerConfig(["0"], params={"low_rank": Categorical([24, 1])})
    result = fxsketch.optimize(lit.net, spec, example_inputs=x[:32], accuracy_fn=acc, objective="flops",
                               n_trials=2, sampler=ListSampler([24, 1]),
                               pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    first, second = result.study.trials
    assert first.state == optuna.trial.TrialState.COMPLETE and sorted(first.intermediate_values) == [5, 10, 15]
    assert second.user_attrs["fxsketch.entry"]["low_rank"] == 1
    assert second.user_attrs[PRUNED_ATTR] == 5 and list(second.intermediate_values) == [5]
    assert second.state == optuna.trial.TrialState.PRUNED
    assert result.plan == {"0": {"method": "svd", "low_rank": 24, "precision": "float"}}


def test_pruning_through_the_tuner_search():
    """SKAutoTuner: pass its OptunaSearch as `trial`; the tuner records the pruned trial as PRUNED."""
    from fxsketch.tuner import OptunaSearch, SKAutoTuner
    from fxsketch.tuner import LayerConfig as TunerLayerConfig, TuningConfigs

    lit = trained_lit(lr=0.05)
    acc = LightningAccuracy(lit, attr="net", train_dataloaders=train_data(), val_dataloaders=val_data(),
                            max_steps=10, val_check_interval=5, seed=0, trainer_kwargs=CPU)
    search = OptunaSearch(n_trials=2, sampler=ListSampler([24, 1]),
                          pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    configs = TuningConfigs([TunerLayerConfig(["0"], params={"method": ["svd"], "low_rank": [24, 1]})])
    tuner = SKAutoTuner(copy.deepcopy(lit.net), configs, lambda m: acc(m, trial=search), search_algorithm=search)
    tuner.tune()
    first, second = search.study.trials
    assert first.state == optuna.trial.TrialState.COMPLETE and sorted(first.intermediate_values) == [5, 10]
    assert second.params["low_rank"] == 1 and second.state == optuna.trial.TrialState.PRUNED
    assert second.user_attrs[PRUNED_ATTR] == 5
    assert tuner.get_best_params()["0"]["low_rank"] == 24
    with pytest.raises(TypeError, match="trial must be an optuna.trial.Trial"):
        acc(lit.net, trial="trial-3")


def test_early_stopping_and_extra_callbacks():
    class Count(pl.Callback):
        def __init__(self):
            self.validations = 0

        def on_validation_end(self, trainer, pl_module):
            self.validations += 1

    lit = trained_lit(lr=0.0)  # nothing improves: early stopping ends the fit after patience + 1 checks
    user = Count()
    acc = LightningAccuracy(lit, attr="net", train_dataloaders=train_data(), val_dataloaders=val_data(),
                            metric="val_loss", mode="min", max_steps=100, val_check_interval=5, early_stopping=2,
                            callbacks=[user], trainer_kwargs=CPU)
    assert acc(lit.net) == pytest.approx(-direct(lit.net)[1], rel=1e-5)
    trainer = acc.last_trainer
    assert trainer.global_step == 15  # validations at 5, 10, 15: no improvement twice
    counts = [c for c in trainer.callbacks if isinstance(c, Count)]
    assert len(counts) == 1 and counts[0] is not user  # a copy per call
    assert counts[0].validations == 4  # 3 during the fit + the final validate
    assert user.validations == 0


# --------------------------------------------------------------------------- bad input


def test_module_without_validation_step_is_refused():
    with pytest.raises(TypeError, match="does not define validation_step"):
        LightningAccuracy(NoValidation(), val_dataloaders=val_data())


def test_fit_needs_training_step_and_data():
    class ValidateOnly(NoValidation):
        def validation_step(self, batch, batch_idx):
            self.log("val_acc", torch.tensor(1.0))

    with pytest.raises(TypeError, match="training_step, configure_optimizers"):
        LightningAccuracy(ValidateOnly(), val_dataloaders=val_data(), max_steps=5)
    with pytest.raises(ValueError, match="needs training data"):
        LightningAccuracy(trained_lit(), attr="net", val_dataloaders=val_data(), max_steps=5)
    with pytest.raises(ValueError, match="no validation data"):
        LightningAccuracy(trained_lit(), attr="net")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mode="maximize"), ValueError, "mode must be 'max'"),
    (dict(attr="encoder"), ValueError, r"no submodule 'encoder' \(its children: \['net'\]\)"),
    (dict(max_steps=0), ValueError, "max_steps must be None or a positive int"),
    (dict(early_stopping=3), ValueError, "early_stopping acts during a fit"),
    (dict(save_checkpoints=True), ValueError, "needs experiment_dir"),
    (dict(datamodule=object()), TypeError, "datamodule must be a LightningDataModule"),
])
def test_bad_arguments(kwargs, error, match):
    kwargs = {"attr": "net", "val_dataloaders": val_data(), **kwargs}
    with pytest.raises(error, match=match):
        LightningAccuracy(trained_lit(), **kwargs)


def test_not_a_lightning_module():
    with pytest.raises(TypeError, match="must be a LightningModule"):
        LightningAccuracy(nn.Linear(2, 2), val_dataloaders=val_data())


def test_without_lightning_installed_says_how_to_install(monkeypatch):
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch"):
        monkeypatch.setitem(__import__("sys").modules, name, None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'fxsketch\[lightning\]'"):
        LightningAccuracy(nn.Linear(2, 2), val_dataloaders=val_data())


def test_metric_not_logged():
    lit = trained_lit()
    acc = LightningAccuracy(lit, attr="net", metric="val_accuracy", val_dataloaders=val_data(), trainer_kwargs=CPU)
    with pytest.raises(LightningMetricError, match=r"'val_accuracy' was not logged.*\['val_acc', 'val_loss'\]"):
        acc(lit.net)
    # optimize checks the accuracy function on the dense model first and stops with the reason
    x, _, _, _ = digits()
    with pytest.raises(RuntimeError, match="'val_accuracy' was not logged"):
        fxsketch.optimize(lit.net, LayerConfig(["0"], params="auto"), example_inputs=x[:8], accuracy_fn=acc,
                          objective="flops", n_trials=1)


def test_nan_metric():
    lit = trained_lit(log_nan=True)
    acc = LightningAccuracy(lit, attr="net", metric="val_loss", mode="min", val_dataloaders=val_data(),
                            trainer_kwargs=CPU)
    with pytest.raises(LightningMetricError, match="'val_loss' is nan"):
        acc(lit.net)


# --------------------------------------------------------------------------- LightningTune's base config


class SizedData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        return train_data()

    def val_dataloader(self):
        return val_data()


def test_base_config_from_yaml_with_overrides(tmp_path):
    """A LightningTune-style YAML base config builds the module, data and trainer; dotted overrides
    (LightningTune's sampled values) win over the base values."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text("model:\n  class_path: DigitsLit\n  init_args:\n    lr: 0.5\n"
                   "data:\n  batch_size: 16\n"
                   "trainer:\n  max_steps: 3\n  accelerator: cpu\n")
    acc = LightningAccuracy.from_config(cfg, DigitsLit, SizedData, overrides={"model.init_args.lr": 0.01},
                                        attr="net", metric="val_loss", mode="min")
    assert acc.config["model"]["init_args"]["lr"] == 0.01 and acc.config["data"]["batch_size"] == 16
    assert acc.fit and acc.max_steps == 3 and acc.trainer_kwargs["accelerator"] == "cpu"
    assert acc.datamodule.batch_size == 16
    net = copy.deepcopy(trained_lit().net)
    acc(net)
    lit = acc.last_trainer.lightning_module
    assert lit.lr == 0.01  # the override, not the base 0.5
    assert acc.last_trainer.global_step == 3
    # the base value is used when nothing overrides it
    base = LightningAccuracy.from_config(cfg, DigitsLit, SizedData, attr="net", metric="val_loss", mode="min")
    base(copy.deepcopy(net))
    assert base.last_trainer.lightning_module.lr == 0.5


def test_base_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown base config sections"):
        LightningAccuracy.from_config({"modle": {}}, DigitsLit, attr="net")
    with pytest.raises(ValueError, match="no datamodule_class"):
        LightningAccuracy.from_config({"data": {"batch_size": 4}}, DigitsLit, attr="net")
    with pytest.raises(ValueError, match="cannot set 'model.lr.x'"):
        LightningAccuracy.from_config({"model": {"lr": 0.1}}, DigitsLit, overrides={"model.lr.x": 1}, attr="net")
    with pytest.raises(FileNotFoundError, match="base config file not found"):
        LightningAccuracy.from_config(tmp_path / "missing.yaml", DigitsLit, attr="net")
    with pytest.raises(ValueError, match="class_path is 'models.Other'"):
        LightningAccuracy.from_config({"model": {"class_path": "models.Other"}}, DigitsLit, attr="net")
    with pytest.raises(ValueError, match="put them under model.init_args"):
        LightningAccuracy.from_config({"model": {"class_path": "DigitsLit"}}, DigitsLit,
                                      overrides={"model.lr": 0.1}, attr="net")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        LightningAccuracy.from_config(bad, DigitsLit, attr="net")


# --------------------------------------------------------------------------- max_epochs (seed item 6)


def test_lightning_accuracy_fits_each_candidate_for_max_epochs():
    """Item 6's "short trainer.fit per trial (max epochs/steps)": max_epochs (max_steps is covered in
    test_lightning.py) trains a copy of the candidate for that many epochs, then validates."""
    pytest.importorskip("pytorch_lightning")
    from test_lightning import CPU, train_data, trained_lit, val_data

    from fxsketch.lightning import LightningAccuracy

    lit = trained_lit(lr=0.2)
    x = val_loader().dataset.tensors[0]
    crude = pr.rewrite(lit.net, {"0": {"method": "svd", "low_rank": 3}}, x[:8])
    before = {k: v.clone() for k, v in crude.state_dict().items()}
    validate = LightningAccuracy(lit, attr="net", val_dataloaders=val_data(), trainer_kwargs=CPU)
    tune = LightningAccuracy(lit, attr="net", train_dataloaders=train_data(), val_dataloaders=val_data(),
                             max_epochs=1, seed=0, trainer_kwargs=CPU)
    plain, tuned = validate(crude), tune(crude)
    assert tune.last_trainer.current_epoch == 1 and tune.last_trainer.global_step == len(train_data())
    assert tuned > plain
    assert all(torch.equal(v, crude.state_dict()[k]) for k, v in before.items())  # a copy was trained
