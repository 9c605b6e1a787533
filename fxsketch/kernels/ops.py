"""Registration of the fxsketch op family with `torch.library`.

`fxsketch::cast_linear(x, weight, bias)` and `fxsketch::cast_lowrank_linear(x, B, A, bias)` compute in
their weights' dtype (bf16, fp16) and return x's: a layer in reduced precision inside a float32 model.
`fxsketch::int8_linear(x, weight_q, weight_scale, bias, input_scale)` is a Linear with int8 weights
(one scale per output channel) and dynamically quantized int8 activations (the input first
multiplied by `input_scale` per feature in a smoothed layer); `fxsketch::int8_lowrank_linear`
runs the two factors of a low-rank layer that way. `fxsketch::int8_static_linear(x, weight_q,
weight_scale, bias, input_scale, input_qparams)` quantizes its input with a fixed (scale, zero
point) instead; `fxsketch::int8_mlp(x, w1_q, w1_scale, b1, input_scale, activation, w2_q, w2_scale,
b2, mid_qparams)` is an int8 layer, an activation and a static int8 layer as one op, so the CPU
kernel can hand the second GEMM the first one's uint8 output. `fxsketch::int8_weight_linear(x, weight_q,
weight_scale, bias)` keeps only the weight in int8 and computes in x's dtype;
`fxsketch::int8_embedding(indices, weight_q, weight_scale)` looks rows up in an int8 embedding table
(one scale per row) and returns them in the scales' dtype (composite: exported as a lookup and a
multiply). Their bodies are in `fxsketch.kernels.int8`. `fxsketch::half_attention` is
`scaled_dot_product_attention` computed in a 16-bit dtype and returned in the query's (composite).

`fxsketch::lowrank_linear(x, B, A, bias)` computes `(x · Bᵀ) · Aᵀ + bias` for x of shape (..., K),
B (R, K), A (N, R). `fxsketch::lowrank_conv2d` is the convolutional twin. These five ops are
composite (CompositeImplicitAutograd): `torch.export` records each as one node, while
`torch.compile` traces through it and sees what runs, two GEMMs (cast and GEMM for the cast ops),
or on CUDA the fused Triton kernel as a `torch.library.triton_op` whose kernel Inductor compiles
and CUDA graphs replay. Autograd comes from the body. The int8 ops are opaque (FBGEMM's and oneDNN's packed
GEMMs), with fake kernels and a straight-through autograd formula.
"""

from __future__ import annotations

import functools
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from fxsketch.kernels.aten import (
    cast_linear_aten, cast_lowrank_linear_aten, half_attention_aten, lowrank_conv2d_aten, lowrank_linear_aten,
)
from fxsketch.kernels.choose import choose, chosen
from fxsketch.kernels.int8 import (
    ACTIVATIONS, fbgemm_available, int8_embedding_aten, int8_linear_fbgemm, int8_linear_onednn, int8_linear_reference,
    int8_mlp_cpu, int8_mlp_reference, int8_static_linear_fbgemm, int8_weight_linear_aten, onednn_pays,
)

BACKENDS = ("aten", "triton")
_ENV = "FXSKETCH_KERNEL"
# os.environ.get encodes its key on every call (~0.7 µs, a sixth of a small layer's two GEMMs): the
# eager path looks the encoded key up in the mapping behind os.environ when CPython has one
_RAW_ENV = getattr(os.environ, "_data", None)
_CHEAP_ENV = isinstance(_RAW_ENV, dict) and hasattr(os.environ, "encodekey")
_RAW_KEY = os.environ.encodekey(_ENV) if _CHEAP_ENV else None
if not _CHEAP_ENV:  # no plain mapping to peek at: `_RAW_KEY in _RAW_ENV` always holds, so callers read os.environ
    _RAW_ENV, _RAW_KEY = {None: None}, None
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what "auto" may send to the fused kernel

