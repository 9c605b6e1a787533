"""ATen bodies of the fxsketch ops: the CPU path and the reference every other path is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lowrank_linear_aten(
    x: torch.Tensor, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`(x · Bᵀ) · Aᵀ + bias` as two GEMMs; the second one carries the bias (addmm)."""
    return F.linear(F.linear(x, B), A, bias)


def lowrank_conv2d_aten(
    x: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> torch.Tensor:
    """A k×k convolution to R channels (weight B: R×C×kh×kw), then a 1×1 one to N channels (A: N×R)."""
    t = F.conv2d(x, B, None, stride, padding, dilation)
    return F.conv2d(t, A[:, :, None, None], bias)
