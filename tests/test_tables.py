"""Embedding tables as int8 rows (`int8_weight` on an embedding, `fxsketch::int8_embedding`): the op
against a float64 reference of its dequantized table, which tables are found and which refused, a
rewrite (one op per table, meta device, the model untouched), a `.pt2` round trip in a fresh
process, `torch.compile` and the compile backend, and the search, which stores the tables as int8
when that is free against the accuracy bar and then builds every candidate with them."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import fxsketch
from fxsketch.capture import find_tables
from fxsketch.kernels import int8_embedding, quantize_weight
from fxsketch.kernels.int8 import WEIGHT_ONLY_QMAX
from fxsketch.nn import Int8Embedding
from conftest import agreement, loaded_in_fresh_process


class Bag(nn.Module):
    """Token and position tables, summed, pooled, classified: the shape of a transformer's input."""

    def __init__(self, tied: bool = False, max_norm: float | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tokens = nn.Embedding(50, 16, max_norm=max_norm)
        self.positions = nn.Embedding(8, 16)
        self.head = nn.Linear(16, 50, bias=False)
        if tied:
            self.head.weight = self.tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.head(torch.tanh(self.tokens(ids) + self.positions(positions)).mean(1))


IDS = torch.randint(0, 50, (64, 8), generator=torch.Generator().manual_seed(1))
TABLES = {"tokens": {"method": "int8_weight"}, "positions": {"method": "int8_weight"}}


def _reference(indices, q, scale):
    return q.double()[indices] * scale.double()[indices][..., None]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12), (torch.bfloat16, 1e-2)])
def test_op_is_the_dequantized_table(dtype, tol):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(30, 12, generator=g).to(dtype)
    q, scale = quantize_weight(w, WEIGHT_ONLY_QMAX)
    scale = scale.to(dtype)
    indices = torch.randint(0, 30, (4, 5), generator=g)
    out = int8_embedding(indices, q, scale)
    assert out.dtype == dtype and out.shape == (4, 5, 12)
    expected = _reference(indices, q, scale)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    # and every row is the float row within half a quantization step per entry (and rounding to dtype)
    err = (out.double() - w.double()[indices]).abs()
    assert (err <= scale.double()[indices][..., None] / 2 * (1 + 2 * tol) + tol).all()


def test_opcheck():
    q, scale = quantize_weight(torch.randn(9, 6), WEIGHT_ONLY_QMAX)
    torch.library.opcheck(torch.ops.fxsketch.int8_embedding.default, (torch.tensor([[0, 8, 3]]), q, scale))


def test_tables_are_found_in_exported_and_traced_graphs_and_tied_or_renormalized_ones_refused():
    for gm in (fxsketch.capture(Bag(), IDS), torch.fx.symbolic_trace(Bag())):
        tables = {r.name: r for r in find_tables(gm)}
        assert set(tables) == {"tokens", "positions"}
        assert tables["tokens"].weight_shape == (50, 16) and tables["tokens"].op_type == "Embedding"
        assert not tables["tokens"].unsupported
    assert {r.name: r.tokens for r in find_tables(fxsketch.capture(Bag(), IDS))} == {"tokens": 64 * 8, "positions": 8}
    tied = {r.name: r.unsupported for r in find_tables(fxsketch.capture(Bag(tied=True), IDS))}
    assert "also read by" in tied["tokens"] and not tied["positions"]
    renormed = {r.name: r.unsupported for r in find_tables(torch.fx.symbolic_trace(Bag(max_norm=1.0)))}
    assert "max_norm=1.0" in renormed["tokens"]


def test_rewrite_stores_the_tables_as_int8_on_any_device_and_leaves_the_model_alone():
    model = Bag().eval()
    before = copy.deepcopy(model.state_dict())
    gm = fxsketch.rewrite(model, TABLES, IDS)
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.fxsketch.int8_embedding.default) + ops.count(int8_embedding) == 2
    assert gm.tokens.weight_q.dtype == torch.int8 and not hasattr(gm.tokens, "weight")
    with torch.no_grad():
        exact, out = model(IDS), gm(IDS)
    assert (out - exact).abs().max() <= 0.02 * exact.abs().max()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    meta = fxsketch.rewrite(Bag().to("meta"), TABLES, IDS.to("meta"))
    assert {t.device.type for t in meta.state_dict().values()} == {"meta"}
    assert meta(IDS.to("meta")).device.type == "meta"


