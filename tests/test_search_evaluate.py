"""fxsketch.search.evaluate, the one trial protocol: failing, NaN and malformed accuracies, configurations
costlier than dense pruned unevaluated, repeated values reused, speed_fn and the latency objective's speeds."""

from __future__ import annotations

import math

import optuna
import pytest

from fxsketch import Int, LayerConfig
from fxsketch.nn import LowRankLinear
from conftest import agreement as _agreement, mlp as _mlp, replaced as _replaced, run_search as _run


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
    assert result.plan == {"2": {"method": "svd", "low_rank": 12, "precision": "float"}}



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
