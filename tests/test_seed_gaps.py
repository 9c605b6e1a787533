"""Seed-document features that no other test covered (see docs/seed-features.md, "Gaps").

Each test restates one promise of the seed documents (../shared/seeds) or of issue 9 and checks it
on small real models; all are quick.
"""

from __future__ import annotations

import inspect
import json
import math
import pathlib
import warnings

import optuna
import pytest
import torch
from torch import nn

import fxsketch as pr
from fxsketch.nn import SKConv2d, SKLinear
from fxsketch.tuner import (
    Categorical, Float, Int, LayerConfig, ModelVisualizer, OptunaSearch, SearchAlgorithm, SKAutoTuner, TuningConfigs,
)
from test_tuner_support import SimpleModel, accuracy, pruning_accuracy, size_speed, trained_mlp, val_loader
from test_tuner_support import one_thread  # noqa: F401  (autouse fixture)

optuna.logging.set_verbosity(optuna.logging.WARNING)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _defaults(obj) -> dict:
    return {n: p.default for n, p in inspect.signature(obj).parameters.items()
            if p.default is not inspect.Parameter.empty}


# --------------------------------------------------------------------------- documented signatures


def test_documented_signatures_and_defaults():
    """tuner-api.rst's signatures: parameter order and every documented default."""
    params = list(inspect.signature(SKAutoTuner).parameters)
    assert params[:8] == ["model", "configs", "accuracy_eval_func", "search_algorithm", "verbose",
                          "accuracy_threshold", "optimization_eval_func", "num_runs_per_param"]
    assert _defaults(SKAutoTuner).items() >= {"search_algorithm": None, "verbose": False,
                                              "accuracy_threshold": None, "optimization_eval_func": None,
                                              "num_runs_per_param": 1}.items()
    assert list(inspect.signature(OptunaSearch).parameters)[:7] == [
        "n_trials", "sampler", "direction", "study_name", "storage", "load_if_exists", "seed"]
    assert _defaults(OptunaSearch).items() >= {"n_trials": 100, "sampler": None, "direction": "maximize",
                                               "study_name": None, "storage": None, "load_if_exists": False,
                                               "seed": None}.items()
    assert OptunaSearch().n_trials == 100
    assert list(inspect.signature(LayerConfig).parameters)[:4] == ["layer_names", "params", "separate",
                                                                  "copy_weights"]
    assert _defaults(LayerConfig).items() >= {"separate": True, "copy_weights": True}.items()
    assert _defaults(Int).items() >= {"step": 1, "log": False}.items()
    assert _defaults(Float).items() >= {"step": None, "log": False}.items()
    assert _defaults(ModelVisualizer.print_module_tree) == {"root_name": "model"}
    assert list(inspect.signature(pr.nn.SKLinear).parameters)[:5] == [
        "in_features", "out_features", "num_terms", "low_rank", "bias"]
    assert list(inspect.signature(pr.nn.SKConv2d).parameters)[:7] == [
        "in_channels", "out_channels", "kernel_size", "num_terms", "low_rank", "stride", "padding"]


def test_the_default_search_algorithm_is_optuna_search_with_tpe():
    """search_algorithm=None means OptunaSearch() (n_trials=100, TPE); the tuner runs on it."""
    tuner = SKAutoTuner(SimpleModel(), TuningConfigs([LayerConfig(["fc2"], {"low_rank": [4, 8]})]), lambda m: 0.5)
    search = tuner.search_algorithm
    assert type(search) is OptunaSearch and search.n_trials == 100 and search.direction == "maximize"
    search.n_trials = 3  # keep the test short
    tuner.tune()
    assert isinstance(search.study.sampler, optuna.samplers.TPESampler) and len(search.study.trials) == 3


def test_search_algorithm_is_abstract():
    """SearchAlgorithm is the abstract interface: it and incomplete subclasses cannot be built."""
    with pytest.raises(TypeError):
        SearchAlgorithm()

    class OnlyInitialize(SearchAlgorithm):
        def initialize(self, param_space):
            pass

    with pytest.raises(TypeError):
        OnlyInitialize()
    required = {"initialize", "get_next_params", "update", "save_state", "load_state", "get_best_params",
                "get_best_score", "reset", "is_finished"}
    assert required <= SearchAlgorithm.__abstractmethods__
    assert "get_resource" not in SearchAlgorithm.__abstractmethods__  # optional


