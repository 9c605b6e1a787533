"""A study written by an earlier fxsketch still resumes: the trial attributes are a file format.

`fixtures/study_v0.1.json` holds the trials of a small search (layerwise with a calibrated warm
start, objective "flops") as written by fxsketch 0.1.0 before the search was split into modules.
It was made once with `python tests/test_study_format.py --write`; never regenerate it to make a
failing test pass: the point is that old studies keep working.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna
import torch

import fxsketch
from fxsketch import Categorical, LayerConfig
from conftest import agreement as _agreement, mlp as _model, MLP_X as X  # the suite's rank-6 MLP and its agreement

FIXTURE = Path(__file__).parent / "fixtures" / "study_v0.1.json"
SPEC = LayerConfig({"type": "Linear", "range": [0, 2]}, params={"low_rank": Categorical([2, 4, 8, 16])})


def _search(model: torch.nn.Module, storage: str, n_trials: int, resume: bool) -> fxsketch.Result:
    calibration = [(X[i:i + 32],) for i in range(0, 128, 32)]
    return fxsketch.optimize(model, SPEC, example_inputs=X, accuracy_fn=_agreement(model), accuracy_threshold=0.9,
                             objective="flops", n_trials=n_trials, seed=0, storage=storage, study_name="old",
                             load_if_exists=resume, calibration_data=calibration)


def _dump(study: optuna.Study) -> dict:
    trials = [{"number": t.number, "state": t.state.name, "value": t.value if len(study.directions) == 1 else None,
               "params": t.params,
               "distributions": {k: optuna.distributions.distribution_to_json(d) for k, d in t.distributions.items()},
               "user_attrs": t.user_attrs, "system_attrs": t.system_attrs}
              for t in study.get_trials(deepcopy=False)]
    return {"fxsketch_version": fxsketch.__version__, "direction": study.direction.name, "trials": trials}


def _load(data: dict, storage: str) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name="old", direction=data["direction"].lower())
    for t in data["trials"]:
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState[t["state"]], value=t["value"], params=t["params"],
            distributions={k: optuna.distributions.json_to_distribution(d) for k, d in t["distributions"].items()},
            user_attrs=t["user_attrs"], system_attrs=t["system_attrs"]))
    return study


def test_the_fixture_is_a_study_of_the_old_format():
    data = json.loads(FIXTURE.read_text())
    done = [t for t in data["trials"] if t["state"] == "COMPLETE"]
    assert data["fxsketch_version"] == "0.1.0" and len(done) >= 6
    keys = set().union(*(t["user_attrs"] for t in done))
    assert {"fxsketch.unit", "fxsketch.entry", "fxsketch.accuracy", "fxsketch.speed", "fxsketch.score"} <= keys
    assert any("fxsketch.plan" in t["user_attrs"] for t in done)  # whole-model (warm-start) trials too


def test_a_study_written_by_the_old_code_resumes_without_repeating_a_configuration(tmp_path):
    data = json.loads(FIXTURE.read_text())
    storage = f"sqlite:///{tmp_path / 'old.db'}"
    _load(data, storage)
    model = _model()
    result = _search(model, storage, n_trials=4, resume=True)
    old = len(data["trials"])
    new = result.trials.iloc[old:]
    assert new["counted"].sum() == 4  # a reused draw is not counted
    evaluated = new[~new["note"].astype(str).str.contains("reused|pruned", regex=True)]
    # every configuration the old study holds is recalled, never evaluated again
    held = {(t["user_attrs"].get("fxsketch.unit"), json.dumps(t["user_attrs"].get("fxsketch.entry"), sort_keys=True))
            for t in data["trials"] if t["state"] == "COMPLETE" and "fxsketch.entry" in t["user_attrs"]}
    for _, row in evaluated.iterrows():
        entry = {k: row[k] for k in ("method", "low_rank") if k in row and row[k] == row[k]}
        assert (row["layer"], json.dumps(entry, sort_keys=True)) not in held, row
    assert result.plan and result.accuracy >= 0.9
    x = torch.randn(5, 32)
    assert result.graph_module(x).shape == (5, 8)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{folder}/old.db"
        _search(_model(), url, n_trials=8, resume=False)
        study = optuna.load_study(study_name="old", storage=url)
        FIXTURE.parent.mkdir(exist_ok=True)
        FIXTURE.write_text(json.dumps(_dump(study), indent=1, sort_keys=True) + "\n")
        print(f"wrote {FIXTURE} ({len(study.trials)} trials)")
