"""Tests for the fxsketch op family (`fxsketch::lowrank_linear`, `fxsketch::lowrank_conv2d`).

Every result is checked against a pure-torch float64 reference written out here, not against
the library's own ATen bodies. Every test runs once per kernel backend: the ATen path, the
Triton path (under TRITON_INTERPRET=1 on CPU, see conftest.py) and the default (FXSKETCH_KERNEL
unset: on the CPU the eager shortcut, with a layer's kept transposes) share this one reference test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxsketch  # noqa: F401  (registers the ops)
from fxsketch.kernels import FactorTransposes, lowrank_conv2d, lowrank_linear

LINEAR_OP = torch.ops.fxsketch.lowrank_linear.default
CONV_OP = torch.ops.fxsketch.lowrank_conv2d.default

# (leading shape of x, K, R, N): ragged sizes, R = 1, M = 1, a 1-D and a 3-D input.
LINEAR_SHAPES = [
    ((1,), 5, 1, 3),
    ((7,), 13, 3, 11),
    ((9,), 17, 1, 1),
    ((33,), 19, 7, 23),
    ((2, 5), 11, 4, 6),
    ((3, 1, 4), 9, 2, 5),
    ((), 10, 3, 7),
]
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

# Backward with bias=None: the op's schema defaults bias to None, so autograd sees three inputs.
BIAS_FOR_BACKWARD = [True, False]


@pytest.fixture(params=["aten", "triton", "default"], autouse=True)
def kernel(request, monkeypatch):
    """Run the test on each implementation of the ops, and with none forced."""
    if request.param == "default":
        monkeypatch.delenv("FXSKETCH_KERNEL", raising=False)
    else:
        monkeypatch.setenv("FXSKETCH_KERNEL", request.param)
    return request.param


def _ref_linear(x, B, A, bias):
    y = (x.double() @ B.double().T) @ A.double().T
    return y if bias is None else y + bias.double()


def _ref_conv(x, B, A, bias, stride, padding, dilation):
    t = F.conv2d(x.double(), B.double(), None, stride, padding, dilation)
    return F.conv2d(t, A.double()[:, :, None, None], None if bias is None else bias.double())


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute error relative to the largest reference magnitude."""
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual.double() - expected).abs().max() / scale)


def _linear_args(lead, K, R, N, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g)
    B = torch.randn(R, K, generator=g) / K**0.5
    A = torch.randn(N, R, generator=g) / R**0.5
    b = torch.randn(N, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(B), cast(A), cast(b)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,K,R,N", LINEAR_SHAPES)
def test_lowrank_linear_forward_matches_float64_reference(lead, K, R, N, dtype, bias):
    x, B, A, b = _linear_args(lead, K, R, N, dtype, bias)
    transposes = FactorTransposes()
    with torch.no_grad():  # the layer's call: the first one keeps the transposes, the second uses them
        kept = [lowrank_linear(x, B, A, b, transposes) for _ in range(2)]
    for y in (lowrank_linear(x, B, A, b), *kept):
        assert y.shape == (*lead, N)
        assert y.dtype == dtype
        assert _rel_err(y, _ref_linear(x, B, A, b)) < TOLERANCES[dtype]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("which", ["x", "B", "A", "all"])
def test_lowrank_linear_noncontiguous_inputs(which, bias):
    M, K, R, N = 6, 9, 3, 5
    g = torch.Generator().manual_seed(1)
    # Each tensor is built transposed and then viewed back, so it has the right shape but a
    # non-contiguous layout.
    x = torch.randn(K, M, generator=g).T if which in ("x", "all") else torch.randn(M, K, generator=g)
    B = torch.randn(K, R, generator=g).T if which in ("B", "all") else torch.randn(R, K, generator=g)
    A = torch.randn(R, N, generator=g).T if which in ("A", "all") else torch.randn(N, R, generator=g)
    b = torch.randn(2 * N, generator=g)[::2] if bias else None  # strided bias
    if which in ("x", "all"):
        assert not x.is_contiguous()
    y = lowrank_linear(x, B, A, b)
    assert _rel_err(y, _ref_linear(x, B, A, b)) < 1e-5


def test_lowrank_linear_noncontiguous_3d_input():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 4, 3, generator=g).permute(1, 0, 2)[..., :2]  # (4, 7, 2), strided view
    assert not x.is_contiguous()
    B = torch.randn(2, 2, generator=g)
    A = torch.randn(5, 2, generator=g)
    y = lowrank_linear(x, B, A, None)
    assert y.shape == (4, 7, 5)
    assert _rel_err(y, _ref_linear(x, B, A, None)) < 1e-5


