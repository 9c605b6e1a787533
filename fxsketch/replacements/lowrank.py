"""The `svd` kind: truncated SVD, W ≈ A·B with A = U_R Σ_R^½ and B = Σ_R^½ V_Rᵀ (Eckart–Young)."""

from __future__ import annotations

from typing import Any

import torch

from fxsketch.nn import CastLowRankLinear, Int8LowRankLinear, LowRankConv2d, LowRankLinear
from fxsketch.records import LayerRecord
from fxsketch.replacements.base import (
    Cost, FactorCache, ReplacementKind, auto_rank_limit, lowrank_cost, rank_space,
)
from fxsketch.replacements.precision import HALF_DTYPES, PRECISION_BITS, fast_precisions, flag_problem, smoothing
from fxsketch.replacements.refit import refit_outer
from fxsketch.replacements.registry import register_kind
from fxsketch.space import Categorical


PRECISIONS = tuple(PRECISION_BITS)  # of the factors: the layer's own dtype, or another (Linear only)


def lowrank_module(record: LayerRecord, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None,
                   precision: str = "float", cache: FactorCache | None = None, smooth: bool = True):
    """A LowRankLinear/LowRankConv2d holding B (R × in) and A (out × R) for `record`; with
    `precision="int8"` an Int8LowRankLinear of them (smoothed on `cache`'s statistics, when it has
    them and `smooth`), with "bf16"/"fp16" a CastLowRankLinear."""
    if precision == "int8":
        return Int8LowRankLinear.from_factors(B, A, bias, smoothing(record, B, cache, smooth))
    if precision in HALF_DTYPES:
        return CastLowRankLinear.from_factors(B, A, bias, HALF_DTYPES[precision])
    if record.op_type == "Linear":
        return LowRankLinear.from_factors(B, A, bias)
    c, kh, kw = record.weight_shape[1:]
    g = record.conv
    return LowRankConv2d.from_factors(B.reshape(B.shape[0], c, kh, kw), A, bias,
                                      g["stride"], g["padding"], g["dilation"])


@register_kind
class SVD(ReplacementKind):
    name = "svd"
    param_names = ("low_rank", "precision")
    options = ("smooth",)  # of int8 factors (see `precision.Int8`)
    defaults: dict[str, Any] = {"precision": "float"}

    def invalid(self, record: LayerRecord, params: dict[str, Any]) -> str:
        rank, full = params.get("low_rank"), min(record.out_features, record.in_features)
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= full:
            return f"low_rank must be an integer in [1, {full}] for {record.name} {record.weight_shape}, got {rank!r}"
        precision = params.get("precision", "float")
        if precision not in PRECISIONS:
            return f"precision must be one of {PRECISIONS}, got {precision!r}"
        if precision != "float" and record.op_type != "Linear":
            return (f"{precision} factors are for Linear layers; {record.name} is a {record.op_type}: "
                    "use precision 'float'")
        if params.get("smooth") is not None and precision != "int8":
            return f"smooth is a parameter of int8 factors; this entry's precision is {precision!r}: drop smooth"
        return flag_problem(params)

    def upper_bounds(self, record: LayerRecord) -> dict[str, int]:
        return {"low_rank": min(record.out_features, record.in_features)}

    def auto_space(self, record: LayerRecord, precision: bool = False):
        space = rank_space(auto_rank_limit(record))
        if space is None:
            return None
        faster = fast_precisions(record) if precision else []
        return {"low_rank": space, "precision": Categorical(["float", *faster])} if faster else {"low_rank": space}

    def cost(self, record: LayerRecord, params: dict[str, Any]) -> Cost:
        return lowrank_cost(record, int(params["low_rank"]), PRECISION_BITS[params.get("precision", "float")])

    def build(self, record, weight, bias, params, cache: FactorCache, copy_weights=True):
        rank, precision = int(params["low_rank"]), params.get("precision", "float")
        if not copy_weights:
            return fresh_lowrank_module(record, rank, bias is not None, precision).to(weight.device, weight.dtype)
        W = weight.reshape(record.out_features, -1)
        U, S, Vh = cache.svd(record.name, W, rank)
        root = S.sqrt()
        A, B = U * root, root[:, None] * Vh
        moment = cache.second_moment(record.name) if cache.refit else None
        # inputs that were all zero in calibration (a dead ReLU) leave nothing to fit A to: the SVD's A stays
        if moment is not None and (moment.is_meta or float(moment.diagonal().sum()) > 0):
            # keep B's subspace, fit A (and the bias) to the layer's real outputs
            centered = cache.centers(record.name, bias is not None)
            target, C = cache.target(record.name, W, centered)
            A = refit_outer(target, B.to(C.dtype), C)
            bias = cache.bias(record.name, W, (A, B), bias)
        return lowrank_module(record, B.to(weight.dtype), A.to(weight.dtype), bias, precision, cache,
                              params.get("smooth") is not False)


@register_kind
class WhitenedSVD(SVD):
    """Activation-whitened truncated SVD: the rank-R factorization with the least output error on
    the calibration inputs (see `FactorCache.whitened`). Needs calibration statistics. With refit
    on (the default) and a bias, it is fitted around the input mean and the bias absorbs the mean
    output (the least-squares optimum with a free bias)."""

    name = "whitened_svd"

    def build(self, record, weight, bias, params, cache: FactorCache, copy_weights=True):
        rank, precision = int(params["low_rank"]), params.get("precision", "float")
        if not copy_weights:
            return fresh_lowrank_module(record, rank, bias is not None, precision).to(weight.device, weight.dtype)
        W = weight.reshape(record.out_features, -1)
        centered = cache.centers(record.name, bias is not None)
        A, B = cache.whitened_factors(record.name, W, centered, weight.dtype)
        A, B = A[:, :rank], B[:rank]
        if centered:  # decomposed around the input mean: the bias carries the mean output
            bias = cache.bias(record.name, W, (A, B), bias)
        return lowrank_module(record, B, A, bias, precision, cache, params.get("smooth") is not False)


def fresh_lowrank_module(record: LayerRecord, rank: int, bias: bool, precision: str = "float"):
    """A randomly initialized low-rank layer of `record`'s geometry (for `copy_weights=False`)."""
    if record.op_type == "Linear":
        layer = LowRankLinear(record.in_features, record.out_features, rank, bias=bias)
        return layer if precision == "float" else lowrank_module(record, layer.B, layer.A, layer.bias, precision)
    c, kh, kw = record.weight_shape[1:]
    g = record.conv
    return LowRankConv2d(c, record.out_features, rank, (kh, kw), g["stride"], g["padding"], g["dilation"], bias)
