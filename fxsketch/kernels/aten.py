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


def cast_linear_aten(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A Linear computed in its weight's dtype (bf16, fp16): x cast in, the result cast back to x's."""
    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def cast_lowrank_linear_aten(
    x: torch.Tensor, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`lowrank_linear_aten` computed in the factors' dtype, the result cast back to x's."""
    return lowrank_linear_aten(x.to(B.dtype), B, A, bias).to(x.dtype)
