"""What every replacement kind provides, the exact cost model, and the per-study factor cache."""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxsketch.records import LayerRecord, ridge_scale, statistics_dtype
from fxsketch.space import Int, ParamSpec

log = logging.getLogger(__name__)

__all__ = ["Cost", "ReplacementKind", "FactorCache", "dense_cost", "lowrank_cost", "efficient_rank_limit",
           "auto_rank_limit", "AUTO_MIN_GAIN", "AUTO_MIN_WIDTH"]


@dataclass(frozen=True)
class Cost:
    """Exact cost of one layer: stored numbers and FLOPs per output position (token or pixel).
    `bits` is the width of the stored weights and, unless `gemm_bits` says otherwise (weight-only
    kinds), of the GEMMs' operands: an 8-bit GEMM moves a quarter of the bytes and does at most four
    times the multiply-adds per SIMD instruction."""

    params: int
    flops_per_token: int
    rank: int | None = None
    bits: int = 32
    gemm_bits: int | None = None

    @property
    def work(self) -> float:
        """FLOPs per token in float32 equivalents: a b-bit FLOP counts b/32 (what a SIMD register of
        fixed width does in one instruction)."""
        return self.flops_per_token * (self.gemm_bits or self.bits) / 32


def dense_cost(record: LayerRecord) -> Cost:
    out, inner = record.out_features, record.in_features
    return Cost(params=out * inner + _bias(record), flops_per_token=2 * out * inner)


def lowrank_cost(record: LayerRecord, rank: int, bits: int = 32) -> Cost:
    out, inner = record.out_features, record.in_features
    return Cost(params=rank * (inner + out) + _bias(record), flops_per_token=2 * rank * (inner + out), rank=rank,
                bits=bits)


def _bias(record: LayerRecord) -> int:
    return record.out_features if record.bias_target else 0


AUTO_MIN_GAIN = 1.5
AUTO_MIN_WIDTH = 32  # "auto" offers no low-rank form of a layer with fewer inputs or outputs than this


def auto_rank_limit(record: LayerRecord) -> int:
    """The largest rank an "auto" space offers: `efficient_rank_limit`, or 0 for a layer too narrow
    for any rank to keep its function (a 10-way classifier head at rank ≤ 6 is no longer one)."""
    if min(record.in_features, record.out_features) < AUTO_MIN_WIDTH:
        return 0
    return efficient_rank_limit(record)


def efficient_rank_limit(record: LayerRecord, min_gain: float = AUTO_MIN_GAIN) -> int:
    """The largest inner rank R whose FLOPs, R·(in+out), are at least `min_gain` times below in·out.

    With `min_gain=1` this is the seeds' rule (R·(in+out) < in·out); "auto" spaces ask for a 1.5×
    gain because below that the second GEMM's fixed cost eats the saving.
    """
    out, inner = record.out_features, record.in_features
    return math.ceil(out * inner / (min_gain * (out + inner))) - 1


def rank_space(limit: int) -> ParamSpec | None:
    """Ranks up to `limit` on a power-of-two step that keeps the grid to about 16–32 values."""
    if limit < 1:
        return None
    step = 2 ** max(0, math.floor(math.log2(limit / 16)))
    return Int(step, limit - limit % step, step=step)


