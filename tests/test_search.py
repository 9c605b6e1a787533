"""optimize(): score semantics, failures, back-off, spec forms, storage and resume."""

from __future__ import annotations

import json
import math

import optuna
import pytest
import torch
from torch import nn

import fxsketch
from fxsketch import Categorical, Int, LayerConfig, TuningConfigs
from fxsketch.nn import LowRankLinear


def _mlp(seed: int = 0) -> nn.Module:
    """An MLP whose weights are rank 6 plus noise, so low ranks fail and moderate ranks pass."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            out, inp = layer.weight.shape
            layer.weight.copy_(torch.randn(out, 6) @ torch.randn(6, inp) / inp**0.5 + 0.02 * torch.randn(out, inp))
    return model


X = torch.randn(128, 32, generator=torch.Generator().manual_seed(1))


def _agreement(model: nn.Module):
    """Accuracy = agreement with the dense model's predictions (1.0 for the dense model)."""
    with torch.no_grad():
        ref = model(X).argmax(1)

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return (m(X).argmax(1) == ref).float().mean().item()

    return accuracy


def _replaced(m: nn.Module) -> int:
    return sum(isinstance(s, LowRankLinear) for s in m.modules())


def _run(model=None, spec=None, **kw):
    model = model if model is not None else _mlp()
    args = dict(example_inputs=X, accuracy_fn=_agreement(model), accuracy_threshold=0.8,
                objective="flops", n_trials=4, seed=0)
    args.update(kw)
    spec = spec if spec is not None else LayerConfig({"type": "Linear", "range": [0, 2]}, params="auto")
    return fxsketch.optimize(model, spec, **args)


def test_result_meets_threshold_and_matches_its_plan():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _run(model)
    assert result.accuracy >= 0.8
    assert result.dense_accuracy == 1.0
    assert result.plan and all(e["method"] == "svd" for e in result.plan.values())
    assert result.flops_ratio > 1.0 and result.params_after < result.params_before
    assert result.speedup > 0
    replay = fxsketch.rewrite(model, result.plan, X)
    with torch.no_grad():
        assert torch.equal(replay(X), result.graph_module(X))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_trials_frame_and_score_semantics():
    spec = TuningConfigs([LayerConfig("0", params="auto"), LayerConfig("2", params={"low_rank": [1, 16]})])
    result = _run(spec=spec, n_trials=6)
    frame = result.trials
    assert {"number", "layer", "state", "method", "low_rank", "accuracy", "speed", "score"} <= set(frame.columns)
    assert set(frame["layer"]) == {"0", "2"}
    done = frame[frame["state"] == "COMPLETE"]
    infeasible = done[done["accuracy"] < 0.8]
    feasible = done[done["accuracy"] >= 0.8]
    assert (infeasible["score"] == -math.inf).all()
    assert (feasible["score"] == feasible["speed"]).all()
    assert len(feasible) > 0 and len(infeasible) > 0
    for t in result.study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert t.system_attrs.get("constraints") is not None or t.user_attrs["fxsketch.accuracy"] is not None


def test_flops_objective_is_deterministic():
    a, b = _run(n_trials=5), _run(n_trials=5)
    assert a.plan == b.plan
    cols = ["layer", "low_rank", "accuracy", "speed", "score"]
    assert a.trials[cols].equals(b.trials[cols])


def test_no_threshold_maximizes_accuracy():
    result = _run(accuracy_threshold=None, n_trials=5)
    done = result.trials[result.trials["state"] == "COMPLETE"]
    assert (done["score"] == done["accuracy"]).all()


def test_failing_and_nan_accuracy_are_recorded_and_search_goes_on():
    model = _mlp()
    base = _agreement(model)

    def flaky(m):
        ranks = {s.rank for s in m.modules() if isinstance(s, LowRankLinear)}
        if 4 in ranks:
            raise RuntimeError("evaluation server down")
        if 8 in ranks:
            return float("nan")
        return base(m)

    spec = LayerConfig("2", params={"low_rank": [4, 8, 12]})
    grid = optuna.samplers.GridSampler({"2:low_rank": [4, 8, 12]}, seed=0)
    result = _run(model, spec=spec, accuracy_fn=flaky, n_trials=3, sampler=grid)
    failed = result.trials[result.trials["state"] == "FAIL"]
    assert sorted(failed["low_rank"]) == [4, 8]
    notes = " ".join(failed["note"])
    assert "evaluation server down" in notes and "NaN" in notes
    assert result.plan == {"2": {"method": "svd", "low_rank": 12}}


