"""Special functions the array API lacks, written with its elementwise functions only:
``erf``, ``erfc`` and the standard normal's cdf and pdf (for the exact GELU).

W. J. Cody's rational Chebyshev approximations (Math. Comp. 23, 1969; the SPECFUN
routine CALERF), accurate to a few ulp in float64, ``erfc`` in relative terms too where
it is small: erf(x) = x·P(x²)/Q(x²) for |x| <= 0.46875; erfc(y) = e^(-y²)·P(y)/Q(y) for
0.46875 < y <= 4; erfc(y) = e^(-y²)/y·(1/√π + R(1/y²)/y²) beyond. e^(-y²) is computed as
e^(-t²)·e^(-(y - t)(y + t)) with t = y rounded down to 1/16, so that the rounding of y²
does not cost precision. Every range is evaluated for every element and the right one
selected: about 80 elementwise operations. On NumPy they run on blocks of about
``xpnet.cache_blocks.BLOCK`` elements at a time, so that those passes stay in the cache
(about twice as fast on millions of values, and the same results), and a block with no
value beyond 4 skips that range's 30 or so operations (activations almost never reach
it); other backends take the array whole, a GPU with no decision that would wait for
the device. On the CPU float32 values are computed in float64 and rounded: correctly
rounded, where float32 arithmetic through these rationals is off by several units in the
last place.
"""

from __future__ import annotations

import math

from .array_types import Array
from .cache_blocks import map_blocks
from .input_checks import layer_namespace

__all__ = ["erf", "erfc", "normal_cdf", "normal_pdf"]

_SMALL = 0.46875
_MIDDLE = 4.0
_A = (3.16112374387056560e00, 1.13864154151050156e02, 3.77485237685302021e02, 3.20937758913846947e03,
      1.85777706184603153e-1)  # fmt: skip
_B = (2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03, 2.84423683343917062e03)
_C = (5.64188496988670089e-1, 8.88314979438837594e00, 6.61191906371416295e01, 2.98635138197400131e02,
      8.81952221241769090e02, 1.71204761263407058e03, 2.05107837782607147e03, 1.23033935479799725e03,
      2.15311535474403846e-8)  # fmt: skip
_D = (1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02, 1.62138957456669019e03,
      3.29079923573345963e03, 4.36261909014324716e03, 3.43936767414372164e03, 1.23033935480374942e03)  # fmt: skip
_P = (3.05326634961232344e-1, 3.60344899949804439e-1, 1.25781726111229246e-1, 1.60837851487422766e-2,
      6.58749161529837803e-4, 1.63153871373020978e-2)  # fmt: skip
_Q = (2.56852019228982242e00, 1.87295284992346725e00, 5.27905102951428412e-1, 6.05183413124413191e-2,
      2.33520497626869185e-3)  # fmt: skip
_INV_SQRT_PI = 5.6418958354775628695e-1


def _rational(y, lead, num_coeffs, den_coeffs):
    """(lead·yⁿ + a₀·yⁿ⁻¹ + … + aₙ₋₁) / (yⁿ + b₀·yⁿ⁻¹ + … + bₙ₋₁) by Horner's rule, in place
    on two fresh arrays: each step a pass over memory, none an allocation."""
    num = lead * y
    for a in num_coeffs[:-1]:
        num += a
        num *= y
    num += num_coeffs[-1]
    den = y + den_coeffs[0]
    for b in den_coeffs[1:]:
        den *= y
        den += b
    num /= den
    return num


def _erf_small(x):
    """erf(x) for |x| <= 0.46875."""
    ratio = _rational(x * x, _A[4], _A[:4], _B)
    ratio *= x
    return ratio