# --------------------------------------------------------------------------- OptunaSearch


def test_optuna_search_seed_makes_the_search_reproducible():
    configs = TuningConfigs([LayerConfig(["fc2"], {"num_terms": Categorical([1, 2, 3]),
                                                   "low_rank": Int(4, 64, step=4)})])

    def drawn(seed):
        tuner = SKAutoTuner(SimpleModel(), configs, lambda m: 0.5, OptunaSearch(n_trials=6, seed=seed))
        tuner.tune()
        return list(zip(*(tuner.get_results_dataframe()[c] for c in ("num_terms", "low_rank"))))

    first = drawn(7)
    assert drawn(7) == first
    assert drawn(8) != first


@pytest.mark.parametrize("pruner", [optuna.pruners.NopPruner(),
                                    optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2),
                                    optuna.pruners.HyperbandPruner(min_resource=1, max_resource=3,
                                                                   reduction_factor=2)])
def test_lightningtune_pruners_are_injected_into_optuna_search(pruner):
    """LightningTune's pruner table: any Optuna pruner goes in as is (`pruner=`); NopPruner never prunes."""
    search = OptunaSearch(n_trials=8, sampler=optuna.samplers.RandomSampler(seed=0), pruner=pruner)
    configs = TuningConfigs([LayerConfig(["fc2"], {"num_terms": [1, 2], "low_rank": [1, 2, 4, 32, 64]})])

    acc = pruning_accuracy(search)

    tuner = SKAutoTuner(trained_mlp(), configs, acc, search)
    tuner.tune()
    assert search.study.pruner is pruner
    states = list(tuner.get_results_dataframe()["state"])
    assert len(states) == 8 and "COMPLETE" in states
    if isinstance(pruner, optuna.pruners.NopPruner):
        assert "PRUNED" not in states
    else:
        assert "PRUNED" in states


def test_optuna_visualizations_of_the_v2_external_tools_section():
    """plot_param_importances (not covered elsewhere) and the matplotlib backend, on the tuner's study."""
    pytest.importorskip("plotly")
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization.matplotlib import plot_optimization_history

    configs = TuningConfigs([LayerConfig(["fc2"], {"num_terms": [1, 2, 3], "low_rank": [4, 16, 64]})])
    tuner = SKAutoTuner(trained_mlp(), configs, accuracy, OptunaSearch(n_trials=6, seed=0))
    tuner.tune()
    study = tuner.search_algorithm.study
    figure = optuna.visualization.plot_param_importances(study)
    assert {"num_terms", "low_rank"} <= set(figure.data[0].y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks the matplotlib backend experimental
        axes = plot_optimization_history(study)
    assert len(axes.collections[0].get_offsets()) == 6
    import matplotlib.pyplot as plt

    plt.close("all")


# --------------------------------------------------------------------------- LightningTune specs via the tuner


def test_tuple_shorthand_and_optuna_distributions_work_in_tuner_configs():
    """Issue 9 item 6: shorthand and Optuna distributions are accepted wherever a spec is, SKAutoTuner included."""
    space = {"num_terms": ("categorical", [1, 2]),
             "low_rank": optuna.distributions.IntDistribution(4, 16, step=4)}
    tuner = SKAutoTuner(trained_mlp(), TuningConfigs([LayerConfig(["fc2"], space)]), accuracy,
                        OptunaSearch(n_trials=5, seed=0))
    (config,) = tuner.getConfigs()
    assert config.params == {"num_terms": Categorical([1, 2]), "low_rank": Int(4, 16, step=4)}
    tuner.tune()
    frame = tuner.get_results_dataframe()
    assert set(frame["num_terms"]) <= {1, 2} and set(frame["low_rank"]) <= {4, 8, 12, 16}
    assert tuner.replace_without_tuning().fc2.low_rank == 4
    with_lr = SKAutoTuner(trained_mlp(), TuningConfigs([LayerConfig(["fc2"], {
        "low_rank": ("int", 4, 8), "learning_rate": ("loguniform", 1e-4, 1e-2)})]),
        lambda model, params: accuracy(model), OptunaSearch(n_trials=2, seed=0))
    with_lr.tune()
    assert all(1e-4 <= lr <= 1e-2 for lr in with_lr.get_results_dataframe()["learning_rate"])


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_tuner_configs_load_from_yaml_and_json_files(tmp_path, suffix):
    """LightningTune's config-driven style: the tuner's configs can be a YAML or JSON spec file."""
    spec = {"layers": [{"layer_names": ["fc1", "fc2"],
                        "params": {"num_terms": [1, 2], "low_rank": {"type": "int", "low": 8, "high": 32,
                                                                      "step": 8}}}]}
    path = tmp_path / f"spec.{suffix}"
    if suffix == "yaml":
        yaml = pytest.importorskip("yaml")
        path.write_text(yaml.safe_dump(spec))
    else:
        path.write_text(json.dumps(spec))
    tuner = SKAutoTuner(trained_mlp(), str(path), accuracy, OptunaSearch(n_trials=2, seed=0))
    (config,) = tuner.getConfigs()
    assert config.layer_names == ("fc1", "fc2") and config.params["low_rank"] == Int(8, 32, step=8)
    assert set(tuner.tune()) == {"fc1", "fc2"}


# --------------------------------------------------------------------------- SKAutoTuner behaviour


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer0 = nn.Module()
        self.layer0.fc = nn.Linear(16, 16)
        self.layer1 = nn.Module()
        self.layer1.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.layer1.fc(torch.relu(self.layer0.fc(x)))


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.encoder(x))


