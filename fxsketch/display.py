"""What long-running calls show a person at a terminal: whether to show it, and a spinner naming
the step in progress. On standard error, so that what a program prints stays its own."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

__all__ = ["progress_wanted", "step"]


def progress_wanted(progress: bool | None) -> bool:
    """`progress`, or when None whether standard error is a terminal."""
    return sys.stderr.isatty() if progress is None else bool(progress)


@contextmanager
def step(description: str, enabled: bool) -> Iterator[None]:
    """A spinner naming a long step (capture and calibration, validation, compiling a package)."""
    if not enabled:
        yield
        return
    with Console(stderr=True).status(description):
        yield
