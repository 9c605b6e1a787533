"""Honest speed figures: interleaved rounds until stable, disturbed rounds set aside, figures above
the physical bound marked suspect, a plan slower than dense backed off (latency) or named (flops).

No assertion here depends on how fast anything runs: the measurements are replaced by fixed ones
where a decision is tested; benchmarks/bench_speedup.py checks the figures against real timings.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

import fxsketch
import fxsketch.measure
import fxsketch.search.finish
from fxsketch import Categorical, LayerConfig
from fxsketch.measure import LayerTimer, Speedup, measure_speedup, time_rounds

X = torch.randn(128, 256, generator=torch.Generator().manual_seed(2))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).eval()


def _speedup(median: float, spread: float = 0.02, stable: bool = True, busy: float = 0.0) -> Speedup:
    return Speedup(median, median - spread, median + spread, 7, stable, 1e-3, 1e-3 / median, busy)


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


def test_rounds_disturbed_by_other_processes_are_set_aside_and_reported(monkeypatch):
    waited = iter(range(0, 10**9, 10))  # every round: 10 s waited for a CPU, far above any wall time
    monkeypatch.setattr(fxsketch.measure, "_cpu_wait", lambda: float(next(waited)))
    rounds = time_rounds([lambda x: x + 1, lambda x: x * 2], (torch.ones(4),), cap_s=0.2)
    assert rounds.busy == 1.0 and not rounds.stable and len(rounds.times[0]) >= 5  # all rounds, flagged
    assert "other processes held the CPUs in 100% of the rounds" in _speedup(2.0, stable=False, busy=1.0).describe()

    def every_other_round():  # the start and end readings of each round; odd rounds wait 10 s
        total, n = 0.0, 0
        while True:
            yield total
            total += 10.0 * (n % 2)
            yield total
            n += 1
    readings = every_other_round()
    monkeypatch.setattr(fxsketch.measure, "_cpu_wait", lambda: next(readings))
    rounds = time_rounds([lambda x: x + 1], (torch.ones(4),), cap_s=0.2, min_rounds=3)
    assert 0.3 < rounds.busy < 0.7 and len(rounds.times[0]) >= 3  # only the undisturbed half is kept
    monkeypatch.setattr(fxsketch.measure, "_cpu_wait", lambda: 0.0)
    rounds = time_rounds([lambda x: x + 1], (torch.ones(4),), cap_s=0.2, min_rounds=3)
    assert rounds.busy == 0.0 and len(rounds.times[0]) >= 3


def test_a_figure_above_the_physical_bound_is_measured_again_then_marked_suspect():
    slow = lambda x: time.sleep(0.003)  # noqa: E731  (3 ms against a no-op: a ratio far above 2)
    result = measure_speedup(slow, lambda x: None, (torch.ones(1),), bound=2.0, min_rounds=3, cap_s=0.3)
    assert result.suspect and result.low > 2.0 and result.rounds >= 6  # the second measurement: twice the rounds
    assert "suspect" in result.describe()
    fine = measure_speedup(slow, lambda x: None, (torch.ones(1),), bound=None, min_rounds=3, cap_s=0.3)
    assert not fine.suspect


def test_describe_never_calls_a_slower_or_noisy_figure_faster():
    assert _speedup(1.5).describe().startswith("1.50x faster than dense (IQR 1.48-1.52 over 7")
    assert "SLOWER than dense" in _speedup(0.8).describe() and "faster" not in _speedup(0.8).describe()
    assert "no faster than dense within the noise" in _speedup(1.01, spread=0.05).describe()
    busy = _speedup(2.0, stable=False, busy=1.0).describe()
    assert "unreliable" in busy and "100% of the rounds" in busy and not _speedup(2.0, stable=False).reliable


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
