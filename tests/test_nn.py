"""Tests for the low-rank modules in fxsketch.nn (LowRankLinear/Conv2d, SKLinear/SKConv2d)."""

from __future__ import annotations

import copy
import pickle
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxsketch as pr
from fxsketch.nn import LowRankConv2d, LowRankLinear, SKConv2d, SKLinear

# from_factors/from_dense build a float32 layer, copy_()s the factors into it (rounding them to float32) and
# only then casts the layer to the factors' dtype: float64 factors come back float32-rounded.
FLOAT_DTYPES = [torch.float32, torch.float64]
_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().clamp_min(1e-12)
    return float((actual - expected).abs().max() / scale)


def _storages(module: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in module.state_dict().values()}


# ---------------------------------------------------------------------------------------------
# LowRankLinear / LowRankConv2d
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("K,R,N", [(7, 1, 5), (9, 4, 3), (6, 6, 11)])
def test_lowrank_linear_from_factors_uses_A_times_B_as_weight(K, R, N, bias, dtype):
    g = torch.Generator().manual_seed(0)
    B = torch.randn(R, K, generator=g, dtype=torch.float64).to(dtype)
    A = torch.randn(N, R, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(N, generator=g, dtype=torch.float64).to(dtype) if bias else None
    layer = LowRankLinear.from_factors(B, A, b)
    assert (layer.in_features, layer.out_features, layer.rank) == (K, N, R)
    assert layer.B.dtype == layer.A.dtype == dtype
    assert (layer.bias is None) == (not bias)

    x = torch.randn(2, 3, K, generator=g, dtype=torch.float64)
    W = A.double() @ B.double()
    want = x @ W.T + (b.double() if bias else 0)
    with torch.no_grad():
        got = layer(x.to(dtype))
    assert got.dtype == dtype
    assert _rel_err(got, want) < _TOL[dtype]


def test_lowrank_linear_from_factors_copies_its_inputs():
    B, A, b = torch.randn(2, 5), torch.randn(4, 2), torch.randn(4)
    layer = LowRankLinear.from_factors(B, A, b)
    assert not _storages(layer) & {t.untyped_storage().data_ptr() for t in (B, A, b)}
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for t in (B, A, b):
        t.add_(1.0)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("geometry", [((1, 1), (0, 0), (1, 1)), ((2, 1), (1, 2), (2, 1)), ((3, 3), (2, 2), (1, 1))])
def test_lowrank_conv2d_from_factors_is_conv_with_product_kernel(geometry, bias, dtype):
    stride, padding, dilation = geometry
    g = torch.Generator().manual_seed(1)
    C, R, out, kh, kw = 3, 2, 5, 3, 2
    B = torch.randn(R, C, kh, kw, generator=g, dtype=torch.float64)
    A = torch.randn(out, R, generator=g, dtype=torch.float64)
    b = torch.randn(out, generator=g, dtype=torch.float64) if bias else None
    B, A = B.to(dtype), A.to(dtype)
    b = None if b is None else b.to(dtype)
    layer = LowRankConv2d.from_factors(B, A, b, stride, padding, dilation)
    assert layer.B.dtype == dtype
    assert layer.kernel_size == (kh, kw) and layer.rank == R
    assert (layer.stride, layer.padding, layer.dilation) == (stride, padding, dilation)
    W = (A.double() @ B.double().reshape(R, -1)).reshape(out, C, kh, kw)
    x = torch.randn(2, C, 9, 8, generator=g, dtype=torch.float64)
    want = F.conv2d(x, W, None if b is None else b.double(), stride, padding, dilation)
    with torch.no_grad():
        got = layer(x.to(dtype))
    assert got.shape == want.shape
    assert _rel_err(got, want) < _TOL[dtype]


@pytest.mark.parametrize("bias", [True, False])
def test_lowrank_linear_module_backward(bias):
    torch.manual_seed(0)
    layer = LowRankLinear(6, 4, 2, bias=bias)
    x = torch.randn(3, 6)
    layer(x).square().sum().backward()
    assert layer.B.grad is not None and layer.A.grad is not None
    assert layer.B.grad.abs().sum() > 0 and layer.A.grad.abs().sum() > 0


def _expected(layer: LowRankLinear, x: torch.Tensor) -> torch.Tensor:
    y = (x.double() @ layer.B.double().T) @ layer.A.double().T
    return y if layer.bias is None else y + layer.bias.double()


def _check(layer: LowRankLinear, x: torch.Tensor) -> None:
    with torch.no_grad():
        for _ in range(2):  # the first call keeps the transposes, the second uses them
            assert _rel_err(layer(x), _expected(layer, x)) < 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_lowrank_linear_kept_transposes_follow_every_change_of_the_factors(monkeypatch, bias):
    """Eager CPU calls on 2-D inputs without autograd reuse the layer's transposed factors.
    Whatever replaces or changes the factors shows in the next call: in-place updates, `.data`, a
    new Parameter, `load_state_dict`, `.to()` (which also lets the old transposes go), a copy."""
    monkeypatch.delenv("FXSKETCH_KERNEL", raising=False)
    torch.manual_seed(0)
    layer, x = LowRankLinear(8, 6, 3, bias=bias), torch.randn(1, 8)
    _check(layer, x)
    with torch.no_grad():
        layer.B.mul_(2)
    _check(layer, x)
    layer.A.data = torch.randn(6, 3)
    _check(layer, x)
    layer.B = nn.Parameter(torch.randn(3, 8))
    _check(layer, x)
    layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})
    _check(layer, x)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        layer.A.add_(1)
    _check(twin, x)
    _check(pickle.loads(pickle.dumps(layer)), x)
    kept = weakref.ref(layer._transposes.kept[4])
    layer.double()
    assert kept() is None  # the float32 transposes went with the float32 factors
    _check(layer, x.double())


