"""Load test of shared studies: do parallel searches lose a trial or spend one on a repeated configuration?

Three setups, each asking for N trials per process on one study whose space is much larger than
the trials (two layers, ranks 1..48 each):

  sqlite x3     three separate `fxsketch.optimize` processes on one SQLite file
  postgres x3   the same on a PostgreSQL server started here (skipped without the server binaries
                or the psycopg driver; the reason is printed)
  n_workers=3   one call spreading its trials over three worker processes (a journal file)

For each it prints: requested (counted trials asked for), finished (counted trials in the study),
failed, lost (requested - finished, never negative: more is "extra"), repeated (counted trials
that evaluated a configuration another counted trial had evaluated), and draws answered from the
study (not counted). The bar: 0 lost and 0 repeated.

Run:  python benchmarks/bench_workers_load.py [--trials N] [--no-postgres]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
from torch import nn

import fxsketch
from fxsketch.workers import open_storage

HERE = Path(__file__).resolve().parent
SPEC = {"layers": [{"layer_names": {"type": "Linear", "range": [0, 2]},
                    "params": {"method": ["svd"], "low_rank": {"type": "int", "low": 1, "high": 48}}}]}
X = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 48), nn.ReLU(), nn.Linear(48, 4)).eval()


def accuracy(model: nn.Module) -> float:
    """Agreement with the dense model's predictions (module level: worker processes import it)."""
    with torch.no_grad():
        return float((model(X).argmax(1) == make_model()(X).argmax(1)).float().mean())


def search(storage: str, study: str, trials: int, workers: int = 1) -> None:
    fxsketch.optimize(make_model(), SPEC, example_inputs=X, accuracy_fn="bench_workers_load:accuracy",
                      accuracy_threshold=0.5, n_trials=trials,
                      search=fxsketch.SearchOptions(objective="flops"),
                      study=fxsketch.StudyOptions(storage=storage, study_name=study, load_if_exists=True,
                                                  n_workers=workers))


def separate_processes(storage: str, trials: int, processes: int = 3) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    optuna.create_study(storage=storage, study_name="load", directions=["maximize"], load_if_exists=True)
    running = [subprocess.Popen([sys.executable, __file__, "--worker", storage, str(trials)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for _ in range(processes)]
    for p in running:
        _, err = p.communicate(timeout=1800)
        if p.returncode:
            print(f"  a process exited with {p.returncode}: {err.strip().splitlines()[-1:]}", flush=True)


def count(storage: str, requested: int) -> dict:
    study = optuna.load_study(study_name="load", storage=open_storage(storage))
    trials = study.get_trials(deepcopy=False)
    counted = [t for t in trials if "fxsketch.reused" not in t.user_attrs and t.state.is_finished()]
    configs = [(t.user_attrs.get("fxsketch.unit"), json.dumps(t.params, sort_keys=True)) for t in counted
               if t.state != optuna.trial.TrialState.FAIL]
    return dict(requested=requested, finished=len(counted),
                failed=sum(t.state == optuna.trial.TrialState.FAIL for t in counted),
                lost=max(0, requested - len(counted)), repeated=len(configs) - len(set(configs)),
                answered=sum("fxsketch.reused" in t.user_attrs for t in trials),
                running=sum(t.state == optuna.trial.TrialState.RUNNING for t in trials))


def postgres(root: Path) -> tuple[str | None, str]:
    """A throw-away PostgreSQL server's URL (or None and why not), and how to stop it."""
    try:
        import psycopg  # noqa: F401  (the optional postgres extra)
    except ImportError:
        return None, "the psycopg driver is not installed (pip install 'fxsketch[postgres]')"

    def binary(name: str) -> str | None:
        found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
        return found if isinstance(found, str) else (found[-1] if found else None)

    initdb, pg_ctl = binary("initdb"), binary("pg_ctl")
    if not initdb or not pg_ctl:
        return None, "no PostgreSQL server binaries (initdb, pg_ctl)"
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, initdb, "-D", str(root / "data"), "-A", "trust", "-U", "fx"], check=True,
                   capture_output=True)
    subprocess.run([*as_user, pg_ctl, "-D", str(root / "data"), "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
                    "-l", str(root / "log"), "-w", "start"], check=True, capture_output=True)
    url = f"postgresql+psycopg://fx@127.0.0.1:{port}/postgres"
    optuna.storages.RDBStorage(url)  # the schema once, before the processes race to create it
    return url, " ".join([*as_user, pg_ctl, "-D", str(root / "data"), "-m", "immediate", "stop"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="trials per process (default 10)")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("STORAGE", "TRIALS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        search(args.worker[0], "load", int(args.worker[1]))
        return
    rows = []
    root = Path(tempfile.mkdtemp(prefix="fxsketch-load-"))
    setups = [("sqlite x3", lambda: (f"sqlite:///{root / 'study.db'}", None, ""))]
    if not args.no_postgres:
        def pg():
            url, stop = postgres(Path(tempfile.mkdtemp(prefix="fxsketch-pg-")))  # its own: postgres must reach it
            return url, stop, "" if url else stop
        setups.append(("postgres x3", pg))
    for name, make in setups:
        storage, stop, why = make()
        if storage is None:
            print(f"  {name}: skipped: {why}", flush=True)
            continue
        start = time.perf_counter()
        try:
            separate_processes(storage, args.trials)
            rows.append((name, count(storage, 3 * args.trials), time.perf_counter() - start))
        finally:
            if stop:
                subprocess.run(stop.split(), capture_output=True)
    journal = f"journal:///{root / 'study.log'}"
    start = time.perf_counter()
    search(journal, "load", 3 * args.trials, workers=3)
    rows.append(("n_workers=3", count(journal, 3 * args.trials), time.perf_counter() - start))
    header = ("case", "requested", "finished", "failed", "lost", "repeated", "answered", "running", "seconds")
    lines = [(n, *(str(r[k]) for k in header[1:-1]), f"{s:.0f}") for n, r, s in rows]
    widths = [max(len(x) for x in column) for column in zip(header, *lines)]
    for line in (header, *lines):
        print("  ".join(x.ljust(w) for x, w in zip(line, widths)))
    ok = all(r["lost"] == 0 and r["repeated"] == 0 and r["running"] == 0 for _, r, _ in rows)
    print(("PASS" if ok else "MISS") + ": 0 lost, 0 repeated and none left running in every case "
          "(answered = draws of held configurations, answered from the study and not counted)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
