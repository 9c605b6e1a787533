"""fxsketch's kernels: the low-rank GEMM op family. Knows nothing of FX or Optuna."""

from fxsketch.kernels.ops import lowrank_conv2d, lowrank_linear

__all__ = ["lowrank_linear", "lowrank_conv2d"]
