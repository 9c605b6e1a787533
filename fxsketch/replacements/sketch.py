"""The `sketch` kind (Panther's SKLinear/SKConv2d) and the `dense` kind (keep the layer)."""

from __future__ import annotations

import zlib
from typing import Any

import torch

from fxsketch.nn import SKConv2d, SKLinear
from fxsketch.records import LayerRecord
from fxsketch.replacements.base import (
    Cost, ReplacementKind, auto_rank_limit, dense_cost, lowrank_cost, rank_space,
)
from fxsketch.replacements.refit import refit_sketch
from fxsketch.replacements.registry import register_kind
from fxsketch.spec import Categorical


def layer_seed(name: str) -> int:
    """A per-layer sketch seed that does not depend on Python's hash randomization."""
    return zlib.crc32(name.encode())


SKETCH_SIZE_FACTOR = 64  # a sketch may hold this many times the numbers of the layer's weights ...
SKETCH_SIZE_FLOOR = 1 << 22  # ... or this many, whichever is more


def sketch_size_limit(record: LayerRecord) -> int:
    """The most numbers a sketch of `record` may hold."""
    return max(SKETCH_SIZE_FACTOR * record.in_features * record.out_features, SKETCH_SIZE_FLOOR)


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
        # A sketch holds 2·l·k·(in+out) numbers, whatever the layer's rank: bounded by the layer's
        # size (generously: the seed API searches ranks far past small layers' own), so that a
        # plan's num_terms=10**9 is refused instead of attempting a terabyte allocation.
        l, k = params["num_terms"], params["low_rank"]
        size, limit = 2 * l * k * (record.in_features + record.out_features), sketch_size_limit(record)
        if size > limit:
            return (f"num_terms × low_rank = {l} × {k} makes a sketch of {size:,} numbers for {record.name} "
                    f"{record.weight_shape}, more than its bound of {limit:,} ({SKETCH_SIZE_FACTOR}× the layer's "
                    f"weights, at least {SKETCH_SIZE_FLOOR:,}): lower num_terms or low_rank")
        return ""

    def upper_bounds(self, record: LayerRecord) -> dict[str, int]:
        each = sketch_size_limit(record) // (2 * (record.in_features + record.out_features))  # the other at 1
        return {"num_terms": each, "low_rank": each}

    def auto_space(self, record: LayerRecord, precision: bool = False):
        # Every (l, k) pair is efficient: 2·l·k·(in+out) stays 1.5× below in·out at the largest l
        limit = auto_rank_limit(record)
        terms = [l for l in (1, 2, 3) if 2 * l <= limit]
        ks = rank_space(limit // (2 * terms[-1])) if terms else None
        if ks is None:
            return None
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
        module = module.to(weight.device)  # the sketches are drawn on the CPU, the same on every device
        moment = cache.second_moment(record.name) if copy_weights and cache.refit else None
        # a layer whose inputs were all zero in calibration (e.g. after a dead ReLU) has nothing to
        # fit: it keeps its zero-shot sketch (whitening a zero second moment would give NaN)
        if moment is not None and (moment.is_meta or float(moment.diagonal().sum()) > 0):  # meta: no values
            # Zero-shot sketches keep almost nothing of the layer. With calibration statistics the
            # fixed sketches become data-aware (the layer's leading output directions for U1, the
            # next whitened input directions for U2: the sketch can then represent the whitened
            # rank-2lk factorization), and the trainable halves are refit by least squares to the
            # layer's outputs on real inputs.
            W = weight.detach().reshape(record.out_features, -1).to(moment.dtype)
            centered = cache.centers(record.name, bias is not None)
            target, C = cache.target(record.name, W, centered)
            U1, U2 = data_sketches(cache, record.name, W, centered, module.U1, module.U2)
            with torch.no_grad():
                module.U1.copy_(U1)
                module.U2.copy_(U2)
                init = torch.einsum("do,lko->ldk", target.T, U1), torch.einsum("ldk,do->lko", U2, target.T)
            S1, S2 = refit_sketch(*init, U1, U2, target, C)
            with torch.no_grad():
                module.S1.copy_(S1)
                module.S2.copy_(S2)
            if bias is not None and centered:
                B, A = module.collapsed_factors()
                bias = cache.bias(record.name, W, (A, B), bias)
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


def data_sketches(cache, key: str, W: torch.Tensor, centered: bool, U1: torch.Tensor, U2: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-aware sketches (in W's dtype) of the shapes of `U1` (l, k, out) and `U2` (l, d, k).

    From the layer's whitened decomposition W ≈ Σ_j u_j s_j m_j (`FactorCache.whitened`, on the
    calibration statistics): U1's l·k rows are the leading output directions u_1…u_lk, U2's l·k
    columns the next input directions m_lk+1…m_2lk. `x S1 U1` then spans every map onto the
    leading outputs and `x U2 S2` every map reading the next inputs, so the least-squares refit
    reaches the whitened rank-2lk optimum. Positions beyond the layer's rank keep the random sketch.
    Each row/column is scaled like the random scaled-sign sketch it replaces.
    """
    l, k, out = U1.shape
    d = U2.shape[1]
    Uw, _, Mw = cache.whitened(key, W, centered)
    n = Uw.shape[1]
    u1 = U1.detach().to(W.dtype).reshape(l * k, out).clone()
    u2 = U2.detach().to(W.dtype).permute(1, 0, 2).reshape(d, l * k).clone()
    first = min(l * k, n)
    u1[:first] = Uw[:, :first].T * (out / k) ** 0.5
    second = max(0, min(l * k, n - l * k))
    if second:
        cols = Mw[l * k:l * k + second].T
        u2[:, :second] = cols / cols.norm(dim=0).clamp_min(torch.finfo(cols.dtype).tiny) * (d / k) ** 0.5
    return u1.reshape(l, k, out), u2.reshape(d, l, k).permute(1, 0, 2).contiguous()
