"""The code examples of tuner-api.rst, tuner-api-v2.rst and skautotuner-readme.md, after the import
change, on real small models and the digits data (fewer trials than the documents use)."""

from __future__ import annotations

import json
import math
import random
import time

import optuna
import pytest
import torch

from fxsketch.nn import SKConv2d, SKLinear
from fxsketch.replacements import dense_cost
from fxsketch.tuner import (
    Categorical, Float, Int, LayerConfig, OptunaSearch, SearchAlgorithm, SKAutoTuner, TuningConfigs,
)
from conftest import accuracy, SimpleModel, trained_convnet, trained_mlp, val_loader

pytestmark = pytest.mark.usefixtures("one_thread")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def accuracy_eval_func(model):
    """The documents' accuracy function, verbatim, over the digits validation loader."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for data, target in val_loader():
            output = model(data)
            _, predicted = torch.max(output, 1)
            total += target.size(0)
            correct += (predicted == target).sum().item()
    return correct / total


def speed_eval_func(model):
    """The documents' throughput function (64 features, 3 repeats instead of 784 and 100)."""
    model.eval()
    x = torch.randn(128, 64)
    start = time.time()
    for _ in range(3):
        with torch.no_grad():
            model(x)
    elapsed = time.time() - start
    return 3 * 128 / max(elapsed, 1e-9)


def tuning_configs() -> TuningConfigs:
    config = LayerConfig(layer_names=["fc1", "fc2"],
                         params={"num_terms": Categorical([1, 2, 3]), "low_rank": Int(16, 128, step=16)},
                         separate=True, copy_weights=True)
    return TuningConfigs([config])


def grid_configs() -> TuningConfigs:
    return TuningConfigs([LayerConfig(["fc2"], {"num_terms": [1, 2, 3], "low_rank": [8, 16, 32, 64]})])


# --------------------------------------------------------------------------- tuner-api-v2: complete examples


def test_basic_tuning_with_accuracy_threshold():
    model = trained_mlp()
    with pytest.deprecated_call():  # the v2 document spells it optmization_eval_func
        tuner = SKAutoTuner(
            model=model, configs=tuning_configs(), accuracy_eval_func=accuracy_eval_func,
            accuracy_threshold=0.85, optmization_eval_func=speed_eval_func,
            search_algorithm=OptunaSearch(n_trials=5, seed=42), verbose=True)
    tuner.tune()
    optimized_model = tuner.apply_best_params()
    results_df = tuner.get_results_dataframe()
    table = results_df[["layer_name", "num_terms", "low_rank", "accuracy", "speed", "score"]]
    assert len(table) == 10 and set(table["layer_name"]) == {"fc1", "fc2"}
    assert any(math.isfinite(s) for s in table["score"])
    for name, params in tuner.get_best_params().items():
        layer = optimized_model.get_submodule(name)
        assert isinstance(layer, SKLinear) and layer.low_rank == params["low_rank"]
    study = tuner.search_algorithm.study
    assert study.study_name == "fc2"  # the last layer's study (in memory, named by the layer)
    assert len(study.trials) == 5


def test_optuna_visualization_of_the_study():
    pytest.importorskip("plotly")
    tuner = SKAutoTuner(trained_mlp(), grid_configs(), accuracy_eval_func, OptunaSearch(n_trials=3, seed=0))
    tuner.tune()
    study = tuner.search_algorithm.study
    optuna.visualization.plot_optimization_history(study)
    optuna.visualization.plot_parallel_coordinate(study)
    optuna.visualization.plot_slice(study)


def test_the_current_spelling_optimization_eval_func():
    tuner = SKAutoTuner(model=trained_mlp(), configs=tuning_configs(), accuracy_eval_func=accuracy_eval_func,
                        accuracy_threshold=0.85, optimization_eval_func=speed_eval_func,
                        search_algorithm=OptunaSearch(n_trials=2, seed=42))
    tuner.tune()
    assert len(tuner.get_results_dataframe()) == 4


def test_using_automatic_parameters(capsys):
    config = LayerConfig(layer_names={"type": "Linear"}, params="auto", separate=True)
    tuner = SKAutoTuner(model=trained_mlp(), configs=TuningConfigs([config]), accuracy_eval_func=accuracy_eval_func,
                        search_algorithm=OptunaSearch(n_trials=4, seed=0), verbose=True)
    tuner.tune()
    assert "[fc1] trial 0" in capsys.readouterr().out
    resolver = tuner.getResolver()
    for row in tuner.get_results_dataframe().to_dict("records"):
        record = resolver.record(row["layer_name"])
        rank = 2 * row["num_terms"] * row["low_rank"]
        efficient = rank * (record.in_features + record.out_features) * 2 < dense_cost(record).flops_per_token
        assert efficient == (row["state"] == "COMPLETE"), row  # auto spaces never evaluate inefficient draws


