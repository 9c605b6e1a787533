"""fxsketch.search.run: opening a stored study (SQLite) and resuming it without repeating configurations,
Ctrl-C returning the best plan so far, and the experiment folder."""

from __future__ import annotations

import math

import optuna
import pytest
import torch

import fxsketch
from fxsketch import Categorical, LayerConfig
from conftest import agreement as _agreement, mlp as _mlp, MLP_X as X, replaced as _replaced, run_search as _run



def _counting(model):
    """An accuracy function of `model` that records each call, and the list it records into."""
    base, calls = _agreement(model), []

    def counting(m):
        calls.append(1)
        return base(m)
    return counting, calls

def test_sqlite_storage_resume_adds_trials_without_repeating_configurations(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    first = _run(storage=url, study_name="s", n_trials=4)
    assert len(first.trials) == 4
    with pytest.raises(ValueError, match="load_if_exists=True"):
        _run(storage=url, study_name="s", n_trials=4)
    model = _mlp()
    counting, calls = _counting(model)

    resumed = _run(model, storage=url, study_name="s", n_trials=4, load_if_exists=True, accuracy_fn=counting)
    # this call's 4 trials are 4 configurations the study did not hold (a draw of a stored one is
    # answered from the study, marked, and not counted), added to the stored ones
    evaluated = resumed.trials[resumed.trials["counted"]]
    assert len(evaluated) == 8 and evaluated.groupby("layer").size().to_dict() == {"0": 4, "2": 4}
    assert not evaluated.duplicated(subset=["layer", "method", "low_rank"]).any()
    assert len(calls) == 1 + 4 + len(resumed.validation)  # stored configurations are not re-run



def test_resume_with_a_lower_threshold_times_the_trials_it_had_skipped(tmp_path):
    """Under a high threshold, trials that miss it are not timed (speed NaN). Resumed with a lower
    threshold, the same values are reused but now feasible: their speed is measured, not NaN."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = LayerConfig({"type": "Linear", "range": [0, 2]},
                       params={"method": Categorical(["svd"]), "low_rank": Categorical([2, 4])})
    first = _run(spec=spec, storage=url, study_name="s", objective="latency", accuracy_threshold=0.999,
                 n_trials=6)
    done = first.trials[first.trials["state"] == "COMPLETE"]
    assert done["speed"].isna().any()  # infeasible under 0.999: not timed
    resumed = _run(spec=spec, storage=url, study_name="s", objective="latency", accuracy_threshold=0.0,
                   n_trials=4, load_if_exists=True)
    new = resumed.trials.iloc[len(first.trials):]
    reused = new[new["note"].str.contains("reused", na=False)]
    assert len(reused) and (reused["state"] == "COMPLETE").all()
    assert reused["speed"].map(math.isfinite).all() and (reused["speed"] > 0).all()
    assert math.isfinite(resumed.speedup)
    # tiny layers may run slower low-rank than dense on this machine: then the model stays dense, and says so
    assert resumed.plan or any("no plan was faster than dense" in n for n in resumed.notes)



def test_ctrl_c_returns_the_best_plan_so_far_and_the_study_resumes(tmp_path, caplog):
    model = _mlp()
    base = _agreement(model)
    calls = {"n": 0}

    def interrupt_on_fourth(m):
        if _replaced(m):
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
        return base(m)

    url = f"sqlite:///{tmp_path / 's.db'}"
    result = _run(model, accuracy_fn=interrupt_on_fourth, storage=url, study_name="s", n_trials=8)
    done = (result.trials["state"] == "COMPLETE").sum()
    assert done >= 3 and (result.trials["state"] == "FAIL").sum() == 1  # the interrupted trial
    assert f"interrupted after {done} finished trials" in caplog.text and "load_if_exists=True" in caplog.text
    resumed = _run(model, storage=url, study_name="s", n_trials=2, load_if_exists=True)
    new = resumed.trials.iloc[len(result.trials):]
    assert new["counted"].sum() == 2  # two counted trials (a reused draw is not counted)
    assert (resumed.trials["state"] == "COMPLETE").sum() >= done + 1



def test_ctrl_c_before_any_trial_says_how_to_resume():
    model = _mlp()
    base = _agreement(model)

    def interrupt(m):
        if _replaced(m):
            raise KeyboardInterrupt
        return base(m)

    with pytest.raises(KeyboardInterrupt, match="pass storage="):
        _run(model, accuracy_fn=interrupt)



def test_experiment_dir_keeps_the_study_the_best_plan_and_model(tmp_path):
    model = _mlp()
    first = _run(model, experiment_dir=tmp_path, n_trials=4)
    assert {p.name for p in tmp_path.iterdir()} >= {"study.db", "best_plan.json", "best_model.pt2", "factors"}
    assert fxsketch.load_plan(tmp_path / "best_plan.json") == first.plan
    loaded = fxsketch.load(tmp_path / "best_model.pt2")
    with torch.no_grad():
        torch.testing.assert_close(loaded(X[:5]), first.graph_module(X[:5]))
    again = _run(model, experiment_dir=tmp_path, n_trials=2)  # resumes the same study
    assert again.trials["counted"].sum() == 6  # a reused draw is not counted


def test_a_resumed_study_spends_its_trials_on_configurations_it_does_not_hold(tmp_path):
    """8 possible ranks, 4 trials, then 4 more on the same study: 8 distinct configurations are
    evaluated; a draw of one the study holds is answered from it and not counted."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = LayerConfig("2", params={"method": Categorical(["svd"]), "low_rank": Categorical([2, 4, 6, 8, 10, 12, 14, 16])})
    model = _mlp()
    counting, calls = _counting(model)

    first = _run(model, spec=spec, storage=url, study_name="s", n_trials=4, accuracy_fn=counting)
    second = _run(model, spec=spec, storage=url, study_name="s", n_trials=4, accuracy_fn=counting,
                  load_if_exists=True)
    evaluated = second.trials[second.trials["counted"]]
    assert len(evaluated) == 8 and sorted(evaluated["low_rank"]) == [2, 4, 6, 8, 10, 12, 14, 16]
    reused = second.trials[~second.trials["counted"]]
    assert all(n.endswith("not counted against n_trials") for n in reused["note"])
    line = next(line for line in second.summary().splitlines() if line.startswith("trials"))
    assert line.startswith("trials       8 (") and (not len(reused) or f"; {len(reused)} more drew values" in line)
    trial_calls = len(calls) - len(first.validation) - len(second.validation) - 2  # minus dense and validations
    assert trial_calls == 8


def test_a_search_finishing_on_the_same_trials_returns_the_plan_the_study_holds(tmp_path):
    """Processes sharing a study agree: the finished plan is written to the study, and a later
    finish on the same evaluated trials returns it (no second validation or back-off deciding
    otherwise on another timing)."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = LayerConfig("2", params={"method": Categorical(["svd"]), "low_rank": Categorical([4, 8])})
    model = _mlp()
    first = _run(model, spec=spec, storage=url, study_name="s", n_trials=2, objective="latency")
    held = optuna.load_study(study_name="s", storage=url).user_attrs["fxsketch.finished"]
    assert held["plan"] == first.plan and held["basis"]["trials"] == 2
    second = _run(model, spec=spec, storage=url, study_name="s", n_trials=2, objective="latency",
                  load_if_exists=True)  # both ranks are held: nothing new is evaluated
    assert second.plan == first.plan and second.accuracy == first.accuracy
    assert second.validation[-1]["source"] == "the plan this study holds as finished, on the same trials"
