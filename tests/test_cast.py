"""The reduced-precision ops and kinds (bf16, fp16 inside a float32 model): every path against the
reference, gradients, export, a `.pt2` round trip in a fresh process, the meta device, and where
searches offer them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsketch
from fxsketch.capture import find_layers
from fxsketch.kernels import cast_linear, cast_lowrank_linear
from fxsketch.kernels.aten import cast_linear_aten, cast_lowrank_linear_aten
from fxsketch.replacements.precision import fast
from conftest import loaded_in_fresh_process

DTYPES = [torch.bfloat16, torch.float16]


def _args(dtype, seed=0, lead=(3, 5), K=24, R=6, N=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g)
    W, b = torch.randn(N, K, generator=g).to(dtype), torch.randn(N, generator=g).to(dtype)
    B, A = torch.randn(R, K, generator=g).to(dtype), torch.randn(N, R, generator=g).to(dtype)
    return x, W, b, B, A


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_path_is_the_float64_layer_of_the_rounded_weights_within_the_dtypes_error(dtype):
    x, W, b, B, A = _args(dtype)
    tol = {torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    exact = x.double().to(dtype).double() @ W.double().T + b.double()
    for y in (cast_linear(x, W, b), torch.ops.fxsketch.cast_linear(x, W, b), cast_linear_aten(x, W, b)):
        assert y.dtype == torch.float32 and y.shape == (3, 5, 10)
        assert (y.double() - exact).abs().max() <= tol * exact.abs().max()
    lowrank = (x.double().to(dtype).double() @ B.double().T).to(dtype).double() @ A.double().T + b.double()
    for y in (cast_lowrank_linear(x, B, A, b), torch.ops.fxsketch.cast_lowrank_linear(x, B, A, b),
              cast_lowrank_linear_aten(x, B, A, b)):
        assert y.dtype == torch.float32
        assert (y.double() - lowrank).abs().max() <= tol * lowrank.abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_reach_the_input_and_the_reduced_weights(dtype):
    x, W, b, B, A = _args(dtype, seed=1)
    for t in (x, W, b, B, A):
        t.requires_grad_(True)
    cast_linear(x, W, b).pow(2).sum().backward()
    cast_lowrank_linear(x, B, A, None).sum().backward()
    assert x.grad.dtype == torch.float32 and W.grad.dtype == dtype and b.grad.dtype == dtype
    assert B.grad.dtype == dtype and A.grad.dtype == dtype
    ref_x = x.detach().double().requires_grad_(True)  # the float64 layer of the rounded weights
    Wd, bd, Bd, Ad = (t.detach().double() for t in (W, b, B, A))
    ((ref_x @ Wd.T + bd).pow(2).sum() + ((ref_x @ Bd.T) @ Ad.T).sum()).backward()
    tol = {torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    assert (x.grad.double() - ref_x.grad).norm() <= tol * ref_x.grad.norm()


def test_opcheck():
    x, W, b, B, A = _args(torch.bfloat16, seed=2)
    torch.library.opcheck(torch.ops.fxsketch.cast_linear.default, (x, W, b))
    torch.library.opcheck(torch.ops.fxsketch.cast_lowrank_linear.default, (x, B, A, None))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).eval()


PLAN = {"0": {"method": "bf16"}, "2": {"method": "svd", "low_rank": 8, "precision": "bf16"},
        "4": {"method": "fp16"}}


def test_rewrite_keeps_float32_io_and_saves_and_loads_in_a_fresh_process(tmp_path):
    model, x = _model(), torch.randn(40, 32)
    gm = fxsketch.rewrite(model, PLAN, x)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(cast_linear) == 2 and targets.count(cast_lowrank_linear) == 1
    assert {t.dtype for t in gm.state_dict().values()} == {torch.bfloat16, torch.float16}
    with torch.no_grad():
        out, exact = gm(x), fxsketch.rewrite(model, {"2": {"method": "svd", "low_rank": 8}}, x)(x)
    assert out.dtype == torch.float32 and (out - exact).abs().max() <= 0.05 * exact.abs().max()
    path = tmp_path / "half.pt2"
    program = fxsketch.save(gm, path, x)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"fxsketch.cast_linear.default", "fxsketch.cast_lowrank_linear.default"} <= ops
    loaded_in_fresh_process(path, x[:7], out[:7], tmp_path)


def test_rewrite_on_meta_builds_every_tensor_there():
    gm = fxsketch.rewrite(_model().to("meta"), PLAN, torch.randn(40, 32, device="meta"))
    assert {t.device.type for t in gm.state_dict().values()} == {"meta"}
    assert gm(torch.randn(4, 32, device="meta")).device.type == "meta"


def test_reduced_precision_is_offered_only_where_it_is_fast():
    records = {r.name: r for r in find_layers(fxsketch.capture(_model(), torch.randn(4, 32)))}
    cpu = records["0"]
    assert fast(cpu, "fp16") is False  # CPUs have no fast fp16 GEMM
    assert fast(cpu, "bf16") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    cuda = type(cpu)(**{**cpu.__dict__, "device": "cuda"})
    assert fast(cuda, "bf16") and fast(cuda, "fp16")
    assert not fast(type(cpu)(**{**cpu.__dict__, "device": "cuda", "dtype": torch.bfloat16}), "bf16")
    assert not fast(cuda, "int8")  # the int8 ops have no fast CUDA path yet: its reference only