def test_replaced_layers_are_reachable_under_nested_qualified_names():
    names = ["encoder.layer0.fc", "encoder.layer1.fc"]
    tuner = SKAutoTuner(Nested(), TuningConfigs([LayerConfig(names, {"num_terms": [2], "low_rank": [3]})]),
                        lambda m: 1.0, OptunaSearch(n_trials=1, seed=0))
    tuner.tune()
    for built in (tuner.apply_best_params(), tuner.replace_without_tuning()):
        for name in names:
            layer = built.get_submodule(name)
            assert isinstance(layer, SKLinear) and (layer.num_terms, layer.low_rank) == (2, 3)
        assert isinstance(built.get_submodule("head"), nn.Linear)
        assert built(torch.randn(5, 16)).shape == (5, 4)


def test_layers_without_a_feasible_trial_stay_dense():
    """With an unreachable threshold every score is -inf: no best parameters, the model stays dense."""
    model = trained_mlp()
    tuner = SKAutoTuner(model, TuningConfigs([LayerConfig(["fc2"], {"num_terms": [1], "low_rank": [4, 8]})]),
                        accuracy, OptunaSearch(n_trials=2, seed=0), accuracy_threshold=1.01,
                        optimization_eval_func=size_speed)
    tuner.tune()
    assert all(s == -math.inf for s in tuner.get_results_dataframe()["score"])
    assert tuner.get_best_params() == {}
    with pytest.warns(UserWarning, match="feasible"):
        built = tuner.apply_best_params()
    assert isinstance(built.get_submodule("fc2"), nn.Linear)
    x = torch.randn(3, 64)
    torch.testing.assert_close(built(x), model(x))


def test_apply_best_params_before_tuning_is_an_error():
    tuner = SKAutoTuner(SimpleModel(), TuningConfigs([LayerConfig(["fc2"], {"low_rank": [4]})]), lambda m: 1.0)
    with pytest.raises(RuntimeError, match="tune"):
        tuner.apply_best_params()


