"""fxsketch.recover (distillation): only the factors train, masked losses ignore padding, taps expose
intermediate values, the cosine schedule, and recover_steps needs calibration data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxsketch
from fxsketch.recover import masked_mse, with_taps
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
