"""The per-shape kernel chooser: times candidates once per key, keeps the fastest, and never
times during CUDA graph capture. CPU-only here: a perf_counter timer stands in for CUDA events."""

from __future__ import annotations

import time

import pytest
import torch

import fxsketch  # noqa: F401
from fxsketch.kernels import choose as ch
from fxsketch.kernels.ops import kernel_backend


@pytest.fixture(autouse=True)
def _fresh():
    ch.clear()
    yield
    ch.clear()


def _timer(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_picks_the_faster_candidate_and_times_each_key_once():
    calls = {"slow": 0, "fast": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.02)

    def fast():
        calls["fast"] += 1

    cands = {"slow": slow, "fast": fast}
    assert ch.choose("k1", cands, timer=_timer) == "fast"
    assert ch.choose("k1", cands, timer=_timer) == "fast"
    assert calls == {"slow": 1, "fast": 1}  # the second call reuses the decision
    assert ch.choose("k2", {"a": fast, "b": slow}, timer=_timer) == "a"
    assert calls["slow"] == 2


def test_choice_follows_the_timings_not_the_order():
    order = iter([3.0, 1.0, 2.0])
    assert ch.choose("k", {"x": None, "y": None, "z": None}, timer=lambda fn: next(order)) == "y"


def test_backend_resolution(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv("FXSKETCH_KERNEL", raising=False)
    assert kernel_backend(x) == "aten"  # CPU tensors never race
    monkeypatch.setenv("FXSKETCH_KERNEL", " Triton ")
    assert kernel_backend(x) == "triton"


def test_the_chain_keeps_near_ties():
    times = {"aten": 1.0, "triton": 0.95}
    assert ch.choose("tie", {"aten": "aten", "triton": "triton"}, timer=times.__getitem__) == "aten"
    times = {"aten": 1.0, "triton": 0.5}
    assert ch.choose("win", {"aten": "aten", "triton": "triton"}, timer=times.__getitem__) == "triton"


def test_a_failing_candidate_is_never_picked():
    def broken():
        raise RuntimeError("PassManager::run failed")

    times = {"aten": 1.0}

    def timer(fn):
        return fn() if fn is broken else times["aten"]

    assert ch.choose("fails", {"triton": broken, "aten": "aten"}, timer=timer) == "aten"
    with pytest.raises(RuntimeError, match="every lowrank kernel failed"):
        ch.choose("all-fail", {"triton": broken}, timer=timer)
