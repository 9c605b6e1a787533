"""optimize's option groups: the new form, the moved keywords (deprecated, still working) and errors."""

from __future__ import annotations

import inspect
import warnings

import pytest

import fxsketch
from fxsketch import CalibrationOptions, LayerConfig, SearchOptions, StudyOptions
from fxsketch.options import LEGACY_KEYWORDS, merge_legacy
from tests.test_search import X, _agreement, _mlp

SPEC = LayerConfig({"type": "Linear", "range": [0, 2]}, params="auto")


def test_optimize_has_about_a_dozen_keywords():
    named = [p for p in inspect.signature(fxsketch.optimize).parameters.values() if p.kind != p.VAR_KEYWORD]
    assert len(named) <= 14, [p.name for p in named]


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
    (lambda: CalibrationOptions(recover_steps=-1), ValueError, r"recover_steps must be an int >= 0"),
    (lambda: CalibrationOptions(recover_lr=0.0), ValueError, r"recover_lr must be a positive number"),
    (lambda: CalibrationOptions(recover_loss_fn="mse"), TypeError, r"recover_loss_fn must be a callable"),
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
