"""Recovery by distillation: a short training of the replacement factors against the original model."""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from fxsketch.capture import as_inputs
from fxsketch.nn import Int8LowRankLinear, LowRankConv2d, LowRankLinear, SKConv2d, SKLinear
from fxsketch.rewrite import rewrite

__all__ = ["distill", "factor_parameters", "float_factors", "masked_mse", "quantize_trained", "relative_mse",
           "rewrite_sequential", "with_taps"]

log = logging.getLogger(__name__)

_REPLACEMENTS = (LowRankLinear, LowRankConv2d, SKLinear, SKConv2d)


def factor_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of every fxsketch replacement inside `module`."""
    return [p for m in module.modules() if isinstance(m, _REPLACEMENTS) for p in m.parameters() if p.requires_grad]


def float_factors(plan: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`plan` with its int8 low-rank factors in float: the twin that distillation trains (int8
    factors do not train), before `quantize_trained` carries the result back."""
    return {name: ({k: v for k, v in entry.items() if k not in ("precision", "smooth")}
                   if entry.get("precision") == "int8" else entry)
            for name, entry in plan.items()}


def quantize_trained(student: nn.Module, twin: nn.Module) -> None:
    """Give every replacement of `student` the values of `twin`'s layer of the same name, the
    float factors quantized where `student` holds them in int8 (`float_factors` made `twin`)."""
    trained = dict(twin.named_modules())
    with torch.no_grad():
        for name, layer in student.named_modules():
            if isinstance(layer, Int8LowRankLinear):
                layer.quantize_from(trained[name])
            elif isinstance(layer, _REPLACEMENTS):
                layer.load_state_dict(trained[name].state_dict())


def float_tensors(out: Any) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(out)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def relative_mse(outputs: Any, targets: Any, inputs: tuple = ()) -> torch.Tensor:
    """The default distillation loss: the mean squared error of every floating-point output, each
    normalized by the teacher output's mean square (outputs of different scales weigh alike)."""
    return sum((o - t).square().mean() / t.square().mean().clamp_min(1e-12)
               for o, t in zip(float_tensors(outputs), float_tensors(targets)))


def masked_mse(mask_index: int = 1) -> Callable[[Any, Any, tuple], torch.Tensor]:
    """A distillation loss for token models: `relative_mse` over the real tokens only.

    The batch's input at `mask_index` (default 1: `(input_ids, attention_mask)`) is the (N, L)
    mask; outputs whose leading dimensions are (N, L) count only the rows where it is nonzero,
    other outputs count whole.
    """
    def loss(outputs: Any, targets: Any, inputs: tuple) -> torch.Tensor:
        mask = inputs[mask_index] if len(inputs) > mask_index else None
        total = torch.zeros(())
        for o, t in zip(float_tensors(outputs), float_tensors(targets)):
            if isinstance(mask, torch.Tensor) and o.dim() >= 2 and tuple(o.shape[:2]) == tuple(mask.shape):
                keep = mask != 0
                o, t = o[keep], t[keep]
            total = total + (o - t).square().mean() / t.square().mean().clamp_min(1e-12)
        return total
    return loss


