"""Calibration statistics, activation-whitened SVD, least-squares refits, allocation, budgets,
and distillation: each checked against a direct computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsketch
from fxsketch.calibrate import calibrate
from fxsketch.plan import plan_cost
from fxsketch.replacements import FactorCache
from fxsketch.rewrite import apply_plan

D, OUT = 48, 40


def _data(n, seed):
    """Inputs on a 10-dimensional subspace plus a little noise: strongly anisotropic, like activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(10, D, generator=torch.Generator().manual_seed(99))
    return torch.randn(n, 10, generator=g) @ mix + 0.05 * torch.randn(n, D, generator=g)


CALIB, HELD_OUT = _data(1500, 1), _data(500, 2)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, OUT), nn.Tanh(), nn.Linear(OUT, OUT), nn.Tanh(), nn.Linear(OUT, 6)).eval()


def _setup():
    model = _model()
    gm = fxsketch.capture(model, CALIB[:8])
    records = {r.name: r for r in fxsketch.find_layers(gm)}
    return model, gm, records


def _rel_error(module, model, x=HELD_OUT):
    with torch.no_grad():
        ref = model(x)
        return float((module(x) - ref).square().sum() / ref.square().sum())


def test_statistics_are_the_exact_second_moments_for_linear_and_conv():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    x1, x2 = torch.randn(2, 3, 6, 6), torch.randn(3, 3, 6, 6)
    stats = fxsketch.calibrate(fxsketch.capture(net, x1), [x1, (x2,)])
    patches = torch.cat([nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)
                         for x in (x1, x2)]).double()
    torch.testing.assert_close(stats["0"].gram, patches.T @ patches)
    assert stats["0"].count == patches.shape[0]
    hidden = torch.cat([net[2](net[1](net[0](x))) for x in (x1, x2)]).double()
    torch.testing.assert_close(stats["3"].second_moment, hidden.T @ hidden / 5)


def test_empty_calibration_data_is_an_error():
    _, gm, _ = _setup()
    with pytest.raises(ValueError, match="calibration_data is empty"):
        calibrate(gm, [])


def test_whitened_svd_beats_svd_on_real_outputs_and_its_error_estimate_is_exact():
    model, gm, records = _setup()
    stats = calibrate(gm, [CALIB])
    cache = FactorCache(stats, refit=False)
    for rank in (4, 8):
        plain = apply_plan(gm, records, {"0": {"method": "svd", "low_rank": rank}}, FactorCache())
        white = apply_plan(gm, records, {"0": {"method": "whitened_svd", "low_rank": rank}}, cache)
        layer = lambda m: m.get_submodule("0")  # noqa: E731
        w_err = _layer_error(layer(white), model[0], CALIB)
        assert w_err < 0.5 * _layer_error(layer(plain), model[0], CALIB)
        estimate = cache.output_errors("0", "whitened_svd", model[0].weight, [rank])[0]
        assert estimate == pytest.approx(w_err, rel=1e-3, abs=1e-6)
        svd_estimate = cache.output_errors("0", "svd", model[0].weight, [rank])[0]
        assert svd_estimate == pytest.approx(_layer_error(layer(plain), model[0], CALIB), rel=1e-3, abs=1e-6)


def _layer_error(replacement, dense, x):
    """E‖(W − Ŵ)x‖² / E‖Wx‖² with the bias taken out of both."""
    with torch.no_grad():
        ref = dense(x) - dense.bias
        return float((replacement(x) - dense(x)).square().sum() / ref.square().sum())


def test_whitened_svd_without_calibration_says_what_to_pass():
    model, gm, records = _setup()
    with pytest.raises(ValueError, match="calibration_data"):
        apply_plan(gm, records, {"0": {"method": "whitened_svd", "low_rank": 4}}, FactorCache())


