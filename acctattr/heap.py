"""Give the C heap's free pages back to the kernel (glibc ``malloc_trim``).

glibc keeps freed blocks resident for reuse. A stage's evaluation frees tensors of many
sizes between small long-lived allocations, so the heap's resident size drifted with the
number of stages: frozen's peak on a 10M model grew +0.7 to +0.9 checkpoints from 3 to 30
stages; with the heap trimmed after each optimizer state file is loaded and after each
stage's embedding and evaluation, +0.45 to +0.53; with no stage's files held between
stages either, less (bench/scale.py, README "Memory, dtypes and scale"). A no-op where
the C library has no ``malloc_trim`` (macOS, musl).
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any


def _trimmer() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_size_t,)
    fn.restype = ctypes.c_int
    return fn


_TRIM = _trimmer()


def trim() -> bool:
    """Return the heap's free pages to the kernel; True where anything was released."""
    return bool(_TRIM(0)) if _TRIM is not None else False
