"""The `int8` kind: the layer kept whole, its weights int8 per output channel and its input
quantized to int8 on every call (`fxsketch::int8_linear`). Same FLOPs as dense, a quarter of the
weight bytes, and GEMMs on 8-bit operands."""

from __future__ import annotations

from typing import Any

import torch

from fxsketch.kernels.int8 import fbgemm_available
from fxsketch.nn import Int8Linear
from fxsketch.records import LayerRecord
from fxsketch.replacements.base import Cost, FactorCache, ReplacementKind, dense_cost
from fxsketch.replacements.registry import register_kind


def fast_int8(record: LayerRecord) -> bool:
    """Whether int8 GEMMs beat float ones for `record` here: a float32 Linear on a CPU with FBGEMM.
    Elsewhere the int8 ops run their reference (correct, not fast), so searches do not offer them."""
    return (record.op_type == "Linear" and record.device == "cpu" and record.dtype == torch.float32
            and not record.unsupported and fbgemm_available())


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