class MyCustomSearch(SearchAlgorithm):
    """The document's custom search algorithm, verbatim."""

    def __init__(self, n_trials=50):
        self.n_trials = n_trials
        self._param_space = {}
        self._trial_count = 0
        self._best_params = None
        self._best_score = float("-inf")

    def initialize(self, param_space):
        self._param_space = param_space
        self._trial_count = 0
        self._best_params = None
        self._best_score = float("-inf")

    def get_next_params(self):
        if self.is_finished():
            return None
        self._trial_count += 1
        params = {}
        for name, choices in self._param_space.items():
            if isinstance(choices, list):
                params[name] = random.choice(choices)
        return params

    def update(self, params, score):
        if score > self._best_score:
            self._best_score = score
            self._best_params = params.copy()

    def get_best_params(self):
        return self._best_params

    def get_best_score(self):
        return self._best_score

    def is_finished(self):
        return self._trial_count >= self.n_trials

    def reset(self):
        self._trial_count = 0
        self._best_params = None
        self._best_score = float("-inf")

    def save_state(self, filepath):
        import pickle
        with open(filepath, "wb") as f:
            pickle.dump({"trial_count": self._trial_count, "best_params": self._best_params,
                         "best_score": self._best_score}, f)

    def load_state(self, filepath):
        import pickle
        with open(filepath, "rb") as f:
            state = pickle.load(f)
        self._trial_count = state["trial_count"]
        self._best_params = state["best_params"]
        self._best_score = state["best_score"]


def test_custom_search_algorithm(tmp_path):
    random.seed(0)
    configs = TuningConfigs([LayerConfig(["fc1", "fc2"], {"num_terms": Categorical([1, 2, 3]),
                                                          "low_rank": [16, 32, 64]})])
    search = MyCustomSearch(n_trials=3)
    tuner = SKAutoTuner(model=trained_mlp(), configs=configs, accuracy_eval_func=accuracy_eval_func,
                        search_algorithm=search)
    best = tuner.tune()
    assert set(best) == {"fc1", "fc2"} and len(tuner.get_results_dataframe()) == 6
    search.save_state(tmp_path / "state.pkl")
    again = MyCustomSearch()
    again.load_state(tmp_path / "state.pkl")
    assert again.get_best_params() == best["fc2"]


def test_joint_vs_separate_tuning():
    separate_config = LayerConfig(layer_names=["fc1", "fc2", "fc3"], params={"num_terms": Categorical([1, 2, 3])},
                                  separate=True)
    joint_config = LayerConfig(layer_names=["fc1", "fc2", "fc3"], params={"num_terms": Categorical([1, 2, 3])},
                               separate=False)
    sep = SKAutoTuner(trained_mlp(), TuningConfigs([separate_config]), accuracy_eval_func, OptunaSearch(n_trials=2))
    joint = SKAutoTuner(trained_mlp(), TuningConfigs([joint_config]), accuracy_eval_func, OptunaSearch(n_trials=2))
    sep.tune()
    joint.tune()
    # fc3 (128 -> 10) gets no automatic rank (too narrow): it stays dense, alone or in the group
    assert len(sep.get_results_dataframe()) == 4 and len(joint.get_results_dataframe()) == 2
    assert set(joint.get_results_dataframe()["layer_name"]) == {"fc1+fc2"}
    shared = joint.get_best_params()
    assert shared["fc1"] == shared["fc2"] and "fc3" not in shared


# --------------------------------------------------------------------------- samplers and persistence


def test_sampler_examples_tpe_random_grid_and_cmaes():
    model, configs = trained_mlp(), tuning_configs()
    tpe = SKAutoTuner(model=model, configs=configs, accuracy_eval_func=accuracy_eval_func,
                      search_algorithm=OptunaSearch(n_trials=3, seed=42))
    rnd = SKAutoTuner(model=model, configs=configs, accuracy_eval_func=accuracy_eval_func,
                      search_algorithm=OptunaSearch(n_trials=3, sampler=optuna.samplers.RandomSampler(seed=42)))
    search_space = {"num_terms": [1, 2, 3], "low_rank": [8, 16, 32, 64]}
    grid = SKAutoTuner(model=model, configs=grid_configs(), accuracy_eval_func=accuracy_eval_func,
                       search_algorithm=OptunaSearch(sampler=optuna.samplers.GridSampler(search_space)))
    for tuner in (tpe, rnd, grid):
        tuner.tune()
    assert len(tpe.get_results_dataframe()) == len(rnd.get_results_dataframe()) == 6
    frame = grid.get_results_dataframe()
    assert len(frame) == 12 and len(set(zip(frame["num_terms"], frame["low_rank"]))) == 12  # the whole grid, once
    assert isinstance(tpe.search_algorithm.study.sampler, optuna.samplers.TPESampler)
    pytest.importorskip("cmaes")
    cma = SKAutoTuner(model=model, configs=configs, accuracy_eval_func=accuracy_eval_func,
                      search_algorithm=OptunaSearch(n_trials=3, sampler=optuna.samplers.CmaEsSampler(seed=42)))
    cma.tune()
    assert len(cma.get_results_dataframe()) == 6


