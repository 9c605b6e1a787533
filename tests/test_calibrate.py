"""fxsketch.calibrate: calibration statistics (exact second moments, padding rows left out of masked
batches, layers never factored skipped) and rewrites with calibration data, each checked against a direct
computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsketch
from fxsketch.calibrate import calibrate
from conftest import (
    CALIB, calib_mlp as _model, calib_setup as _setup, D, HELD_OUT, rel_error as _rel_error, Tokens,
    tokens as _tokens,
)


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



def test_rewrite_with_calibration_data_is_deterministic_and_activation_aware():
    model = _model()
    plan = {"0": {"method": "svd", "low_rank": 6}, "2": {"method": "sketch", "num_terms": 1, "low_rank": 8}}
    a = fxsketch.rewrite(model, plan, CALIB[:8], calibration_data=[CALIB[:700], CALIB[700:]])
    b = fxsketch.rewrite(model, plan, CALIB[:8], calibration_data=[CALIB[:700], CALIB[700:]])
    with torch.no_grad():
        assert torch.equal(a(HELD_OUT), b(HELD_OUT))
    blind = fxsketch.rewrite(model, plan, CALIB[:8])
    assert _rel_error(a, model) < 0.5 * _rel_error(blind, model)



def test_calibration_skips_layers_that_are_never_factored():
    """An even kernel with padding='same' cannot be a symmetric zero-padded conv: it stays dense, and
    calibration must not try to unfold its inputs."""
    net = nn.Sequential(nn.Conv2d(1, 2, 2, padding="same"), nn.Conv2d(2, 3, 3, padding=1))
    x = torch.randn(2, 1, 5, 5)
    stats = fxsketch.calibrate(fxsketch.capture(net, x), [x])
    assert set(stats) == {"1"}



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
