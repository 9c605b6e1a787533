"""ATen bodies of the fxsketch ops: the CPU path and the reference every other path is tested against."""

from __future__ import annotations

import math

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


SPELLED_OUT_SCORES = 256 * 256  # per head: past this, materialising the scores costs more than it saves
# in all: below this the fused kernel's single call wins (MiniLM's 12 heads x 64 tokens: from about 6
# sequences up; a symbolic batch, as when torch.compile traces a dynamic one, counts as enough)
SPELLED_OUT_MIN = 1 << 18


def half_attention_aten(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """`scaled_dot_product_attention` computed in `dtype` (bf16, fp16) and returned in the query's.

    On CUDA, for long sequences (more than `SPELLED_OUT_SCORES` scores per head, or lengths
    unknown until run time) and for small batches (fewer than `SPELLED_OUT_MIN` scores in all),
    the fused kernel takes the 16-bit inputs. Otherwise it is spelled out as two batched GEMMs
    around a softmax: on a CPU with native bf16 that beat the fused CPU kernel, in float32 or bf16,
    at MiniLM's sizes (32 x 64 tokens, 12 heads of 32; `benchmarks/bench_peers.py`'s hand rows show
    what it adds to the model). A query row that may attend to no key gives zeros, as the fused
    kernels do."""
    rows, cols, calls = query.shape[-2], key.shape[-2], math.prod(query.shape[:-2])
    spelled_out = (isinstance(rows, int) and isinstance(cols, int) and rows * cols <= SPELLED_OUT_SCORES
                   and (not isinstance(calls, int) or calls * rows * cols >= SPELLED_OUT_MIN))
    if query.device.type == "cuda" or not spelled_out:
        mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(dtype)
        out = F.scaled_dot_product_attention(query.to(dtype), key.to(dtype), value.to(dtype), attn_mask=mask,
                                             dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        return out.to(query.dtype)
    factor = query.shape[-1] ** -0.5 if scale is None else scale
    # heads often arrive as transposed views, and batched GEMMs want them dense (cast, then copy:
    # casting straight into a dense layout ran 6x slower)
    q, k, v = (t.to(dtype).contiguous() for t in (query, key, value))
    scores = torch.matmul(q, k.transpose(-2, -1))
    keep = None
    if is_causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=query.device).tril()
    bias = None if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(dtype)
    if attn_mask is not None:
        allowed = attn_mask if bias is None else attn_mask > float("-inf")
        keep = allowed if keep is None else keep & allowed
    if keep is not None:
        blocked = torch.zeros(keep.shape, dtype=dtype, device=query.device).masked_fill(keep.logical_not(), float("-inf"))
        bias = blocked if bias is None else bias + blocked
    scores = scores * factor if bias is None else torch.add(bias, scores, alpha=factor)
    weights = torch.softmax(scores, -1)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    out = torch.matmul(weights, v)
    if keep is not None:
        out = out.masked_fill(keep.any(-1, keepdim=True).logical_not(), 0.0)
    return out.to(query.dtype)
