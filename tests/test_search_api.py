"""fxsketch.search.api (`optimize`): the Result and its score semantics, spec forms and argument errors,
define-by-run spaces, the summary and the plan file."""

from __future__ import annotations

import json
import math

import optuna
import pytest
import torch
from torch import nn

import fxsketch
from fxsketch import LayerConfig, TuningConfigs
from fxsketch.nn import LowRankLinear
from conftest import mlp as _mlp, MLP_X as X, run_search as _run


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
    with pytest.raises(ValueError, match="known methods: bf16, dense, fp16, int8, int8_weight, sketch, svd"):
        _run(spec=LayerConfig("0", params={"method": ["tucker"]}))



def test_overlapping_selectors_are_refused():
    spec = TuningConfigs([LayerConfig("0", params="auto"), LayerConfig({"type": "Linear"}, params="auto")])
    with pytest.raises(ValueError, match="selected by config 0 and config 1"):
        _run(spec=spec)



def test_selector_matching_nothing_names_close_layers():
    with pytest.raises(ValueError, match="matched no layer"):
        _run(spec=LayerConfig("encoder", params="auto"))



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
