"""fxsketch.measure: interleaved rounds until stable, disturbed rounds set aside, figures above the physical
bound marked suspect, honest descriptions; the per-layer timer and the speed bound.

No assertion depends on how fast anything runs (the per-layer timer's tests check structure only).
"""

from __future__ import annotations

import time

import pytest
import torch

import fxsketch
import fxsketch.measure
from fxsketch.capture import capture, find_layers
from fxsketch.measure import LayerTimer, measure_speedup, speed_bound, time_rounds
from conftest import fake_speedup as _speedup, wide_mlp as _wide, WIDE_X as X


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



@pytest.mark.usefixtures("one_thread")
def test_layer_timer_times_each_shape_once_and_never_estimates_past_the_bound():
    """Structure only: how close the estimate comes to a whole-model timing is bench_speedup.py's job."""
    torch.manual_seed(0)
    gm = capture(_wide(), (X,))
    records = {r.name: r for r in find_layers(gm)}
    timer = LayerTimer(gm, records, (X,))
    plan = {name: {"method": "svd", "low_rank": 16} for name in ("2", "4")}  # two layers of one shape
    estimate = timer.speedup(plan)
    assert timer.timed == 1  # 512x512 at rank 16 on 256 rows: one measurement serves both layers
    assert 0 < estimate <= speed_bound(list(records.values()), plan) * (1 + 1e-9)
    assert timer.saving("2", plan["2"]) == timer.saving("4", plan["4"])  # the same cached measurement
    assert timer.speedup(plan) == estimate and timer.timed == 1  # cached: nothing timed again
    assert timer.speedup({}) == 1.0
    timer.speedup({"2": {"method": "svd", "low_rank": 128}})
    assert timer.timed == 2
    # a layer's seconds under an entry are the replacement's side of the same measurement
    ours = timer.seconds("2", plan["2"])
    assert ours > 0 and timer.timed == 2
    assert timer.seconds("2", None) > 0 and timer.seconds("2", {"method": "dense"}) == timer.seconds("2", None)
    assert timer.seconds("missing", plan["2"]) is None
    # every replacement of one geometry is on that geometry's one dense reference: time plus saving
    # is the same dense time for every value, so a faster replacement always saves more
    other = {"method": "svd", "low_rank": 128}
    dense = timer.seconds("2", None)
    assert timer.seconds("2", plan["2"]) + timer.saving("2", plan["2"]) == pytest.approx(dense)
    assert timer.seconds("2", other) + timer.saving("2", other) == pytest.approx(dense)



@pytest.mark.usefixtures("one_thread")
def test_speed_bound_is_the_larger_of_the_flop_and_byte_ratios_of_the_replaced_layers():
    gm = capture(_wide(), (X,))
    records = find_layers(gm)
    plan = {"2": {"method": "svd", "low_rank": 16}}
    # 512x512 on 256 rows: dense 2·512·512 FLOPs per row, rank 16 2·16·1024; the byte ratio is smaller
    flops = (512 * 512) / (16 * 1024)
    assert speed_bound(records, plan) == pytest.approx(flops)
    assert speed_bound(records, {}) == 1.0
    dense_bytes = 512 * 512 + 512 + 256 * 1024  # weights, bias, activations in and out
    assert speed_bound(records, {"2": {"method": "svd", "low_rank": 500}}) == pytest.approx(
        max((512 * 512) / (500 * 1024), dense_bytes / (500 * 1024 + 512 + 256 * (1024 + 1000)), 1.0))



@pytest.mark.usefixtures("one_thread")
def test_layer_timer_gives_up_without_the_layers_input_shape():
    gm = capture(_wide(), (X,))
    records = {r.name: r for r in find_layers(gm)}
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
    assert LayerTimer(gm, records, (X,)).speedup({"2": {"method": "svd", "low_rank": 16}}) is None
