"""The process's memory allocator, set for inference: freed activation blocks kept for the next call.

glibc's malloc hands every block above its mmap threshold (128 KB at start, raised by its own
heuristic as large blocks are freed) straight from the OS and gives it back when freed, and it
returns free memory at the top of its heap beyond a trim threshold. A forward pass allocates and
frees its activations on every call, so in a fresh process each call pays page faults for them.
Measured on MiniLM at 32 × 64 tokens (2 threads, `benchmarks/bench_peers.py`): a saved int8 plan
loaded in a fresh process ran 1.28× the dense model, and 1.47× once the thresholds were set, as
fast as in the process that had searched it (1.45×). jemalloc and tcmalloc keep such blocks on
their own; glibc needs the two thresholds set.
"""

from __future__ import annotations

import ctypes
import logging
import os

__all__ = ["tune_allocator", "running_glibc", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to this size come from the heap
TRIM_THRESHOLD = 256 << 20  # free bytes at the heap's top kept for reuse
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
# a user who set glibc's malloc through the environment has chosen; those settings are kept
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")  # preloaded in glibc's place, they keep blocks themselves


def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Keep freed blocks of up to `mmap_threshold` bytes, and up to `trim_threshold` free bytes, in
    glibc's heap for reuse instead of returning them to the OS (process-wide; `fxsketch.load` and
    `fxsketch.optimize` call it). Returns whether it was applied: False off glibc, under a
    preloaded jemalloc, tcmalloc or mimalloc, or when the environment already sets glibc's malloc
    (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, GLIBC_TUNABLES)."""
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive number of bytes, got {value!r}")
    if mmap_threshold > MMAP_THRESHOLD:
        raise ValueError(f"mmap_threshold may be at most {MMAP_THRESHOLD} bytes (glibc's limit), got {mmap_threshold}")
    if trim_threshold >= 1 << 31:
        raise ValueError(f"trim_threshold must be below 2**31 bytes (glibc takes an int), got {trim_threshold}")
    if not running_glibc():
        return False
    preloaded = [lib for lib in _OTHER_ALLOCATORS if lib in os.environ.get("LD_PRELOAD", "")]
    if preloaded:
        log.debug("allocator left alone: %s is preloaded", preloaded[0])
        return False
    chosen = [name for name in _USER_SETTINGS if name in os.environ]
    if chosen:
        log.debug("allocator left as the environment sets it (%s)", ", ".join(chosen))
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    log.debug("glibc malloc: mmap threshold %d, trim threshold %d bytes (%s)", mmap_threshold, trim_threshold,
              "set" if applied else "refused")
    return applied


def running_glibc() -> bool:
    """Whether this process runs on glibc (asked of the C library itself: no file is read)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), or a libc that does not know the name
        return False
