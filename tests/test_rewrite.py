"""Tests for fxsketch.rewrite: applying a plan to a captured model."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxsketch.capture import capture, find_layers
from fxsketch.nn import LowRankConv2d, LowRankLinear, SKConv2d, SKLinear
from fxsketch.replacements import FactorCache, dense_cost, get_kind
from fxsketch.plan import load_plan, normalize_plan
from fxsketch.rewrite import apply_plan, rewrite


GEOMETRIES = [
    dict(stride=1, padding=0, dilation=1),
    dict(stride=2, padding=1, dilation=1),
    dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
    dict(stride=(3, 1), padding=(0, 2), dilation=(1, 3)),
]


class Net(nn.Module):
    """Two convolutions and two linears; symbolic_trace handles it."""

    def __init__(self, bias: bool = True, **geometry):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(6, 5, (3, 2), bias=bias, **(geometry or GEOMETRIES[2]))
        self.fc1 = nn.Linear(5, 7, bias=bias)
        self.fc2 = nn.Linear(7, 4, bias=bias)

    def features(self, x):
        return self.conv2(torch.relu(self.conv1(x))).mean((2, 3))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.features(x))))


class BranchNet(Net):
    """The same model with shape-dependent Python control flow: it needs torch.export."""

    def forward(self, x):
        h = self.features(x)
        if x.shape[0] > 1:
            h = h * 1.5
        return self.fc2(torch.relu(self.fc1(h)))


class GroupedNet(Net):
    def __init__(self, bias: bool = True):
        super().__init__(bias)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=2, bias=bias)

    def features(self, x):
        return self.conv2(self.grouped(torch.relu(self.conv1(x)))).mean((2, 3))


class GroupedBranchNet(GroupedNet):
    def forward(self, x):
        h = self.features(x)
        if x.shape[0] > 1:
            h = h - 0.5
        return self.fc2(torch.relu(self.fc1(h)))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5) * 0.4)
        self.b = nn.Parameter(torch.randn(6))
        self.k = nn.Parameter(torch.randn(5, 3, 3, 3) * 0.2)

    def forward(self, x):
        h = F.conv2d(x, self.k, None, 1, 1).mean((2, 3))
        return F.linear(h, self.w, self.b)


class BranchFunctional(Functional):
    def forward(self, x):
        if x.shape[0] > 1:
            x = x * 2.0
        return super().forward(x)


TRACER_MODELS = [(Net, "symbolic_trace"), (BranchNet, "export")]
FULL_RANK = {"conv1": 6, "conv2": 5, "fc1": 5, "fc2": 4}


def _input(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 11, 10, generator=torch.Generator().manual_seed(seed))


def _rel_err(actual, expected) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def _svd_plan(ranks: dict[str, int]) -> dict:
    return {name: {"method": "svd", "low_rank": r} for name, r in ranks.items()}


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()])


def _assert_unchanged(model: nn.Module, snapshot) -> None:
    state, modules = snapshot
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k


# ---------------------------------------------------------------------------------------------
# Correctness of the rewrite
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("model_cls,tracer", TRACER_MODELS)
def test_full_rank_svd_reproduces_outputs(model_cls, tracer, geometry):
    torch.manual_seed(0)
    model = model_cls(**geometry).eval()
    x = _input()
    new = rewrite(model, _svd_plan(FULL_RANK), x)
    assert new.meta["fxsketch_tracer"] == tracer
    for name in FULL_RANK:
        assert isinstance(new.get_submodule(name), (LowRankLinear, LowRankConv2d)), name
    assert not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in new.modules())
    aten_dense = {torch.ops.aten.linear.default, torch.ops.aten.conv2d.default, F.linear, torch.conv2d}
    assert not [n for n in new.graph.nodes if n.op == "call_function" and n.target in aten_dense]
    with torch.no_grad():
        for inp in (x, _input(3, seed=1)):
            assert _rel_err(new(inp), model(inp)) < 1e-4


def _float64_net(model_cls) -> nn.Module:
    model = model_cls().double().eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():  # values that really use float64 precision
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return model


@pytest.mark.parametrize("model_cls", [m for m in (Net, BranchNet)])
def test_full_rank_svd_reproduces_float64_model_to_float64_precision(model_cls):
    model = _float64_net(model_cls)
    x = _input().double()
    new = rewrite(model, _svd_plan(FULL_RANK), x)
    assert all(p.dtype == torch.float64 for p in new.parameters())
    with torch.no_grad():
        assert _rel_err(new(x), model(x)) < 1e-10


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64]
)
def test_sketch_kind_copies_bias_exactly(dtype):
    model = _float64_net(Net).to(dtype)
    new = rewrite(model, {"fc1": {"method": "sketch", "low_rank": 1},
                          "conv2": {"method": "sketch", "low_rank": 1}}, _input().to(dtype))
    assert new.fc1.bias.dtype == dtype
    assert torch.equal(new.fc1.bias, model.fc1.bias)
    assert torch.equal(new.conv2.bias, model.conv2.bias)


@pytest.mark.parametrize("model_cls,tracer", [(Functional, "symbolic_trace"), (BranchFunctional, "export")])
def test_full_rank_svd_of_functional_layers(model_cls, tracer):
    torch.manual_seed(0)
    model = model_cls()
    x = torch.randn(2, 3, 6, 5)
    new = rewrite(model, {"w": {"method": "svd", "low_rank": 5}, "k": {"method": "svd", "low_rank": 5}}, x)
    assert new.meta["fxsketch_tracer"] == tracer
    lowrank = [type(m) for m in new.modules() if isinstance(m, (LowRankLinear, LowRankConv2d))]
    assert sorted(t.__name__ for t in lowrank) == ["LowRankConv2d", "LowRankLinear"]
    names = {n for n, _ in new.named_parameters()}
    assert not {"w", "b", "k"} & names, names  # the bare dense parameters are gone
    with torch.no_grad():
        assert _rel_err(new(x), model(x)) < 1e-4


@pytest.mark.parametrize("model_cls,tracer", TRACER_MODELS)
def test_kinds_install_expected_modules_at_qualified_names(model_cls, tracer):
    torch.manual_seed(0)
    model = model_cls().eval()
    x = _input()
    plan = {
        "conv1": {"method": "svd", "low_rank": 2},
        "conv2": {"method": "sketch", "num_terms": 2, "low_rank": 1},
        "fc1": {"method": "sketch", "low_rank": 2},
        "fc2": {"method": "svd", "low_rank": 3},
    }
    new = rewrite(model, plan, x)
    assert new.meta["fxsketch_tracer"] == tracer
    expected = {"conv1": LowRankConv2d, "conv2": SKConv2d, "fc1": SKLinear, "fc2": LowRankLinear}
    for name, cls in expected.items():
        assert type(new.get_submodule(name)) is cls, name
    assert new.conv1.rank == 2 and new.fc2.rank == 3
    assert (new.conv2.num_terms, new.conv2.low_rank) == (2, 1)
    assert (new.fc1.num_terms, new.fc1.low_rank) == (1, 2)  # num_terms defaults to 1
    assert (new.conv2.stride, new.conv2.padding, new.conv2.dilation) == ((1, 2), (2, 1), (2, 1))
    assert (new.conv1.stride, new.conv1.padding) == ((2, 2), (1, 1))
    torch.testing.assert_close(new.fc2.bias, model.fc2.bias, rtol=0, atol=0)
    with torch.no_grad():
        assert new(x).shape == model(x).shape


@pytest.mark.parametrize("model_cls", [Net, BranchNet])
def test_dense_kind_leaves_the_layer_alone(model_cls):
    torch.manual_seed(0)
    model = model_cls().eval()
    x = _input()
    new = rewrite(model, {"fc1": {"method": "dense"}, "conv1": {"method": "dense"}}, x)
    assert not any(isinstance(m, (LowRankLinear, LowRankConv2d, SKLinear, SKConv2d)) for m in new.modules())
    assert torch.equal(new.state_dict()["fc1.weight"], model.fc1.weight)
    assert torch.equal(new.state_dict()["conv1.weight"], model.conv1.weight)
    with torch.no_grad():
        assert torch.equal(new(x), model(x))


@pytest.mark.parametrize("model_cls", [GroupedNet, GroupedBranchNet])
def test_unsupported_grouped_conv_is_kept_dense_with_warning(model_cls, caplog):
    torch.manual_seed(0)
    model = model_cls().eval()
    x = _input()
    plan = {"grouped": {"method": "svd", "low_rank": 2}, "fc2": {"method": "svd", "low_rank": 4}}
    with caplog.at_level(logging.WARNING, logger="fxsketch"):
        new = rewrite(model, plan, x)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "grouped" in r.getMessage()]
    assert len(warnings) == 1
    assert "groups=2" in warnings[0].getMessage()
    assert not isinstance(new.get_submodule("grouped"), (LowRankConv2d, SKConv2d))
    assert torch.equal(new.state_dict()["grouped.weight"], model.grouped.weight)
    assert isinstance(new.get_submodule("fc2"), LowRankLinear)  # the rest of the plan still applies
    with torch.no_grad():
        assert _rel_err(new(x), model(x)) < 1e-4


def test_original_model_is_never_mutated_and_still_gives_identical_outputs():
    torch.manual_seed(0)
    model = BranchNet().train()
    x = _input()
    with torch.no_grad():
        y_before = model(x)
    snap = _snapshot(model)
    plan = {**_svd_plan({"conv1": 2, "fc2": 2}), "conv2": {"method": "sketch", "low_rank": 1},
            "fc1": {"method": "sketch", "low_rank": 1}}
    new = rewrite(model, plan, x)
    opt = torch.optim.SGD(new.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        new(x).square().mean().backward()
        opt.step()
    _assert_unchanged(model, snap)
    with torch.no_grad():
        assert torch.equal(model(x), y_before)


class ConstNet(Net):
    """Tensor constants in forward: tracing stores them as plain attributes of the root module."""

    def forward(self, x):
        return super().forward(x) * torch.tensor([1.0, 2.0, 3.0, 4.0]) + torch.tensor(0.5)


class ConstBranchNet(BranchNet):
    def forward(self, x):
        return super().forward(x) * torch.tensor([1.0, 2.0, 3.0, 4.0]) + torch.tensor(0.5)


@pytest.mark.parametrize("model_cls", [Net, BranchNet, ConstNet, ConstBranchNet])  # symbolic_trace, torch.export
def test_apply_plan_leaves_the_captured_graph_module_whole(model_cls):
    """apply_plan copies the graph once and generates its code once: the captured module keeps its
    graph, owner and code; the copy's code is its own graph's (constants included) and survives a
    deep copy."""
    import copy

    torch.manual_seed(0)
    model = model_cls().eval()
    x = _input()
    gm = capture(model, (x,))
    records = {r.name: r for r in find_layers(gm)}
    graph, code, nodes = gm.graph, gm.code, len(gm.graph.nodes)
    with torch.no_grad():
        y = gm(x)
    new = apply_plan(gm, records, _svd_plan({"conv1": 2, "fc2": 2}), FactorCache())
    assert gm.graph is graph and graph.owning_module is gm
    assert gm.code == code and len(gm.graph.nodes) == nodes
    assert new.graph is not graph and new.graph.owning_module is new
    assert new.code == new.graph.python_code("self").src
    assert "lowrank" in new.code
    twin = copy.deepcopy(new)
    full = apply_plan(gm, records, _svd_plan({"conv1": 6, "fc2": 4}), FactorCache())
    with torch.no_grad():
        assert torch.equal(gm(x), y)
        assert torch.equal(twin(x), new(x))
        assert _rel_err(full(x), y) < 1e-4  # full rank: the same function, constants included


@pytest.mark.parametrize(
    "bias", [True, False], ids=["bias", "no_bias"]
)
@pytest.mark.parametrize("model_cls", [Net, BranchNet])
@pytest.mark.parametrize("method", ["svd", "sketch"])
def test_rewritten_model_trains(method, model_cls, bias):
    torch.manual_seed(0)
    model = model_cls(bias=bias)
    x = _input(4)
    target = torch.randn(4, 4, generator=torch.Generator().manual_seed(5))
    snap = _snapshot(model)
    params = {"svd": {"low_rank": 2}, "sketch": {"num_terms": 1, "low_rank": 1}}[method]
    new = rewrite(model, {name: {"method": method, **params} for name in FULL_RANK}, x)
    new_params = dict(new.named_parameters())
    factor_names = {n for n in new_params if n.rsplit(".", 1)[-1] in ("A", "B", "S1", "S2")}
    assert {n.rsplit(".", 1)[0] for n in factor_names} == set(FULL_RANK)
    before = {n: p.detach().clone() for n, p in new_params.items()}

    opt = torch.optim.SGD(new.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.mse_loss(new(x), target)
        loss.backward()
        for n in factor_names:
            grad = new_params[n].grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, n
        opt.step()
        losses.append(loss.item())
    for n in factor_names:
        assert not torch.equal(new_params[n], before[n]), n
    assert losses[-1] < losses[0]
    _assert_unchanged(model, snap)


# ---------------------------------------------------------------------------------------------
# Plan validation and error messages
# ---------------------------------------------------------------------------------------------


def test_unknown_layer_name_lists_close_matches():
    with pytest.raises(ValueError) as info:
        rewrite(Net(), {"fc_1": {"method": "svd", "low_rank": 2}}, _input())
    message = str(info.value)
    assert "'fc_1'" in message and "closest" in message and "fc1" in message


def test_unknown_layer_name_without_close_match_lists_layers():
    with pytest.raises(ValueError) as info:
        rewrite(Net(), {"zzzzzz": {"method": "svd", "low_rank": 2}}, _input())
    message = str(info.value)
    assert "'zzzzzz'" in message
    for name in FULL_RANK:
        assert name in message


def test_unknown_method_lists_known_methods():
    with pytest.raises(ValueError) as info:
        rewrite(Net(), {"fc1": {"method": "tucker", "low_rank": 2}}, _input())
    message = str(info.value)
    assert "'tucker'" in message
    for known in ("dense", "sketch", "svd"):
        assert known in message


@pytest.mark.parametrize(
    "entry,bad,takes",
    [
        ({"method": "svd", "low_rank": 2, "rank": 2}, "rank", "low_rank"),
        ({"method": "sketch", "low_rank": 2, "terms": 1}, "terms", "num_terms"),
        ({"method": "dense", "low_rank": 2}, "low_rank", "none"),
    ],
)
def test_unknown_parameter_for_method(entry, bad, takes):
    with pytest.raises(ValueError) as info:
        rewrite(Net(), {"fc1": entry}, _input())
    message = str(info.value)
    assert f"'{bad}'" in message and entry["method"] in message and takes in message


@pytest.mark.parametrize("rank", [0, -1, 6, 100, 2.0, True, None, "2"])
@pytest.mark.parametrize("layer,full", [("fc1", 5), ("conv2", 5)])
def test_invalid_svd_rank(layer, full, rank):
    entry = {"method": "svd"} if rank is None else {"method": "svd", "low_rank": rank}
    with pytest.raises(ValueError) as info:
        rewrite(Net(), {layer: entry}, _input())
    message = str(info.value)
    assert "low_rank" in message and f"[1, {full}]" in message and repr(layer) in message


@pytest.mark.parametrize("params", [{"low_rank": 0}, {"num_terms": 0, "low_rank": 2}, {"low_rank": 1.5}, {}])
def test_invalid_sketch_params(params):
    with pytest.raises(ValueError, match="must be a positive integer"):
        rewrite(Net(), {"fc2": {"method": "sketch", **params}}, _input())


@pytest.mark.parametrize("entry", [{"low_rank": 2}, "svd", None, 3])
def test_plan_entry_without_method(entry):
    with pytest.raises(ValueError, match="'method'"):
        normalize_plan({"fc1": entry})
    with pytest.raises(ValueError, match="'fc1'"):
        rewrite(Net(), {"fc1": entry}, _input())


def test_plan_of_wrong_type():
    with pytest.raises(TypeError, match="plan"):
        normalize_plan([("fc1", {"method": "svd"})])


def test_plan_json_roundtrip_and_wrapped_form(tmp_path):
    plan = _svd_plan({"fc1": 3, "conv1": 2})
    direct = tmp_path / "plan.json"
    direct.write_text(json.dumps(plan))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"plan": plan, "accuracy": 0.9, "params": 123}))
    assert load_plan(direct) == plan
    assert load_plan(wrapped) == plan
    assert normalize_plan(str(wrapped)) == plan
    new = rewrite(Net(), str(direct), _input())
    assert isinstance(new.fc1, LowRankLinear) and new.fc1.rank == 3


def test_missing_plan_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_plan(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rewrite(Net(), path, _input())


@pytest.mark.parametrize("text", ['{"fc1": {"method": "svd", ', "", "not json at all"])
def test_corrupt_plan_file(tmp_path, text):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="not valid JSON") as info:
        load_plan(path)
    assert "broken.json" in str(info.value)


def test_plan_file_with_bad_entry(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"fc1": {"low_rank": 2}}))
    with pytest.raises(ValueError, match="'method'"):
        load_plan(path)


# ---------------------------------------------------------------------------------------------
# The svd kind and the factor cache
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 3, 7, 12])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_truncated_svd_is_eckart_young_optimal(layer, rank):
    torch.manual_seed(1)
    if layer == "linear":
        model = nn.Sequential(nn.Linear(20, 12))
        x = torch.randn(3, 20)
    else:
        model = nn.Sequential(nn.Conv2d(2, 12, 3, padding=1))
        x = torch.randn(1, 2, 5, 5)
    W = model[0].weight.detach().double().reshape(12, -1)
    new = rewrite(model, {"0": {"method": "svd", "low_rank": rank}}, x)
    mod = new.get_submodule("0")
    approx = mod.A.detach().double() @ mod.B.detach().double().reshape(rank, -1)
    err2 = float(((W - approx) ** 2).sum())
    S = torch.linalg.svdvals(W)
    tail2 = float((S[rank:] ** 2).sum())
    total = float((S**2).sum())
    assert abs(err2 - tail2) <= 1e-5 * total, (err2, tail2)
    if rank < 12:
        assert err2 > 0.01 * total  # a random matrix really loses energy at this rank
    # the factors are balanced: A = U√Σ, B = √Σ Vᵀ
    torch.testing.assert_close(mod.A.detach().norm(dim=0), mod.B.detach().reshape(rank, -1).norm(dim=1),
                               rtol=1e-4, atol=1e-6)


class _SvdSpy:
    def __init__(self, monkeypatch):
        self.shapes: list[tuple[int, ...]] = []
        real = torch.linalg.svd

        def spy(A, *args, **kwargs):
            self.shapes.append(tuple(A.shape))
            return real(A, *args, **kwargs)

        monkeypatch.setattr(torch.linalg, "svd", spy)


def test_factor_cache_computes_one_svd_per_layer_for_many_ranks(monkeypatch):
    torch.manual_seed(0)
    model = Net()
    x = _input()
    gm = capture(model, x)
    records = {r.name: r for r in find_layers(gm)}
    cache = FactorCache()
    spy = _SvdSpy(monkeypatch)
    outputs = {}
    for rank in (1, 3, 4, 2):
        new = apply_plan(gm, records, _svd_plan({"conv1": rank, "fc1": rank, "fc2": rank}), cache)
        outputs[rank] = new.fc1.A.detach().clone()
    assert sorted(spy.shapes) == sorted([(6, 27), (7, 5), (4, 7)])
    # the cached factors are slices of one decomposition
    torch.testing.assert_close(outputs[3][:, :2], outputs[2], rtol=0, atol=0)
    cache.clear()
    apply_plan(gm, records, _svd_plan({"fc1": 2}), cache)
    assert len(spy.shapes) == 4


def test_factor_cache_slices_match_exact_svd(monkeypatch):
    W = torch.randn(9, 14, generator=torch.Generator().manual_seed(2))
    cache = FactorCache()
    spy = _SvdSpy(monkeypatch)
    U_ref, S_ref, Vh_ref = torch.linalg.svd(W.double(), full_matrices=False)
    spy.shapes.clear()
    for rank in (9, 1, 5):
        U, S, Vh = cache.svd("w", W, rank)
        assert U.shape == (9, rank) and S.shape == (rank,) and Vh.shape == (rank, 14)
        torch.testing.assert_close(S.double(), S_ref[:rank], rtol=1e-5, atol=1e-5)
        recon = (U.double() * S.double()) @ Vh.double()
        torch.testing.assert_close(recon, (U_ref[:, :rank] * S_ref[:rank]) @ Vh_ref[:rank], rtol=1e-4, atol=1e-5)
    assert spy.shapes == [(9, 14)]


def _large_matrix() -> torch.Tensor:
    """1100 × 1200 with a decaying spectrum (64 directions) and a little noise."""
    g = torch.Generator().manual_seed(3)
    U0, _ = torch.linalg.qr(torch.randn(1100, 64, generator=g))
    V0, _ = torch.linalg.qr(torch.randn(1200, 64, generator=g))
    s = 10 * 0.85 ** torch.arange(64.0)
    return (U0 * s) @ V0.T + 1e-3 * torch.randn(1100, 1200, generator=g)


def test_randomized_svd_for_large_layer_is_near_optimal(monkeypatch):
    W = _large_matrix()
    rank = 16
    exact_tail = float((torch.linalg.svdvals(W.double())[rank:] ** 2).sum())
    lowrank_calls = []
    real_lowrank = torch.svd_lowrank

    def spy_lowrank(A, *args, **kwargs):
        lowrank_calls.append(tuple(A.shape))
        return real_lowrank(A, *args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", spy_lowrank)
    svd_spy = _SvdSpy(monkeypatch)
    rng_before = torch.get_rng_state()
    U, S, Vh = FactorCache().svd("big", W, rank)
    assert lowrank_calls == [(1100, 1200)]
    assert (1100, 1200) not in svd_spy.shapes  # no exact SVD of the big matrix
    assert torch.equal(torch.get_rng_state(), rng_before)  # fixed seed, global RNG untouched
    assert U.shape == (1100, rank) and S.shape == (rank,) and Vh.shape == (rank, 1200)
    err = float(((W.double() - (U.double() * S.double()) @ Vh.double()) ** 2).sum())
    assert exact_tail <= err * (1 + 1e-6)
    assert err <= 1.03 * exact_tail, (err, exact_tail)
    # a second cache rebuilds the same factors bit for bit
    U2, S2, Vh2 = FactorCache().svd("big", W, rank)
    assert torch.equal(U, U2) and torch.equal(S, S2) and torch.equal(Vh, Vh2)


# ---------------------------------------------------------------------------------------------
# Cost model and determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("model_cls", [GroupedNet, GroupedBranchNet])
def test_parameter_count_equals_cost_model(model_cls, bias):
    torch.manual_seed(0)
    model = model_cls(bias=bias).eval()
    x = _input()
    plan = {
        "conv1": {"method": "svd", "low_rank": 3},
        "conv2": {"method": "sketch", "num_terms": 2, "low_rank": 1},
        "fc1": {"method": "dense"},
        "fc2": {"method": "svd", "low_rank": 2},
        "grouped": {"method": "svd", "low_rank": 2},  # unsupported: stays dense
    }
    new = rewrite(model, plan, x)
    records = {r.name: r for r in find_layers(capture(model, x))}
    expected = 0
    for name, record in records.items():
        entry = plan[name]
        kind = get_kind(entry["method"])
        if kind.unsupported(record):
            expected += dense_cost(record).params
        else:
            expected += kind.cost(record, {**kind.defaults, **entry}).params
    stored = sum(t.numel() for t in new.parameters()) + sum(t.numel() for t in new.buffers())
    assert stored == expected
    # and none of the replaced layers' dense weights are left behind
    state = new.state_dict()
    for name in ("conv1", "conv2", "fc2"):
        assert f"{name}.weight" not in state
    assert {k for k in state if k.startswith("conv1.")} == {"conv1.B", "conv1.A"} | ({"conv1.bias"} if bias else set())
    assert {k for k in state if k.startswith("conv2.")} >= {"conv2.S1", "conv2.S2", "conv2.U1", "conv2.U2"}
    assert "fc1.weight" in state and "grouped.weight" in state
    targets = {str(n.target) for n in new.graph.nodes if n.op == "get_attr"}
    assert not {t for t in targets if t.split(".")[0] in ("conv1", "conv2", "fc2") and t.endswith(".weight")}


def _big_model() -> nn.Module:
    class Big(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.up = nn.Linear(4, 1200)
            self.big = nn.Linear(1200, 1100)
            self.head = nn.Linear(1100, 3)

        def forward(self, x):
            h = self.conv(x).mean((2, 3))
            return self.head(torch.relu(self.big(torch.relu(self.up(h)))))

    torch.manual_seed(0)
    model = Big()
    with torch.no_grad():
        model.big.weight.copy_(_large_matrix() * 0.05)
    return model


def test_same_plan_twice_is_bit_identical():
    model = _big_model()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(7))
    plan = {
        "conv": {"method": "sketch", "num_terms": 2, "low_rank": 2},
        "up": {"method": "sketch", "low_rank": 2},
        "big": {"method": "svd", "low_rank": 16},  # randomized SVD path
        "head": {"method": "svd", "low_rank": 2},
    }
    results = []
    for seed in (0, 1234):
        torch.manual_seed(seed)  # the global RNG state must not matter
        new = rewrite(model, plan, x)
        with torch.no_grad():
            results.append((new(x), new.state_dict()))
    (y1, s1), (y2, s2) = results
    assert torch.equal(y1, y2)
    assert list(s1) == list(s2)
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert isinstance(new.big, LowRankLinear) and new.big.rank == 16
    # the randomized factors are a good rank-16 approximation of the big layer
    W = model.big.weight.detach().double()
    approx = new.big.A.detach().double() @ new.big.B.detach().double()
    tail = float((torch.linalg.svdvals(W)[16:] ** 2).sum())
    assert float(((W - approx) ** 2).sum()) <= 1.03 * tail


def test_rewritten_model_runs_the_same_on_the_triton_kernels(monkeypatch):
    """The pass does not care which kernel backs the ops: Triton (interpreted here) matches ATen."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 12)).eval()
    x = torch.randn(3, 3, 5, 5)
    gm = rewrite(model, {"0": {"method": "svd", "low_rank": 4}, "3": {"method": "svd", "low_rank": 6}}, x)
    monkeypatch.setenv("FXSKETCH_KERNEL", "aten")
    with torch.no_grad():
        expected = gm(x)
    monkeypatch.setenv("FXSKETCH_KERNEL", "triton")
    with torch.no_grad():
        actual = gm(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
