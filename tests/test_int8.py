"""The int8 ops and kinds: every path of `fxsketch::int8_linear` / `int8_lowrank_linear` against
the one reference, the quantization error against the float layer, gradients, export, compile,
a `.pt2` round trip in a fresh process, the meta device, and the plan entries' checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsketch
from fxsketch.kernels import int8_linear, int8_lowrank_linear, quantize_weight
from fxsketch.kernels.int8 import (
    WEIGHT_QMAX, fbgemm_available, int8_linear_fbgemm, int8_linear_reference, int8_lowrank_linear_reference,
)
from fxsketch.capture import find_layers
from fxsketch.fitted import fitted_factors, install_factors
from fxsketch.nn import Int8LowRankLinear
from fxsketch.plan import speed_bound
from conftest import int8_loads_in_fresh_process

needs_fbgemm = pytest.mark.skipif(not fbgemm_available(), reason="this torch build has no FBGEMM")
SHAPES = [((5,), 16, 8), ((2, 7), 96, 33), ((), 40, 3), ((64,), 384, 128)]


def _args(lead, K, N, seed=0, positive=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g)
    w = torch.randn(N, K, generator=g)
    if positive:  # every product of one sign: the case a saturating int16 sum gets wrong
        x, w = x.abs() * 3, w.abs()
    return x, w, torch.randn(N, generator=g)


def test_quantize_weight_is_symmetric_per_row_and_within_half_a_step():
    w = torch.randn(6, 10)
    w[2] = 0
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (6,)
    assert q.abs().max() <= WEIGHT_QMAX and scale[2] == 1 and (q[2] == 0).all()
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_reference_is_the_float_layer_within_its_quantization_error(lead, K, N, bias):
    x, w, b = _args(lead, K, N, seed=1)
    b = b if bias else None
    q, scale = quantize_weight(w)
    y = int8_linear_reference(x, q, scale, b)
    dense = torch.nn.functional.linear(x, w, b)
    x_step = (x.max().clamp(min=0) - x.min().clamp(max=0)) / 255
    # |x·w − dq(x)·dq(w)| ≤ Σ|dq(x)|·|Δw| + Σ|Δx|·|w|, each Δ at most half a step
    bound = (x.abs() + x_step / 2) @ (scale[:, None] / 2).expand(N, K).T + (x_step / 2) * w.abs().sum(1)
    assert ((y - dense).abs() <= bound + 1e-5).all()


@needs_fbgemm
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("positive", [False, True])
def test_fbgemm_path_computes_the_reference(lead, K, N, positive):
    x, w, b = _args(lead, K, N, seed=2, positive=positive)
    q, scale = quantize_weight(w)
    reference = int8_linear_reference(x.double(), q, scale.double(), b.double())
    for y in (int8_linear_fbgemm(x, q, scale, b), int8_linear(x, q, scale, b),
              torch.ops.fxsketch.int8_linear(x, q, scale, b)):
        torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-4 * reference.abs().max().item())


def test_forced_aten_kernel_takes_the_reference(monkeypatch):
    x, w, b = _args((9,), 24, 5, seed=3)
    q, scale = quantize_weight(w)
    monkeypatch.setenv("FXSKETCH_KERNEL", "aten")
    torch.testing.assert_close(int8_linear(x, q, scale, b), int8_linear_reference(x, q, scale, b))


@needs_fbgemm
def test_an_in_place_change_of_the_weight_is_seen_by_the_packed_path():
    x, w, b = _args((4,), 16, 8, seed=4)
    q, scale = quantize_weight(w)
    before = int8_linear(x, q, scale, b)
    q.neg_()
    after = int8_linear(x, q, scale, b)
    torch.testing.assert_close(after, int8_linear_reference(x, q, scale, b), rtol=1e-5, atol=1e-4)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("bias", [True, False])
def test_lowrank_op_is_two_int8_layers(bias):
    x, _, b = _args((3, 5), 32, 12, seed=5)
    (B_q, B_s), (A_q, A_s) = quantize_weight(torch.randn(6, 32)), quantize_weight(torch.randn(12, 6))
    b = b if bias else None
    reference = int8_lowrank_linear_reference(x, B_q, B_s, A_q, A_s, b)
    args = (x, B_q, B_s, A_q, A_s, b)
    for y in (int8_lowrank_linear(*args), torch.ops.fxsketch.int8_lowrank_linear(*args)):
        torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-4 * reference.abs().max().item())


def test_gradients_pass_straight_through_and_the_bias_trains():
    x, w, b = _args((2, 3), 8, 4, seed=6)
    x.requires_grad_(True)
    b.requires_grad_(True)
    q, scale = quantize_weight(w)
    int8_linear(x, q, scale, b).pow(2).sum().backward()
    y = int8_linear_reference(x.detach(), q, scale, b.detach())
    torch.testing.assert_close(x.grad, (2 * y) @ (q.float() * scale[:, None]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, (2 * y).reshape(-1, 4).sum(0), rtol=1e-5, atol=1e-5)
    (B_q, B_s), (A_q, A_s) = quantize_weight(torch.randn(3, 8)), quantize_weight(torch.randn(4, 3))
    x.grad = None
    int8_lowrank_linear(x, B_q, B_s, A_q, A_s, None).sum().backward()
    A, B = A_q.float() * A_s[:, None], B_q.float() * B_s[:, None]
    torch.testing.assert_close(x.grad, torch.ones(2, 3, 4) @ A @ B)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    x, w, b = _args((5,), 12, 6, seed=7)
    q, scale = quantize_weight(w)
    x.requires_grad_(True)
    torch.library.opcheck(torch.ops.fxsketch.int8_linear.default, (x, q, scale, b if bias else None))
    (B_q, B_s), (A_q, A_s) = quantize_weight(torch.randn(3, 12)), quantize_weight(torch.randn(6, 3))
    torch.library.opcheck(torch.ops.fxsketch.int8_lowrank_linear.default, (x, B_q, B_s, A_q, A_s, b if bias else None))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).eval()


PLAN = {"0": {"method": "int8"}, "2": {"method": "svd", "low_rank": 8, "precision": "int8"},
        "4": {"method": "whitened_svd", "low_rank": 4, "precision": "int8"}}


def _rewritten(device="cpu"):
    model = _model().to(device)
    x = torch.randn(40, 32).to(device)
    return model, fxsketch.rewrite(model, PLAN, x, calibration_data=[x]), x


def test_rewrite_emits_one_int8_op_per_layer_and_stays_close_to_the_model():
    model, gm, x = _rewritten()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fxsketch.int8_linear.default) + targets.count(int8_linear) == 1
    assert targets.count(torch.ops.fxsketch.int8_lowrank_linear.default) + targets.count(int8_lowrank_linear) == 2
    assert {t.dtype for t in gm.state_dict().values()} == {torch.int8, torch.float32}
    with torch.no_grad():
        exact = fxsketch.rewrite(model, {"0": {"method": "dense"}, "2": {"method": "svd", "low_rank": 8},
                                         "4": {"method": "whitened_svd", "low_rank": 4}}, x, calibration_data=[x])(x)
        out = gm(x)
    assert (out - exact).abs().max() <= 0.05 * exact.abs().max()
    compiled = torch.compile(gm)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), out, rtol=1e-4, atol=1e-4)


def test_rewrite_on_meta_builds_every_tensor_there():
    _, gm, x = _rewritten("meta")
    assert {t.device.type for t in gm.state_dict().values()} == {"meta"}
    assert gm(x).device.type == "meta"


def test_saved_int8_model_loads_weights_only_in_a_fresh_process(tmp_path):
    _, gm, x = _rewritten()
    int8_loads_in_fresh_process(gm, x, tmp_path, {"fxsketch.int8_linear.default", "fxsketch.int8_lowrank_linear.default"})


def test_plan_entries_are_checked():
    model, x = _model(), torch.randn(4, 32)
    with pytest.raises(ValueError, match="precision must be one of"):
        fxsketch.rewrite(model, {"0": {"method": "svd", "low_rank": 4, "precision": "int4"}}, x)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval()
    xc = torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match="int8 factors are for Linear layers"):
        fxsketch.rewrite(conv, {"0": {"method": "svd", "low_rank": 2, "precision": "int8"}}, xc)
    gm = fxsketch.rewrite(conv, {"0": {"method": "int8"}}, xc)  # kept dense, with a warning
    assert not any(n.target is torch.ops.fxsketch.int8_linear.default for n in gm.graph.nodes)


def test_the_speed_bound_counts_8_bit_operands():
    model, x = _model(), torch.randn(40, 32)
    records = find_layers(fxsketch.capture(model, x))
    whole = {"0": {"method": "int8"}, "2": {"method": "int8"}, "4": {"method": "int8"}}
    assert speed_bound(records, whole) == pytest.approx(4.0)
    half = speed_bound(records, {"2": {"method": "svd", "low_rank": 8, "precision": "int8"}})
    assert half == pytest.approx(4 * 64 * 48 / (8 * (64 + 48)))


# --------------------------------------------------------------------------- smoothing


@pytest.mark.parametrize("entry, message", [
    ({"method": "int8", "smooth": "yes"}, "smooth must be True or False, got 'yes'"),
    ({"method": "svd", "low_rank": 4, "precision": "int8", "smooth": 1}, "smooth must be True or False, got 1"),
    ({"method": "svd", "low_rank": 4, "smooth": False}, "smooth is a parameter of int8 factors; this entry's "
                                                         "precision is 'float': drop smooth"),
    ({"method": "bf16", "smooth": False}, r"\['smooth'\] are not parameters of method 'bf16'"),
])
def test_a_wrong_smooth_value_is_refused_with_what_to_do(entry, message):
    model = _model()
    with pytest.raises(ValueError, match=message):
        fxsketch.rewrite(model, {"0": entry}, torch.randn(4, 32))


@pytest.mark.parametrize("bias", [True, False])
def test_a_smoothed_layer_is_the_reference_on_the_scaled_input_on_every_path(bias):
    x, w, b = _args((3, 5), 24, 7, seed=8)
    b = b if bias else None
    s = torch.rand(24, generator=torch.Generator().manual_seed(9)) + 0.5
    q, scale = quantize_weight(w * s)
    reference = int8_linear_reference(x / s, q, scale, b)
    args = (x, q, scale, b, 1 / s)
    paths = [int8_linear(*args), torch.ops.fxsketch.int8_linear(*args), int8_linear_reference(*args)]
    if fbgemm_available():
        paths.append(int8_linear_fbgemm(*args))
    for y in paths:
        torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-4 * reference.abs().max().item())
    (B_q, B_s), (A_q, A_s) = quantize_weight(torch.randn(6, 24) * s), quantize_weight(torch.randn(7, 6))
    low = int8_lowrank_linear_reference(x / s, B_q, B_s, A_q, A_s, b)
    for y in (int8_lowrank_linear(x, B_q, B_s, A_q, A_s, b, 1 / s),
              torch.ops.fxsketch.int8_lowrank_linear(x, B_q, B_s, A_q, A_s, b, 1 / s)):
        torch.testing.assert_close(y, low, rtol=1e-5, atol=1e-4 * low.abs().max().item())
    x.requires_grad_(True)
    torch.library.opcheck(torch.ops.fxsketch.int8_linear.default, args)
    torch.library.opcheck(torch.ops.fxsketch.int8_lowrank_linear.default, (x, B_q, B_s, A_q, A_s, b, 1 / s))
    int8_linear(x, q, scale, b, 1 / s).sum().backward()  # the gradient goes through the input's scale
    torch.testing.assert_close(x.grad, (torch.ones(3, 5, 7) @ (q.float() * scale[:, None])) / s)


def test_smoothing_takes_an_outlier_feature_out_of_the_activation_scale_and_round_trips(tmp_path):
    """One input feature 1000x the others (its weights zero): unsmoothed, the per-tensor scale leaves
    the other features no resolution; smoothed on the calibration statistics, they keep it."""
    model = _model()
    with torch.no_grad():
        model[0].weight[:, 0] = 0
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(10))
    x[:, 0] *= 1000

    def error(m):
        with torch.no_grad():
            ref = model(x)
            return float((m(x) - ref).square().sum() / ref.square().sum())

    for entry in ({"method": "int8"}, {"method": "svd", "low_rank": 32, "precision": "int8"}):  # full rank: exact
        smoothed = fxsketch.rewrite(model, {"0": entry}, x, calibration_data=[x])
        plain = fxsketch.rewrite(model, {"0": entry}, x, calibration_data=[x], smooth=False)
        assert smoothed.get_buffer("0.input_scale").shape == (32,) and plain.get_submodule("0").input_scale is None
        assert error(plain) > 0.1 and error(smoothed) < 0.01, (entry, error(plain), error(smoothed))
        # an entry's own "smooth": False is the plain layer, whatever the call's default
        entry_plain = fxsketch.rewrite(model, {"0": {**entry, "smooth": False}}, x, calibration_data=[x])
        assert entry_plain.get_submodule("0").input_scale is None and error(entry_plain) == error(plain)
        entry_smoothed = fxsketch.rewrite(model, {"0": {**entry, "smooth": True}}, x, calibration_data=[x])
        assert error(entry_smoothed) == error(smoothed)
    int8_loads_in_fresh_process(smoothed, x[:8], tmp_path, {"fxsketch.int8_lowrank_linear.default"})
    # stored tensors rebuild it without calibration data (a saved plan's fitted factors)
    layer = smoothed.get_submodule("0")
    fresh = Int8LowRankLinear(32, 64, 32)
    install_factors(fresh, fitted_factors(smoothed)["0"], "0")
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