def test_other_kinds_and_tied_tables_stay_as_they_are_with_the_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="fxsketch"):
        gm = fxsketch.rewrite(Bag(), {"tokens": {"method": "svd", "low_rank": 4}}, IDS)
        tied = fxsketch.rewrite(Bag(tied=True), TABLES, IDS)
    assert "svd does not apply to embedding tables (tokens); they take int8_weight" in caplog.text
    assert "keeping tokens dense: its weight is also read by" in caplog.text
    assert not any(isinstance(m, Int8Embedding) for m in gm.modules())
    assert gm.get_parameter("tokens.weight").dtype == torch.float32
    assert [type(m).__name__ for m in tied.modules() if isinstance(m, Int8Embedding)] == ["Int8Embedding"]


def test_saved_model_loads_weights_only_in_a_fresh_process_and_compiles(tmp_path):
    gm = fxsketch.rewrite(Bag().eval(), TABLES, IDS)
    path = tmp_path / "tables.pt2"
    fxsketch.save(gm, path, IDS)
    other = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = gm(other)
        out = loaded_in_fresh_process(path, other, expected, tmp_path,
                                      "print(sorted({str(t.dtype) for t in m.state_dict().values()}))")
        assert "torch.int8" in out
        torch.testing.assert_close(torch.compile(gm)(other), expected, rtol=1e-5, atol=1e-5)


def _optimize(model, accuracy_fn, threshold=0.5, **options):
    return fxsketch.optimize(model, fxsketch.LayerConfig({"type": "Linear"}, params={"low_rank": [8, 12]}),
                             example_inputs=IDS, accuracy_fn=accuracy_fn, accuracy_threshold=threshold, n_trials=2,
                             search=fxsketch.SearchOptions(seed=0, objective="flops", **options))


def _int8_tables(model: nn.Module) -> int:
    return sum(isinstance(m, Int8Embedding) for m in model.modules())


def test_free_tables_are_int8_in_every_candidate_and_in_the_plan_returned(tmp_path):
    model = Bag().eval()
    base, seen = agreement(model, IDS), []

    def accuracy(m):
        seen.append(_int8_tables(m))
        return base(m)

    result = _optimize(model, accuracy)
    assert result.plan["head"]["method"] == "svd"
    assert result.plan["tokens"] == {"method": "int8_weight"} and result.plan["positions"] == {"method": "int8_weight"}
    # the dense model, then the dense model with int8 tables, then every candidate with them
    assert seen[:2] == [0, 2] and set(seen[2:]) == {2}
    assert _int8_tables(result.graph_module) == 2
    assert "2 embedding table(s) stored as int8 rows" in result.summary()
    assert [r.name for r in result.tables] == ["tokens", "positions"]
    result.save_plan(tmp_path / "plan.json")  # the saved plan rebuilds the same model, tables included
    rebuilt = fxsketch.rewrite(model, tmp_path / "plan.json", IDS)
    with torch.no_grad():
        assert torch.equal(rebuilt(IDS), result.graph_module(IDS))
    seen.clear()
    unchanged = _optimize(model, accuracy, int8_tables=False)
    assert "tokens" not in unchanged.plan and not unchanged.tables and set(seen) == {0}


def test_tables_that_cost_more_than_a_twentieth_of_the_margin_stay_float():
    model = Bag().eval()

    def costing(loss):  # dense 1.0, threshold 0.5: int8 tables may cost up to 0.025
        return lambda m: 1.0 - (loss if _int8_tables(m) else 0.0)

    result = _optimize(model, costing(0.05))
    assert "tokens" not in result.plan and result.plan and not result.tables
    assert _int8_tables(result.graph_module) == 0
    assert _optimize(model, costing(0.02)).plan["tokens"] == {"method": "int8_weight"}
    no_bar = _optimize(model, agreement(model, IDS), threshold=None)  # nothing to judge "free" against
    assert "tokens" not in no_bar.plan


def test_int8_tables_must_be_a_bool():
    with pytest.raises(TypeError, match="int8_tables must be True or False"):
        fxsketch.SearchOptions(int8_tables="yes")


def test_the_compile_backend_stores_the_tables_as_int8_too():
    model = Bag().eval()
    seen = []

    def spy(gm, example_inputs):
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    chosen = fxsketch.backend(plan={**TABLES, "head": {"method": "int8_weight"}}, inner=spy)
    with torch.no_grad():
        out = torch.compile(model, backend=chosen, fullgraph=True)(IDS)
        expected = fxsketch.rewrite(model, {**TABLES, "head": {"method": "int8_weight"}}, IDS)(IDS)
    assert seen.count(torch.ops.fxsketch.int8_embedding.default) == 2 and chosen.unmatched() == []
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
