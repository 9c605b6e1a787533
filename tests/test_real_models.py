"""Real Hugging Face models (random weights, tiny configs): capture, exact full-rank rewrite,
half-FLOPs rewrite saved and loaded in a fresh process, and the original never touched.

Every model is built from its config (no downloads) and captured once per module; HF models are
not `symbolic_trace`-able, so capture falls back to non-strict `torch.export`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass

import pytest
import torch

import fxsketch
from fxsketch.plan import plan_cost

transformers = pytest.importorskip("transformers")

NAMES = ("bert", "gpt2", "vit", "resnet")
BATCH, OTHER_BATCH = 2, 3
SEQ, VOCAB = 8, 64
RTOL = 1e-4


def _bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, attn_implementation="eager")
    return transformers.BertModel(cfg), lambda b: torch.randint(0, VOCAB, (b, SEQ))


def _gpt2(use_cache: bool = False):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
                                  eos_token_id=0, use_cache=use_cache, attn_implementation="eager")
    return transformers.GPT2Model(cfg), lambda b: torch.randint(0, VOCAB, (b, SEQ))


def _vit():
    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                 image_size=16, patch_size=4, num_channels=3, attn_implementation="eager")
    return transformers.ViTModel(cfg), lambda b: torch.randn(b, 3, 16, 16)


def _resnet():
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="basic")
    return transformers.ResNetModel(cfg), lambda b: torch.randn(b, 3, 32, 32)


def _bert_layers():
    per_layer = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense")
    return [(f"encoder.layer.{i}.{s}", "Linear") for i in range(2) for s in per_layer] + [("pooler.dense", "Linear")]


def _vit_layers():
    # transformers 5 names ViT's attention projections q/k/v/o_proj and its MLP fc1/fc2
    per_layer = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")
    return ([("embeddings.patch_embeddings.projection", "Conv2d")]
            + [(f"layers.{i}.{s}", "Linear") for i in range(2) for s in per_layer] + [("pooler.dense", "Linear")])


def _gpt2_layers():
    per_layer = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    return [(f"h.{i}.{s}", "Linear") for i in range(2) for s in per_layer]


def _resnet_layers():
    convs = ["embedder.embedder.convolution",
             "encoder.stages.0.layers.0.layer.0.convolution", "encoder.stages.0.layers.0.layer.1.convolution",
             "encoder.stages.1.layers.0.layer.0.convolution", "encoder.stages.1.layers.0.layer.1.convolution",
             "encoder.stages.1.layers.0.shortcut.convolution"]
    return [(c, "Conv2d") for c in convs]


SPECS = {
    # name: (builder, expected (qualified name, op type) in graph order, expected output keys)
    "bert": (_bert, _bert_layers, ("last_hidden_state", "pooler_output")),
    "gpt2": (_gpt2, _gpt2_layers, ("last_hidden_state",)),  # Conv1D: addmm on a weight stored (in, out)
    "vit": (_vit, _vit_layers, ("last_hidden_state", "pooler_output")),
    "resnet": (_resnet, _resnet_layers, ("last_hidden_state", "pooler_output")),
}


@dataclass
class Case:
    model: torch.nn.Module
    make_inputs: object
    x: torch.Tensor
    reference: dict
    state: dict
    gm: torch.fx.GraphModule
    records: list
    expected_layers: list
    output_keys: tuple


class _Cases(dict):
    """Models built, run and captured lazily, once per test module."""

    def __missing__(self, name):
        build, layers, keys = SPECS[name]
        torch.manual_seed(0)
        model, make_inputs = build()
        model.eval()
        x = make_inputs(BATCH)
        with torch.no_grad():
            reference = _tensors(model(x))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        gm = fxsketch.capture(model, x)
        case = Case(model, make_inputs, x, reference, state, gm, fxsketch.find_layers(gm), layers(), keys)
        self[name] = case
        return case


@pytest.fixture(scope="module")
def cases():
    return _Cases()


def _tensors(out) -> dict[str, torch.Tensor]:
    """A model output (ModelOutput, dict, tuple or tensor) as {key: tensor}."""
    if isinstance(out, torch.Tensor):
        return {"0": out}
    if isinstance(out, Mapping):
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    return {str(i): v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _assert_close(got: dict, want: dict, rtol: float = RTOL) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for key in want:
        assert got[key].shape == want[key].shape, (key, got[key].shape, want[key].shape)
        err = _rel_err(got[key], want[key])
        assert err < rtol, f"{key}: max relative error {err:.3g} >= {rtol}"


def _assert_unchanged(case: Case) -> None:
    now = case.model.state_dict()
    assert set(now) == set(case.state)
    for k, v in case.state.items():
        assert torch.equal(now[k], v), f"the original model's {k} changed"
    assert not case.model.training


def _supported(case: Case):
    return [r for r in case.records if not r.unsupported]


def _full_rank_plan(case: Case) -> dict:
    return {r.name: {"method": "svd", "low_rank": min(r.out_features, r.in_features)} for r in _supported(case)}


def _half_flops_plan(case: Case) -> dict:
    """Per layer, the rank R with R·(in+out) closest to in·out/2 (at least 1)."""
    plan = {}
    for r in _supported(case):
        rank = max(1, round(r.in_features * r.out_features / (2 * (r.in_features + r.out_features))))
        plan[r.name] = {"method": "svd", "low_rank": rank}
    return plan


def _fxsketch_calls(gm: torch.fx.GraphModule) -> int:
    """Nodes calling the fxsketch op family (the Python entry points or the registered ops), or a
    `LowRankLinear` (called as a module: it keeps its transposed factors between eager calls)."""
    entry_points = {fxsketch.kernels.lowrank_linear, fxsketch.kernels.lowrank_conv2d}
    return sum(1 for n in gm.graph.nodes if (n.op == "call_function" and (
        n.target in entry_points or str(n.target).startswith("fxsketch.lowrank_"))) or (
        n.op == "call_module" and type(gm.get_submodule(n.target)) is fxsketch.LowRankLinear))


# (1) capture ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_capture_falls_back_to_export_and_finds_the_expected_layers(cases, name):
    case = cases[name]
    assert case.gm.meta["fxsketch_tracer"] == "export"  # HF models defeat torch.fx.symbolic_trace
    assert [(r.name, r.op_type) for r in case.records] == case.expected_layers
    assert all(not r.unsupported for r in case.records)
    with torch.no_grad():
        _assert_close(_tensors(case.gm(case.x)), case.reference, rtol=1e-6)
    assert set(case.reference) == set(case.output_keys)


def test_bert_records_carry_shapes_and_token_counts(cases):
    records = {r.name: r for r in cases["bert"].records}
    assert records["encoder.layer.0.attention.self.query"].weight_shape == (16, 16)
    assert records["encoder.layer.1.intermediate.dense"].weight_shape == (32, 16)
    assert records["encoder.layer.0.output.dense"].tokens == BATCH * SEQ
    assert records["pooler.dense"].tokens == BATCH  # the pooler sees the [CLS] token only


def test_vit_patch_embedding_is_a_supported_conv(cases):
    (patch,) = [r for r in cases["vit"].records if r.op_type == "Conv2d"]
    assert patch.weight_shape == (16, 3, 4, 4)
    assert patch.conv["stride"] == (4, 4) and patch.conv["groups"] == 1 and not patch.unsupported
    assert patch.tokens == BATCH * (16 // 4) ** 2


def test_gpt2_conv1d_layers_are_matched_as_transposed_linears(cases):
    """GPT2 computes its projections with transformers' Conv1D: `addmm(bias, x, W)` with W stored
    (in, out). fxsketch records them as Linear layers of shape (out, in) with a transposed weight."""
    case = cases["gpt2"]
    c_attn = next(r for r in case.records if r.name == "h.0.attn.c_attn")
    assert c_attn.module_type == "Conv1D" and c_attn.transposed
    assert c_attn.weight_shape == (48, 16)  # q, k and v of width 16 each, from 16 inputs
    assert fxsketch.select(case.gm, {"type": "Conv1D"}) == [n for n, _ in case.expected_layers]


def test_gpt2_with_its_default_kv_cache_captures_and_rewrites():
    """Decoder models return a KV cache by default; capture registers transformers' cache types
    with export, so the cache passes through the rewritten model."""
    torch.manual_seed(0)
    model, make_inputs = _gpt2(use_cache=True)
    model.eval()
    ids = make_inputs(BATCH)
    gm = fxsketch.rewrite(model, {"h.0.mlp.c_fc": {"method": "svd", "low_rank": 16}}, ids)
    with torch.no_grad():
        out, ref = gm(ids), model(ids)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-4, atol=1e-5)
    assert out.past_key_values is not None


# (2) full-rank rewrite is exact ------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_full_rank_svd_rewrite_reproduces_the_outputs(cases, name):
    case = cases[name]
    plan = _full_rank_plan(case)
    assert len(plan) == len(case.expected_layers)
    new = fxsketch.rewrite(case.model, plan, case.x)
    assert _fxsketch_calls(new) == len(plan)
    assert fxsketch.find_layers(new) == []  # every dense Linear/Conv2d went
    x3 = case.make_inputs(OTHER_BATCH)  # captured with a dynamic batch: other sizes run too
    with torch.no_grad():
        _assert_close(_tensors(new(case.x)), case.reference)
        _assert_close(_tensors(new(x3)), _tensors(case.model(x3)))
    _assert_unchanged(case)


# (3) half-FLOPs rewrite, saved, loaded in a fresh process ----------------------------------------

_LOAD = textwrap.dedent("""
    import json, sys
    import torch, fxsketch
    from fxsketch.deploy import ArtifactError

    path, ref = sys.argv[1], sys.argv[2]
    report = {"transformers_imported_by_fxsketch": "transformers" in sys.modules}
    try:  # the output type (a ModelOutput) is a pytree node that transformers registers on import
        fxsketch.load(path)
        report["without_transformers"] = "loaded"
    except ArtifactError:
        report["without_transformers"] = "ArtifactError"
    import transformers.modeling_outputs  # noqa: F401  (`import transformers` alone is lazy: not enough)
    m = fxsketch.load(path)
    x, want = torch.load(ref)
    with torch.no_grad():
        out = m(x)
    got = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)} if hasattr(out, "items") else {"0": out}
    report["type"] = type(out).__name__
    report["keys"] = sorted(got)
    report["shapes"] = {k: list(v.shape) for k, v in got.items()}
    report["rel_err"] = {k: ((got[k] - want[k]).abs().max() / want[k].abs().max()).item() for k in want if k in got}
    report["plan_entries"] = len(m.meta["fxsketch"]["plan"])
    report["dynamic_dims"] = m.meta["fxsketch"]["dynamic_dims"]
    print(json.dumps(report))
