"""Fusions of a rewritten graph: replacements that run faster as one op than one after another.

`fuse_int8_mlps`: an int8 layer, an activation (ReLU, GELU) and a static int8 layer (an entry
`{"method": "int8", "static": true}`, unsmoothed) become one `fxsketch::int8_mlp`, whose CPU kernel
writes the activation's output straight to the uint8 input of the second GEMM. The arithmetic is
the three ops' own (the static layer's fixed input range was set when it was built), so the
fusion is no plan entry of its own: it happens wherever the plan puts the pieces in a row.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxsketch.capture import input_of
from fxsketch.kernels import int8_linear, int8_mlp, int8_static_linear
from fxsketch.records import LayerRecord

__all__ = ["fuse_int8_mlps", "activation_of", "mlp_pairs", "fusable"]

_LINEAR = (int8_linear, torch.ops.fxsketch.int8_linear.default)
_STATIC = (int8_static_linear, torch.ops.fxsketch.int8_static_linear.default)
_GELU = {"none": "gelu", "tanh": "gelu_tanh"}


def activation_of(node: torch.fx.Node) -> str | None:
    """The `int8_mlp` activation `node` computes ("relu", "gelu", "gelu_tanh"), or None: a call of
    the function or of an `nn.ReLU` / `nn.GELU` module."""
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        if type(module) is nn.ReLU:
            return "relu"
        return _GELU.get(module.approximate) if type(module) is nn.GELU else None
    if node.op != "call_function":
        return None
    if node.target in (torch.ops.aten.relu.default, torch.relu, F.relu):
        return "relu"
    if node.target in (torch.ops.aten.gelu.default, F.gelu, torch._C._nn.gelu):
        return _GELU.get(node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none"))
    return None


def _arguments(node: torch.fx.Node, names: tuple[str, ...]) -> list:
    values = list(node.args) + [None] * (len(names) - len(node.args))
    return [node.kwargs.get(name, value) for name, value in zip(names, values)]


def fuse_int8_mlps(gm: torch.fx.GraphModule) -> int:
    """Fuse every int8 layer → activation → unsmoothed static int8 layer chain of `gm` whose two
    inner values feed nothing else into one `int8_mlp` call (in place); returns how many. Targets
    keep their form: Python entries stay Python entries, op overloads become the op's overload."""
    fused = 0
    for second in list(gm.graph.nodes):
        if second.op != "call_function" or second.target not in _STATIC:
            continue
        h, w2_q, w2_scale, b2, smooth2, qparams = _arguments(
            second, ("x", "weight_q", "weight_scale", "bias", "input_scale", "input_qparams"))
        if smooth2 is not None or not isinstance(h, torch.fx.Node) or len(h.users) != 1:
            continue
        activation = activation_of(h)
        first = h.args[0] if activation else None
        if not (isinstance(first, torch.fx.Node) and first.op == "call_function" and first.target in _LINEAR
                and len(first.users) == 1):
            continue
        x, w1_q, w1_scale, b1, smooth1 = _arguments(first, ("x", "weight_q", "weight_scale", "bias", "input_scale"))
        op = int8_mlp if second.target is int8_static_linear else torch.ops.fxsketch.int8_mlp.default
        with gm.graph.inserting_before(second):
            call = gm.graph.call_function(op, (x, w1_q, w1_scale, b1, smooth1, activation, w2_q, w2_scale, b2, qparams))
        call.meta = dict(second.meta)
        second.replace_all_uses_with(call)
        for node in (second, h, first):
            gm.graph.erase_node(node)
        fused += 1
    return fused


def mlp_pairs(records: Iterable[LayerRecord]) -> dict[str, str]:
    """{second layer: first layer} for every two Linear layers of a captured graph joined by an
    activation `int8_mlp` fuses, neither inner value used elsewhere: the pairs whose second layer,
    made static int8 after an int8 first one, the rewrite runs as one op."""
    outputs = {r.nodes[-1]: r.name for r in records if r.op_type == "Linear" and len(r.nodes) == 1}
    pairs = {}
    for node, name in outputs.items():
        h = input_of(node)
        if not (isinstance(h, torch.fx.Node) and activation_of(h) and len(h.users) == 1):
            continue
        first = outputs.get(h.args[0])
        if first is not None and len(h.args[0].users) == 1:
            pairs[name] = first
    return pairs


def fusable(first: dict, second: dict, smoothing: bool = True) -> bool:
    """Whether plan entries for the two layers of an `mlp_pairs` pair make the rewrite fuse them:
    both whole int8 layers, the second static and unsmoothed (`"smooth": false`, or built where
    no smoothing happens: `smoothing` False)."""
    return (first.get("method") == "int8" and second.get("method") == "int8" and bool(second.get("static"))
            and (second.get("smooth") is False or not smoothing))
