"""Recovery by distillation: a short training of the replacement factors against the original model."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from fxsketch.capture import as_inputs
from fxsketch.nn import LowRankConv2d, LowRankLinear, SKConv2d, SKLinear

__all__ = ["distill", "factor_parameters"]

log = logging.getLogger(__name__)

_REPLACEMENTS = (LowRankLinear, LowRankConv2d, SKLinear, SKConv2d)


def factor_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of every fxsketch replacement inside `module`."""
    return [p for m in module.modules() if isinstance(m, _REPLACEMENTS) for p in m.parameters() if p.requires_grad]


def _tensors(out: Any) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(out)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Any],
    steps: int = 100,
    lr: float = 1e-3,
) -> float:
    """Train `student`'s replacement factors (in place) to reproduce `teacher`'s outputs on `data`.

    The loss is the mean squared error over every floating-point output, each normalized by the
    teacher output's mean square so that outputs of different scales weigh alike. `data` is cycled
    until `steps` optimizer steps are done. Other parameters of the student stay frozen.

    Returns:
        The loss of the last step.
    """
    params = factor_parameters(student)
    if not params:
        raise ValueError("the student has no fxsketch replacement to train: rewrite it first")
    batches = list(data)
    if not batches:
        raise ValueError("distill needs data: pass an iterable of input batches")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    optimizer = torch.optim.Adam(params, lr=lr)
    loss = torch.zeros(())
    for batch in itertools.islice(itertools.cycle(batches), steps):
        inputs = as_inputs(batch)
        with torch.no_grad():
            targets = _tensors(teacher(*inputs))
        outputs = _tensors(student(*inputs))
        loss = sum(((o - t).square().mean() / t.square().mean().clamp_min(1e-12)) for o, t in zip(outputs, targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    final = float(loss.detach())
    log.debug("distilled %d steps, final loss %.5f", steps, final)
    return final
