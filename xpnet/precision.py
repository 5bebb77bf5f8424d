"""Half-precision activations: float16 storage, float32 arithmetic.

A net may run its layers on float16 copies of its float32 parameters (on NumPy,
CuPy and PyTorch, whose namespaces have float16; the array API standard has no
half type). Each layer then computes in float32 and rounds only what it stores:
matrix products sum in float32 (as cuBLAS does with float16 inputs), batchnorm's
statistics and the exact GELU are evaluated in float32. These two helpers are
how the reference layers do it; the fused CuPy kernels do the same in registers.
"""

from __future__ import annotations

from .array_types import Array

__all__ = ["is_half", "widened", "narrowed"]


def is_half(xp, x: Array) -> bool:
    """Whether x holds float16 values."""
    return hasattr(xp, "float16") and x.dtype == xp.float16


def widened(xp, x: Array) -> Array:
    """x as float32 if it is float16 (a new array), else x itself (None stays None)."""
    return xp.astype(x, xp.float32) if x is not None and is_half(xp, x) else x


def narrowed(xp, x: Array, dtype) -> Array:
    """x rounded to ``dtype`` if it has another dtype, else x itself."""
    return x if x.dtype == dtype else xp.astype(x, dtype)
