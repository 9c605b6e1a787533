"""fxsketch.tuner's SKAutoTuner (`SkAutoTuner/autotuner.py`): one test per decision of issue 9 (score,
studies, extras, weights, mutation, ...), and the seed documents' promises about applying the best
parameters, NaN accuracies, define-by-run specs and torchinfo."""

from __future__ import annotations

import itertools
import json
import math
import pickle
import sys
import warnings

import optuna
import pytest
import torch
from torch import nn

import fxsketch
import fxsketch as pr
from fxsketch.nn import LowRankLinear, SKLinear
from fxsketch.tuner import Categorical, Float, Int, LayerConfig, OptunaSearch, SKAutoTuner, TuningConfigs
from conftest import accuracy, pruning_accuracy, SimpleModel, size_speed, trained_mlp

pytestmark = pytest.mark.usefixtures("one_thread")

SPACE = {"num_terms": Categorical([1, 2, 3]), "low_rank": Categorical([4, 8, 16, 32, 64])}


def fc2_only(space=None, **kw) -> TuningConfigs:
    return TuningConfigs([LayerConfig(["fc2"], space or SPACE, **kw)])


def make(configs=None, search=None, *, model=None, acc=accuracy, **kw) -> SKAutoTuner:
    search = search or OptunaSearch(n_trials=4, sampler=optuna.samplers.RandomSampler(seed=0))
    return SKAutoTuner(model or trained_mlp(), configs or fc2_only(), acc, search, **kw)


def rows(tuner: SKAutoTuner):
    return tuner.get_results_dataframe().to_dict("records")


# --------------------------------------------------------------------------- score


def test_decision_score_is_speed_above_the_threshold_else_minus_inf():
    tuner = make(search=OptunaSearch(n_trials=10, sampler=optuna.samplers.RandomSampler(seed=1)),
                 accuracy_threshold=0.9, optimization_eval_func=size_speed)
    tuner.tune()
    done = rows(tuner)
    assert {r["accuracy"] >= 0.9 for r in done} == {True, False}
    for r in done:
        assert r["score"] == (r["speed"] if r["accuracy"] >= 0.9 else -math.inf)
    best = tuner.get_best_params()["fc2"]
    feasible = [r for r in done if r["accuracy"] >= 0.9]
    top = max(feasible, key=lambda r: r["speed"])
    assert (best["num_terms"], best["low_rank"]) == (top["num_terms"], top["low_rank"])


@pytest.mark.parametrize("given", ["threshold", "speed", "neither"])
def test_decision_score_is_accuracy_unless_both_are_given_with_a_warning_for_one(given):
    kw = {"threshold": {"accuracy_threshold": 0.9}, "speed": {"optimization_eval_func": size_speed},
          "neither": {}}[given]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuner = make(**kw)
    said = [str(w.message) for w in caught if "Speed-under-accuracy" in str(w.message)]
    assert len(said) == (0 if given == "neither" else 1)
    tuner.tune()
    assert all(r["score"] == r["accuracy"] for r in rows(tuner))


# --------------------------------------------------------------------------- studies, resume


def test_decision_one_study_per_layer_or_group_and_n_trials_is_each_studys_total(tmp_path):
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    configs = TuningConfigs([LayerConfig(["fc1", "fc2"], SPACE), LayerConfig(["fc3"], SPACE)])
    configs_joint = TuningConfigs([LayerConfig(["fc1", "fc2"], SPACE, separate=False)])

    def search(n, **kw):
        return OptunaSearch(n_trials=n, study_name="s", storage=url, seed=0, **kw)

    make(configs, search(3)).tune()
    names = set(optuna.get_all_study_names(url))
    assert names == {"s:fc1", "s:fc2", "s:fc3"}
    assert all(len(optuna.load_study(study_name=n, storage=url).trials) == 3 for n in names)
    with pytest.raises(ValueError, match="load_if_exists=True"):
        make(configs, search(3)).tune()
    resumed = make(configs, search(5, load_if_exists=True))
    resumed.tune()
    assert len(resumed.get_results_dataframe()) == 3 * 2  # only the 2 missing trials per layer ran
    assert all(len(optuna.load_study(study_name=n, storage=url).trials) == 5 for n in names)
    joint = make(configs_joint, search(3))
    joint.tune()
    assert "s:fc1+fc2" in optuna.get_all_study_names(url)
    best = joint.get_best_params()
    assert best["fc1"] == best["fc2"]  # separate=False: one set of values for the group


