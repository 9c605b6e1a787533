"""Static int8 inputs and the fused int8 MLP: every path of `fxsketch::int8_static_linear` and
`fxsketch::int8_mlp` (FBGEMM, oneDNN, the dispatcher, the forced reference) against the one
reference, their straight-through gradients, the calibrated range, the rewrite's fusion, export in
a fresh process, the meta device, and the plan entries' checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import fxsketch
from fxsketch.calibrate import calibrate
from fxsketch.capture import find_layers
from fxsketch.fitted import REFERENCE, fitted_factors, save_factors
from fxsketch.fuse import mlp_pairs
from fxsketch.kernels import int8_linear, int8_mlp, int8_static_linear, quantize_weight
from fxsketch.kernels import int8 as kernels
from fxsketch.kernels.int8 import (
    ACTIVATIONS, fbgemm_available, int8_linear_onednn, int8_linear_reference, int8_mlp_cpu, int8_mlp_reference,
    int8_static_linear_fbgemm, onednn_available, static_qparams,
)
from fxsketch.measure import LayerTimer
from fxsketch.replacements import FactorCache
from conftest import int8_loads_in_fresh_process

needs_cpu_kernels = pytest.mark.skipif(not (fbgemm_available() and onednn_available()),
                                       reason="this torch build lacks FBGEMM or oneDNN's int8 linear")
SHAPES = [((5,), 16, 8), ((2, 7), 96, 33), ((), 40, 3), ((64,), 384, 128)]


def _tensors(lead, K, N, seed=0):
    """x, a first layer (K -> N) and a second (N -> K), each (int8 weight, scale, bias)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g)
    first = (*quantize_weight(torch.randn(N, K, generator=g) / K**0.5), torch.randn(N, generator=g))
    second = (*quantize_weight(torch.randn(K, N, generator=g) / N**0.5), torch.randn(K, generator=g))
    return x, first, second


def _clipping_qparams(h: torch.Tensor) -> torch.Tensor:
    """A static range that cuts off the top fifth of h's values: the paths must clip alike."""
    low, high = float(h.min()), float(h.max())
    return static_qparams(low, low + 0.8 * (high - low))


def _close(y: torch.Tensor, reference: torch.Tensor) -> None:
    torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-4 * reference.abs().max().item())


def test_static_qparams_follow_the_dynamic_rule_and_the_reference_clips():
    x = torch.tensor([-0.5, 0.25, 3.0])
    scale, zero = kernels.activation_qparams(x)
    assert torch.equal(static_qparams(-0.5, 3.0), torch.stack([scale.float(), zero.float()]))
    q, s = quantize_weight(torch.eye(3))
    qparams = static_qparams(-0.5, 1.0)
    y = int8_linear_reference(x[None], q, s, None, None, qparams)
    assert abs(y[0, 2].item() - 1.0) < 0.01  # 3.0 was clipped to the range's top
    assert torch.allclose(y[0, :2], x[:2], atol=0.01)


@needs_cpu_kernels
@pytest.mark.parametrize("lead,K,N", SHAPES)
def test_every_static_path_computes_the_reference(lead, K, N, monkeypatch):
    x, (q, s, b), _ = _tensors(lead, K, N, seed=1)
    qparams = _clipping_qparams(x)
    reference = int8_linear_reference(x.double(), q, s.double(), b.double(), None, qparams.double())
    paths = [int8_static_linear_fbgemm(x, q, s, b, None, qparams), int8_linear_onednn(x, q, s, b, None, qparams),
             int8_static_linear(x, q, s, b, None, qparams),
             torch.ops.fxsketch.int8_static_linear(x, q, s, b, None, qparams)]
    monkeypatch.setattr(kernels, "ONEDNN_MIN_MACS", 0)  # the op's oneDNN branch at this size
    paths.append(int8_static_linear(x, q, s, b, None, qparams))
    for y in paths:
        _close(y, reference)


@needs_cpu_kernels
@pytest.mark.parametrize("lead,K,N", SHAPES)
def test_the_onednn_dynamic_path_computes_the_reference(lead, K, N, monkeypatch):
    x, (q, s, b), _ = _tensors(lead, K, N, seed=2)
    reference = int8_linear_reference(x.double(), q, s.double(), b.double())
    monkeypatch.setattr(kernels, "ONEDNN_MIN_MACS", 0)
    for y in (int8_linear_onednn(x, q, s, b), int8_linear(x, q, s, b)):
        _close(y, reference)


@needs_cpu_kernels
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_mlp_path_computes_the_reference(lead, K, N, activation, monkeypatch):
    x, (q1, s1, b1), (q2, s2, b2) = _tensors(lead, K, N, seed=3)
    smooth = torch.rand(K, generator=torch.Generator().manual_seed(4)) + 0.5
    h = ACTIVATIONS[activation][0](int8_linear_reference(x, q1, s1, b1, smooth))
    args = (x, q1, s1, b1, smooth, activation, q2, s2, b2, _clipping_qparams(h))
    reference = int8_mlp_reference(*(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                     for a in args))
    paths = [int8_mlp_cpu(*args), int8_mlp(*args), torch.ops.fxsketch.int8_mlp(*args)]
    monkeypatch.setattr(kernels, "ONEDNN_MIN_MACS", 0)  # the fused oneDNN kernel at this size
    paths += [int8_mlp_cpu(*args), int8_mlp(*args)]
    for y in paths:
        _close(y, reference)


