"""Host memory: keep freed NumPy buffers in the process instead of returning them to
the system on every free.

A training step on NumPy allocates and frees the same large temporaries every step
(im2col columns, activations, their gradients). glibc serves a request above its
mmap threshold with fresh pages from the kernel and hands them back on free, so
every step pays a page fault per 4 KiB touched: on a 2-core Xeon that made a conv
forward pass 2.8x and its backward pass 2x slower (benchmarks/RESULTS.md). Raising
the mmap threshold and the trim threshold lets freed buffers be reused; the cost is
that up to ``TRIM_THRESHOLD`` bytes of freed memory stay with the process.

Applied once, when the NumPy backend is imported, on glibc only. It is left alone when
``XPNET_HOST_ALLOCATOR=system`` or when the environment already sets glibc's own
``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (the user's choice wins); any
other value of ``XPNET_HOST_ALLOCATOR`` than ``tuned`` or ``system`` gets a warning and
leaves it alone too.
"""

from __future__ import annotations

import ctypes
import os
import warnings

__all__ = ["keep_freed_buffers", "host_allocator", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

MMAP_THRESHOLD = 128 << 20  # requests below this come from the reusable heap
TRIM_THRESHOLD = 512 << 20  # freed memory at the heap's top kept up to this
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_state = "not applied yet"


def host_allocator() -> str:
    """What :func:`keep_freed_buffers` did, in words (benchmarks record it)."""
    return _state


def keep_freed_buffers() -> str:
    """Raise glibc's mmap and trim thresholds for this process, unless the environment
    says otherwise or the C library is not glibc; returns what was done, in words."""
    global _state
    _state = _apply()
    return _state


def _apply() -> str:
    choice = os.environ.get("XPNET_HOST_ALLOCATOR", "tuned").strip().lower()
    if choice == "system":
        return "system defaults (XPNET_HOST_ALLOCATOR=system)"
    if choice != "tuned":
        # A warning, not an error: a typo in the environment must not make ``import xpnet`` fail.
        message = f"XPNET_HOST_ALLOCATOR must be 'tuned' or 'system', got {choice!r}; glibc's defaults are kept"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return f"system defaults (XPNET_HOST_ALLOCATOR={choice!r} is not a setting)"
    chosen = [name for name in _GLIBC_VARIABLES if name in os.environ]
    if chosen:
        return f"the environment's own settings ({', '.join(chosen)})"
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return "system defaults (not glibc)"
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):
        return "system defaults (not glibc)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return "system defaults (glibc refused the thresholds)"
    thresholds = f"glibc mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB"
    return f"freed buffers kept ({thresholds})"