def test_an_interrupted_study_resumes_where_it_stopped(tmp_path):
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    calls = itertools.count()

    def flaky(model):
        if next(calls) == 2:
            raise KeyboardInterrupt
        return accuracy(model)

    with pytest.raises(KeyboardInterrupt):
        make(search=OptunaSearch(n_trials=4, study_name="r", storage=url, seed=0), acc=flaky).tune()
    study = optuna.load_study(study_name="r:fc2", storage=url)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL"]
    make(search=OptunaSearch(n_trials=4, study_name="r", storage=url, seed=0, load_if_exists=True)).tune()
    states = [t.state.name for t in optuna.load_study(study_name="r:fc2", storage=url).trials]
    assert states.count("COMPLETE") == 4


# --------------------------------------------------------------------------- extra parameters


EXTRAS = {**SPACE, "dropout": Float(0.0, 0.5, step=0.1), "learning_rate": Float(1e-5, 1e-2, log=True),
          "activation": Categorical(["relu", "gelu", "silu"])}


def test_decision_extra_params_are_sampled_recorded_and_passed_to_params_keyword():
    seen = []

    def acc(model, params):
        seen.append(params)
        return accuracy(model)

    tuner = make(fc2_only(EXTRAS), acc=acc)
    tuner.tune()
    assert len(seen) == 4 and all(set(p) == set(EXTRAS) for p in seen)
    assert {p["activation"] for p in seen} <= {"relu", "gelu", "silu"}
    assert {"dropout", "learning_rate", "activation"} <= set(tuner.get_results_dataframe().columns)
    assert set(tuner.get_best_params()["fc2"]) == set(EXTRAS)
    assert isinstance(tuner.apply_best_params().get_submodule("fc2"), SKLinear)


def test_decision_extra_params_without_a_params_keyword_fail_at_construction():
    with pytest.raises(ValueError, match=r"dropout.*num_terms|num_terms.*dropout") as info:
        make(fc2_only({**SPACE, "dropout": Float(0.0, 0.5)}))
    assert "params" in str(info.value) and "low_rank" in str(info.value)


# --------------------------------------------------------------------------- weights, mutation


@pytest.mark.parametrize("copy_weights", [True, False])
def test_decision_copy_weights(copy_weights):
    model = trained_mlp()
    configs = fc2_only({"num_terms": [2], "low_rank": [8]}, copy_weights=copy_weights)
    tuner = make(configs, model=model)
    for built in (tuner.replace_without_tuning(), (tuner.tune(), tuner.apply_best_params())[1]):
        layer = built.get_submodule("fc2")
        assert isinstance(layer, SKLinear)
        expected_s1 = torch.einsum("do,lko->ldk", model.fc2.weight.detach().T, layer.U1)
        assert torch.allclose(layer.S1, expected_s1, atol=1e-5) == copy_weights
        assert torch.equal(layer.bias, model.fc2.bias) == copy_weights


def test_decision_the_users_model_is_never_modified():
    model = trained_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuner = make(TuningConfigs([LayerConfig(["fc1", "fc2"], SPACE)]), model=model)
    tuner.tune()
    tuned, quick = tuner.apply_best_params(), tuner.replace_without_tuning()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in list(model.children()))
    for built in (tuned, quick):
        assert built is not model and isinstance(built, torch.fx.GraphModule)
        assert isinstance(built.get_submodule("fc1"), SKLinear) and isinstance(built.fc2, SKLinear)
        assert built(torch.randn(3, 64)).shape == (3, 10)
    assert quick.fc1.low_rank == 4 and quick.fc1.num_terms == 1  # the first value of each spec
    for method in (SKAutoTuner.apply_best_params, SKAutoTuner.replace_without_tuning):
        assert "not modified" in method.__doc__


