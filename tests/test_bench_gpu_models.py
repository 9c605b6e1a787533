"""The GPU benchmark's CPU smoke run: it builds all three variants, times them and prints its table
(the figures themselves are the benchmark's business, not a test's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_runs_its_smoke_cases_on_cpu(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "benchmarks/bench_gpu_models.py", "--smoke", "--time-limit", "120",
                           "--csv", str(tmp_path / "rows.csv")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout.split("\n\n")[-1]
    assert table.splitlines()[0].split()[:6] == ["case", "mode", "budget", "dense", "ms", "hand"]
    assert "dispatch op 1x64 r16" in table and "dispatch layer 1x64 r16" in table and "mlp-64x128 M=32" in table
    rows = (tmp_path / "rows.csv").read_text().splitlines()
    assert rows[0].startswith("case,mode,budget,dense_ms,hand,fxsketch,ideal,stable") and len(rows) >= 4
