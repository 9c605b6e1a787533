"""Rewrite: apply a plan `{qualified_name: {"method": ..., **params}}` to a captured graph."""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx
from torch import nn

from fxsketch.calibrate import calibrate
from fxsketch.capture import as_inputs, capture, find_attention, find_layers, find_tables, input_of
from fxsketch.fitted import MODULES, factors_of, install_factors
from fxsketch.fuse import fuse_int8_mlps
from fxsketch.kernels import half_attention
from fxsketch.nn import op_call
from fxsketch.plan import Plan, build_entry, check_entry, find_record, normalize_plan
from fxsketch.records import LayerRecord, fetch
from fxsketch.replacements import HALF_DTYPES, FactorCache
from fxsketch.sequential import sequential_stats

__all__ = ["rewrite", "apply_plan", "emit", "compute_attention_in", "private_path", "check_same_output_shapes"]

log = logging.getLogger(__name__)


def rewrite(
    model: nn.Module,
    plan: Mapping[str, Any] | str | os.PathLike,
    example_inputs: Any = None,
    *,
    copy_weights: bool = True,
    calibration_data: Any = None,
    refit: bool = True,
    smooth: bool = True,
    sequential: bool = False,
    mask: Any = "auto",
    use_fitted: bool = True,
) -> torch.fx.GraphModule:
    """Capture `model` and apply `plan` without any search; `model` itself is never changed.

    Args:
        model: the model (or an already captured GraphModule).
        plan: `{qualified_name: {"method": "svd", "low_rank": 64}, ...}`, or a plan JSON path. An
            embedding table's name takes `{"method": "int8_weight"}`: its rows stored as int8.
        example_inputs: inputs for capture and for checking the rewritten output shapes.
        copy_weights: build replacements from the original weights (False: fresh random init).
        calibration_data: input batches for activation-aware kinds (`whitened_svd`) and refits.
        refit: with calibration data, refit trainable factors to the layers' outputs.
        smooth: with calibration data, smooth the inputs of int8 layers (`FactorCache.smoothing`).
        sequential: with calibration data, fit each layer, in graph order, to the original
            layer's outputs from the inputs it receives once the layers before it are replaced
            (`fxsketch.sequential.sequential_stats`: error-compensating, about two forward passes
            of the calibration data, held in memory at once).
        mask: which token rows of the calibration data count ("auto": the `attention_mask`
            input, if any; see `fxsketch.calibrate`).
        use_fitted: a plan saved by `Result.save_plan` (or a Result) carries each layer's fitted
            factors: install them, rebuilding the optimized model bit for bit without calibration
            data. False fits them again (from `calibration_data` where a kind needs it).

    Returns:
        A new GraphModule in which every planned layer runs on the fxsketch ops.
    """
    fitted = factors_of(plan) if use_fitted else {}
    plan = normalize_plan(plan.plan if hasattr(plan, "graph_module") else plan)
    inputs = as_inputs(example_inputs) if example_inputs is not None else None
    gm = capture(model, inputs)
    layers = find_layers(gm)
    records = {r.name: r for r in layers + find_tables(gm) + find_attention(gm)}
    stats = None
    if sequential and calibration_data is None:
        raise ValueError("sequential=True fits each layer on calibration data: pass calibration_data=")
    if sequential and not copy_weights:
        raise ValueError("sequential=True fits the factors to the original weights: it cannot go with "
                         "copy_weights=False (fresh random factors)")
    if calibration_data is not None:
        stats = (sequential_stats(gm, list(calibration_data), plan, layers, mask=mask, refit=refit, smooth=smooth)
                 if sequential else calibrate(gm, calibration_data, layers, mask=mask))
    new = apply_plan(gm, records, plan, FactorCache(stats, refit=refit, smooth=smooth), copy_weights=copy_weights,
                     fitted=fitted)
    if inputs is not None:
        check_same_output_shapes(gm, new, inputs)
    return new


