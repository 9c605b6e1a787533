"""The weight-only int8 kind (`int8_weight`, `fxsketch::int8_weight_linear`): the op against a float64
reference of its dequantized weight, every input dtype, gradients, the op's registration, a rewrite
(one op per layer, the meta device), a `.pt2` round trip in a fresh process, its cost, and that no
search offers it where it has not been measured faster."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsketch
from fxsketch.capture import find_layers
from fxsketch.kernels import int8_weight_linear, quantize_weight
from fxsketch.kernels.int8 import WEIGHT_ONLY_QMAX
from fxsketch.nn import Int8WeightLinear
from fxsketch.plan import plan_cost, speed_bound
from fxsketch.replacements.precision import fast
from fxsketch.spec import load_spec
from fxsketch.units import resolve_units
from conftest import int8_loads_in_fresh_process


def _reference(x, q, scale, bias):
    """float64: x · (q · scale)ᵀ + bias."""
    w = q.double() * scale.double()[:, None]
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("bias", [True, False])
def test_op_is_the_dequantized_layer(dtype, tol, bias):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(24, 40, generator=g), torch.randn(24, generator=g)
    q, scale = quantize_weight(w, WEIGHT_ONLY_QMAX)
    assert q.abs().max() == WEIGHT_ONLY_QMAX
    x = torch.randn(3, 5, 40, generator=g).to(dtype)
    out = int8_weight_linear(x, q, scale, b.to(dtype) if bias else None)
    assert out.dtype == dtype and out.shape == (3, 5, 24)
    expected = _reference(x, q, scale, b.to(dtype) if bias else None)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    # and the dequantized layer is the float one within half a quantization step per weight
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()


def test_gradients_reach_the_input_and_the_bias_trains():
    g = torch.Generator().manual_seed(1)
    layer = Int8WeightLinear.from_float(torch.randn(6, 10, generator=g), torch.randn(6, generator=g))
    x = torch.randn(4, 10, generator=g, requires_grad=True)
    layer(x).pow(2).sum().backward()
    y = layer(x).detach()
    w = layer.weight_q.float() * layer.weight_scale[:, None]
    torch.testing.assert_close(x.grad, (2 * y) @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, (2 * y).sum(0), rtol=1e-5, atol=1e-5)
    assert not layer.weight_q.requires_grad


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    g = torch.Generator().manual_seed(2)
    q, scale = quantize_weight(torch.randn(6, 12, generator=g), WEIGHT_ONLY_QMAX)
    x = torch.randn(5, 12, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.fxsketch.int8_weight_linear.default,
                          (x, q, scale, torch.randn(6, generator=g) if bias else None))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


PLAN = {"0": {"method": "int8_weight"}, "2": {"method": "int8_weight"}}


def test_rewrite_emits_one_op_per_layer_close_to_the_model_and_builds_on_meta():
    model, x = _model(), torch.randn(8, 32)
    gm = fxsketch.rewrite(model, PLAN, x)
    targets = [str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count("int8_weight_linear") == 2, targets
    assert {t.dtype for t in gm.state_dict().values()} == {torch.int8, torch.float32}
    with torch.no_grad():
        exact, out = model(x), gm(x)
    assert (out - exact).abs().max() <= 0.02 * exact.abs().max()
    meta = fxsketch.rewrite(_model().to("meta"), PLAN, x.to("meta"))
    assert {t.device.type for t in meta.state_dict().values()} == {"meta"}
    assert meta(x.to("meta")).device.type == "meta"


def test_saved_model_loads_weights_only_in_a_fresh_process(tmp_path):
    model, x = _model(), torch.randn(8, 32)
    int8_loads_in_fresh_process(fxsketch.rewrite(model, PLAN, x), x, tmp_path, {"fxsketch.int8_weight_linear.default"})


def test_cost_counts_int8_bytes_and_float_gemms():
    model, x = _model(), torch.randn(8, 32)
    records = find_layers(fxsketch.capture(model, x))
    dense, ours = plan_cost(records, {}), plan_cost(records, PLAN)
    assert ours.flops == dense.flops
    weights = 32 * 64 + 64 + 64 * 10 + 10
    assert dense.weight_bytes == 4 * weights and ours.weight_bytes == weights
    # weight-only: the GEMMs stay float; the bound is the byte ratio of weights plus activations
    bound = speed_bound(records, PLAN)
    assert 1.0 < bound < 4.0


def test_no_search_offers_it_before_it_is_measured_faster():
    model, x = _model(), torch.randn(8, 32)
    record = find_layers(fxsketch.capture(model, x))[0]
    assert not fast(record, "int8_weight")
    cuda = type(record)(**{**record.__dict__, "device": "cuda"})
    assert not fast(cuda, "int8_weight")
    records = find_layers(fxsketch.capture(model, x))
    units = resolve_units(records, load_spec(fxsketch.LayerConfig({"type": "Linear"}, params="auto")), precision=True)
    assert units and not [u for u in units if "int8_weight" in str(u.space.get("method"))]


def test_conv_layers_are_kept_dense_with_the_reason_logged(caplog):
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).eval()
    xc = torch.randn(2, 3, 6, 6)
    with caplog.at_level("WARNING", logger="fxsketch"):
        gm = fxsketch.rewrite(conv, {"0": {"method": "int8_weight"}}, xc)
    assert "int8_weight replaces Linear layers; 0 is a Conv2d" in caplog.text
    assert not any("int8_weight" in str(n.target) for n in gm.graph.nodes)
