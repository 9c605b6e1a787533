"""Fused low-rank GEMM in Triton: `y = (x · Bᵀ) · Aᵀ + bias` with the M×R intermediate on chip.

One program owns a BM-row tile of x and a slice of N. For one BR-wide chunk of the rank it
computes t = x_tile · B_chunkᵀ in float32 (float64 for float64 inputs) registers (phase 1, looping
over K), casts it to the input dtype, and streams it against A (phase 2, looping over its N slice),
so t is never written to global memory. With R ≤ BR (the usual case) one launch writes every
output tile once, bias included; a larger R takes one launch per chunk, each adding its chunk onto
the stored output. Each launch is two flat loops, the shape Triton pipelines best (a loop over the
chunks around them broke Triton 3.6's pipeliner). `N_SPLIT` programs share the N range
of one row tile: one (no recomputation of phase 1) when M is large, several when M is small and
the row tiles alone would leave the GPU idle.

Rows are addressed as (m // HW, m % HW) with a batch stride, so the same kernel reads and writes
NCHW tensors directly: that is the 1×1 stage of the low-rank Conv2d (`IDENTITY_B`: x already is t).
Launches go through `wrap_triton`, so when `fxsketch.kernels.ops` registers these functions as
`triton_op`s a traced graph records the kernel itself (eager calls launch it directly).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torch.library import wrap_triton


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Triton's CPU interpreter computes bf16 dots wrongly (numpy has no bf16): it upcasts there.
    if UPCAST:
        return tl.dot(a.to(acc.dtype), b.to(acc.dtype), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _lowrank_fwd_kernel(
    x_ptr, b_ptr, a_ptr, bias_ptr, y_ptr,
    M, K, N, R, r0, HW,
    sx_b, sx_m, sx_k, sb_r, sb_k, sa_n, sa_r, sy_b, sy_m, sy_n, s_bias,
    M_BUCKET,  # autotune key only: the power-of-two bucket of M
    HAS_BIAS: tl.constexpr, IDENTITY_B: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ACC: tl.constexpr, ADD_TO_Y: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, N_SPLIT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)  # 64-bit addressing for huge M·N
    m_mask = offs_m < M
    x_rows = (offs_m // HW) * sx_b + (offs_m % HW) * sx_m
    y_rows = (offs_m // HW) * sy_b + (offs_m % HW) * sy_m
    tiles_per_split = tl.cdiv(tl.cdiv(N, BN), N_SPLIT)
    n_begin = pid_s * tiles_per_split * BN
    n_stop = tl.minimum(n_begin + tiles_per_split * BN, N)
    if n_begin >= n_stop:
        return  # more splits than column tiles: nothing left for this program
    t = _rank_chunk(x_ptr, b_ptr, x_rows, m_mask, r0, R, K, sx_k, sb_r, sb_k,
                    IDENTITY_B, PRECISION, UPCAST, ACC, BM, BK, BR)
    _emit(t, a_ptr, bias_ptr, y_ptr, y_rows, m_mask, r0, n_begin, n_stop, sa_n, sa_r, sy_n, s_bias, R,
          HAS_BIAS, PRECISION, UPCAST, ACC, ADD_TO_Y, BM, BN, BR)


@triton.jit
def _rank_chunk(x_ptr, b_ptr, x_rows, m_mask, r0, R, K, sx_k, sb_r, sb_k,
                IDENTITY_B: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    """t = x_tile · B[r0:r0+BR]ᵀ (BM × BR), in the input dtype."""
    r_idx = r0 + tl.arange(0, BR)
    r_mask = r_idx < R
    if IDENTITY_B:
        return tl.load(x_ptr + x_rows[:, None] + r_idx[None, :] * sx_k,
                       mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    offs_k = tl.arange(0, BK)
    acc_t = tl.zeros((BM, BR), dtype=ACC)
    for k0 in range(0, K, BK):
        k_idx = k0 + offs_k
        k_mask = k_idx < K
        xt = tl.load(x_ptr + x_rows[:, None] + k_idx[None, :] * sx_k,
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        bt = tl.load(b_ptr + r_idx[None, :] * sb_r + k_idx[:, None] * sb_k,
                     mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        acc_t = _dot(xt, bt, acc_t, PRECISION, UPCAST)
    return acc_t.to(x_ptr.dtype.element_ty)


@triton.jit
def _emit(t, a_ptr, bias_ptr, y_ptr, y_rows, m_mask, r0, n_begin, n_stop, sa_n, sa_r, sy_n, s_bias, R,
          HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
          ADD_TO_Y: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    """y[:, n_begin:n_stop] (+)= t · A[:, r0:r0+BR]ᵀ, plus bias on the first chunk. Whether to add
    onto y is a compile-time flag: a data-dependent load inside the loop breaks Triton 3.6's
    pipeliner on sm_90."""
    r_idx = r0 + tl.arange(0, BR)
    r_mask = r_idx < R
    offs_n = tl.arange(0, BN)
    for n0 in range(n_begin, n_stop, BN):
        n_idx = n0 + offs_n
        n_mask = n_idx < n_stop
        at = tl.load(a_ptr + n_idx[None, :] * sa_n + r_idx[:, None] * sa_r,
                     mask=n_mask[None, :] & r_mask[:, None], other=0.0)
        acc = _dot(t, at, tl.zeros((BM, BN), dtype=ACC), PRECISION, UPCAST)
        y_ptrs = y_ptr + y_rows[:, None] + n_idx[None, :] * sy_n
        out_mask = m_mask[:, None] & n_mask[None, :]
        if ADD_TO_Y:
            acc += tl.load(y_ptrs, mask=out_mask, other=0.0).to(ACC)
        elif HAS_BIAS:
            acc += tl.load(bias_ptr + n_idx * s_bias, mask=n_mask, other=0.0).to(ACC)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


def _cuda_configs() -> list[triton.Config]:
    """Large-M tiles that keep one program per row tile (or split N a few ways to fill the SMs),
    small-M (decode) tiles that split N widely, and narrow two-stage tiles that fit float32 at
    large R in shared memory; `_prune` keeps those that suit the call."""
    configs = []
    for bm, bn, bk, split, warps, stages in (
        (128, 128, 32, 1, 8, 3), (128, 64, 64, 1, 4, 3), (64, 128, 64, 1, 4, 3), (64, 64, 64, 1, 4, 4),
        (128, 128, 32, 4, 8, 3), (64, 128, 64, 8, 4, 3), (64, 128, 32, 4, 4, 3), (32, 128, 64, 8, 4, 3),
        (16, 128, 128, 8, 4, 3), (16, 64, 128, 16, 4, 3), (16, 256, 64, 16, 8, 3), (16, 128, 64, 32, 4, 4),
        (64, 32, 32, 1, 4, 2), (64, 32, 32, 4, 4, 2), (16, 32, 64, 16, 4, 2),
    ):
        for br in (16, 32, 64, 128, 256):
            configs.append(triton.Config(dict(BM=bm, BN=bn, BK=bk, BR=br, N_SPLIT=split),
                                         num_warps=warps, num_stages=stages))
    return configs


_SMEM_BUDGET = 200 * 1024  # bytes; Hopper has 227 KiB per block, leave room for layout shuffles


def _smem_bytes(config: triton.Config, element_size: int) -> int:
    k = config.kwargs
    tiles = k["BM"] * k["BK"] + k["BK"] * k["BR"] + k["BR"] * k["BN"]
    return config.num_stages * tiles * element_size


def _prune(configs, named_args, **kwargs):
    """Keep configs whose rank chunk fits R (one chunk when R ≤ 256), whose row tile suits M,
    whose N split leaves every program some columns, and whose pipelined tiles fit shared memory."""
    R, M, N = named_args["R"], named_args["M"], named_args["N"]
    size = named_args["x_ptr"].element_size()
    want_br = _rank_chunk_width(R)
    small = M <= 64

    def suits(c):
        k = c.kwargs
        row_ok = k["BM"] <= 32 if small else k["BM"] >= 64
        return (k["BR"] == want_br and row_ok and k["N_SPLIT"] <= triton.cdiv(N, k["BN"])
                and _smem_bytes(c, size) <= _SMEM_BUDGET)

    kept = [c for c in configs if suits(c)]
    # the fallback must keep BR: the caller launches once per BR-wide chunk of R
    same_chunk = [c for c in configs if c.kwargs["BR"] == want_br]
    return kept or [min(same_chunk, key=lambda c: _smem_bytes(c, size))]


@functools.cache
def _autotuned():
    # a later chunk adds onto y: benchmarking it must not leave its repeats there
    key = ["M_BUCKET", "K", "N", "R", "IDENTITY_B", "HAS_BIAS", "PRECISION"]
    return triton.autotune(configs=_cuda_configs(), key=key, prune_configs_by={"early_config_prune": _prune},
                           restore_value=["y_ptr"])(_lowrank_fwd_kernel)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on CPU tensors and autotuning is unavailable."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _launch(x, b, a, bias, y, M, K, N, R, HW, x_strides, y_strides, identity_b: bool) -> None:
    precision = "tf32" if x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    flags = dict(HAS_BIAS=bias is not None, IDENTITY_B=identity_b, PRECISION=precision,
                 UPCAST=interpreting() and x.dtype == torch.bfloat16,
                 ACC=tl.float64 if x.dtype == torch.float64 else tl.float32)
    # The interpreter has no driver to benchmark with: one fixed, small config.
    fixed = dict(BM=16, BN=32, BK=32, BR=_rank_chunk_width(R, cap=64), N_SPLIT=1) if interpreting() else None
    chunk = fixed["BR"] if fixed else _rank_chunk_width(R)
    for r0 in range(0, R, chunk):
        args = (x, b if b is not None else x, a, bias if bias is not None else a, y, M, K, N, R, r0, HW,
                *x_strides, *(b.stride() if b is not None else (0, 0)), *a.stride(), *y_strides,
                bias.stride(0) if bias is not None else 0,
                triton.next_power_of_2(M))
        if fixed:
            wrap_triton(_lowrank_fwd_kernel)[(triton.cdiv(M, fixed["BM"]), 1)](*args, **flags, ADD_TO_Y=r0 > 0,
                                                                              **fixed)
        else:
            grid = lambda meta: (triton.cdiv(M, meta["BM"]), meta["N_SPLIT"])  # noqa: E731
            wrap_triton(_autotuned())[grid](*args, **flags, ADD_TO_Y=r0 > 0)


def _rank_chunk_width(R: int, cap: int = 256) -> int:
    """BR: the rank chunk, R rounded up to a power of two (at least 16, the smallest dot) up to `cap`."""
    return min(max(16, triton.next_power_of_2(R)), cap)


def _check(x: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None, B: torch.Tensor | None = None) -> None:
    tensors = [t for t in (x, B, A, bias) if t is not None]
    if len({t.dtype for t in tensors}) != 1:
        raise TypeError(f"lowrank ops need one dtype for all tensors, got {[t.dtype for t in tensors]}")
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"lowrank ops need all tensors on one device, got {[str(t.device) for t in tensors]}")


def lowrank_linear_triton(
    x: torch.Tensor, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`(x · Bᵀ) · Aᵀ + bias` with the fused kernel; x (..., K), B (R, K), A (N, R), bias (N,)."""
    _check(x, A, bias, B)
    K, R, N = x.shape[-1], B.shape[0], A.shape[0]
    if B.shape[1] != K or A.shape[1] != R or (bias is not None and bias.shape != (N,)):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, B {tuple(B.shape)}, A {tuple(A.shape)}, "
                         f"bias {None if bias is None else tuple(bias.shape)}")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M and N:
        if R == 0 or K == 0:
            y.copy_(bias.expand(M, N) if bias is not None else torch.zeros_like(y))
        else:
            _launch(x2, B, A, bias, y, M, K, N, R, M, (0, *x2.stride()), (0, *y.stride()), identity_b=False)
    return y.reshape(*x.shape[:-1], N)


