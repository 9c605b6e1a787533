"""Rank and precision in one search: where "auto" spaces offer int8, how warm-start plans reach a
unit's parameters, and an `optimize` that starts from the precision-only plan."""

from __future__ import annotations

import pytest
import torch

import fxsketch
from fxsketch.capture import find_layers
from fxsketch.kernels.int8 import fbgemm_available
from fxsketch.plan import plan_cost
from fxsketch.replacements import precision
from fxsketch.search.warm import precision_plan
from fxsketch.space import Categorical
from fxsketch.units import invalid_reason, resolve_units, warm_params
from conftest import WIDE_X, agreement as _agreement, wide_mlp

needs_fbgemm = pytest.mark.skipif(not fbgemm_available(), reason="this torch build has no FBGEMM")
AUTO = fxsketch.TuningConfigs([fxsketch.LayerConfig({"type": "Linear"}, params="auto")])


def _units(model, x, precision):
    records = find_layers(fxsketch.capture(model, x))
    return resolve_units(records, AUTO, None, "svd", precision=precision)


@needs_fbgemm
def test_auto_spaces_offer_int8_and_int8_factors_only_to_a_timed_search_on_the_cpu(monkeypatch):
    model = wide_mlp()
    monkeypatch.setattr(precision, "_native_cpu_bf16", lambda: False)  # an AVX2 CPU: bf16 is not offered
    timed = _units(model, WIDE_X, precision=True)
    assert timed and all(u.space["method"] == Categorical(["svd", "int8"]) for u in timed)
    assert all(u.space["precision"] == Categorical(["float", "int8"]) for u in timed)
    monkeypatch.setattr(precision, "_native_cpu_bf16", lambda: True)  # AVX512-BF16 or AMX: bf16 is
    native = _units(model, WIDE_X, precision=True)
    assert all(u.space["method"] == Categorical(["svd", "int8", "bf16"]) for u in native)
    assert all(u.space["precision"] == Categorical(["float", "int8", "bf16"]) for u in native)
    monkeypatch.setattr(precision, "_native_cpu_bf16", lambda: False)
    counted = _units(model, WIDE_X, precision=False)  # objective "flops": int8 saves no FLOP
    assert all("method" not in u.space and "precision" not in u.space for u in counted)
    meta = _units(wide_mlp().to("meta"), WIDE_X.to("meta"), precision=True)  # no fast int8 there
    assert all("method" not in u.space and "precision" not in u.space for u in meta)
    double = _units(wide_mlp().double(), WIDE_X.double(), precision=True)  # FBGEMM takes float32
    assert all("method" not in u.space for u in double)


@needs_fbgemm
def test_warm_plans_reach_the_units_parameters():
    unit = _units(wide_mlp(), WIDE_X, precision=True)[0]
    assert warm_params(unit, {"method": "int8"}) == {f"{unit.key}:method": "int8"}
    rank = unit.space["low_rank"].values()[0]
    assert warm_params(unit, {"method": "svd", "low_rank": rank}) == {
        f"{unit.key}:method": "svd", f"{unit.key}:low_rank": rank, f"{unit.key}:precision": "float"}
    int8_factors = warm_params(unit, {"method": "svd", "low_rank": rank, "precision": "int8"})
    assert int8_factors[f"{unit.key}:precision"] == "int8"
    assert warm_params(unit, {"method": "sketch", "num_terms": 1, "low_rank": rank}) == {}  # not in this space
    assert warm_params(unit, {"method": "svd", "low_rank": 10**6}) == {}
    assert precision_plan([unit]) == {name: {"method": "int8"} for name in unit.layers}
    records = {r.name: r for r in find_layers(fxsketch.capture(wide_mlp(), WIDE_X))}
    # an 8-bit layer does the dense FLOPs at a quarter of the work: cheaper, so drawn and evaluated
    assert invalid_reason(records, unit, {"method": "int8"}) == ""
    assert invalid_reason(records, unit, {"method": "svd", "low_rank": rank, "precision": "int8"}) == ""


@needs_fbgemm
def test_a_timed_search_tries_the_precision_plan_first_and_keeps_the_accuracy_bar():
    model = wide_mlp()
    agreement = _agreement(model, WIDE_X)
    result = fxsketch.optimize(model, fxsketch.LayerConfig({"type": "Linear"}, params="auto"), example_inputs=WIDE_X,
                               accuracy_fn=agreement, accuracy_threshold=0.9, n_trials=8,
                               calibration_data=[WIDE_X], search=fxsketch.SearchOptions(seed=0))
    first = min(result.study.trials, key=lambda t: t.number)
    # with calibration data the int8 layers could be smoothed: first without (faster), the layers
    # after a ReLU of an int8 layer static (the rewrite fuses each such pair), which keeps the bar here
    assert first.user_attrs["fxsketch.warm"] == ("warm start: every tuned layer in reduced precision, unsmoothed, "
                                                 "static inputs after int8 activations")
    static = {"method": "int8", "smooth": False, "static": True}
    assert first.user_attrs["fxsketch.plan"] == {"0": {"method": "int8", "smooth": False}, "2": static, "4": static}
    assert first.user_attrs["fxsketch.accuracy"] >= 0.9
    assert result.accuracy >= 0.9 and agreement(result.graph_module) >= 0.9
    assert all(e.get("smooth") is False for e in result.plan.values() if "int8" in (e["method"], e.get("precision")))
    methods = {(e["method"], e.get("precision", "float")) for e in result.plan.values()}
    assert methods <= {("int8", "float"), ("svd", "float"), ("svd", "int8"), ("whitened_svd", "float"),
                       ("whitened_svd", "int8")}


