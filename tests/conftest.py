"""Test-wide setup: Triton kernels run under its CPU interpreter (set before triton is imported)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
