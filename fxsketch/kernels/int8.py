"""Bodies of the int8 ops: weights stored as int8 with one float scale per output channel,
activations quantized dynamically (per tensor, affine, 8 bits) on every call.

`int8_linear_reference` is the definition every path is tested against, written in tensor ops only
(no `.item()`), so it runs on any device, `meta` included, and traces. `int8_linear_fbgemm` is the
CPU path: FBGEMM's dynamic int8 GEMM on a weight packed once per weight tensor.

Weights are quantized to ±63 (`WEIGHT_QMAX`), not ±127: on CPUs without VNNI, FBGEMM multiplies
uint8 activations by int8 weights with `vpmaddubsw`, which saturates the int16 sum of two products
once both exceed 2¹⁵ (255·127·2 does); 255·63·2 never does, so every CPU computes exactly the
reference. On MiniLM the seventh bit moved fidelity from 0.9926 to 0.9919; the eighth bit of the
activations (FBGEMM's `reduce_range`) is worth far more (0.9755 without it).

A layer may be smoothed: `input_scale` (one factor per input feature) multiplies x before it is
quantized, the weight having been divided by it before quantization, so the product is the same
while features with a wide range (outliers) no longer take the one activation scale for themselves.

A layer's input may be quantized statically: `input_qparams` = (scale, zero point), fixed from the
range calibration data showed (`static_qparams`), instead of measured on every call. Its worth is
in `int8_mlp`: two int8 layers with an activation between them, where the first GEMM's epilogue
applies the activation and writes the intermediate straight to uint8 for the second (oneDNN), so
the float intermediate is never written, read by an activation, read again for its range, and
quantized. On MiniLM's feed-forward blocks at 32 × 64 tokens this ran the model 1.15x faster than
two dynamic FBGEMM layers around `F.gelu` (one-off, this CPU with VNNI).

CPU kernels: FBGEMM's packed GEMM, and oneDNN's `qlinear_pointwise` (with post-op activations and
uint8 outputs) for GEMMs of at least `ONEDNN_MIN_MACS` multiply-adds, where it ran 2-30% faster
(below that its per-call overhead loses: 0.44x at one row).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["WEIGHT_QMAX", "WEIGHT_ONLY_QMAX", "ACTIVATIONS", "ONEDNN_MIN_MACS", "quantize_weight", "activation_qparams",
           "static_qparams", "int8_linear_reference", "int8_lowrank_linear_reference", "int8_mlp_reference",
           "int8_linear_fbgemm", "int8_static_linear_fbgemm", "int8_linear_onednn", "int8_mlp_cpu", "fbgemm_available",
           "onednn_available", "onednn_pays", "int8_weight_linear_aten", "int8_embedding_aten"]

WEIGHT_QMAX = 63
WEIGHT_ONLY_QMAX = 127  # weight-only layers dequantize before a float GEMM: no integer sums to saturate
_QMIN, _QMAX = 0, 255  # activations: unsigned 8-bit, affine
_SMALL_SCALE = 6.1e-5  # ATen's smallest activation scale (ChooseQuantizationParams)
# the activations `int8_mlp` fuses: name -> (its float function, oneDNN's post-op and algorithm)
ACTIVATIONS = {
    "relu": (F.relu, "relu", ""),
    "gelu": (F.gelu, "gelu", "none"),
    "gelu_tanh": (functools.partial(F.gelu, approximate="tanh"), "gelu", "tanh"),
}
# rows x in x out at which oneDNN's int8 GEMM beat FBGEMM's (2 threads, AVX-512 VNNI: 384->1536 from
# 512 rows 1.14-1.32x, 1536->384 from 512 rows 1.06-1.16x, 384->384 at 2048 rows 1.02x; one-off)
ONEDNN_MIN_MACS = 1 << 28


def quantize_weight(weight: torch.Tensor, qmax: int = WEIGHT_QMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per output row) with `weight ≈ q · scale[:, None]`, symmetric onto
    ±qmax, rounded to nearest. Rows of zeros get scale 1."""
    w = weight.detach().reshape(weight.shape[0], -1).float()
    scale = w.abs().amax(1) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax).to(torch.int8)
    return q, scale


