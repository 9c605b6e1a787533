"""fxsketch.options, optimize's option groups: the new form, the moved keywords (deprecated, still working)
and errors; and what the groups pass through to allocation and recovery, and rewrite(sequential=True)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn

import fxsketch
from fxsketch import CalibrationOptions, LayerConfig, SearchOptions, StudyOptions
from fxsketch.options import LEGACY_KEYWORDS, merge_legacy
from fxsketch.study_format import UNIT as UNIT_ATTR
from fxsketch.study_format import WHOLE_MODEL as JOINT_KEY
from conftest import agreement as _agreement, mlp as _mlp, MLP_X as X

SPEC = LayerConfig({"type": "Linear", "range": [0, 2]}, params="auto")


def test_optimize_has_about_a_dozen_keywords():
    named = [p for p in inspect.signature(fxsketch.optimize).parameters.values() if p.kind != p.VAR_KEYWORD]
    assert len(named) <= 15, [p.name for p in named]  # the twelve of the issue, verbose, progress, experiment_dir


@pytest.mark.parametrize("keyword", sorted(LEGACY_KEYWORDS))
def test_every_moved_keyword_still_works_with_a_deprecation_warning(keyword):
    group = LEGACY_KEYWORDS[keyword]
    cls = type(merge_legacy({}, {})[group])
    value = getattr(cls(), keyword)  # its default: valid by construction
    with pytest.warns(DeprecationWarning, match=rf"{keyword}.*{group}={cls.__name__}\({keyword}=\.\.\.\)"):
        groups = merge_legacy({}, {keyword: value})
    assert groups[group] == cls(**{keyword: value})


def test_moved_keywords_give_the_same_search_as_the_option_groups(tmp_path):
    model = _mlp()
    common = dict(example_inputs=X, accuracy_fn=_agreement(model), accuracy_threshold=0.8, n_trials=4)
    new = fxsketch.optimize(model, SPEC, **common, search=SearchOptions(objective="flops", seed=0, max_flops=0.9),
                            study=StudyOptions(storage=f"sqlite:///{tmp_path / 'a.db'}", study_name="a"))
    with pytest.warns(DeprecationWarning):
        old = fxsketch.optimize(model, SPEC, **common, objective="flops", seed=0, max_flops=0.9,
                                storage=f"sqlite:///{tmp_path / 'b.db'}", study_name="a")
    assert old.plan == new.plan and old.accuracy == new.accuracy
    assert old.trials.drop(columns="duration_s").equals(new.trials.drop(columns="duration_s"))


def test_the_option_groups_do_not_warn():
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        fxsketch.optimize(model, SPEC, example_inputs=X, accuracy_fn=_agreement(model), accuracy_threshold=0.8,
                          n_trials=2, search=SearchOptions(objective="flops", seed=0),
                          calibration=CalibrationOptions(refit=False), study=StudyOptions())


def test_a_keyword_given_twice_an_unknown_keyword_and_a_wrong_group_are_errors():
    model = _mlp()
    args = dict(example_inputs=X, accuracy_fn=_agreement(model), n_trials=2)
    with pytest.raises(TypeError, match=r"\['objective'\] given both as keyword\(s\) and in search="):
        fxsketch.optimize(model, SPEC, **args, search=SearchOptions(), objective="flops")
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['n_trial'\].*search=SearchOptions"):
        fxsketch.optimize(model, SPEC, **args, n_trial=3)
    with pytest.raises(TypeError, match=r"study= must be a fxsketch.StudyOptions, got dict"):
        fxsketch.optimize(model, SPEC, **args, study={"storage": None})


@pytest.mark.parametrize("make, error, match", [
    (lambda: SearchOptions(objective="speed"), ValueError, r"objective must be one of \('latency', 'flops'\)"),
    (lambda: SearchOptions(strategy="greedy"), ValueError, r"strategy must be one of"),
    (lambda: SearchOptions(objectives=("accuracy",)), ValueError, r"objectives must be \('accuracy', 'speed'\)"),
    (lambda: SearchOptions(seed=1.5), TypeError, r"seed must be None or an int"),
    (lambda: SearchOptions(callbacks=[3]), TypeError, r"callbacks must be callables"),
    (lambda: SearchOptions(warm_start="yes"), TypeError, r"warm_start must be True or False"),
    (lambda: SearchOptions(tune_allocator=1), TypeError, r"tune_allocator must be True or False, got 1"),
    (lambda: CalibrationOptions(sequential="yes"), TypeError, r"sequential must be True or False"),
    (lambda: CalibrationOptions(recover_steps=-1), ValueError, r"recover_steps must be an int >= 0"),
    (lambda: CalibrationOptions(recover_lr=0.0), ValueError, r"recover_lr must be a positive number"),
    (lambda: CalibrationOptions(recover_loss_fn="mse"), TypeError, r"recover_loss_fn must be a callable"),
    (lambda: CalibrationOptions(recover_at="later"), ValueError, r"recover_at must be one of \('each', 'finish'\)"),
    (lambda: CalibrationOptions(recover_at="finish"), ValueError, r"recover_at='finish'.*set recover_steps > 0"),
    (lambda: CalibrationOptions(recover_schedule="linear"), ValueError, r"recover_schedule must be 'constant' or"),
    (lambda: CalibrationOptions(recover_data=torch.ones(4, 3)), TypeError,
     r"recover_data must be None or an iterable of input batches, got Tensor"),
    (lambda: CalibrationOptions(recover_data=[]), ValueError, r"recover_data is empty"),
    (lambda: CalibrationOptions(recover_taps=[1, 2]), TypeError, r"recover_taps must be None, node names or a callable"),
    (lambda: StudyOptions(n_workers=0), ValueError, r"n_workers must be a positive integer"),
    (lambda: StudyOptions(study_name=3), TypeError, r"study_name must be None or a string"),
    (lambda: StudyOptions(heartbeat_interval=-1), ValueError, r"heartbeat_interval must be None or a positive"),
])
def test_option_groups_check_their_values_when_made(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_option_groups_are_frozen():
    options = SearchOptions()
    with pytest.raises(AttributeError):
        options.objective = "flops"


# --------------------------------------------------------------------------- pass-throughs to allocation and recovery


"""optimize's pass-throughs to allocation and recovery, and rewrite(sequential=True)."""


