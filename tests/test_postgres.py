"""Many workers, one study, on a real PostgreSQL server started (and stopped) by the test."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import optuna
import pytest

pytest.importorskip("psycopg", reason="the PostgreSQL driver is the optional extra fxsketch[postgres]")


def _binary(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pg_url():
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's postgresql package")
    root = Path(tempfile.mkdtemp(prefix="fxsketch-pg-"))  # under /tmp: the postgres user can reach it
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "fx"], check=True, capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
                   check=True, capture_output=True)
    url = f"postgresql+psycopg://fx@127.0.0.1:{port}/postgres"
    optuna.storages.RDBStorage(url)  # create the schema once, before workers race to do it
    yield url
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


WORKER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import fxsketch
    from test_workers import SPEC, X, accuracy, make_model
    fxsketch.optimize(make_model(), SPEC, example_inputs=X, accuracy_fn=accuracy, accuracy_threshold=0.9,
                      objective="flops", strategy="joint", n_trials={n}, storage={url!r}, study_name="shared",
                      load_if_exists=True, seed={seed})
""")


def test_three_workers_share_one_study_on_postgres(pg_url):
    tests = os.path.dirname(__file__)
    asked = [3, 4, 2]
    workers = [subprocess.Popen([sys.executable, "-c", WORKER.format(tests=tests, n=n, url=pg_url, seed=i)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i, n in enumerate(asked)]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="shared", storage=pg_url)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == len(study.trials)  # none left running
    # the space holds exactly the 9 plans asked for: a draw of a plan another worker holds is answered
    # from the study and not counted, so every counted trial is a distinct plan, and none is counted twice
    counted = [t for t in finished if "fxsketch.reused" not in t.user_attrs]
    plans = [json.dumps(t.params, sort_keys=True) for t in counted]
    assert len(plans) == len(set(plans)) and 1 <= len(counted) <= sum(asked)
    assert len({t.number for t in finished}) == len(finished)  # none duplicated, none lost
    import fxsketch
    from test_workers import SPEC, X, accuracy, make_model

    result = fxsketch.optimize(make_model(), SPEC, example_inputs=X, accuracy_fn=accuracy, accuracy_threshold=0.9,
                               objective="flops", strategy="joint", n_trials=1, storage=pg_url,
                               study_name="shared", load_if_exists=True, seed=9)
    scored = [t for t in optuna.load_study(study_name="shared", storage=pg_url).trials
              if t.state == optuna.trial.TrialState.COMPLETE and t.value != float("-inf")]
    best = max(scored, key=lambda t: (t.value, t.user_attrs["fxsketch.accuracy"]))
    assert result.plan == best.user_attrs["fxsketch.plan"]
