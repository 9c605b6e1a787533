"""The `sketch` kind (Panther's SKLinear/SKConv2d) and the `dense` kind (keep the layer)."""

from __future__ import annotations

import zlib
from typing import Any

import torch

from fxsketch.nn import SKConv2d, SKLinear
from fxsketch.records import LayerRecord
from fxsketch.replacements.base import (
    Cost, ReplacementKind, dense_cost, efficient_rank_limit, lowrank_cost, rank_space,
)
from fxsketch.replacements.refit import refit_sketch
from fxsketch.replacements.registry import register_kind
from fxsketch.spec import Categorical, Int


def layer_seed(name: str) -> int:
    """A per-layer sketch seed that does not depend on Python's hash randomization."""
    return zlib.crc32(name.encode())


@register_kind
class Sketch(ReplacementKind):
    name = "sketch"
    param_names = ("num_terms", "low_rank")
    defaults: dict[str, Any] = {"num_terms": 1}

    def invalid(self, record: LayerRecord, params: dict[str, Any]) -> str:
        for key in self.param_names:
            value = params.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                return f"{key} must be a positive integer, got {value!r}"
        return ""

    def auto_space(self, record: LayerRecord):
        # Efficient while 2·l·k·(in+out) < in·out (the seed's rule); the search prunes the
        # (l, k) pairs of these ranges that cross it before evaluating them.
        k_limit = efficient_rank_limit(record) // 2
        ks = rank_space(k_limit)
        if ks is None:
            return None
        terms = [l for l in (1, 2, 3) if 2 * l * ks.low <= efficient_rank_limit(record)]
        return {"num_terms": Categorical(terms), "low_rank": ks}

    def cost(self, record: LayerRecord, params: dict[str, Any]) -> Cost:
        return lowrank_cost(record, 2 * int(params["num_terms"]) * int(params["low_rank"]))

    def build(self, record, weight, bias, params, cache, copy_weights=True):
        l, k = int(params["num_terms"]), int(params["low_rank"])
        w = weight if copy_weights else None
        if record.op_type == "Linear":
            module = SKLinear(record.in_features, record.out_features, l, k, bias=bias is not None,
                              weight=w, seed=layer_seed(record.name))
        else:
            c, kh, kw = record.weight_shape[1:]
            g = record.conv
            module = SKConv2d(c, record.out_features, (kh, kw), l, k, g["stride"], g["padding"],
                              g["dilation"], bias=bias is not None, weight=w, seed=layer_seed(record.name))
        C = cache.second_moment(record.name)
        if copy_weights and cache.refit and C is not None:
            # Zero-shot sketches keep almost nothing of the layer; a least-squares refit of the
            # trainable halves to the layer's outputs on real inputs is what makes them usable.
            W = weight.detach().reshape(record.out_features, -1).to(torch.float64)
            f64 = [t.detach().to(torch.float64) for t in (module.S1, module.S2, module.U1, module.U2)]
            S1, S2 = refit_sketch(*f64, W, C)
            with torch.no_grad():
                module.S1.copy_(S1)
                module.S2.copy_(S2)
        module = module.to(weight.dtype)
        if bias is not None and copy_weights:
            with torch.no_grad():
                module.bias.copy_(bias)
        return module


@register_kind
class Dense(ReplacementKind):
    name = "dense"

    def unsupported(self, record: LayerRecord) -> str:
        return ""

    def cost(self, record: LayerRecord, params: dict[str, Any]) -> Cost:
        return dense_cost(record)

    def build(self, record, weight, bias, params, cache, copy_weights=True):
        return None
