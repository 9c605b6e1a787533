"""What long-running calls show a person at a terminal: whether to show it, a spinner naming the
step in progress (on standard error, so that what a program prints stays its own), and a logger
quieted for one call."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

__all__ = ["progress_wanted", "quiet_logger", "step"]


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


@contextmanager
def quiet_logger(name: str, level: int = logging.WARNING) -> Iterator[None]:
    """Only records of at least `level` from logger `name` while the block runs."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