class ReplacementKind:
    """A way to replace a Linear/Conv2d layer. Subclasses register with `register_kind`.

    Attributes:
        name: the `method` value that selects this kind in specs and plans.
        param_names: the parameters a plan entry of this kind carries.
        options: parameters a plan entry may add, which spaces never search (the kind's build
            reads their absence as its default).
        defaults: values used when a spec does not search a parameter.
        automatic: `params="auto"` offers it beside the spec's method where `offered` says so.
    """

    name: str = ""
    param_names: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    defaults: dict[str, Any] = {}
    automatic: bool = False  # offered by "auto" spaces beside the low-rank kind, wherever `offered` says

    def offered(self, record: LayerRecord) -> bool:
        """Whether automatic spaces offer this kind for `record`: its device and dtype run it fast."""
        return not self.unsupported(record)

    def unsupported(self, record: LayerRecord) -> str:
        """Why this kind cannot replace `record` ("" when it can)."""
        if record.op_type == "Embedding":
            return f"{self.name} does not apply to embedding tables ({record.name}); they take int8_weight"
        if record.op_type == "Attention":
            return f"{self.name} does not apply to attention calls ({record.name}); they take bf16 or fp16"
        if record.op_type not in ("Linear", "Conv2d"):
            return f"{record.op_type} layers are not supported"
        return record.unsupported

    def invalid(self, record: LayerRecord, params: dict[str, Any]) -> str:
        """Why `params` cannot be built for `record` ("" when they can)."""
        return ""

    def auto_space(self, record: LayerRecord, precision: bool = False) -> dict[str, ParamSpec] | None:
        """The efficient search space for `record`, or None when no configuration beats dense.
        With `precision`, also the reduced precisions this kind can take on `record`'s device."""
        return {}

    def upper_bounds(self, record: LayerRecord) -> dict[str, int]:
        """The largest value each size-like parameter may take on `record` (a searched range
        reaching past it is clipped there)."""
        return {}

    def cost(self, record: LayerRecord, params: dict[str, Any]) -> Cost:
        raise NotImplementedError

    def build(
        self,
        record: LayerRecord,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        params: dict[str, Any],
        cache: "FactorCache",
        copy_weights: bool = True,
    ) -> nn.Module | None:
        """The replacement module for `record` (None keeps the original)."""
        raise NotImplementedError