def activation_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of x's dynamic per-tensor quantization, as 0-d tensors: ATen's
    ChooseQuantizationParams for [min(x, 0), max(x, 0)] onto 0..255, in float64 as ATen computes."""
    lo = x.detach().min().double().clamp(max=0)
    hi = x.detach().max().double().clamp(min=0)
    scale = (hi - lo) / (_QMAX - _QMIN)
    scale = torch.where((scale.float() == 0) | torch.isinf(1 / scale.float()), torch.full_like(scale, 0.1), scale)
    # a tiny range is widened to the smallest scale (ATen's rule, kept so every path agrees)
    small = scale < _SMALL_SCALE
    grow = torch.where(small, _SMALL_SCALE / scale, torch.ones_like(scale))
    span = _SMALL_SCALE * (_QMAX - _QMIN)
    lo, hi = (torch.where(small & (lo == 0), torch.zeros_like(lo), torch.where(small & (hi == 0), -span, lo * grow)),
              torch.where(small & (lo == 0), torch.full_like(hi, span), torch.where(small & (hi == 0), hi * 0, hi * grow)))
    scale = torch.where(small, torch.full_like(scale, _SMALL_SCALE), scale)
    from_min, from_max = _QMIN - lo / scale, _QMAX - hi / scale
    error_min = abs(_QMIN) - (lo / scale).abs()
    error_max = abs(_QMAX) - (hi / scale).abs()
    zero = torch.where(error_min < error_max, from_min, from_max)
    zero = torch.round(zero).clamp(_QMIN, _QMAX)
    return scale.float(), zero


def static_qparams(low: float, high: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """(scale, zero point) as one float32 tensor of two, for inputs known to lie in [low, high]:
    the rule `activation_qparams` applies to a tensor with that minimum and maximum."""
    scale, zero = activation_qparams(torch.tensor([float(low), float(high)], device=device))
    return torch.stack([scale.float(), zero.float()])


def int8_linear_reference(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                          bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                          input_qparams: torch.Tensor | None = None) -> torch.Tensor:
    """`dq(x') · (weight_q · weight_scale)ᵀ + bias` with x' = x · input_scale (per input feature,
    when given: a smoothed layer) quantized as `activation_qparams` says, or with `input_qparams`
    (scale, zero point) when given (a static layer: values outside its range are clipped); the
    arithmetic in x's dtype."""
    if input_scale is not None:
        x = x * input_scale.to(x.dtype)
    scale, zero = activation_qparams(x) if input_qparams is None else input_qparams.unbind()
    scale, zero = scale.to(x.dtype), zero.to(x.dtype)
    xq = torch.clamp(torch.round(x / scale) + zero, _QMIN, _QMAX)
    w = weight_q.to(x.dtype) * weight_scale.to(x.dtype)[:, None]
    return F.linear((xq - zero) * scale, w, None if bias is None else bias.to(x.dtype))