""")


@pytest.mark.parametrize("name", NAMES)
def test_half_flops_rewrite_saves_and_loads_in_a_fresh_process(cases, name, tmp_path):
    case = cases[name]
    plan = _half_flops_plan(case)
    if case.records:
        dense = plan_cost(case.records, {}).flops
        half = plan_cost(case.records, plan).flops
        assert 0.4 < half / dense < 0.6, half / dense
    new = fxsketch.rewrite(case.gm, plan, case.x)  # an already captured module skips the tracers
    assert _fxsketch_calls(new) == len(plan)
    with torch.no_grad():
        out = _tensors(new(case.x))
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in case.reference.items()}
    assert all(torch.isfinite(v).all() for v in out.values())

    path = tmp_path / f"{name}.pt2"
    program = fxsketch.save(new, path, case.x)  # dynamic batch
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not plan or any(t.startswith("fxsketch.lowrank_") for t in targets)
    x3 = case.make_inputs(OTHER_BATCH)
    with torch.no_grad():
        want = _tensors(new(x3))
    torch.save((x3, want), tmp_path / "ref.pt")

    proc = subprocess.run([sys.executable, "-c", _LOAD, str(path), str(tmp_path / "ref.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["transformers_imported_by_fxsketch"]
    # without transformers the saved ModelOutput tree cannot be rebuilt: a clear ArtifactError, not a crash
    assert report["without_transformers"] in ("loaded", "ArtifactError")
    assert report["keys"] == sorted(case.output_keys)
    assert report["shapes"] == {k: list(v.shape) for k, v in want.items()}
    assert all(report["shapes"][k][0] == OTHER_BATCH for k in report["shapes"])
    assert max(report["rel_err"].values()) < RTOL, report["rel_err"]
    assert report["plan_entries"] == len(plan)
    assert 0 in report["dynamic_dims"][0]
    _assert_unchanged(case)


# (4) the original is never mutated ---------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_original_model_is_never_mutated(cases, name):
    case = cases[name]
    fxsketch.rewrite(case.gm, _half_flops_plan(case), case.x)
    _assert_unchanged(case)
    with torch.no_grad():
        for key, value in _tensors(case.model(case.x)).items():
            assert torch.equal(value, case.reference[key]), key
