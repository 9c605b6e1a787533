"""Attention in 16-bit floats (`bf16`/`fp16` on an attention call, `fxsketch::half_attention`): the
op against float64 attention on every path (spelled out, fused, masks, causal, rows that see no
key), which calls are found and which refused, a rewrite (the call changed in place, meta device,
the model untouched), a `.pt2` round trip in a fresh process, `torch.compile`, and the search, which
computes attention in bf16 where the device runs it natively and that is free against the bar."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsketch
from fxsketch.capture import find_attention
from fxsketch.kernels import half_attention
from fxsketch.kernels.aten import SPELLED_OUT_MIN, SPELLED_OUT_SCORES
from fxsketch.replacements import precision
from conftest import loaded_in_fresh_process


class SelfAttention(nn.Module):
    """Self-attention on (batch, tokens, width) with a padding mask (and a causal second pass)."""

    def __init__(self, width: int, heads: int, dropout: float, twice: bool) -> None:
        super().__init__()
        self.heads, self.dropout, self.twice = heads, dropout, twice
        self.qkv = nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        keep = x.abs().sum(-1) > 0  # padding: rows of zeros
        q, k, v = (y.view(b, t, self.heads, -1).transpose(1, 2) for y in self.qkv(x).chunk(3, -1))
        mask = keep[:, None, None, :].expand(b, 1, t, t)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout)
        if self.twice:
            out = F.scaled_dot_product_attention(out, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(b, t, w)


class Attention(nn.Module):
    """One self-attention block, pooled, classified."""

    def __init__(self, width: int = 16, heads: int = 2, dropout: float = 0.0, twice: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = SelfAttention(width, heads, dropout, twice)
        self.head = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x).mean(1))


X = torch.randn(8, 6, 16, generator=torch.Generator().manual_seed(1))
X[:, 4:] = 0.0  # two padding positions
PLAN = {"attn.sdpa": {"method": "bf16"}}


def _reference(q, k, v, mask=None, is_causal=False, scale=None):
    """Attention in float64 on the inputs rounded to bf16, rows that see no key zero."""
    q, k, v = (t.to(torch.bfloat16).double() for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    keep = torch.ones(scores.shape[-2:], dtype=torch.bool).tril() if is_causal else torch.ones(scores.shape[-2:], dtype=torch.bool)
    if mask is not None and mask.dtype == torch.bool:
        keep = keep & mask
    elif mask is not None:
        scores = scores + mask.double()
        keep = keep & (mask > float("-inf"))
    scores = scores.masked_fill(~keep, float("-inf"))
    out = torch.softmax(scores, -1).nan_to_num(0.0) @ v
    return out.masked_fill(~keep.any(-1, keepdim=True), 0.0)


def _inputs(batch, heads, rows, cols, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, rows, heads, size, generator=g).transpose(1, 2)  # heads as a transposed view
    k, v = (torch.randn(batch, heads, cols, size, generator=g) for _ in range(2))
    return q, k, v


SHORT = (2, 3, 7, 9, 8)  # few scores in all: the fused kernel
MANY = (64, 4, 32, int(math.ceil(SPELLED_OUT_MIN / (64 * 4 * 32))), 8)  # spelled out
LONG = (1, 1, 260, int(math.ceil(SPELLED_OUT_SCORES / 260)) + 1, 8)  # too many scores per head: fused


@pytest.mark.parametrize("shape", [SHORT, MANY, LONG], ids=["small", "spelled-out", "long"])
@pytest.mark.parametrize("mask", ["none", "bool", "float", "causal", "blocked-rows", "scale"])
def test_op_is_attention_on_bf16_inputs(shape, mask):
    q, k, v = _inputs(*shape)
    g = torch.Generator().manual_seed(3)
    kwargs: dict = {}
    if mask in ("bool", "blocked-rows", "scale"):
        kwargs["attn_mask"] = torch.rand(shape[0], 1, shape[2], shape[3], generator=g) > 0.3
        if mask == "blocked-rows":
            kwargs["attn_mask"][0, :, 1] = False  # a query that may attend to nothing
        if mask == "scale":
            kwargs["scale"] = 0.3
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(shape[0], shape[1], shape[2], shape[3], generator=g)
        kwargs["attn_mask"][0, 0, 2] = float("-inf")
    elif mask == "causal":
        kwargs["is_causal"] = True
    out = half_attention(q, k, v, **kwargs)
    assert out.dtype == torch.float32 and out.shape == q.shape
    expected = _reference(q, k, v, kwargs.get("attn_mask"), kwargs.get("is_causal", False), kwargs.get("scale"))
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=0.03 * expected.abs().max().item())
    # and as close to float32 attention as bf16 attention is
    exact = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert (out - exact).norm() <= 0.02 * exact.norm()
    if mask == "blocked-rows":
        assert (out[0, :, 1] == 0).all() and torch.isfinite(out).all()


def test_each_size_takes_its_path(monkeypatch):
    fused, calls = F.scaled_dot_product_attention, []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(a[0].shape) or fused(*a, **k))
    for shape in (MANY, SHORT, LONG):
        half_attention(*_inputs(*shape))
    assert [tuple(s) for s in calls] == [SHORT[:2] + SHORT[2:3] + SHORT[4:], LONG[:2] + LONG[2:3] + LONG[4:]]


def test_op_in_fp16_on_meta_and_with_gradients():
    q, k, v = _inputs(*SHORT)
    out = half_attention(q, k, v, dtype=torch.float16)
    torch.testing.assert_close(out.double(), F.scaled_dot_product_attention(q, k, v).double(), rtol=0, atol=5e-3)
    meta = half_attention(*(t.to("meta") for t in (q, k, v)), attn_mask=torch.ones(7, 9, dtype=torch.bool, device="meta"))
    assert meta.device.type == "meta" and meta.shape == q.shape and meta.dtype == torch.float32
    q.requires_grad_(True)
    half_attention(q, k, v).sum().backward()
    exact = q.detach().clone().requires_grad_(True)
    F.scaled_dot_product_attention(exact, k, v).sum().backward()
    assert (q.grad - exact.grad).norm() <= 0.03 * exact.grad.norm()


def test_opcheck():
    q, k, v = _inputs(*SHORT)
    # traced, the decompositions round differently in bf16 (softmax upcasts): a bf16 tolerance
    torch.library.opcheck(torch.ops.fxsketch.half_attention.default, (q, k, v, None, 0.0, True),
                          {"scale": None, "dtype": torch.bfloat16}, atol=2e-2, rtol=2e-2)


def test_calls_are_found_named_after_their_module_and_dropout_refused():
    gm = fxsketch.capture(Attention(twice=True), X)
    found = {r.name: r for r in find_attention(gm)}
    assert list(found) == ["attn.sdpa", "attn.sdpa_1"]
    record = found["attn.sdpa"]
    assert record.op_type == "Attention" and record.weight_shape == (6, 8) and record.tokens == 8 * 2 * 6
    assert not record.unsupported and record.dtype == torch.float32
    dropped = find_attention(fxsketch.capture(Attention(dropout=0.1), X))
    assert [r.unsupported for r in dropped] == ["it applies dropout"]


def _half_calls(gm: torch.fx.GraphModule) -> int:
    return sum(n.target in (half_attention, torch.ops.fxsketch.half_attention.default) for n in gm.graph.nodes)


def test_rewrite_computes_attention_in_bf16_on_any_device_and_leaves_the_model_alone():
    model = Attention().eval()
    before = copy.deepcopy(model.state_dict())
    gm = fxsketch.rewrite(model, PLAN, X)
    assert _half_calls(gm) == 1
    with torch.no_grad():
        exact, out = model(X), gm(X)
    assert (out - exact).abs().max() <= 0.02 * exact.abs().max() and not torch.equal(out, exact)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    meta = fxsketch.rewrite(Attention().to("meta"), PLAN, X.to("meta"))
    assert _half_calls(meta) == 1 and meta(X.to("meta")).device.type == "meta"
    both = fxsketch.rewrite(model, {**PLAN, "attn.qkv": {"method": "svd", "low_rank": 8}}, X)
    assert _half_calls(both) == 1 and isinstance(both.get_submodule("attn.qkv"), fxsketch.LowRankLinear)
    assert "attn.qkv" in [n.target for n in both.graph.nodes if n.op == "call_module"]


def test_other_kinds_keep_attention_as_it_is_with_the_reason_and_unknown_names_are_refused(caplog):
    with caplog.at_level(logging.WARNING, logger="fxsketch"):
        gm = fxsketch.rewrite(Attention(), {"attn.sdpa": {"method": "int8"}}, X)
    assert "int8 does not apply to attention calls (attn.sdpa); they take bf16 or fp16" in caplog.text
    assert _half_calls(gm) == 0
    with pytest.raises(ValueError, match="closest: attn.sdpa"):
        fxsketch.rewrite(Attention(), {"attn.spda": {"method": "bf16"}}, X)


def test_saved_model_loads_in_a_fresh_process_and_compiles(tmp_path):
    gm = fxsketch.rewrite(Attention().eval(), PLAN, X)
    path = tmp_path / "attention.pt2"
    program = fxsketch.save(gm, path, X)
    assert "fxsketch.half_attention.default" in {str(n.target) for n in program.graph.nodes}
    other = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(2))
    other[:, 5:] = 0.0
    with torch.no_grad():
        expected = gm(other)
        loaded_in_fresh_process(path, other, expected, tmp_path)
        torch.testing.assert_close(torch.compile(gm)(other), expected, rtol=2e-2, atol=2e-2)


def test_compile_backend_computes_planned_attention_in_bf16():
    model = Attention().eval()
    seen = []

    def inner(gm, example_inputs):
        seen.append(_half_calls(gm))
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=fxsketch.backend(PLAN, inner=inner))
    with torch.no_grad():
        out = compiled(X)
        torch.testing.assert_close(out, fxsketch.rewrite(model, PLAN, X)(X), rtol=1e-5, atol=1e-5)
    assert seen == [1]


def _optimize(model, accuracy_fn, threshold=0.5, **options):
    return fxsketch.optimize(model, fxsketch.LayerConfig({"type": "Linear"}, params={"low_rank": [4, 8]}),
                             example_inputs=X, accuracy_fn=accuracy_fn, accuracy_threshold=threshold, n_trials=2,
                             search=fxsketch.SearchOptions(seed=0, objective="flops", **options))


def test_search_computes_attention_in_bf16_where_native_and_free(monkeypatch):
    model = Attention().eval()
    seen = []

    def accuracy(m):
        seen.append(_half_calls(m))
        return 1.0

    monkeypatch.setattr(precision, "_native_cpu_bf16", lambda: False)
    assert "attn.sdpa" not in _optimize(model, accuracy).plan and set(seen) == {0}  # not offered: no native bf16
    monkeypatch.setattr(precision, "_native_cpu_bf16", lambda: True)
    seen.clear()
    result = _optimize(model, accuracy)
    assert result.plan["attn.sdpa"] == {"method": "bf16"}
    assert seen[:2] == [0, 1] and set(seen[2:]) == {1}  # the dense model, the check, then every candidate
    assert _half_calls(result.graph_module) == 1
    assert [r.name for r in result.attention] == ["attn.sdpa"]
    assert "1 attention call(s) computed in bf16 (attn.sdpa)" in result.summary()
    seen.clear()
    assert "attn.sdpa" not in _optimize(model, accuracy, half_attention=False).plan and set(seen) == {0}

    def costing(loss):  # dense 1.0, threshold 0.5: each free change may cost up to 0.025
        return lambda m: 1.0 - (loss if _half_calls(m) else 0.0)

    assert "attn.sdpa" not in _optimize(model, costing(0.05)).plan
    assert _optimize(model, costing(0.02)).plan["attn.sdpa"] == {"method": "bf16"}
    assert "attn.sdpa" not in _optimize(model, costing(0.0), threshold=None).plan  # no bar: nothing is free


def test_half_attention_must_be_a_bool():
    with pytest.raises(TypeError, match="half_attention must be True or False"):
        fxsketch.SearchOptions(half_attention=1)