def test_the_forced_reference_and_a_wrong_activation(monkeypatch):
    x, (q1, s1, b1), (q2, s2, b2) = _tensors((6,), 12, 20, seed=5)
    args = (x, q1, s1, b1, None, "gelu", q2, s2, b2, static_qparams(-0.2, 2.0))
    monkeypatch.setenv("FXSKETCH_KERNEL", "aten")
    torch.testing.assert_close(int8_mlp(*args), int8_mlp_reference(*args))
    with pytest.raises(ValueError, match="activation 'silu' is not one of"):
        int8_mlp(*args[:5], "silu", *args[6:])


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_gradients_pass_straight_through_both_quantizations(activation):
    x, (q1, s1, b1), (q2, s2, b2) = _tensors((3, 4), 10, 14, seed=6)
    smooth = torch.rand(10, generator=torch.Generator().manual_seed(7)) + 0.5
    qparams = static_qparams(-1.0, 3.0)
    leaves = [t.clone().requires_grad_(True) for t in (x, b1, b2)]
    int8_mlp(leaves[0], q1, s1, leaves[1], smooth, activation, q2, s2, leaves[2], qparams).pow(2).sum().backward()
    # the same values, with each quantized layer differentiated as its float layer
    w1, w2 = q1.float() * s1[:, None], q2.float() * s2[:, None]
    ref = [t.clone().requires_grad_(True) for t in (x, b1, b2)]
    float_h = (ref[0] * smooth) @ w1.T + ref[1]
    h = float_h + (int8_linear_reference(x, q1, s1, b1, smooth) - float_h).detach()
    a = ACTIVATIONS[activation][0](h)
    float_y = a @ w2.T + ref[2]
    y = float_y + (int8_mlp_reference(x, q1, s1, b1, smooth, activation, q2, s2, b2, qparams) - float_y).detach()
    y.pow(2).sum().backward()
    for got, want in zip(leaves, ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


def test_opcheck():
    x, (q1, s1, b1), (q2, s2, b2) = _tensors((5,), 12, 6, seed=8)
    x.requires_grad_(True)
    qparams = static_qparams(-1.0, 2.0)
    torch.library.opcheck(torch.ops.fxsketch.int8_static_linear.default, (x, q1, s1, b1, None, qparams))
    torch.library.opcheck(torch.ops.fxsketch.int8_mlp.default, (x, q1, s1, b1, None, "gelu", q2, s2, b2, qparams))


def _model(activation: nn.Module = nn.GELU()):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), activation, nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).eval()


PLAN = {"0": {"method": "int8"}, "2": {"method": "int8", "static": True, "smooth": False}, "4": {"method": "int8"}}


def _rewritten(model: nn.Module | None = None):
    """(model, x, the model rewritten with `PLAN`, calibrated on x)."""
    model = _model() if model is None else model
    x = torch.randn(40, 32)
    return model, x, fxsketch.rewrite(model, PLAN, x, calibration_data=[x])


def _saved(gm, tmp_path):
    """`PLAN` saved as JSON with `gm`'s fitted factors beside it; the JSON's path."""
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"plan": PLAN, REFERENCE: save_factors(path, fitted_factors(gm))}))
    return path


def _targets(gm):
    return [str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes if n.op == "call_function"]


def test_the_calibrated_range_is_the_layers_input_range():
    model = _model()
    x = torch.randn(40, 32)
    gm = fxsketch.capture(model, x)
    records = find_layers(gm)
    cache = FactorCache(calibrate(gm, [x[:20], x[20:]], records))
    h = model[1](model[0](x))
    assert cache.input_range("2") == pytest.approx((float(h.min()), float(h.max())), rel=1e-6)
    scale = torch.rand(64) + 0.5
    assert cache.input_range("2", scale) == pytest.approx((float((h * scale).min()), float((h * scale).max())),
                                                          rel=1e-6)
    assert mlp_pairs(records) == {"2": "0", "4": "2"}
    assert FactorCache(None).input_range("2") is None


@needs_cpu_kernels
@pytest.mark.parametrize("activation,name", [(nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
                                             (nn.ReLU(), "relu")])
def test_the_rewrite_fuses_an_int8_layer_its_activation_and_a_static_int8_layer(activation, name):
    model, x, gm = _rewritten(_model(activation))
    assert _targets(gm).count("int8_mlp") == 1 and "int8_static_linear" not in _targets(gm)
    call = next(n for n in gm.graph.nodes if n.op == "call_function" and "int8_mlp" in str(n.target))
    assert call.args[5] == name
    first, second, last = gm.get_submodule("0"), gm.get_submodule("2"), gm.get_submodule("4")
    with torch.no_grad():
        h = int8_mlp_reference(x, first.weight_q, first.weight_scale, first.bias, first.input_scale, name,
                               second.weight_q, second.weight_scale, second.bias, second.input_qparams)
        expected = int8_linear_reference(torch.relu(h), last.weight_q, last.weight_scale, last.bias, last.input_scale)
        out = gm(x)
        _close(out, expected.double())
        dense = model(x)
    assert (out - dense).abs().max() <= 0.05 * dense.abs().max()
    compiled = torch.compile(gm)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), out, rtol=1e-4, atol=1e-4)


