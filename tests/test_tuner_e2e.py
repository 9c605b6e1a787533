"""End to end on the digits model: the search behind SKAutoTuner actually works.

More trials never make a layer's best feasible score worse, the explored parameters vary, and the
best trial beats the mean trial. Speed is a deterministic stand-in (1e4 / parameter count) so the
comparison between runs is exact.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

from fxsketch.nn import SKLinear
from fxsketch.tuner import Categorical, Int, LayerConfig, OptunaSearch, SKAutoTuner, TuningConfigs
from conftest import accuracy, fit, size_speed, trained_convnet, trained_mlp

pytestmark = pytest.mark.usefixtures("one_thread")

THRESHOLD = 0.85
CONFIGS = TuningConfigs([LayerConfig(["fc1", "fc2"], {"num_terms": Categorical([1, 2, 3]),
                                                      "low_rank": Int(4, 64, step=4)})])


def run(n_trials: int) -> SKAutoTuner:
    tuner = SKAutoTuner(trained_mlp(), CONFIGS, accuracy, OptunaSearch(n_trials=n_trials, seed=0),
                        accuracy_threshold=THRESHOLD, optimization_eval_func=size_speed)
    tuner.tune()
    return tuner


def best_scores(tuner: SKAutoTuner) -> dict[str, float]:
    frame = tuner.get_results_dataframe()
    return {layer: group["score"].max() for layer, group in frame.groupby("layer_name")}


def test_search_on_digits_improves_with_trials_varies_and_beats_the_mean():
    runs = {n: run(n) for n in (4, 8, 20)}
    scores = {n: best_scores(t) for n, t in runs.items()}
    for layer in ("fc1", "fc2"):
        series = [scores[n][layer] for n in (4, 8, 20)]
        assert series == sorted(series), (layer, series)  # more trials never make the best worse
        assert math.isfinite(series[-1]), layer  # a feasible configuration was found
    frame = runs[20].get_results_dataframe()
    for layer, group in frame.groupby("layer_name"):
        assert group[["num_terms", "low_rank"]].drop_duplicates().shape[0] >= 5  # the parameters vary
        assert group["num_terms"].nunique() > 1 and group["low_rank"].nunique() > 1
        feasible = group[group["accuracy"] >= THRESHOLD]["score"]
        assert len(feasible) >= 2 and feasible.max() > statistics.fmean(feasible)  # best beats the mean
        assert (group["accuracy"] < THRESHOLD).any()  # the constraint bites: some draws are infeasible
    tuned = runs[20].apply_best_params()
    best = runs[20].get_best_params()
    for layer in ("fc1", "fc2"):
        assert isinstance(tuned.get_submodule(layer), SKLinear)
        assert tuned.get_submodule(layer).low_rank == best[layer]["low_rank"]
    assert size_speed(tuned) > size_speed(trained_mlp())  # smaller than the dense model
    assert accuracy(tuned) > 0.5 and torch.is_grad_enabled()


def test_support_models_learn_the_digits() -> None:
    assert accuracy(trained_mlp()) > 0.9
    assert accuracy(trained_convnet()) > 0.6
    sk = nn.Sequential(SKLinear(64, 32, num_terms=2, low_rank=8), nn.ReLU(), SKLinear(32, 10, 1, 8))
    assert accuracy(fit(sk, epochs=5)) > 0.8  # the sketched layers train from a random start