def test_accuracy_fn_broken_on_dense_model_is_a_clear_error():
    def broken(m):
        raise KeyError("labels")

    with pytest.raises(RuntimeError, match="original \\(dense\\) model"):
        _run(accuracy_fn=broken)


def test_every_trial_failing_is_an_error():
    model = _mlp()
    base = _agreement(model)

    def fails_on_rewrites(m):
        if _replaced(m):
            raise ValueError("boom")
        return base(m)

    with pytest.raises(RuntimeError, match="every trial failed.*boom"):
        _run(model, accuracy_fn=fails_on_rewrites)


def test_combined_plan_is_backed_off_until_it_meets_the_threshold():
    def penalty(m):  # each replaced layer costs 0.1: alone fine, together not
        return 1.0 - 0.1 * _replaced(m)

    spec = LayerConfig({"type": "Linear", "range": [0, 2]}, params={"low_rank": [8]})
    result = _run(accuracy_fn=penalty, accuracy_threshold=0.85, spec=spec, n_trials=2)
    assert [s["layers"] for s in result.validation] == [2, 1]
    assert result.validation[0]["dropped"] is None
    assert len(result.plan) == 1
    assert result.accuracy == pytest.approx(0.9)
    assert _replaced(result.graph_module) == 1


def test_joint_tuning_shares_values_and_method_search():
    spec = {"layers": [{"layer_names": ["0", "2"], "separate": False,
                        "params": {"method": ["svd", "sketch", "dense"], "low_rank": [4, 8],
                                   "num_terms": [1]}}]}
    result = _run(spec=spec, accuracy_threshold=0.0, n_trials=6)
    assert set(result.trials["layer"]) == {"group0:0+1"}
    assert set(result.trials["method"]) <= {"svd", "sketch", "dense"}
    if result.plan:
        assert result.plan["0"] == result.plan["2"]


def test_spec_from_json_file(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"layers": [{"layer_names": "2", "params": {"low_rank": {"type": "int", "low": 4, "high": 16, "step": 4}}}]}))
    result = _run(spec=str(path))
    assert set(result.trials["layer"]) == {"2"}
    assert set(result.trials["low_rank"]) <= {4, 8, 12, 16}


def test_sketch_parameter_without_method_names_the_fix():
    with pytest.raises(ValueError, match="num_terms.*sketch"):
        _run(spec=LayerConfig("0", params={"num_terms": [1, 2], "low_rank": [4]}))


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match="known methods: dense, sketch, svd"):
        _run(spec=LayerConfig("0", params={"method": ["tucker"]}))


def test_overlapping_selectors_are_refused():
    spec = TuningConfigs([LayerConfig("0", params="auto"), LayerConfig({"type": "Linear"}, params="auto")])
    with pytest.raises(ValueError, match="selected by config 0 and config 1"):
        _run(spec=spec)


def test_selector_matching_nothing_names_close_layers():
    with pytest.raises(ValueError, match="matched no layer"):
        _run(spec=LayerConfig("encoder", params="auto"))


def test_costlier_than_dense_configurations_are_pruned_unevaluated():
    evaluated = []
    model = _mlp()
    base = _agreement(model)

    def spy(m):
        evaluated.append(_replaced(m))
        return base(m)

    spec = LayerConfig("2", params={"low_rank": Int(16, 64, step=16)})  # 64x64: rank >= 32 is not cheaper
    result = _run(model, spec=spec, accuracy_fn=spy, n_trials=8, sampler=optuna.samplers.RandomSampler(seed=0))
    pruned = result.trials[result.trials["state"] == "PRUNED"]
    assert len(pruned) > 0 and (pruned["low_rank"] >= 32).all()
    assert pruned["note"].str.contains("not cheaper than the dense layer").all()
    done = result.trials[result.trials["state"] == "COMPLETE"]
    assert (done["low_rank"] < 32).all()


def test_repeated_values_reuse_the_result_and_exhausted_spaces_stop():
    calls = []
    model = _mlp()
    base = _agreement(model)

    def counting(m):
        calls.append(1)
        return base(m)

    spec = LayerConfig("2", params={"low_rank": [4, 8]})
    result = _run(model, spec=spec, accuracy_fn=counting, n_trials=10)
    assert len(result.trials) == 2  # both values seen: the unit stops early
    assert len(calls) == 1 + 2 + 1  # dense + two distinct trials + validation


