"""fxsketch.search.warm, the layerwise search's warm start: whole-model trials of the allocation (budget bisection, then a
descent from the best feasible plan) before the per-unit search, and the final choice between the
warm-start plan and the per-unit bests combined."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from torch import nn


import fxsketch
from fxsketch.calibrate import calibrate
from fxsketch.kernels.int8 import fbgemm_available
from fxsketch.plan import plan_cost
from fxsketch.replacements import FactorCache
from conftest import CALIB, calib_mlp as _model, held_out_agreement as _agreement

SPEC = fxsketch.LayerConfig({"type": "Linear", "range": [0, 2]}, params="auto")


def _optimize(n_trials=12, **kw):
    model = _model()
    args = dict(example_inputs=CALIB[:64], accuracy_fn=_agreement(model), accuracy_threshold=0.9, objective="flops",
                n_trials=n_trials, seed=0, calibration_data=[CALIB[:1000]])
    args.update(kw)
    return model, fxsketch.optimize(model, SPEC, **args)


def test_the_search_starts_with_whole_model_allocation_trials_bisecting_the_budget():
    model, result = _optimize()
    trials = result.trials.sort_values("number")
    joint = trials[trials["layer"] == "*"]
    assert len(joint) >= 2 and list(trials["layer"][: len(joint)]) == ["*"] * len(joint)  # they come first
    assert (trials[trials["layer"] != "*"]["number"] > joint["number"].max()).all()
    notes = [t.user_attrs["fxsketch.warm"] for t in result.study.trials if t.user_attrs.get("fxsketch.unit") == "*"]
    assert notes[0] == "warm start: the allocation at 50.0% of the tuned layers' FLOPs"
    budgets = [float(n.split(" at ")[1].split("%")[0]) / 100 for n in notes if "allocation at" in n]
    for (b, feasible), nxt in zip([(b, a >= 0.9) for b, a in zip(budgets, joint["accuracy"])], budgets[1:]):
        assert (nxt < b) if feasible else (nxt > b)  # bisection: feasible -> cheaper, infeasible -> dearer
    # the first trial is fxsketch.allocate's plan at 50% of the FLOPs
    plan = result.study.trials[0].user_attrs["fxsketch.plan"]
    assert plan == fxsketch.allocate(model, SPEC, [CALIB[:1000]], budget=0.5, example_inputs=CALIB[:64])


def test_the_descent_only_keeps_feasible_cheaper_plans_and_the_result_is_at_least_the_best_of_them():
    model, result = _optimize(n_trials=16)
    study = [t for t in result.study.trials if t.user_attrs.get("fxsketch.unit") == "*"]
    descent = [t for t in study if "descent" in t.user_attrs["fxsketch.warm"]]
    assert descent, "no descent trial ran"
    records = [r for r in fxsketch.find_layers(fxsketch.capture(model, CALIB[:64])) if r.name in ("0", "2")]
    flops = lambda p: plan_cost(records, p).flops  # noqa: E731
    feasible = [t for t in study if t.state.name == "COMPLETE" and t.user_attrs["fxsketch.accuracy"] >= 0.9]
    incumbent = max((t for t in feasible if t.number < descent[0].number), key=lambda t: t.value)
    for t in descent:  # each step is the incumbent with one unit one value cheaper
        plan, base = t.user_attrs["fxsketch.plan"], incumbent.user_attrs["fxsketch.plan"]
        assert flops(plan) < flops(base) and len({n for n in plan if plan[n] != base.get(n)}) == 1
        if t.state.name == "COMPLETE" and t.user_attrs["fxsketch.accuracy"] >= 0.9:
            incumbent = t
    assert result.accuracy >= 0.9
    assert result.flops_ratio >= max(t.value for t in feasible) - 1e-9
    assert all(math.isfinite(t.value) for t in feasible)


def test_without_warm_start_or_threshold_there_is_no_whole_model_trial():
    for kw in ({"warm_start": False}, {"accuracy_threshold": None}):
        _, result = _optimize(n_trials=6, **kw)
        assert "*" not in set(result.trials["layer"]), kw


def test_a_resumed_study_does_not_repeat_the_warm_start(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    _, first = _optimize(n_trials=9, storage=storage, study_name="w")
    _, second = _optimize(n_trials=6, storage=storage, study_name="w", load_if_exists=True)
    counted = second.trials[second.trials["counted"]]  # a reused draw is not counted
    assert len(counted) == 15
    joint = second.trials[second.trials["layer"] == "*"]
    assert (joint["number"] < 9).all()  # whole-model trials only in the first call


def test_optimize_with_calibration_uses_whitened_svd_and_starts_from_the_error_curves():
    model = _model()
    spec = fxsketch.LayerConfig({"type": "Linear", "range": [0, 2]}, params="auto")
    result = fxsketch.optimize(model, spec, example_inputs=CALIB[:64], accuracy_fn=_agreement(model),
                               accuracy_threshold=0.9, objective="flops", n_trials=8, seed=0,
                               calibration_data=[CALIB[:1000]])
    assert set(result.trials["method"]) == {"whitened_svd"}
    gm = fxsketch.capture(model, CALIB[:64])
    cache = FactorCache(calibrate(gm, [CALIB[:1000]]))
    first = result.trials.sort_values("number").groupby("layer").first()
    records = {r.name: r for r in fxsketch.find_layers(gm)}
    checked = 0
    for name, layer in (("0", model[0]), ("2", model[2])):
        # the first trial of each layer is its cheapest "auto" rank with under 1% output error
        ranks = fxsketch.get_kind("whitened_svd").auto_space(records[name])["low_rank"].values()
        errors = cache.output_errors(name, "whitened_svd", layer.weight, ranks)
        under = [r for r, e in zip(ranks, errors) if e <= 0.01]
        if under:
            assert first.loc[name, "low_rank"] == under[0]
            checked += 1
    assert checked
    assert result.accuracy >= 0.9


def _eight_layers() -> nn.Module:
    """48 → 48 (eight times, tanh) → 6, seed 0: more tuning units than a short search has trials."""
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(48, 48), nn.Tanh())], nn.Linear(48, 6)).eval()


def test_with_fewer_trials_left_than_units_the_descent_takes_them_all(caplog):
    model = _eight_layers()
    spec = fxsketch.LayerConfig({"type": "Linear", "range": [0, 8]}, params="auto")
    result = fxsketch.optimize(model, spec, example_inputs=CALIB[:64], accuracy_fn=lambda m: 1.0,
                               accuracy_threshold=0.5, objective="flops", n_trials=9, seed=0,
                               calibration_data=[CALIB[:500]])
    notes = [t.user_attrs.get("fxsketch.warm", "") for t in result.study.trials]
    counted = result.trials[result.trials["counted"]]
    assert len(counted) == 9 and set(counted["layer"]) == {"*"}  # no per-unit trial: 9 trials, 8 units
    assert sum("descent" in n for n in notes) > (9 - 3) // 2  # more than half of what the bisection left
    assert "0 trial(s) left after the warm start's 9 whole-model trials for 8 tuning units" in caplog.text
    assert not any("not searched" in n for n in result.notes)  # the warm start's plan was returned


def test_the_leading_whole_model_plans_are_timed_on_the_whole_model_and_the_fastest_is_returned(monkeypatch):
    finish = importlib.import_module("fxsketch.search.finish")
    timed, chosen = [], []

    class Rounds:  # the second of the leading plans runs fastest
        def median(self, i):
            return 0.5 if i == 1 else 1.0

    def fake_time_rounds(fns, inputs, **kwargs):
        timed.append(len(fns))
        return Rounds()

    fastest = finish._fastest_joint
    monkeypatch.setattr(finish, "time_rounds", fake_time_rounds)
    monkeypatch.setattr(finish, "_fastest_joint", lambda ctx, study: chosen.append(fastest(ctx, study)) or chosen[-1])
    model = _eight_layers()
    spec = fxsketch.LayerConfig({"type": "Linear", "range": [0, 8]}, params={"low_rank": [8, 16, 24, 32, 40]})
    result = fxsketch.optimize(model, spec, example_inputs=CALIB[:64], accuracy_fn=lambda m: 1.0,
                               accuracy_threshold=0.5, n_trials=9, calibration_data=[CALIB[:500]],
                               search=fxsketch.SearchOptions(seed=0))
    assert timed == [finish.LEADING_TIMED]
    leading = finish.leading_joint(result.study, finish.LEADING_TIMED)
    assert len({json.dumps(p, sort_keys=True) for p, _ in leading}) == finish.LEADING_TIMED
    assert chosen == [leading[1]]  # the measured fastest, not the best estimate


def _layer_seconds(record, entry):
    """A layer time model where ranks above about half the smaller side run slower than the dense
    layer, and a whole int8 layer at half the dense time (as on a CPU with fast int8 GEMMs): a FLOP
    descent would step to ranks that run slower."""
    if entry is None or entry.get("method", "dense") == "dense":
        return 1e-3
    if "low_rank" not in entry:
        return 0.5e-3
    return 1e-3 * (0.3 + 1.4 * entry["low_rank"] / min(record.in_features, record.out_features))


@pytest.fixture
def stub_layer_times(monkeypatch):
    """Per-layer timings from `_layer_seconds` (against a dense layer of 1 ms), the model 100 ms."""
    def fake_time(self, record, kind, params, shapes):
        return 1e-3, _layer_seconds(record, None if kind is None else {"method": kind.name, **params})

    monkeypatch.setattr(fxsketch.measure.LayerTimer, "_time", fake_time)
    monkeypatch.setattr(fxsketch.measure.LayerTimer, "_time_fusion", lambda self, *args: 0.0)  # fusion saves nothing
    monkeypatch.setattr(fxsketch.measure.LayerTimer, "model_seconds", lambda self: 0.1)


@pytest.mark.usefixtures("stub_layer_times")
def test_a_timed_descent_steps_only_to_ranks_the_layer_timings_say_run_faster():
    gain = fxsketch.search.warm.STEP_GAIN
    model, result = _optimize(n_trials=16, objective="latency")
    records = {r.name: r for r in fxsketch.find_layers(fxsketch.capture(model, CALIB[:64]))}
    study = [t for t in result.study.trials if t.user_attrs.get("fxsketch.unit") == "*" and t.state.name == "COMPLETE"]
    descent = [t for t in study if "descent" in t.user_attrs["fxsketch.warm"]]
    assert descent, "no descent trial ran"
    first = max((t for t in study if t.number < descent[0].number), key=lambda t: t.value)
    incumbent = first.user_attrs["fxsketch.plan"]
    for t in descent:  # one unit moved, to its largest rank at least `gain` faster than before
        plan = t.user_attrs["fxsketch.plan"]
        (name,) = {n for n in set(plan) | set(incumbent) if plan.get(n) != incumbent.get(n)}
        before = _layer_seconds(records[name], incumbent.get(name))
        assert _layer_seconds(records[name], plan[name]) < before * (1 - gain)
        ranks = fxsketch.get_kind(plan[name]["method"]).auto_space(records[name])["low_rank"].values()
        above = [r for r in ranks if r > plan[name]["low_rank"]]
        if above:
            assert _layer_seconds(records[name], {**plan[name], "low_rank": min(above)}) >= before * (1 - gain)
        if t.user_attrs["fxsketch.accuracy"] >= 0.9:
            incumbent = plan


@pytest.mark.skipif(not fbgemm_available(), reason="this torch build has no FBGEMM: no int8 to build on")
@pytest.mark.usefixtures("stub_layer_times")
def test_a_timed_warm_start_keeps_no_allocated_rank_slower_than_the_whole_int8_layer():
    """With every layer int8 as the base, an allocation's rank that runs no faster than the int8
    layer (by the per-layer timings) is put back to int8: it would cost accuracy for nothing."""
    model, result = _optimize(n_trials=16, objective="latency")
    records = {r.name: r for r in fxsketch.find_layers(fxsketch.capture(model, CALIB[:64]))}
    notes = {t.number: t.user_attrs.get("fxsketch.warm", "") for t in result.study.trials}
    base = next(t for t in result.study.trials if "reduced precision" in notes[t.number])
    assert base.user_attrs["fxsketch.accuracy"] >= 0.9  # every layer int8 keeps the bar: allocations build on it
    allocations = [t for t in result.study.trials if "allocation at" in notes[t.number]]
    assert allocations
    for t in allocations:
        for name, entry in t.user_attrs["fxsketch.plan"].items():
            if "low_rank" in entry:
                assert entry["precision"] == "int8"
                assert _layer_seconds(records[name], entry) < 0.5e-3 * (1 - fxsketch.search.warm.STEP_GAIN)
