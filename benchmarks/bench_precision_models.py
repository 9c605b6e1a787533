"""The precision kinds beyond MiniLM: `optimize` with its default space ("auto": rank and precision
per layer) on the demo MLP and on a transformers ResNet must keep the accuracy bar and never return
a model slower than dense.

    python benchmarks/bench_precision_models.py [--trials N] [--threads 2]

Each row is one `optimize` call (timed objective, calibration data, seed 0). Speed is the Result's
own whole-model measurement against the user's model: interleaved rounds after warm-up, the median
with its interquartile range. The ideal column is the physical bound of the returned plan (the
larger of its FLOP and byte ratios over the replaced layers); a plan of no layers is dense itself.

  demo    the bundled MLP 64→1024→1024→10 trained on scikit-learn's digits (720 validation rows);
          accuracy: top-1 on held-out digits, bar one point below dense
  resnet  transformers ResNetModel (embedding 32, hidden 32/64/128/256, depths 1/1/1/1), random init,
          8×3×64×64; accuracy: cosine of the pooled features to the dense model's on 32 held-out
          images, bar 0.99
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

import fxsketch
from fxsketch.demo import make_demo_task


def demo_case():
    task = make_demo_task(seed=0)
    bar = task.accuracy(task.model) - 0.01
    return task.model, task.example_inputs[0], task.accuracy, bar, task.calibration


def resnet_case():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128, 256],
                                    depths=[1, 1, 1, 1], layer_type="basic")
    model = transformers.ResNetModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    held_out = torch.randn(32, 3, 64, 64, generator=g)
    calibration = [torch.randn(8, 3, 64, 64, generator=g) for _ in range(4)]
    with torch.no_grad():
        reference = model(held_out).pooler_output.flatten(1)

    def fidelity(m):
        with torch.no_grad():
            out = m(held_out)
            pooled = (out["pooler_output"] if isinstance(out, dict) else out.pooler_output).flatten(1)
        return float(torch.nn.functional.cosine_similarity(pooled, reference, dim=1).mean())

    return model, calibration[0], fidelity, 0.99, calibration


CASES = {"demo": demo_case, "resnet": resnet_case}


def run(name: str, trials: int) -> dict:
    model, x, accuracy, bar, calibration = CASES[name]()
    dense_accuracy = accuracy(model)
    start = time.perf_counter()
    result = fxsketch.optimize(model, fxsketch.LayerConfig({"type": ["Linear", "Conv2d"]}, params="auto"),
                               example_inputs=x, accuracy_fn=accuracy, accuracy_threshold=bar, n_trials=trials,
                               calibration_data=calibration, progress=False,
                               search=fxsketch.SearchOptions(seed=0))
    m = result.measured_speedup
    kinds = collections.Counter(e["method"] + ("" if e.get("precision", "float") == "float" else f"/{e['precision']}")
                                for e in result.plan.values())
    return dict(case=name, bar=bar, dense_accuracy=dense_accuracy, accuracy=result.accuracy, plan=dict(kinds),
                speed=result.speedup, low=m.low if m else 1.0, high=m.high if m else 1.0,
                bound=m.bound if m else 1.0, stable=m.stable if m else True, minutes=(time.perf_counter() - start) / 60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [run(name, args.trials) for name in args.cases]
    print(f"\n{'case':8} {'baseline':>9} {'ours (IQR)':>22} {'ideal':>6} {'accuracy (bar)':>22}  plan")
    for r in rows:
        speed = f"{r['speed']:.2f}x ({r['low']:.2f}-{r['high']:.2f})" + ("" if r["stable"] else " unstable")
        kept = r["accuracy"] is not None and r["accuracy"] >= r["bar"] - 1e-9
        print(f"{r['case']:8} {'dense 1x':>9} {speed:>22} {r['bound']:>5.2f}x "
              f"{r['accuracy']:.4f} ({r['bar']:.4f}) {'kept' if kept else 'MISSED':>6}  "
              f"{r['plan'] or 'dense (nothing faster)'}  [{r['minutes']:.1f} min]")
    slower = [r["case"] for r in rows if r["plan"] and r["high"] < 1.0]
    missed = [r["case"] for r in rows if r["accuracy"] is None or r["accuracy"] < r["bar"] - 1e-9]
    print(f"\nbar kept in every case: {'yes' if not missed else 'NO: ' + ', '.join(missed)}; "
          f"a returned model slower than dense: {'none' if not slower else ', '.join(slower)}")


if __name__ == "__main__":
    main()