def test_replace_without_tuning_takes_the_low_bound_of_ranges():
    tuner = make(fc2_only({"num_terms": Int(2, 3), "low_rank": Int(12, 64, step=4)}))
    layer = tuner.replace_without_tuning().fc2
    assert (layer.num_terms, layer.low_rank) == (2, 12)


def test_the_default_kind_is_sketch_and_default_method_is_an_extension():
    assert isinstance(make().replace_without_tuning().fc2, SKLinear)
    svd = make(fc2_only({"low_rank": [8, 16]}), default_method="svd")
    svd.tune()
    assert isinstance(svd.apply_best_params().fc2, LowRankLinear)


# --------------------------------------------------------------------------- custom algorithms


class ListSearch(fxsketch.tuner.SearchAlgorithm):
    """Walks the space's first choices; records what the tuner calls."""

    def __init__(self, n_trials=2):
        self.n_trials, self.spaces, self.resets, self.count = n_trials, [], 0, 0
        self.best, self.best_score = None, -math.inf

    def initialize(self, param_space):
        self.spaces.append(param_space)
        self.count = 0

    def get_next_params(self):
        self.count += 1
        return {k: (v[self.count % len(v)] if isinstance(v, list) else v.low) for k, v in self.spaces[-1].items()}

    def update(self, params, score):
        if score > self.best_score:
            self.best, self.best_score = dict(params), score

    def get_best_params(self):
        return self.best

    def get_best_score(self):
        return self.best_score

    def reset(self):
        self.resets += 1
        self.best, self.best_score = None, -math.inf

    def is_finished(self):
        return self.count >= self.n_trials

    def save_state(self, filepath):
        raise AssertionError("the tuner must not call save_state")

    def load_state(self, filepath):
        raise AssertionError("the tuner must not call load_state")


def test_decision_custom_algorithms_get_lists_and_specs_and_a_reset_per_layer():
    configs = TuningConfigs([LayerConfig(["fc1"], {"num_terms": [1, 2], "low_rank": Categorical([8, 16])}),
                             LayerConfig(["fc2"], {"num_terms": [1], "low_rank": Int(8, 32, step=8)})])
    search = ListSearch()
    tuner = make(configs, search)
    tuner.tune()
    assert search.resets == 2
    assert search.spaces[0] == {"num_terms": [1, 2], "low_rank": [8, 16]}
    assert search.spaces[1]["num_terms"] == [1] and search.spaces[1]["low_rank"] == Int(8, 32, step=8)
    assert set(tuner.get_best_params()) == {"fc1", "fc2"}


def test_get_resource_is_passed_to_eval_functions_that_accept_it():
    got = []

    def acc(model, resource="none"):
        got.append(resource)
        return accuracy(model)

    make(search=ListSearch(), acc=acc).tune()
    assert got == ["none", "none"]  # ListSearch has no get_resource: nothing is passed
    got.clear()
    search = ListSearch()
    search.get_resource = lambda: 3
    make(search=search, acc=acc, optimization_eval_func=size_speed, accuracy_threshold=0.0).tune()
    assert got == [3, 3]


def test_a_search_algorithm_lacking_the_interface_is_rejected():
    with pytest.raises(TypeError, match="SearchAlgorithm"):
        make(search=object())


# --------------------------------------------------------------------------- output, direction


def test_decision_verbose_prints_a_line_per_trial_and_a_summary_per_layer(capsys):
    make(TuningConfigs([LayerConfig(["fc1", "fc2"], SPACE)]), verbose=True,
         accuracy_threshold=0.5, optimization_eval_func=size_speed).tune()
    lines = capsys.readouterr().out.splitlines()
    trials = [line for line in lines if " trial " in line]
    assert len(trials) == 8 and len(lines) == 10
    assert all(k in trials[0] for k in ("[fc1]", "num_terms=", "low_rank=", "accuracy=", "speed=", "score="))
    assert lines[4].startswith("[fc1] best") and lines[9].startswith("[fc2] best")
    make().tune()
    assert capsys.readouterr().out == ""