def test_budget_is_split_and_an_exhausted_unit_passes_its_share_on():
    spec = TuningConfigs([LayerConfig("0", params={"low_rank": [4, 8]}),
                          LayerConfig("2", params={"low_rank": Int(1, 30)})])
    result = _run(spec=spec, n_trials=10)
    assert result.trials.groupby("layer").size().to_dict() == {"0": 2, "2": 8}


def test_budget_smaller_than_the_units_warns(caplog):
    result = _run(n_trials=1)
    assert len(result.trials) == 1
    assert set(result.trials["layer"]) == {"0"}
    assert "leaves no trial for 2" in caplog.text


def test_speed_fn_replaces_built_in_measure():
    def speed(m):
        return 100.0 - sum(p.numel() for p in m.parameters()) / 1e3

    result = _run(speed_fn=speed, accuracy_threshold=0.0)
    done = result.trials[result.trials["state"] == "COMPLETE"]
    assert (done["speed"] < 100).all() and (done["speed"] > 80).all()


def test_latency_objective_measures_finite_speedups():
    result = _run(objective="latency", n_trials=2, accuracy_threshold=0.0)
    done = result.trials[result.trials["state"] == "COMPLETE"]
    assert len(done) and (done["speed"] > 0).all() and done["speed"].map(math.isfinite).all()


