"""fxsketch.replacements: activation-whitened SVD, least-squares refits (the input mean moved into the bias),
data-aware sketches and the factor cache on disk, each checked against a direct computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsketch
from fxsketch.calibrate import calibrate
from fxsketch.replacements import FactorCache
from fxsketch.rewrite import apply_plan
from fxsketch.units import resolve_units
from conftest import (
    CALIB, calib_data as _data, calib_mlp as _model, calib_setup as _setup, D, HELD_OUT,
    layer_error as _layer_error, OUT, rel_error as _rel_error,
)


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



def test_refit_moves_the_input_mean_into_the_bias_and_its_error_estimate_is_exact():
    torch.manual_seed(0)
    layer = nn.Linear(D, OUT).eval()
    shifted = _data(1500, 1, shift=3.0)
    gm = fxsketch.capture(layer, shifted[:8])
    records = {r.name: r for r in fxsketch.find_layers(gm)}
    (name,) = records
    stats = calibrate(gm, [shifted])
    for rank in (2, 5):
        plan = {name: {"method": "whitened_svd", "low_rank": rank}}
        uncentered = apply_plan(gm, records, plan, FactorCache(stats, refit=False))
        centered_cache = FactorCache(stats, refit=True)
        centered = apply_plan(gm, records, plan, centered_cache)
        with torch.no_grad():
            # the replacement's mean output is the original's
            torch.testing.assert_close(centered(shifted).mean(0), layer(shifted).mean(0), atol=1e-4, rtol=1e-4)
        err = lambda m: _layer_error(m, layer, shifted)  # noqa: E731
        assert err(centered) < 0.9 * err(uncentered)
        estimate = centered_cache.output_errors(name, "whitened_svd", layer.weight, [rank], centered=True)[0]
        assert estimate == pytest.approx(err(centered), rel=1e-3, abs=1e-6)



@pytest.mark.parametrize("terms,k", [(1, 3), (2, 2)])
def test_calibrated_sketch_reaches_the_whitened_factorization_of_its_inner_rank(terms, k):
    model = _model()
    plan = {"0": {"method": "sketch", "num_terms": terms, "low_rank": k}}
    rank = 2 * terms * k
    sketch = fxsketch.rewrite(model, plan, CALIB[:8], calibration_data=[CALIB])
    whitened = fxsketch.rewrite(model, {"0": {"method": "whitened_svd", "low_rank": rank}}, CALIB[:8],
                                calibration_data=[CALIB])
    svd = fxsketch.rewrite(model, {"0": {"method": "svd", "low_rank": rank}}, CALIB[:8])
    assert sketch.get_submodule("0").rank == rank
    assert _rel_error(sketch, model, CALIB) == pytest.approx(_rel_error(whitened, model, CALIB), rel=0.02)
    assert _rel_error(sketch, model) < 0.5 * _rel_error(svd, model)
    blind = fxsketch.rewrite(model, plan, CALIB[:8])  # no data: the random sketches stay
    torch.testing.assert_close(blind.get_submodule("0").U1, fxsketch.rewrite(model, plan, CALIB[:8]).get_submodule("0").U1)
    assert not torch.allclose(blind.get_submodule("0").U1, sketch.get_submodule("0").U1)



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


@pytest.mark.parametrize("num_terms, low_rank", [(10**9, 4), (4, 10**9), (3000, 3000)])
def test_a_sketch_past_its_size_bound_is_refused_before_anything_is_built(num_terms, low_rank):
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    plan = {"0": {"method": "sketch", "num_terms": num_terms, "low_rank": low_rank}}
    with pytest.raises(ValueError, match=rf"plan entry '0': num_terms × low_rank = {num_terms} × {low_rank} makes a "
                                         r"sketch of [\d,]+ numbers for 0 \(32, 64\), more than its bound of 4,194,304"):
        fxsketch.rewrite(model, plan, torch.randn(2, 64))


def test_the_seed_apis_generous_sketch_sizes_stay_within_the_bound():
    model = nn.Sequential(nn.Conv2d(1, 16, 3)).eval()  # the seed README's conv: rank 9, low_rank up to 88
    gm = fxsketch.rewrite(model, {"0": {"method": "sketch", "num_terms": 2, "low_rank": 88}}, torch.randn(2, 1, 8, 8))
    assert gm(torch.randn(2, 1, 8, 8)).shape == (2, 16, 6, 6)


@pytest.mark.parametrize("damage", ["zeroed", "another layer's", "not finite"])
def test_a_cached_decomposition_that_is_not_this_layers_is_recomputed(tmp_path, damage, caplog):
    model, gm, records = _setup()
    stats = calibrate(gm, [CALIB])
    plan = {"0": {"method": "whitened_svd", "low_rank": 6}, "2": {"method": "svd", "low_rank": 5}}
    fresh = apply_plan(gm, records, plan, FactorCache(stats, cache_dir=tmp_path))
    files = sorted(tmp_path.glob("*.pt"))
    for path in files:
        U, S, V, *rest = torch.load(path, weights_only=True)
        if damage == "zeroed":
            U, S, V = torch.zeros_like(U), torch.zeros_like(S), torch.zeros_like(V)
        elif damage == "another layer's":
            U, S, V = torch.randn_like(U), S.flip(0), torch.randn_like(V)
        else:
            S = S.clone()
            S[0] = float("nan")
        torch.save([U, S, V, *rest], path)
    again = apply_plan(gm, records, plan, FactorCache(stats, cache_dir=tmp_path))
    with torch.no_grad():
        assert torch.allclose(fresh(HELD_OUT), again(HELD_OUT), atol=1e-5)
    assert caplog.text.count("does not hold this layer's decomposition: recomputing it") == len(files)


def test_a_searched_range_reaching_past_a_layers_bound_is_clipped_there():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    gm = fxsketch.capture(model, torch.randn(2, 64))
    records = fxsketch.find_layers(gm)
    spec = fxsketch.load_spec({"layers": [
        {"layer_names": ["0"], "params": {"method": ["svd"], "low_rank": {"type": "int", "low": 4, "high": 10**6}}},
        {"layer_names": ["2"], "params": {"method": ["sketch"], "num_terms": [1, 2, 10**9], "low_rank": [2, 4]}}]})
    units = {u.key: u for u in resolve_units(records, spec, {}, "svd")}
    assert units["0"].space["low_rank"] == fxsketch.Int(4, 32)  # the layer's rank
    assert units["2"].space["num_terms"] == fxsketch.Categorical([1, 2])  # 10**9 terms: past the size bound


def test_a_calibrated_sketch_stays_bounded_with_fewer_calibration_rows_than_inputs():
    """4 rows for a 1024-input layer: the refit's least squares is singular off the rows' span; it
    must not fit noise there (it used to give outputs 40x the dense layer's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 32),
                          nn.ReLU(), nn.Linear(32, 10)).eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    plan = {"3": {"method": "sketch", "num_terms": 1, "low_rank": 4}}
    gm = fxsketch.rewrite(model, plan, x, calibration_data=[x, x + 1])
    with torch.no_grad():
        dense, ours = model(x), gm(x)
    assert (ours - dense).abs().max() <= 0.5 * dense.abs().max()