class Wide(nn.Module):
    """A Conv2d and four Linear layers of two shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 32, 3, padding=1)
        self.a1, self.a2 = nn.Linear(128, 128), nn.Linear(128, 128)
        self.b1, self.b2 = nn.Linear(128, 64), nn.Linear(128, 64)

    def forward(self, x):
        x = torch.relu(self.conv(x)).mean((2, 3))
        x = x.repeat(1, 4)
        x = self.a2(torch.relu(self.a1(x)))
        return self.b1(x) + self.b2(x)


def test_auto_params_cover_conv2d_and_group_same_shape_layers():
    """tuner-api.rst "How auto works": Linear and Conv2d get spaces, layers of one shape share one
    (listed together in getConfigs), the ranges follow the dimensions, the first values are cheaper than dense."""
    tuner = SKAutoTuner(Wide(), TuningConfigs([LayerConfig({"type": ["Linear", "Conv2d"]}, "auto")]), lambda m: 1.0)
    configs = list(tuner.getConfigs())
    by_layers = {c.layer_names: c for c in configs}
    assert set(by_layers) == {("conv",), ("a1", "a2"), ("b1", "b2")}  # smart grouping by shape
    for config in configs:
        assert set(config.params) == {"num_terms", "low_rank"} and config.separate
    assert by_layers[("a1", "a2")].params != by_layers[("b1", "b2")].params  # ranges follow the dimensions
    built = tuner.replace_without_tuning()
    assert isinstance(built.conv, SKConv2d) and isinstance(built.a1, SKLinear)
    for name in ("a1", "b1"):
        dense = dict(Wide().named_modules())[name].weight.numel()
        layer = built.get_submodule(name)
        assert layer.rank * (layer.in_features + layer.out_features) < dense  # cheaper than dense


# --------------------------------------------------------------------------- sketched layers (item 7)


def test_skconv2d_extra_repr_shows_the_sizes():
    layer = pr.nn.SKConv2d(3, 8, 3, num_terms=2, low_rank=4, stride=2, padding=1)
    text = repr(layer)
    assert text.startswith("SKConv2d(3, 8, kernel_size=(3, 3)")
    assert "num_terms=2" in text and "low_rank=4" in text and "stride=(2, 2)" in text and "padding=(1, 1)" in text


def _model_of_user_built_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(pr.nn.SKConv2d(3, 8, 3, num_terms=2, low_rank=2, padding=1), nn.ReLU(), nn.Flatten(),
                         pr.nn.SKLinear(8 * 6 * 6, 10, num_terms=2, low_rank=4)).eval()


def test_user_built_sketched_layers_export_to_the_fxsketch_ops():
    """`pr.nn.SKLinear`/`SKConv2d` run on the same fxsketch ops as the rewrite: one op node each in export."""
    model = _model_of_user_built_layers()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fxsketch.lowrank_linear.default) == 1
    assert targets.count(torch.ops.fxsketch.lowrank_conv2d.default) == 1
    assert not {torch.ops.aten.linear.default, torch.ops.aten.conv2d.default} & set(targets)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))


def test_user_built_sketched_layers_compile_and_run_on_the_triton_kernels(monkeypatch):
    model = _model_of_user_built_layers()
    x = torch.randn(2, 3, 6, 6)
    monkeypatch.setenv("FXSKETCH_KERNEL", "aten")
    with torch.no_grad():
        expected = model(x)
    monkeypatch.setenv("FXSKETCH_KERNEL", "triton")  # the interpreter on CPU (tests/conftest.py)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("FXSKETCH_KERNEL", "aten")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


def test_the_sketch_kind_of_the_rewrite_builds_the_same_modules_users_build():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(12, 8))
    gm = pr.rewrite(dense, {"0": {"method": "sketch", "num_terms": 2, "low_rank": 3}}, torch.randn(2, 12))
    built = gm.get_submodule("0")
    from fxsketch.replacements.sketch import layer_seed

    by_hand = SKLinear.from_dense(dense[0], num_terms=2, low_rank=3, seed=layer_seed("0"))
    assert type(built) is SKLinear and repr(built) == repr(by_hand)
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(built(x), by_hand(x))


# --------------------------------------------------------------------------- docs (item 8)


def test_migration_page_lists_each_public_name_and_the_import_change():
    page = (ROOT / "docs" / "migrating-from-panther.md").read_text()
    assert "from fxsketch.tuner import" in page and "import fxsketch as pr" in page
    for name in ("SKAutoTuner", "LayerConfig", "TuningConfigs", "Categorical", "Int", "Float", "SearchAlgorithm",
                 "OptunaSearch", "ModelVisualizer", "LayerNameResolver", "ParamsResolver", "SkAutoTuner",
                 "SKLinear", "SKConv2d", "optmization_eval_func", "get_evaluation_history", "trusted=True",
                 "copy_weights=False", "LightningAccuracy"):
        assert name in page, name


# --------------------------------------------------------------------------- fxsketch[lightning] (item 6)


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


# --------------------------------------------------------------------------- promises of docs/migrating-from-panther.md


def test_each_layers_default_sampler_is_seeded_by_seed_and_study_name():
    """One layer's draws do not depend on how many layers (and trials) came before it."""
    space = {"num_terms": Categorical([1, 2, 3]), "low_rank": Int(4, 64, step=4)}

    def fc2_draws(layers):
        search = OptunaSearch(n_trials=5, seed=3)
        tuner = SKAutoTuner(SimpleModel(), TuningConfigs([LayerConfig(layers, space)]), lambda m: 0.5, search)
        tuner.tune()
        frame = tuner.get_results_dataframe()
        assert set(search.studies) == set(layers)  # every layer's study, by name
        fc2 = frame[frame["layer_name"] == "fc2"]
        return list(zip(fc2["num_terms"], fc2["low_rank"]))

    assert fc2_draws(["fc2"]) == fc2_draws(["fc1", "fc2"]) == fc2_draws(["fc1", "fc3", "fc2"])


