"""The registry of replacement kinds: `method` name → kind."""

from __future__ import annotations

from fxsketch.replacements.base import ReplacementKind

KINDS: dict[str, ReplacementKind] = {}


def register_kind(cls: type[ReplacementKind]) -> type[ReplacementKind]:
    """Class decorator: make `cls` available as `method=cls.name` in specs and plans."""
    KINDS[cls.name] = cls()
    return cls


def get_kind(name: str) -> ReplacementKind:
    """The kind registered as `name`; a ValueError lists the known ones."""
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown replacement method {name!r}; known methods: {', '.join(sorted(KINDS))}") from None
