"""fxsketch.search.context, the trial context: candidates share the captured model's weights instead of
copying them (the tuning loop's per-trial cost on large models); an accuracy function that trains its model
in place is stopped with a clear error, and the user's own model is never touched. The latency objective's
per-trial cost: per-layer estimates, no timing of infeasible trials, the returned plan timed on the whole
model; and the sensitivity table's closed form without calibration."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxsketch
from fxsketch import Categorical, LayerConfig
from fxsketch.replacements import FactorCache
from fxsketch.rewrite import apply_plan
from conftest import wide_mlp as _wide, WIDE_X as X


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.BatchNorm1d(32), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))



def test_share_weights_shares_kept_parameters_but_copies_buffers():
    gm = fxsketch.capture(_model(), (torch.randn(8, 16),))
    records = {r.name: r for r in fxsketch.find_layers(gm)}
    plan = {"3": {"method": "svd", "low_rank": 4}}
    cache = fxsketch.replacements.FactorCache()
    shared = apply_plan(gm, records, plan, cache, share_weights=True)
    copied = apply_plan(gm, records, plan, cache)
    w, ws, wc = (m.get_submodule("0").weight for m in (gm, shared, copied))
    assert ws.data_ptr() == w.data_ptr() and wc.data_ptr() != w.data_ptr()
    shared.double()  # casting (or moving) the trial's model swaps only its own parameters
    assert w.dtype == torch.float32 and ws.dtype == torch.float64
    shared.float()
    assert shared.get_submodule("2").running_mean is not gm.get_submodule("2").running_mean
    gm.eval(), shared.eval(), copied.eval()
    x = torch.randn(5, 16)
    torch.testing.assert_close(shared(x), copied(x))



def test_accuracy_fn_that_trains_in_place_is_stopped_and_the_users_model_is_untouched():
    model = _model().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(64, 16)
    calls = []

    def training_accuracy(m):
        calls.append(1)
        if len(calls) == 3:  # the second trial trains the candidate it was given
            opt = torch.optim.SGD(m.parameters(), lr=0.1)
            m(x).square().mean().backward()
            opt.step()
        return 1.0

    spec = fxsketch.LayerConfig(["3", "5"], params={"low_rank": fxsketch.Categorical([2, 4, 8])})
    with pytest.raises(RuntimeError, match=r"changed the weights of the model it was given in place"):
        fxsketch.optimize(model, spec, example_inputs=x, accuracy_fn=training_accuracy, objective="flops",
                          n_trials=6, seed=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k



def test_evaluation_in_train_mode_does_not_leak_batchnorm_stats_between_trials():
    """Buffers stay per trial: a model left in train mode updates only its own candidate's stats."""
    model = _model().train()
    x = torch.randn(64, 16)
    seen = []

    def accuracy(m):
        m(x)  # train mode: BatchNorm updates running stats of this candidate
        seen.append(m.get_submodule("2").running_mean.clone())
        return 1.0

    spec = fxsketch.LayerConfig(["5"], params={"low_rank": fxsketch.Categorical([1, 2, 3])})
    fxsketch.optimize(model, spec, example_inputs=x, accuracy_fn=accuracy, objective="flops", n_trials=3, seed=0)
    # each trial's candidate started from the same (captured) stats, so after one identical
    # forward they hold the same values
    for stats in seen[1:4]:
        torch.testing.assert_close(stats, seen[1])



def test_accuracy_fn_may_cast_its_model_and_the_returned_model_owns_its_weights():
    model = _model().eval()
    x = torch.randn(64, 16)

    def accuracy(m):
        m.double()  # e.g. evaluation in another dtype or on another device
        m(x.double())
        return 1.0

    spec = fxsketch.LayerConfig(["3", "5"], params={"low_rank": fxsketch.Categorical([2, 4, 8])})
    result = fxsketch.optimize(model, spec, example_inputs=x, accuracy_fn=accuracy, objective="flops",
                               n_trials=6, seed=0)
    assert result.plan
    gm = result.graph_module
    assert all(p.dtype == torch.float32 for p in gm.parameters())  # rebuilt, not a trial's model
    with torch.no_grad():
        before = [p.clone() for p in model.parameters()]
        for p in gm.parameters():
            p.add_(1.0)  # fine-tuning the result touches nothing else
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))



def _low_rank_fails(model: nn.Module):
    """Accuracy = agreement with the dense model; rank 1 keeps little of it, rank 64 all of it."""
    with torch.no_grad():
        ref = model(X).argmax(1)
    return lambda m: (m(X).argmax(1) == ref).float().mean().item()



@pytest.mark.usefixtures("one_thread")
def test_latency_objective_times_feasible_trials_only_and_the_result_on_the_whole_model():
    model = _wide()
    spec = LayerConfig(["2"], params={"low_rank": Categorical([1, 64])})
    result = fxsketch.optimize(model, spec, example_inputs=X, accuracy_fn=_low_rank_fails(model),
                               accuracy_threshold=0.9, objective="latency", n_trials=2, seed=0)
    done = result.trials[result.trials["state"] == "COMPLETE"].set_index("low_rank")
    assert set(done.index) == {1, 64}
    assert done.loc[1, "accuracy"] < 0.9 and math.isnan(done.loc[1, "speed"]) and done.loc[1, "score"] == -math.inf
    assert done.loc[64, "accuracy"] >= 0.9 and math.isfinite(done.loc[64, "speed"]) and done.loc[64, "speed"] > 0
    assert result.plan == {"2": {"method": "svd", "low_rank": 64, "precision": "float"}}
    assert result.speedup > 0 and result.speedup_estimate == done.loc[64, "speed"]
    assert "per-layer estimate" in result.summary()



@pytest.mark.usefixtures("one_thread")
def test_flops_objective_has_no_latency_estimate():
    model = _wide()
    result = fxsketch.optimize(model, LayerConfig(["2"], params={"low_rank": Categorical([64])}), example_inputs=X,
                               accuracy_fn=_low_rank_fails(model), accuracy_threshold=0.5, objective="flops",
                               n_trials=1, seed=0)
    assert result.speedup_estimate is None and result.plan



@pytest.mark.usefixtures("one_thread")
def test_sensitivity_without_calibration_matches_the_output_errors():
    model = _wide()
    result = fxsketch.optimize(model, LayerConfig(["2", "4"], params={"low_rank": Categorical([64])}),
                               example_inputs=X, accuracy_fn=lambda m: 1.0, accuracy_threshold=0.5,
                               objective="flops", n_trials=2, seed=0)
    table = result.sensitivity.set_index("layer")
    for name in ("2", "4"):  # a nearly rank-8 weight and a random one
        weight = model[int(name)].weight.detach()
        expected = FactorCache().output_errors(name, "svd", weight, [26, 51, 128, 256])
        got = [table.loc[name, c] for c in ("err@5%", "err@10%", "err@25%", "err@50%")]
        assert all(math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-6) for a, b in zip(got, expected)), (got, expected)
        assert got == sorted(got, reverse=True)
    assert table.loc["2", "rank<1%"] <= 8 < table.loc["4", "rank<1%"]
