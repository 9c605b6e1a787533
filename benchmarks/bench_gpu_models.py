"""What a user gets without fxsketch against fxsketch's rewrite, at equal ranks, on whatever device is here.

For each model, token count and FLOP budget (ranks keeping 50% or 25% of each Linear's FLOPs), in
eval mode without gradients, three variants are timed interleaved in the same rounds
(`fxsketch.measure.time_rounds`: warm-up, rounds until the ratios settle, medians with their
spread):

  dense      the model as it is
  hand       every Linear swapped for Linear(K→R, no bias) + Linear(R→N): plain PyTorch
  fxsketch   `fxsketch.rewrite` with `svd` at the same ranks (the op family's own kernel choice)

each eager and, on CUDA, under `torch.compile(mode="reduce-overhead")` (CUDA graphs, the usual
serving mode). A row prints dense's time, each variant's speed as a ratio to dense (median and
interquartile range of the per-round ratios), and the ideal ratio (the replaced layers' FLOP and
byte bound, `fxsketch.plan.speed_bound`). The `dispatch` rows time one tiny low-rank layer as the
fxsketch op and as `LowRankLinear` against the same two `F.linear` calls: the eager overhead.

Models (CUDA, bf16): a 4-block MLP (4096↔11008) at M = 1, 16, 256, 4096 rows; BERT-base at 256
and 4096 tokens. `--quick` keeps M = 16 and 4096, BERT at 256 and the 50% budget. Without CUDA (or
with `--smoke`) tiny float32 versions run eagerly: the CPU smoke run the tests use.

Run:  python benchmarks/bench_gpu_models.py [--quick] [--smoke] [--time-limit S] [--csv PATH]
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fxsketch
from fxsketch.kernels import FactorTransposes, lowrank_linear
from fxsketch.measure import time_rounds
from fxsketch.plan import speed_bound


class MLPStack(nn.Module):
    """Residual blocks of Linear(d→h), SiLU, Linear(h→d): a transformer's FFN stack."""

    def __init__(self, d: int = 4096, h: int = 11008, layers: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, h), nn.SiLU(), nn.Linear(h, d)) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def bert(hidden: int = 768, layers: int = 12, intermediate: int = 3072) -> nn.Module:
    from transformers import BertConfig, BertModel  # optional: the `examples` extra

    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(2, hidden // 64),
                        intermediate_size=intermediate)
    return BertModel(config, add_pooling_layer=False)


def rank_for(k: int, n: int, budget: float) -> int:
    """The rank keeping `budget` of a K→N Linear's FLOPs, a multiple of 16 (at least 16)."""
    return max(16, int(round(budget * k * n / (k + n) / 16)) * 16)


def hand_lowrank(model: nn.Module, budget: float) -> nn.Module:
    """Every nn.Linear replaced by two nn.Linear holding its truncated SVD factors."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        W = module.weight.detach().float()
        r = rank_for(W.shape[1], W.shape[0], budget)
        U, S, V = torch.svd_lowrank(W, q=min(min(W.shape), r + 16), niter=2)
        U, S, V = U[:, :r], S[:r], V[:, :r]
        first = nn.Linear(W.shape[1], r, bias=False, device=W.device, dtype=module.weight.dtype)
        second = nn.Linear(r, W.shape[0], bias=module.bias is not None, device=W.device, dtype=module.weight.dtype)
        with torch.no_grad():
            first.weight.copy_(S.sqrt()[:, None] * V.T)
            second.weight.copy_(U * S.sqrt())
            if module.bias is not None:
                second.bias.copy_(module.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, nn.Sequential(first, second))
    return model


def fxsketch_lowrank(model: nn.Module, inputs: tuple, budget: float) -> tuple[nn.Module, float]:
    """`fxsketch.rewrite` with svd at `rank_for` every Linear; also the plan's ideal speedup."""
    gm = fxsketch.capture(model, inputs)
    records = [r for r in fxsketch.find_layers(gm) if r.op_type == "Linear" and not r.unsupported]
    plan = {r.name: {"method": "svd", "low_rank": rank_for(r.in_features, r.out_features, budget)} for r in records}
    return fxsketch.rewrite(gm, plan, inputs), speed_bound(records, plan)


@dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[int], tuple]
    sizes: list[int]


