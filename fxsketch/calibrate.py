"""Calibration: per-layer input statistics from real data, for activation-aware factorizations.

Each matchable layer gets the `in × in` second moment of its inputs (im2col patches for Conv2d) and
their mean, accumulated on the layer's device (in float64 on the CPU, see `statistics_dtype`); activations themselves are never kept.
Padding positions are left out: for models with an `attention_mask` input (HF transformers), rows
whose mask is 0 are not counted (`mask=`).

`fxsketch.sequential.sequential_stats` is the error-compensating variant: each planned layer's statistics are taken on
the inputs the already-replaced earlier layers produce, together with their cross moment with the
original model's inputs, so each replacement is fitted to undo the error upstream of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from fxsketch.capture import as_inputs, describe_inputs, find_layers, input_of
from fxsketch.records import LayerRecord, statistics_dtype

__all__ = ["LayerStats", "calibrate", "iterate_batches", "mask_fn", "layer_rows", "check_width", "empty_stats",
           "batch_inputs"]


@dataclass
class LayerStats:
    """Σ xᵀx over every input row a layer saw (`gram`, in `statistics_dtype`: float64 on the CPU),
    how many rows (`count`), and Σ x (`total`).

    Sequential statistics (`sequential_stats`) describe two inputs per row: x̃, what the layer
    receives in the partly replaced model (`gram`, `total`), and x, what the original model gave it
    at the same position (`cross` = Σ xᵀx̃, `ref_total` = Σ x). Plain calibration has x̃ = x and
    leaves `cross` and `ref_total` None. `low` and `high` are each feature's smallest and largest
    value seen (of x̃): the range a static int8 input is quantized onto.
    """

    gram: torch.Tensor
    count: int = 0
    total: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    ref_total: torch.Tensor | None = None
    low: torch.Tensor | None = None
    high: torch.Tensor | None = None

    @property
    def second_moment(self) -> torch.Tensor:
        """E[x̃ᵀx̃]: the gram matrix divided by the number of rows."""
        return self.gram / max(self.count, 1)

    @property
    def cross_moment(self) -> torch.Tensor:
        """E[xᵀx̃] (the second moment itself for plain statistics)."""
        return self.second_moment if self.cross is None else self.cross / max(self.count, 1)

    @property
    def mean(self) -> torch.Tensor | None:
        """E[x̃] (None for statistics recorded without it)."""
        return None if self.total is None else self.total / max(self.count, 1)

    @property
    def ref_mean(self) -> torch.Tensor | None:
        """E[x]: the original model's mean input (the mean itself for plain statistics)."""
        return self.mean if self.ref_total is None else self.ref_total / max(self.count, 1)

    def add(self, rows: torch.Tensor, ref: torch.Tensor | None = None) -> None:
        """Accumulate input rows (and, for sequential statistics, the original model's rows `ref`)."""
        dtype = statistics_dtype(rows.device, rows.dtype)
        rows = rows.detach().reshape(-1, rows.shape[-1]).to(dtype)
        if self.gram.device != rows.device or self.gram.dtype != dtype:  # statistics live on the layer's device
            self.gram = self.gram.to(rows.device, dtype)
        self.gram.addmm_(rows.T, rows)
        self.count += rows.shape[0]
        total = rows.sum(0)
        self.total = total if self.total is None else self.total + total
        if rows.shape[0]:
            low, high = rows.amin(0), rows.amax(0)
            self.low = low if self.low is None else torch.minimum(self.low, low)
            self.high = high if self.high is None else torch.maximum(self.high, high)
        if ref is not None:
            ref = ref.detach().reshape(-1, ref.shape[-1]).to(dtype)
            cross = ref.T @ rows
            self.cross = cross if self.cross is None else self.cross + cross
            self.ref_total = ref.sum(0) if self.ref_total is None else self.ref_total + ref.sum(0)


MaskFn = Callable[[tuple], "torch.Tensor | None"]


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, targets: Mapping[torch.fx.Node, LayerRecord],
                 stats: dict[str, LayerStats]) -> None:
        super().__init__(gm)
        self.targets, self.stats = targets, stats
        self.mask: torch.Tensor | None = None

    def run_node(self, n: torch.fx.Node) -> Any:
        record = self.targets.get(n)
        if record is not None:
            rows = layer_rows(record, self.env[input_of(n)], self.mask)
            check_width(record, rows, self.stats[record.name])
            self.stats[record.name].add(rows)
        return super().run_node(n)


def check_width(record: LayerRecord, rows: torch.Tensor, stats: LayerStats) -> None:
    width = stats.gram.shape[0]
    if rows.shape[-1] != width:
        raise ValueError(f"layer {record.name} {record.weight_shape} takes inputs with {width} features, "
                         f"but this calibration batch gives it {rows.shape[-1]}")


