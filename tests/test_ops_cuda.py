"""The fxsketch ops on a real CUDA GPU: the compiled Triton kernel, not its interpreter.

Skipped without CUDA (CI has none). Run on a GPU machine with the interpreter off:

    TRITON_INTERPRET=0 python -m pytest -q tests/test_ops_cuda.py

Same float64 reference as tests/test_ops.py, at shapes the autotuned configs actually see
(ragged edges, M = 1, R beyond one chunk, every dtype), plus the wiring around the kernel:
conv's 1×1 stage, autograd, torch.compile without graph breaks, and torch.export.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fxsketch
from fxsketch.kernels import lowrank_conv2d, lowrank_linear

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="set TRITON_INTERPRET=0 to run the compiled kernels"),
]

TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
SHAPES = [  # (M, K, R, N)
    (1, 768, 64, 3072), (7, 100, 3, 77), (64, 4096, 128, 4096), (333, 1000, 257, 515),
    (4096, 768, 32, 3072), (1025, 3072, 256, 768), (5, 17, 1, 1), (130, 96, 500, 40),
]


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("FXSKETCH_KERNEL", "triton")
    torch.backends.cuda.matmul.allow_tf32 = False


def _args(M, K, R, N, dtype, bias=True, seed=0, lead=None):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rand = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device="cuda") * scale).to(dtype)  # noqa: E731
    x = rand(*(lead or (M,)), K)
    return x, rand(R, K, scale=K ** -0.5), rand(N, R, scale=R ** -0.5), rand(N) if bias else None


def _ref(x, B, A, bias):
    y = (x.double() @ B.double().T) @ A.double().T
    return y if bias is None else y + bias.double()


def _rel(a, ref):
    return float((a.double() - ref).norm() / ref.norm().clamp_min(1e-30))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,R,N", SHAPES)
def test_forward_matches_float64(M, K, R, N, dtype, bias):
    x, B, A, b = _args(M, K, R, N, dtype, bias)
    y = lowrank_linear(x, B, A, b)
    assert y.dtype == dtype and y.shape == (M, N)
    assert torch.isfinite(y).all()
    assert _rel(y, _ref(x, B, A, b)) < TOL[dtype]


def test_every_output_written_and_fresh_inputs():
    """Poisoned allocator blocks and a second random draw: no stale or unwritten output."""
    for seed in range(3):
        junk = torch.full((1 << 22,), float("nan"), device="cuda")
        del junk  # the caching allocator hands this NaN-filled block to the next output
        x, B, A, b = _args(257, 300, 70, 301, torch.float32, seed=seed)
        y = lowrank_linear(x, B, A, b)
        assert torch.isfinite(y).all()
        assert _rel(y, _ref(x, B, A, b)) < TOL[torch.float32]


def test_3d_and_noncontiguous_inputs():
    x, B, A, b = _args(0, 96, 24, 80, torch.float32, lead=(3, 11))
    assert _rel(lowrank_linear(x, B, A, b), _ref(x, B, A, b)) < 1e-4
    xt = x.transpose(0, 1)  # (11, 3, 96), non-contiguous
    Bt = B.T.contiguous().T  # same values, transposed strides
    assert _rel(lowrank_linear(xt, Bt, A, b), _ref(xt, B, A, b)) < 1e-4


def test_tf32_mode_is_within_tf32_error():
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        x, B, A, b = _args(512, 1024, 128, 1024, torch.float32)
        assert _rel(lowrank_linear(x, B, A, b), _ref(x, B, A, b)) < 3e-3
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_pointwise_stage(dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(3, 8, 13, 11, generator=g, device="cuda").to(dtype)
    B = (torch.randn(20, 8, 3, 3, generator=g, device="cuda") / 8).to(dtype)
    A = (torch.randn(17, 20, generator=g, device="cuda") / 4).to(dtype)
    bias = torch.randn(17, generator=g, device="cuda").to(dtype)
    y = lowrank_conv2d(x, B, A, bias, (2, 1), (1, 1), (1, 1))
    t = F.conv2d(x.double(), B.double(), None, (2, 1), (1, 1))
    ref = F.conv2d(t, A.double()[:, :, None, None], bias.double())
    assert y.shape == ref.shape
    assert _rel(y, ref) < TOL[dtype]


def test_backward_matches_float64():
    x, B, A, b = _args(65, 48, 9, 33, torch.float32, seed=2)
    leaves = [t.clone().requires_grad_() for t in (x, B, A, b)]
    gy = torch.randn(65, 33, device="cuda")
    torch.autograd.backward(torch.ops.fxsketch.lowrank_linear(*leaves), gy)
    ref_leaves = [t.double().clone().requires_grad_() for t in (x, B, A, b)]
    torch.autograd.backward(_ref(*ref_leaves), gy.double())
    for got, ref in zip(leaves, ref_leaves):
        assert _rel(got.grad, ref.grad) < 1e-4


def test_rewritten_model_trains_compiles_without_graph_breaks_and_exports(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).cuda()
    x = torch.randn(16, 64, device="cuda")
    plan = {name: {"method": "svd", "low_rank": 16} for name in ("0", "2")}
    gm = fxsketch.rewrite(model, plan, example_inputs=(x,))
    called = [type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]
    assert called.count(fxsketch.LowRankLinear) == 2  # eager calls keep their transposed factors
    eager = gm(x)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(gm)(x)
    assert explained.graph_break_count == 0
    compiled = torch.compile(gm)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-4, atol=1e-4)
    loss = compiled(x).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in gm.parameters() if p.requires_grad)
    program = torch.export.export(gm, (x,))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fxsketch.lowrank_linear.default) == 2
    torch.testing.assert_close(program.module()(x), eager, rtol=1e-5, atol=1e-5)


def test_auto_dispatch_races_once_per_shape_and_stays_correct(monkeypatch):
    from fxsketch.kernels import choose

    monkeypatch.delenv("FXSKETCH_KERNEL")
    choose.clear()
    for M in (3, 4, 2000):  # 3 and 4 share a bucket; 2000 is another
        x, B, A, b = _args(M, 256, 32, 384, torch.bfloat16, seed=M)
        with torch.no_grad():
            y = lowrank_linear(x, B, A, b)
        assert _rel(y, _ref(x, B, A, b)) < TOL[torch.bfloat16]
    assert len(choose._CHOICES) == 2
    assert set(choose._CHOICES.values()) <= {"triton", "aten"}


def test_compiled_with_cuda_graphs_replays_the_fused_kernel():
    """`mode="reduce-overhead"` records the compiled graph, the fused kernel inside it, into a CUDA
    graph and replays it: the output of a replay follows new input values."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    model = model.to(torch.bfloat16).eval()
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    gm = fxsketch.rewrite(model, {name: {"method": "svd", "low_rank": 32} for name in ("0", "2")}, (x,))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(gm, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for step in range(4):  # warm-up, record, then replays
            x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
            got = compiled(x).clone()
            assert _rel(got, gm(x).double()) < TOL[torch.bfloat16], step
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0  # recorded, not skipped