@pytest.mark.parametrize("plan", [
    {"0": {"method": "svd", "low_rank": 6}},
    {"0": {"method": "sketch", "num_terms": 1, "low_rank": 3}},
    {"0": {"method": "sketch", "num_terms": 2, "low_rank": 2}},
])
def test_refit_reduces_the_output_error_on_unseen_inputs(plan):
    model, gm, records = _setup()
    stats = calibrate(gm, [CALIB])
    before = _rel_error(apply_plan(gm, records, plan, FactorCache(stats, refit=False)), model)
    after = _rel_error(apply_plan(gm, records, plan, FactorCache(stats, refit=True)), model)
    assert after < 0.7 * before


def test_rewrite_with_calibration_data_is_deterministic_and_activation_aware():
    model = _model()
    plan = {"0": {"method": "svd", "low_rank": 6}, "2": {"method": "sketch", "num_terms": 1, "low_rank": 8}}
    a = fxsketch.rewrite(model, plan, CALIB[:8], calibration_data=[CALIB[:700], CALIB[700:]])
    b = fxsketch.rewrite(model, plan, CALIB[:8], calibration_data=[CALIB[:700], CALIB[700:]])
    with torch.no_grad():
        assert torch.equal(a(HELD_OUT), b(HELD_OUT))
    blind = fxsketch.rewrite(model, plan, CALIB[:8])
    assert _rel_error(a, model) < 0.5 * _rel_error(blind, model)


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


def _agreement(model):
    with torch.no_grad():
        ref = model(HELD_OUT).argmax(1)
    return lambda m: (m(HELD_OUT).argmax(1) == ref).float().mean().item()


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


def test_distill_lowers_the_loss_and_only_trains_the_factors():
    model = _model()
    gm = fxsketch.rewrite(model, {"0": {"method": "svd", "low_rank": 3}, "2": {"method": "svd", "low_rank": 3}},
                          CALIB[:8])
    frozen = gm.get_submodule("4").weight.detach().clone()
    before = _rel_error(gm, model)
    fxsketch.distill(gm, model, [CALIB[i:i + 250] for i in range(0, 1500, 250)], steps=60, lr=3e-3)
    assert _rel_error(gm, model) < 0.8 * before
    assert torch.equal(gm.get_submodule("4").weight, frozen)
    with pytest.raises(ValueError, match="no fxsketch replacement"):
        fxsketch.distill(fxsketch.capture(model, CALIB[:8]), model, [CALIB], steps=1)


def test_recover_steps_need_calibration_data():
    model = _model()
    with pytest.raises(ValueError, match="recover_steps needs calibration_data"):
        fxsketch.optimize(model, fxsketch.LayerConfig("0", params="auto"), example_inputs=CALIB[:8],
                          accuracy_fn=lambda m: 1.0, n_trials=1, recover_steps=5)


def test_decompositions_survive_in_a_cache_directory(tmp_path, monkeypatch):
    model, gm, records = _setup()
    stats = calibrate(gm, [CALIB])
    plan = {"0": {"method": "whitened_svd", "low_rank": 6}, "2": {"method": "svd", "low_rank": 5}}
    first = apply_plan(gm, records, plan, FactorCache(stats, cache_dir=tmp_path))
    assert len(list(tmp_path.glob("*.pt"))) == 2
    calls = []
    original = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = apply_plan(gm, records, plan, FactorCache(stats, cache_dir=tmp_path))
    assert calls == []  # both decompositions came from disk
    with torch.no_grad():
        assert torch.equal(first(HELD_OUT), again(HELD_OUT))
    (next(tmp_path.glob("svd-*.pt"))).write_bytes(b"truncated")
    apply_plan(gm, records, plan, FactorCache(stats, cache_dir=tmp_path))  # a bad file is recomputed
    assert calls == [1]


def test_calibration_skips_layers_that_are_never_factored():
    """An even kernel with padding='same' cannot be a symmetric zero-padded conv: it stays dense, and
    calibration must not try to unfold its inputs."""
    net = nn.Sequential(nn.Conv2d(1, 2, 2, padding="same"), nn.Conv2d(2, 3, 3, padding=1))
    x = torch.randn(2, 1, 5, 5)
    stats = fxsketch.calibrate(fxsketch.capture(net, x), [x])
    assert set(stats) == {"1"}
