"""fxsketch as a `torch.compile` backend: rewrite Dynamo's graph with a plan, then hand it on.

    torch.compile(model, backend="fxsketch", options={"plan": "plan.json"})
    torch.compile(model, backend=fxsketch.backend(plan=result, inner="inductor"))

Dynamo lifts parameters to graph inputs and names them by their source
(`L['self']._modules['encoder']._modules['0']._parameters['weight']`); the backend maps those back
to the qualified names plans use (`encoder.0`), builds each planned replacement from the weight
values it is given at compile time, and passes the rewritten graph to the inner backend. The
factors are a snapshot: the backend is for inference; train the rewritten module instead.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from fxsketch.capture import (
    call_arguments, find_attention, functional_record, is_functional_layer, is_table_lookup, module_type_of, table_record,
)
from fxsketch.fitted import factors_of, install_factors
from fxsketch.fuse import fuse_int8_mlps
from fxsketch.nn import LowRankConv2d, LowRankLinear, op_call
from fxsketch.plan import build_entry, normalize_plan
from fxsketch.records import LayerRecord
from fxsketch.replacements import FactorCache
from fxsketch.rewrite import compute_attention_in, emit, private_path

__all__ = ["backend", "compile_backend", "qualified_name"]

log = logging.getLogger(__name__)

_TOKEN = re.compile(r"\['([^']*)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]")
_CONTAINERS = {"_modules", "_parameters", "_buffers"}


def qualified_name(source: str) -> str:
    """`L['self']._modules['encoder'].layer[0]` → `encoder.layer.0` (the root local is dropped)."""
    rest = source[source.index("]") + 1:] if source.startswith(("L[", "G[")) else source
    parts = [a or b or c for a, b, c in _TOKEN.findall(rest)]
    return ".".join(p for p in parts if p not in _CONTAINERS)


def backend(plan: Any = None, inner: str | Callable = "inductor") -> Callable:
    """A torch.compile backend that applies `plan` (a Result, a plan dict, or a plan JSON path).

    Args:
        plan: what to replace; None compiles the graph unchanged.
        inner: the backend that compiles the rewritten graph ("inductor", "eager", any registered
            name, or a backend callable).
    """
    _inner(inner)  # an unknown inner backend fails here, not later inside Dynamo
    fitted = factors_of(plan) if plan is not None else {}  # a Result's or a saved plan's fitted factors
    if hasattr(plan, "plan") and not isinstance(plan, Mapping):
        plan = plan.plan
    plan = normalize_plan(plan) if plan is not None else {}
    cache = FactorCache()  # shared by recompilations (new batch sizes) of the same model
    matched: set[str] = set()  # plan entries replaced in some graph fragment so far

    def fxsketch_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **_: Any):
        matched.update(rewrite_dynamo_graph(gm, example_inputs, plan, cache, fitted))
        log.info("graph fragment compiled; plan entries not replaced in any fragment so far: %s",
                 ", ".join(unmatched()) or "none")
        return _inner(inner)(gm, example_inputs)

    def unmatched() -> list[str]:
        """The plan entries no compiled graph fragment held (yet)."""
        return sorted(set(plan) - matched)

    fxsketch_backend.unmatched = unmatched
    if plan:  # a model split by graph breaks compiles fragment by fragment, lazily: judge at the end
        atexit.register(warn_unmatched, unmatched)
    return fxsketch_backend


def warn_unmatched(unmatched: Callable[[], list[str]]) -> None:
    """Warn about the plan entries no graph fragment held (run at exit: fragments compile lazily)."""
    missing = unmatched()
    if missing:
        log.warning("plan entries that no compiled graph fragment held (left out): %s", ", ".join(missing))


def compile_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: Mapping | None = None):
    """The `backend="fxsketch"` entry point; `options` may hold `plan` and `inner`."""
    options = dict(options or {})
    plan, inner = options.pop("plan", None), options.pop("inner", "inductor")
    if options:
        raise ValueError(f"unknown fxsketch backend options {sorted(options)}: it takes 'plan' and 'inner'")
    # one backend per plan: the graph fragments of one model share its factor cache and its count
    # of the entries matched
    # a plan dict or path is keyed by its text; a Result by identity, held by the entry so that the
    # id stays its own (the fitted factors differ between Results whose plans read alike)
    text = (json.dumps(plan, sort_keys=True, default=str) if plan is None or isinstance(plan, (Mapping, str, os.PathLike))
            else id(plan))
    key = (text, inner if isinstance(inner, str) else id(inner))
    if key not in _OPTION_BACKENDS:
        # Dynamo calls this inside its tracing context, where torch.load makes meta tensors: the
        # plan's fitted factors are read outside it
        with unset_fake_temporarily(), torch._guards.tracing(None):
            _OPTION_BACKENDS[key] = (backend(plan, inner), plan)
        while len(_OPTION_BACKENDS) > OPTION_BACKENDS_KEPT:  # each holds its plan's factors: keep the newest
            _OPTION_BACKENDS.pop(next(iter(_OPTION_BACKENDS)))
    return _OPTION_BACKENDS[key][0](gm, example_inputs)


OPTION_BACKENDS_KEPT = 8
_OPTION_BACKENDS: dict[tuple[str | int, Any], tuple[Callable, Any]] = {}


def _inner(inner: str | Callable) -> Callable:
    if callable(inner):
        return inner
    if inner == "eager":
        return lambda gm, _: gm.forward
    from torch._dynamo.backends.registry import lookup_backend

    try:
        return lookup_backend(inner)
    except Exception as exc:
        raise ValueError(f"unknown inner backend {inner!r}: use 'inductor', 'eager', another registered "
                         f"torch.compile backend ({', '.join(torch._dynamo.list_backends())}), or a callable") from exc


def rewrite_dynamo_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], plan: Mapping[str, Mapping],
                         cache: FactorCache, fitted: Mapping[str, Mapping[str, torch.Tensor]] | None = None
                         ) -> list[str]:
    """Replace every planned linear/conv2d node and embedding lookup of a Dynamo graph in place (a layer in `fitted`
    with its stored tensors), and compute planned attention calls in 16 bits; returns the names done."""
    values = _placeholder_values(gm, example_inputs)
    found: dict[str, list[tuple[LayerRecord, torch.Tensor, torch.Tensor | None]]] = {}
    for position, node in enumerate(gm.graph.nodes):
        if is_functional_layer(node) or is_table_lookup(node):
            layer = _layer(gm, node, values, position)
            if layer is not None:
                found.setdefault(layer[0].name, []).append(layer)
    log.debug("graph fragment layers: %s", ", ".join(found) or "none")
    done = []
    for name, layers in found.items():
        if name in plan and _replace(gm, name, layers, plan[name], cache, (fitted or {}).get(name)):
            done.append(name)
    for record in find_attention(gm, qualified_name):
        if record.name in plan and compute_attention_in(record.nodes[0], record, plan[record.name], dispatcher=True):
            done.append(record.name)
    fuse_int8_mlps(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return done


def _placeholder_values(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> dict[torch.fx.Node, Any]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return dict(zip(placeholders, example_inputs))


def _source_name(node: torch.fx.Node) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    return source.name if source is not None and hasattr(source, "name") else None


def _layer(gm, node, values, position):
    """(record, weight, bias) for a linear/conv2d node or an embedding lookup whose weight is a
    parameter, else None."""
    args = call_arguments(node)
    weight_node, bias_node = args.get("weight"), args.get("bias")
    weight, bias = _tensor(gm, weight_node, values), _tensor(gm, bias_node, values) if bias_node is not None else None
    if not isinstance(weight, torch.nn.Parameter):
        return None  # a computed or input tensor, not a layer's weight
    if weight_node.op == "placeholder" and _source_name(weight_node):
        path = qualified_name(_source_name(weight_node))
    else:
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        path = qualified_name(stack[-1][0]) + ".weight" if stack else str(weight_node.target)
    name = path[: -len(".weight")] if path.endswith(".weight") else path
    if is_table_lookup(node):
        record = table_record(node, name, module_type_of(node, name), weight, position, str(weight_node.name),
                              args.get("max_norm"))
    else:
        record = functional_record(node, name, module_type_of(node, name), tuple(weight.shape), 0, position,
                                   str(weight_node.name), str(bias_node.name) if bias_node is not None else None)
    return record, weight, bias


def _tensor(gm, node, values):
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "placeholder":
        return values.get(node)
    if node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj
    return None


def _replace(gm, name, layers, entry, cache, stored=None) -> bool:
    """Build `entry` for layer `name` from the weights Dynamo handed over (or from its `stored`
    fitted tensors) and route its nodes through it; False when it stays dense. The factors are
    registered as constants of `gm`."""
    record, weight, bias = layers[0]
    with torch.no_grad():
        module = build_entry(gm, record, entry, cache, copy_weights=stored is None, weight=weight.detach(),
                             bias=None if bias is None else bias.detach())
        if module is None:
            return False
        if stored is not None:
            install_factors(module, stored, name)
        module = _as_single_op(module, record)
    base = private_path(gm, name)
    for key in op_call(module).tensors:
        value = getattr(module, key)
        if value is not None:
            _register_constant(gm, f"{base}_{key}", value.detach())
    for record, _, _ in layers:
        for node in record.nodes:
            with gm.graph.inserting_before(node):
                call = emit(gm.graph, call_arguments(node)["input"], module,
                            lambda t: gm.graph.get_attr(f"{base}_{t}"), dispatcher=True)
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
    return True


def _as_single_op(module: torch.nn.Module, record: LayerRecord) -> torch.nn.Module:
    """A plain low-rank layer computing what `module` computes (a sketch collapses to its factors),
    so that the compiled graph holds one fxsketch op per layer."""
    if op_call(module) is not None:
        return module
    B, A = module.collapsed_factors()
    if record.op_type == "Linear":
        return LowRankLinear.from_factors(B, A, module.bias)
    g = record.conv
    return LowRankConv2d.from_factors(B.reshape(B.shape[0], *record.weight_shape[1:]), A, module.bias,
                                      tuple(g["stride"]), tuple(g["padding"]), tuple(g["dilation"]))


def _register_constant(gm: torch.fx.GraphModule, name: str, value: torch.Tensor) -> None:
    """A buffer of the graph module, announced to AOTAutograd like the ones Dynamo lifted itself."""
    gm.register_buffer(name, value)
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is not None:
        from torch._dynamo.source import ConstantSource

        sources[name] = ConstantSource(name)