def test_lowrank_linear_kept_transposes_stay_out_of_autograd_and_off_other_devices(monkeypatch):
    monkeypatch.delenv("FXSKETCH_KERNEL", raising=False)
    torch.manual_seed(0)
    layer, x = LowRankLinear(8, 6, 3), torch.randn(2, 8)
    with torch.inference_mode():  # kept in inference mode, then trained on outside it
        layer(x)
    assert layer._transposes.kept is not None
    y = layer(x)
    assert y.grad_fn is not None
    y.square().sum().backward()
    B, A = (t.detach().double().requires_grad_() for t in (layer.B, layer.A))
    ((x.double() @ B.T) @ A.T + layer.bias.double()).square().sum().backward()
    assert _rel_err(layer.B.grad, B.grad) < 1e-5 and _rel_err(layer.A.grad, A.grad) < 1e-5
    meta = LowRankLinear(8, 6, 3).to("meta")
    with torch.no_grad():
        assert meta(x.to("meta")).shape == (2, 6)
    assert meta._transposes.kept is None


# ---------------------------------------------------------------------------------------------
# SKLinear / SKConv2d
# ---------------------------------------------------------------------------------------------


def _panther_linear(x, S1, S2, U1, U2, bias):
    """Panther's formula written out term by term in float64."""
    x = x.double()
    l = S1.shape[0]
    y = sum((x @ S1[i].double()) @ U1[i].double() + (x @ U2[i].double()) @ S2[i].double() for i in range(l))
    y = y / (2 * l)
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("num_terms,low_rank", [(1, 1), (2, 3), (3, 2)])
@pytest.mark.parametrize("d,out", [(7, 5), (10, 13)])
def test_sklinear_forward_is_panther_formula(d, out, num_terms, low_rank, bias):
    g = torch.Generator().manual_seed(2)
    W = torch.randn(out, d, generator=g)
    layer = SKLinear(d, out, num_terms, low_rank, bias=bias, weight=W, seed=3)
    assert layer.S1.shape == (num_terms, d, low_rank)
    assert layer.S2.shape == (num_terms, low_rank, out)
    assert layer.U1.shape == (num_terms, low_rank, out)
    assert layer.U2.shape == (num_terms, d, low_rank)
    assert layer.rank == 2 * num_terms * low_rank
    x = torch.randn(4, 2, d, generator=g)
    want = _panther_linear(x, layer.S1, layer.S2, layer.U1, layer.U2, layer.bias)
    got = layer(x)
    assert got.shape == (4, 2, out)
    assert _rel_err(got, want) < 1e-5


