import re
import warnings

import numpy as np
import pytest
from array_api_compat import array_namespace
from helpers import to_np

from xpnet import layers
from xpnet.gradient_check import (
    eval_numerical_gradient,
    eval_numerical_gradient_array,
    grad_check_sparse,
    rel_error,
    rounding_floor,
)


def test_rel_error_on_scalars_and_arrays(backend):
    assert rel_error(1.0, 1.0) == 0.0
    assert rel_error(1.0, 3.0) == pytest.approx(0.5)
    x = backend.asarray([1.0, 2.0, 0.0], dtype="float64")
    y = backend.asarray([1.0, 2.2, 0.0], dtype="float64")
    assert rel_error(x, y) == pytest.approx(0.2 / 4.2)
    # a number beside an array (array-api-strict refused it)
    assert rel_error(x[:2], 2.0) == pytest.approx(1.0 / 3.0)
    assert rel_error(1.0, x[:2]) == pytest.approx(1.0 / 3.0)
    with pytest.raises(ValueError, match="shapes differ"):
        rel_error(x, backend.asarray([1.0], dtype="float64"))


def test_rel_error_of_empty_arrays_is_zero(backend):
    """No element differs; NumPy's max over nothing raised "zero-size array to reduction operation"."""
    empty = backend.asarray(np.zeros((0, 3)))
    assert rel_error(empty, empty) == 0.0
    assert rel_error(empty, 1.0) == 0.0


def test_rel_error_names_an_argument_that_is_no_array():
    """Two lists failed in x - y as "unsupported operand type(s) for -: 'list' and 'list'"."""
    with pytest.raises(TypeError, match=r"rel_error: x must be an array or a number, got list \(np.asarray\(x\)"):
        rel_error([1.0, 2.0], [1.0, 2.1])
    with pytest.raises(TypeError, match="rel_error: y must be an array or a number, got str"):
        rel_error(np.ones(2), "1.0")


def test_rel_error_floor_ignores_rounding_sized_elements():
    x, y = np.array([1.0, 1e-9]), np.array([1.0, 2e-9])
    assert rel_error(x, y) > 0.05
    assert rel_error(x, y, floor=1e-4) < 1e-4


def test_rounding_floor_scales_with_loss_and_step():
    assert rounding_floor(2.3, h=1e-5) == pytest.approx(4 * 2.220446049250313e-16 * 2.3 / 1e-5 / 1e-6)
    assert rounding_floor(0.1, h=1e-5) == rounding_floor(1.0, h=1e-5)
    assert rounding_floor(np.array(2.3)) == rounding_floor(2.3)
    # model.loss(X, y) without its [0]: "float() argument must be a string or a real number, not 'tuple'"
    with pytest.raises(TypeError, match=r"^rounding_floor: f_value must be the loss, one number, got tuple; a model's"):
        rounding_floor((2.3, {}))
    with pytest.raises(TypeError, match=r"^rounding_floor: f_value must be the loss, one number, got ndarray$"):
        rounding_floor(np.ones(3))


def test_numerical_gradient_of_known_function(backend):
    x_np = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
    x = backend.asarray(x_np, dtype="float64")
    xp = backend.xp
    grad = eval_numerical_gradient(lambda v: xp.sum(v**3), x, verbose=False)
    np.testing.assert_allclose(to_np(grad), 3 * x_np**2, rtol=1e-8, atol=1e-9)
    np.testing.assert_array_equal(to_np(x), x_np)  # restored after perturbation


def test_numerical_gradient_array_of_known_function(backend):
    x_np = np.array([0.5, -1.5, 2.0])
    df_np = np.array([1.0, 2.0, -3.0])
    x, df = backend.asarray(x_np, dtype="float64"), backend.asarray(df_np, dtype="float64")
    grad = eval_numerical_gradient_array(lambda v: backend.xp.sin(v), x, df)
    np.testing.assert_allclose(to_np(grad), np.cos(x_np) * df_np, rtol=1e-8)