def test_nan_accuracy_fails_the_trial_and_the_search_goes_on():
    values = iter([float("nan"), 0.5, 0.7])
    tuner = SKAutoTuner(SimpleModel(), TuningConfigs([LayerConfig(["fc2"], {"low_rank": [4, 8, 16]})]),
                        lambda m: next(values), OptunaSearch(n_trials=3, seed=0))
    tuner.tune()
    assert list(tuner.get_results_dataframe()["state"]) == ["FAIL", "COMPLETE", "COMPLETE"]
    assert tuner.get_best_params()["fc2"]["low_rank"] in (4, 8, 16)


class FixedSearch(SearchAlgorithm):
    """Proposes the given parameter dicts in order; records every update."""

    def __init__(self, proposals):
        self.proposals, self.updates, self.i = list(proposals), [], 0

    def initialize(self, param_space):
        self.i = 0

    def get_next_params(self):
        self.i += 1
        return dict(self.proposals[self.i - 1])

    def update(self, params, score):
        self.updates.append((params, score))

    def get_best_params(self):
        return max(self.updates, key=lambda u: u[1])[0] if self.updates else None

    def get_best_score(self):
        return max((u[1] for u in self.updates), default=None)

    def reset(self):
        self.updates = []

    def is_finished(self):
        return self.i >= len(self.proposals)

    def save_state(self, filepath):
        pass

    def load_state(self, filepath):
        pass


def test_custom_algorithm_missing_values_defaults_and_failures():
    """A missing num_terms takes its default (1); a missing low_rank fails the trial naming it; the
    failed trial reaches the algorithm as update(params, -inf)."""
    search = FixedSearch([{"low_rank": 4}, {"num_terms": 2}])
    tuner = SKAutoTuner(SimpleModel(), TuningConfigs([LayerConfig(["fc2"], {"num_terms": [1, 2],
                                                                            "low_rank": [4, 8]})]),
                        lambda m: 0.5, search)
    tuner.tune()
    frame = tuner.get_results_dataframe()
    assert list(frame["state"]) == ["COMPLETE", "FAIL"]
    assert "low_rank" in frame["note"][1]
    assert search.updates[0][1] == 0.5 and search.updates[1][1] == -math.inf
    assert tuner.get_best_params() == {"fc2": {"low_rank": 4}}
    assert tuner.apply_best_params().fc2.num_terms == 1


def test_define_by_run_specs_are_refused_by_the_tuner_with_a_pointer_to_optimize():
    """Decision: SKAutoTuner keeps the seed's explicit spaces; define-by-run is fxsketch.optimize's."""
    from fxsketch.tuner import LayerConfig, SKAutoTuner, TuningConfigs

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    def space(trial, record):
        return {"method": "svd", "low_rank": trial.suggest_int("low_rank", 1, 4)}

    configs = TuningConfigs([LayerConfig(["0"], space)])
    with pytest.raises(ValueError, match=r"define-by-run.*fxsketch\.optimize"):
        SKAutoTuner(model, configs, accuracy_eval_func=lambda m: 1.0).tune()


def test_torchinfo_summary_counts_the_rewritten_models_parameters():
    """The v2 guide's "External Tools": torchinfo's summary of a tuned model shows the savings."""
    torchinfo = pytest.importorskip("torchinfo")
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    gm = pr.rewrite(model, {"0": {"method": "svd", "low_rank": 8}}, example_inputs=(torch.randn(4, 64),))
    dense = torchinfo.summary(model, input_size=(4, 64), verbose=0)
    tuned = torchinfo.summary(gm, input_size=(4, 64), verbose=0)
    assert dense.total_params == sum(p.numel() for p in model.parameters())
    assert tuned.total_params == 8 * (64 + 256) + 256 + 256 * 10 + 10
    assert tuned.trainable_params == tuned.total_params < dense.total_params