@pytest.mark.parametrize("num_terms,low_rank", [(1, 2), (2, 3)])
def test_sklinear_sketch_initialization_from_weight(num_terms, low_rank):
    """S1_i = Wᵀ U1_iᵀ and S2_i = U2_iᵀ Wᵀ against ±1/√k sign sketches."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(6, 9, generator=g)
    layer = SKLinear(9, 6, num_terms, low_rank, weight=W, seed=5)
    k = low_rank
    for U in (layer.U1, layer.U2):
        torch.testing.assert_close(U.abs(), torch.full_like(U, 1 / k**0.5))
    for i in range(num_terms):
        torch.testing.assert_close(layer.S1[i].double(), W.double().T @ layer.U1[i].double().T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.S2[i].double(), layer.U2[i].double().T @ W.double().T, rtol=1e-5, atol=1e-5)
    # The sketches are fixed: buffers, not trainable parameters.
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"S1", "S2", "bias"}
    assert {n for n, _ in layer.named_buffers()} == {"U1", "U2"}


def test_sklinear_is_unbiased_estimate_of_weight():
    """Averaged over seeds, the collapsed sketch A·B approaches W (E[UᵀU] = I)."""
    g = torch.Generator().manual_seed(6)
    W = torch.randn(6, 8, generator=g, dtype=torch.float64)
    seeds = 300
    acc = torch.zeros_like(W)
    single_errors = []
    for seed in range(seeds):
        with torch.no_grad():
            B, A = SKLinear(8, 6, 1, 2, weight=W, seed=seed).collapsed_factors()
        approx = A.double() @ B.double()
        acc += approx
        single_errors.append(float((approx - W).norm() / W.norm()))
    mean_err = float((acc / seeds - W).norm() / W.norm())
    typical = sum(single_errors) / seeds
    assert typical > 0.3  # one sketch at rank 4 is a rough estimate...
    assert mean_err < typical / 5  # ...but the average over seeds converges to W


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("geometry", [((1, 1), (0, 0), (1, 1)), ((2, 2), (1, 1), (1, 1)), ((1, 2), (2, 1), (2, 2))])
def test_skconv2d_forward_is_panther_formula_on_patches(geometry, bias):
    stride, padding, dilation = geometry
    g = torch.Generator().manual_seed(7)
    C, out, kh, kw = 3, 4, 3, 2
    W = torch.randn(out, C, kh, kw, generator=g)
    layer = SKConv2d(C, out, (kh, kw), 2, 2, stride, padding, dilation, bias=bias, weight=W, seed=8)
    x = torch.randn(2, C, 9, 7, generator=g)
    got = layer(x)
    # The sketch of the (out × C·kh·kw) kernel matrix applied to every patch.
    patches = F.unfold(x.double(), (kh, kw), dilation=dilation, padding=padding, stride=stride)  # N, d, L
    n, d, L = patches.shape
    rows = patches.transpose(1, 2).reshape(n * L, d)
    y = _panther_linear(rows, layer.S1, layer.S2, layer.U1, layer.U2, layer.bias)
    ho = (9 + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (7 + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    want = y.reshape(n, L, out).transpose(1, 2).reshape(n, out, ho, wo)
    assert got.shape == want.shape
    assert _rel_err(got, want) < 1e-5


def _random_dense(kind: str, dtype: torch.dtype, bias: bool) -> nn.Module:
    """A dense layer whose values use the full precision of `dtype`."""
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        layer = nn.Linear(9, 5, bias=bias, dtype=dtype)
    else:
        layer = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=bias, dtype=dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return layer


def _sketch_from_dense(dense: nn.Module, seed: int = 1) -> nn.Module:
    if isinstance(dense, nn.Linear):
        return SKLinear.from_dense(dense, num_terms=2, low_rank=2, seed=seed)
    return SKConv2d.from_dense(dense, num_terms=1, low_rank=3, seed=seed)


def _dense_input(dense: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    shape = (3, 9) if isinstance(dense, nn.Linear) else (2, 3, 8, 8)
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_sketch_from_dense_never_shares_storage(kind, dtype, bias):
    dense = _random_dense(kind, dtype, bias)
    layer = _sketch_from_dense(dense)
    assert all(t.dtype == dtype for t in layer.state_dict().values())
    assert (layer.bias is None) == (not bias)
    assert not _storages(layer) & _storages(dense)
    x = _dense_input(dense, dtype)
    with torch.no_grad():
        before = layer(x).clone()
        assert before.shape == dense(x).shape
        for p in dense.parameters():
            p.mul_(-3.0).add_(1.0)
        assert torch.equal(layer(x), before)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_sketch_from_dense_copies_bias_exactly(kind, dtype):
    dense = _random_dense(kind, dtype, True)
    layer = _sketch_from_dense(dense)
    assert layer.bias.dtype == dtype
    assert torch.equal(layer.bias, dense.bias)


def test_sklinear_from_dense_sketches_the_dense_weight():
    dense = _random_dense("linear", torch.float32, True)
    layer = SKLinear.from_dense(dense, num_terms=2, low_rank=2, seed=1)
    ref = SKLinear(9, 5, 2, 2, weight=dense.weight.detach().clone(), seed=1)
    for name in ("S1", "S2", "U1", "U2"):
        assert torch.equal(getattr(layer, name), getattr(ref, name)), name


def test_skconv2d_from_dense_keeps_geometry():
    dense = _random_dense("conv", torch.float32, True)
    layer = SKConv2d.from_dense(dense, num_terms=1, low_rank=3)
    assert (layer.stride, layer.padding, layer.dilation) == ((2, 1), (1, 0), (1, 2))
    assert layer.kernel_size == (3, 2)
    assert (layer.in_channels, layer.out_channels) == (3, 4)


def test_sketch_seeds_are_deterministic():
    W = torch.randn(5, 7)
    a, b, c = (SKLinear(7, 5, 2, 2, weight=W, seed=s) for s in (11, 11, 12))
    for name in ("U1", "U2", "S1", "S2"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.U1, c.U1)


def _regression_losses(layer: nn.Module, x, y, steps: int, lr: float) -> list[float]:
    opt = torch.optim.SGD(layer.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    losses.append(F.mse_loss(layer(x), y).item())
    return losses


@pytest.mark.parametrize("bias", [True, False])
def test_sklinear_training_reduces_loss(bias):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(64, 8, generator=g)
    W_true = torch.randn(4, 8, generator=g)
    y = x @ W_true.T + (0.5 if bias else 0.0)
    torch.manual_seed(0)
    layer = SKLinear(8, 4, num_terms=2, low_rank=2, bias=bias, seed=3)
    U1, U2 = layer.U1.clone(), layer.U2.clone()
    losses = _regression_losses(layer, x, y, steps=8, lr=0.2)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.75 * losses[0], losses
    assert torch.equal(layer.U1, U1) and torch.equal(layer.U2, U2)  # sketches stay fixed


@pytest.mark.parametrize("bias", [True, False])
def test_skconv2d_training_reduces_loss(bias):
    g = torch.Generator().manual_seed(10)
    x = torch.randn(8, 2, 6, 6, generator=g)
    target = nn.Conv2d(2, 3, 3, padding=1, bias=bias)
    with torch.no_grad():
        y = target(x)
    torch.manual_seed(0)
    layer = SKConv2d(2, 3, 3, num_terms=1, low_rank=3, padding=1, bias=bias, seed=4)
    losses = _regression_losses(layer, x, y, steps=8, lr=0.05)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("num_terms,low_rank", [(0, 1), (1, 0), (-1, 2), (2, -3)])
def test_sketch_modules_reject_invalid_sizes(num_terms, low_rank):
    with pytest.raises(ValueError, match="num_terms and low_rank must be >= 1"):
        SKLinear(4, 3, num_terms, low_rank)
    with pytest.raises(ValueError, match="num_terms and low_rank must be >= 1"):
        SKConv2d(2, 3, 3, num_terms, low_rank)
    with pytest.raises(ValueError, match="num_terms and low_rank must be >= 1"):
        SKLinear.from_dense(nn.Linear(4, 3), num_terms, low_rank)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 4, 3, groups=2),
        nn.Conv2d(4, 8, 3, groups=4),
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(2, 3, 3, padding="same"),
    ],
    ids=["groups2", "depthwise", "reflect", "same"],
)
def test_skconv2d_from_dense_rejects_unsupported_convs(conv):
    with pytest.raises(ValueError, match="groups=1"):
        SKConv2d.from_dense(conv, num_terms=1, low_rank=2)


# --------------------------------------------------------------------------- sketched layers built by users


@pytest.mark.usefixtures("one_thread")
def test_skconv2d_extra_repr_shows_the_sizes():
    layer = pr.nn.SKConv2d(3, 8, 3, num_terms=2, low_rank=4, stride=2, padding=1)
    text = repr(layer)
    assert text.startswith("SKConv2d(3, 8, kernel_size=(3, 3)")
    assert "num_terms=2" in text and "low_rank=4" in text and "stride=(2, 2)" in text and "padding=(1, 1)" in text


def _model_of_user_built_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(pr.nn.SKConv2d(3, 8, 3, num_terms=2, low_rank=2, padding=1), nn.ReLU(), nn.Flatten(),
                         pr.nn.SKLinear(8 * 6 * 6, 10, num_terms=2, low_rank=4)).eval()


@pytest.mark.usefixtures("one_thread")
def test_user_built_sketched_layers_export_to_the_fxsketch_ops():
    """`pr.nn.SKLinear`/`SKConv2d` run on the same fxsketch ops as the rewrite: one op node each in export."""
    model = _model_of_user_built_layers()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fxsketch.lowrank_linear.default) == 1
    assert targets.count(torch.ops.fxsketch.lowrank_conv2d.default) == 1
    assert not {torch.ops.aten.linear.default, torch.ops.aten.conv2d.default} & set(targets)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))


@pytest.mark.usefixtures("one_thread")
def test_user_built_sketched_layers_compile_and_run_on_the_triton_kernels(monkeypatch):
    model = _model_of_user_built_layers()
    x = torch.randn(2, 3, 6, 6)
    monkeypatch.setenv("FXSKETCH_KERNEL", "aten")
    with torch.no_grad():
        expected = model(x)
    monkeypatch.setenv("FXSKETCH_KERNEL", "triton")  # the interpreter on CPU (tests/conftest.py)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("FXSKETCH_KERNEL", "aten")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_the_sketch_kind_of_the_rewrite_builds_the_same_modules_users_build():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(12, 8))
    gm = pr.rewrite(dense, {"0": {"method": "sketch", "num_terms": 2, "low_rank": 3}}, torch.randn(2, 12))
    built = gm.get_submodule("0")
    from fxsketch.replacements.sketch import layer_seed

    by_hand = SKLinear.from_dense(dense[0], num_terms=2, low_rank=3, seed=layer_seed("0"))
    assert type(built) is SKLinear and repr(built) == repr(by_hand)
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(built(x), by_hand(x))