D = 32


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 4)).eval()


def _batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(8, D, generator=torch.Generator().manual_seed(7))
    return [(torch.randn(64, 8, generator=g) @ mix + 0.05 * torch.randn(64, D, generator=g),) for _ in range(n)]


def _first_warm_plan(result):
    for t in result.study.trials:
        entry = t.user_attrs.get("fxsketch.plan") or t.user_attrs.get("fxsketch.entry")
        if t.user_attrs.get(UNIT_ATTR) == JOINT_KEY and isinstance(entry, dict):
            return entry
    raise AssertionError("no whole-model warm-start trial")


def _run(model, **kw):
    x = _batches(1, seed=5)[0][0]
    spec = fxsketch.LayerConfig(["0", "2"], params="auto")
    return fxsketch.optimize(model, spec, example_inputs=x, accuracy_fn=lambda m: 1.0, accuracy_threshold=0.5,
                             objective="flops", n_trials=6, seed=0, calibration_data=_batches(), **kw)


def test_allocation_sensitivity_moves_the_warm_start_budget_to_the_weighted_layer():
    model = _model()
    plain = _first_warm_plan(_run(model, allocation_sensitivity=None))
    heavy = _first_warm_plan(_run(model, allocation_sensitivity={"0": 1e6, "2": 1e-6}))
    rank = lambda plan, n: plan.get(n, {}).get("low_rank", 10**9)  # noqa: E731  (dense: the largest)
    assert rank(heavy, "0") >= rank(plain, "0")
    assert rank(heavy, "2") <= rank(plain, "2")
    assert (rank(heavy, "0"), rank(heavy, "2")) != (rank(plain, "0"), rank(plain, "2"))


