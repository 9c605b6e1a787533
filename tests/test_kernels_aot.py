"""The fused Triton kernel compiles for real GPUs without one: every autotune config the pruner keeps,
at calls that include a rank above one chunk (both launches), one row, ragged sizes, the 1×1 conv
stage and each dtype the dispatcher sends it (float64 stays on ATen), for sm_80 and sm_90, specialized as the runtime would. CI runs this file under
the Triton our torch pins and under the newest one.

The compiles run in a fresh process: the test session interprets Triton kernels on the CPU
(`TRITON_INTERPRET=1`), and an interpreted kernel cannot be compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
CALLS = {  # id: (M, K, N, R, dtype, options)
    "decode-one-row": (1, 768, 768, 64, "bfloat16", {}),
    "ragged-tiny-rank-fp16": (7, 100, 77, 3, "float16", {}),
    "ragged-tiny-rank-fp32": (7, 100, 77, 3, "float32", {}),
    "rank-over-one-chunk-first-launch": (256, 768, 3072, 304, "bfloat16", {}),
    "rank-over-one-chunk-later-launch": (256, 768, 3072, 304, "bfloat16", {"chunk": 1}),
    "large-M-no-bias": (4096, 3072, 768, 300, "float16", {"bias": False}),
    "conv-1x1-stage": (18 * 9, 0, 130, 40, "bfloat16", {"hw": 9}),
}
ARCHS = (80, 90)

SCRIPT = textwrap.dedent("""
    import json, sys, torch, triton
    from fxsketch.kernels.triton_lowrank import aot_compile
    calls, archs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    out = {"triton": triton.__version__, "results": {}}
    for name, (M, K, N, R, dtype, options) in calls.items():
        for arch in archs:
            results = aot_compile(M, K, N, R, getattr(torch, dtype), arch, **options)
            out["results"][f"{name}@{arch}"] = [[repr(c), e] for c, e in results]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CALLS), json.dumps(ARCHS)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("call", sorted(CALLS))
def test_every_kept_config_compiles(compiled, call, arch):
    results = compiled["results"][f"{call}@{arch}"]
    assert results, "the pruner kept no config"
    failures = [(config, error) for config, error in results if error]
    assert failures == [], f"triton {compiled['triton']}"