def test_decision_direction_minimize_minimizes_the_score():
    tuner = make(search=OptunaSearch(n_trials=6, direction="minimize", sampler=optuna.samplers.RandomSampler(seed=2)))
    tuner.tune()
    done = rows(tuner)
    worst = min(done, key=lambda r: r["accuracy"])
    assert tuner.get_best_params()["fc2"] == {"num_terms": worst["num_terms"], "low_rank": worst["low_rank"]}


# --------------------------------------------------------------------------- results files


def test_decision_results_are_json_and_round_trip(tmp_path):
    tuner = make(accuracy_threshold=0.8, optimization_eval_func=size_speed)
    tuner.tune()
    path = tmp_path / "results.json"
    tuner.save_tuning_results(path)
    data = json.loads(path.read_text())  # strict JSON (no NaN/Infinity tokens)
    assert data["format"] == "fxsketch.tuner.results" and "fc2" in data["best_params"]
    fresh = make(accuracy_threshold=0.8, optimization_eval_func=size_speed)
    fresh.load_tuning_results(path)
    assert fresh.get_best_params() == tuner.get_best_params()
    assert fresh.get_results_dataframe().equals(tuner.get_results_dataframe())
    x = torch.randn(4, 64)
    assert torch.equal(fresh.apply_best_params()(x), tuner.apply_best_params()(x))


def test_decision_results_loading_errors_and_pickle_refusal(tmp_path):
    tuner = make()
    with pytest.raises(FileNotFoundError):
        tuner.load_tuning_results(tmp_path / "missing.json")
    for content in ("not json", json.dumps({"best_params": {}}),
                    json.dumps({"format": "fxsketch.tuner.results", "best_params": {"nope": {"low_rank": 8}},
                                "results": []})):
        (tmp_path / "bad.json").write_text(content)
        with pytest.raises(ValueError):
            tuner.load_tuning_results(tmp_path / "bad.json")
    panther = tmp_path / "panther.pkl"
    panther.write_bytes(pickle.dumps({"best_params": {"fc2": {"num_terms": 2, "low_rank": 16}},
                                      "results": [{"layer_name": "fc2", "num_terms": 2, "low_rank": 16,
                                                   "accuracy": 0.9, "speed": 1.0, "score": 1.0}]}))
    with pytest.raises(ValueError, match="trusted=True"):
        tuner.load_tuning_results(panther)
    tuner.load_tuning_results(panther, trusted=True)
    assert tuner.get_best_params() == {"fc2": {"num_terms": 2, "low_rank": 16}}
    assert tuner.apply_best_params().fc2.low_rank == 16
    assert list(tuner.get_results_dataframe()["num_terms"]) == [2]


def test_results_dataframe_needs_pandas(monkeypatch):
    tuner = make()
    tuner.tune()
    frame = tuner.get_results_dataframe()
    assert list(frame.columns[:3]) == ["layer_name", "num_terms", "low_rank"]
    assert {"score", "accuracy", "speed"} <= set(frame.columns)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        tuner.get_results_dataframe()


# --------------------------------------------------------------------------- pruning, averaging


def test_decision_median_pruner_prunes_trials_reporting_per_batch():
    search = OptunaSearch(n_trials=10, sampler=optuna.samplers.RandomSampler(seed=0),
                          pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))

    acc = pruning_accuracy(search)

    tuner = make(search=search, acc=acc)
    tuner.tune()
    states = [t.state.name for t in search.study.trials]
    assert "PRUNED" in states and "COMPLETE" in states
    assert list(tuner.get_results_dataframe()["state"]).count("PRUNED") == states.count("PRUNED")


