"""The latency objective's per-trial cost: per-layer estimates, no timing of infeasible trials, the
returned plan timed on the whole model; the sensitivity table's closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxsketch
from fxsketch import Categorical, LayerConfig
from fxsketch.capture import capture, find_layers
from fxsketch.measure import LayerTimer, speed_bound
from fxsketch.replacements import FactorCache
from fxsketch.rewrite import apply_plan


@pytest.fixture(autouse=True)
def one_thread():
    """Timings with one torch thread: on a shared machine, foreign load stalls multi-threaded GEMMs
    10-30x, unevenly between calls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _wide(seed: int = 0) -> nn.Module:
    """512-wide layers whose middle weight is rank 8 plus noise: rank 1 loses the predictions, 64 keeps them."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)).eval()
    with torch.no_grad():
        model[2].weight.copy_(torch.randn(512, 8) @ torch.randn(8, 512) / 512**0.5 + 0.001 * torch.randn(512, 512))
    return model


X = torch.randn(256, 256, generator=torch.Generator().manual_seed(2))


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


def test_layer_timer_gives_up_without_the_layers_input_shape():
    gm = capture(_wide(), (X,))
    records = {r.name: r for r in find_layers(gm)}
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
    assert LayerTimer(gm, records, (X,)).speedup({"2": {"method": "svd", "low_rank": 16}}) is None


def _low_rank_fails(model: nn.Module):
    """Accuracy = agreement with the dense model; rank 1 keeps little of it, rank 64 all of it."""
    with torch.no_grad():
        ref = model(X).argmax(1)
    return lambda m: (m(X).argmax(1) == ref).float().mean().item()


def test_latency_objective_times_feasible_trials_only_and_the_result_on_the_whole_model():
    model = _wide()
    spec = LayerConfig(["2"], params={"low_rank": Categorical([1, 64])})
    result = fxsketch.optimize(model, spec, example_inputs=X, accuracy_fn=_low_rank_fails(model),
                               accuracy_threshold=0.9, objective="latency", n_trials=2, seed=0)
    done = result.trials[result.trials["state"] == "COMPLETE"].set_index("low_rank")
    assert set(done.index) == {1, 64}
    assert done.loc[1, "accuracy"] < 0.9 and math.isnan(done.loc[1, "speed"]) and done.loc[1, "score"] == -math.inf
    assert done.loc[64, "accuracy"] >= 0.9 and math.isfinite(done.loc[64, "speed"]) and done.loc[64, "speed"] > 0
    assert result.plan == {"2": {"method": "svd", "low_rank": 64}}
    assert result.speedup > 0 and result.speedup_estimate == done.loc[64, "speed"]
    assert "per-layer estimate" in result.summary()


def test_flops_objective_has_no_latency_estimate():
    model = _wide()
    result = fxsketch.optimize(model, LayerConfig(["2"], params={"low_rank": Categorical([64])}), example_inputs=X,
                               accuracy_fn=_low_rank_fails(model), accuracy_threshold=0.5, objective="flops",
                               n_trials=1, seed=0)
    assert result.speedup_estimate is None and result.plan


def test_sensitivity_without_calibration_matches_the_output_errors():
    model = _wide()
    result = fxsketch.optimize(model, LayerConfig(["2", "4"], params={"low_rank": Categorical([64])}),
                               example_inputs=X, accuracy_fn=lambda m: 1.0, accuracy_threshold=0.5,
                               objective="flops", n_trials=2, seed=0)
    table = result.sensitivity.set_index("layer")
    for name in ("2", "4"):  # a nearly rank-8 weight and a random one
        weight = model[int(name)].weight.detach()
        expected = FactorCache().output_errors(name, "svd", weight, [26, 51, 128, 256])
        got = [table.loc[name, c] for c in ("err@5%", "err@10%", "err@25%", "err@50%")]
        assert all(math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-6) for a, b in zip(got, expected)), (got, expected)
        assert got == sorted(got, reverse=True)
    assert table.loc["2", "rank<1%"] <= 8 < table.loc["4", "rank<1%"]