@pytest.mark.parametrize("bias", BIAS_FOR_BACKWARD)
@pytest.mark.parametrize("lead,K,R,N", LINEAR_SHAPES)
def test_lowrank_linear_backward_matches_reference(lead, K, R, N, bias):
    x, B, A, b = _linear_args(lead, K, R, N, torch.float32, bias, seed=3)
    leaves = [t.clone().requires_grad_(True) for t in (x, B, A, b) if t is not None]
    gy = torch.randn(*lead, N, generator=torch.Generator().manual_seed(4))
    y = lowrank_linear(*leaves) if bias else lowrank_linear(*leaves, None)
    got = torch.autograd.grad(y, leaves, gy)

    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    y_ref = _ref_linear(*ref_leaves) if bias else _ref_linear(*ref_leaves, None)
    want = torch.autograd.grad(y_ref, ref_leaves, gy.double())
    for name, g_got, g_want in zip("xBAb", got, want):
        assert g_got.shape == g_want.shape, name
        assert g_got.dtype == torch.float32, name
        assert _rel_err(g_got, g_want) < 1e-5, name


@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, True, False),
                                   (False, False, False, True), (True, True, True, True)])
def test_lowrank_linear_backward_partial_requires_grad(needs):
    x, B, A, b = _linear_args((4, 3), 6, 2, 5, torch.float64, True, seed=5)
    inputs = [t.clone().requires_grad_(n) for t, n in zip((x, B, A, b), needs)]
    y = lowrank_linear(*inputs)
    wanted = [t for t in inputs if t.requires_grad]
    got = torch.autograd.grad(y.square().sum(), wanted)
    ref_inputs = [t.detach().clone().requires_grad_(n) for t, n in zip((x, B, A, b), needs)]
    want = torch.autograd.grad(_ref_linear(*ref_inputs).square().sum(), [t for t in ref_inputs if t.requires_grad])
    for g_got, g_want in zip(got, want):
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bias", BIAS_FOR_BACKWARD)
@pytest.mark.parametrize("lead", [(3,), (2, 3), ()])
def test_lowrank_linear_gradcheck(lead, bias):
    x, B, A, b = _linear_args(lead, 4, 2, 3, torch.float64, bias, seed=6)
    args = [t.requires_grad_(True) for t in (x, B, A, b) if t is not None]
    fn = (lambda *a: lowrank_linear(*a)) if bias else (lambda x, B, A: lowrank_linear(x, B, A, None))
    assert torch.autograd.gradcheck(fn, tuple(args))


@pytest.mark.parametrize("bias", BIAS_FOR_BACKWARD)
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_lowrank_linear_opcheck(lead, bias):
    x, B, A, b = _linear_args(lead, 7, 3, 4, torch.float32, bias, seed=7)
    for t in (x, B, A, b):
        if t is not None:
            t.requires_grad_(True)
    torch.library.opcheck(LINEAR_OP, (x, B, A, b))


# (N, C, H, W, R, out, kernel, stride, padding, dilation)
CONV_CASES = [
    (2, 3, 7, 6, 2, 5, (3, 3), (1, 1), (0, 0), (1, 1)),
    (1, 4, 9, 9, 1, 3, (3, 3), (2, 2), (1, 1), (1, 1)),
    (2, 3, 10, 8, 3, 7, (3, 2), (1, 2), (2, 0), (2, 1)),
    (1, 2, 11, 11, 4, 2, (5, 5), (3, 3), (2, 2), (2, 2)),
    (3, 5, 5, 5, 2, 4, (1, 1), (1, 1), (0, 0), (1, 1)),
]