_LIB = torch.library.Library("fxsketch", "DEF")
_LIB.define("lowrank_linear(Tensor x, Tensor B, Tensor A, Tensor? bias=None) -> Tensor")
_LIB.define(
    "lowrank_conv2d(Tensor x, Tensor B, Tensor A, Tensor? bias, SymInt[2] stride, "
    "SymInt[2] padding, SymInt[2] dilation) -> Tensor"
)
_LIB.define("cast_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor")
_LIB.define("cast_lowrank_linear(Tensor x, Tensor B, Tensor A, Tensor? bias=None) -> Tensor")
_LIB.define("int8_linear(Tensor x, Tensor weight_q, Tensor weight_scale, Tensor? bias=None, "
            "Tensor? input_scale=None) -> Tensor")
_LIB.define("int8_static_linear(Tensor x, Tensor weight_q, Tensor weight_scale, Tensor? bias, "
            "Tensor? input_scale, Tensor input_qparams) -> Tensor")
_LIB.define("int8_mlp(Tensor x, Tensor w1_q, Tensor w1_scale, Tensor? b1, Tensor? input_scale, str activation, "
            "Tensor w2_q, Tensor w2_scale, Tensor? b2, Tensor mid_qparams) -> Tensor")
_LIB.define("int8_weight_linear(Tensor x, Tensor weight_q, Tensor weight_scale, Tensor? bias=None) -> Tensor")
_LIB.define("int8_lowrank_linear(Tensor x, Tensor B_q, Tensor B_scale, Tensor A_q, Tensor A_scale, "
            "Tensor? bias=None, Tensor? input_scale=None) -> Tensor")
_LIB.define("int8_embedding(Tensor indices, Tensor weight_q, Tensor weight_scale) -> Tensor")
_LIB.define("half_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, float dropout_p=0.0, "
            "bool is_causal=False, *, float? scale=None, ScalarType dtype) -> Tensor")


def _forced_kernel() -> str | None:
    """The FXSKETCH_KERNEL setting (None when unset), read cheaply: it may change at any time."""
    if _RAW_KEY not in _RAW_ENV:
        return None
    return os.environ.get(_ENV) or None


def kernel_backend(x: torch.Tensor) -> str:
    """Which implementation runs for tensors like `x`: FXSKETCH_KERNEL=triton|aten forces one; unset
    picks ATen off CUDA and, on CUDA, the faster of the fused Triton kernel and the cuBLAS chain
    for each shape ("auto", timed once per shape by `fxsketch.kernels.choose`). float64 stays on
    ATen unless forced: the fused kernel's float64 dot does not compile under every Triton our
    torch range pairs with (3.6 asserts), and float64 is no serving dtype."""
    forced = _forced_kernel()
    if forced:
        forced = forced.strip().lower()
        if forced not in BACKENDS:
            raise ValueError(f"FXSKETCH_KERNEL={forced!r} is not one of {BACKENDS}: unset it or pick one")
        return forced
    return "auto" if x.is_cuda and x.dtype in FUSED_DTYPES and _triton_available() else "aten"


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _pick(kind: str, x: torch.Tensor, B: torch.Tensor, A: torch.Tensor, bias, fused, chain, geometry=()) -> str:
    backend = kernel_backend(x)
    tracing = torch.compiler.is_compiling() or type(x) not in _PLAIN  # fake or functional tensors
    if backend == "triton" and tracing:
        from fxsketch.kernels.triton_lowrank import interpreting  # imports triton, optional off Linux

        return "aten" if interpreting() else "triton"  # the interpreter's kernels take no fake tensors
    if backend != "auto":
        return backend
    M = x.numel() // max(x.shape[-1], 1) if kind == "linear" else x.shape[0] * x.shape[2] * x.shape[3]
    if tracing and not isinstance(M, int):  # a symbolic size: reading it would pin the graph to one value
        return "aten"
    key = (kind, 1 << max(M - 1, 0).bit_length(), tuple(B.shape), A.shape[0], x.dtype, bias is not None,
           torch.backends.cuda.matmul.allow_tf32, x.device.index, geometry)
    if tracing:  # fake tensors cannot be timed: a traced graph keeps what eager chose for the shape
        return chosen(key)
    with torch.cuda.device(x.device):
        return choose(key, {"triton": fused, "aten": chain})


