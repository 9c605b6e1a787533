"""fxsketch.allocate: rank allocation under a budget (against uniform ranks), its errors, and
sensitivity-weighted allocation (given, measured and output weights)."""

from __future__ import annotations

import pytest
from torch import nn

import fxsketch
from fxsketch.allocate import unit_weights
from fxsketch.calibrate import calibrate
from fxsketch.plan import plan_cost
from fxsketch.replacements import FactorCache
from fxsketch.rewrite import apply_plan
from conftest import CALIB, calib_mlp as _model, calib_setup as _setup, rel_error as _rel_error


def test_allocation_meets_the_budget_and_beats_uniform_ranks():
    model, gm, records = _setup()
    spec = fxsketch.LayerConfig({"type": "Linear", "range": [0, 2]}, params={"low_rank": fxsketch.Int(1, 24)})
    plan = fxsketch.allocate(model, spec, [CALIB], budget=0.3, example_inputs=CALIB[:8])
    selected = [records["0"], records["2"]]
    dense_flops = plan_cost(selected, {}).flops
    assert plan_cost(selected, plan).flops <= 0.3 * dense_flops
    stats = calibrate(gm, [CALIB])
    allocated = _rel_error(apply_plan(gm, records, plan, FactorCache(stats)), model)
    # a uniform whitened plan of no fewer FLOPs
    for rank in range(1, 25):
        uniform = {n: {"method": "whitened_svd", "low_rank": rank} for n in ("0", "2")}
        if plan_cost(selected, uniform).flops > plan_cost(selected, plan).flops:
            break
        best_uniform = uniform
    assert allocated <= _rel_error(apply_plan(gm, records, best_uniform, FactorCache(stats)), model) + 1e-9



def test_allocation_budget_errors():
    model = _model()
    spec = fxsketch.LayerConfig({"type": "Linear", "range": [0, 2]}, params={"low_rank": fxsketch.Int(8, 24)})
    with pytest.raises(ValueError, match="below the cheapest plan"):
        fxsketch.allocate(model, spec, [CALIB], budget=1000, example_inputs=CALIB[:8])
    with pytest.raises(ValueError, match="positive fraction"):
        fxsketch.allocate(model, spec, [CALIB], budget=-0.5, example_inputs=CALIB[:8])
    sketch_spec = fxsketch.LayerConfig("0", params={"method": ["sketch"], "low_rank": [2]})
    with pytest.raises(ValueError, match="error curve"):
        fxsketch.allocate(model, sketch_spec, [CALIB], example_inputs=CALIB[:8])



def _two_layer_setup():
    model = _model()
    gm = fxsketch.capture(model, CALIB[:8])
    spec = fxsketch.LayerConfig({"type": "Linear", "range": [0, 2]}, params={"low_rank": fxsketch.Int(1, 24)})
    return model, gm, spec



def test_sensitivity_weights_move_rank_to_the_layer_that_matters():
    model, _, spec = _two_layer_setup()
    plain = fxsketch.allocate(model, spec, [CALIB], budget=0.3, example_inputs=CALIB[:8])
    heavy = {}
    for layer in ("0", "2"):
        plan = fxsketch.allocate(model, spec, [CALIB], budget=0.3, example_inputs=CALIB[:8],
                                 sensitivity={layer: 1e4})
        heavy[layer] = plan
        rank = lambda p, n: p[n]["low_rank"] if n in p else 10 ** 6  # noqa: E731
        assert rank(plan, layer) >= rank(plain, layer)
    assert rank(heavy["0"], "0") > rank(heavy["2"], "0")
    assert rank(heavy["2"], "2") > rank(heavy["0"], "2")



def test_measured_sensitivity_probes_each_unit_once_and_changes_the_plan():
    model, _, spec = _two_layer_setup()
    probes = []

    def accuracy(m):
        probes.append(m)
        return -_rel_error(m, model)

    plan = fxsketch.allocate(model, spec, [CALIB], budget=0.3, example_inputs=CALIB[:8], sensitivity=accuracy)
    assert len(probes) == 3  # the dense model, then each unit alone
    assert plan and all(e["method"] == "whitened_svd" for e in plan.values())
    output = fxsketch.allocate(model, spec, [CALIB], budget=0.3, example_inputs=CALIB[:8], sensitivity="output")
    assert output
    with pytest.raises(ValueError, match="sensitivity must be"):
        fxsketch.allocate(model, spec, [CALIB], budget=0.3, example_inputs=CALIB[:8], sensitivity="loss")
    with pytest.raises(TypeError, match="must return a number"):
        fxsketch.allocate(model, spec, [CALIB], budget=0.3, example_inputs=CALIB[:8], sensitivity=lambda m: "high")



def test_measured_weights_are_loss_per_relative_error():
    model, gm, spec = _two_layer_setup()
    from fxsketch.allocate import _weights, unit_choices
    from fxsketch.capture import other_modules
    from fxsketch.spec import load_spec
    from fxsketch.units import resolve_units

    records = fxsketch.find_layers(gm)
    by_name = {r.name: r for r in records}
    units = resolve_units(records, load_spec(spec), other_modules(gm, records), "whitened_svd")
    cache = FactorCache(calibrate(gm, [CALIB]))
    options = [unit_choices(u, by_name, cache, _weights(gm, records)) for u in units]
    losses = {"0": 0.2, "2": 0.05}

    def accuracy(m):  # the loss of each probe is known: which layer is replaced decides it
        replaced = [n for n in ("0", "2") if not isinstance(m.get_submodule(n), nn.Linear)]
        return 1.0 - sum(losses[n] for n in replaced)

    got = unit_weights(units, options, by_name, cache, accuracy, gm, share=0.3)
    for unit, opts, w in zip(units, options, got):
        probe = min((c for c in opts if c.entry), key=lambda c: (abs(c.flops - 0.3 * opts[0].flops), c.flops))
        assert w == pytest.approx(losses[unit.layers[0]] / probe.error)
