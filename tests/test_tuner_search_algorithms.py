"""fxsketch.tuner's search algorithms (`SkAutoTuner/Searching.py`): the default OptunaSearch with TPE, the
abstract SearchAlgorithm, seeding, LightningTune pruners, Optuna's visualizations, and custom algorithms
that leave values out or fail."""

from __future__ import annotations

import math
import warnings

import optuna
import pytest

from fxsketch.tuner import (
    Categorical,
    Int,
    LayerConfig,
    OptunaSearch,
    SearchAlgorithm,
    SKAutoTuner,
    TuningConfigs,
)
from conftest import accuracy, pruning_accuracy, SimpleModel, trained_mlp

pytestmark = pytest.mark.usefixtures("one_thread")

optuna.logging.set_verbosity(optuna.logging.WARNING)


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


def test_load_state_of_a_binary_file_says_it_is_no_state_file(tmp_path):
    (tmp_path / "state.bin").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=r"state.bin is not a state file written by OptunaSearch.save_state"):
        OptunaSearch().load_state(str(tmp_path / "state.bin"))
