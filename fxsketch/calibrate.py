"""Calibration: per-layer input statistics from real data, for activation-aware factorizations.

Each matchable layer gets the `in × in` second moment of its inputs (im2col patches for Conv2d),
accumulated in float64 over the batches; activations themselves are never kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from fxsketch.capture import as_inputs, describe_inputs, find_layers, input_of
from fxsketch.records import LayerRecord

__all__ = ["LayerStats", "calibrate"]


@dataclass
class LayerStats:
    """Σ xᵀx over every input row a layer saw (`gram`, float64) and how many rows (`count`)."""

    gram: torch.Tensor
    count: int = 0

    @property
    def second_moment(self) -> torch.Tensor:
        """E[xᵀx]: the gram matrix divided by the number of rows."""
        return self.gram / max(self.count, 1)

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().reshape(-1, rows.shape[-1]).to(torch.float64)
        self.gram.addmm_(rows.T, rows)
        self.count += rows.shape[0]


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, targets: Mapping[torch.fx.Node, LayerRecord],
                 stats: dict[str, LayerStats]) -> None:
        super().__init__(gm)
        self.targets, self.stats = targets, stats

    def run_node(self, n: torch.fx.Node) -> Any:
        record = self.targets.get(n)
        if record is not None:
            rows = _layer_rows(record, self.env[input_of(n)])
            width = self.stats[record.name].gram.shape[0]
            if rows.shape[-1] != width:
                raise ValueError(f"layer {record.name} {record.weight_shape} takes inputs with {width} features, "
                                 f"but this calibration batch gives it {rows.shape[-1]}")
            self.stats[record.name].add(rows)
        return super().run_node(n)


def _layer_rows(record: LayerRecord, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer's GEMM multiplies: x itself for Linear, im2col patches for Conv2d."""
    if record.op_type == "Linear":
        return x
    g = record.conv
    patches = F.unfold(x, record.weight_shape[2:], dilation=g["dilation"], padding=g["padding"], stride=g["stride"])
    return patches.transpose(1, 2)  # (N, L, C·kh·kw), channel-major like weight.reshape(out, -1)


def calibrate(
    gm: torch.fx.GraphModule,
    batches: Iterable[Any],
    records: list[LayerRecord] | None = None,
) -> dict[str, LayerStats]:
    """Run `gm` (a captured model) on `batches` and return each layer's input statistics.

    Args:
        gm: a GraphModule from `fxsketch.capture`.
        batches: an iterable of inputs (a tensor or a tuple of positional tensors per batch).
        records: the layers to record (default: every matchable layer of `gm`).

    Returns:
        `{qualified_name: LayerStats}` for every layer that received at least one row.

    Raises:
        ValueError: `batches` is empty.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"calibrate takes a captured GraphModule (fxsketch.capture(model, example_inputs)), "
                        f"got {type(gm).__name__}")
    try:
        if isinstance(batches, (str, bytes)):
            raise TypeError
        batches = iter(batches)
    except TypeError:
        raise TypeError(f"calibration_data must be an iterable of input batches (tensors or tuples of "
                        f"positional inputs), got {type(batches).__name__}") from None
    records = records if records is not None else find_layers(gm)
    records = [r for r in records if not r.unsupported]  # never factored: nothing to record
    stats = {r.name: LayerStats(torch.zeros(r.in_features, r.in_features, dtype=torch.float64)) for r in records}
    targets = {node: r for r in records for node in r.nodes}
    recorder = _Recorder(gm, targets, stats)
    seen = 0
    with torch.no_grad():
        for batch in batches:
            if batch is None:
                raise ValueError(f"calibration batch {seen} is None: each batch is a tensor or a tuple of the "
                                 "model's positional inputs")
            inputs = as_inputs(batch)
            try:
                recorder.run(*inputs)
            except (RuntimeError, ValueError) as exc:
                raise ValueError(f"calibration batch {seen} {describe_inputs(inputs)} does not run through the "
                                 f"model: {str(exc).strip().splitlines()[0]}") from exc
            seen += 1
    if not seen:
        raise ValueError("calibration_data is empty: pass an iterable of input batches (tensors or tuples)")
    return {name: s for name, s in stats.items() if s.count}
