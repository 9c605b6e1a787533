"""Tests for fxsketch.capture: tracing a model and describing its Linear/Conv2d layers."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import fxsketch
from fxsketch.capture import CaptureError, capture, find_layers, other_modules



class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.block = nn.Sequential(nn.Linear(16, 12, bias=False), nn.GELU(), nn.Linear(12, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.block(torch.relu(self.fc1(x))))


class ShapeBranchMLP(MLP):
    """Python control flow on a shape: symbolic_trace cannot follow it, torch.export can."""

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if x.shape[0] > 1:
            h = h * 2.0
        return self.head(self.block(h))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.conv2 = nn.Conv2d(6, 4, (3, 1), dilation=(2, 1))
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        h = self.conv2(self.grouped(h))
        return self.fc(h.mean((2, 3)))


class ShapeBranchCNN(CNN):
    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        if x.shape[-1] % 2 == 0:
            h = h + 1.0
        h = self.conv2(self.grouped(h))
        return self.fc(h.mean((2, 3)))


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, stride=2, padding=1)


class Functional(nn.Module):
    """Layers as functional calls on bare parameters."""

    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.head_w = nn.Parameter(torch.randn(5, 4) * 0.5)
        self.head_b = nn.Parameter(torch.randn(5))
        self.proj = nn.Parameter(torch.randn(2, 5))

    def forward(self, x):
        h = self.inner(x).mean((2, 3))
        return F.linear(F.linear(h, self.head_w, self.head_b), self.proj)


class ShapeBranchFunctional(Functional):
    def forward(self, x):
        if x.shape[0] > 1:
            x = x.flip(0)
        return super().forward(x)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lead,tokens", [((5,), 5), ((2, 5), 10), ((1,), 1)])
def test_mlp_is_captured_by_symbolic_trace_with_exact_records(lead, tokens):
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(*lead, 8)
    gm = capture(model, x)
    assert isinstance(gm, torch.fx.GraphModule)
    assert gm.meta["fxsketch_tracer"] == "symbolic_trace"
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)

    records = find_layers(gm)
    got = [(r.name, r.op_type, r.module_type, r.weight_shape, r.tokens, r.unsupported) for r in records]
    assert got == [
        ("fc1", "Linear", "Linear", (16, 8), tokens, ""),
        ("block.0", "Linear", "Linear", (12, 16), tokens, ""),
        ("block.2", "Linear", "Linear", (6, 12), tokens, ""),
        ("head", "Linear", "Linear", (3, 6), tokens, ""),
    ]
    assert [r.graph_order for r in records] == sorted(r.graph_order for r in records)
    names = [n for n, _ in model.named_modules()]
    assert [r.module_order for r in records] == [names.index(r.name) for r in records]
    assert [r.bias_target for r in records] == ["fc1.bias", None, "block.2.bias", "head.bias"]
    assert [r.weight_target for r in records] == [f"{r.name}.weight" for r in records]
    assert (records[0].in_features, records[0].out_features) == (8, 16)
    assert other_modules(gm, records) == {"block": "Sequential", "block.1": "GELU"}


def test_capture_without_example_inputs_uses_symbolic_trace():
    gm = capture(MLP())
    assert gm.meta["fxsketch_tracer"] == "symbolic_trace"
    assert [r.name for r in find_layers(gm)] == ["fc1", "block.0", "block.2", "head"]


def test_capture_of_a_graph_module_is_a_copy():
    traced = torch.fx.symbolic_trace(MLP())
    gm = capture(traced, torch.randn(3, 8))
    assert gm is not traced
    assert gm.meta["fxsketch_tracer"] == "given"
    assert [r.tokens for r in find_layers(gm)] == [3, 3, 3, 3]
    assert gm.fc1.weight.data_ptr() != traced.fc1.weight.data_ptr()


@pytest.mark.parametrize("lead", [(4,), (3, 2)])
def test_shape_dependent_control_flow_falls_back_to_export(lead):
    torch.manual_seed(0)
    model = ShapeBranchMLP()
    x = torch.randn(*lead, 8)
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)  # the premise: symbolic_trace cannot take this model
    gm = capture(model, x)
    assert gm.meta["fxsketch_tracer"] == "export"
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    records = find_layers(gm)
    rows = lead[0] * (lead[1] if len(lead) > 1 else 1)
    assert [(r.name, r.op_type, r.module_type, r.weight_shape, r.tokens) for r in records] == [
        ("fc1", "Linear", "Linear", (16, 8), rows),
        ("block.0", "Linear", "Linear", (12, 16), rows),
        ("block.2", "Linear", "Linear", (6, 12), rows),
        ("head", "Linear", "Linear", (3, 6), rows),
    ]
    assert records[1].bias_target is None and records[0].bias_target == "fc1.bias"


@pytest.mark.parametrize("model_cls,tracer", [(CNN, "symbolic_trace"), (ShapeBranchCNN, "export")])
def test_conv_records_geometry_tokens_and_grouped_conv_is_unsupported(model_cls, tracer):
    torch.manual_seed(0)
    model = model_cls().eval()
    x = torch.randn(2, 3, 10, 8)
    gm = capture(model, x)
    assert gm.meta["fxsketch_tracer"] == tracer
    records = {r.name: r for r in find_layers(gm)}
    assert list(records) == ["conv1", "grouped", "conv2", "fc"]

    conv1 = records["conv1"]
    assert (conv1.op_type, conv1.module_type, conv1.weight_shape) == ("Conv2d", "Conv2d", (6, 3, 3, 3))
    assert conv1.conv["stride"] == (2, 2) and conv1.conv["padding"] == (1, 1) and conv1.conv["groups"] == 1
    assert conv1.tokens == 2 * 5 * 4  # N · Ho · Wo
    assert conv1.in_features == 27 and conv1.unsupported == ""

    grouped = records["grouped"]
    assert grouped.weight_shape == (6, 2, 3, 3)
    assert grouped.conv["groups"] == 3
    assert grouped.unsupported and "groups=3" in grouped.unsupported

    conv2 = records["conv2"]
    assert conv2.conv["dilation"] == (2, 1) and conv2.weight_shape == (4, 6, 3, 1)
    assert conv2.tokens == 2 * (5 - 4) * 4
    assert records["fc"].tokens == 2
    assert other_modules(gm, list(records.values())) == {"bn": "BatchNorm2d"}


@pytest.mark.parametrize("model_cls,tracer", [(Functional, "symbolic_trace"), (ShapeBranchFunctional, "export")])
def test_functional_linear_and_conv2d_are_found(model_cls, tracer):
    torch.manual_seed(0)
    model = model_cls()
    x = torch.randn(2, 3, 8, 6)
    gm = capture(model, x)
    assert gm.meta["fxsketch_tracer"] == tracer
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    records = find_layers(gm)
    assert [r.name for r in records] == ["inner", "head_w", "proj"]
    conv, head, proj = records
    assert (conv.op_type, conv.weight_shape, conv.weight_target, conv.bias_target) == (
        "Conv2d", (4, 3, 3, 3), "inner.weight", "inner.bias")
    assert conv.conv["stride"] == (2, 2) and conv.conv["padding"] == (1, 1) and conv.conv["groups"] == 1
    assert conv.tokens == 2 * 4 * 3
    assert (head.op_type, head.module_type, head.weight_shape) == ("Linear", "function", (5, 4))
    assert (head.weight_target, head.bias_target) == ("head_w", "head_b")
    assert (proj.weight_shape, proj.bias_target, proj.tokens) == ((2, 5), None, 2)
    # functional calls on bare parameters come after every module in module order
    assert head.module_order > conv.module_order and proj.module_order > conv.module_order


class SharedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


def test_weight_used_twice_is_one_record_with_both_nodes():
    gm = capture(SharedWeight(), torch.randn(3, 4))
    (rec,) = find_layers(gm)
    assert rec.name == "fc"
    assert len(rec.nodes) == 2
    assert rec.tokens == 6


@pytest.mark.parametrize("model_cls", [CNN, ShapeBranchCNN])
def test_capture_never_mutates_the_users_model(model_cls):
    torch.manual_seed(0)
    model = model_cls().train()
    with torch.no_grad():
        model(torch.randn(4, 3, 10, 8))  # non-trivial running stats
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [(n, type(m), m.training) for n, m in model.named_modules()]
    x = torch.randn(2, 3, 10, 8)
    gm = capture(model, x)
    gm(x)  # running the captured graph in train mode must not reach the model either
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert [(n, type(m), m.training) for n, m in model.named_modules()] == modules_before
    own = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert not own & {t.untyped_storage().data_ptr() for t in gm.state_dict().values()}


class Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        raise RuntimeError("this forward always fails")


class DataDependent(nn.Module):
    """Control flow on tensor values: neither tracer can follow it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_untraceable_model_raises_capture_error_naming_both_tracers():
    with pytest.raises(CaptureError) as info:
        capture(Raises(), torch.randn(2, 3))
    message = str(info.value)
    assert "torch.fx.symbolic_trace" in message and "torch.export" in message
    assert "Raises" in message and "this forward always fails" in message


