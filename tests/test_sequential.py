"""fxsketch.sequential (error-compensating calibration): each layer's statistics are the inputs of the partly
replaced model, plans are checked as rewrite checks them, and sequential fitting undoes upstream error."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import fxsketch
from fxsketch.calibrate import calibrate
from fxsketch.recover import rewrite_sequential
from fxsketch.replacements import FactorCache
from fxsketch.rewrite import apply_plan
from fxsketch.sequential import sequential_stats
from conftest import CALIB, HELD_OUT, calib_mlp as _model, rel_error as _rel_error


def test_sequential_statistics_are_the_inputs_of_the_partly_replaced_model():
    model = _model()
    gm = fxsketch.capture(model, CALIB[:8])
    records = {r.name: r for r in fxsketch.find_layers(gm)}
    plan = {"0": {"method": "whitened_svd", "low_rank": 3}, "2": {"method": "whitened_svd", "low_rank": 3}}
    batches = [CALIB[:700], CALIB[700:]]
    stats = sequential_stats(gm, batches, plan)
    plain = calibrate(gm, batches)
    # the first planned layer sees the original inputs: its statistics are the plain ones
    torch.testing.assert_close(stats["0"].gram, plain["0"].gram)
    torch.testing.assert_close(stats["0"].cross, plain["0"].gram)
    # the second sees what the replaced first layer gives it, paired with the original inputs
    new = apply_plan(gm, records, plan, FactorCache(stats))
    with torch.no_grad():
        seen = torch.tanh(new.get_submodule("0")(CALIB)).double()
        ref = torch.tanh(model[0](CALIB)).double()
    torch.testing.assert_close(stats["2"].gram, seen.T @ seen)
    torch.testing.assert_close(stats["2"].cross, ref.T @ seen)
    torch.testing.assert_close(stats["2"].ref_mean, ref.mean(0))
    assert not torch.allclose(stats["2"].gram, plain["2"].gram)
    # the unplanned last layer keeps plain statistics
    torch.testing.assert_close(stats["4"].gram, plain["4"].gram)



@pytest.mark.parametrize("entry, error", [
    ({"bogus": {"method": "svd", "low_rank": 2}}, "plan names layer 'bogus'"),
    ({"2": {"method": "whitened_svd", "low_rank": 99}}, "low_rank must be an integer in"),
    ({"2": {"method": "svd", "rank": 2}}, "are not parameters of method 'svd'"),
])
def test_sequential_statistics_check_the_plan_as_rewrite_does(entry, error):
    gm = fxsketch.capture(_model(), CALIB[:8])
    with pytest.raises(ValueError, match=error):
        sequential_stats(gm, [CALIB[:100]], entry)
    with pytest.raises(ValueError, match=error):
        fxsketch.rewrite_sequential(_model(), entry, [CALIB[:100]], CALIB[:8])



@pytest.mark.parametrize("method", ["whitened_svd", "svd"])
def test_sequential_fitting_undoes_upstream_error(method):
    model = _model()
    plan = {"0": {"method": method, "low_rank": 3}, "2": {"method": method, "low_rank": 4},
            "4": {"method": method, "low_rank": 2}}
    plain = fxsketch.rewrite(model, plan, CALIB[:8], calibration_data=[CALIB])
    sequential = rewrite_sequential(model, plan, [CALIB[:700], CALIB[700:]], CALIB[:8])
    assert set(sequential.meta["fxsketch_plan"]) == set(plan)
    assert _rel_error(sequential, model) < 0.9 * _rel_error(plain, model)


@pytest.mark.parametrize("sequential", [True, False])
def test_the_search_fits_its_candidates_as_the_matching_rewrite_does(sequential, monkeypatch):
    """With calibration data the search builds every candidate with a sequential fit by default
    (`CalibrationOptions(sequential=True)`); the model it returns is the one `rewrite_sequential`
    (or, with False, the plain calibrated `rewrite`) makes of the same plan."""
    context = importlib.import_module("fxsketch.search.context")
    fitted = []
    monkeypatch.setattr(context, "sequential_stats", lambda gm, b, plan, *a, **k: fitted.append(
        json.dumps(plan, sort_keys=True)) or sequential_stats(gm, b, plan, *a, **k))
    model = _model()
    batches = [CALIB[:700], CALIB[700:]]
    spec = fxsketch.LayerConfig({"type": "Linear"}, params={"method": "whitened_svd", "low_rank": [2, 3]})
    result = fxsketch.optimize(model, spec, example_inputs=CALIB[:8], accuracy_fn=lambda m: 1.0,
                               accuracy_threshold=0.5, n_trials=4, calibration_data=batches,
                               search=fxsketch.SearchOptions(objective="flops", seed=0, warm_start=False),
                               calibration=fxsketch.CalibrationOptions(sequential=sequential))
    assert len(result.plan) > 1
    reference = (rewrite_sequential(model, result.plan, batches, CALIB[:8]) if sequential
                 else fxsketch.rewrite(model, result.plan, CALIB[:8], calibration_data=batches))
    other = (fxsketch.rewrite(model, result.plan, CALIB[:8], calibration_data=batches) if sequential
             else rewrite_sequential(model, result.plan, batches, CALIB[:8]))
    with torch.no_grad():
        got, want, not_want = (m(HELD_OUT) for m in (result.graph_module, reference, other))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, not_want, atol=1e-5)
    assert len(fitted) == len(set(fitted))  # each plan fitted once (finishing builds it several times)