def _conv_args(case, dtype, bias, seed=0):
    n, c, h, w, r, out, k = case[:7]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    B = torch.randn(r, c, *k, generator=g, dtype=dtype)
    A = torch.randn(out, r, generator=g, dtype=dtype)
    b = torch.randn(out, generator=g, dtype=dtype) if bias else None
    return x, B, A, b


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CONV_CASES)
def test_lowrank_conv2d_forward_matches_reference(case, dtype, bias):
    x, B, A, b = _conv_args(case, dtype, bias)
    stride, padding, dilation = case[7:]
    y = lowrank_conv2d(x, B, A, b, stride, padding, dilation)
    ref = _ref_conv(x, B, A, b, stride, padding, dilation)
    assert y.shape == ref.shape
    assert y.dtype == dtype
    assert _rel_err(y, ref) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_lowrank_conv2d_default_geometry_and_noncontiguous_input():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 6, 6, 3, generator=g).permute(0, 3, 1, 2)  # channels-last-like view
    assert not x.is_contiguous()
    B = torch.randn(2, 3, 3, 3, generator=g)
    A = torch.randn(4, 2, generator=g).T.contiguous().T  # same values, transposed layout
    y = lowrank_conv2d(x, B, A)
    ref = _ref_conv(x, B, A, None, (1, 1), (0, 0), (1, 1))
    assert _rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CONV_CASES[:4])
def test_lowrank_conv2d_backward_matches_reference(case, bias):
    x, B, A, b = _conv_args(case, torch.float32, bias, seed=9)
    stride, padding, dilation = case[7:]
    leaves = [t.clone().requires_grad_(True) for t in (x, B, A, b) if t is not None]
    y = lowrank_conv2d(*leaves[:3], leaves[3] if bias else None, stride, padding, dilation)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(10))
    got = torch.autograd.grad(y, leaves, gy)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    y_ref = _ref_conv(*ref_leaves[:3], ref_leaves[3] if bias else None, stride, padding, dilation)
    want = torch.autograd.grad(y_ref, ref_leaves, gy.double())
    for name, g_got, g_want in zip("xBAb", got, want):
        assert g_got.dtype == torch.float32, name
        assert _rel_err(g_got, g_want) < 1e-5, name


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("geometry", [((1, 1), (0, 0), (1, 1)), ((2, 1), (1, 2), (1, 2))])
def test_lowrank_conv2d_gradcheck(geometry, bias):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    stride, padding, dilation = geometry
    if bias:
        fn, args = (lambda x, B, A, b: lowrank_conv2d(x, B, A, b, stride, padding, dilation)), (x, B, A, b)
    else:
        fn, args = (lambda x, B, A: lowrank_conv2d(x, B, A, None, stride, padding, dilation)), (x, B, A)
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("bias", [True, False])
def test_lowrank_conv2d_opcheck(bias):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 3, 6, 5, generator=g, requires_grad=True)
    B = torch.randn(2, 3, 3, 3, generator=g, requires_grad=True)
    A = torch.randn(4, 2, generator=g, requires_grad=True)
    b = torch.randn(4, generator=g, requires_grad=True) if bias else None
    torch.library.opcheck(CONV_OP, (x, B, A, b, [2, 1], [1, 1], [1, 2]))


class _LinearOpModule(torch.nn.Module):
    def __init__(self, K=6, R=2, N=4):
        super().__init__()
        self.B = torch.nn.Parameter(torch.randn(R, K))
        self.A = torch.nn.Parameter(torch.randn(N, R))
        self.bias = torch.nn.Parameter(torch.randn(N))

    def forward(self, x):
        return lowrank_linear(x, self.B, self.A, self.bias)


class _ConvOpModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.B = torch.nn.Parameter(torch.randn(2, 3, 3, 3))
        self.A = torch.nn.Parameter(torch.randn(5, 2))
        self.bias = torch.nn.Parameter(torch.randn(5))

    def forward(self, x):
        return lowrank_conv2d(x, self.B, self.A, self.bias, (2, 2), (1, 1), (1, 1))