def cases(device: str, dtype: torch.dtype, smoke: bool, quick: bool) -> list[Case]:
    def rows(width: int) -> Callable[[int], tuple]:
        return lambda m: (torch.randn(m, width, device=device, dtype=dtype),)

    def tokens(seq: int) -> Callable[[int], tuple]:
        return lambda m: (torch.randint(0, 1000, (max(1, m // seq), seq), device=device),)

    if smoke:
        found = [Case("mlp-64x128", lambda: MLPStack(64, 128, 2), rows(64), [4, 32])]
        if "transformers" in sys.modules or _importable("transformers"):
            found.append(Case("bert-tiny", lambda: bert(64, 2, 128), tokens(16), [32]))
        return found
    return [Case("mlp-4096x11008", MLPStack, rows(4096), [16, 4096] if quick else [1, 16, 256, 4096]),
            Case("bert-base", bert, tokens(128), [256] if quick else [256, 4096])]


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def ratios(times: list[list[float]], i: int) -> tuple[float, float, float]:
    """Median and quartiles of dense / variant `i`, round by round."""
    series = sorted(a / b for a, b in zip(times[0], times[i]))
    q = statistics.quantiles(series, n=4) if len(series) > 1 else [series[0]] * 3
    return q[1], q[0], q[2]


class TwoLinear(nn.Module):
    """A low-rank layer as a user writes it in one module: two `F.linear` calls on its factors."""

    def __init__(self, layer: fxsketch.LowRankLinear) -> None:
        super().__init__()
        self.B, self.A, self.bias = layer.B, layer.A, layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)


def dispatch_rows(device: str, dtype: torch.dtype) -> list[dict]:
    """A layer small enough (1x64 -> 16 -> 64) that call overhead is all there is. `op`: the
    fxsketch op called as `LowRankLinear` calls it (with the layer's kept transposes) against the
    two F.linear calls it replaces; `bare op`: the functional call without them; `layer`:
    `LowRankLinear` against `TwoLinear` on the same tensors, with `nn.Sequential` of two
    `nn.Linear` (the hand-written layer) in the hand column."""
    torch.manual_seed(0)
    x = torch.randn(1, 64, device=device, dtype=dtype)
    layer = fxsketch.LowRankLinear(64, 64, 16).to(device, dtype)
    B, A, bias, transposes = layer.B, layer.A, layer.bias, FactorTransposes()
    two = lambda x: F.linear(F.linear(x, B), A, bias)  # noqa: E731
    hand = nn.Sequential(nn.Linear(64, 16, bias=False), nn.Linear(16, 64)).to(device, dtype)
    variants = {  # baseline, fxsketch, and the hand-written layer where there is one
        "op": [two, lambda x: lowrank_linear(x, B, A, bias, transposes)],
        "bare op": [two, lambda x: lowrank_linear(x, B, A, bias)],
        "layer": [TwoLinear(layer), layer, hand],
    }
    rows = []
    for name, fns in variants.items():
        rounds = time_rounds(fns, (x,), cap_s=3.0)
        rows.append(dict(case=f"dispatch {name} 1x64 r16", mode="eager", budget="", dense_ms=rounds.median(0) * 1e3,
                         hand=ratios(rounds.times, 2) if len(fns) > 2 else None, fxsketch=ratios(rounds.times, 1),
                         ideal=None, stable=rounds.stable))
        print_row(rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and one budget (GPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU-sized models (the default without CUDA)")
    parser.add_argument("--time-limit", type=float, default=480.0, help="stop starting new cases after S seconds")
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    smoke = args.smoke or device == "cpu"
    dtype = torch.bfloat16 if device == "cuda" and not smoke else torch.float32
    budgets = [0.5] if (args.quick or smoke) else [0.5, 0.25]
    modes = ["eager", "reduce-overhead"] if device == "cuda" else ["eager"]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"bench_gpu_models: {name}, torch {torch.__version__}, {str(dtype)[6:]}, "
          f"{'smoke' if smoke else 'quick' if args.quick else 'full'}", flush=True)
    start = time.perf_counter()
    rows = dispatch_rows(device, dtype)
    for case in cases(device, dtype, smoke, args.quick):
        if time.perf_counter() - start > args.time_limit:
            print(f"  {case.name}: skipped, past --time-limit {args.time_limit:.0f} s", flush=True)
            continue
        torch.manual_seed(0)
        model = case.make().to(device, dtype).eval()
        for budget in budgets:
            hand = hand_lowrank(model, budget)
            ours, ideal = fxsketch_lowrank(model, case.inputs(max(2, case.sizes[0])), budget)
            for mode in modes:
                variants = [model, hand, ours]
                if mode != "eager":
                    variants = [torch.compile(m, mode=mode) for m in variants]
                for size in case.sizes:
                    inputs = case.inputs(size)
                    rounds = time_rounds(variants, inputs, cap_s=3.0 if smoke else 10.0)
                    rows.append(dict(case=f"{case.name} M={size}", mode=mode, budget=f"{budget:.0%}",
                                     dense_ms=rounds.median(0) * 1e3, hand=ratios(rounds.times, 1),
                                     fxsketch=ratios(rounds.times, 2), ideal=ideal, stable=rounds.stable))
                    print_row(rows[-1])
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    print()
    print_table(rows)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _ratio(value: tuple[float, float, float] | None) -> str:
    return "" if value is None else f"{value[0]:.2f}x ({value[1]:.2f}-{value[2]:.2f})"


def print_row(row: dict) -> None:
    print(f"  {row['case']} {row['mode']} {row['budget']}: dense {row['dense_ms']:.3f} ms, hand {_ratio(row['hand'])}, "
          f"fxsketch {_ratio(row['fxsketch'])}", flush=True)


def print_table(rows: list[dict]) -> None:
    header = ("case", "mode", "budget", "dense ms", "hand", "fxsketch", "ideal", "")
    lines = [(r["case"], r["mode"], r["budget"], f"{r['dense_ms']:.3f}", _ratio(r["hand"]), _ratio(r["fxsketch"]),
              "" if r["ideal"] is None else f"{r['ideal']:.2f}x", "" if r["stable"] else "unstable")
             for r in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    for line in (header, *lines):
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
    print("ratios are dense time / variant time (median, interquartile range over interleaved rounds); the "
          "dispatch rows' baseline is two F.linear calls (in one module for the layer row), not dense")


if __name__ == "__main__":
    main()
