"""Precision kinds: the layer kept whole in another number format.

`int8`: weights int8 per output channel, the input quantized to int8 on every call
(`fxsketch::int8_linear`): same FLOPs as dense, a quarter of the weight bytes, 8-bit GEMMs.
`bf16`, `fp16`: weights in that dtype, computed in it inside a float32 model (`fxsketch::cast_linear`);
on an attention call (`fxsketch.capture.find_attention`), the attention computed in it
(`fxsketch::half_attention`).
`int8_weight`: the weight alone int8 (`fxsketch::int8_weight_linear`), computed in the layer's dtype;
on an embedding table, its rows int8 with one scale each (`fxsketch::int8_embedding`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from fxsketch.kernels.int8 import fbgemm_available
from fxsketch.nn import CastLinear, Int8Embedding, Int8Linear, Int8WeightLinear
from fxsketch.records import LayerRecord
from fxsketch.replacements.base import Cost, FactorCache, ReplacementKind, dense_cost
from fxsketch.replacements.registry import register_kind


PRECISION_BITS = {"float": 32, "int8": 8, "bf16": 16, "fp16": 16}  # "float": the layer's own dtype
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fast(record: LayerRecord, precision: str) -> bool:
    """Whether a float32 Linear runs faster in `precision` than in float32 on its device: int8 on
    a CPU with FBGEMM; bf16 and fp16 on CUDA; bf16 on a CPU whose oneDNN has native bf16 GEMMs
    (AVX512-BF16 or AMX). Elsewhere the ops run correct but slow (int8's reference; bf16 ran MiniLM
    at 0.13x on an AVX2 CPU), so searches do not offer them."""
    if precision == "int8_weight":
        # measured on an AVX2 CPU: FBGEMM's dynamic int8 beat it from 16 rows up (ATen's int8-weight GEMM
        # ran 4-40x slower than dense float32); on CUDA it has no timing yet, so no search offers it
        return False
    if record.op_type not in ("Linear", "Attention") or record.dtype != torch.float32 or record.unsupported:
        return False
    if precision == "int8":
        return record.op_type == "Linear" and record.device == "cpu" and fbgemm_available()
    if record.device == "cuda":
        return precision in HALF_DTYPES
    return record.device == "cpu" and precision == "bf16" and _native_cpu_bf16()


@functools.cache
def _native_cpu_bf16() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def fast_precisions(record: LayerRecord) -> list[str]:
    """The reduced precisions `record`'s device runs faster than float32."""
    return [p for p in PRECISION_BITS if p != "float" and fast(record, p)]


class WholeLayer(ReplacementKind):
    """A Linear kept whole in the reduced precision its `name` says: dense FLOPs at `bits`."""

    param_names = ()
    defaults: dict[str, Any] = {}
    automatic = True

    def unsupported(self, record: LayerRecord) -> str:
        if record.op_type in ("Embedding", "Attention"):
            return super().unsupported(record)
        if record.op_type != "Linear":
            return f"{self.name} replaces Linear layers; {record.name} is a {record.op_type}"
        return record.unsupported

    def offered(self, record: LayerRecord) -> bool:
        return fast(record, self.name)

    def cost(self, record: LayerRecord, params: dict[str, Any]) -> Cost:
        dense = dense_cost(record)
        return Cost(params=dense.params, flops_per_token=dense.flops_per_token, bits=PRECISION_BITS[self.name])


def flag_problem(params: dict[str, Any], names: tuple[str, ...] = ("smooth",)) -> str:
    """Why an int8 entry's on/off options `names` (`smooth`, `static`) cannot be used ("" when
    they can): each takes True or False (None: not given, its default)."""
    for name in names:
        value = params.get(name)
        if not (value is None or isinstance(value, bool)):
            return f"{name} must be True or False, got {value!r}"
    return ""


def smoothing(record: LayerRecord, matrix: torch.Tensor, cache: FactorCache | None,
              smooth: bool = True) -> torch.Tensor | None:
    """The input smoothing of an int8 layer (`FactorCache.smoothing`), unless `smooth` is False
    (an entry's `"smooth": False`): smoothing costs a multiply of every input, worth it only where
    the accuracy bar needs the range it buys."""
    return cache.smoothing(record.name, matrix) if cache is not None and smooth else None


@register_kind
class Int8(WholeLayer):
    """Int8 weights and dynamically quantized int8 inputs; `smooth` (default True) moves the input
    features' ranges into the weights where calibration data is given. `static` (default False)
    quantizes the input onto the range the calibration data showed instead of measuring it on
    every call: where the input is an activation of another int8 layer's output, the rewrite then
    runs the two layers as one op (`fxsketch.fuse`), the first writing the second's int8 input."""

    name = "int8"
    options = ("smooth", "static")

    def invalid(self, record: LayerRecord, params: dict[str, Any]) -> str:
        return flag_problem(params, self.options)

    def build(self, record, weight, bias, params, cache: FactorCache, copy_weights=True):
        matrix = weight.reshape(record.out_features, -1)
        smooth = smoothing(record, matrix, cache, params.get("smooth") is not False)
        input_range = None
        if params.get("static"):
            scale = None if smooth is None else smooth.reciprocal()  # the smoothed layer's input_scale
            input_range = None if cache is None else cache.input_range(record.name, scale)
            if input_range is None and (not copy_weights or matrix.is_meta):  # stored factors bring the range
                input_range = (0.0, 1.0)
            if input_range is None:
                raise ValueError(f"{record.name}: a static int8 input is quantized onto the range calibration data "
                                 "showed: pass calibration_data=, or drop \"static\" from the entry")
        return Int8Linear.from_float(matrix, bias, smooth, input_range)


class Half(WholeLayer):
    """The layer's weight and bias rounded to a 16-bit float dtype, computed in it; an attention
    call computed in it (the rewrite changes the call in place: there is no module to build)."""

    def unsupported(self, record: LayerRecord) -> str:
        return record.unsupported if record.op_type == "Attention" else super().unsupported(record)

    def build(self, record, weight, bias, params, cache: FactorCache, copy_weights=True):
        return CastLinear.from_float(weight.reshape(record.out_features, -1), bias, HALF_DTYPES[self.name])


@register_kind
class BF16(Half):
    name = "bf16"


@register_kind
class FP16(Half):
    name = "fp16"


@register_kind
class Int8Weight(WholeLayer):
    """Weight-only int8: the GEMM runs in the layer's own dtype on a weight dequantized as it is
    read (by Inductor under `torch.compile`; eager, before the GEMM). Chosen by name; searches offer
    it only where `fast` says it is measured faster than the layer's dtype. An embedding table
    (`fxsketch.capture.find_tables`) takes it too: its rows int8, one scale per row."""

    name = "int8_weight"

    def unsupported(self, record: LayerRecord) -> str:
        return record.unsupported if record.op_type == "Embedding" else super().unsupported(record)

    def build(self, record, weight, bias, params, cache: FactorCache, copy_weights=True):
        if record.op_type == "Embedding":
            return Int8Embedding.from_float(weight)
        return Int8WeightLinear.from_float(weight.reshape(record.out_features, -1), bias)

    def cost(self, record: LayerRecord, params: dict[str, Any]) -> Cost:
        if record.op_type == "Embedding":  # a lookup: no FLOPs, a quarter of the bytes
            return Cost(params=record.out_features * record.in_features, flops_per_token=0, bits=8)
        dense = dense_cost(record)
        return Cost(params=dense.params, flops_per_token=dense.flops_per_token, bits=8,
                    gemm_bits=PRECISION_BITS["float"])