def apply_plan(
    gm: torch.fx.GraphModule,
    records: Mapping[str, LayerRecord],
    plan: Plan,
    cache: FactorCache,
    copy_weights: bool = True,
    share_weights: bool = False,
    fitted: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> torch.fx.GraphModule:
    """A rewritten deep copy of `gm` (which stays untouched) with each plan entry built and installed.

    With `share_weights` the copy's kept parameters are `gm`'s own tensors (buffers are still
    copied): the search's trial builds, which never train them, skip copying a large model's
    weights on every trial. A layer in `fitted` gets those stored tensors instead of a fit.
    """
    # The dense weights of the layers being replaced are dropped from the copy: share them instead
    # of copying them (for large layers that is most of the copy's cost).
    # Fresh Parameter objects over the same storage (and version counter): an in-place update is
    # still seen by the search's check, while `.to()` / `.half()` on the copy swap only its own.
    memo = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad)
            for p in gm.parameters()} if share_weights else {}
    for name, entry in plan.items():
        record = records.get(name)
        replaced = record is not None and not record.unsupported and entry.get("method") != "dense"
        for target in (record.weight_target, record.bias_target) if replaced else ():
            if target:
                tensor = fetch(gm, target)
                memo[id(tensor)] = tensor
    new = _copy_graph_module(gm, memo)
    nodes = {n.name: n for n in new.graph.nodes}
    for name, entry in plan.items():
        record = find_record(records, name, gm)
        if record.op_type == "Attention":
            compute_attention_in(nodes[record.nodes[0].name], record, entry)
            continue
        stored = (fitted or {}).get(name)
        module = build_entry(new, record, entry, cache, copy_weights and stored is None)
        if module is not None:
            if stored is not None:
                install_factors(module, stored, name)
            _install(new, record, [nodes[n.name] for n in record.nodes], module)
    fuse_int8_mlps(new)
    new.graph.eliminate_dead_code()
    _drop_unused_attributes(new)
    new.graph.lint()
    new.recompile()
    new.meta["fxsketch_plan"] = {name: dict(entry) for name, entry in plan.items()}
    return new


def _copy_graph_module(gm: torch.fx.GraphModule, memo: dict[int, Any]) -> torch.fx.GraphModule:
    """`copy.deepcopy(gm, memo)` whose code is not generated yet: the caller edits the graph and
    recompiles once (generating a large exported graph's code twice is a third of a trial's build).

    The deep copy is given an empty stand-in for the graph, which compiles for nothing, and the real
    graph's copy is attached afterwards the way the `graph` setter does, minus its recompile.
    """
    graph = copy.deepcopy(gm.graph)
    memo[id(gm.graph)] = torch.fx.Graph(tracer_cls=gm.graph._tracer_cls, tracer_extras=gm.graph._tracer_extras)
    new = copy.deepcopy(gm, memo)
    # The deep copy keeps submodules, parameters and buffers; other attributes the graph reads
    # (tensor constants set on the root by tracing or torch.export) came through its node loop.
    for node in graph.nodes:
        if node.op == "get_attr":
            try:
                fetch(new, node.target)
            except AttributeError:
                parent_path, _, leaf = node.target.rpartition(".")
                parent = new
                for part in parent_path.split(".") if parent_path else ():
                    if not hasattr(parent, part):
                        parent.add_module(part, nn.Module())
                    parent = getattr(parent, part)
                setattr(parent, leaf, copy.deepcopy(fetch(gm, node.target), memo))
    new._graph = graph
    graph.owning_module = new
    return new


def _install(gm: torch.fx.GraphModule, record: LayerRecord, nodes: list[torch.fx.Node], module: nn.Module) -> None:
    """Put `module` into `gm` and route the record's nodes through it."""
    if all(n.op == "call_module" for n in nodes):
        path = record.name
    else:
        path = record.name if _owner_is_replaceable(gm, record, nodes) else private_path(gm, record.name)
    _set_submodule(gm, path, module)
    gm.meta.setdefault(MODULES, {})[record.name] = path
    for node in nodes:
        with gm.graph.inserting_before(node):
            call = emit(gm.graph, input_of(node), module, lambda t: gm.graph.get_attr(f"{path}.{t}"), path)
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        attrs = [a for a in node.all_input_nodes if a.op == "get_attr"]
        gm.graph.erase_node(node)
        for a in attrs:
            if not a.users:
                gm.graph.erase_node(a)