class FactorCache:
    """Per-study, per-layer state shared by every trial: decompositions and calibration statistics.

    One SVD per layer for a whole study; every rank is a slice of it. Small layers, and ranks above
    a quarter of the smaller dimension, get an exact SVD; large layers at low rank get a randomized
    one (`torch.svd_lowrank`) with oversampling, computed with a fixed seed so a plan rebuilds bit
    for bit. With calibration statistics (`stats`, from `fxsketch.calibrate`) the cache also holds
    the activation-whitened decompositions, `refit` asks kinds to refit their trainable factors
    to the layer's outputs on those statistics, and `smooth` int8 layers' inputs (`smoothing`). With `cache_dir`, decompositions are also kept on
    disk, keyed by the exact weights (and statistics), so a resumed or repeated search skips them.
    """

    EXACT_BELOW = 1024
    CROSS_RIDGE = 0.1  # of the mean input energy, for sequential targets (see `target`)

    def __init__(self, stats: dict | None = None, refit: bool = True, cache_dir: str | os.PathLike | None = None,
                 smooth: bool = True) -> None:
        self.stats = dict(stats or {})
        self.refit = refit
        self.smooth = smooth
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]] = {}
        self._whitened: dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._whitened_factors: dict[tuple[str, bool, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._mean_output: dict[str, torch.Tensor] = {}

    def _disk(self, what: str, key: str, *tensors: torch.Tensor) -> Path | None:
        """The file holding a decomposition of these exact tensors (None without a cache_dir)."""
        if self.cache_dir is None:
            return None
        digest = hashlib.sha1(what.encode())
        for t in tensors:
            digest.update(t.detach().to(torch.float64).contiguous().cpu().numpy().tobytes())
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
        return self.cache_dir / f"{what}-{safe}-{digest.hexdigest()[:16]}.pt"

    @staticmethod
    def _load(path: Path | None, check: Callable[[tuple], bool]):
        """The decomposition stored at `path`, if it is one of these weights: tensors of the right
        shapes, finite, whose singular values `check` confirms against the weights (a truncated,
        zeroed or foreign file is recomputed and overwritten)."""
        if path is None or not path.exists():
            return None
        try:
            value = tuple(torch.load(path, weights_only=True))
            if len(value) >= 3 and all(isinstance(t, torch.Tensor) for t in value[:3]) and check(value):
                return value
        except Exception:  # unreadable: recompute it
            pass
        log.warning("factor cache file %s does not hold this layer's decomposition: recomputing it", path)
        return None

    def _store(self, path: Path | None, value: tuple) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(list(value), path)

    # the exponent a of s = rms(x)^a / max|W|^(1-a): MiniLM, every encoder Linear int8, fidelity 0.9915
    # unsmoothed; a = 0.3, 0.5, 0.7, 0.85 -> 0.889, 0.9922, 0.9967, 0.9953 (statistics of every token)
    SMOOTHING = 0.7

    def smoothing(self, key: str, weight: torch.Tensor) -> torch.Tensor | None:
        """Per input feature, the factor s an int8 layer's input is divided by (and its weight
        (… × in) multiplied by) before both are quantized, from the calibration statistics (None
        without them): s_j = rms(x_j)^a / max_i |W_ij|^(1-a) moves the range of the features with
        outliers into the weights, which are quantized per output channel, instead of letting them
        take the single per-tensor activation scale (SmoothQuant's rule, with the RMS the statistics
        hold for the maximum). Ranges are floored at 1/1000 of their largest, so that a feature the
        calibration data never excited cannot blow up; s is normalized to a mean of 1."""
        C = self.second_moment(key)
        if not self.smooth or C is None or C.is_meta:
            return None
        rms = C.diagonal().clamp_min(0).sqrt().to(weight.device, torch.float32)
        peak = weight.detach().abs().float().reshape(-1, weight.shape[-1]).amax(0)
        if not (bool(rms.max() > 0) and bool(peak.max() > 0)):
            return None
        rms, peak = rms.clamp_min(1e-3 * rms.max()), peak.clamp_min(1e-3 * peak.max())
        s = rms.pow(self.SMOOTHING) / peak.pow(1 - self.SMOOTHING)
        return (s / s.mean()).to(weight.dtype)

    def input_range(self, key: str, input_scale: torch.Tensor | None = None) -> tuple[float, float] | None:
        """The smallest and largest value the layer's input took on the calibration data, each
        feature first multiplied by `input_scale` (positive, a smoothed layer's); None without
        calibration (or with statistics that do not record it)."""
        stats = self.stats.get(key)
        if stats is None or stats.low is None or stats.low.is_meta:
            return None
        low, high = stats.low.float(), stats.high.float()
        if input_scale is not None:
            low, high = low * input_scale.to(low), high * input_scale.to(low)
        return float(low.min()), float(high.max())

    def second_moment(self, key: str) -> torch.Tensor | None:
        """E[xᵀx] of the layer's inputs (float64), or None without calibration."""
        stats = self.stats.get(key)
        return None if stats is None else stats.second_moment

    def centers(self, key: str, bias: bool) -> bool:
        """Whether builds of this layer fit around the input mean and put the mean into the bias:
        with refit on, a bias to correct and statistics that record the mean."""
        stats = self.stats.get(key)
        return bool(self.refit and bias and stats is not None and getattr(stats, "total", None) is not None)

    def target(self, key: str, matrix: torch.Tensor, centered: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W*, C): the weight to approximate and the input second moment that weighs its error.

        Plain statistics give (W, E[xxᵀ]). Sequential statistics (`fxsketch.sequential.sequential_stats`,
        inputs x̃ that differ from the original model's x) give W* = W P C̃⁻¹ with P = E[x x̃ᵀ] and
        C = C̃ = E[x̃ x̃ᵀ]: for every Ŵ, E‖W x − Ŵ x̃‖² = E‖(W* − Ŵ) x̃‖² + const, so each kind's own
        fit to (W*, C) is its fit to the original layer's outputs. `centered` uses covariances
        instead of second moments (the mean is then the bias's job, see `bias`).
        """
        stats = self.stats.get(key)
        if stats is None:
            return matrix.detach().to(wide_dtype(matrix)), None
        C = stats.second_moment
        W = matrix.detach().to(C.device, C.dtype)
        cross = getattr(stats, "cross", None)
        P = None if cross is None else stats.cross_moment
        if centered:
            mu, ref = stats.mean, stats.ref_mean
            C = C - torch.outer(mu, mu)
            P = None if P is None else P - torch.outer(ref, mu)
        if P is not None:
            # Regularized towards W itself: W* = W (P + λI)(C̃ + λI)⁻¹, which is W exactly when
            # nothing upstream changed (P = C̃) and keeps W's action on directions the calibration
            # data barely covers (few rows for wide layers) instead of zeroing or amplifying them.
            ridge = ridge_scale(C.dtype, self.CROSS_RIDGE) * C.diagonal().mean().clamp_min(1e-12)
            eye = ridge * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
            W = torch.linalg.solve(C + eye, (W @ (P + eye)).T).T  # C̃ symmetric
        return W, C

    def bias(self, key: str, matrix: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor],
             bias: torch.Tensor | None) -> torch.Tensor | None:
        """The bias that makes the replacement's mean output match the original's on the statistics:
        b + W E[x] − A B E[x̃] for the replacement Ŵ = A·B (`factors`; for a fixed Ŵ, the
        least-squares optimal bias). `bias` itself when the layer is not centered (see `centers`)."""
        if bias is None or not self.centers(key, True):
            return bias
        stats = self.stats[key]
        wide = stats.mean.dtype
        if key not in self._mean_output:
            self._mean_output[key] = matrix.detach().to(wide) @ stats.ref_mean
        A, B = factors
        dtype = torch.promote_types(torch.promote_types(A.dtype, B.dtype), torch.float32)
        approx = A.detach().to(dtype) @ (B.detach().to(dtype) @ stats.mean.to(dtype))
        shift = self._mean_output[key] - approx.to(wide)
        return (bias.detach().to(wide) + shift).to(bias.dtype)

    def svd(self, key: str, matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_R, S_R, Vh_R) of `matrix` (float32 or wider), computing or widening the cached SVD."""
        cached = self._svd.get(key)
        if cached is None:
            path = self._disk("svd", key, matrix)
            cached = self._load(path, lambda v: _confirms(v[0], v[1], v[2], matrix.detach().to(v[1].dtype)))
            if cached is not None:
                cached = (*cached[:3], bool(cached[3]))
        if cached is None or (not cached[3] and cached[1].numel() < rank):
            cached = self._decompose(matrix, rank)
            self._store(self._disk("svd", key, matrix), (*cached[:3], torch.tensor(cached[3])))
        self._svd[key] = cached
        U, S, Vh, _ = cached
        return U[:, :rank], S[:rank], Vh[:rank]

    def _decompose(self, matrix: torch.Tensor, rank: int):
        W = matrix.detach().to(torch.float64 if matrix.dtype == torch.float64 else torch.float32)
        small = min(W.shape)
        if small <= self.EXACT_BELOW or rank * 4 > small:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            return U, S, Vh, True
        q = min(small, max(2 * rank, rank + 32))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            U, S, V = torch.svd_lowrank(W, q=q, niter=4)
        return U, S, V.T, False

    def whitened(self, key: str, matrix: torch.Tensor, centered: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, S, M) with W ≈ U_R S_R M_R for every R, optimal for the layer's outputs on its inputs.

        With C = E[xᵀx] + λI = L Lᵀ, the SVD of W L = U S Vᵀ truncated at R and mapped back,
        W_R = U_R S_R V_Rᵀ L⁻¹, minimizes E‖(W − W_R) x‖²; M = Vᵀ L⁻¹. The ridge λ keeps
        rank-deficient inputs (dead features, padding) invertible. With sequential statistics W
        and C are those of `target` (the fit is then to the original outputs from the inputs the
        replaced model gives the layer); `centered` decomposes around the input mean.
        """
        slot = (key, centered)
        if slot not in self._whitened:
            W, C = self.target(key, matrix, centered)
            if C is None:
                raise ValueError(f"whitened_svd needs calibration statistics for layer {key!r}: pass "
                                 "calibration_data=... to optimize/rewrite/allocate")
            path = self._disk("whitened-centered" if centered else "whitened", key, W, C)
            ridge = ridge_scale(C.dtype, 1e-6) * C.diagonal().mean().clamp_min(1e-12)
            weighed = W @ (C + ridge * torch.eye(C.shape[0], dtype=C.dtype, device=C.device))
            stored = self._load(path, lambda v: _confirms(v[0], v[1], v[2], weighed.to(v[1].dtype)))
            if stored is not None:
                self._whitened[slot] = stored
                return stored
            L = _cholesky(C, ridge)
            U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
            M = torch.linalg.solve_triangular(L.T, Vh.T, upper=True).T  # Vᵀ L⁻¹
            self._whitened[slot] = (U, S, M)
            self._store(path, (U, S, M))
        return self._whitened[slot]

    def whitened_factors(self, key: str, matrix: torch.Tensor, centered: bool, dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(U S^½, S^½ M) of `whitened` in `dtype`, kept for the study: the rank-R factors (A, B) of
        `whitened_svd` are their leading R columns and rows, so a trial's build only slices them."""
        slot = (key, centered, dtype)
        if slot not in self._whitened_factors:
            U, S, M = self.whitened(key, matrix, centered)
            root = S.sqrt()
            self._whitened_factors[slot] = ((U * root).to(dtype), (root[:, None] * M).to(dtype))
        return self._whitened_factors[slot]

    def output_errors(self, key: str, method: str, matrix: torch.Tensor, ranks: list[int],
                      centered: bool = False) -> list[float]:
        """Relative output error E‖(W − W_R)x‖² / E‖Wx‖² of `method` at each rank, on the statistics
        (`centered`: of the whitened build that fits around the mean and corrects the bias)."""
        if method == "whitened_svd":
            _, S, _ = self.whitened(key, matrix, centered)
            energy = S.square()
            tail = energy.flip(0).cumsum(0).flip(0)
            total = energy.sum().clamp_min(torch.finfo(energy.dtype).tiny)
            if centered:  # the mean's share of the output is reproduced exactly by the bias
                C = self.second_moment(key)
                W = matrix.detach().to(C.device, C.dtype)
                total = ((W @ C) * W).sum().clamp_min(torch.finfo(W.dtype).tiny)
            return [float(tail[r] / total) if r < len(tail) else 0.0 for r in ranks]
        C = self.second_moment(key)
        W = matrix.detach().to(wide_dtype(matrix)) if C is None else matrix.detach().to(C.device, C.dtype)
        G = W @ C @ W.T if C is not None else W @ W.T  # output energy per direction
        total = G.trace().clamp_min(torch.finfo(G.dtype).tiny)
        U, _, _ = self.svd(key, matrix, max(ranks))
        U = U.to(W.dtype)
        captured = ((U.T @ G) * U.T).sum(1).cumsum(0)
        return [float((total - captured[r - 1]) / total) if r else 1.0 for r in ranks]

    def clear(self) -> None:
        self._svd.clear()
        self._whitened.clear()
        self._whitened_factors.clear()
        self._mean_output.clear()


def wide_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype factorizations of `t` use on its device (`fxsketch.records.statistics_dtype`)."""
    return statistics_dtype(t.device, t.dtype)


def _cholesky(C: torch.Tensor, ridge: torch.Tensor) -> torch.Tensor:
    """The Cholesky factor of C + ridge·I, the ridge grown tenfold while rounding leaves the sum
    indefinite (float32 statistics of nearly singular inputs)."""
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(C + ridge * eye)
        if C.is_meta or not bool(info.any()):
            return L
        ridge = ridge * 10
    return torch.linalg.cholesky(C + ridge * eye)  # still failing: torch's error names the cause


def _confirms(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, W: torch.Tensor) -> bool:
    """Whether (U, S, V) are singular triples of W: the right shapes, finite, and S_j = u_jᵀ W v_jᵀ
    (for a whitened decomposition W is W·C and V its M = Vᵀ L⁻¹, the same identity)."""
    q = S.shape[0] if S.dim() == 1 else -1
    if q < 1 or U.shape != (W.shape[0], q) or V.shape != (q, W.shape[1]):
        return False
    if not all(bool(torch.isfinite(t).all()) for t in (U, S, V)):
        return False
    S = S.to(W.dtype)
    if bool((S < 0).any()) or bool((S[1:] > S[:-1] * (1 + 1e-6)).any()):
        return False  # singular values are non-negative and sorted
    if float(S[0]) == 0.0 and bool(W.any()):
        return False  # all-zero factors are no decomposition of a nonzero W
    found = ((U.T.to(W.dtype) @ W) * V.to(W.dtype)).sum(1)
    return bool(torch.allclose(found, S, rtol=1e-3, atol=1e-6 * float(S[0].clamp_min(1e-30))))
