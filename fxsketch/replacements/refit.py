"""Closed-form refits of a replacement's trainable factors to the original layer's outputs.

Everything is least squares on the calibration statistics C = E[xᵀx]: the fitted factors minimize
E‖x Wᵀ − x Ŵᵀ‖² without ever touching the activations again.
"""

from __future__ import annotations

import torch

from fxsketch.records import ridge_scale

__all__ = ["refit_outer", "refit_sketch"]

SKETCH_RIDGE = 1e-4  # of the mean input energy, on S2's least squares (see refit_sketch)


def _solve_spd(M: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """M⁻¹ rhs for a symmetric positive semi-definite M, with a small ridge for singular cases."""
    ridge = ridge_scale(M.dtype, 1e-10) * M.diagonal().abs().mean().clamp_min(torch.finfo(M.dtype).tiny)
    return torch.linalg.solve(M + ridge * torch.eye(M.shape[0], dtype=M.dtype, device=M.device), rhs)


def refit_outer(W: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """The A minimizing E‖(W − A B) x‖² for fixed B: A = W C Bᵀ (B C Bᵀ)⁻¹ (in C's dtype)."""
    CB = C @ B.T
    return _solve_spd(B @ CB, (W @ CB).T).T


def refit_sketch(S1: torch.Tensor, S2: torch.Tensor, U1: torch.Tensor, U2: torch.Tensor, W: torch.Tensor,
                 C: torch.Tensor, iterations: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternating least squares for Panther's sketch y = 1/(2l) Σ (x S1_i) U1_i + (x U2_i) S2_i.

    The sketches U1, U2 stay fixed; S1 (l, d, k) and S2 (l, k, out) are refit to W (out × d).
    Each half-step is exact: S2 given S1 is a least-squares problem weighted by C, and S1 given S2
    is one whose solution does not depend on C (it multiplies from the left).
    """
    l, d, k = S1.shape
    scale = 1.0 / (2 * l)
    target = W.T  # d × out
    s1 = S1.permute(1, 0, 2).reshape(d, l * k)
    u2 = U2.permute(1, 0, 2).reshape(d, l * k)
    u1 = U1.reshape(l * k, -1) * scale
    s2 = S2.reshape(l * k, -1)
    CU2 = C @ u2
    # Directions the calibration rows never reach (fewer rows than inputs) leave u2ᵀ C u2 nearly
    # singular: a ridge in the input space's own scale keeps S2 bounded there instead of letting
    # it fit noise (without it, 4 rows for 1024 inputs gave outputs 40x too large)
    gram = u2.T @ CU2 + SKETCH_RIDGE * C.diagonal().mean().clamp_min(torch.finfo(C.dtype).tiny) * (u2.T @ u2)
    for _ in range(iterations):
        residual = target - s1 @ u1
        s2 = _solve_spd(gram, CU2.T @ residual) / scale
        rest = target - u2 @ (s2 * scale)
        s1 = _solve_spd(u1 @ u1.T, u1 @ rest.T).T
    return s1.reshape(d, l, k).permute(1, 0, 2), s2.reshape(l, k, -1)