AUTO_SHAPES = [(512, 256), (64, 1024), (1024, 64), (768, 3072), (48, 40), (512, 10), (10, 512), (31, 300)]


@pytest.mark.parametrize("method", ["svd", "whitened_svd", "sketch"])
@pytest.mark.parametrize("shape", AUTO_SHAPES)
def test_every_auto_configuration_is_at_least_the_stated_margin_cheaper_than_dense(method, shape):
    """"auto" generates only configurations 1.5× cheaper than dense, every combination of its
    values included (the seed promises that only efficient configurations are explored), and none
    for a layer too narrow to keep its function at any such rank."""
    import itertools

    from fxsketch.records import LayerRecord
    from fxsketch.replacements.base import AUTO_MIN_GAIN, AUTO_MIN_WIDTH

    inputs, outputs = shape
    record = LayerRecord("layer", "Linear", "Linear", (outputs, inputs), tokens=1)
    kind = fxsketch.get_kind(method)
    space = kind.auto_space(record)
    if min(shape) < AUTO_MIN_WIDTH:
        assert space is None
        return
    grids = {name: spec.values() for name, spec in space.items()}
    dense = fxsketch.replacements.dense_cost(record).flops_per_token
    for values in itertools.product(*grids.values()):
        params = dict(zip(grids, values))
        assert kind.cost(record, params).flops_per_token * AUTO_MIN_GAIN <= dense, params


def test_a_layer_with_no_cheap_auto_configuration_is_skipped_with_one_line(caplog):
    from torch import nn

    model = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    x = torch.randn(4, 512)
    spec = fxsketch.LayerConfig({"type": "Linear"}, params="auto")
    with caplog.at_level("WARNING"):
        result = fxsketch.optimize(model, spec, example_inputs=x, accuracy_fn=lambda m: 1.0, n_trials=2,
                                   progress=False, search=fxsketch.SearchOptions(objective="flops", seed=0))
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 1 and "2 (256->10)" in skipped[0] and "narrower than 32" in skipped[0]
    assert set(result.trials["layer"]) == {"0"}