def _erfc_large(xp, y, on_host):
    """erfc(y) for y > 0.46875 (both of Cody's outer ranges, the right one selected; on the
    host only the middle one where no y is beyond it: the same values, a third of the work less)."""
    if on_host and not bool(xp.any(y > _MIDDLE)):  # NaN compares False: it stays NaN either way
        rational = _rational(y, _C[8], _C[:8], _D)
    else:
        y = xp.minimum(y, 30.0)  # erfc(30) underflows to 0 in float64; and inf - inf would be NaN below
        middle = _rational(xp.minimum(y, _MIDDLE), _C[8], _C[:8], _D)
        tail_y = xp.maximum(y, _MIDDLE)
        inv2 = 1.0 / (tail_y * tail_y)
        tail = _rational(inv2, _P[5], _P[:5], _Q)
        tail *= inv2
        tail = (_INV_SQRT_PI - tail) / tail_y
        rational = xp.where(y <= _MIDDLE, middle, tail)
    t = xp.trunc(y * 16.0) / 16.0
    result = xp.exp(-t * t)
    result *= xp.exp(-(y - t) * (y + t))
    result *= rational
    return result


def _erfc_for_single(xp, y):
    """erfc(y) for y >= 0 in float64 whose result is rounded to float32: the middle range's
    rational alone, times one exponential. Its relative error, 5e-12 at 0 and 3e-10 at 10 (where
    float32's normal numbers end), and float64's rounding of y² are far below float32's 6e-8."""
    y = xp.minimum(y, 30.0)  # erfc(30) is 0 even in float64; and inf would give inf/inf
    result = _rational(y, _C[8], _C[:8], _D)
    result *= xp.exp(-(y * y))
    return result


def _erf(xp, x, on_host, single=False):
    """erf on one block (the small range always: near 0, 1 - erfc would lose erf's digits)."""
    z = xp.abs(x)
    small = _erf_small(xp.minimum(z, _SMALL) * xp.sign(x))
    y = xp.maximum(z, _SMALL)
    large = xp.sign(x) * (1.0 - (_erfc_for_single(xp, y) if single else _erfc_large(xp, y, on_host)))
    return xp.where(z <= _SMALL, small, large)


def _erfc(xp, x, on_host, single=False):
    """erfc on one block; ``single``: x in float64, the result to be rounded to float32."""
    z = xp.abs(x)
    if single:
        tail = _erfc_for_single(xp, z)
        return xp.where(x > 0, tail, 2.0 - tail)
    tail = _erfc_large(xp, xp.maximum(z, _SMALL), on_host)
    large = xp.where(x > 0, tail, 2.0 - tail)
    return xp.where(z <= _SMALL, 1.0 - _erf_small(xp.minimum(z, _SMALL) * xp.sign(x)), large)


def _normal_cdf(xp, x, on_host, single=False):
    return 0.5 * _erfc(xp, -x / math.sqrt(2.0), on_host, single)


def _single_in_double_on_host(function):
    """``function(xp, block, on_host, single)`` as :func:`~xpnet.cache_blocks.map_blocks` calls it. On the host a
    float32 block is evaluated in float64 and rounded back: nearly always the correctly rounded
    value (float32 arithmetic through Cody's long rationals is off by up to 6 ulp), and what only
    float64 needs is left out (:func:`_erfc_for_single`), which pays for the wider arithmetic.
    A GPU keeps float32 (float64 is slow on many)."""

    def evaluate(xp, block, on_host):
        if on_host and block.dtype == xp.float32:
            return xp.astype(function(xp, xp.astype(block, xp.float64), on_host, True), xp.float32)
        return function(xp, block, on_host)

    return evaluate


def _elementwise(name: str, function, x: Array) -> Array:
    """``function`` over ``x`` in blocks, after checking that ``x`` holds floats: an integer
    array was written back into an integer buffer (erf(1) became 0) once it filled a block."""
    layer_namespace(name, {"x": x})
    return map_blocks(_single_in_double_on_host(function), x)


def erf(x: Array) -> Array:
    """The error function, elementwise (float32 or float64)."""
    return _elementwise("erf", _erf, x)


def erfc(x: Array) -> Array:
    """1 - erf(x), accurate in relative terms where it is small (x large)."""
    return _elementwise("erfc", _erfc, x)


def normal_cdf(x: Array) -> Array:
    """Φ(x), the standard normal's cumulative distribution: erfc(-x/√2) / 2."""
    return _elementwise("normal_cdf", _normal_cdf, x)


def normal_pdf(x: Array) -> Array:
    """φ(x) = e^(-x²/2) / √(2π)."""
    xp = layer_namespace("normal_pdf", {"x": x})
    return xp.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