def test_sqlite_storage_resume_adds_trials_without_repeating_configurations(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    first = _run(storage=url, study_name="s", n_trials=4)
    assert len(first.trials) == 4
    with pytest.raises(ValueError, match="load_if_exists=True"):
        _run(storage=url, study_name="s", n_trials=4)
    calls = []
    model = _mlp()
    base = _agreement(model)

    def counting(m):
        calls.append(1)
        return base(m)

    resumed = _run(model, storage=url, study_name="s", n_trials=4, load_if_exists=True, accuracy_fn=counting)
    assert len(resumed.trials) == 8  # this call's trials are added to the stored ones
    assert resumed.trials.groupby("layer").size().to_dict() == {"0": 4, "2": 4}
    reused = resumed.trials["note"].str.contains("reused").sum()
    assert len(calls) == 1 + (4 - reused) + len(resumed.validation)  # stored configurations are not re-run


def test_resume_with_a_lower_threshold_times_the_trials_it_had_skipped(tmp_path):
    """Under a high threshold, trials that miss it are not timed (speed NaN). Resumed with a lower
    threshold, the same values are reused but now feasible: their speed is measured, not NaN."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = LayerConfig({"type": "Linear", "range": [0, 2]},
                       params={"method": Categorical(["svd"]), "low_rank": Categorical([2, 4])})
    first = _run(spec=spec, storage=url, study_name="s", objective="latency", accuracy_threshold=0.999,
                 n_trials=6)
    done = first.trials[first.trials["state"] == "COMPLETE"]
    assert done["speed"].isna().any()  # infeasible under 0.999: not timed
    resumed = _run(spec=spec, storage=url, study_name="s", objective="latency", accuracy_threshold=0.0,
                   n_trials=4, load_if_exists=True)
    new = resumed.trials.iloc[len(first.trials):]
    reused = new[new["note"].str.contains("reused", na=False)]
    assert len(reused) and (reused["state"] == "COMPLETE").all()
    assert reused["speed"].map(math.isfinite).all() and (reused["speed"] > 0).all()
    assert math.isfinite(resumed.speedup)
    # tiny layers may run slower low-rank than dense on this machine: then the model stays dense, and says so
    assert resumed.plan or any("no plan was faster than dense" in n for n in resumed.notes)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="objective"):
        _run(objective="speed")
    with pytest.raises(ValueError, match="n_trials"):
        _run(n_trials=0)


def test_unsupported_layers_are_skipped_with_a_warning(caplog):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, groups=2)

        def forward(self, x):
            return self.conv(x)

    img = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="nothing to tune"):
        fxsketch.optimize(Net(), LayerConfig("conv", params="auto"), example_inputs=img,
                          accuracy_fn=lambda m: 1.0, n_trials=1, objective="flops")
    assert "groups=2" in caplog.text


def test_summary_and_plan_file_round_trip(tmp_path):
    model = _mlp()
    result = _run(model)
    text = str(result)
    assert "accuracy" in text and "MFLOPs before" in text
    for name in result.plan:
        assert name in text
    path = tmp_path / "plan.json"
    result.save_plan(path)
    assert fxsketch.load_plan(path) == result.plan
    replay = fxsketch.rewrite(model, path, X)
    with torch.no_grad():
        assert torch.equal(replay(X), result.graph_module(X))


@pytest.mark.parametrize("bad,reason", [
    (None, "returned None"),
    ("0.9", "returned '0.9' \\(str\\), not a number"),
    (float("inf"), "returned inf"),
    (MemoryError("out of memory"), "raised MemoryError: out of memory"),
])
def test_every_kind_of_bad_accuracy_fails_the_trial_with_its_reason(bad, reason):
    model = _mlp()
    base = _agreement(model)

    def accuracy(m):
        if not _replaced(m):
            return base(m)
        if isinstance(bad, Exception):
            raise bad
        return bad

    with pytest.raises(RuntimeError, match=f"every trial failed \\(4\\): 4× accuracy_fn {reason}"):
        _run(model, accuracy_fn=accuracy)


def test_ctrl_c_returns_the_best_plan_so_far_and_the_study_resumes(tmp_path, caplog):
    model = _mlp()
    base = _agreement(model)
    calls = {"n": 0}

    def interrupt_on_fourth(m):
        if _replaced(m):
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
        return base(m)

    url = f"sqlite:///{tmp_path / 's.db'}"
    result = _run(model, accuracy_fn=interrupt_on_fourth, storage=url, study_name="s", n_trials=8)
    done = (result.trials["state"] == "COMPLETE").sum()
    assert done >= 3 and (result.trials["state"] == "FAIL").sum() == 1  # the interrupted trial
    assert f"interrupted after {done} finished trials" in caplog.text and "load_if_exists=True" in caplog.text
    resumed = _run(model, storage=url, study_name="s", n_trials=2, load_if_exists=True)
    assert (resumed.trials["state"] == "COMPLETE").sum() == done + 2


def test_ctrl_c_before_any_trial_says_how_to_resume():
    model = _mlp()
    base = _agreement(model)

    def interrupt(m):
        if _replaced(m):
            raise KeyboardInterrupt
        return base(m)

    with pytest.raises(KeyboardInterrupt, match="pass storage="):
        _run(model, accuracy_fn=interrupt)


def test_define_by_run_params_give_conditional_spaces():
    seen = []

    def space(trial, record):
        seen.append(record.name)
        method = trial.suggest_categorical("method", ["svd", "sketch"])
        if method == "svd":
            return {"method": "svd", "low_rank": trial.suggest_int("rank", 2, min(record.weight_shape) // 2)}
        return {"method": "sketch", "num_terms": 1, "low_rank": trial.suggest_int("k", 1, 4)}

    result = _run(spec=LayerConfig({"type": "Linear", "range": [0, 2]}, params=space), n_trials=8,
                  accuracy_threshold=0.0)
    assert set(seen) == {"0", "2"}
    names = {p for t in result.study.trials for p in t.params}
    assert names <= {"0:method", "0:rank", "0:k", "2:method", "2:rank", "2:k"}
    svd = result.trials[result.trials["method"] == "svd"]
    assert svd["num_terms"].isna().all() if "num_terms" in svd else True
    with pytest.raises(ValueError, match="define-by-run"):
        LayerConfig("0", params=space).to_dict()


def test_define_by_run_returning_foreign_params_is_a_clear_error():
    with pytest.raises(ValueError, match="returned \\['dropout'\\], which method 'svd' does not take"):
        _run(spec=LayerConfig("0", params=lambda trial, record: {"low_rank": 4, "dropout": 0.1}), n_trials=1)


def test_experiment_dir_keeps_the_study_the_best_plan_and_model(tmp_path):
    model = _mlp()
    first = _run(model, experiment_dir=tmp_path, n_trials=4)
    assert {p.name for p in tmp_path.iterdir()} >= {"study.db", "best_plan.json", "best_model.pt2", "factors"}
    assert fxsketch.load_plan(tmp_path / "best_plan.json") == first.plan
    loaded = fxsketch.load(tmp_path / "best_model.pt2")
    with torch.no_grad():
        torch.testing.assert_close(loaded(X[:5]), first.graph_module(X[:5]))
    again = _run(model, experiment_dir=tmp_path, n_trials=2)  # resumes the same study
    assert len(again.trials) == 6