@functools.cache
def _fused_ops() -> SimpleNamespace:
    """The fused Triton kernels as `triton_op`s, defined on first use (they import triton): traced by
    `torch.compile`, they reach Inductor as Triton kernels it compiles into the graph."""
    from fxsketch.kernels.triton_lowrank import lowrank_linear_triton, pointwise_conv_triton  # optional off Linux

    # the schemas come from the functions' annotations (triton_op infers them, whatever it is given)
    linear = torch.library.triton_op("fxsketch::lowrank_linear_fused", lowrank_linear_triton, mutates_args=())
    pointwise = torch.library.triton_op("fxsketch::pointwise_conv_fused", pointwise_conv_triton, mutates_args=())
    # explicit fakes: fake propagation outside a tracer need not run the kernel's launch code
    linear.register_fake(lambda x, B, A, bias=None: _lowrank_out("lowrank_linear_fused", x, B, A))
    pointwise.register_fake(lambda t, A, bias=None: t.new_empty((t.shape[0], A.shape[0], *t.shape[2:])))
    linear.register_autograd(_linear_backward, setup_context=_linear_setup)
    pointwise.register_autograd(_pointwise_backward, setup_context=_pointwise_setup)
    return SimpleNamespace(linear=linear, pointwise=pointwise, linear_eager=lowrank_linear_triton,
                           pointwise_eager=pointwise_conv_triton)


def _lowrank_linear_impl(x, B, A, bias=None, *, eager=False):
    def fused():
        ops = _fused_ops()
        return (ops.linear_eager if eager else ops.linear)(x, B, A, bias)

    def chain():
        return lowrank_linear_aten(x, B, A, bias)

    return fused() if _pick("linear", x, B, A, bias, fused, chain) == "triton" else chain()


def _lowrank_conv2d_impl(x, B, A, bias, stride, padding, dilation, *, eager=False):
    def fused():
        ops = _fused_ops()
        return (ops.pointwise_eager if eager else ops.pointwise)(F.conv2d(x, B, None, stride, padding, dilation),
                                                                 A, bias)

    def chain():
        return lowrank_conv2d_aten(x, B, A, bias, stride, padding, dilation)

    geometry = (tuple(stride), tuple(padding), tuple(dilation), tuple(x.shape[2:]))
    return fused() if _pick("conv2d", x, B, A, bias, fused, chain, geometry) == "triton" else chain()


