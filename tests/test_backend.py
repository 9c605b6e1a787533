"""The torch.compile backend: Dynamo graphs rewritten by plan, no graph breaks, recompiles."""

from __future__ import annotations

import copy
import importlib
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsketch
from fxsketch.backend import warn_unmatched, qualified_name


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 32), nn.Linear(32, 32)])
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class Block(nn.Module):
    """A pre-norm transformer block: attention from q/k/v projections, then an MLP."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(a)
        return x + self.ff(self.norm2(x))


CASES = {
    "mlp": (MLP, lambda n=4: torch.randn(n, 16), {"layers.0": 4, "layers.1": 8, "head": 2}),
    "cnn": (CNN, lambda n=2: torch.randn(n, 3, 8, 8), {"conv1": 4, "conv2": 6, "fc": 3}),
    "block": (Block, lambda n=2: torch.randn(n, 5, 32), {"q": 8, "k": 8, "v": 8, "o": 8, "ff.0": 12, "ff.2": 12}),
}


def _case(name):
    cls, make, ranks = CASES[name]
    torch.manual_seed(0)
    plan = {layer: {"method": "svd", "low_rank": r} for layer, r in ranks.items()}
    return cls().eval(), make, plan


@pytest.mark.parametrize("name", list(CASES))
def test_backend_matches_the_eager_rewrite_without_graph_breaks(name):
    model, make, plan = _case(name)
    x = make()
    expected = fxsketch.rewrite(model, plan, x)(x)
    compiled = torch.compile(model, backend=fxsketch.backend(plan=plan, inner="eager"), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    explanation = torch._dynamo.explain(fxsketch.rewrite(model, plan, x))(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_backend_swaps_the_planned_nodes_for_the_op():
    model, make, plan = _case("block")
    seen = []

    def spy(gm, inputs):
        seen.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    torch.compile(model, backend=fxsketch.backend(plan=plan, inner=spy))(make())
    targets = seen[0]
    assert targets.count(torch.ops.fxsketch.lowrank_linear.default) == 6
    assert F.linear not in targets and torch._C._nn.linear not in targets


def test_recompiling_on_a_new_batch_size_reuses_the_plan():
    model, make, plan = _case("mlp")
    calls = []

    def counting(gm, inputs):
        calls.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=fxsketch.backend(plan=plan, inner=counting), dynamic=False)
    reference = fxsketch.rewrite(model, plan, make())
    with torch.no_grad():
        for n in (4, 7):
            x = make(n)
            torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2


def test_inductor_is_the_default_inner_backend():
    model, make, plan = _case("cnn")
    x = make()
    compiled = torch.compile(model, backend=fxsketch.backend(plan=plan))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), fxsketch.rewrite(model, plan, x)(x), rtol=1e-4, atol=1e-4)


def test_plan_from_a_file_and_unmatched_entries_warn(tmp_path, caplog):
    model, make, plan = _case("mlp")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"plan": {**plan, "encoder.missing": {"method": "svd", "low_rank": 2}}}))
    x = make()
    chosen = fxsketch.backend(plan=str(path), inner="eager")
    compiled = torch.compile(model, backend=chosen)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), fxsketch.rewrite(model, plan, x)(x), rtol=1e-5, atol=1e-5)
    assert chosen.unmatched() == ["encoder.missing"]
    warn_unmatched(chosen.unmatched)  # what runs at exit
    assert "encoder.missing" in caplog.text


class Branching(nn.Module):
    """Python control flow on a tensor's value: one graph cannot hold it; Dynamo splits it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 32), nn.Linear(32, 16), nn.Linear(32, 16)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) if h.sum() > 0 else self.c(h)


def test_a_model_split_by_a_branch_is_captured_by_the_backend_with_one_short_message(caplog, capfd, monkeypatch):
    torch.manual_seed(0)
    model, x = Branching().eval(), torch.rand(4, 8)
    with pytest.raises(fxsketch.CaptureError) as caught:
        fxsketch.capture(model, x)
    message = str(caught.value)
    assert len(message) < 500 and "h.sum() > 0" in message and 'backend="fxsketch"' in message
    assert "def forward" not in capfd.readouterr().err  # torch's partial graph is not printed
    plan = {name: {"method": "svd", "low_rank": 4} for name in ("a", "b", "c")}
    at_exit = []
    monkeypatch.setattr(importlib.import_module("fxsketch.backend").atexit, "register",
                        lambda *args: at_exit.append(args))
    chosen = fxsketch.backend(plan=plan, inner="eager")
    torch._dynamo.reset()
    with torch.no_grad(), caplog.at_level("WARNING"):
        out = torch.compile(model, backend=chosen)(x)
    assert chosen.unmatched() == ["c"]  # a and b were replaced, in different fragments; c never ran
    assert "plan entries" not in caplog.text  # nothing is warned about while fragments compile
    assert len(at_exit) == 1  # one check at exit, however many fragments compiled
    taken = nn.Sequential(model.a, nn.ReLU(), model.b)  # the branch this input takes, without the branch
    with torch.no_grad():
        expected = fxsketch.rewrite(taken, {"0": plan["a"], "2": plan["b"]}, x)(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_plan_from_a_result():
    model, make, plan = _case("mlp")
    x = make()
    result = fxsketch.optimize(model, fxsketch.LayerConfig("head", params={"low_rank": [2]}), example_inputs=x,
                               accuracy_fn=lambda m: 1.0, objective="flops", n_trials=1)
    compiled = torch.compile(model, backend=fxsketch.backend(plan=result, inner="eager"))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), result.graph_module(x), rtol=1e-5, atol=1e-5)
    # by name, a Result is its own plan: a second one whose plan reads alike gets its own backend
    backends = importlib.import_module("fxsketch.backend")._OPTION_BACKENDS
    for same_plan in (result, copy.copy(result)):
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model, backend="fxsketch", options={"plan": same_plan, "inner": "eager"})(x)
    assert sum(entry[1] is result for entry in backends.values()) == 1
    assert sum(entry[1] is not result and entry[1].plan == result.plan for entry in backends.values()) == 1


def test_backend_by_name_without_importing_fxsketch(tmp_path):
    code = """
import sys, torch
from torch import nn
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
plan = {"0": {"method": "svd", "low_rank": 16}}
c = torch.compile(m, backend="fxsketch", options={"plan": plan, "inner": "eager"})
x = torch.randn(3, 16)
with torch.no_grad():
    err = (c(x) - m(x)).abs().max().item()
print("ok", "fxsketch" in sys.modules, err < 1e-4)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ok", "True", "True"]


def test_unknown_backend_option_is_an_error():
    model, make, plan = _case("mlp")
    with pytest.raises(Exception, match="unknown fxsketch backend options"):
        torch.compile(model, backend="fxsketch", options={"plan": plan, "rank": 3})(make())


@pytest.mark.parametrize("source,name", [
    ("L['self']._modules['encoder']._modules['layer']._modules['0']._parameters['weight']", "encoder.layer.0.weight"),
    ("L['self'].encoder.layer[0]", "encoder.layer.0"),
    ("L['m']._modules['fc']", "fc"),
])
def test_qualified_names_from_dynamo_sources(source, name):
    assert qualified_name(source) == name
