"""`fxsketch.tune_allocator`: glibc's malloc keeps freed activation blocks, set by `fxsketch.load`."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fxsketch
import fxsketch.search.api
from conftest import MLP_X, agreement, mlp
from fxsketch.allocator import running_glibc

needs_glibc = pytest.mark.skipif(not running_glibc() or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                                 reason="glibc >= 2.33 (mallinfo2) only")

# In the child: how many blocks glibc maps from the OS for one 30 MB tensor (1 when it bypasses the
# heap, as it does by default in a fresh process; 0 once freed blocks are kept in the heap).
_MAPPED = """
    import ctypes
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Info
    before = libc.mallinfo2().hblks
    block = torch.empty(30 << 20, dtype=torch.uint8)
    print("mapped", libc.mallinfo2().hblks - before)
"""


def _default_environment(monkeypatch) -> None:
    """No malloc setting and no other allocator in the environment (the child inherits it)."""
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)


def _mapped_after_load(path, tune: bool) -> int:
    code = textwrap.dedent(f"""
        import torch, fxsketch
        m = fxsketch.load({str(path)!r}, tune_allocator={tune})
    """) + textwrap.dedent(_MAPPED)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split("mapped")[-1])


@needs_glibc
def test_load_keeps_large_blocks_in_the_heap_and_can_leave_the_allocator_alone(tmp_path, monkeypatch):
    _default_environment(monkeypatch)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 8)
    path = tmp_path / "m.pt2"
    fxsketch.save(fxsketch.rewrite(model, {"0": {"method": "svd", "low_rank": 2}}, x), path, x)
    assert _mapped_after_load(path, tune=False) == 1
    assert _mapped_after_load(path, tune=True) == 0


@needs_glibc
def test_a_malloc_setting_or_another_allocator_in_the_environment_is_kept(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", str(1 << 20))
    assert fxsketch.tune_allocator() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert fxsketch.tune_allocator() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert fxsketch.tune_allocator() is False


@needs_glibc
def test_tuning_applies_on_glibc(monkeypatch):
    _default_environment(monkeypatch)
    assert fxsketch.tune_allocator() is True


def test_off_glibc_nothing_is_touched(monkeypatch):
    def musl(name):
        raise ValueError("unrecognized configuration name")

    monkeypatch.setattr(os, "confstr", musl)
    assert fxsketch.allocator.running_glibc() is False
    assert fxsketch.tune_allocator() is False


def test_the_search_times_trials_with_the_allocator_load_sets_unless_told_not_to(monkeypatch):
    calls = []
    monkeypatch.setattr(fxsketch.search.api, "tune_allocator", lambda: calls.append(True) or True)
    spec = fxsketch.LayerConfig({"type": "Linear", "range": [0, 2]}, params="auto")
    for tune in (True, False):
        model = mlp()
        fxsketch.optimize(model, spec, example_inputs=MLP_X, accuracy_fn=agreement(model), accuracy_threshold=0.8,
                          n_trials=2, search=fxsketch.SearchOptions(objective="flops", seed=0, tune_allocator=tune))
    assert calls == [True]