def _int8_cpu(x: torch.Tensor, *biases: torch.Tensor | None) -> bool:
    """Whether the CPU kernels (FBGEMM, oneDNN) take this call: float32 on a CPU that runs them."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and all(b is None or b.dtype == torch.float32
                                                                         for b in biases)
            and _forced_kernel() != "aten" and fbgemm_available())


def _int8_linear_impl(x, weight_q, weight_scale, bias=None, input_scale=None):
    if not _int8_cpu(x, bias):
        return int8_linear_reference(x, weight_q, weight_scale, bias, input_scale)
    kernel = int8_linear_onednn if onednn_pays(x, weight_q) else int8_linear_fbgemm
    return kernel(x, weight_q, weight_scale, bias, input_scale)


def _int8_static_linear_impl(x, weight_q, weight_scale, bias, input_scale, input_qparams):
    if not _int8_cpu(x, bias):
        return int8_linear_reference(x, weight_q, weight_scale, bias, input_scale, input_qparams)
    if onednn_pays(x, weight_q):
        return int8_linear_onednn(x, weight_q, weight_scale, bias, input_scale, input_qparams)
    return int8_static_linear_fbgemm(x, weight_q, weight_scale, bias, input_scale, input_qparams)


def _int8_mlp_impl(x, w1_q, w1_scale, b1, input_scale, activation, w2_q, w2_scale, b2, mid_qparams):
    if activation not in ACTIVATIONS:
        raise ValueError(f"int8_mlp: activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
    body = int8_mlp_cpu if _int8_cpu(x, b1, b2) else int8_mlp_reference
    return body(x, w1_q, w1_scale, b1, input_scale, activation, w2_q, w2_scale, b2, mid_qparams)


def _int8_lowrank_linear_impl(x, B_q, B_scale, A_q, A_scale, bias=None, input_scale=None):
    return _int8_linear_impl(_int8_linear_impl(x, B_q, B_scale, None, input_scale), A_q, A_scale, bias)


# The lower-level Library API keeps per-call overhead near a plain ATen call (~2 µs instead of
# ~7 µs for `torch.library.custom_op`), which shows at decode-sized inputs. One implementation
# serves every device and picks its kernel per call, so FXSKETCH_KERNEL also reaches CPU tensors.
_LIB.impl("lowrank_linear", _lowrank_linear_impl, "CompositeImplicitAutograd")
_LIB.impl("lowrank_conv2d", _lowrank_conv2d_impl, "CompositeImplicitAutograd")
_LIB.impl("cast_linear", cast_linear_aten, "CompositeImplicitAutograd")
_LIB.impl("cast_lowrank_linear", cast_lowrank_linear_aten, "CompositeImplicitAutograd")
_LIB.impl("int8_weight_linear", int8_weight_linear_aten, "CompositeImplicitAutograd")
_LIB.impl("int8_embedding", int8_embedding_aten, "CompositeImplicitAutograd")
_LIB.impl("half_attention", half_attention_aten, "CompositeImplicitAutograd")
_LIB.impl("int8_linear", _int8_linear_impl, "CompositeExplicitAutograd")
_LIB.impl("int8_lowrank_linear", _int8_lowrank_linear_impl, "CompositeExplicitAutograd")
_LIB.impl("int8_static_linear", _int8_static_linear_impl, "CompositeExplicitAutograd")
_LIB.impl("int8_mlp", _int8_mlp_impl, "CompositeExplicitAutograd")


def _linear_out(op: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    torch._check(x.shape[-1] == weight.shape[1],
                 lambda: f"{op}: x has {x.shape[-1]} features, the weight expects {weight.shape[1]}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _lowrank_out(op: str, x: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    torch._check(x.shape[-1] == B.shape[1], lambda: f"{op}: x has {x.shape[-1]} features, B expects {B.shape[1]}")
    torch._check(A.shape[1] == B.shape[0], lambda: f"{op}: A has rank {A.shape[1]}, B has {B.shape[0]}")
    return x.new_empty((*x.shape[:-1], A.shape[0]))


@torch.library.register_fake("fxsketch::int8_linear")
def _int8_linear_fake(x, weight_q, weight_scale, bias=None, input_scale=None):
    return _linear_out("int8_linear", x, weight_q)


@torch.library.register_fake("fxsketch::int8_lowrank_linear")
def _int8_lowrank_linear_fake(x, B_q, B_scale, A_q, A_scale, bias=None, input_scale=None):
    return _lowrank_out("int8_lowrank_linear", x, B_q, A_q)


@torch.library.register_fake("fxsketch::int8_static_linear")
def _int8_static_linear_fake(x, weight_q, weight_scale, bias, input_scale, input_qparams):
    return _linear_out("int8_static_linear", x, weight_q)


@torch.library.register_fake("fxsketch::int8_mlp")
def _int8_mlp_fake(x, w1_q, w1_scale, b1, input_scale, activation, w2_q, w2_scale, b2, mid_qparams):
    return _lowrank_out("int8_mlp", x, w1_q, w2_q)


def _dequantized(q: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return q.to(like.dtype) * scale.to(like.dtype)[:, None]


def _int8_setup(ctx, inputs, output, factors: int):
    # (x, q, scale[, q, scale], bias?, input_scale?): `factors` (q, scale) pairs after x
    pairs = inputs[1:1 + 2 * factors]
    rest = list(inputs[1 + 2 * factors:]) + [None, None]
    ctx.save_for_backward(*pairs, rest[1] if rest[1] is not None else pairs[1].new_ones(0))
    ctx.has_bias, ctx.smoothed = rest[0] is not None, rest[1] is not None


def _int8_backward(ctx, gy):
    # int8 weights do not train; the input's gradient passes straight through the quantization
    *pairs, input_scale = ctx.saved_tensors
    needs = ctx.needs_input_grad
    g = gy
    for i in range(len(pairs) - 2, -1, -2):  # the last factor first
        g = g @ _dequantized(pairs[i], pairs[i + 1], gy)
    if ctx.smoothed:
        g = g * input_scale.to(g.dtype)
    grads = [g if needs[0] else None, *(None,) * len(pairs)]
    if len(needs) > len(grads):
        grads.append(gy.reshape(-1, gy.shape[-1]).sum(0) if (ctx.has_bias and needs[len(grads)]) else None)
    grads += [None] * (len(needs) - len(grads))  # input_scale does not train
    return tuple(grads)


def _mlp_setup(ctx, inputs, output):
    x, w1_q, w1_scale, b1, input_scale, activation, w2_q, w2_scale, b2, _ = inputs
    ctx.save_for_backward(x, w1_q, w1_scale, w2_q, w2_scale, b1 if b1 is not None else x.new_zeros(0),
                          input_scale if input_scale is not None else x.new_ones(0))
    ctx.activation, ctx.has_b1, ctx.has_b2 = activation, b1 is not None, b2 is not None


def _mlp_backward(ctx, gy):
    # straight through both quantizations; the activation's own derivative at the first layer's output
    x, w1_q, w1_scale, w2_q, w2_scale, b1, input_scale = ctx.saved_tensors
    needs = ctx.needs_input_grad
    smoothed = input_scale.numel() > 0
    with torch.no_grad():
        h = int8_linear_reference(x, w1_q, w1_scale, b1 if ctx.has_b1 else None, input_scale if smoothed else None)
    with torch.enable_grad():
        h = h.detach().requires_grad_(True)
        (gh,) = torch.autograd.grad(ACTIVATIONS[ctx.activation][0](h), h, gy @ _dequantized(w2_q, w2_scale, gy))
    gx = gh @ _dequantized(w1_q, w1_scale, gy)
    if smoothed:
        gx = gx * input_scale.to(gx.dtype)
    gb1 = gh.reshape(-1, gh.shape[-1]).sum(0) if ctx.has_b1 and needs[3] else None
    gb2 = gy.reshape(-1, gy.shape[-1]).sum(0) if ctx.has_b2 and needs[8] else None
    return gx if needs[0] else None, None, None, gb1, None, None, None, None, gb2, None


def _linear_setup(ctx, inputs, output):
    x, B, A, bias = inputs
    ctx.save_for_backward(x, B, A)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, gy):
    x, B, A = ctx.saved_tensors
    needs = ctx.needs_input_grad  # three entries when bias was left out of the call
    need_x, need_B, need_A = needs[:3]
    need_bias = len(needs) > 3 and needs[3]
    x2 = x.reshape(-1, x.shape[-1])
    gy2 = gy.reshape(-1, gy.shape[-1])
    gt = gy2 @ A  # gradient at the rank-R intermediate, (M, R)
    gx = (gt @ B).reshape(x.shape) if need_x else None
    gB = gt.T @ x2 if need_B else None
    gA = gy2.T @ (x2 @ B.T) if need_A else None
    gbias = gy2.sum(0) if (need_bias and ctx.has_bias) else None
    return (gx, gB, gA, gbias)[: len(needs)]


def _pointwise_setup(ctx, inputs, output):
    t, A, bias = inputs
    ctx.save_for_backward(t, A)
    ctx.has_bias = bias is not None


def _pointwise_backward(ctx, gy):
    t, A = ctx.saved_tensors
    needs = ctx.needs_input_grad
    gt = torch.einsum("nohw,or->nrhw", gy, A) if needs[0] else None
    gA = torch.einsum("nohw,nrhw->or", gy, t) if needs[1] else None
    gbias = gy.sum((0, 2, 3)) if len(needs) > 2 and needs[2] and ctx.has_bias else None
    return (gt, gA, gbias)[: len(needs)]


torch.library.register_autograd("fxsketch::int8_linear", _int8_backward,
                                setup_context=functools.partial(_int8_setup, factors=1))
torch.library.register_autograd("fxsketch::int8_lowrank_linear", _int8_backward,
                                setup_context=functools.partial(_int8_setup, factors=2))
torch.library.register_autograd("fxsketch::int8_static_linear", _int8_backward,
                                setup_context=functools.partial(_int8_setup, factors=1))
torch.library.register_autograd("fxsketch::int8_mlp", _mlp_backward, setup_context=_mlp_setup)


def _eager_inference(x: torch.Tensor, B: torch.Tensor) -> bool:
    """True for a plain eager call with autograd off: nothing records the op, so the dispatcher's
    autograd layer (a Python kernel, ~5 µs a call) can be skipped. Tracers (FX proxies, export's
    fake tensors, Dynamo) never take this path, so graphs always hold the single fxsketch op."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    return type(x) in _PLAIN and type(B) in _PLAIN


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_TENSOR = torch.Tensor
_is_compiling = torch.compiler.is_compiling  # one global lookup, not two attribute reads
_grad_enabled, _mm, _addmm = torch.is_grad_enabled, torch.mm, torch.addmm


