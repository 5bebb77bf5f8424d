"""Special functions the array API lacks, written with its elementwise functions only:
``erf``, ``erfc`` and the standard normal's cdf and pdf (for the exact GELU).

Accurate to a few ulp in float64 (``erfc`` in relative terms too, where it is small):
a series with positive terms for |z| <= 1.5, and a continued fraction for the tail beyond.
"""

from __future__ import annotations

import math

from .array_types import Array
from .backend import namespace

__all__ = ["erf", "erfc", "normal_cdf", "normal_pdf"]

_SPLIT = 1.5
_SERIES_TERMS = 45  # |z| <= 1.5: the terms fall below 1e-17 of the sum before this
_FRACTION_DEPTH = 100  # |z| >= 1.5: converged to double precision


def _erf_series(xp, z):
    """erf(z) for 0 <= z <= 1.5: (2/√π) e^(-z²) Σ (2z²)^n z / (1·3·…·(2n+1)), every term positive."""
    two_z2 = 2.0 * z * z
    term, total = z, z
    for n in range(1, _SERIES_TERMS):
        term = term * two_z2 / (2 * n + 1)
        total = total + term
    return (2.0 / math.sqrt(math.pi)) * xp.exp(-z * z) * total


def _erfc_fraction(xp, z):
    """erfc(z) for z >= 1.5: e^(-z²)/√π · 1/(z + (1/2)/(z + 1/(z + (3/2)/(z + ...))))."""
    tail = z
    for k in range(_FRACTION_DEPTH, 0, -1):
        tail = z + (k / 2.0) / tail
    return xp.exp(-z * z) / (math.sqrt(math.pi) * tail)


def erf(x: Array) -> Array:
    """The error function, elementwise (float32 or float64)."""
    xp = namespace(x)
    z = xp.abs(x)
    near = _erf_series(xp, xp.minimum(z, _SPLIT))
    far = 1.0 - _erfc_fraction(xp, xp.maximum(z, _SPLIT))
    return xp.sign(x) * xp.where(z <= _SPLIT, near, far)


def erfc(x: Array) -> Array:
    """1 - erf(x), accurate in relative terms where it is small (x large)."""
    xp = namespace(x)
    tail = _erfc_fraction(xp, xp.maximum(x, _SPLIT))
    return xp.where(x >= _SPLIT, tail, 1.0 - erf(xp.minimum(x, _SPLIT)))


def normal_cdf(x: Array) -> Array:
    """Φ(x), the standard normal's cumulative distribution: erfc(-x/√2) / 2."""
    return 0.5 * erfc(-x / math.sqrt(2.0))


def normal_pdf(x: Array) -> Array:
    """φ(x) = e^(-x²/2) / √(2π)."""
    xp = namespace(x)
    return xp.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