def test_a_branch_on_a_tensors_value_names_the_users_line_and_points_to_the_backend():
    with pytest.raises(CaptureError) as info:
        capture(DataDependent(), torch.randn(2, 3))
    message = str(info.value)
    assert "DataDependent" in message and "test_capture.py" in message and "`if x.sum() > 0:`" in message
    assert 'backend="fxsketch"' in message and "export the model yourself" not in message


def test_capture_without_inputs_of_untraceable_model_asks_for_example_inputs():
    with pytest.raises(CaptureError, match="example_inputs"):
        capture(ShapeBranchMLP())


def test_capture_error_is_a_runtime_error():
    assert issubclass(CaptureError, RuntimeError)
    assert fxsketch.CaptureError is CaptureError


class OutOfOrder(nn.Module):
    """Module order (declaration) differs from graph order (execution)."""

    def __init__(self):
        super().__init__()
        self.late = nn.Linear(6, 2)
        self.early = nn.Linear(4, 6)
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x):
        return self.late(torch.relu(self.early(x)))


def test_select_returns_graph_order_on_a_real_model():
    model = OutOfOrder()
    assert fxsketch.select(model, ["late", "early"]) == ["early", "late"]
    assert fxsketch.select(model, {"type": "Linear"}) == ["early", "late"]
    assert fxsketch.select(model, "early") == ["early"]


def test_select_needs_example_inputs_only_for_untraceable_models():
    model = ShapeBranchMLP()
    assert fxsketch.select(model, r"block\.\d", torch.randn(2, 8)) == ["block.0", "block.2"]


@pytest.mark.parametrize("selector", ["decoder", {"type": "Conv2d"}, ["early", "nothing"]])
def test_select_raises_value_error_on_no_match(selector):
    with pytest.raises(ValueError) as info:
        fxsketch.select(OutOfOrder(), selector)
    assert str(info.value)