class FactorTransposes:
    """A low-rank layer's `Bᵀ` and `Aᵀ`, kept from call to call by the layer that owns the factors.

    On a one-row layer the transposes `F.linear` makes on every call cost about a fifth of its two
    GEMMs; with them kept, the eager CPU path runs `mm` and `addmm` directly. The kept tensors share
    the factors' storage, so in-place updates show through; they are rebuilt when the factors are
    other tensors or their `.data` was replaced. Copies and pickles start empty.
    """

    __slots__ = ("kept",)

    def __init__(self) -> None:
        self.kept: tuple | None = None  # (B, A, B's address, A's address, Bᵀ, Aᵀ), replaced whole

    def of(self, B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(Bᵀ, Aᵀ)` of these factors (for plain CPU tensors outside autograd). Read and replaced
        as one tuple, so threads calling one layer never see half an update."""
        k = self.kept
        if k is None or k[0] is not B or k[1] is not A or k[2] != B.data_ptr() or k[3] != A.data_ptr():
            k = self.kept = (B, A, B.data_ptr(), A.data_ptr(), B.t().detach(), A.t().detach())
        return k[4], k[5]

    def __reduce__(self) -> tuple:
        return FactorTransposes, ()

    def __deepcopy__(self, memo: dict) -> "FactorTransposes":
        return FactorTransposes()


def lowrank_linear(
    x: torch.Tensor, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None = None,
    transposes: FactorTransposes | None = None,
) -> torch.Tensor:
    """`(x · Bᵀ) · Aᵀ + bias` for x (..., K), B (R, K), A (N, R), bias (N,) through the fxsketch op.
    A layer calling it on every forward passes its `FactorTransposes`, which an eager CPU call on a 2-D x
    without autograd uses instead of transposing the factors again."""
    if type(x) is _TENSOR and not x.is_cuda and _RAW_KEY not in _RAW_ENV and not _is_compiling():
        # the CPU's one path, spelled out (the op's composite body, autograd included), with an
        # unset FXSKETCH_KERNEL checked inline and the cheapest tests first: on a small layer every
        # 0.1 µs counts against the two GEMMs. Tracers' inputs (FX proxies, fake tensors) are not
        # plain tensors, and Dynamo answers `_is_compiling()`, so graphs still hold the one op.
        if transposes is not None and x.dim() == 2 and not _grad_enabled() and x.is_cpu:
            Bt, At = transposes.of(B, A)
            return _mm(_mm(x, Bt), At) if bias is None else _addmm(bias, _mm(x, Bt), At)
        return F.linear(F.linear(x, B), A, bias)
    if _eager_inference(x, B):
        return _lowrank_linear_impl(x, B, A, bias, eager=True)
    return torch.ops.fxsketch.lowrank_linear(x, B, A, bias)


def lowrank_conv2d(
    x: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """k×k conv of x with B (R, C, kh, kw) to R channels, then 1×1 conv with A (N, R) plus bias."""
    if _eager_inference(x, B):
        return _lowrank_conv2d_impl(x, B, A, bias, list(stride), list(padding), list(dilation), eager=True)
    return torch.ops.fxsketch.lowrank_conv2d(x, B, A, bias, list(stride), list(padding), list(dilation))


def int8_linear(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`x · (weight_q · weight_scale)ᵀ + bias` with x (times `input_scale`, per feature, when given)
    quantized to int8 on the fly, through the fxsketch op."""
    if _eager_inference(x, weight_scale):
        return _int8_linear_impl(x, weight_q, weight_scale, bias, input_scale)
    return torch.ops.fxsketch.int8_linear(x, weight_q, weight_scale, bias, input_scale)


def int8_static_linear(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None, input_scale: torch.Tensor | None,
                       input_qparams: torch.Tensor) -> torch.Tensor:
    """`int8_linear` with x quantized by the fixed `input_qparams` (scale, zero point), through the fxsketch op."""
    if _eager_inference(x, weight_scale):
        return _int8_static_linear_impl(x, weight_q, weight_scale, bias, input_scale, input_qparams)
    return torch.ops.fxsketch.int8_static_linear(x, weight_q, weight_scale, bias, input_scale, input_qparams)


def int8_mlp(x: torch.Tensor, w1_q: torch.Tensor, w1_scale: torch.Tensor, b1: torch.Tensor | None,
             input_scale: torch.Tensor | None, activation: str, w2_q: torch.Tensor, w2_scale: torch.Tensor,
             b2: torch.Tensor | None, mid_qparams: torch.Tensor) -> torch.Tensor:
    """`int8_linear`, `activation` ("relu", "gelu", "gelu_tanh"), then `int8_static_linear` with
    `mid_qparams`, as one fxsketch op."""
    if _eager_inference(x, w1_scale):
        return _int8_mlp_impl(x, w1_q, w1_scale, b1, input_scale, activation, w2_q, w2_scale, b2, mid_qparams)
    return torch.ops.fxsketch.int8_mlp(x, w1_q, w1_scale, b1, input_scale, activation, w2_q, w2_scale, b2,
                                       mid_qparams)


def int8_lowrank_linear(x: torch.Tensor, B_q: torch.Tensor, B_scale: torch.Tensor, A_q: torch.Tensor,
                        A_scale: torch.Tensor, bias: torch.Tensor | None = None,
                        input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A low-rank Linear whose two factors are int8 layers (`int8_linear` on B, then on A)."""
    if _eager_inference(x, B_scale):
        return _int8_lowrank_linear_impl(x, B_q, B_scale, A_q, A_scale, bias, input_scale)
    return torch.ops.fxsketch.int8_lowrank_linear(x, B_q, B_scale, A_q, A_scale, bias, input_scale)


def cast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x · weightᵀ + bias` computed in the weight's dtype, returned in x's, through the fxsketch op."""
    if _eager_inference(x, weight):
        return cast_linear_aten(x, weight, bias)
    return torch.ops.fxsketch.cast_linear(x, weight, bias)


def cast_lowrank_linear(x: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """`lowrank_linear` computed in the factors' dtype, returned in x's, through the fxsketch op."""
    if _eager_inference(x, B):
        return cast_lowrank_linear_aten(x, B, A, bias)
    return torch.ops.fxsketch.cast_lowrank_linear(x, B, A, bias)


def int8_weight_linear(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x · (weight_q · weight_scale)ᵀ + bias` in x's dtype (int8 weight only), through the fxsketch op."""
    if _eager_inference(x, weight_scale):
        return int8_weight_linear_aten(x, weight_q, weight_scale, bias)
    return torch.ops.fxsketch.int8_weight_linear(x, weight_q, weight_scale, bias)


def int8_embedding(indices: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The rows of an int8 table (one scale per row) at `indices`, dequantized to the scales'
    dtype, through the fxsketch op."""
    if _eager_inference(indices, weight_scale):
        return int8_embedding_aten(indices, weight_q, weight_scale)
    return torch.ops.fxsketch.int8_embedding(indices, weight_q, weight_scale)


def half_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0, is_causal: bool = False, *, scale: float | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`scaled_dot_product_attention` computed in `dtype`, returned in the query's, through the fxsketch op."""
    if _eager_inference(query, key):
        return half_attention_aten(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, dtype=dtype)
    return torch.ops.fxsketch.half_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                             dtype=dtype)