@needs_fbgemm
def test_a_byte_budget_counts_int8_weights_at_one_byte():
    model = wide_mlp()
    agreement = _agreement(model, WIDE_X)
    spec = fxsketch.LayerConfig({"type": "Linear"}, params="auto")
    result = fxsketch.optimize(model, spec, example_inputs=WIDE_X, accuracy_fn=agreement, accuracy_threshold=0.0,
                               n_trials=10, search=fxsketch.SearchOptions(seed=0, max_bytes=0.3))
    records = find_layers(fxsketch.capture(model, WIDE_X))
    assert plan_cost(records, result.plan).weight_bytes <= 0.3 * plan_cost(records, {}).weight_bytes
    notes = " ".join(result.trials["note"].dropna())
    assert "over the weight-byte budget" in notes
    with pytest.raises(ValueError, match="weight-byte budget"):
        fxsketch.optimize(model, spec, example_inputs=WIDE_X, accuracy_fn=agreement,
                          search=fxsketch.SearchOptions(max_bytes=-1))


@needs_fbgemm
def test_the_pareto_front_spans_rank_and_precision():
    model = wide_mlp()
    agreement = _agreement(model, WIDE_X)
    spec = fxsketch.LayerConfig({"type": "Linear"}, params="auto")
    result = fxsketch.optimize(model, spec, example_inputs=WIDE_X, accuracy_fn=agreement, n_trials=8,
                               calibration_data=[WIDE_X],
                               search=fxsketch.SearchOptions(seed=0, objectives=("accuracy", "speed")))
    first = min(result.study.trials, key=lambda t: t.number)
    assert first.user_attrs["fxsketch.plan"] == {name: {"method": "int8"} for name in ("0", "2", "4")}
    front = result.pareto

    def dominates(a, b):
        return a.accuracy >= b.accuracy and a.speed >= b.speed and (a.accuracy, a.speed) != (b.accuracy, b.speed)

    assert front and not any(dominates(a, b) for a in front for b in front)
    # the precision-only plan was evaluated: nothing on the front is less accurate than all of it
    assert max(p.accuracy for p in front) >= first.user_attrs["fxsketch.accuracy"]


def _outlier_search(smooth: bool):
    """`optimize` at fidelity 0.99 on `wide_mlp` whose layer 0 reads one feature 1000x the others
    (its weights ignore it), with calibration smoothing on or off: (fidelity function, result)."""
    model = wide_mlp()
    with torch.no_grad():
        model[0].weight[:, 0] = 0
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(3))
    x[:, 0] *= 1000

    def fidelity(m):
        with torch.no_grad():
            ref, out = model(x), m(x)
        return 1 - float((out - ref).square().sum() / ref.square().sum())

    result = fxsketch.optimize(model, fxsketch.LayerConfig({"type": "Linear"}, params="auto"), example_inputs=x,
                               accuracy_fn=fidelity, accuracy_threshold=0.99, n_trials=12, calibration_data=[x],
                               progress=False, search=fxsketch.SearchOptions(seed=0),
                               calibration=fxsketch.CalibrationOptions(smooth=smooth))
    return fidelity, result


@needs_fbgemm
def test_when_every_layer_in_int8_misses_the_bar_the_least_sensitive_layers_keep_it():
    """Layer 0's inputs have one huge feature (which its weights ignore): unsmoothed, per-tensor int8
    activations leave the others no resolution, so the all-int8 plan fails, while layers 2 and 4
    take int8 at no cost. The warm start measures each unit alone and keeps the largest feasible set.
    (Smoothing takes the feature out: `tests/test_int8.py`.)"""
    fidelity, result = _outlier_search(smooth=False)
    warm = {t.user_attrs["fxsketch.warm"]: t for t in result.study.trials if "fxsketch.warm" in t.user_attrs}
    assert warm["warm start: every tuned layer in reduced precision"].user_attrs["fxsketch.accuracy"] < 0.99
    subset = warm["warm start: the 2 units least sensitive to reduced precision"]
    assert subset.user_attrs["fxsketch.plan"] == {"2": {"method": "int8"}, "4": {"method": "int8"}}
    assert subset.user_attrs["fxsketch.accuracy"] >= 0.99
    assert result.accuracy >= 0.99 and fidelity(result.graph_module) >= 0.99
    first = result.plan.get("0", {})
    assert first.get("method") != "int8" and first.get("precision", "float") != "int8"


@needs_fbgemm
def test_the_unsmoothed_precision_plan_comes_first_and_the_smoothed_one_when_it_misses_the_bar():
    """Layer 0's inputs have one huge feature (its weights ignore it): unsmoothed int8 misses the
    bar there (with static inputs after the ReLUs, and without), smoothed int8 keeps it
    (`tests/test_int8.py`), so the warm start's third plan, every layer smoothed, is the base of
    the search."""
    fidelity, result = _outlier_search(smooth=True)
    warm = sorted((t for t in result.study.trials if "fxsketch.warm" in t.user_attrs), key=lambda t: t.number)
    static, plain, smoothed = warm[:3]
    assert static.user_attrs["fxsketch.warm"].endswith("unsmoothed, static inputs after int8 activations")
    assert plain.user_attrs["fxsketch.warm"].endswith("reduced precision, unsmoothed")
    assert static.user_attrs["fxsketch.accuracy"] < 0.99 and plain.user_attrs["fxsketch.accuracy"] < 0.99
    assert smoothed.user_attrs["fxsketch.warm"].endswith("reduced precision")
    assert smoothed.user_attrs["fxsketch.plan"] == {n: {"method": "int8"} for n in ("0", "2", "4")}
    assert smoothed.user_attrs["fxsketch.accuracy"] >= 0.99
    assert result.accuracy >= 0.99 and fidelity(result.graph_module) >= 0.99
