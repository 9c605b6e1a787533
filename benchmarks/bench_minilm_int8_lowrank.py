"""What int8 plus low rank reach on all-MiniLM-L6-v2 at fidelity 0.95, with the best recovery we have.

The question behind it (issue "beat the one-line alternatives"): can low-rank factors stacked on
int8 carry MiniLM past the best int8 peer at fidelity ≥ 0.95? Rows:

- every encoder Linear int8 (what `optimize` returns at 0.99 on this machine);
- for each FLOP budget: the sensitivity-weighted allocation (`fxsketch.allocate`, whitened_svd,
  sensitivity="output"), fitted sequentially (`fxsketch.rewrite_sequential`), the layers it leaves
  whole in int8 and its factors int8: as fitted, and after distilling float factors against every
  block's output (`fxsketch.distill` on `minilm.Blocks`, cosine schedule) and quantizing them then.
  The float-factor fidelities (rest of the model float32) are printed beside.

Speed: dense float32 time / variant time at 32 × 64 tokens, interleaved in the same rounds after
warm-up (median [interquartile range]); fidelity: mean cosine of sentence embeddings on the
evaluation sentences `bench_peers.py` uses; ideal: `fxsketch.plan.speed_bound` of the encoder's Linears.

Run:  python benchmarks/bench_minilm_int8_lowrank.py [--budgets 0.75,0.5] [--distill-steps 600] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import fxsketch  # noqa: E402
from fxsketch import Int, LayerConfig  # noqa: E402
from fxsketch.examples import minilm as M  # noqa: E402
from fxsketch.measure import time_rounds  # noqa: E402
from fxsketch.plan import speed_bound  # noqa: E402
from fxsketch.recover import quantize_trained  # noqa: E402


def speed(dense: torch.nn.Module, variant: torch.nn.Module, x: tuple) -> tuple[float, float, float]:
    with torch.no_grad():
        rounds = time_rounds([dense, variant], x, cap_s=6.0)
    ratios = sorted(rounds.ratios())
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), q[0], q[2]


def with_int8(records: list, plan: dict[str, dict]) -> dict[str, dict]:
    """`plan`'s factors in int8 and every encoder Linear it leaves whole in int8."""
    return {r.name: ({**plan[r.name], "precision": "int8"} if r.name in plan else {"method": "int8"}) for r in records}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="0.75,0.5")
    ap.add_argument("--distill-steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, x, calibration, evaluation = M.make_minilm(n_calibration=256, n_evaluation=None)
    model.eval()
    reference = M.embed(model, evaluation)
    gm = fxsketch.capture(model, x)
    records = M.encoder_records(gm)
    fidelity = lambda m: M.fidelity(reference, M.embed(m, evaluation))  # noqa: E731
    rows = []

    def row(label: str, module: torch.nn.Module, plan: dict, note: str = "") -> None:
        rows.append((label, speed(model, module, x), fidelity(module), speed_bound(records, plan), note))
        print(rows[-1], flush=True)

    every = {r.name: {"method": "int8"} for r in records}
    row("every encoder Linear int8", fxsketch.rewrite(gm, every, x), every)
    spec = LayerConfig({"type": "Linear", "pattern": M.ENCODER_LINEARS}, params={"low_rank": Int(8, 384, step=8)})
    data = calibration + M.distillation_batches()
    for budget in (float(b) for b in args.budgets.split(",")):
        plan = fxsketch.allocate(gm, spec, calibration, budget=budget, example_inputs=x, sensitivity="output")
        small = fxsketch.rewrite_sequential(gm, plan, calibration, x)
        fitted = fidelity(small)
        mixed = with_int8(records, plan)
        quantized = fxsketch.rewrite_sequential(gm, mixed, calibration, x)
        row(f"{budget:.0%} FLOPs allocation, fitted, int8", quantized, mixed,
            f"{len(plan)} low rank; float factors {fitted:.4f}")
        if args.distill_steps:
            fxsketch.distill(M.Blocks(small), M.Blocks(gm), data, steps=args.distill_steps, lr=1e-3, schedule="cosine")
            distilled = fidelity(small)
            quantize_trained(quantized, small)
            row(f"{budget:.0%} FLOPs allocation, distilled {args.distill_steps}, int8", quantized, mixed,
                f"float factors {distilled:.4f}")

    print(f"\nall-MiniLM-L6-v2, 32 x 64 tokens, {args.threads} threads, torch {torch.__version__}")
    print(f"{'case':46s} {'speed vs dense':>20s} {'fidelity':>9s} {'ideal':>7s}  note")
    for label, (mid, lo, hi), fid, ideal, note in rows:
        print(f"{label:46s} {f'{mid:.2f}x [{lo:.2f}-{hi:.2f}]':>20s} {fid:9.4f} {ideal:6.2f}x  {note}")


if __name__ == "__main__":
    main()
