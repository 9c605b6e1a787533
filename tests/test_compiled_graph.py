"""What `torch.compile` sees of the fxsketch ops: the GEMMs a layer runs (two for a low-rank layer, a
cast and a GEMM for a reduced-precision one) or, on CUDA, the fused Triton kernel itself, never an
opaque call; a rewritten model compiles without graph breaks; `torch.export` still records one node
per layer (tests/test_ops.py)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import fxsketch
from fxsketch.kernels import (
    cast_linear, cast_lowrank_linear, int8_weight_linear, lowrank_conv2d, lowrank_linear, quantize_weight,
)


def _compiled_forward(fn, *args):
    """The forward graph AOTAutograd hands a backend for `fn(*args)`, and the compiled output."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    out = torch.compile(fn, backend=aot_autograd(fw_compiler=keep), fullgraph=True)(*args)
    return graphs[0].graph, out


def _targets(graph: torch.fx.Graph) -> set[str]:
    return {str(n.target) for n in graph.nodes if n.op == "call_function"}


g = torch.Generator().manual_seed(0)
X, XC = torch.randn(6, 12, generator=g), torch.randn(2, 3, 8, 8, generator=g)
B, A, BIAS = torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g), torch.randn(10, generator=g)
CB, CA = torch.randn(4, 3, 3, 3, generator=g), torch.randn(5, 4, generator=g)
CASES = {  # the op's call, and the ATen ops the compiled graph must run instead
    "lowrank_linear": (lambda: lowrank_linear(X, B, A, BIAS), {"aten.mm.default", "aten.addmm.default"}),
    "lowrank_conv2d": (lambda: lowrank_conv2d(XC, CB, CA, None, (1, 1), (1, 1), (1, 1)),
                       {"aten.convolution.default"}),
    "cast_linear": (lambda: cast_linear(X, B.bfloat16()), {"aten.mm.default", "aten._to_copy.default"}),
    "cast_lowrank_linear": (lambda: cast_lowrank_linear(X, B.bfloat16(), A.bfloat16(), BIAS.bfloat16()),
                            {"aten.mm.default", "aten.addmm.default", "aten._to_copy.default"}),
    "int8_weight_linear": (lambda: int8_weight_linear(X, *quantize_weight(B, 127), None),
                           {"aten.mm.default", "aten._to_copy.default", "aten.mul.Tensor"}),
}


def test_every_export_records_one_op_per_layer_though_eager_cpu_calls_skip_it():
    """The eager CPU shortcut (two F.linear calls, or a layer's kept transposes) never leaks into a
    graph: non-strict export (fake tensors), strict export (Dynamo) and FX tracing all record the
    single fxsketch op."""
    model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.ReLU())
    gm = fxsketch.rewrite(model, {"0": {"method": "svd", "low_rank": 4}}, (X,))
    assert any(isinstance(m, fxsketch.LowRankLinear) for m in gm.modules())
    with torch.no_grad():
        gm(X)  # the layer keeps its transposed factors: not part of any graph
    for strict in (False, True):
        program = torch.export.export(gm, (X,), strict=strict)
        assert "fxsketch.lowrank_linear.default" in _targets(program.graph), (strict, _targets(program.graph))
        assert not program.constants, list(program.constants)
        torch.testing.assert_close(program.module()(X), gm(X))
    traced = torch.fx.symbolic_trace(lambda x: lowrank_linear(x, B, A, BIAS))
    assert [str(n.target) for n in traced.graph.nodes if n.op == "call_function"] == ["fxsketch.lowrank_linear"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_compile_sees_the_gemms_a_layer_runs_not_an_opaque_op(case):
    call, expected = CASES[case]
    graph, out = _compiled_forward(call)
    targets = _targets(graph)
    assert not [t for t in targets if "fxsketch" in t], targets
    assert expected <= targets, targets
    torch.testing.assert_close(out, call(), rtol=1e-5, atol=1e-5)


def test_a_rewritten_model_compiles_with_inductor_without_graph_breaks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 64), torch.nn.GELU(), torch.nn.Linear(64, 10)).eval()
    x = torch.randn(4, 3, 6, 6)
    plan = {"0": {"method": "svd", "low_rank": 4}, "3": {"method": "svd", "low_rank": 16},
            "5": {"method": "svd", "low_rank": 4}}
    gm = fxsketch.rewrite(model, plan, (x,))
    torch._dynamo.reset()
    assert torch._dynamo.explain(gm)(x).graph_break_count == 0
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(gm, fullgraph=True)(x), gm(x), rtol=1e-4, atol=1e-4)


# Runs in a fresh interpreter: the tests import triton with TRITON_INTERPRET=1, and the CUDA path
# needs the real compiler. A stand-in driver names an sm_90 GPU, so Triton builds the kernel's IR for
# the mutation analysis the compiler runs; the tensors are fake CUDA tensors, nothing executes.
_FUSED_SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["FXSKETCH_KERNEL"] = "triton"
    import torch, triton
    from functorch.compile import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.backends.compiler import GPUTarget
    from fxsketch.kernels import lowrank_conv2d, lowrank_linear

    class SM90:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

    triton.runtime.driver.set_active(SM90())
    with FakeTensorMode() as mode:
        new = lambda *shape: torch.empty(*shape, device="cuda", dtype=torch.bfloat16)
        args = (new(64, 128), new(16, 128), new(256, 16), new(256), new(2, 16, 8, 8), new(16, 16, 3, 3), new(32, 16))

    def fn(x, w1, w2, bias, xc, cb, ca):
        return lowrank_linear(x, w1, w2, bias).relu(), lowrank_conv2d(xc, cb, ca, None, (1, 1), (1, 1), (1, 1))

    graphs = []
    with mode:
        try:
            aot_function(fn, fw_compiler=lambda gm, _: graphs.append(gm) or gm)(*args)
        except Exception:
            pass  # running the fake graph is not the point; tracing it is
    print(json.dumps([str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]))
""")


def test_compile_sees_the_fused_triton_kernel_on_cuda():
    pytest.importorskip("triton")
    run = subprocess.run([sys.executable, "-c", _FUSED_SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    targets = json.loads(run.stdout.strip().splitlines()[-1])
    assert targets.count("triton_kernel_wrapper_functional") == 2, targets
    assert not [t for t in targets if "fxsketch" in t or "mm" in t], targets


def test_a_symbolic_batch_is_not_pinned_by_the_per_shape_kernel_choice(monkeypatch):
    """Traced with a dynamic batch where the per-shape choice applies (CUDA's "auto"), the op
    takes the ATen chain rather than read the size (which would pin the graph to one batch)."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    ops = importlib.import_module("fxsketch.kernels.ops")
    monkeypatch.setattr(ops, "kernel_backend", lambda x: "auto")
    shape_env = ShapeEnv()
    batch = shape_env.create_symintnode(shape_env.create_symbol(6, ConstantSource("batch")), hint=6)
    with FakeTensorMode(shape_env=shape_env):
        x, b, a = torch.empty(batch, 12), torch.empty(4, 12), torch.empty(10, 4)
        assert not isinstance(x.shape[0], int)
        assert ops._pick("linear", x, b, a, None, None, None) == "aten"
    assert not shape_env.guards  # nothing read the batch size