def test_pairs_that_cannot_fuse_run_apart():
    model = _model()
    x = torch.randn(40, 32)
    smoothed = {**PLAN, "2": {"method": "int8", "static": True}}  # smoothing multiplies before the quantization
    dense_first = {"2": {"method": "int8", "static": True, "smooth": False}}
    for plan in (smoothed, dense_first):
        gm = fxsketch.rewrite(model, plan, x, calibration_data=[x])
        assert "int8_mlp" not in _targets(gm) and _targets(gm).count("int8_static_linear") == 1


@needs_cpu_kernels
def test_a_fused_model_loads_weights_only_in_a_fresh_process(tmp_path):
    _, x, gm = _rewritten()
    int8_loads_in_fresh_process(gm, x, tmp_path, {"fxsketch.int8_mlp.default", "fxsketch.int8_linear.default"})


def test_rewrite_on_meta_builds_every_tensor_there():
    model = _model().to("meta")
    x = torch.randn(40, 32, device="meta")
    gm = fxsketch.rewrite(model, PLAN, x, calibration_data=[x])
    assert {t.device.type for t in gm.state_dict().values()} == {"meta"}
    assert "int8_mlp" in _targets(gm) and gm(x).device.type == "meta"


def test_a_saved_plan_rebuilds_the_static_range_without_calibration_data(tmp_path):
    model, x, gm = _rewritten()
    again = fxsketch.rewrite(model, _saved(gm, tmp_path), x)
    assert torch.equal(again.get_submodule("2").input_qparams, gm.get_submodule("2").input_qparams)
    with torch.no_grad():
        torch.testing.assert_close(again(x), gm(x))


@pytest.mark.parametrize("entry,error,message", [
    ({"method": "int8", "static": "yes"}, ValueError, "static must be True or False"),
    ({"method": "int8", "static": True}, ValueError, "pass calibration_data="),
])
def test_static_entries_are_checked(entry, error, message):
    model, x = _model(), torch.randn(4, 32)
    with pytest.raises(error, match=message):
        fxsketch.rewrite(model, {"2": entry}, x)


def test_the_compile_backend_fuses_the_pair_as_the_rewrite_does(tmp_path):
    model, x, gm = _rewritten()
    path = _saved(gm, tmp_path)
    graphs = []

    def inner(graph, example_inputs):
        graphs.append([str(n.target) for n in graph.graph.nodes if n.op == "call_function"])
        return graph.forward

    with torch.no_grad():
        out = torch.compile(model, backend=fxsketch.backend(plan=path, inner=inner))(x)
        torch.testing.assert_close(out, gm(x))
    assert graphs and "fxsketch.int8_mlp.default" in graphs[0]


@needs_cpu_kernels
def test_the_layer_timer_adds_what_fused_pairs_save_once_per_geometry(monkeypatch):
    model = _model()
    x = torch.randn(40, 32)
    gm = fxsketch.capture(model, x)
    records = {r.name: r for r in find_layers(gm)}
    timer = LayerTimer(gm, records, (x,), FactorCache(calibrate(gm, [x], list(records.values()))))
    timings = []
    monkeypatch.setattr(LayerTimer, "_time_fusion", lambda self, *args: timings.append(args) or 2e-4)
    apart = {**PLAN, "2": {"method": "int8", "static": True}}  # smoothed: not fused
    assert timer.fusion_saving(apart) == 0.0 and timer.fusion_saving({"0": {"method": "int8"}}) == 0.0
    assert timer.fusion_saving(PLAN) == 2e-4 and timer.fusion_saving(dict(PLAN)) == 2e-4
    assert len(timings) == 1 and timings[0][4] == "gelu"  # (first, second, a, b, activation, shape)
    timer.cache.smooth = False  # nothing is smoothed: a static layer without "smooth": false fuses too
    assert timer.fusion_saving(apart) == 2e-4 and len(timings) == 2


@needs_cpu_kernels
def test_a_real_fusion_timing_is_a_finite_saving():
    model = _model()
    x = torch.randn(40, 32)
    gm = fxsketch.capture(model, x)
    records = {r.name: r for r in find_layers(gm)}
    timer = LayerTimer(gm, records, (x,), FactorCache(calibrate(gm, [x], list(records.values()))), layer_cap_s=0.05)
    saving = timer.fusion_saving(PLAN)
    assert math.isfinite(saving) and timer.timed == 1  # what it saves is the benchmark's to say, not a test's
