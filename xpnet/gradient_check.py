"""Numerical gradients by centred differences, for arrays of any backend.

Use float64 inputs: in float32 the rounding error of ``f`` swamps the
difference quotient. Each function perturbs ``x`` in place, one element at a
time, so ``f`` may ignore its argument and read ``x`` through a closure (as in
``lambda _: model.loss(X, y)[0]``).
"""

from __future__ import annotations

import itertools
import math
import random
import warnings

from array_api_compat import array_namespace, device, is_array_api_obj

from .backend import namespace
from .input_checks import as_int, check_flag, check_writable, is_array, is_number

__all__ = [
    "rel_error",
    "eval_numerical_gradient",
    "eval_numerical_gradient_array",
    "grad_check_sparse",
    "rounding_floor",
]


def rel_error(x, y, floor=1e-8) -> float:
    """Largest elementwise relative error ``|x - y| / max(floor, |x| + |y|)`` as a Python float.

    ``floor`` keeps elements that are zero up to rounding from dominating;
    see :func:`rounding_floor` for the right one when ``x`` is a numerical gradient.
    """
    for name, value in (("x", x), ("y", y)):
        if not (is_array(value) or is_number(value)):  # a list would fail in x - y, or broadcast on NumPy only
            raise TypeError(
                f"rel_error: {name} must be an array or a number, got {type(value).__name__} "
                f"(np.asarray({name}) makes one)"
            )
    if not (is_array_api_obj(x) or is_array_api_obj(y)):
        return abs(x - y) / max(floor, abs(x) + abs(y))
    xp = array_namespace(*(a for a in (x, y) if is_array_api_obj(a)))
    if is_array_api_obj(x) and is_array_api_obj(y) and tuple(x.shape) != tuple(y.shape):
        raise ValueError(f"rel_error: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    like = x if is_array_api_obj(x) else y
    # A number as a 0-d array beside the other: xp.abs of a float fails in array-api-strict.
    x, y = (a if is_array_api_obj(a) else xp.asarray(a, device=device(like)) for a in (x, y))
    diff = xp.abs(x - y) / xp.maximum(xp.abs(x) + xp.abs(y), floor)
    if 0 in tuple(diff.shape):  # no element differs (NumPy's max of nothing raises)
        return 0.0
    return float(xp.max(diff))


def rounding_floor(f_value, h=1e-5, rtol=1e-6, eps=2.220446049250313e-16) -> float:
    """The smallest gradient magnitude whose centred difference can be trusted to ``rtol``.

    Each of the two evaluations of ``f`` is rounded to about ``eps * |f|``, so
    the difference quotient carries an absolute error of up to about
    ``2 * eps * |f| / h`` (twice that for safety); an element smaller than
    that error divided by ``rtol`` cannot be checked to a relative ``rtol``.
    Pass the result as ``floor`` to :func:`rel_error`.
    """
    if not (is_number(f_value) or is_array(f_value) and f_value.ndim == 0):  # float() named neither
        hint = "; a model's loss(X, y) returns (loss, grads): take its [0]" if isinstance(f_value, tuple) else ""
        raise TypeError(f"rounding_floor: f_value must be the loss, one number, got {type(f_value).__name__}{hint}")
    return 4.0 * eps * max(abs(float(f_value)), 1.0) / h / rtol


def _indices(shape):
    return itertools.product(*(range(n) for n in shape))


def _evaluate_both_sides(f, x, index, h):
    """``(f(x + h·e_i), f(x - h·e_i))``, restoring ``x[index]`` afterwards."""
    # A copy: in CuPy (unlike NumPy) x[index] is a 0-d view that the writes below would change.
    old = namespace(x).asarray(x[index], copy=True)
    x[index] = old + h
    plus = f(x)
    x[index] = old - h
    minus = f(x)
    x[index] = old
    return plus, minus


def _check_float(name, f, x, h):
    """x's namespace, after checking that f is a function, that x holds floats and that the
    step h is a number > 0; warns for x narrower than float64."""
    if not is_array(x):
        swapped = "; the function comes first, (f, x)" if callable(x) and is_array(f) else ""
        raise TypeError(f"{name}: x must be an array, got {type(x).__name__}{swapped}")
    if not callable(f):  # it failed at the first evaluation: "'float' object is not callable"
        raise TypeError(f"{name}: f must be a function of x, got {type(f).__name__}")
    xp = array_namespace(x)
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{name}: x must be a floating-point array, got dtype {x.dtype}")
    if not is_number(h) or not math.isfinite(h) or h <= 0:
        raise ValueError(f"{name}: the step h must be a finite number > 0, got {h!r}")
    check_writable(name, "x", x, "the centred difference moves each entry of x in place and back")
    if xp.finfo(x.dtype).eps > xp.finfo(xp.float64).eps:  # not !=: NumPy's big-endian float64 is as precise
        warnings.warn(
            f"{name}: x is {x.dtype}: the rounding of f swamps a centred difference with step {h:g} "
            "(errors near 1e-3 of the gradient); check gradients in float64 (a model's dtype='float64')",
            RuntimeWarning,
            stacklevel=3,
        )
    return xp


def _scalar(name, value) -> float:
    """``f``'s value as a float, or a TypeError saying that ``f`` must return one number."""
    if isinstance(value, tuple):  # the usual slip: a model's loss(X, y) returns (loss, grads)
        raise TypeError(
            f"{name}: f must return a scalar (the loss), got a tuple of {len(value)}; "
            "take the loss from it, e.g. f = lambda W: model.loss(X, y)[0]"
        )
    if is_array(value) and tuple(value.shape) != ():
        raise TypeError(
            f"{name}: f must return a scalar (the loss), got an array of shape {tuple(value.shape)}; "
            "for an array-valued f use eval_numerical_gradient_array(f, x, df)"
        )
    if not (is_array(value) or is_number(value)):
        raise TypeError(f"{name}: f must return a scalar (the loss), got {type(value).__name__}")
    return float(value)


def eval_numerical_gradient(f, x, verbose=True, h=1e-5):
    """Gradient of a scalar function ``f(x)`` by centred differences.

    Args:
        f: function of one argument returning a scalar (a 0-d array or a float).
        x: array at which to evaluate the gradient; modified in place and restored.
        verbose: print each index and its gradient.
        h: step size.
    Returns:
        grad, an array like ``x``.
    """
    xp = _check_float("eval_numerical_gradient", f, x, h)
    verbose = check_flag("eval_numerical_gradient: verbose", verbose)  # 'False' is truthy
    grad = xp.zeros_like(x)
    for index in _indices(x.shape):
        plus, minus = _evaluate_both_sides(f, x, index, h)
        grad[index] = (_scalar("eval_numerical_gradient", plus) - _scalar("eval_numerical_gradient", minus)) / (2 * h)
        if verbose:
            print(index, float(grad[index]))
    return grad


def eval_numerical_gradient_array(f, x, df, h=1e-5):
    """Gradient of ``sum(f(x) * df)`` with respect to ``x``, for array-valued ``f``.

    Args:
        f: function of one argument returning an array of the shape of ``df``.
        x: input array, modified in place and restored.
        df: upstream gradient.
    Returns:
        grad, an array like ``x``.
    """
    xp = _check_float("eval_numerical_gradient_array", f, x, h)
    if not is_array(df):
        raise TypeError(f"eval_numerical_gradient_array: df must be an array of f(x)'s shape, got {type(df).__name__}")
    grad = xp.zeros_like(x)
    for index in _indices(x.shape):
        plus, minus = _evaluate_both_sides(f, x, index, h)
        if isinstance(plus, tuple):  # the usual slip: a forward pass returns (out, cache)
            raise TypeError(
                f"eval_numerical_gradient_array: f must return an array (the output), got a tuple of {len(plus)}; "
                "a forward pass returns (out, cache): take the output, e.g. f = lambda x: affine_forward(x, w, b)[0]"
            )
        if not is_array(plus):
            raise TypeError(f"eval_numerical_gradient_array: f must return an array, got {type(plus).__name__}")
        if tuple(plus.shape) != tuple(df.shape):  # a df that broadcasts would weight the wrong sum
            raise ValueError(
                f"eval_numerical_gradient_array: f(x) has shape {tuple(plus.shape)} but df {tuple(df.shape)}"
            )
        grad[index] = xp.sum((plus - minus) * df) / (2 * h)
    return grad


def grad_check_sparse(f, x, analytic_grad, num_checks=10, h=1e-5, seed=None, verbose=True):
    """Compare ``analytic_grad`` with centred differences at ``num_checks`` random elements.

    Returns:
        the list of relative errors, one per element checked.
    """
    _check_float("grad_check_sparse", f, x, h)
    verbose = check_flag("grad_check_sparse: verbose", verbose)
    if not is_array(analytic_grad) or tuple(analytic_grad.shape) != tuple(x.shape):
        got = tuple(analytic_grad.shape) if is_array(analytic_grad) else type(analytic_grad).__name__
        raise ValueError(f"grad_check_sparse: analytic_grad must have x's shape {tuple(x.shape)}, got {got}")
    checks = as_int(num_checks)
    if checks is None or checks < 1:
        raise ValueError(f"grad_check_sparse: num_checks must be a positive integer, got {num_checks!r}")
    picker = random.Random(seed)
    errors = []
    for _ in range(checks):
        index = tuple(picker.randrange(n) for n in x.shape)
        plus, minus = _evaluate_both_sides(f, x, index, h)
        numeric = (_scalar("grad_check_sparse", plus) - _scalar("grad_check_sparse", minus)) / (2 * h)
        analytic = float(analytic_grad[index])
        error = rel_error(numeric, analytic)
        errors.append(error)
        if verbose:
            print(f"numerical: {numeric:f} analytic: {analytic:f}, relative error: {error:e}")
    return errors
