"""Replacement kinds: how a Linear/Conv2d is replaced, what it costs, and its search space."""

from fxsketch.replacements import lowrank, precision, sketch  # noqa: F401  (each module registers its kinds)
from fxsketch.replacements.base import Cost, FactorCache, ReplacementKind, dense_cost
from fxsketch.replacements.precision import HALF_DTYPES
from fxsketch.replacements.registry import KINDS, get_kind, register_kind

__all__ = ["Cost", "FactorCache", "HALF_DTYPES", "KINDS", "ReplacementKind", "dense_cost", "get_kind", "register_kind"]