def pointwise_conv_triton(t: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The 1×1 convolution `y[n, o] = Σ_r A[o, r] · t[n, r] + bias[o]` on NCHW tensors, read and
    written in place by the fused kernel's GEMM-with-bias path."""
    _check(t, A, bias)
    t = t.contiguous()
    batch, R, H, W = t.shape
    N, HW = A.shape[0], H * W
    y = torch.empty((batch, N, H, W), device=t.device, dtype=t.dtype)
    M = batch * HW
    if M and N:
        _launch(t, None, A, bias, y, M, R, N, R, HW, (R * HW, 1, HW), (N * HW, 1, HW), identity_b=True)
    return y


_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


class _Shape:
    """What the pruner reads of a tensor argument, without a tensor."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def element_size(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()


def aot_compile(M: int, K: int, N: int, R: int, dtype: torch.dtype = torch.bfloat16, arch: int = 90, *,
                bias: bool = True, hw: int | None = None, chunk: int = 0) -> list[tuple[triton.Config, str | None]]:
    """Compile the fused kernel for a CUDA GPU of compute capability `arch` (80, 90, ...) without
    one: every autotune config the pruner keeps for the call `lowrank_linear_triton(x (M, K), B (R,
    K), A (N, R), bias)` (with `hw`: the 1×1 stage of a low-rank Conv2d with R channels over
    H·W = `hw` pixels per image, M = batch·hw), specialized as the runtime would (integer
    arguments equal to 1 become constants, multiples of 16 and pointers are marked 16-divisible).
    `chunk` picks the launch of a rank above one chunk's width (0: the first; 1: a later one, which
    adds onto the output).

    Returns (config, None) for each config that compiles and (config, the first line of the
    error) for each that does not: a check of a new Triton release, or of a new GPU generation.
    """
    if dtype not in _TRITON_TYPES:
        raise ValueError(f"dtype must be one of {list(_TRITON_TYPES)}, got {dtype}")
    identity = hw is not None
    K = R if identity else K
    x_strides = (R * hw, 1, hw) if identity else (0, K, 1)
    y_strides = (N * hw, 1, hw) if identity else (0, N, 1)
    values = dict(M=M, K=K, N=N, R=R, r0=chunk * _rank_chunk_width(R), HW=hw if identity else M,
                  **dict(zip(("sx_b", "sx_m", "sx_k"), x_strides)), sb_r=0 if identity else K,
                  sb_k=0 if identity else 1, sa_n=R, sa_r=1, **dict(zip(("sy_b", "sy_m", "sy_n"), y_strides)),
                  s_bias=1 if bias else 0, M_BUCKET=triton.next_power_of_2(M))
    flags = dict(HAS_BIAS=bias, IDENTITY_B=identity, PRECISION="ieee", UPCAST=False,
                 ACC=tl.float64 if dtype == torch.float64 else tl.float32, ADD_TO_Y=chunk > 0)
    configs = _prune(_cuda_configs(), {"R": R, "M": M, "N": N, "x_ptr": _Shape(dtype)})
    results = []
    for config in configs:
        constants = {**flags, **config.kwargs}
        signature, constexprs, attrs = {}, {}, {}
        for i, name in enumerate(_lowrank_fwd_kernel.arg_names):
            value = constants.get(name, values.get(name))
            if name in constants or value == 1:
                signature[name], constexprs[name] = "constexpr", value
            else:
                signature[name] = "*" + _TRITON_TYPES[dtype] if name.endswith("_ptr") else "i32"
                if name.endswith("_ptr") or value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        try:
            triton.compile(ASTSource(_lowrank_fwd_kernel, signature, constexprs, attrs),
                           target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": config.num_warps, "num_stages": config.num_stages})
            results.append((config, None))
        except Exception as exc:  # a compiler failure is the answer, whatever its type
            results.append((config, _reason(exc)))
    return results


def _reason(exc: BaseException) -> str:
    """What failed, outermost first: each error's first line (Triton wraps the reason, with the
    failing line of the kernel, around its cause)."""
    parts = []
    while exc is not None:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        parts.append(f"{type(exc).__name__}: {' '.join(lines[:3])[:300]}" if lines else type(exc).__name__)
        exc = exc.__cause__
    return " <- ".join(parts)