def _check_loss(loss: Any) -> None:
    what = "the distillation loss must be a scalar tensor that depends on the student's outputs"
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{what}; got {type(loss).__name__} (no floating-point outputs to compare?)")
    if loss.dim() != 0 or not loss.requires_grad:
        raise TypeError(f"{what}; got shape {tuple(loss.shape)}, requires_grad={loss.requires_grad}")


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Any],
    steps: int = 100,
    lr: float = 1e-3,
    *,
    loss_fn: Callable[[Any, Any, tuple], torch.Tensor] | None = None,
    schedule: str = "constant",
) -> float:
    """Train `student`'s replacement factors (in place) to reproduce `teacher`'s outputs on `data`.

    The loss is `loss_fn(student_outputs, teacher_outputs, inputs)`; by default (`relative_mse`)
    the mean squared error over every floating-point output, each normalized by the teacher
    output's mean square so that outputs of different scales weigh alike. For padded token batches
    pass `loss_fn=masked_mse()` (padding positions then cost nothing). `data` is cycled until
    `steps` optimizer steps are done. Other parameters of the student stay frozen.

    `schedule="cosine"` anneals the learning rate from `lr` to 0 over the steps (a larger `lr`
    then moves the factors further early on without the last steps' noise); "constant" keeps it.
    To match intermediate values too, distill `with_taps` views of both models.

    Returns:
        The loss of the last step (NaN for a model on the `meta` device).
    """
    params = factor_parameters(student)
    if not params:
        raise ValueError("the student has no fxsketch replacement to train: rewrite it first")
    batches = list(data)
    if not batches:
        raise ValueError("distill needs data: pass an iterable of input batches")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if schedule == "cosine" else None
    loss = torch.zeros(())
    for batch in itertools.islice(itertools.cycle(batches), steps):
        inputs = as_inputs(batch)
        with torch.no_grad():
            targets = teacher(*inputs)
        loss = (loss_fn or relative_mse)(student(*inputs), targets, inputs)
        _check_loss(loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    final = float("nan") if loss.is_meta else float(loss.detach())  # a meta tensor holds no value
    log.debug("distilled %d steps, final loss %.5f", steps, final)
    return final


def rewrite_sequential(
    model: nn.Module,
    plan: Any,
    calibration_data: Iterable[Any],
    example_inputs: Any = None,
    *,
    mask: Any = "auto",
) -> torch.fx.GraphModule:
    """`fxsketch.rewrite` with error-compensating calibration: a closed-form recovery, no training.

    Every planned layer, in graph order, is fitted to the *original* layer's outputs from the
    inputs it receives once the layers before it are replaced (`fxsketch.sequential.sequential_stats`):
    min E‖W x − Ŵ x̃‖² over the kind's factors, with the bias set to match the mean output. Each
    replacement thus undoes part of the error made upstream of it. Costs about two forward passes
    of the calibration data, held in memory at once.

    Args:
        model: the model (or an already captured GraphModule); never changed.
        plan: `{qualified_name: {"method": ..., **params}}` or a plan JSON path.
        calibration_data: input batches (all held in memory at once).
        example_inputs: inputs for capture and the output-shape check (default: the first batch).
        mask: which token rows count ("auto": the `attention_mask` input, if any; see `calibrate`).
    """
    batches = list(calibration_data)
    if not batches:
        raise ValueError("calibration_data is empty: pass an iterable of input batches")
    inputs = example_inputs if example_inputs is not None else batches[0]
    return rewrite(model, plan, inputs, calibration_data=batches, sequential=True, mask=mask)


def with_taps(gm: torch.fx.GraphModule, names: Any) -> torch.fx.GraphModule:
    """A view of `gm` that returns `(its output, (value of node names[0], ...))`.

    For distilling intermediate values (`distill(with_taps(student, names), with_taps(teacher,
    names), ...)`, e.g. every transformer block's output): a rewritten model keeps the node names of
    the graph it was rewritten from, so the same names address the same values in both. The view
    shares `gm`'s parameters and submodules (training it trains `gm`); `gm` itself is unchanged.
    Its forward takes the graph's placeholders positionally, flat.
    """
    names = [names] if isinstance(names, str) else list(names)
    graph = copy.deepcopy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    missing = [n for n in names if n not in nodes]
    if missing:
        raise KeyError(f"no node named {missing} in the graph")
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((output.args[0], tuple(nodes[n] for n in names)),)
    graph._codegen = torch.fx.graph.CodeGen()  # plain tuple output (not the captured pytree spec)
    view = torch.fx.GraphModule(gm, graph)
    for name, child in gm.named_children():  # the real submodules, not containers of their used attributes
        setattr(view, name, child)
    return view
