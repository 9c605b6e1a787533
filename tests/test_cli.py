"""The command line: help, and the demo end to end (the README's first command)."""

from __future__ import annotations

import subprocess
import sys

import torch

import fxsketch


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxsketch.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def test_help_lists_commands():
    proc = _cli("--help")
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout
    proc = _cli("demo", "--help")
    assert proc.returncode == 0 and "--trials" in proc.stdout


def test_demo_trains_optimizes_and_saves(tmp_path):
    out = tmp_path / "demo.pt2"
    proc = _cli("demo", "--trials", "9", "--objective", "flops", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "dense accuracy" in text and "trial   0" in text and "MFLOPs before" in text
    assert out.exists()
    summary = text[text.index("accuracy     dense"):].splitlines()[0]
    dense, optimized = [float(w) for w in summary.replace("->", " ").split() if w.replace(".", "").isdigit()][:2]
    assert optimized >= dense - 0.01 - 1e-6
    loaded = fxsketch.load(out)
    assert loaded(torch.rand(5, 64)).shape == (5, 10)
