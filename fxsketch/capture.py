"""Capture: a model becomes a `torch.fx.GraphModule`, and its matchable layers become records."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import sys
import sysconfig
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.fx.experimental.symbolic_shapes
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fxsketch.display import quiet_logger
from fxsketch.records import LayerRecord, fetch

__all__ = ["CaptureError", "capture", "find_layers", "find_tables", "find_attention", "table_record", "is_table_lookup", "other_modules",
           "as_inputs", "describe_inputs", "user_frame"]

log = logging.getLogger(__name__)
_LIBRARY_FOLDERS = (str(Path(__file__).parent),
                    *{sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})

_LINEAR_FNS = {F.linear, torch._C._nn.linear, torch.ops.aten.linear.default}
# x·W + b with W stored (in, out): transformers' Conv1D (GPT-2) and hand-written addmm layers
_ADDMM_FNS = {torch.addmm, torch.ops.aten.addmm.default}
_CONV_FNS = {
    F.conv2d,
    torch.conv2d,
    torch.ops.aten.conv2d.default,
    torch.ops.aten.conv2d.padding,
}
_EMBEDDING_FNS = {F.embedding, torch.embedding, torch.ops.aten.embedding.default}
_ATTENTION_FNS = {F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default}
_FUNCTIONAL_ORDER = 1 << 30


class CaptureError(RuntimeError):
    """Neither tracer could turn the model into a graph."""


def as_inputs(example_inputs: Any) -> tuple:
    """Normalize example inputs to a tuple of positional arguments."""
    if example_inputs is None:
        raise ValueError("example_inputs is required: a tensor or a tuple of the model's positional inputs")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs
    return (example_inputs,)


def capture(model: nn.Module, example_inputs: Any = None) -> torch.fx.GraphModule:
    """Trace `model` into a GraphModule that owns a copy of its weights.

    `torch.fx.symbolic_trace` comes first (it keeps modules as `call_module` nodes); models it
    cannot trace (shape-dependent control flow, HF transformers) fall back to non-strict
    `torch.export`, whose ATen nodes keep their module path in `nn_module_stack`. The user's model
    is deep-copied first, so nothing done to the graph module (shape propagation through a
    BatchNorm in training mode, a rewrite, training) ever reaches it.

    Raises:
        CaptureError: both tracers failed; the message says what each one hit and what to try.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (or a torch.fx.GraphModule), got {type(model).__name__}")
    inputs = as_inputs(example_inputs) if example_inputs is not None else None
    _check_capturable(model, inputs)
    if isinstance(model, torch.fx.GraphModule):
        gm = copy.deepcopy(model)
        gm.meta.setdefault("fxsketch_tracer", "given")
        _propagate_shapes(gm, inputs)
        return gm
    modules = list(model.named_modules())
    owned = copy.deepcopy(model)
    errors, failures = [], []
    tracers = (_symbolic_trace, _export) if inputs is not None else (_symbolic_trace,)
    for tracer in tracers:
        try:
            gm = tracer(owned, inputs)
            _propagate_shapes(gm, inputs)
        except Exception as exc:  # every tracer failure is reported together below
            cause = _unwrap_shape_prop(exc)
            failures.append(cause)
            errors.append(f"{tracer.__doc__} failed with {type(cause).__name__}: {_first_line(cause)}")
            log.debug("capture with %s failed", tracer.__name__, exc_info=True)
            continue
        gm.meta["fxsketch_module_order"] = {name: i for i, (name, _) in enumerate(modules)}
        gm.meta["fxsketch_module_types"] = {name: type(m).__name__ for name, m in modules if name}
        gm.meta["fxsketch_tracer"] = tracer.__name__.lstrip("_")
        return gm
    described = f" on example_inputs {describe_inputs(inputs)}" if inputs is not None else ""
    branch = next((frame for frame in map(_data_dependent_branch, failures) if frame is not None), None)
    if branch is not None:
        raise CaptureError(
            f"could not capture {type(model).__name__} as one graph: its forward branches on a tensor's value at "
            f"{branch.filename}:{branch.lineno} (`{branch.line}`), which no whole-graph capture can follow. "
            "The torch.compile backend can: it splits the graph there and rewrites each part "
            "(torch.compile(model, backend=\"fxsketch\", options={\"plan\": plan}))."
        )
    raise CaptureError(
        f"could not capture {type(model).__name__} as a graph{described}:\n  - " + "\n  - ".join(errors)
        + ("" if inputs is not None else "\nPass example_inputs so that torch.export can try too.") +
        "\nCheck that example_inputs are what forward() takes (a tuple of positional tensors) and "
        "run on them; or export the model yourself (torch.export.export(model, args, strict=False)"
        ".module()) and pass the resulting GraphModule."
    )