def emit(graph: torch.fx.Graph, x: torch.fx.Node, module: nn.Module, attr: Callable[[str], torch.fx.Node],
         path: str | None = None, dispatcher: bool = False) -> torch.fx.Node:
    """The node computing `module(x)`: the rewrite's, the compile backend's and the timers' one way
    of calling a replacement.

    A single-op layer (low-rank, reduced precision, int8) becomes one call of its fxsketch op on its
    tensors, read through `attr(tensor name)`: its module stays at `path` as their owner, and the
    graph skips a module call per layer. With `dispatcher` the call names the op's overload (graphs
    handed to a compiler). Without it, a layer whose op uses what the module keeps between calls
    (`LowRankLinear`'s transposed factors) is called as a module, like the layers with their own
    forward logic (the sketch kinds): `call_module(path)`.
    """
    call = op_call(module)
    if call is None or (call.stateful and not dispatcher):
        if path is None:
            raise ValueError(f"{type(module).__name__} is called as a module: it needs a module path")
        return graph.call_module(path, (x,))
    tensors = [attr(name) if getattr(module, name) is not None else None for name in call.tensors]
    return graph.call_function(call.overload if dispatcher else call.op, (x, *tensors, *call.static))


def compute_attention_in(node: torch.fx.Node, record: LayerRecord, entry: Mapping[str, Any],
                         dispatcher: bool = False) -> bool:
    """Turn the attention call `node` into `fxsketch::half_attention` in the dtype `entry`
    names (bf16, fp16): the same arguments, nothing to build; as in `emit`, `dispatcher` names the
    op's overload (graphs handed to a compiler), else its Python entry, which skips the
    dispatcher in eager inference. "dense" (or a kind that does not apply, with a warning) leaves
    it as it is; returns whether it changed."""
    method = entry.get("method")
    if method == "dense" or check_entry(record, entry) is None:
        return False
    if method not in HALF_DTYPES:  # a registered kind that takes any layer
        log.warning("keeping %s as it is: %s does not apply to attention calls; they take bf16 or fp16",
                    record.name, method)
        return False
    node.target = torch.ops.fxsketch.half_attention.default if dispatcher else half_attention
    node.kwargs = {**{k: v for k, v in node.kwargs.items() if k != "enable_gqa"}, "dtype": HALF_DTYPES[method]}
    return True


def _owner_is_replaceable(gm: torch.fx.GraphModule, record: LayerRecord, nodes: list[torch.fx.Node]) -> bool:
    """True when the module at `record.name` holds only this layer's weight and bias, used only here."""
    if record.weight_target != f"{record.name}.weight":
        return False
    try:
        owner = gm.get_submodule(record.name)
    except AttributeError:
        return False
    own = {n for n, _ in owner.named_parameters(recurse=False)} | {n for n, _ in owner.named_buffers(recurse=False)}
    if own - {"weight", "bias"} or any(True for _ in owner.children()):
        return False
    mine = set(nodes)
    prefix = record.name + "."
    return all(set(n.users) <= mine for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).startswith(prefix))


def private_path(gm: nn.Module, name: str) -> str:
    base = "fxsketch_" + re.sub(r"\W", "_", name)
    path, i = base, 1
    while hasattr(gm, path):
        path, i = f"{base}_{i}", i + 1
    return path


def _set_submodule(gm: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    setattr(parent, leaf, module)


def _drop_unused_attributes(gm: torch.fx.GraphModule) -> None:
    """Delete parameters/buffers that no node reads any more (the replaced layers' dense weights)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if any(name == u or name.startswith(u + ".") for u in used):
            continue
        parent_path, _, leaf = name.rpartition(".")
        parent = gm.get_submodule(parent_path) if parent_path else gm
        if leaf in parent._parameters:
            del parent._parameters[leaf]
        elif leaf in parent._buffers:
            del parent._buffers[leaf]
    gm.delete_all_unused_submodules()


def check_same_output_shapes(before: nn.Module, after: nn.Module, inputs: tuple) -> None:
    """Raise if the rewrite changed the structure or shapes of the outputs (a rewrite bug)."""
    with torch.no_grad():
        a, b = before(*inputs), after(*inputs)
    (leaves_a, spec_a), (leaves_b, spec_b) = (torch.utils._pytree.tree_flatten(o) for o in (a, b))
    shapes_a = [tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in leaves_a]
    shapes_b = [tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in leaves_b]
    if spec_a != spec_b or shapes_a != shapes_b:
        raise RuntimeError(f"the rewritten module's outputs differ in shape from the original's: {shapes_b} vs {shapes_a}")
