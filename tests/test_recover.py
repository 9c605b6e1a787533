"""fxsketch.recover (distillation): only the factors train, masked losses ignore padding, taps expose
intermediate values, the cosine schedule, and recover_steps needs calibration data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxsketch
from fxsketch.kernels import quantize_weight
from fxsketch.kernels.int8 import fbgemm_available
from fxsketch.search import api as search_api, context as search_context, recovery
from fxsketch.recover import float_factors, masked_mse, quantize_trained, relative_mse, with_taps
from conftest import CALIB, calib_mlp as _model, HELD_OUT, rel_error as _rel_error, Tokens, tokens as _tokens


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



INT8_PLAN = {"0": {"method": "svd", "low_rank": 3, "precision": "int8"}, "2": {"method": "svd", "low_rank": 3},
             "4": {"method": "int8"}}


def test_int8_factors_are_distilled_in_float_then_quantized():
    """int8 factors do not train: their float twin (`float_factors`) is distilled and its factors
    quantized back (`quantize_trained`); the student ends closer to the teacher than as fitted."""
    model = _model()
    student = fxsketch.rewrite(model, INT8_PLAN, CALIB[:8])
    twin_plan = float_factors(INT8_PLAN)
    assert twin_plan == {"0": {"method": "svd", "low_rank": 3}, "2": INT8_PLAN["2"], "4": INT8_PLAN["4"]}
    twin = fxsketch.rewrite(model, twin_plan, CALIB[:8])
    before = _rel_error(student, model)
    fxsketch.distill(twin, model, [CALIB[i:i + 250] for i in range(0, 1500, 250)], steps=60, lr=3e-3)
    quantize_trained(student, twin)
    layer, trained = student.get_submodule("0"), twin.get_submodule("0")
    for (q, scale), factor in ((quantize_weight(trained.B), "B"), (quantize_weight(trained.A), "A")):
        assert torch.equal(getattr(layer, f"{factor}_q"), q) and torch.equal(getattr(layer, f"{factor}_scale"), scale)
    torch.testing.assert_close(layer.bias, trained.bias)
    torch.testing.assert_close(student.get_submodule("2").B, twin.get_submodule("2").B)
    assert _rel_error(student, model) < 0.8 * before
    with pytest.raises(ValueError, match="factor shapes differ"):
        layer.quantize_from(fxsketch.rewrite(model, {"0": {"method": "svd", "low_rank": 2}}, CALIB[:8]).get_submodule("0"))


@pytest.mark.skipif(not fbgemm_available(), reason="int8 is offered only where FBGEMM runs it")
def test_a_search_with_recovery_handles_plans_with_nothing_to_train_and_int8_factors():
    """recover_steps with an "auto" space on the CPU: whole-layer int8 plans (nothing trains) and
    int8 factors (trained as float, then quantized) are trials like any other, not errors."""
    model = _model()
    result = fxsketch.optimize(model, fxsketch.LayerConfig(["0", "2"], params="auto"), example_inputs=CALIB[:64],
                               accuracy_fn=lambda m: 1.0 - _rel_error(m, model), accuracy_threshold=0.5,
                               n_trials=6, seed=0, calibration_data=[CALIB[:500]], recover_steps=3)
    states = {t.state.name for t in result.study.trials}
    assert states <= {"COMPLETE", "PRUNED"}, states
    methods = {e.get("method") for e in result.study.trials[0].user_attrs.get("fxsketch.plan", {}).values()}
    assert methods == {"int8"}  # the precision-only warm start, with nothing to distill, was a trial


def test_recover_steps_need_calibration_data():
    model = _model()
    with pytest.raises(ValueError, match="recover_steps needs calibration_data"):
        fxsketch.optimize(model, fxsketch.LayerConfig("0", params="auto"), example_inputs=CALIB[:8],
                          accuracy_fn=lambda m: 1.0, n_trials=1, recover_steps=5)



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


# --------------------------------------------------------------------------- recover_at="finish"

def _recovering(model, monkeypatch, threshold=0.97, **options):
    """optimize with distillation of the returned plan only; returns (result, the steps of each distillation)."""
    calls = []
    real = search_context.distill

    def counted(*args, **kw):
        calls.append(kw["steps"])
        return real(*args, **kw)

    monkeypatch.setattr(search_context, "distill", counted)
    chosen = dict(recover_steps=60, recover_lr=3e-3, recover_at="finish",
                  recover_data=[CALIB[i:i + 250] for i in range(0, 1500, 250)])
    chosen.update(options)
    result = fxsketch.optimize(model, fxsketch.LayerConfig(["0", "2"], params="auto"), example_inputs=CALIB[:64],
                               accuracy_fn=lambda m: 1.0 - _rel_error(m, model), accuracy_threshold=threshold,
                               n_trials=12, calibration_data=[CALIB[i:i + 250] for i in range(0, 1000, 250)],
                               search=fxsketch.SearchOptions(seed=0, objective="flops"),
                               calibration=fxsketch.CalibrationOptions(**chosen))
    return result, calls


def test_finish_recovery_judges_trials_at_a_lower_bar_and_distills_only_the_plan_returned(monkeypatch):
    model = _model()
    result, calls = _recovering(model, monkeypatch)
    held = result.study.user_attrs["fxsketch.recovery"]
    assert 0 < held["rate"] <= recovery.MAX_RATE and held["distilled"] > held["fitted"]
    assert calls == [60, 60]  # the probe and the plan returned, no trial
    assert result.accuracy_threshold == 0.97 and result.accuracy >= 0.97
    assert 1.0 - _rel_error(result.graph_module, model) == pytest.approx(result.accuracy, abs=1e-6)
    assert result.validation[-1]["source"] == "distilled 60 steps"
    working = recovery.working_threshold(0.97, 1.0, held["rate"])
    judged = [t.user_attrs["fxsketch.accuracy"] for t in result.study.trials
              if t.state.name == "COMPLETE" and math.isfinite(t.value)]
    assert min(judged) < 0.97 and min(judged) >= working  # feasible at the working bar, not at the real one
    assert result.validation[-2]["accuracy"] < 0.97  # as fitted, the plan needed the distillation to meet the bar


def test_finish_recovery_falls_back_to_a_plan_that_meets_the_bar_as_fitted(monkeypatch):
    """A distillation that ruins every plan (a huge learning rate) is caught by the check against
    the real bar: the plan that fell short won nothing back, so no other is distilled, and a plan
    that meets the bar as fitted is returned."""
    monkeypatch.setattr(search_api, "recovery_rate", lambda ctx, study, dense: 0.8)
    model = _model()
    result, calls = _recovering(model, monkeypatch, recover_lr=50.0)
    assert calls == [60]
    assert result.accuracy >= 0.97 and 1.0 - _rel_error(result.graph_module, model) >= 0.97
    assert sum("below 0.9700" in n for n in result.notes) == 1


def test_working_threshold_counts_on_part_of_the_measured_recovery():
    working = recovery.working_threshold
    safety = recovery.SAFETY
    assert working(0.95, 1.0, 0.5) == pytest.approx(1.0 - 0.05 / (1.0 - safety * 0.5))
    assert working(0.95, 1.0, 0.0) == 0.95  # nothing won back: the bar itself
    assert working(0.95, 0.9, 0.5) == 0.95  # a bar above the dense model is not lowered


def test_distillation_matches_the_taps_on_its_own_data():
    """recover_taps adds the named nodes' values to what the loss compares; recover_data is what it trains on."""
    seen = []

    def loss(outputs, targets, inputs):
        seen.append((len(inputs[0]), isinstance(outputs, tuple) and len(outputs[1])))
        return relative_mse(outputs, targets)

    def tanhs(gm):  # the captured Sequential calls its Tanh modules "1" and "3"
        return [n.name for n in gm.graph.nodes if n.op == "call_module" and n.target in ("1", "3")]

    model = _model()
    fxsketch.optimize(model, fxsketch.LayerConfig(["0", "2"], params="auto"), example_inputs=CALIB[:64],
                      accuracy_fn=lambda m: 1.0, accuracy_threshold=0.5, n_trials=2, calibration_data=[CALIB[:500]],
                      search=fxsketch.SearchOptions(seed=0, objective="flops"),
                      calibration=fxsketch.CalibrationOptions(recover_steps=2, recover_taps=tanhs, recover_loss_fn=loss,
                                                              recover_data=[CALIB[:37]]))
    assert seen and set(seen) == {(37, 2)}