def _call_targets(graph: torch.fx.Graph) -> list:
    return [n.target for n in graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("lead", [(3,), (2, 3)])
def test_export_records_single_lowrank_linear_node(lead):
    torch.manual_seed(0)
    mod = _LinearOpModule()
    x = torch.randn(*lead, 6)
    ep = torch.export.export(mod, (x,))
    targets = _call_targets(ep.graph)
    assert targets.count(LINEAR_OP) == 1
    forbidden = {torch.ops.aten.linear.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
                 torch.ops.aten.matmul.default, torch.ops.aten.t.default}
    assert not forbidden & set(targets), targets
    torch.testing.assert_close(ep.module()(x), mod(x), rtol=0, atol=0)


def test_export_records_single_lowrank_conv2d_node():
    torch.manual_seed(0)
    mod = _ConvOpModule()
    x = torch.randn(2, 3, 8, 7)
    ep = torch.export.export(mod, (x,))
    targets = _call_targets(ep.graph)
    assert targets.count(CONV_OP) == 1
    forbidden = {torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default}
    assert not forbidden & set(targets), targets
    torch.testing.assert_close(ep.module()(x), mod(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_matches_eager_forward_and_backward(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(13)
    x = torch.randn(5, 7, generator=g)
    B = torch.randn(3, 7, generator=g, requires_grad=True)
    A = torch.randn(4, 3, generator=g, requires_grad=True)
    b = torch.randn(4, generator=g, requires_grad=True)
    xc = torch.randn(1, 3, 6, 6, generator=g)
    Bc = torch.randn(2, 3, 3, 3, generator=g, requires_grad=True)
    Ac = torch.randn(4, 2, generator=g, requires_grad=True)

    def fn(x, B, A, b, xc, Bc, Ac):
        y = torch.relu(lowrank_linear(x, B, A, b))
        z = lowrank_conv2d(xc, Bc, Ac, None, (1, 1), (1, 1), (1, 1))
        return y.sum() + z.square().sum()

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    params = (B, A, b, Bc, Ac)
    out_eager = fn(x, B, A, b, xc, Bc, Ac)
    grads_eager = torch.autograd.grad(out_eager, params)
    out_comp = compiled(x, B, A, b, xc, Bc, Ac)
    grads_comp = torch.autograd.grad(out_comp, params)
    torch.testing.assert_close(out_comp, out_eager, rtol=1e-6, atol=1e-6)
    for gc, ge in zip(grads_comp, grads_eager):
        torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("R", [40, 100, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_wider_than_one_chunk(R, dtype):
    """R beyond one rank chunk (64 under the interpreter) accumulates chunks onto the output."""
    x, B, A, b = _linear_args((21,), 37, R, 29, dtype, bias=True, seed=3)
    assert _rel_err(lowrank_linear(x, B, A, b), _ref_linear(x, B, A, b)) < TOLERANCES[dtype]


def test_float16(kernel):
    x, B, A, b = _linear_args((17,), 24, 5, 19, torch.float16, bias=True, seed=4)
    assert _rel_err(lowrank_linear(x, B, A, b), _ref_linear(x, B, A, b)) < 2e-3


def test_mixed_dtypes_are_refused(kernel):
    x, B, A, b = _linear_args((4,), 8, 2, 3, torch.float32, bias=True)
    with pytest.raises((TypeError, RuntimeError), match="dtype|type"):
        lowrank_linear(x, B.double(), A, b)


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FXSKETCH_KERNEL", "cutlass")
    x, B, A, b = _linear_args((4,), 8, 2, 3, torch.float32, bias=True)
    with pytest.raises(ValueError, match="FXSKETCH_KERNEL='cutlass'"):
        lowrank_linear(x, B, A, b)


def test_no_grad_fast_path_matches_the_op_and_tracers_still_see_one_op():
    """Under no_grad the public functions skip the dispatcher's autograd layer; export, which
    traces with fake tensors, must still record the single fxsketch op."""
    x, B, A, b = _linear_args((6,), 10, 3, 7, torch.float32, bias=True)
    with torch.no_grad():
        fast = lowrank_linear(x, B, A, b)
    assert torch.equal(fast, LINEAR_OP(x, B, A, b))

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.B, self.A, self.b = (torch.nn.Parameter(t) for t in (B, A, b))

        def forward(self, inp):
            return lowrank_linear(inp, self.B, self.A, self.b)

    with torch.no_grad():
        program = torch.export.export(Layer(), (x,))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets == [LINEAR_OP]
    gm = torch.fx.symbolic_trace(Layer())
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.ops.fxsketch.lowrank_linear]
