"""The normalized description of one matchable layer in a captured graph, and `fetch`, which reads
an attribute of a module by its dotted path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

MATCHABLE_TYPES = ("Linear", "Conv2d")


def fetch(module: torch.nn.Module, target: str) -> Any:
    """The attribute at the dotted path `target` of `module` (a parameter, buffer or submodule)."""
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class LayerRecord:
    """One matchable weight-bearing node (or group of nodes sharing one weight).

    Attributes:
        name: qualified name of the layer (`encoder.layer.0.attention.self.query`).
        op_type: canonical op type, `"Linear"` or `"Conv2d"`.
        module_type: class name of the owning module (`"Linear"`, `"NonDynamicallyQuantizableLinear"`),
            or `"function"` for a functional call on a bare parameter.
        weight_shape: shape of the weight, `(out, in)` or `(out, in/groups, kh, kw)`.
        module_order: position of the owning module in `named_modules()`; functional calls on
            bare parameters come after every module.
        graph_order: position of the first node in the graph.
        tokens: output positions per call on the example inputs (rows for Linear, N·H·W for Conv2d).
        conv: Conv2d hyper-parameters (`stride`, `padding`, `dilation`, `groups`, `padding_mode`).
        unsupported: why no replacement applies (empty when one does).
        nodes: the graph nodes computing this layer.
        weight_target / bias_target: attribute paths of the weight and bias in the graph module.
        transposed: the weight is stored (in, out), as in `x·W + b` (transformers' Conv1D).
        device / dtype: where the weight lives (`"cpu"`, `"cuda"`, `"meta"`) and its dtype: which
            precision kinds are offered for it.
    """

    name: str
    op_type: str
    module_type: str
    weight_shape: tuple[int, ...]
    module_order: int = 0
    graph_order: int = 0
    tokens: int = 1
    conv: dict[str, Any] = field(default_factory=dict)
    unsupported: str = ""
    nodes: list[torch.fx.Node] = field(default_factory=list, repr=False)
    weight_target: str = ""
    bias_target: str | None = None
    transposed: bool = False
    device: str = "cpu"
    dtype: torch.dtype = torch.float32

    def weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The stored weight as the (out, in·kh·kw) matrix every factorization works on."""
        return weight.T if self.transposed else weight.reshape(self.weight_shape[0], -1)

    @property
    def in_features(self) -> int:
        """Input width of the layer's GEMM (in·kh·kw for Conv2d)."""
        inner = 1
        for d in self.weight_shape[1:]:
            inner *= d
        return inner

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]


def statistics_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of a layer's calibration statistics and factorizations, on the layer's device.

    float64 on the CPU, where it costs little and keeps nearly singular second moments factorizable;
    elsewhere the wider of the layer's dtype and float32: GPUs run float64 at a small fraction of
    their float32 rate (1/64 on many), and some accelerators have no float64 at all.
    """
    if torch.device(device).type == "cpu":
        return torch.float64
    return torch.promote_types(dtype, torch.float32)


def ridge_scale(dtype: torch.dtype, floor: float) -> float:
    """A relative ridge for solving with a second moment in `dtype`: `floor`, or enough to lift
    rounding (a hundred machine epsilons) when the dtype is narrower than float64."""
    return max(floor, 100 * torch.finfo(dtype).eps)
