"""A trial whose accuracy function hangs fails with a clear note and the search goes on; `timeout`
bounds the trials' own calls too, not only when the next trial may start."""

from __future__ import annotations

import time

import pytest

import fxsketch
from conftest import MLP_X, agreement, mlp
from fxsketch import LayerConfig, SearchOptions
from fxsketch.metrics import TrialFailed, call_metric
from fxsketch.nn import LowRankLinear

SPEC = LayerConfig({"type": "Linear", "range": [0, 2]}, params="auto")


def _hanging_on(model, hang_when):
    accurate = agreement(model)
    calls = []

    def accuracy(m):
        calls.append(1)
        if hang_when(m, len(calls)):
            while True:  # a Python-level hang: never returns
                time.sleep(0.05)
        return accurate(m)
    return accuracy


def test_a_hanging_trial_fails_with_a_note_and_the_search_goes_on():
    model = mlp()
    accuracy = _hanging_on(model, lambda m, n: n == 3)  # the second trial (the first call is the dense model's)
    start = time.monotonic()
    result = fxsketch.optimize(model, SPEC, example_inputs=MLP_X, accuracy_fn=accuracy, accuracy_threshold=0.8,
                               n_trials=4, search=SearchOptions(objective="flops", seed=0, trial_timeout=1.0))
    assert time.monotonic() - start < 60
    failed = result.trials[result.trials["state"] == "FAIL"]
    assert list(failed["note"]) == ["accuracy_fn did not return within 1 s (the trial's time limit)"]
    assert (result.trials["state"] == "COMPLETE").sum() >= 2


def test_timeout_bounds_a_trial_that_never_returns():
    model = mlp()
    replaced = lambda m: any(isinstance(x, LowRankLinear) for x in m.modules())  # noqa: E731
    accuracy = _hanging_on(model, lambda m, n: replaced(m))  # every trial hangs; dense and validation do not
    start = time.monotonic()
    # the trial's limit is what is left of timeout=2 when it starts: 2 s, or 1.99 on a busy machine
    with pytest.raises(RuntimeError, match=r"every trial failed \(1\): 1× accuracy_fn did not return within (2|1\.9\d*) s"):
        fxsketch.optimize(model, SPEC, example_inputs=MLP_X, accuracy_fn=accuracy, accuracy_threshold=0.8,
                          n_trials=20, timeout=2, search=SearchOptions(objective="flops", seed=0))
    assert time.monotonic() - start < 30


def test_a_function_that_catches_every_exception_is_still_stopped():
    def stubborn(m):
        while True:
            try:
                time.sleep(0.05)
            except Exception:  # swallows whatever it can
                pass
    with pytest.raises(TrialFailed, match=r"accuracy_fn did not return within 0.2 s"):
        call_metric(stubborn, None, "accuracy_fn", 0.2)


def test_a_tensor_score_is_taken_with_a_note_once_and_other_shapes_are_refused(caplog):
    import torch

    def tensor_accuracy(model):
        return torch.tensor(0.75)

    with caplog.at_level("WARNING"):
        assert call_metric(tensor_accuracy, None, "accuracy_fn") == 0.75
        assert call_metric(tensor_accuracy, None, "accuracy_fn") == 0.75
    assert caplog.text.count("returned a tensor") == 1 and "float(acc)" in caplog.text
    with pytest.raises(TrialFailed, match="not a number"):
        call_metric(lambda m: torch.tensor([0.5, 0.7]), None, "accuracy_fn")
