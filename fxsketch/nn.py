"""Low-rank layers as ordinary modules: what the rewrite emits and what users can build with.

Every layer here runs through the fxsketch op family, so it trains, exports and compiles the same
way whether it came from a rewrite or was written by hand.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from fxsketch.kernels import (
    FactorTransposes, cast_linear, cast_lowrank_linear, int8_embedding, int8_linear, int8_lowrank_linear,
    int8_static_linear, int8_weight_linear, lowrank_conv2d, lowrank_linear, quantize_weight,
)
from fxsketch.kernels.int8 import WEIGHT_ONLY_QMAX, WEIGHT_QMAX, static_qparams

__all__ = ["LowRankLinear", "LowRankConv2d", "CastLinear", "CastLowRankLinear", "Int8Linear", "Int8WeightLinear",
           "Int8LowRankLinear", "Int8Embedding", "SKLinear", "SKConv2d", "OpCall", "op_call", "direct_call"]


def _pair(v: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _copy_into(layer: nn.Module, **tensors: torch.Tensor | None) -> None:
    """Copy values into a layer's parameters (built in the right dtype first, so nothing rounds)."""
    with torch.no_grad():
        for name, value in tensors.items():
            if value is not None:
                getattr(layer, name).copy_(value)


_SKIP_INIT = contextvars.ContextVar("fxsketch_skip_init", default=False)


def _uniform_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    if _SKIP_INIT.get():  # the values are about to be overwritten (from_factors)
        return t
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return nn.init.uniform_(t, -bound, bound)


@contextlib.contextmanager
def _no_init():
    token = _SKIP_INIT.set(True)
    try:
        yield
    finally:
        _SKIP_INIT.reset(token)