@pytest.mark.parametrize("given", [{"allocation_sensitivity": "output"}, {}], ids=["output", "default"])
def test_measured_allocation_sensitivity_is_probed_once_and_reused(monkeypatch, given):
    """"output" (the default with calibration data) is measured once, at half the FLOPs, and every
    warm-start allocation reuses it (as per-layer weights) instead of probing again."""
    import sys

    alloc = sys.modules["fxsketch.allocate"]  # the module (fxsketch.allocate is also the function)
    calls, weights = [], []
    probe, allocate_units = alloc.unit_weights, alloc.allocate_units

    def counting_probe(*args, **kw):
        calls.append((args[4], kw.get("share")))
        return probe(*args, **kw)

    def recording_allocate(*args, sensitivity=None, **kw):
        weights.append(sensitivity)
        return allocate_units(*args, sensitivity=sensitivity, **kw)

    monkeypatch.setattr(alloc, "unit_weights", counting_probe)  # called by the allocator
    monkeypatch.setattr("fxsketch.search.warm.unit_weights", counting_probe)  # and by the search
    monkeypatch.setattr("fxsketch.search.warm.allocate_units", recording_allocate)
    result = _run(_model(), **given)
    assert result.plan and _first_warm_plan(result)
    probes = [c for c in calls if not isinstance(c[0], dict)]  # a mapping is only read, not probed
    assert probes == [("output", 0.5)] and len(calls) > 1
    assert len(weights) >= 2 and all(isinstance(w, dict) and set(w) == {"0", "2"} for w in weights)


def test_recover_loss_fn_is_used_for_distillation():
    calls = []

    def loss(outputs, targets, inputs):
        calls.append(1)
        return (outputs - targets).square().mean()

    _run(_model(), recover_steps=3, recover_lr=1e-3, recover_loss_fn=loss)
    assert len(calls) >= 3


def test_rewrite_sequential_flag_matches_rewrite_sequential():
    model, batches = _model(), _batches()
    plan = {"0": {"method": "whitened_svd", "low_rank": 4}, "2": {"method": "whitened_svd", "low_rank": 4}}
    x = batches[0][0]
    flagged = fxsketch.rewrite(model, plan, (x,), calibration_data=batches, sequential=True)
    direct = fxsketch.rewrite_sequential(model, plan, batches, (x,))
    independent = fxsketch.rewrite(model, plan, (x,), calibration_data=batches)
    held = _batches(1, seed=9)[0][0]
    with torch.no_grad():
        ref = model(held)
        torch.testing.assert_close(flagged(held), direct(held))
        err = lambda m: float((m(held) - ref).square().sum() / ref.square().sum())  # noqa: E731
        assert err(flagged) <= err(independent) * 1.0001
    with pytest.raises(ValueError, match="calibration_data"):
        fxsketch.rewrite(model, plan, (x,), sequential=True)


def test_unweighted_allocations_probe_nothing_and_auto_needs_no_calibration(monkeypatch):
    def no_probe(*args, **kw):
        raise AssertionError("allocation_sensitivity=None must not probe the model")

    monkeypatch.setattr("fxsketch.search.warm.unit_weights", no_probe)
    assert _run(_model(), allocation_sensitivity=None).plan is not None
    x = _batches(1, seed=5)[0][0]
    result = fxsketch.optimize(_model(), fxsketch.LayerConfig(["0", "2"], params="auto"), example_inputs=x,
                               accuracy_fn=lambda m: 1.0, accuracy_threshold=0.5, objective="flops", n_trials=3, seed=0)
    assert result.plan is not None  # the default "auto" asks for no calibration data
    assert fxsketch.SearchOptions().sensitivity == "output"
    assert fxsketch.SearchOptions(allocation_sensitivity=None).sensitivity is None