def test_num_runs_per_param_averages_repeated_evaluations():
    values = itertools.cycle([0.5, 0.7, 0.9])
    calls = []

    def noisy(model):
        calls.append(1)
        return next(values)

    tuner = make(acc=noisy, num_runs_per_param=3)
    tuner.tune()
    assert len(calls) == 12 and all(r["accuracy"] == pytest.approx(0.7) for r in rows(tuner))
    with pytest.raises(ValueError):
        make(num_runs_per_param=0)


def test_misspelled_optmization_eval_func_is_accepted_with_a_deprecation_warning():
    with pytest.deprecated_call():
        tuner = make(accuracy_threshold=0.0, optmization_eval_func=size_speed)
    tuner.tune()
    assert all(r["score"] == r["speed"] for r in rows(tuner))
    with pytest.raises(TypeError), pytest.deprecated_call():
        make(optimization_eval_func=size_speed, optmization_eval_func=size_speed)


def test_failing_trials_are_recorded_and_all_failing_is_an_error():
    calls = itertools.count()

    def half(model):
        if next(calls) % 2:
            raise RuntimeError("flaky")
        return accuracy(model)

    tuner = make(acc=half)
    tuner.tune()
    assert list(tuner.get_results_dataframe()["state"]) == ["COMPLETE", "FAIL"] * 2
    with pytest.raises(RuntimeError, match="every trial of fc2 failed"):
        make(acc=lambda m: 1 / 0).tune()


# --------------------------------------------------------------------------- accessors, capture


def test_get_set_configs_and_resolver():
    tuner = make(TuningConfigs([LayerConfig({"type": "Linear", "range": [0, 2]}, "auto")]))
    assert [c.layer_names for c in tuner.getConfigs()] == [("fc1",), ("fc2",)]
    assert tuner.getResolver().layer_names == ["fc1", "fc2", "fc3"]
    tuner.setConfigs(fc2_only())
    assert [c.layer_names for c in tuner.getConfigs()] == [("fc2",)]
    assert tuner.tune().keys() == {"fc2"}


class Branchy(nn.Module):
    """Shape-dependent control flow: torch.fx.symbolic_trace cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        if x.shape[0] > 1:
            x = x * 2
        return self.fc2(torch.relu(self.fc1(x)))


def test_example_inputs_extension_captures_untraceable_models():
    configs = TuningConfigs([LayerConfig(["fc1"], {"num_terms": [1], "low_rank": [4]})])
    with pytest.raises(fxsketch.CaptureError, match="example_inputs"):
        SKAutoTuner(Branchy(), configs, lambda m: 1.0)
    tuner = SKAutoTuner(Branchy(), configs, lambda m: 1.0, example_inputs=torch.randn(8, 16))
    assert isinstance(tuner.replace_without_tuning().get_submodule("fc1"), SKLinear)


def test_copy_weights_can_differ_between_configs_of_one_model():
    model = trained_mlp()
    configs = TuningConfigs([LayerConfig(["fc1"], {"num_terms": [1], "low_rank": [8]}, copy_weights=True),
                             LayerConfig(["fc2"], {"num_terms": [1], "low_rank": [8]}, copy_weights=False)])
    tuner = make(configs, model=model)
    tuner.tune()
    built = tuner.apply_best_params()
    assert torch.equal(built.fc1.bias, model.fc1.bias) and not torch.equal(built.fc2.bias, model.fc2.bias)
    assert built.meta["fxsketch_plan"].keys() == {"fc1", "fc2"}


# --------------------------------------------------------------------------- applying the best parameters


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


def test_nan_accuracy_fails_the_trial_and_the_search_goes_on():
    values = iter([float("nan"), 0.5, 0.7])
    tuner = SKAutoTuner(SimpleModel(), TuningConfigs([LayerConfig(["fc2"], {"low_rank": [4, 8, 16]})]),
                        lambda m: next(values), OptunaSearch(n_trials=3, seed=0))
    tuner.tune()
    assert list(tuner.get_results_dataframe()["state"]) == ["FAIL", "COMPLETE", "COMPLETE"]
    assert tuner.get_best_params()["fc2"]["low_rank"] in (4, 8, 16)


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
