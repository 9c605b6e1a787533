"""Padding-aware calibration, error-compensating (sequential) calibration, mean-corrected biases,
data-aware sketches, sensitivity-weighted allocation and distillation losses, each checked against a
direct computation on small models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxsketch
from fxsketch.allocate import unit_weights
from fxsketch.calibrate import calibrate
from fxsketch.sequential import sequential_stats
from fxsketch.recover import masked_mse, rewrite_sequential, with_taps
from fxsketch.replacements import FactorCache
from fxsketch.rewrite import apply_plan

D, OUT = 48, 40


def _data(n, seed, shift=0.0):
    """Inputs on a 10-dimensional subspace plus a little noise (and an optional mean): anisotropic."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(10, D, generator=torch.Generator().manual_seed(99))
    return torch.randn(n, 10, generator=g) @ mix + 0.05 * torch.randn(n, D, generator=g) + shift


CALIB, HELD_OUT = _data(1500, 1), _data(500, 2)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, OUT), nn.Tanh(), nn.Linear(OUT, OUT), nn.Tanh(), nn.Linear(OUT, 6)).eval()


def _rel_error(module, model, x=HELD_OUT):
    with torch.no_grad():
        ref = model(x)
        return float((module(x) - ref).square().sum() / ref.square().sum())


class Tokens(nn.Module):
    """A token model with an `attention_mask` input, like HF encoders: (N, L, D) → (N, L, 6)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(D, OUT), nn.Linear(OUT, 6)

    def forward(self, x, attention_mask):
        return self.fc2(torch.tanh(self.fc1(x))) * attention_mask.unsqueeze(-1)


def _tokens():
    x = _data(2 * 7, 3).reshape(2, 7, D)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0]])
    return x, mask


def test_calibration_leaves_out_padding_rows_of_masked_batches():
    model, (x, mask) = Tokens(), _tokens()
    gm = fxsketch.capture(model, (x, mask))
    real = x[mask.bool()].double()
    auto = calibrate(gm, [(x, mask)])
    assert auto["fc1"].count == 8
    torch.testing.assert_close(auto["fc1"].gram, real.T @ real)
    torch.testing.assert_close(auto["fc1"].mean, real.mean(0))
    hidden = torch.tanh(model.fc1(x))[mask.bool()].double()
    torch.testing.assert_close(auto["fc2"].second_moment, hidden.T @ hidden / 8)
    every = calibrate(gm, [(x, mask)], mask=None)
    assert every["fc1"].count == 14
    torch.testing.assert_close(every["fc1"].gram, x.reshape(-1, D).double().T @ x.reshape(-1, D).double())
    first_only = calibrate(gm, [(x, mask)], mask=lambda inputs: (torch.arange(7) < 1).expand(2, 7))
    assert first_only["fc1"].count == 2
    with pytest.raises(ValueError, match="mask must be"):
        calibrate(gm, [(x, mask)], mask="padding")


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


def _layer_error(m, layer, x):
    with torch.no_grad():
        return float((m(x) - layer(x)).square().sum() / (layer(x) - layer.bias).square().sum())


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
    from fxsketch.units import resolve_units
    from fxsketch.spec import load_spec

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


def test_masked_distillation_ignores_padding_and_loss_fn_is_checked():
    x, mask = _tokens()
    teacher = Tokens()
    student = fxsketch.rewrite(teacher, {"fc1": {"method": "svd", "low_rank": 2}}, (x, mask))
    with torch.no_grad():
        out, ref = student(x, mask), teacher(x, mask)
    noisy = out.clone()
    noisy[~mask.bool()] += 100.0  # padding positions: masked_mse must not see them
    loss = masked_mse()
    assert float(loss(noisy, ref, (x, mask))) == pytest.approx(float(loss(out, ref, (x, mask))))
    seen = []

    def spy(o, t, inputs):
        seen.append(len(inputs))
        return loss(o, t, inputs)

    final = fxsketch.distill(student, teacher, [(x, mask)], steps=3, lr=1e-3, loss_fn=spy)
    assert seen == [2, 2, 2] and final >= 0
    with pytest.raises(TypeError, match="scalar tensor"):
        fxsketch.distill(student, teacher, [(x, mask)], steps=1, loss_fn=lambda o, t, i: 0.5)


def test_taps_expose_intermediate_values_that_distillation_trains():
    model = _model()
    gm = fxsketch.capture(model, (CALIB[:4],))
    student = fxsketch.rewrite(model, {"0": {"method": "svd", "low_rank": 2}}, (CALIB[:4],))
    tanh = [n.name for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Tanh)]
    assert len(tanh) == 2 and all(t in {n.name for n in student.graph.nodes} for t in tanh)
    x = HELD_OUT[:8]
    out, (h1, h2) = with_taps(gm, tanh)(x)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))
        torch.testing.assert_close(h1, torch.tanh(model[0](x)))
        torch.testing.assert_close(h2, torch.tanh(model[2](h1)))
    with pytest.raises(KeyError, match="no node"):
        with_taps(gm, ["not_a_node"])

    def first_tap_loss(o, t, inputs):  # only the first block's output: trains the replaced layer 0
        return (o[1][0] - t[1][0]).square().mean()

    before = _rel_error(student, model)
    weights = [p.detach().clone() for p in fxsketch.recover.factor_parameters(student)]
    fxsketch.distill(with_taps(student, tanh), with_taps(gm, tanh), [(CALIB[:256],)], steps=30, lr=3e-3,
                     loss_fn=first_tap_loss, schedule="cosine")
    after = [p.detach() for p in fxsketch.recover.factor_parameters(student)]
    assert any(not torch.equal(a, b) for a, b in zip(weights, after))  # the view shares the student's factors
    assert _rel_error(student, model) < before
    with pytest.raises(ValueError, match="schedule"):
        fxsketch.distill(student, gm, [(CALIB[:8],)], steps=1, schedule="linear")


def test_cosine_schedule_anneals_the_learning_rate_to_zero(monkeypatch):
    lrs = []
    step = torch.optim.Adam.step

    def spy(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    model = _model()
    student = fxsketch.rewrite(model, {"2": {"method": "svd", "low_rank": 4}}, (CALIB[:4],))
    fxsketch.distill(student, model, [(CALIB[:64],)], steps=4, lr=1e-2, schedule="cosine")
    assert lrs == pytest.approx([1e-2 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)])
    lrs.clear()
    fxsketch.distill(student, model, [(CALIB[:64],)], steps=3, lr=1e-2)
    assert lrs == pytest.approx([1e-2] * 3)
