"""Sequential (error-compensating) calibration: fit each planned layer to the original layer's
outputs from the inputs it really receives once the layers before it are replaced.

It builds replacements while it measures (one pass, layer by layer in graph order), so it sits
above both the plain statistics (`fxsketch.calibrate`) and the plan's entries (`fxsketch.plan`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.fx

from fxsketch.calibrate import LayerStats, batch_inputs, check_width, empty_stats, iterate_batches, layer_rows, mask_fn
from fxsketch.capture import find_attention, find_layers, find_tables, input_of
from fxsketch.plan import build_entry, check_entry, find_record
from fxsketch.records import LayerRecord
from fxsketch.replacements import FactorCache

__all__ = ["sequential_stats"]


def sequential_stats(
    gm: torch.fx.GraphModule,
    batches: Iterable[Any],
    plan: Mapping[str, Mapping[str, Any]],
    records: list[LayerRecord] | None = None,
    *,
    mask: Any = "auto",
    refit: bool = True,
    smooth: bool = True,
) -> dict[str, LayerStats]:
    """Error-compensating calibration statistics for `plan` (one pass over `batches`).

    The original model (x) and the model being replaced (x̃) run side by side over all batches, one
    graph node at a time. At each planned layer, in graph order, the layer's statistics are
    accumulated from x̃ (what it receives once every earlier planned layer is replaced) and x (what
    the original model gives it): E[x̃ᵀx̃], E[xᵀx̃] and both means. Its replacement is then built
    from them (`FactorCache(stats, refit=refit, smooth=smooth)`, exactly as `apply_plan` will build it) and
    produces x̃ for the layers after it. Building the plan with a `FactorCache` of these statistics
    fits every layer to the original layer's outputs *given the inputs it will really see*:
    min E‖W x − Ŵ x̃‖², which undoes part of the error made upstream (whitened_svd solves it in
    closed form: Ŵ = SVD_R(W P L⁻ᵀ) L⁻¹ with P = E[x x̃ᵀ], E[x̃ x̃ᵀ] = L Lᵀ).

    All batches' live activations are held at once (twice), so pass a calibration set that fits
    in memory. A layer used at several graph nodes is fitted at the first one.

    Returns:
        `{qualified_name: LayerStats}` for the planned layers (with `cross` and `ref_total`) and
        plain statistics for every other layer that received rows.
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"sequential_stats takes a captured GraphModule, got {type(gm).__name__}")
    all_inputs = [batch_inputs(b, i) for i, b in enumerate(iterate_batches(batches))]
    if not all_inputs:
        raise ValueError("calibration_data is empty: pass an iterable of input batches (tensors or tuples)")
    records = records if records is not None else find_layers(gm)
    by_name = {r.name: r for r in records}
    # int8 tables and 16-bit attention change the inputs too little to refit for
    others = {r.name for r in find_tables(gm) + find_attention(gm)}
    planned = {find_record(by_name, name, gm).name: {"method": "svd", **entry} for name, entry in plan.items()
               if entry.get("method", "svd") != "dense" and name not in others}
    records = [r for r in records if not r.unsupported]
    for r in records:  # the whole plan is checked before the pass
        if r.name in planned:
            check_entry(r, planned[r.name])
    by_node = {node: r for r in records for node in r.nodes}
    stats = {r.name: empty_stats(r) for r in records}
    cache = FactorCache(stats, refit=refit, smooth=smooth)
    built: dict[str, Any] = {}
    find_mask = mask_fn(gm, mask)
    masks = [find_mask(inputs) if find_mask else None for inputs in all_inputs]

    def runner(inputs: tuple) -> torch.fx.Interpreter:
        interp = torch.fx.Interpreter(gm)
        interp.env = {}
        interp.args_iter = iter(gm.graph.process_inputs(*inputs))
        return interp

    teachers = [runner(inputs) for inputs in all_inputs]
    students = [runner(inputs) for inputs in all_inputs]
    with torch.no_grad():
        for node in gm.graph.nodes:
            record = by_node.get(node)
            if node.op == "output":
                break
            if record is not None and record.name in planned:
                layer = stats[record.name]
                if record.name not in built:
                    for t, s, m in zip(teachers, students, masks):
                        rows = layer_rows(record, s.env[input_of(node)], m)
                        check_width(record, rows, layer)
                        layer.add(rows, layer_rows(record, t.env[input_of(node)], m))
                    built[record.name] = build_entry(gm, record, planned[record.name], cache)
                module = built[record.name]
                for t, s in zip(teachers, students):
                    t.env[node] = t.run_node(node)
                    s.env[node] = module(s.env[input_of(node)]) if module is not None else s.run_node(node)
            else:
                for t, s, m in zip(teachers, students, masks):
                    if record is not None:  # a layer left dense: plain statistics of the original
                        stats[record.name].add(layer_rows(record, t.env[input_of(node)], m))
                    t.env[node] = t.run_node(node)
                    s.env[node] = s.run_node(node)
            for interp in (*teachers, *students):
                for dead in interp.user_to_last_uses.get(node, []):
                    interp.env.pop(dead, None)
    return {name: s for name, s in stats.items() if s.count}
