"""fxsketch's kernels: the low-rank, reduced-precision and int8 GEMM op family, and int8 embedding
tables, attention in 16-bit floats. Knows nothing of FX or Optuna."""

from fxsketch.kernels.int8 import quantize_weight
from fxsketch.kernels.ops import (
    FactorTransposes, cast_linear, cast_lowrank_linear, half_attention, int8_embedding, int8_linear,
    int8_lowrank_linear, int8_mlp, int8_static_linear, int8_weight_linear, lowrank_conv2d, lowrank_linear,
)

__all__ = ["lowrank_linear", "FactorTransposes", "lowrank_conv2d", "cast_linear", "cast_lowrank_linear",
           "int8_linear", "int8_static_linear", "int8_mlp", "int8_lowrank_linear", "int8_weight_linear",
           "int8_embedding", "half_attention", "quantize_weight"]