def test_grad_check_sparse_finds_right_and_wrong_gradients(backend, capsys):
    x_np = np.linspace(-1, 1, 12).reshape(3, 4)
    x = backend.asarray(x_np, dtype="float64")
    f = lambda v: backend.xp.sum(v * v)  # noqa: E731
    good = grad_check_sparse(f, x, backend.asarray(2 * x_np, dtype="float64"), num_checks=5, seed=0)
    assert len(good) == 5 and max(good) < 1e-8
    assert "relative error" in capsys.readouterr().out
    bad = grad_check_sparse(f, x, backend.asarray(3 * x_np + 1, dtype="float64"), num_checks=5, seed=0, verbose=False)
    assert min(bad) > 0.1


def test_numerical_gradient_needs_floats(backend):
    with pytest.raises(TypeError, match="floating-point"):
        eval_numerical_gradient(lambda v: v, backend.asarray(np.array([1, 2], dtype=np.int64)), verbose=False)


def test_numerical_gradients_need_a_step_above_zero(backend):
    x = backend.asarray(np.ones(2), dtype="float64")
    calls = [
        ("eval_numerical_gradient", lambda h: eval_numerical_gradient(lambda v: xp_sum(v), x, verbose=False, h=h)),
        ("eval_numerical_gradient_array", lambda h: eval_numerical_gradient_array(lambda v: v, x, x, h=h)),
        ("grad_check_sparse", lambda h: grad_check_sparse(lambda v: xp_sum(v), x, x, num_checks=1, h=h, verbose=False)),
    ]
    for name, call in calls:
        for h in (0, -1e-5, float("nan"), "1e-5"):
            with pytest.raises(
                ValueError, match=rf"{name}: the step h must be a finite number > 0, got {re.escape(repr(h))}"
            ):
                call(h)


def test_numerical_gradients_take_verbose_as_true_or_false(capsys):
    """verbose='False' printed every index: a string is truthy."""
    x = np.ones(2)
    with pytest.raises(ValueError, match="^eval_numerical_gradient: verbose must be True or False, got 'False'$"):
        eval_numerical_gradient(lambda v: float(np.sum(v)), x, verbose="False")
    with pytest.raises(ValueError, match="^grad_check_sparse: verbose must be True or False, got 'no'$"):
        grad_check_sparse(lambda v: float(np.sum(v)), x, x, num_checks=1, verbose="no")
    assert capsys.readouterr().out == ""


def test_numerical_gradients_name_an_f_or_df_of_the_wrong_shape(backend):
    """An array-valued f given to the scalar checkers failed inside float(); a df that broadcasts
    against f(x) weighted the wrong sum without a word."""
    x = backend.asarray(np.ones((2, 3)), dtype="float64")
    with pytest.raises(TypeError, match=r"eval_numerical_gradient: f must return a scalar .*shape \(2, 3\)"):
        eval_numerical_gradient(lambda v: v * v, x, verbose=False)
    with pytest.raises(TypeError, match=r"grad_check_sparse: f must return a scalar"):
        grad_check_sparse(lambda v: v * v, x, x, num_checks=1, verbose=False)
    with pytest.raises(ValueError, match=r"f\(x\) has shape \(2, 3\) but df \(3,\)"):
        eval_numerical_gradient_array(lambda v: 2 * v, x, backend.asarray(np.ones(3), dtype="float64"))


