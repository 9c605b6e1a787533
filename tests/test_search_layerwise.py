"""fxsketch.search.layerwise: the trial budget split between units (an exhausted unit passes its share on),
and per-unit shares of the parameter budget pruning trials unevaluated."""

from __future__ import annotations


import fxsketch
from fxsketch import Int, LayerConfig, TuningConfigs
from fxsketch.plan import plan_cost
from conftest import CALIB, calib_mlp as _model, held_out_agreement as _agreement, run_search as _run


def test_budget_is_split_and_an_exhausted_unit_passes_its_share_on():
    spec = TuningConfigs([LayerConfig("0", params={"low_rank": [4, 8]}),
                          LayerConfig("2", params={"low_rank": Int(1, 30)})])
    result = _run(spec=spec, n_trials=10)
    assert result.trials.groupby("layer").size().to_dict() == {"0": 2, "2": 8}



def test_budget_smaller_than_the_units_warns(caplog):
    result = _run(n_trials=1)
    assert len(result.trials) == 1
    assert set(result.trials["layer"]) == {"0"}
    assert "1 trial(s) left for 2 tuning units: 1 of them get no trial of their own" in caplog.text
    assert result.notes[0] == "1 unit(s) not searched (no trial of its own ran; raise n_trials or timeout): 2"



def test_budgets_prune_unevaluated_trials_with_the_reason():
    model = _model()
    evaluated = []
    base = _agreement(model)

    def spy(m):
        evaluated.append(1)
        return base(m)

    spec = fxsketch.LayerConfig({"type": "Linear", "range": [0, 2]}, params={"low_rank": [2, 4, 10, 12]})
    result = fxsketch.optimize(model, spec, example_inputs=CALIB[:64], accuracy_fn=spy, accuracy_threshold=0.0,
                               objective="flops", n_trials=12, seed=0, max_params=0.25,
                               sampler=__import__("optuna").samplers.RandomSampler(seed=0))
    pruned = result.trials[result.trials["state"] == "PRUNED"]
    assert pruned["note"].str.contains("over the parameter budget").sum() >= 3
    assert pruned["note"].str.contains("over the parameter budget|not cheaper than the dense").all()
    assert len(evaluated) == 1 + (result.trials["state"] == "COMPLETE").sum() - result.trials["note"].str.contains(
        "reused").sum() + len(result.validation)
    records = {r.name: r for r in fxsketch.find_layers(fxsketch.capture(model, CALIB[:8]))}
    dense_params = plan_cost([records["0"], records["2"]], {}).params
    assert result.plan
    assert plan_cost([records["0"], records["2"]], result.plan).params <= 0.25 * dense_params


def test_a_searched_unit_that_missed_the_bar_is_told_apart_from_an_unsearched_one():
    result = _run(n_trials=3, accuracy_threshold=1.01)  # no plan can beat the dense model's 1.0
    assert result.plan == {}
    assert result.notes[0].startswith("2 unit(s) searched, but no trial met the accuracy threshold: 0, 2")
    assert "not searched" not in " ".join(result.notes)
    assert "searched, but no trial met the accuracy threshold" in result.summary()


def test_a_unit_queues_no_more_warm_starts_than_its_trials_so_none_leak_into_the_next_unit():
    model = _model()
    spec = fxsketch.LayerConfig({"type": "Linear", "range": [0, 2]}, params="auto")
    result = fxsketch.optimize(model, spec, example_inputs=CALIB[:64], accuracy_fn=_agreement(model),
                               accuracy_threshold=0.9, n_trials=4, calibration_data=[CALIB[:1000]],
                               search=fxsketch.SearchOptions(seed=0))
    per_unit = [t for t in result.study.trials if t.user_attrs.get("fxsketch.unit") not in (None, "*")]
    assert per_unit
    for t in per_unit:  # a unit's trial carries that unit's parameters only
        assert all(name.startswith(t.user_attrs["fxsketch.unit"] + ":") for name in t.params), t.params
