"""fxsketch.search.joint: the joint strategy, whole-model budgets, multi-objective search and the Pareto front, importances
and the sensitivity table."""

from __future__ import annotations

import pytest

import fxsketch
from fxsketch.plan import plan_cost
from conftest import CALIB, calib_mlp as _model, held_out_agreement as _agreement, run_search as _run

SPEC = fxsketch.LayerConfig({"type": "Linear", "range": [0, 2]}, params="auto")


def _optimize(**kw):
    model = _model()
    args = dict(example_inputs=CALIB[:64], accuracy_fn=_agreement(model), accuracy_threshold=0.7, objective="flops",
                n_trials=10, seed=0, calibration_data=[CALIB[:1000]])
    args.update(kw)
    return model, fxsketch.optimize(model, SPEC, **args)


def _selected(model):
    records = {r.name: r for r in fxsketch.find_layers(fxsketch.capture(model, CALIB[:64]))}
    return [records["0"], records["2"]]


def test_joint_trials_are_whole_plans_under_a_whole_model_budget():
    model, result = _optimize(strategy="joint", max_flops=0.5)
    assert set(result.trials["layer"]) == {"*"}
    assert {"0.low_rank", "2.low_rank"} <= set(result.trials.columns)
    selected = _selected(model)
    assert plan_cost(selected, result.plan).flops <= 0.5 * plan_cost(selected, {}).flops
    done = result.trials[result.trials["state"] == "COMPLETE"]
    best = done[done["accuracy"] >= 0.7]["score"].max()
    assert result.flops_ratio == pytest.approx(best, rel=0.2)  # the ratio over all layers, the last one dense
    assert result.accuracy >= 0.7
    pruned = result.trials[result.trials["state"] == "PRUNED"]
    assert pruned["note"].str.contains("over the FLOP budget|not cheaper").all()


@pytest.mark.parametrize("sensitivity", [None, "output"])
def test_the_warm_start_plan_is_the_first_joint_trial(sensitivity):
    model, result = _optimize(strategy="joint", max_flops=0.4, allocation_sensitivity=sensitivity)
    warm = fxsketch.allocate(model, SPEC, [CALIB[:1000]], budget=0.4, example_inputs=CALIB[:64],
                             sensitivity=sensitivity)
    first = result.trials.sort_values("number").iloc[0]
    assert {name: first[f"{name}.low_rank"] for name in warm} == {n: e["low_rank"] for n, e in warm.items()}


def test_multi_objective_returns_a_pareto_front_and_select_picks_from_it():
    _, result = _optimize(objectives=("accuracy", "speed"), accuracy_threshold=0.5, n_trials=14)
    front = result.pareto
    assert len(front) >= 2
    for p in front:  # no point dominates another
        assert not any(q is not p and q.accuracy >= p.accuracy and q.speed >= p.speed
                       and (q.accuracy, q.speed) != (p.accuracy, p.speed) for q in front)
    assert all(p.accuracy >= 0.5 for p in front)
    middle = sorted(p.accuracy for p in front)[len(front) // 2]
    chosen = result.select(min_accuracy=middle)
    assert chosen.accuracy >= middle
    assert chosen.speed == max(p.speed for p in front if p.accuracy >= middle)
    assert _agreement(_model())(chosen.graph_module) == pytest.approx(chosen.accuracy)
    with pytest.raises(ValueError, match="no Pareto point reaches"):
        result.select(min_accuracy=1.5)
    assert "Pareto front" in result.summary()


def test_select_without_a_front_and_bad_objectives_are_errors():
    _, result = _optimize(n_trials=4)
    with pytest.raises(ValueError, match="objectives=\\('accuracy', 'speed'\\)"):
        result.select(min_accuracy=0.5)
    with pytest.raises(ValueError, match="objectives must be"):
        _optimize(objectives=("accuracy", "memory"))
    with pytest.raises(ValueError, match="strategy must be"):
        _optimize(strategy="greedy")


def test_importance_and_sensitivity_tables():
    _, result = _optimize(strategy="joint", n_trials=12, accuracy_threshold=0.0)
    importance = result.importance()
    assert set(importance["param"]) == {"0:low_rank", "2:low_rank"}
    assert importance["importance"].sum() == pytest.approx(1.0)
    table = result.sensitivity
    assert list(table["layer"]) == ["0", "2"]
    # errors fall with rank, and the rank needed for 1% is at least the rank needed for 10%
    assert (table["err@5%"] >= table["err@50%"]).all()
    assert (table["rank<1%"] >= table["rank<10%"]).all()
    assert "sensitivity" in result.summary()


def test_joint_tuning_shares_values_and_method_search():
    spec = {"layers": [{"layer_names": ["0", "2"], "separate": False,
                        "params": {"method": ["svd", "sketch", "dense"], "low_rank": [4, 8],
                                   "num_terms": [1]}}]}
    result = _run(spec=spec, accuracy_threshold=0.0, n_trials=6)
    assert set(result.trials["layer"]) == {"group0:0+1"}
    assert set(result.trials["method"]) <= {"svd", "sketch", "dense"}
    if result.plan:
        assert result.plan["0"] == result.plan["2"]