def test_numerical_gradients_name_the_course_slips(backend):
    """f = lambda W: model.loss(X, y) returns (loss, grads); a list for x, a missing df, an
    analytic gradient of another shape: each failed inside float(), NumPy or an index."""
    x = backend.asarray(np.ones((2, 3)), dtype="float64")
    with pytest.raises(TypeError, match=r"got a tuple of 2; take the loss from it, e.g. f = lambda W: model\.loss"):
        eval_numerical_gradient(lambda v: (backend.xp.sum(v * v), {"W": v}), x, verbose=False)
    with pytest.raises(TypeError, match="grad_check_sparse: f must return a scalar .*got NoneType"):
        grad_check_sparse(lambda v: None, x, x, num_checks=1, verbose=False)
    with pytest.raises(TypeError, match="eval_numerical_gradient: x must be an array, got list$"):
        eval_numerical_gradient(lambda v: 0.0, [1.0, 2.0], verbose=False)
    # (x, f) in the wrong order, and an f that is no function (it failed as "'float' object is not callable")
    for check in (eval_numerical_gradient, grad_check_sparse):
        with pytest.raises(
            TypeError, match=rf"^{check.__name__}: x must be an array, got function; the function comes"
        ):
            check(x, lambda v: 0.0, verbose=False) if check is eval_numerical_gradient else check(x, lambda v: 0.0, x)
    with pytest.raises(TypeError, match=r"^eval_numerical_gradient_array: f must be a function of x, got float$"):
        eval_numerical_gradient_array(3.0, x, x)
    with pytest.raises(TypeError, match="eval_numerical_gradient_array: df must be an array of f\\(x\\)'s shape"):
        eval_numerical_gradient_array(lambda v: 2 * v, x, None)
    with pytest.raises(ValueError, match=r"grad_check_sparse: analytic_grad must have x's shape \(2, 3\), got \(3,\)"):
        grad_check_sparse(lambda v: backend.xp.sum(v), x, x[0, :], num_checks=1, verbose=False)
    # f = lambda x: affine_forward(x, w, b), without the [0]: 'tuple' object has no attribute 'shape'.
    w, b = backend.asarray(np.ones((3, 4)), dtype="float64"), backend.asarray(np.zeros(4), dtype="float64")
    dout = backend.asarray(np.ones((2, 4)), dtype="float64")
    with pytest.raises(
        TypeError, match=r"got a tuple of 2; a forward pass returns \(out, cache\): take the output, e\.g\. f = "
    ):
        eval_numerical_gradient_array(lambda v: layers.affine_forward(v, w, b), x, dout)
    with pytest.raises(TypeError, match="eval_numerical_gradient_array: f must return an array, got list"):
        eval_numerical_gradient_array(lambda v: [1.0, 2.0], x, dout)
    # No checks at all passed in silence; a float count failed inside range().
    for count in (0, -1, 2.5):
        with pytest.raises(ValueError, match=f"grad_check_sparse: num_checks must be a positive integer, got {count}"):
            grad_check_sparse(lambda v: backend.xp.sum(v), x, x, num_checks=count, verbose=False)


def test_numerical_gradients_warn_below_float64(backend):
    x = backend.asarray(np.ones(3), dtype="float32")
    with pytest.warns(RuntimeWarning, match="eval_numerical_gradient: x is .*float32.*check gradients in float64"):
        grad = eval_numerical_gradient(lambda v: xp_sum(v * v), x, verbose=False)
    np.testing.assert_allclose(to_np(grad), 2.0, rtol=1e-2)  # only near the truth, as the warning says


def test_numerical_gradients_name_a_read_only_x():
    """x is moved in place and back, as in the course: a memory-mapped or broadcast x failed with
    NumPy's "assignment destination is read-only", naming no function."""
    x = np.broadcast_to(np.arange(3.0), (2, 3))
    for check in (
        lambda: eval_numerical_gradient(lambda v: float(np.sum(v**2)), x, verbose=False),
        lambda: eval_numerical_gradient_array(lambda v: v * 2, x, np.ones((2, 3))),
        lambda: grad_check_sparse(lambda v: float(np.sum(v**2)), x, np.zeros((2, 3)), num_checks=2, verbose=False),
    ):
        with pytest.raises(ValueError, match=r"^\w+: x is read-only.*x.copy\(\)"):
            check()
    np.testing.assert_allclose(eval_numerical_gradient(lambda v: float(np.sum(v**2)), x.copy(), verbose=False), 2 * x)


def test_numerical_gradients_take_big_endian_float64_without_a_warning():
    """It is as precise as float64, so the warning about float32's rounding was wrong there."""
    x = np.arange(3.0).astype(">f8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad = eval_numerical_gradient(lambda v: float(np.sum(v**3)), x, verbose=False)
    np.testing.assert_allclose(grad, 3 * np.arange(3.0) ** 2, rtol=1e-8, atol=1e-8)


def xp_sum(v):
    return array_namespace(v).sum(v)