class LowRankLinear(nn.Module):
    """`y = (x · Bᵀ) · Aᵀ + bias` with B (rank × in) and A (out × rank)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.B = nn.Parameter(_uniform_(torch.empty(rank, in_features), in_features))
        self.A = nn.Parameter(_uniform_(torch.empty(out_features, rank), rank))
        self.bias = nn.Parameter(_uniform_(torch.empty(out_features), in_features)) if bias else None
        self._transposes = FactorTransposes()

    @classmethod
    def from_factors(
        cls, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None = None
    ) -> "LowRankLinear":
        """Build from given factors (copied, so the caller's tensors are never shared)."""
        with _no_init(), torch.device(B.device):
            layer = cls(B.shape[1], A.shape[0], B.shape[0], bias=bias is not None).to(B.dtype)
        _copy_into(layer, B=B, A=A, bias=bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowrank_linear(x, self.B, self.A, self.bias, self._transposes)

    def _apply(self, fn: Callable, recurse: bool = True) -> "LowRankLinear":
        self._transposes = FactorTransposes()  # `.to()` and friends replace the factors: let the old memory go
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


class LowRankConv2d(nn.Module):
    """A kh×kw convolution to `rank` channels (B) followed by a 1×1 convolution (A) plus bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        kh, kw = _pair(kernel_size)
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.kernel_size = (kh, kw)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        fan_in = in_channels * kh * kw
        self.B = nn.Parameter(_uniform_(torch.empty(rank, in_channels, kh, kw), fan_in))
        self.A = nn.Parameter(_uniform_(torch.empty(out_channels, rank), rank))
        self.bias = nn.Parameter(_uniform_(torch.empty(out_channels), fan_in)) if bias else None

    @classmethod
    def from_factors(
        cls,
        B: torch.Tensor,
        A: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> "LowRankConv2d":
        """Build from B (rank, C, kh, kw) and A (out, rank); the tensors are copied."""
        rank, c, kh, kw = B.shape
        with _no_init(), torch.device(B.device):
            layer = cls(c, A.shape[0], rank, (kh, kw), stride, padding, dilation, bias is not None).to(B.dtype)
        _copy_into(layer, B=B, A=A, bias=bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowrank_conv2d(x, self.B, self.A, self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, rank={self.rank}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
        )


class CastLinear(nn.Module):
    """A Linear whose weight and bias are stored and computed in a reduced dtype (bf16, fp16) inside
    a model of another (`fxsketch::cast_linear`): the input is cast in, the output back."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().to(weight.dtype).clone()) if bias is not None else None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "CastLinear":
        """The layer of `weight` (out × in) and `bias`, both rounded to `dtype`."""
        return cls(weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.weight.dtype}, bias={self.bias is not None}"


class CastLowRankLinear(LowRankLinear):
    """`LowRankLinear` with its factors in a reduced dtype (bf16, fp16) inside a model of another
    (`fxsketch::cast_lowrank_linear`)."""

    @classmethod
    def from_factors(cls, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype | None = None) -> "CastLowRankLinear":
        """Build from float factors, rounded to `dtype` (default: B's)."""
        dtype = dtype or B.dtype
        return super().from_factors(B.to(dtype), A.to(dtype), None if bias is None else bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast_lowrank_linear(x, self.B, self.A, self.bias)


def _smoothed(layer: nn.Module, weight: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """`weight` (… × in) times `smooth` per input feature, with the layer's `input_scale` set to
    1 / smooth so that the product with the input is unchanged (`smooth=None`: as it is)."""
    if smooth is None:
        return weight
    smooth = smooth.detach().to(weight.device, weight.dtype)
    layer.input_scale = smooth.reciprocal()
    return weight * smooth


class Int8Linear(nn.Module):
    """A Linear with int8 weights (one float32 scale per output channel, stored as plain tensors)
    whose input is quantized to int8 on every call: `fxsketch::int8_linear`. The weights do not
    train; the bias does, and gradients reach the input. A smoothed layer (`from_float(...,
    smooth=s)`) holds W·diag(s) and multiplies its input by `input_scale` = 1/s first. A static
    layer (`from_float(..., input_range=(low, high))`) quantizes its input with the fixed
    `input_qparams` (scale, zero point) of that range: `fxsketch::int8_static_linear`."""

    qmax = WEIGHT_QMAX

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("input_scale", None)
        self.register_buffer("input_qparams", None)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   smooth: torch.Tensor | None = None, input_range: tuple[float, float] | None = None) -> "Int8Linear":
        """Quantize a float weight (out × in) per output channel, smoothed by `smooth` (one factor
        per input feature) when given; the bias keeps the weight's dtype. With `input_range`, the
        (smoothed) input is quantized statically onto that range."""
        with torch.device(weight.device):
            layer = cls(weight.shape[1], weight.shape[0], bias is not None)
        q, scale = quantize_weight(_smoothed(layer, weight, smooth), cls.qmax)
        _copy_into(layer, weight_q=q, weight_scale=scale)
        if input_range is not None:
            layer.input_qparams = static_qparams(*input_range, device=weight.device)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(weight.dtype).clone())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_qparams is not None:
            return int8_static_linear(x, self.weight_q, self.weight_scale, self.bias, self.input_scale,
                                      self.input_qparams)
        return int8_linear(x, self.weight_q, self.weight_scale, self.bias, self.input_scale)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class Int8WeightLinear(Int8Linear):
    """A Linear whose weight alone is int8 (±127 per output channel, plain tensors), computed in the
    input's dtype: `fxsketch::int8_weight_linear`. Half the weight bytes of bf16, a quarter of
    float32; what it buys is memory traffic, so it pays where a GEMM is bound by weight reads. Its
    input is not quantized, so it takes no smoothing."""

    qmax = WEIGHT_ONLY_QMAX

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8WeightLinear":
        """Quantize a float weight (out × in) per output channel to ±127; the input stays float."""
        return super().from_float(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_weight_linear(x, self.weight_q, self.weight_scale, self.bias)


class Int8LowRankLinear(nn.Module):
    """`LowRankLinear` with both factors int8 (`fxsketch::int8_lowrank_linear`): the rank-R
    intermediate is quantized again before the second factor."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.register_buffer("B_q", torch.zeros(rank, in_features, dtype=torch.int8))
        self.register_buffer("B_scale", torch.ones(rank))
        self.register_buffer("A_q", torch.zeros(out_features, rank, dtype=torch.int8))
        self.register_buffer("A_scale", torch.ones(out_features))
        self.register_buffer("input_scale", None)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_factors(cls, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None = None,
                     smooth: torch.Tensor | None = None) -> "Int8LowRankLinear":
        """Quantize float factors B (R × in) and A (out × R), each per output channel; B smoothed by
        `smooth` (one factor per input feature) when given."""
        with torch.device(B.device):
            layer = cls(B.shape[1], A.shape[0], B.shape[0], bias is not None)
        (B_q, B_scale), (A_q, A_scale) = quantize_weight(_smoothed(layer, B, smooth)), quantize_weight(A)
        _copy_into(layer, B_q=B_q, B_scale=B_scale, A_q=A_q, A_scale=A_scale)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(B.dtype).clone())
        return layer

    def quantize_from(self, source: "LowRankLinear") -> None:
        """Take `source`'s float factors (same shapes), quantized (B smoothed as this layer is),
        and its bias, in place: how factors trained in float (int8 ones do not train) reach this layer."""
        if (source.B.shape, source.A.shape) != (self.B_q.shape, self.A_q.shape):
            raise ValueError(f"factor shapes differ: {tuple(source.B.shape)}, {tuple(source.A.shape)} into "
                             f"{tuple(self.B_q.shape)}, {tuple(self.A_q.shape)}")
        B = source.B if self.input_scale is None else source.B / self.input_scale.to(source.B.dtype)
        (B_q, B_scale), (A_q, A_scale) = quantize_weight(B), quantize_weight(source.A)
        _copy_into(self, B_q=B_q, B_scale=B_scale, A_q=A_q, A_scale=A_scale,
                   bias=None if self.bias is None else source.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_lowrank_linear(x, self.B_q, self.B_scale, self.A_q, self.A_scale, self.bias, self.input_scale)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows, one scale per row (±127, plain tensors): a quarter
    of float32's bytes. A lookup returns the rows it picks in the table's own dtype
    (`fxsketch::int8_embedding`). The table does not train."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight_q", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=dtype))

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "Int8Embedding":
        """Quantize a float table (rows × dim) row by row; the scales keep the table's dtype."""
        with torch.device(weight.device):
            table = cls(weight.shape[0], weight.shape[1], weight.dtype)
        q, scale = quantize_weight(weight, WEIGHT_ONLY_QMAX)
        _copy_into(table, weight_q=q, weight_scale=scale)
        return table

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return int8_embedding(indices, self.weight_q, self.weight_scale)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.weight_scale.dtype}"


def _scaled_signs(shape: tuple[int, ...], k: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Random ±1/√k entries, drawn on the CPU (the same values on every device), then moved."""
    signs = torch.randint(0, 2, shape, generator=generator, device="cpu").float().mul_(2).sub_(1)
    return (signs / math.sqrt(k)).to(device)


class _Sketched(nn.Module):
    """Panther's sketch of a weight matrix W (out × d) with `num_terms` l and `low_rank` k.

    Trainable S1_i = Wᵀ U1_iᵀ (d × k) and S2_i = U2_iᵀ Wᵀ (k × out) against fixed scaled-sign
    sketches U1_i (k × out) and U2_i (d × k). The l terms collapse into one low-rank product of
    inner rank 2·l·k, which is what runs: B = [S1_1 … S1_l U2_1 … U2_l]ᵀ, A = [U1; S2]ᵀ / (2l).
    """

    def _init_sketch(self, d: int, out: int, num_terms: int, low_rank: int, weight, seed: int) -> None:
        if num_terms < 1 or low_rank < 1:
            raise ValueError(f"num_terms and low_rank must be >= 1, got {num_terms} and {low_rank}")
        self.num_terms, self.low_rank = num_terms, low_rank
        g = torch.Generator(device="cpu").manual_seed(seed)
        l, k = num_terms, low_rank
        device = weight.device if weight is not None else torch.empty(0).device  # the default device
        self.register_buffer("U1", _scaled_signs((l, k, out), k, g, device))
        self.register_buffer("U2", _scaled_signs((l, d, k), k, g, device))
        if weight is None:
            weight = _uniform_(torch.empty(out, d), d)
        wide = torch.float64 if weight.dtype == torch.float64 else torch.float32
        Wt = weight.detach().to(wide).reshape(out, d).T  # d × out
        self.S1 = nn.Parameter(torch.einsum("do,lko->ldk", Wt, self.U1.to(wide)))
        self.S2 = nn.Parameter(torch.einsum("ldk,do->lko", self.U2.to(wide), Wt))

    @property
    def rank(self) -> int:
        return 2 * self.num_terms * self.low_rank

    def collapsed_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) with B (2lk × d) and A (out × 2lk) such that W ≈ A·B."""
        l, d, k = self.S1.shape
        B = torch.cat([self.S1.transpose(1, 2).reshape(l * k, d), self.U2.transpose(1, 2).reshape(l * k, d)])
        A = torch.cat([self.U1.reshape(l * k, -1), self.S2.reshape(l * k, -1)]).T / (2 * l)
        return B, A


class SKLinear(_Sketched):
    """Panther's sketched Linear: `y = 1/(2l) Σ_i [(x S1_i) U1_i + (x U2_i) S2_i] + b`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_terms: int,
        low_rank: int,
        bias: bool = True,
        weight: torch.Tensor | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_sketch(in_features, out_features, num_terms, low_rank, weight, seed)
        self.bias = nn.Parameter(_uniform_(torch.empty(out_features), in_features)) if bias else None

    @classmethod
    def from_dense(cls, linear: nn.Linear, num_terms: int, low_rank: int, seed: int = 0) -> "SKLinear":
        """Sketch an existing Linear (weights copied, never shared)."""
        layer = cls(linear.in_features, linear.out_features, num_terms, low_rank,
                    bias=linear.bias is not None, weight=linear.weight, seed=seed).to(linear.weight.dtype)
        _copy_into(layer, bias=linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, A = self.collapsed_factors()
        return lowrank_linear(x, B, A, self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, num_terms={self.num_terms}, "
                f"low_rank={self.low_rank}, bias={self.bias is not None}")


class SKConv2d(_Sketched):
    """Panther's sketched Conv2d: the sketch of the (out × C·kh·kw) kernel matrix, run as a kh×kw
    convolution to 2·l·k channels followed by a 1×1 convolution."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        num_terms: int,
        low_rank: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        weight: torch.Tensor | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        kh, kw = _pair(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self._init_sketch(in_channels * kh * kw, out_channels, num_terms, low_rank, weight, seed)
        fan_in = in_channels * kh * kw
        self.bias = nn.Parameter(_uniform_(torch.empty(out_channels), fan_in)) if bias else None

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, num_terms: int, low_rank: int, seed: int = 0) -> "SKConv2d":
        """Sketch an existing Conv2d with groups=1 and zero padding (weights copied)."""
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("SKConv2d.from_dense needs groups=1, padding_mode='zeros' and numeric padding")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, num_terms, low_rank,
                    conv.stride, conv.padding, conv.dilation, conv.bias is not None, conv.weight,
                    seed).to(conv.weight.dtype)
        _copy_into(layer, bias=conv.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, A = self.collapsed_factors()
        B = B.reshape(B.shape[0], self.in_channels, *self.kernel_size)
        return lowrank_conv2d(x, B, A, self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"num_terms={self.num_terms}, low_rank={self.low_rank}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}")


class OpCall(NamedTuple):
    """How a layer that is exactly one fxsketch op calls it: the op (its Python entry), its
    dispatcher overload, the names of the module's tensors it takes after the input, in order,
    its static arguments, and whether an eager caller should call the module instead (it keeps
    state from call to call that the op uses: `LowRankLinear`'s `FactorTransposes`)."""

    op: Callable
    overload: Any
    tensors: tuple[str, ...]
    static: tuple
    stateful: bool = False


def op_call(module: nn.Module) -> OpCall | None:
    """The `OpCall` of `module` when it is exactly one fxsketch op on its own tensors (the plain
    low-rank, reduced-precision and int8 layers); None for layers with their own forward logic."""
    kind = type(module)
    if kind is LowRankLinear:
        return OpCall(lowrank_linear, torch.ops.fxsketch.lowrank_linear.default, ("B", "A", "bias"), (), stateful=True)
    if kind is LowRankConv2d:
        geometry = (list(module.stride), list(module.padding), list(module.dilation))
        return OpCall(lowrank_conv2d, torch.ops.fxsketch.lowrank_conv2d.default, ("B", "A", "bias"), geometry)
    if kind is CastLinear:
        return OpCall(cast_linear, torch.ops.fxsketch.cast_linear.default, ("weight", "bias"), ())
    if kind is CastLowRankLinear:
        return OpCall(cast_lowrank_linear, torch.ops.fxsketch.cast_lowrank_linear.default, ("B", "A", "bias"), ())
    if kind is Int8Linear and module.input_qparams is not None:
        return OpCall(int8_static_linear, torch.ops.fxsketch.int8_static_linear.default,
                      ("weight_q", "weight_scale", "bias", "input_scale", "input_qparams"), ())
    if kind is Int8Linear:
        return OpCall(int8_linear, torch.ops.fxsketch.int8_linear.default,
                      ("weight_q", "weight_scale", "bias", "input_scale"), ())
    if kind is Int8WeightLinear:
        return OpCall(int8_weight_linear, torch.ops.fxsketch.int8_weight_linear.default,
                      ("weight_q", "weight_scale", "bias"), ())
    if kind is Int8LowRankLinear:
        return OpCall(int8_lowrank_linear, torch.ops.fxsketch.int8_lowrank_linear.default,
                      ("B_q", "B_scale", "A_q", "A_scale", "bias", "input_scale"), ())
    if kind is Int8Embedding:
        return OpCall(int8_embedding, torch.ops.fxsketch.int8_embedding.default, ("weight_q", "weight_scale"), ())
    return None


def direct_call(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module` as the rewritten graph calls it: a single-op layer as its op, skipping the module
    call (what a timer of the rewritten graph's layers must time)."""
    call = op_call(module)
    if call is None or call.stateful:
        return module
    tensors = [getattr(module, name) for name in call.tensors]
    return lambda x: call.op(x, *tensors, *call.static)