def int8_lowrank_linear_reference(x: torch.Tensor, B_q: torch.Tensor, B_scale: torch.Tensor, A_q: torch.Tensor,
                                  A_scale: torch.Tensor, bias: torch.Tensor | None = None,
                                  input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The reference of `fxsketch::int8_lowrank_linear`: each factor an `int8_linear_reference`
    (`input_scale` belongs to the first)."""
    return int8_linear_reference(int8_linear_reference(x, B_q, B_scale, None, input_scale), A_q, A_scale, bias)


def int8_mlp_reference(x: torch.Tensor, w1_q: torch.Tensor, w1_scale: torch.Tensor, b1: torch.Tensor | None,
                       input_scale: torch.Tensor | None, activation: str, w2_q: torch.Tensor, w2_scale: torch.Tensor,
                       b2: torch.Tensor | None, mid_qparams: torch.Tensor) -> torch.Tensor:
    """The reference of `fxsketch::int8_mlp`: an int8 layer (dynamic input, smoothed by
    `input_scale` when given), the activation, and a static int8 layer (`mid_qparams`)."""
    h = ACTIVATIONS[activation][0](int8_linear_reference(x, w1_q, w1_scale, b1, input_scale))
    return int8_linear_reference(h, w2_q, w2_scale, b2, None, mid_qparams)


def int8_weight_linear_aten(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """The body of `fxsketch::int8_weight_linear`: the weight dequantized to x's dtype, then a float
    GEMM. Eager, the dequantized weight is materialized on every call; under `torch.compile`
    Inductor folds the dequantization into the GEMM's loads, so only int8 bytes are read."""
    weight = weight_q.to(x.dtype) * weight_scale.to(x.dtype)[:, None]
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def int8_embedding_aten(indices: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """The body of `fxsketch::int8_embedding`: the int8 rows `indices` pick, times their scales, in
    the scales' dtype (the table's own). Only the picked rows are widened, never the whole table."""
    rows = F.embedding(indices, weight_q).to(weight_scale.dtype)
    return rows * F.embedding(indices, weight_scale[:, None])


@functools.cache
def fbgemm_available() -> bool:
    """Whether this torch build runs FBGEMM's dynamic int8 linear (x86 CPUs), tried once on a tiny
    layer: a build without it, or a torch that retired quantized tensors, takes the reference."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    q, scale = quantize_weight(torch.ones(2, 4))
    try:
        y = int8_linear_fbgemm(torch.ones(1, 4), q, scale, torch.zeros(2))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool(torch.allclose(y, torch.full((1, 2), 4.0)))


# weight tensor -> (the versions it was packed at, packed weight); entries go with their weights
_PACKED = WeakIdKeyDictionary()


def _packed(weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
    stamp = (weight_q._version, weight_scale.data_ptr(), weight_scale._version,
             None if bias is None else (bias.data_ptr(), bias._version))
    hit = _PACKED.get(weight_q)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    n = weight_q.shape[0]
    with warnings.catch_warnings():  # quantized tensors are deprecated; this one lives only until packed
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch._make_per_channel_quantized_tensor(
            weight_q.detach().contiguous(), weight_scale.detach().double(), torch.zeros(n, dtype=torch.long), 0)
    packed = torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float().contiguous())
    _PACKED[weight_q] = (stamp, packed)
    return packed


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def int8_static_linear_fbgemm(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                              bias: torch.Tensor | None, input_scale: torch.Tensor | None,
                              input_qparams: torch.Tensor) -> torch.Tensor:
    """The static layer's reference computed by FBGEMM (float32 CPU tensors)."""
    packed = _packed(weight_q, weight_scale, bias)
    if input_scale is not None:
        x = x * input_scale
    scale, zero = input_qparams.tolist()
    y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(_rows(x), scale, int(zero), packed)
    return y.reshape(*x.shape[:-1], weight_q.shape[0])


# weight tensor -> (its version when packed, oneDNN's packed weight, zero points); go with their weights
_ONEDNN = WeakIdKeyDictionary()


def _onednn_packed(weight_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hit = _ONEDNN.get(weight_q)
    if hit is not None and hit[0] == weight_q._version:
        return hit[1], hit[2]
    packed = torch.ops.onednn.qlinear_prepack(weight_q.detach().contiguous(), None)
    zeros = torch.zeros(weight_q.shape[0], dtype=torch.long)
    _ONEDNN[weight_q] = (weight_q._version, packed, zeros)
    return packed, zeros


def _quantized_rows(x: torch.Tensor, qparams: torch.Tensor | None) -> tuple[torch.Tensor, float, int]:
    """x's rows as uint8 (a view of the quantized tensor's bytes), with their scale and zero point:
    measured on x when `qparams` is None, else those."""
    rows = _rows(x)
    with warnings.catch_warnings():  # a quantized tensor lives here only until its bytes are read
        warnings.simplefilter("ignore", UserWarning)
        if qparams is None:
            q = torch.quantize_per_tensor_dynamic(rows, torch.quint8, False)
            scale, zero = q.q_scale(), q.q_zero_point()
        else:
            scale, zero = qparams.tolist()
            zero = int(zero)
            q = torch.quantize_per_tensor(rows, scale, zero, torch.quint8)
    data = torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), 0, q.shape, q.stride())
    return data, scale, zero


def _onednn_gemm(rows: torch.Tensor, scale: float, zero: int, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, activation: str | None = None,
                 out_qparams: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN's int8 GEMM of uint8 `rows` (quantized with `scale`, `zero`), then `activation` as a
    post-op; float32 out, or uint8 quantized with `out_qparams` when given."""
    packed, zeros = _onednn_packed(weight_q)
    _, post, algorithm = ACTIVATIONS[activation] if activation else (None, "none", "")
    out_scale, out_zero = out_qparams.tolist() if out_qparams is not None else (1.0, 0)
    return torch.ops.onednn.qlinear_pointwise(
        rows, scale, zero, packed, weight_scale, zeros, bias, out_scale, int(out_zero),
        torch.uint8 if out_qparams is not None else torch.float32, post, [], algorithm)


def int8_linear_onednn(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None,
                       input_qparams: torch.Tensor | None = None) -> torch.Tensor:
    """The reference computed by oneDNN (float32 CPU tensors)."""
    if input_scale is not None:
        x = x * input_scale
    y = _onednn_gemm(*_quantized_rows(x, input_qparams), weight_q, weight_scale, bias)
    return y.reshape(*x.shape[:-1], weight_q.shape[0])


def onednn_pays(x: torch.Tensor, weight_q: torch.Tensor) -> bool:
    """Whether a GEMM of x's rows by this weight is large enough for oneDNN to beat FBGEMM."""
    return x.numel() * weight_q.shape[0] >= ONEDNN_MIN_MACS and onednn_available()


def int8_mlp_cpu(x: torch.Tensor, w1_q: torch.Tensor, w1_scale: torch.Tensor, b1: torch.Tensor | None,
                 input_scale: torch.Tensor | None, activation: str, w2_q: torch.Tensor, w2_scale: torch.Tensor,
                 b2: torch.Tensor | None, mid_qparams: torch.Tensor) -> torch.Tensor:
    """`int8_mlp_reference` on the CPU (float32 tensors, FBGEMM available). Large enough (oneDNN):
    the first GEMM applies the activation and writes uint8 rows the second takes as they are.
    Otherwise FBGEMM's dynamic layer, the activation, and FBGEMM's static layer."""
    if onednn_pays(x, w1_q):
        if input_scale is not None:
            x = x * input_scale
        h = _onednn_gemm(*_quantized_rows(x, None), w1_q, w1_scale, b1, activation, mid_qparams)
        scale, zero = mid_qparams.tolist()
        y = _onednn_gemm(h, scale, int(zero), w2_q, w2_scale, b2)
        return y.reshape(*x.shape[:-1], w2_q.shape[0])
    h = ACTIVATIONS[activation][0](int8_linear_fbgemm(x, w1_q, w1_scale, b1, input_scale))
    return int8_static_linear_fbgemm(h, w2_q, w2_scale, b2, None, mid_qparams)


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build runs oneDNN's int8 linear with post-ops (x86 CPUs), tried once
    on a tiny layer against the reference."""
    q, scale = quantize_weight(torch.ones(2, 4))
    try:
        y = int8_linear_onednn(torch.ones(1, 4), q, scale, torch.zeros(2), None, static_qparams(0.0, 2.0))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool(torch.allclose(y, torch.full((1, 2), 4.0), atol=0.05))


def int8_linear_fbgemm(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The reference computed by FBGEMM (float32 CPU tensors); the weight is packed on first use
    and again only when one of the tensors changes in place."""
    packed = _packed(weight_q, weight_scale, bias)
    if input_scale is not None:
        x = x * input_scale
    if x.dim() < 2:  # FBGEMM takes a batch of rows
        return torch.ops.quantized.linear_dynamic(x.reshape(1, -1).contiguous(), packed, False).reshape(-1)
    return torch.ops.quantized.linear_dynamic(x.contiguous(), packed, False)