def test_study_persistence(tmp_path):
    storage = f"sqlite:///{tmp_path / 'tuning_results.db'}"
    tuner = SKAutoTuner(
        model=trained_mlp(), configs=tuning_configs(), accuracy_eval_func=accuracy_eval_func,
        search_algorithm=OptunaSearch(n_trials=3, study_name="my_tuning_study", storage=storage,
                                      load_if_exists=True))
    tuner.tune()
    study = tuner.search_algorithm.study
    assert study.study_name == "my_tuning_study:fc2"
    assert set(study.best_params) == {"num_terms", "low_rank"} and 0 <= study.best_value <= 1
    trials_df = tuner.search_algorithm.get_trials_dataframe()
    assert len(trials_df) == 6 and set(trials_df["study"]) == {"my_tuning_study:fc1", "my_tuning_study:fc2"}


def test_optuna_search_api(tmp_path):
    with pytest.raises(ValueError):
        OptunaSearch(n_trials=0)
    with pytest.raises(ValueError):
        OptunaSearch(direction="sideways")
    search = OptunaSearch(n_trials=2, seed=0)
    with pytest.raises(RuntimeError):
        search.study
    search.report_intermediate(0.5, 0)  # outside a trial: ignored
    assert search.should_prune() is False
    search.initialize({"a": [1, 2], "b": Int(1, 4), "c": Float(0.0, 1.0)})
    with pytest.raises(RuntimeError):
        search.set_user_attr("k", 1)
    while not search.is_finished():
        params = search.get_next_params()
        search.set_user_attr("note", "hi")
        search.update(params, params["a"] + params["b"])
    assert search.get_next_params() is None
    assert search.get_best_score() == max(t.value for t in search.study.trials)
    assert search.study.trials[0].user_attrs["note"] == "hi"
    search.save_state(tmp_path / "state.json")
    restored = OptunaSearch()
    restored.load_state(tmp_path / "state.json")
    assert restored.get_best_params() == search.get_best_params() and restored.n_trials == 2
    assert json.loads((tmp_path / "state.json").read_text())["trials"]


# --------------------------------------------------------------------------- skautotuner-readme.md


def test_readme_basic_usage():
    from fxsketch.tuner.SkAutoTuner import LayerConfig, SKAutoTuner, TuningConfigs
    from fxsketch.tuner.SkAutoTuner.Configs import Categorical, Int

    model = trained_convnet()
    configs = TuningConfigs([LayerConfig(layer_names=["conv1", "conv2"],
                                         params={"num_terms": Categorical([1, 2, 3]), "low_rank": Int(8, 128, step=8)},
                                         separate=True)])
    with pytest.deprecated_call():
        tuner = SKAutoTuner(model=model, configs=configs, accuracy_eval_func=accuracy,
                            accuracy_threshold=0.3, optmization_eval_func=speed_eval_func,
                            search_algorithm=OptunaSearch(n_trials=3, seed=0), verbose=True)
    tuner.tune()
    optimized_model = tuner.apply_best_params()
    results_df = tuner.get_results_dataframe()
    assert len(results_df[["layer_name", "num_terms", "low_rank", "accuracy", "speed", "score"]]) == 6
    assert any(isinstance(optimized_model.get_submodule(n), SKConv2d) for n in tuner.get_best_params())
    assert optimized_model(torch.randn(2, 64)).shape == (2, 10)


def test_readme_legacy_list_parameters_and_customized_optuna():
    from fxsketch.tuner.SkAutoTuner.Searching import OptunaSearch as Search

    configs = TuningConfigs([LayerConfig(layer_names=["fc1"], params={"num_terms": [1, 2, 3],
                                                                        "low_rank": [8, 16, 32, 64]})])
    pytest.importorskip("cmaes")
    tuner = SKAutoTuner(model=trained_mlp(), configs=configs, accuracy_eval_func=accuracy,
                        search_algorithm=Search(n_trials=3, sampler=optuna.samplers.CmaEsSampler(seed=42), seed=42),
                        verbose=False)
    tuner.tune()
    study = tuner.search_algorithm.study
    assert set(study.best_params) == {"num_terms", "low_rank"} and len(study.trials_dataframe()) == 3


def test_readme_param_spec_types_with_co_tuned_training_parameters():
    from fxsketch.tuner.SkAutoTuner.Configs import Categorical, Float, Int

    params = {"num_terms": Categorical([1, 2, 3, 4]), "low_rank": Int(8, 256, step=8),
              "dropout": Float(0.0, 0.5, step=0.1), "learning_rate": Float(1e-5, 1e-2, log=True)}
    seen = []

    def fine_tuned_accuracy(model, params):  # co-tunes the extra parameters (issue 9 decision)
        seen.append((params["dropout"], params["learning_rate"]))
        return accuracy(model)

    tuner = SKAutoTuner(SimpleModel(), TuningConfigs([LayerConfig(["fc2"], params)]), fine_tuned_accuracy,
                        OptunaSearch(n_trials=2, seed=0))
    tuner.tune()
    assert len(seen) == 2 and all(0 <= d <= 0.5 and 1e-5 <= lr <= 1e-2 for d, lr in seen)
