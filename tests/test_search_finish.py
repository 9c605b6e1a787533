"""fxsketch.search.finish: the combined plan backed off until it meets the threshold, and honest speed
figures for the result: a plan slower than dense backed off (latency) or named (flops), the spread kept
in the result and its plan file, Ctrl-C while timing.

No assertion here depends on how fast anything runs: the measurements are replaced by fixed ones
where a decision is tested; benchmarks/bench_speedup.py checks the figures against real timings.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxsketch
import fxsketch.search.finish
from fxsketch import Categorical, LayerConfig
from fxsketch.measure import LayerTimer
from conftest import fake_speedup as _speedup, replaced as _replaced, run_search as _run


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



X = torch.randn(128, 256, generator=torch.Generator().manual_seed(2))



def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).eval()



def _optimize(model, objective="latency", **kw):
    spec = LayerConfig(["2", "4"], params={"low_rank": Categorical([32])})
    return fxsketch.optimize(model, spec, example_inputs=X, accuracy_fn=lambda m: 1.0, accuracy_threshold=0.5,
                             objective=objective, n_trials=2, seed=0, **kw)



@pytest.fixture
def fake_timing(monkeypatch):
    """Replace the whole-model measurement by `rule(replaced layer names) -> Speedup`; records the calls."""
    calls = []

    def install(rule):
        def fake(dense, module, inputs, *, bound=None, **kw):
            layers = tuple(sorted(module.meta.get("fxsketch_plan", {})))
            calls.append(layers)
            return rule(layers)
        monkeypatch.setattr(fxsketch.search.finish, "measure_speedup", fake)
        return calls
    return install



def test_latency_backs_off_a_slower_plan_least_gain_first(fake_timing, monkeypatch):
    gains = {"2": 5e-3, "4": 1e-3}  # layer 4 saves least: it goes back to dense first
    monkeypatch.setattr(LayerTimer, "saving", lambda self, name, entry: gains[name])
    calls = fake_timing(lambda layers: _speedup(0.8) if len(layers) == 2 else _speedup(1.3))
    model = _model()
    result = _optimize(model)
    assert calls[0] == ("2", "4") and result.plan.keys() == {"2"}
    assert result.speedup == pytest.approx(1.3) and result.measured_speedup.faster
    assert result.validation[-1]["dropped"] == "4" and result.validation[-1]["reason"] == "slower than dense"
    assert not result.notes



@pytest.mark.parametrize("slow", [_speedup(0.8), _speedup(0.98, spread=0.04)], ids=["slower", "within-noise"])
def test_latency_returns_the_dense_model_when_no_plan_is_faster(fake_timing, slow):
    fake_timing(lambda layers: slow)
    model = _model()
    result = _optimize(model)
    assert result.plan == {} and result.speedup == 1.0 and result.measured_speedup is None
    assert result.accuracy == result.dense_accuracy
    assert any("no plan was faster than dense on this machine" in n for n in result.notes)
    assert "no plan was faster than dense on this machine" in result.summary()
    torch.testing.assert_close(result.graph_module(X), model(X))



def test_an_unreliable_slowdown_is_reported_not_acted_on(fake_timing):
    fake_timing(lambda layers: _speedup(0.8, stable=False, busy=1.0))
    result = _optimize(_model())
    assert result.plan.keys() == {"2", "4"} and result.speedup == pytest.approx(0.8)
    latency = next(line for line in result.summary().splitlines() if line.startswith("latency"))
    assert "SLOWER than dense" in latency and "unreliable" in latency and "x faster" not in latency



def test_flops_objective_reports_the_measured_speed_and_names_a_slowdown(fake_timing):
    calls = fake_timing(lambda layers: _speedup(0.7))
    result = _optimize(_model(), objective="flops")
    assert len(calls) == 1 and result.plan.keys() == {"2", "4"}  # measured once, never used to decide
    assert result.speedup == pytest.approx(0.7)
    assert any("not faster than dense" in n for n in result.notes)
    assert "note         the returned plan is not faster than dense" in result.summary()



def test_the_result_and_its_plan_file_keep_the_spread_and_the_trials_label_estimates(tmp_path, fake_timing):
    fake_timing(lambda layers: _speedup(1.6, spread=0.03))
    result = _optimize(_model())
    m = result.measured_speedup
    assert (m.low, m.median, m.high) == pytest.approx((1.57, 1.6, 1.63))
    assert "IQR 1.57-1.63" in result.summary()
    result.save_plan(tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["speedup"] == pytest.approx(1.6) and data["speedup_iqr"] == pytest.approx([1.57, 1.63])
    assert data["speedup_stable"] is True and data["speedup_suspect"] is False and data["speedup_rounds"] == 7
    assert fxsketch.load_plan(tmp_path / "plan.json") == result.plan
    done = result.trials[result.trials["state"] == "COMPLETE"]
    assert set(done["speed_source"]) == {"per-layer estimate"}



def test_ctrl_c_while_timing_the_result_keeps_the_validated_plan_unmeasured(fake_timing):
    def interrupt(layers):
        raise KeyboardInterrupt
    fake_timing(interrupt)
    result = _optimize(_model())
    assert result.interrupted and result.plan.keys() == {"2", "4"} and result.measured_speedup is None
    assert result.speedup != result.speedup  # NaN: not measured, never a made-up 1.0
    assert "its speed was not measured" in result.summary() and "not measured" in result.summary()