def layer_rows(record: LayerRecord, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The rows the layer's GEMM multiplies: x itself for Linear, im2col patches for Conv2d.

    With a token `mask` (N, L) and a Linear input of shape (N, L, features), only the rows whose
    mask is nonzero (real tokens, not padding).
    """
    if record.op_type == "Linear":
        if mask is not None and x.dim() == mask.dim() + 1 and tuple(x.shape[:-1]) == tuple(mask.shape):
            return x[mask != 0]
        return x
    g = record.conv
    patches = F.unfold(x, record.weight_shape[2:], dilation=g["dilation"], padding=g["padding"], stride=g["stride"])
    return patches.transpose(1, 2)  # (N, L, C·kh·kw), channel-major like weight.reshape(out, -1)


MASK_NAMES = ("attention_mask",)


def mask_fn(gm: torch.fx.GraphModule, mask: Any) -> MaskFn | None:
    """How to find the token mask of a batch.

    `mask="auto"` (default): the positional input whose placeholder is named `attention_mask` (HF
    models captured by fxsketch keep their argument names), if the graph has one; `None`: count
    every row; a callable: `mask(inputs) -> (N, L) tensor or None`, called on each batch's tuple.
    """
    if mask is None:
        return None
    if callable(mask):
        return mask
    if mask != "auto":
        raise ValueError(f"mask must be 'auto', None or a callable (inputs -> (N, L) mask), got {mask!r}")
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    for i, name in enumerate(names):
        if name in MASK_NAMES:
            def find(inputs: tuple, i: int = i) -> torch.Tensor | None:
                m = inputs[i] if i < len(inputs) else None
                return m if isinstance(m, torch.Tensor) and m.dim() == 2 else None
            return find
    return None


def calibrate(
    gm: torch.fx.GraphModule,
    batches: Iterable[Any],
    records: list[LayerRecord] | None = None,
    *,
    mask: Any = "auto",
) -> dict[str, LayerStats]:
    """Run `gm` (a captured model) on `batches` and return each layer's input statistics.

    Args:
        gm: a GraphModule from `fxsketch.capture`.
        batches: an iterable of inputs (a tensor or a tuple of positional tensors per batch).
        records: the layers to record (default: every matchable layer of `gm`).
        mask: which token rows count. "auto": the `attention_mask` input when the model has one
            (padding positions are left out); None: every row; or a callable
            `inputs -> (N, L) tensor` (nonzero: count the row) applied to each batch.

    Returns:
        `{qualified_name: LayerStats}` for every layer that received at least one row.

    Raises:
        ValueError: `batches` is empty.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"calibrate takes a captured GraphModule (fxsketch.capture(model, example_inputs)), "
                        f"got {type(gm).__name__}")
    batches = iterate_batches(batches)
    records = records if records is not None else find_layers(gm)
    records = [r for r in records if not r.unsupported]  # never factored: nothing to record
    stats = {r.name: empty_stats(r) for r in records}
    targets = {node: r for r in records for node in r.nodes}
    recorder = _Recorder(gm, targets, stats)
    find_mask = mask_fn(gm, mask)
    seen = 0
    with torch.no_grad():
        for batch in batches:
            inputs = batch_inputs(batch, seen)
            recorder.mask = find_mask(inputs) if find_mask else None
            try:
                recorder.run(*inputs)
            except (RuntimeError, ValueError) as exc:
                raise ValueError(f"calibration batch {seen} {describe_inputs(inputs)} does not run through the "
                                 f"model: {str(exc).strip().splitlines()[0]}") from exc
            seen += 1
    if not seen:
        raise ValueError("calibration_data is empty: pass an iterable of input batches (tensors or tuples)")
    return {name: s for name, s in stats.items() if s.count}


def empty_stats(record: LayerRecord) -> LayerStats:
    return LayerStats(torch.zeros(record.in_features, record.in_features, dtype=torch.float64))


def iterate_batches(batches: Any) -> Iterator[Any]:
    """`iter(batches)`, with an error that says what calibration data is."""
    try:
        if isinstance(batches, (str, bytes)):
            raise TypeError
        return iter(batches)
    except TypeError:
        raise TypeError(f"calibration_data must be an iterable of input batches (tensors or tuples of "
                        f"positional inputs), got {type(batches).__name__}") from None


def batch_inputs(batch: Any, index: int) -> tuple:
    if batch is None:
        raise ValueError(f"calibration batch {index} is None: each batch is a tensor or a tuple of the "
                         "model's positional inputs")
    return as_inputs(batch)
