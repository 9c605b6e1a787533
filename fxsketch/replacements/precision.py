"""Precision kinds: the layer kept whole in another number format.

`int8`: weights int8 per output channel, the input quantized to int8 on every call
(`fxsketch::int8_linear`): same FLOPs as dense, a quarter of the weight bytes, 8-bit GEMMs.
`bf16`, `fp16`: weights in that dtype, computed in it inside a float32 model (`fxsketch::cast_linear`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from fxsketch.kernels.int8 import fbgemm_available
from fxsketch.nn import CastLinear, Int8Linear
from fxsketch.records import LayerRecord
from fxsketch.replacements.base import Cost, FactorCache, ReplacementKind, dense_cost
from fxsketch.replacements.registry import register_kind


def fast_int8(record: LayerRecord) -> bool:
    """Whether int8 GEMMs beat float ones for `record` here: a float32 Linear on a CPU with FBGEMM.
    Elsewhere the int8 ops run their reference (correct, not fast), so searches do not offer them."""
    return (record.op_type == "Linear" and record.device == "cpu" and record.dtype == torch.float32
            and not record.unsupported and fbgemm_available())


HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fast_half(record: LayerRecord, precision: str) -> bool:
    """Whether a float32 Linear runs faster in `precision` ("bf16", "fp16") on its device: CUDA, or
    (bf16 only) a CPU whose oneDNN has native bf16 GEMMs (AVX512-BF16 or AMX); elsewhere a cast
    layer is several times slower than float32 (0.14x for MiniLM in bf16 on an AVX2 CPU)."""
    if record.op_type != "Linear" or record.dtype != torch.float32 or record.unsupported:
        return False
    if record.device == "cuda":
        return True
    return record.device == "cpu" and precision == "bf16" and _native_cpu_bf16()


@functools.cache
def _native_cpu_bf16() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def fast_precisions(record: LayerRecord) -> list[str]:
    """The reduced precisions `record`'s device runs faster than float32."""
    return ["int8"] * fast_int8(record) + [p for p in HALF_DTYPES if fast_half(record, p)]


@register_kind
class Int8(ReplacementKind):
    name = "int8"
    param_names = ()
    defaults: dict[str, Any] = {}
    automatic = True

    def offered(self, record: LayerRecord) -> bool:
        return fast_int8(record)

    def unsupported(self, record: LayerRecord) -> str:
        if record.op_type != "Linear":
            return f"int8 replaces Linear layers; {record.name} is a {record.op_type}"
        return record.unsupported

    def cost(self, record: LayerRecord, params: dict[str, Any]) -> Cost:
        dense = dense_cost(record)
        return Cost(params=dense.params, flops_per_token=dense.flops_per_token, bits=8)

    def build(self, record, weight, bias, params, cache: FactorCache, copy_weights=True):
        return Int8Linear.from_float(weight.reshape(record.out_features, -1), bias)


class Half(ReplacementKind):
    """The layer's weight and bias rounded to a 16-bit float dtype, computed in it."""

    param_names = ()
    defaults: dict[str, Any] = {}
    automatic = True

    def unsupported(self, record: LayerRecord) -> str:
        if record.op_type != "Linear":
            return f"{self.name} replaces Linear layers; {record.name} is a {record.op_type}"
        return record.unsupported

    def offered(self, record: LayerRecord) -> bool:
        return fast_half(record, self.name)

    def cost(self, record: LayerRecord, params: dict[str, Any]) -> Cost:
        dense = dense_cost(record)
        return Cost(params=dense.params, flops_per_token=dense.flops_per_token, bits=16)

    def build(self, record, weight, bias, params, cache: FactorCache, copy_weights=True):
        return CastLinear.from_float(weight.reshape(record.out_features, -1), bias, HALF_DTYPES[self.name])


@register_kind
class BF16(Half):
    name = "bf16"


@register_kind
class FP16(Half):
    name = "fp16"