def user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of `exc`'s traceback (or its causes') in the user's own code: a file
    neither fxsketch's, nor the standard library's, nor an installed package's."""
    while exc is not None:
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if not f.filename.startswith(_LIBRARY_FOLDERS) and not f.filename.startswith("<")]
        if frames:
            return frames[-1]
        exc = exc.__cause__ or exc.__context__
    return None


def _data_dependent_branch(exc: BaseException) -> traceback.FrameSummary | None:
    """The user's line where torch.export met Python control flow on a tensor's value, if that is
    what `exc` is (symbolic tracing stops at any branch on a tensor, shapes included, which export
    follows: only export's data-dependent guard says that the value decides)."""
    data_dependent = isinstance(exc, torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode)
    return user_frame(exc) if data_dependent else None


def describe_inputs(inputs: tuple) -> str:
    """`(Tensor[4, 9] float32 cpu, 3)`: what the example inputs are, for error messages."""
    parts = [f"Tensor{list(x.shape)} {str(x.dtype).removeprefix('torch.')} {x.device}"
             if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
    return "(" + ", ".join(parts) + ")"


def _check_capturable(model: nn.Module, inputs: tuple | None) -> None:
    """Refuse, before tracing, what no tracer can handle: lazy parameters nothing can initialize,
    and example inputs on the meta device for a model with real weights."""
    lazy = [n for n, p in model.named_parameters() if torch.nn.parameter.is_lazy(p)]
    if lazy and inputs is None:
        raise ValueError(
            f"{type(model).__name__} has uninitialized lazy parameters ({', '.join(lazy[:5])}): pass "
            "example_inputs so that capture can run the model once and give them their shapes, or run "
            "the model once yourself before handing it to fxsketch")
    devices = {p.device.type for p in model.parameters() if not torch.nn.parameter.is_lazy(p)}
    meta = [i for i, x in enumerate(inputs or ()) if isinstance(x, torch.Tensor) and x.is_meta]
    if meta and devices and "meta" not in devices:
        raise ValueError(
            f"example_inputs {describe_inputs(inputs)} hold a tensor on the 'meta' device (position "
            f"{meta[0]}), but the model's parameters are on {', '.join(sorted(devices))}: fxsketch runs the "
            "model on its example inputs, so give real tensors on the model's device")


def _symbolic_trace(model: nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    """torch.fx.symbolic_trace"""
    return torch.fx.symbolic_trace(model)


def _export(model: nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    """torch.export.export(strict=False)"""
    # on a data-dependent branch torch logs, then prints, the partial graph (KBs): capture reports
    # the failure itself, so only a successful export's output reaches standard error
    printed = io.StringIO()
    with quiet_logger(_EXPORT_LOGGER, logging.ERROR), contextlib.redirect_stderr(printed):
        gm = _export_quietly(model, inputs)
    sys.stderr.write(printed.getvalue())
    return gm


_EXPORT_LOGGER = "torch.fx.experimental.symbolic_shapes"


def _export_quietly(model: nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    _register_library_types()
    auto = torch.export.Dim.AUTO
    dynamic = tuple({i: auto for i in range(x.dim())} if isinstance(x, torch.Tensor) else None for x in inputs)
    if _batch_of_one(inputs):
        # export fixes a dimension of size 1 for good: trace at batch 2 (the same rows twice) so
        # the graph serves every batch size, unless the model cannot take a batch of 2
        try:
            doubled = tuple(_repeat_batch(x) for x in inputs)
            return torch.export.export(model, doubled, dynamic_shapes=dynamic, strict=False).module()
        except Exception as exc:  # the model needs batch 1 (or that input is not a batch): keep it
            log.debug("export at batch 2 failed (%s): exporting at batch 1", _first_line(exc))
    gm = torch.export.export(model, inputs, dynamic_shapes=dynamic, strict=False).module()
    if _batch_of_one(inputs):
        log.warning("the model was captured with torch.export at batch size 1 and cannot be traced at batch 2: the "
                    "rewritten module only runs at batch 1 (give example_inputs with a batch of 2 or more to "
                    "serve other batch sizes)")
    return gm


def _batch_of_one(inputs: tuple) -> bool:
    return any(isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 1 for x in inputs)


def _repeat_batch(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 1:
        return x.repeat(2, *([1] * (x.dim() - 1)))
    return x


def _register_library_types() -> None:
    """Let export see through transformers' KV caches (returned by default by decoder models)."""
    if "transformers" not in sys.modules:
        return
    try:
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except ImportError:
        return
    try:
        register_dynamic_cache_export_support()
    except Exception:  # already registered, or a version without the cache types: nothing to do
        log.debug("transformers cache types not registered for export", exc_info=True)


def _propagate_shapes(gm: torch.fx.GraphModule, inputs: tuple | None) -> None:
    if inputs is None:
        return
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)


def _unwrap_shape_prop(exc: BaseException) -> BaseException:
    """ShapeProp's wrapper only names the failing node; its cause says what went wrong."""
    if str(exc).startswith("ShapeProp error") and exc.__cause__ is not None:
        return exc.__cause__
    return exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or repr(exc)
    return text.splitlines()[0][:300]


def find_layers(gm: torch.fx.GraphModule) -> list[LayerRecord]:
    """Describe every matchable Linear/Conv2d node of `gm`, one record per weight, in graph order."""
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"find_layers takes a captured GraphModule (fxsketch.capture(model, example_inputs)), "
                        f"got {type(gm).__name__}")
    order = gm.meta.get("fxsketch_module_order") or {n: i for i, (n, _) in enumerate(gm.named_modules())}
    records: dict[str, LayerRecord] = {}
    for position, node in enumerate(gm.graph.nodes):
        rec = _record_for(gm, node, order, position)
        if rec is None:
            continue
        if rec.name in records:  # one weight used by several nodes: one layer, rewritten together
            records[rec.name].nodes.append(node)
            records[rec.name].tokens += rec.tokens
        else:
            weight = fetch(gm, rec.weight_target)
            rec.device, rec.dtype = weight.device.type, weight.dtype
            records[rec.name] = rec
    return list(records.values())


def find_tables(gm: torch.fx.GraphModule) -> list[LayerRecord]:
    """Describe every embedding table of `gm` (`nn.Embedding` modules and embedding lookups on a
    parameter), one record per table, in graph order: `op_type` "Embedding", `weight_shape` (rows,
    dim), `tokens` the rows looked up per call. A table whose weight is also read elsewhere (tied to
    an output layer) or that renormalizes its rows (`max_norm`) is recorded as `unsupported`."""
    records: dict[str, LayerRecord] = {}
    for position, node in enumerate(gm.graph.nodes):
        found = _table_for(gm, node)
        if found is None:
            continue
        name, target, module_type, max_norm = found
        weight = fetch(gm, target)
        if name in records:
            records[name].nodes.append(node)
            records[name].tokens += _tokens(node, weight.shape[1])
            continue
        records[name] = table_record(node, name, module_type, weight, position, target, max_norm)
    for record in records.values():
        tied = _other_readers(gm, record)
        if tied and not record.unsupported:
            record.unsupported = f"its weight is also read by {tied} (tied weights stay as they are)"
    return list(records.values())


def find_attention(gm: torch.fx.GraphModule, owner_name: Callable[[str], str] = str) -> list[LayerRecord]:
    """Describe every `scaled_dot_product_attention` call of `gm`, one record each, in graph order:
    `op_type` "Attention", named after the module making the call (its module-stack path through
    `owner_name`) plus ".sdpa" (the node's name when no module is known), `weight_shape` (query
    positions, head size), `tokens` the query rows per call, device and dtype the query's. Calls
    with dropout or grouped-query heads are recorded as `unsupported`."""
    records: list[LayerRecord] = []
    taken: set[str] = set()
    for position, node in enumerate(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _ATTENTION_FNS:
            continue
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        owner = owner_name(stack[-1][0]) if stack else ""
        base = f"{owner}.sdpa" if owner else node.name
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        query = node.args[0].meta if isinstance(node.args[0], torch.fx.Node) else {}
        meta, val = query.get("tensor_meta"), query.get("val", query.get("example_value"))  # captured, Dynamo's
        shape = (tuple(int(d) for d in meta.shape) if hasattr(meta, "shape") else
                 tuple(val.shape) if isinstance(val, torch.Tensor) and all(isinstance(d, int) for d in val.shape) else ())
        dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        unsupported = ("it applies dropout" if dropout not in (0, 0.0) else
                       "its heads are grouped (enable_gqa)" if node.kwargs.get("enable_gqa") else
                       "its query's shape is unknown (no shape metadata)" if len(shape) < 2 else "")
        records.append(LayerRecord(
            name=name, op_type="Attention", module_type=module_type_of(node, stack[-1][0]) if stack else "function",
            weight_shape=shape[-2:] if len(shape) >= 2 else (0, 0), graph_order=position,
            tokens=math.prod(shape[:-1]) if shape else 1, nodes=[node], unsupported=unsupported,
            device=val.device.type if isinstance(val, torch.Tensor) else "cpu",
            dtype=val.dtype if isinstance(val, torch.Tensor) else torch.float32))
    return records


def table_record(node: torch.fx.Node, name: str, module_type: str, weight: torch.Tensor, position: int,
                 weight_target: str, max_norm: Any = None) -> LayerRecord:
    """The record of an embedding table of weight `weight` (rows × dim) looked up at `node`."""
    rows, dim = weight.shape
    return LayerRecord(name=name, op_type="Embedding", module_type=module_type, weight_shape=(rows, dim),
                       graph_order=position, tokens=_tokens(node, dim), nodes=[node], weight_target=weight_target,
                       device=weight.device.type, dtype=weight.dtype,
                       unsupported="" if max_norm is None else
                       f"max_norm={max_norm} renormalizes the table's rows as they are looked up")


def is_table_lookup(node: torch.fx.Node) -> bool:
    """Whether `node` is a functional or ATen embedding lookup."""
    return node.op == "call_function" and node.target in _EMBEDDING_FNS


def _table_for(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str, str, str, Any] | None:
    """(name, weight path, module type, max_norm) of an embedding lookup node; None for other nodes."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod) is nn.Embedding:
            return node.target, f"{node.target}.weight", "Embedding", mod.max_norm
        return None
    if not is_table_lookup(node):
        return None
    args = call_arguments(node)
    weight = args.get("weight")
    if not _is_attr(weight) or fetch(gm, weight.target).dim() != 2:
        return None
    name = weight.target[: -len(".weight")] if weight.target.endswith(".weight") else weight.target
    return name, weight.target, module_type_of(node, name), args.get("max_norm")


def _other_readers(gm: torch.fx.GraphModule, record: LayerRecord) -> str:
    """A node other than the table's lookups that reads its weight (by any path), or ""."""
    weight = fetch(gm, record.weight_target)
    paths = {n for n, p in gm.named_parameters(remove_duplicate=False) if p is weight}
    paths |= {n for n, b in gm.named_buffers(remove_duplicate=False) if b is weight}
    owners = {p.rpartition(".")[0] for p in paths}
    mine = set(record.nodes)
    for node in gm.graph.nodes:
        if node in mine:
            continue
        if node.op == "get_attr" and node.target in paths and set(node.users) - mine:
            return str(next(iter(set(node.users) - mine)))
        if node.op == "call_module" and node.target in owners:
            return str(node.target)
    return ""


def _record_for(gm, node: torch.fx.Node, order: dict[str, int], position: int) -> LayerRecord | None:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.Linear):
            return _linear_record(node, node.target, type(mod).__name__, tuple(mod.weight.shape),
                                  order.get(node.target, _FUNCTIONAL_ORDER), position,
                                  f"{node.target}.weight", f"{node.target}.bias" if mod.bias is not None else None)
        if isinstance(mod, nn.Conv2d):
            geometry = dict(stride=mod.stride, padding=mod.padding, dilation=mod.dilation, groups=mod.groups,
                            padding_mode=mod.padding_mode)
            return _conv_record(node, node.target, type(mod).__name__, tuple(mod.weight.shape),
                                order.get(node.target, _FUNCTIONAL_ORDER), position, geometry,
                                f"{node.target}.weight", f"{node.target}.bias" if mod.bias is not None else None)
        return None
    if not is_functional_layer(node):
        return None
    args = call_arguments(node)
    weight, bias = args.get("weight"), args.get("bias")
    if not _is_attr(weight) or (bias is not None and not _is_attr(bias)):
        return None  # computed weights are not layers we can factor
    name = weight.target[: -len(".weight")] if weight.target.endswith(".weight") else weight.target
    shape = tuple(fetch(gm, weight.target).shape)
    if len(shape) != (2 if node.target in _LINEAR_FNS | _ADDMM_FNS else 4):
        return None
    return functional_record(node, name, module_type_of(node, name), shape, order.get(name, _FUNCTIONAL_ORDER),
                             position, weight.target, bias.target if bias is not None else None)


def is_functional_layer(node: torch.fx.Node) -> bool:
    """Whether `node` is a functional or ATen linear/conv2d call (or a plain x·W + b addmm)."""
    if node.op != "call_function":
        return False
    if node.target in _ADDMM_FNS:
        return node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1
    return node.target in _LINEAR_FNS | _CONV_FNS


def input_of(node: torch.fx.Node) -> Any:
    """The node feeding a layer's input (its activations)."""
    if node.op == "call_module":
        return node.args[0] if node.args else next(iter(node.kwargs.values()))
    return call_arguments(node)["input"]


def call_arguments(node: torch.fx.Node) -> dict[str, Any]:
    """The arguments of a functional linear/conv2d node by name (`input`, `weight`, `bias`, ...); of
    an embedding lookup, `input` is the indices."""
    if node.target in _EMBEDDING_FNS:
        names = (("weight", "input", "padding_idx") if node.target is not F.embedding
                 else ("input", "weight", "padding_idx", "max_norm"))
        args = dict(zip(names, node.args))
        args.update({("input" if k == "indices" else k): v for k, v in node.kwargs.items()})
        return args
    if node.target in _ADDMM_FNS:
        names = ("bias", "input", "weight")
        args = dict(zip(names, node.args))
        args.update({k2: node.kwargs[k1] for k1, k2 in (("input", "bias"), ("mat1", "input"), ("mat2", "weight"))
                     if k1 in node.kwargs})
        return args
    names = ("input", "weight", "bias") if node.target in _LINEAR_FNS else (
        "input", "weight", "bias", "stride", "padding", "dilation", "groups")
    args = dict(zip(names, node.args))
    args.update({k: v for k, v in node.kwargs.items() if k in names})
    return args


def functional_record(node, name, module_type, shape, module_order, position, weight_target, bias_target) -> LayerRecord:
    """The record of a functional linear/conv2d node whose weight has shape `shape` (as stored)."""
    if node.target in _ADDMM_FNS:  # the weight is stored (in, out): the record says (out, in)
        record = _linear_record(node, name, module_type, shape[::-1], module_order, position, weight_target, bias_target)
        record.transposed = True
        return record
    if node.target in _LINEAR_FNS:
        return _linear_record(node, name, module_type, shape, module_order, position, weight_target, bias_target)
    args = call_arguments(node)
    geometry = dict(stride=_pair(args.get("stride", 1)), padding=args.get("padding", 0),
                    dilation=_pair(args.get("dilation", 1)), groups=int(args.get("groups", 1)), padding_mode="zeros")
    if not isinstance(geometry["padding"], str):
        geometry["padding"] = _pair(geometry["padding"])
    return _conv_record(node, name, module_type, shape, module_order, position, geometry, weight_target, bias_target)


def _linear_record(node, name, module_type, shape, module_order, position, wt, bt) -> LayerRecord:
    return LayerRecord(name=name, op_type="Linear", module_type=module_type, weight_shape=shape,
                       module_order=module_order, graph_order=position, tokens=_tokens(node, shape[0]),
                       nodes=[node], weight_target=wt, bias_target=bt)


def _conv_record(node, name, module_type, shape, module_order, position, geometry, wt, bt) -> LayerRecord:
    geometry = dict(geometry)
    padding = _numeric_padding(geometry["padding"], shape[2:], geometry["stride"], geometry["dilation"])
    reason = ""
    if geometry["groups"] != 1:
        reason = f"groups={geometry['groups']} (only groups=1 convolutions are factored)"
    elif geometry["padding_mode"] != "zeros":
        reason = f"padding_mode={geometry['padding_mode']!r} (only zero padding is supported)"
    elif padding is None:
        reason = f"padding={geometry['padding']!r} cannot be expressed as symmetric zero padding"
    geometry["padding"] = padding if padding is not None else geometry["padding"]
    return LayerRecord(name=name, op_type="Conv2d", module_type=module_type, weight_shape=shape,
                       module_order=module_order, graph_order=position, tokens=_tokens(node, shape[0]),
                       conv=geometry, unsupported=reason, nodes=[node], weight_target=wt, bias_target=bt)


def _numeric_padding(padding, kernel: Sequence[int], stride, dilation) -> tuple[int, int] | None:
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        if any(t % 2 for t in total):
            return None
        return (total[0] // 2, total[1] // 2)
    return _pair(padding)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    return v if len(v) == 2 else (v[0], v[0])


def _is_attr(node: Any) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "get_attr"


def module_type_of(node: torch.fx.Node, name: str) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    for path, mod_type in reversed(list(stack.values())):
        if path == name:
            return (mod_type if isinstance(mod_type, str) else mod_type.__name__).rsplit(".", 1)[-1]
    return "function"


def _tokens(node: torch.fx.Node, out_features: int) -> int:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return 1
    numel = 1
    for d in meta.shape:
        numel *= int(d)
    return max(numel // max(out_features, 1), 1)


def other_modules(gm: torch.fx.GraphModule, records: Sequence[LayerRecord]) -> dict[str, str]:
    """Names and class names of the modules that are not matchable layers, for error messages."""
    taken = {r.name for r in records}
    types = gm.meta.get("fxsketch_module_types") or {
        name: type(m).__name__ for name, m in gm.named_modules() if name and type(m) is not nn.Module
    }
    return {name: t for name, t in types.items() if name not in taken and not name.startswith("_")}
