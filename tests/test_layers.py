"""Every layer: forward against an independent NumPy computation, backward
against numerical gradients in float64, on every backend."""

import pickle
import re

import numpy as np
import pytest
from helpers import arr, check_backward, labels, to_np

from xpnet import layers
from xpnet.backend import backend_of
from xpnet.gradient_check import eval_numerical_gradient, rel_error
from xpnet.layer_utils import (
    affine_norm_relu_dropout_backward,
    affine_norm_relu_dropout_forward,
    affine_relu_backward,
    affine_relu_forward,
)


# ---------------------------------------------------------------- affine / relu
def test_affine_forward_matches_numpy(backend, np_rng):
    x = np_rng.standard_normal((4, 2, 3))
    w = np_rng.standard_normal((6, 5))
    b = np_rng.standard_normal(5)
    out, _ = layers.affine_forward(arr(backend, x), arr(backend, w), arr(backend, b))
    assert backend_of(out) == backend
    np.testing.assert_allclose(to_np(out), x.reshape(4, 6) @ w + b, rtol=1e-12)


def test_affine_backward(backend, np_rng):
    x = arr(backend, np_rng.standard_normal((5, 2, 3)))
    w = arr(backend, np_rng.standard_normal((6, 4)))
    b = arr(backend, np_rng.standard_normal(4))
    dout = arr(backend, np_rng.standard_normal((5, 4)))
    _, cache = layers.affine_forward(x, w, b)
    dx, dw, db = layers.affine_backward(dout, cache)
    assert tuple(dx.shape) == (5, 2, 3) and tuple(dw.shape) == (6, 4) and tuple(db.shape) == (4,)
    check_backward(backend, lambda x, w, b: layers.affine_forward(x, w, b)[0], (x, w, b), (dx, dw, db), dout)


def test_affine_rejects_mismatched_shapes(backend):
    x = arr(backend, np.ones((2, 5)))
    with pytest.raises(ValueError, match=r"flattens to 5 features but w \(4, 3\) expects 4$"):
        layers.affine_forward(x, arr(backend, np.ones((4, 3))), arr(backend, np.ones(3)))
    # one example without its batch dimension: (5,) is five rows of one feature
    with pytest.raises(ValueError, match=r"x \(5,\) flattens to 1 features .* give a batch of one: x\[None\]$"):
        layers.affine_forward(arr(backend, np.ones(5)), arr(backend, np.ones((5, 3))), arr(backend, np.ones(3)))
    with pytest.raises(ValueError, match="b"):
        layers.affine_forward(x, arr(backend, np.ones((5, 3))), arr(backend, np.ones(2)))


def test_relu_forward_and_backward(backend, np_rng):
    x_np = np_rng.standard_normal((6, 7))
    x = arr(backend, x_np)
    out, cache = layers.relu_forward(x)
    np.testing.assert_array_equal(to_np(out), np.where(x_np > 0, x_np, 0.0))
    dout = arr(backend, np_rng.standard_normal((6, 7)))
    dx = layers.relu_backward(dout, cache)
    check_backward(backend, lambda x: layers.relu_forward(x)[0], (x,), (dx,), dout)


def test_affine_relu_sandwich(backend, np_rng):
    x = arr(backend, np_rng.standard_normal((3, 4)))
    w = arr(backend, np_rng.standard_normal((4, 5)))
    b = arr(backend, np_rng.standard_normal(5))
    dout = arr(backend, np_rng.standard_normal((3, 5)))
    _, cache = affine_relu_forward(x, w, b)
    grads = affine_relu_backward(dout, cache)
    check_backward(backend, lambda x, w, b: affine_relu_forward(x, w, b)[0], (x, w, b), grads, dout)


# ---------------------------------------------------------------- losses
def reference_softmax_loss(x, y):
    n = x.shape[0]
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return -np.log(p[np.arange(n), y]).mean()


def reference_svm_loss(x, y):
    total = 0.0
    for scores, label in zip(x, y):
        for j, s in enumerate(scores):
            if j != label:
                total += max(0.0, s - scores[label] + 1.0)
    return total / x.shape[0]


@pytest.mark.parametrize(
    "loss_fn, reference",
    [(layers.softmax_loss, reference_softmax_loss), (layers.svm_loss, reference_svm_loss)],
)
def test_losses_match_reference_and_gradients(backend, np_rng, loss_fn, reference):
    x_np = np_rng.standard_normal((8, 5))
    y_np = np_rng.integers(0, 5, 8)
    x, y = arr(backend, x_np), labels(backend, y_np)
    loss, dx = loss_fn(x, y)
    assert tuple(loss.shape) == () and backend_of(loss) == backend
    assert abs(float(loss) - reference(x_np, y_np)) < 1e-12
    numeric = eval_numerical_gradient(lambda _: loss_fn(x, y)[0], x, verbose=False)
    assert rel_error(numeric, dx) < 1e-8


def test_softmax_loss_is_stable_for_huge_scores(backend):
    x = arr(backend, [[1000.0, 0.0, -1000.0], [0.0, 2000.0, 0.0]])
    loss, dx = layers.softmax_loss(x, labels(backend, [0, 1]))
    assert float(loss) == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.isfinite(to_np(dx)))


def test_softmax_loss_of_uniform_scores_is_log_c(backend):
    loss, _ = layers.softmax_loss(arr(backend, np.zeros((4, 10))), labels(backend, [0, 3, 9, 2]))
    assert float(loss) == pytest.approx(np.log(10), rel=1e-14)


@pytest.mark.parametrize(
    "loss_fn, reference",
    [(layers.softmax_loss, reference_softmax_loss), (layers.svm_loss, reference_svm_loss)],
)
def test_a_masked_class_leaves_the_losses_finite(backend, np_rng, loss_fn, reference):
    """A score of -inf (a class masked out) is a class with no chance: the loss is that of the
    other classes, and the masked one gets no gradient (PyTorch's cross_entropy agrees)."""
    x_np = np_rng.standard_normal((6, 5))
    y_np = np.array([0, 1, 2, 3, 4, 0])
    x_np[[0, 2, 4], [3, 4, 1]] = -np.inf  # never on a label
    loss, dx = loss_fn(arr(backend, x_np), labels(backend, y_np))
    kept = np.isfinite(x_np)
    expected = np.mean(
        [
            reference(row[keep][None], [np.flatnonzero(keep).tolist().index(label)])
            for row, keep, label in zip(x_np, kept, y_np)
        ]
    )
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    dx_np = to_np(dx)
    assert np.all(dx_np[~kept] == 0) and np.all(np.isfinite(dx_np))
    _, dx_kept = loss_fn(arr(backend, np.where(kept, x_np, -1e4)), labels(backend, y_np))  # a finite mask
    np.testing.assert_allclose(dx_np, to_np(dx_kept), rtol=1e-12, atol=1e-300)


def test_label_smoothing_gives_a_masked_class_an_infinite_loss(backend):
    """With label smoothing every class has a target, so a masked class costs inf, as in PyTorch."""
    loss, _ = layers.softmax_loss(arr(backend, [[0.0, -np.inf, 1.0]]), labels(backend, [0]), label_smoothing=0.1)
    assert float(loss) == np.inf


@pytest.mark.parametrize("loss_fn", [layers.softmax_loss, layers.svm_loss])
def test_losses_reject_bad_labels(backend, loss_fn):
    x = arr(backend, np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"labels must be \(3,\)"):
        loss_fn(x, labels(backend, [0, 1]))
    with pytest.raises(TypeError, match="labels must be integers"):
        loss_fn(x, arr(backend, [0.0, 1.0, 2.0]))
    with pytest.raises(TypeError, match=f"{loss_fn.__name__}: y must be an array, got list"):
        loss_fn(x, [0, 1, 2])
    with pytest.raises(ValueError, match=r"scores must be \(N, C\)"):
        loss_fn(arr(backend, np.zeros(3)), labels(backend, [0, 1, 2]))
    # the arguments swapped were named as integer scores, "x must be a floating-point array"
    with pytest.raises(TypeError, match=rf"^{loss_fn.__name__}: the scores come first .* got x \(3,\) and y \(3, 4\)"):
        loss_fn(labels(backend, [0, 1, 2]), x)


# ---------------------------------------------------------------- batchnorm
def test_batchnorm_train_forward_normalises_and_updates_running_stats(backend, np_rng):
    x_np = 5 + 3 * np_rng.standard_normal((200, 4))
    gamma_np, beta_np = np.array([1.0, 2.0, 0.5, 3.0]), np.array([0.0, -1.0, 4.0, 0.5])
    bn_param = {"mode": "train", "momentum": 0.8}
    out, _ = layers.batchnorm_forward(arr(backend, x_np), arr(backend, gamma_np), arr(backend, beta_np), bn_param)
    expected = gamma_np * (x_np - x_np.mean(0)) / np.sqrt(x_np.var(0) + 1e-5) + beta_np
    np.testing.assert_allclose(to_np(out), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_np(bn_param["running_mean"]), 0.2 * x_np.mean(0), rtol=1e-12)
    np.testing.assert_allclose(to_np(bn_param["running_var"]), 0.2 * x_np.var(0), rtol=1e-12)


def test_batchnorm_running_averages_converge_and_drive_test_mode(backend, np_rng):
    bn_param = {"mode": "train"}
    gamma, beta = arr(backend, np.ones(3)), arr(backend, np.zeros(3))
    for _ in range(100):
        x = arr(backend, 2.0 + 4.0 * np_rng.standard_normal((100, 3)))
        layers.batchnorm_forward(x, gamma, beta, bn_param)
    np.testing.assert_allclose(to_np(bn_param["running_mean"]), 2.0, atol=0.3)
    np.testing.assert_allclose(to_np(bn_param["running_var"]), 16.0, rtol=0.15)
    bn_param["mode"] = "test"
    x_np = 2.0 + 4.0 * np_rng.standard_normal((500, 3))
    out, _ = layers.batchnorm_forward(arr(backend, x_np), gamma, beta, bn_param)
    expected = (x_np - to_np(bn_param["running_mean"])) / np.sqrt(to_np(bn_param["running_var"]) + 1e-5)
    np.testing.assert_allclose(to_np(out), expected, rtol=1e-12)
    assert abs(to_np(out).mean()) < 0.15 and abs(to_np(out).std() - 1.0) < 0.15


@pytest.mark.parametrize("backward", [layers.batchnorm_backward, layers.batchnorm_backward_alt])
def test_batchnorm_backward(backend, np_rng, backward):
    x = arr(backend, 3 + 2 * np_rng.standard_normal((6, 4)))
    gamma = arr(backend, np_rng.standard_normal(4))
    beta = arr(backend, np_rng.standard_normal(4))
    dout = arr(backend, np_rng.standard_normal((6, 4)))
    _, cache = layers.batchnorm_forward(x, gamma, beta, {"mode": "train"})
    grads = backward(dout, cache)

    def forward(x, gamma, beta):
        return layers.batchnorm_forward(x, gamma, beta, {"mode": "train"})[0]

    check_backward(backend, forward, (x, gamma, beta), grads, dout, tol=1e-6)


def _normalized_in_float64(x, axes):
    """x normalised along ``axes`` in float64 from x's own float32 values (eps 1e-5)."""
    wide = x.astype(np.float64)
    centered = wide - wide.mean(axis=axes, keepdims=True)
    return centered / np.sqrt((centered * centered).mean(axis=axes, keepdims=True) + 1e-5)


@pytest.mark.parametrize(
    "layer, shape, axes",
    [
        ("batchnorm_forward", (1024, 8), (0,)),
        ("layernorm_forward", (8, 1024), (1,)),
        ("spatial_batchnorm_forward", (32, 4, 16, 16), (0, 2, 3)),
        ("spatial_groupnorm_forward", (4, 8, 16, 16), (2,)),
    ],
)
def test_float32_normalisation_keeps_its_digits_for_values_far_from_zero(backend, np_rng, layer, shape, axes):
    """The mean was one float32 pass: NumPy adds down a column a row at a time, and values
    near 1000 with a spread of 1 came out of batchnorm off by 5e-4 (PyTorch's CPU: 2.5e-4),
    and of spatial batchnorm, at 100, off by 3e-4; float32 rounding of the result is 6e-8."""
    x = (np_rng.standard_normal(shape) + 1000).astype(np.float32)
    c = shape[1]
    ones, zeros = (backend.asarray(np.full(c, v), dtype="float32") for v in (1.0, 0.0))
    given = backend.asarray(x, dtype="float32")
    if layer == "spatial_groupnorm_forward":
        ones, zeros = (backend.xp.reshape(v, (1, c, 1, 1)) for v in (ones, zeros))
        out, _ = layers.spatial_groupnorm_forward(given, ones, zeros, 2, {})
        expected = _normalized_in_float64(x.reshape(shape[0], 2, -1), axes).reshape(shape)
    else:
        out, _ = getattr(layers, layer)(given, ones, zeros, {"mode": "train"})
        expected = _normalized_in_float64(x, axes)
    np.testing.assert_allclose(to_np(out), expected, rtol=0, atol=4e-6)


def test_batchnorm_backward_forms_agree(backend, np_rng):
    x = arr(backend, np_rng.standard_normal((50, 30)))
    gamma, beta = arr(backend, np_rng.standard_normal(30)), arr(backend, np_rng.standard_normal(30))
    dout = arr(backend, np_rng.standard_normal((50, 30)))
    _, cache = layers.batchnorm_forward(x, gamma, beta, {"mode": "train"})
    for a, b in zip(layers.batchnorm_backward(dout, cache), layers.batchnorm_backward_alt(dout, cache)):
        assert rel_error(a, b) < 1e-9


def test_batchnorm_rejects_bad_mode_and_shapes(backend):
    x, g = arr(backend, np.ones((2, 3))), arr(backend, np.ones(3))
    with pytest.raises(ValueError, match="^batchnorm_forward: invalid batchnorm mode 'eval'"):
        layers.batchnorm_forward(x, g, g, {"mode": "eval"})
    with pytest.raises(ValueError, match=r"gamma and beta must be \(3,\)"):
        layers.batchnorm_forward(x, arr(backend, np.ones(2)), g, {"mode": "train"})
    # Conv activations given to the (N, D) layers: the spatial layer is named.
    x4 = arr(backend, np.ones((2, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\); for \(N, C, H, W\) images use spatial_batchnorm_forward$"):
        layers.batchnorm_forward(x4, g, g, {"mode": "train"})
    with pytest.raises(ValueError, match=r"for \(N, C, H, W\) images use spatial_groupnorm_forward \(G=1 normalises"):
        layers.layernorm_forward(x4, g, g, {})
    with pytest.raises(ValueError, match=r"x must be \(N, D\), got shape \(3,\)$"):  # no hint
        layers.batchnorm_forward(g, g, g, {"mode": "train"})


PARAM_DICTS = [  # (layer call on x (4, 3) and x4 (2, 3, 2, 2), a misspelt key, what the message names)
    (lambda x, x4, d: layers.batchnorm_forward(x, None, x[0, :], d), "momentun", "batchnorm_forward: bn_param"),
    (lambda x, x4, d: layers.layernorm_forward(x, x[0, :], x[0, :], d), "epsilon", "layernorm_forward: ln_param"),
    (lambda x, x4, d: layers.dropout_forward(x, d), "prob", "dropout_forward: dropout_param"),
    (lambda x, x4, d: layers.spatial_batchnorm_forward(x4, None, x[0, :], d), "mod", "spatial_batchnorm_forward: bn_param"),
    (lambda x, x4, d: layers.spatial_groupnorm_forward(x4, x4[:1, :, :1, :1], x4[:1, :, :1, :1], 1, d), "G",
     "spatial_groupnorm_forward: gn_param"),
    (lambda x, x4, d: layers.max_pool_forward_naive(x4, d), "pool_heigth", "max_pool_forward_naive: pool_param"),
]  # fmt: skip


@pytest.mark.parametrize("call, misspelt, named", PARAM_DICTS)
def test_a_misspelt_key_in_a_parameter_dict_is_refused_not_ignored(backend, call, misspelt, named):
    # Every key is optional, so an ignored misspelling would train with the default in silence.
    x, x4 = arr(backend, np.arange(12.0).reshape(4, 3)), arr(backend, np.arange(24.0).reshape(2, 3, 2, 2))
    call(x, x4, {})  # the defaults are accepted
    with pytest.raises(ValueError, match=rf"{named} has unknown key\(s\) '{misspelt}'; it takes '"):
        call(x, x4, {misspelt: 1})
    with pytest.raises(TypeError, match=rf"{named} must be a dict, got list"):
        call(x, x4, [misspelt])


# Settings whose values cannot be right: (layer call on x (4, 3) and x4 (2, 3, 2, 2), its dict's
# name as the message gives it, the key). eps <= 0 makes a constant feature 0/0; a momentum
# above 1 makes the running averages grow without bound.
NORM_SETTINGS = [
    (lambda x, x4, d: layers.batchnorm_forward(x, None, x[0, :], d), "batchnorm_forward: bn_param"),
    (lambda x, x4, d: layers.layernorm_forward(x, x[0, :], x[0, :], d), "layernorm_forward: ln_param"),
    (lambda x, x4, d: layers.spatial_batchnorm_forward(x4, None, x[0, :], d), "spatial_batchnorm_forward: bn_param"),
    (lambda x, x4, d: layers.spatial_groupnorm_forward(x4, x4[:1, :, :1, :1], x4[:1, :, :1, :1], 1, d),
     "spatial_groupnorm_forward: gn_param"),
]  # fmt: skip


@pytest.mark.parametrize("call, named", NORM_SETTINGS)
def test_normalisation_settings_that_cannot_be_right_are_refused(backend, call, named):
    x, x4 = arr(backend, np.ones((4, 3))), arr(backend, np.ones((2, 3, 2, 2)))  # constant: eps alone divides
    for eps in (0.0, -1e-5, float("nan"), "1e-5", True):
        with pytest.raises(
            ValueError, match=rf"{named}\['eps'\] must be a finite number > 0, got {re.escape(repr(eps))}"
        ):
            call(x, x4, {"eps": eps})
    out, _ = call(x, x4, {"eps": np.float32(1e-3)})  # NumPy's numbers are numbers
    assert np.isfinite(to_np(out)).all()
    if "bn_param" in named:
        for momentum in (1.5, -0.1, "0.9"):
            with pytest.raises(ValueError, match=rf"{named}\['momentum'\] must be a number in \[0, 1\]"):
                call(x, x4, {"momentum": momentum})


def test_running_averages_of_another_size_are_refused(backend):
    x = arr(backend, np.ones((4, 3)))
    stale = {"mode": "test", "running_mean": arr(backend, np.zeros(4)), "running_var": arr(backend, np.ones(4))}
    with pytest.raises(ValueError, match=r"bn_param\['running_mean'\] has shape \(4,\), but the input has 3 features"):
        layers.batchnorm_forward(x, None, x[0, :], stale)


@pytest.mark.parametrize(
    "function, x_shape",
    [
        (layers.batchnorm_forward, (4, 3)),
        (layers.spatial_batchnorm_forward, (2, 3, 2, 2)),
        (layers.spatial_batchnorm_gelu_forward, (2, 3, 2, 2)),
    ],
)
def test_running_averages_that_are_not_float_arrays_are_refused_by_name(backend, function, x_shape):
    """A list failed with "'list' object has no attribute 'shape'", and an integer array in
    train mode inside the in-place update of the averages ('Cannot cast ufunc')."""
    x = arr(backend, np.ones(x_shape))
    gamma, beta = arr(backend, np.ones(3)), arr(backend, np.zeros(3))
    name = function.__name__
    for mean, words in (
        ([0.0, 0.0, 0.0], r"must be an array, got list"),
        (backend.asarray(np.zeros(3, dtype=np.int64)), r"must be a floating-point array, got dtype int64"),
    ):
        bn_param = {"mode": "train", "running_mean": mean, "running_var": arr(backend, np.ones(3))}
        with pytest.raises(TypeError, match=rf"^{name}: bn_param\['running_mean'\] {words}"):
            function(x, gamma, beta, bn_param)


def test_a_dropout_probability_must_be_a_number(backend):
    with pytest.raises(ValueError, match=r"dropout probability p must be in \[0, 1\), got '0.5'"):
        layers.dropout_forward(arr(backend, np.ones((2, 3))), {"mode": "train", "p": "0.5"})


# ---------------------------------------------------------------- layernorm
def test_layernorm_forward_normalises_each_sample(backend, np_rng):
    x_np = 3 + 2 * np_rng.standard_normal((4, 6))
    gamma_np, beta_np = np_rng.standard_normal(6), np_rng.standard_normal(6)
    out, _ = layers.layernorm_forward(arr(backend, x_np), arr(backend, gamma_np), arr(backend, beta_np), {})
    mean, var = x_np.mean(1, keepdims=True), x_np.var(1, keepdims=True)
    np.testing.assert_allclose(to_np(out), gamma_np * (x_np - mean) / np.sqrt(var + 1e-5) + beta_np, rtol=1e-10)


def test_layernorm_backward(backend, np_rng):
    x = arr(backend, 3 + 2 * np_rng.standard_normal((4, 5)))
    gamma, beta = arr(backend, np_rng.standard_normal(5)), arr(backend, np_rng.standard_normal(5))
    dout = arr(backend, np_rng.standard_normal((4, 5)))
    _, cache = layers.layernorm_forward(x, gamma, beta, {})
    grads = layers.layernorm_backward(dout, cache)
    forward = lambda x, gamma, beta: layers.layernorm_forward(x, gamma, beta, {})[0]  # noqa: E731
    check_backward(backend, forward, (x, gamma, beta), grads, dout, tol=1e-6)


# ---------------------------------------------------------------- dropout
@pytest.mark.parametrize("p", [0.25, 0.5, 0.75])
def test_dropout_statistics(backend, p):
    x = arr(backend, 10 + np.zeros((500, 400)))
    out, _ = layers.dropout_forward(x, {"mode": "train", "p": p, "seed": 1})
    out_np = to_np(out)
    dropped = np.mean(out_np == 0)
    assert abs(dropped - p) < 0.01
    np.testing.assert_allclose(out_np[out_np != 0], 10 / (1 - p), rtol=1e-12)  # inverted dropout scaling
    assert abs(out_np.mean() - 10) < 0.1
    test_out, _ = layers.dropout_forward(x, {"mode": "test", "p": p})
    np.testing.assert_array_equal(to_np(test_out), to_np(x))


def test_dropout_of_float16_activations_draws_its_mask_in_float32(backend):
    """Generators draw float32 or float64: float16 activations failed on NumPy ('no NumPy dtype
    for float16') and CuPy, and drew a float16 uniform on PyTorch, which cannot tell p = 0.3
    from 0.2998. The mask now comes from a float32 draw, the output stays float16."""
    if not hasattr(backend.xp, "float16"):
        pytest.skip(f"{backend.name} has no float16")
    x = backend.xp.astype(arr(backend, np.full((400, 500), 2.0)), backend.xp.float16)
    out, cache = layers.dropout_forward(x, {"mode": "train", "p": 0.3, "seed": 2})
    assert out.dtype == backend.xp.float16
    kept = to_np(out) != 0
    assert abs(1 - kept.mean() - 0.3) < 0.005
    np.testing.assert_allclose(to_np(out)[kept].astype(np.float64), 2.0 / 0.7, rtol=2**-10)  # float16's rounding
    dx = layers.dropout_backward(x, cache)
    assert dx.dtype == backend.xp.float16 and np.array_equal(to_np(dx) != 0, kept)


def test_dropout_seed_fixes_mask_and_no_seed_varies(backend):
    x = arr(backend, np.ones((50, 40)))
    a, _ = layers.dropout_forward(x, {"mode": "train", "p": 0.5, "seed": 4})
    b, _ = layers.dropout_forward(x, {"mode": "train", "p": 0.5, "seed": 4})
    c, _ = layers.dropout_forward(x, {"mode": "train", "p": 0.5})
    d, _ = layers.dropout_forward(x, {"mode": "train", "p": 0.5})
    np.testing.assert_array_equal(to_np(a), to_np(b))
    assert not np.array_equal(to_np(c), to_np(d))


def test_dropout_p_zero_is_identity(backend):
    x = arr(backend, np.arange(6.0))
    out, cache = layers.dropout_forward(x, {"mode": "train", "p": 0.0})
    np.testing.assert_array_equal(to_np(out), np.arange(6.0))
    np.testing.assert_array_equal(to_np(layers.dropout_backward(x, cache)), np.arange(6.0))


def test_dropout_backward(backend, np_rng):
    x = arr(backend, np_rng.standard_normal((10, 8)))
    param = {"mode": "train", "p": 0.3, "seed": 123}
    dout = arr(backend, np_rng.standard_normal((10, 8)))
    _, cache = layers.dropout_forward(x, param)
    dx = layers.dropout_backward(dout, cache)
    check_backward(backend, lambda x: layers.dropout_forward(x, param)[0], (x,), (dx,), dout)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_rejects_p_outside_unit_interval(backend, p):
    with pytest.raises(ValueError, match=r"^dropout_forward: dropout probability p must be in \[0, 1\)"):
        layers.dropout_forward(arr(backend, np.ones(3)), {"mode": "train", "p": p})
    with pytest.raises(ValueError, match=r"^dropout_forward: invalid dropout mode 'eval'"):
        layers.dropout_forward(arr(backend, np.ones(3)), {"mode": "eval", "p": 0.5})


@pytest.mark.parametrize("seed", [-1, "a", 1.5, True])
def test_dropout_names_a_seed_that_cannot_seed(backend, seed):
    x = backend.asarray(np.ones((2, 3)), dtype="float64")
    with pytest.raises(ValueError, match=r"dropout_param\['seed'\] must be None or a non-negative integer"):
        layers.dropout_forward(x, {"mode": "train", "p": 0.5, "seed": seed})


def test_dropout_names_an_rng_that_is_no_generator_of_its_backend(backend):
    """NumPy's own Generator failed inside the draw ("uniform() got an unexpected keyword argument
    'dtype'"), a seed with "'int' object has no attribute 'uniform'"."""
    import xpnet

    x = backend.asarray(np.ones((2, 3)), dtype="float64")
    name = r"^dropout_forward: dropout_param\['rng'\] "
    for rng, error, message in (
        (np.random.default_rng(0), TypeError, r"must be a generator of the backend, backend.rng\(seed\), got Generator$"),
        (3, TypeError, r"must be a generator .* got int; a seed goes in dropout_param\['seed'\]$"),
    ):  # fmt: skip
        with pytest.raises(error, match=name + message):
            layers.dropout_forward(x, {"mode": "train", "p": 0.5, "rng": rng})
    other = "numpy" if backend.name != "numpy" else "array_api_strict"
    with pytest.raises(ValueError, match=name + rf"draws on backend '{other}' but x lives on '{backend.name}'"):
        layers.dropout_forward(x, {"mode": "train", "p": 0.5, "rng": xpnet.get_backend(other).rng(0)})
    out, _ = layers.dropout_forward(x, {"mode": "train", "p": 0.5, "rng": backend.rng(0)})
    assert tuple(out.shape) == (2, 3)


# ---------------------------------------------------------------- hidden block
def test_the_hidden_block_names_itself_for_an_unknown_normalization():
    from xpnet.layer_utils import affine_norm_relu_dropout_forward

    x, w, b = np.ones((2, 3)), np.ones((3, 4)), np.zeros(4)
    with pytest.raises(ValueError, match="^affine_norm_relu_dropout_forward: unknown normalization 'groupnorm'"):
        affine_norm_relu_dropout_forward(x, w, b, np.ones(4), np.zeros(4), {}, "groupnorm")
    # an array there failed as "The truth value of an array ... is ambiguous"
    with pytest.raises(ValueError, match=r"^affine_norm_relu_dropout_forward: unknown normalization array\("):
        affine_norm_relu_dropout_forward(x, w, b, np.ones(4), np.zeros(4), {}, np.ones(4))


@pytest.mark.parametrize("normalization", [None, "batchnorm", "layernorm"])
def test_affine_norm_relu_dropout_block(backend, np_rng, normalization):
    x = arr(backend, np_rng.standard_normal((5, 4)))
    w = arr(backend, np_rng.standard_normal((4, 3)))
    b = arr(backend, np_rng.standard_normal(3))
    gamma, beta = arr(backend, np_rng.standard_normal(3)), arr(backend, np_rng.standard_normal(3))
    dout = arr(backend, np_rng.standard_normal((5, 3)))
    drop = {"mode": "train", "p": 0.2, "seed": 5}

    def forward(x, w, b, gamma, beta):
        return affine_norm_relu_dropout_forward(x, w, b, gamma, beta, {"mode": "train"}, normalization, drop)[0]

    _, cache = affine_norm_relu_dropout_forward(x, w, b, gamma, beta, {"mode": "train"}, normalization, drop)
    dx, dw, db, dgamma, dbeta = affine_norm_relu_dropout_backward(dout, cache)
    inputs, grads = [x, w, b], [dx, dw, db]
    if normalization is None:
        assert dgamma is None and dbeta is None
    else:
        inputs += [gamma, beta]
        grads += [dgamma, dbeta]
    if normalization == "batchnorm":  # b is cancelled by the batch mean: its gradient is 0
        assert float(backend.xp.max(backend.xp.abs(db))) < 1e-12
        inputs.pop(2)
        grads.pop(2)
        check = lambda x, w, gamma, beta: forward(x, w, b, gamma, beta)  # noqa: E731
    else:
        check = forward if normalization else (lambda x, w, b: forward(x, w, b, gamma, beta))
    check_backward(backend, check, inputs, grads, dout, tol=1e-6)


def test_dropout_after_np_random_seed_drops_the_units_the_course_drops():
    """cs231n's Dropout notebook (its p is the keep probability, xpnet's p = 1 − that): after
    np.random.seed(231) the means and the fractions of zeros it printed."""
    np.random.seed(231)
    x = np.random.randn(500, 500) + 10
    printed = {
        0.25: (10.014059116977283, 0.749784),
        0.4: (9.977917658761159, 0.600796),
        0.7: (9.987811912159426, 0.30074),
    }
    for keep, (mean, zeros) in printed.items():
        out, _ = layers.dropout_forward(x, {"mode": "train", "p": 1 - keep})
        assert (out == 0).mean() == zeros
        assert abs(out.mean() - mean) < 1e-13  # the scale 1 / (1 - p) may differ from 1 / keep by an ulp


def test_a_backward_pass_given_another_layers_cache_names_both():
    """Sandwich caches mixed up (conv_relu's for conv_relu_pool's, affine_relu's for affine's)
    failed in tuple unpacking, which says only how many values it expected."""
    from xpnet import fast_layers, layer_utils

    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((4, 3, 3, 3)), np.zeros(4)
    conv, pool = {"stride": 1, "pad": 1}, {"pool_height": 2, "pool_width": 2, "stride": 2}
    pooled, pool_cache = layer_utils.conv_relu_pool_forward(x, w, b, conv, pool)
    out, relu_cache = layer_utils.conv_relu_forward(x, w, b, conv)
    affine_out, affine_relu_cache = layer_utils.affine_relu_forward(x[:, 0, 0, :], rng.standard_normal((8, 3)), b[:3])
    _, batchnorm_cache = layers.spatial_batchnorm_forward(x, np.ones(3), np.zeros(3), {"mode": "train"})
    _, groupnorm_cache = layers.spatial_groupnorm_forward(x, np.ones((1, 3, 1, 1)), np.zeros((1, 3, 1, 1)), 3, {})
    for call, message in (
        (lambda: layer_utils.conv_relu_pool_backward(pooled, relu_cache),
         "conv_relu_pool_backward: cache comes from conv_relu_forward, not conv_relu_pool_forward"),
        (lambda: layer_utils.conv_relu_backward(out, pool_cache),
         "conv_relu_backward: cache comes from conv_relu_pool_forward, not conv_relu_forward"),
        (lambda: layers.affine_backward(affine_out, affine_relu_cache),
         "affine_backward: cache comes from affine_relu_forward, not affine_forward"),
        # a tuple of one's own: only its part count can be checked
        (lambda: layers.affine_backward(affine_out, tuple(affine_relu_cache)),
         "affine_backward: cache is a tuple of 2, not the 3 parts affine_forward returns"),
        (lambda: fast_layers.conv_backward_fast(out, (x, w)),
         "conv_backward_fast: cache is a tuple of 2, not the 5 parts conv_forward_fast returns"),
        (lambda: layers.max_pool_backward_naive(pooled, None), "max_pool_backward_naive: cache is NoneType"),
        # an activation's cache for another's: a ReLU cache of two rows unpacked as GELU's (x, cdf) and gave
        # numbers for a dout of one row; GELU's (x, cdf) reached relu_backward as "x must be an array"
        (lambda: layers.gelu_backward(x[0, 0, 0], layers.relu_forward(x[0, 0, :2])[1]),
         "gelu_backward: cache is ndarray, not the 2 parts gelu_forward returns"),
        (lambda: layers.relu_backward(x, layers.gelu_forward(x)[1]),
         "relu_backward: cache is a tuple of 2, not the array relu_forward returns"),
        # one normalisation's cache for another's: "too many values to unpack (expected 2)" and the like
        (lambda: layers.spatial_batchnorm_backward(x, groupnorm_cache),
         "spatial_batchnorm_backward: cache comes from spatial_groupnorm_forward, not spatial_batchnorm_forward"),
        (lambda: layers.spatial_batchnorm_gelu_backward(x, groupnorm_cache),
         "spatial_batchnorm_gelu_backward: cache comes from spatial_groupnorm_forward, not spatial_batchnorm_gelu"),
        (lambda: layers.spatial_groupnorm_backward(x, batchnorm_cache),
         "spatial_groupnorm_backward: cache comes from spatial_batchnorm_forward, not spatial_groupnorm_forward"),
        (lambda: layers.batchnorm_backward(x.reshape(2, -1), batchnorm_cache),
         "batchnorm_backward: cache comes from spatial_batchnorm_forward, not batchnorm_forward"),
        # an untagged tuple of as many parts: its x̂ is of another shape than dout
        (lambda: layers.layernorm_backward(x.reshape(2, -1), tuple(batchnorm_cache)),
         r"layernorm_backward: dout has shape \(2, 192\) but x has shape \(2, 3, 8, 8\)"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            call()


def _layer_pairs():
    """Each public forward pass with its backward pass: name -> (backward, out, cache), on NumPy."""
    from xpnet import fast_layers, layer_utils

    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((4, 3, 8, 8)), rng.standard_normal((3, 3, 3, 3)), np.zeros(3)
    rows, w_rows, b_rows = rng.standard_normal((4, 6)), rng.standard_normal((6, 6)), np.zeros(6)
    conv, pool = {"stride": 1, "pad": 1}, {"pool_height": 2, "pool_width": 2, "stride": 2}
    g, beta, g_rows, beta_rows = np.ones(3), np.zeros(3), np.ones(6), np.zeros(6)
    drop = {"p": 0.5, "mode": "train"}

    def train():  # a fresh bn_param each: a forward pass keeps its running averages there
        return {"mode": "train"}

    forwards = {
        "affine": (layers.affine_backward, lambda: layers.affine_forward(rows, w_rows, b_rows)),
        "relu": (layers.relu_backward, lambda: layers.relu_forward(rows)),
        "gelu": (layers.gelu_backward, lambda: layers.gelu_forward(rows)),
        "batchnorm": (layers.batchnorm_backward, lambda: layers.batchnorm_forward(rows, g_rows, beta_rows, train())),
        "layernorm": (layers.layernorm_backward, lambda: layers.layernorm_forward(rows, g_rows, beta_rows, {})),
        "dropout": (layers.dropout_backward, lambda: layers.dropout_forward(rows, drop)),
        "conv_naive": (layers.conv_backward_naive, lambda: layers.conv_forward_naive(x, w, b, conv)),
        "conv_fast": (fast_layers.conv_backward_fast, lambda: fast_layers.conv_forward_fast(x, w, b, conv)),
        "pool_naive": (layers.max_pool_backward_naive, lambda: layers.max_pool_forward_naive(x, pool)),
        "pool_fast": (fast_layers.max_pool_backward_fast, lambda: fast_layers.max_pool_forward_fast(x, pool)),
        "spatial_batchnorm": (layers.spatial_batchnorm_backward,
                              lambda: layers.spatial_batchnorm_forward(x, g, beta, train())),
        "spatial_batchnorm_gelu": (layers.spatial_batchnorm_gelu_backward,
                                   lambda: layers.spatial_batchnorm_gelu_forward(x, g, beta, train())),
        "spatial_groupnorm": (layers.spatial_groupnorm_backward,
                              lambda: layers.spatial_groupnorm_forward(x, g[None, :, None, None],
                                                                       beta[None, :, None, None], 3, {})),
        "affine_relu": (layer_utils.affine_relu_backward, lambda: layer_utils.affine_relu_forward(rows, w_rows, b_rows)),
        "affine_norm_relu_dropout": (layer_utils.affine_norm_relu_dropout_backward,
                                     lambda: layer_utils.affine_norm_relu_dropout_forward(
                                         rows, w_rows, b_rows, g_rows, beta_rows, train(), "batchnorm", drop)),
        "conv_relu": (layer_utils.conv_relu_backward, lambda: layer_utils.conv_relu_forward(x, w, b, conv)),
        "conv_relu_pool": (layer_utils.conv_relu_pool_backward,
                           lambda: layer_utils.conv_relu_pool_forward(x, w, b, conv, pool)),
        "conv_bn_relu": (layer_utils.conv_bn_relu_backward,
                         lambda: layer_utils.conv_bn_relu_forward(x, w, b, g, beta, conv, train())),
        "conv_bn_relu_pool": (layer_utils.conv_bn_relu_pool_backward,
                              lambda: layer_utils.conv_bn_relu_pool_forward(x, w, b, g, beta, conv, train(), pool)),
    }  # fmt: skip
    return {name: (backward, *forward()) for name, (backward, forward) in forwards.items()}


def _unless_refused_by_name(backward, dout, cache, message: str, given: str) -> list:
    """[] when ``backward(dout, cache)`` raises a ValueError or TypeError that starts with its own
    name and ``message``; else one line saying what it did with what it was ``given``."""
    try:
        backward(dout, cache)
    except (ValueError, TypeError) as error:
        return (
            []
            if str(error).startswith(f"{backward.__name__}: {message}")
            else [f"{backward.__name__} given {given}: {error}"]
        )
    return [f"{backward.__name__} took {given}"]


def unnamed_cache_mixups(pairs) -> list:
    """What each backward pass of ``pairs`` (:func:`_layer_pairs`) did with every other layer's
    cache, where it did not refuse it under its own name; [] when each did."""
    unnamed = []
    for taker, (backward, dout, _) in pairs.items():
        for maker, (_, _, cache) in pairs.items():
            if maker != taker:
                unnamed += _unless_refused_by_name(backward, dout, cache, "cache ", f"{maker}'s cache")
    return unnamed


def test_every_backward_pass_names_itself_when_given_any_other_layers_cache():
    """A cache of as many parts as the backward pass's own passed the part count and failed in its
    arithmetic ("'dict' object has no attribute 'shape'", "operands could not be broadcast"), or
    gave numbers (batchnorm_backward given layernorm's cache, dropout_backward given GELU's)."""
    pairs = _layer_pairs()
    assert unnamed_cache_mixups(pairs) == []
    # still a tuple that pickles (to another process, say) and comes back as the same kind
    backward, dout, cache = pairs["conv_relu_pool"]
    again = pickle.loads(pickle.dumps(cache))
    assert type(again) is type(cache) and isinstance(again, tuple) and len(again) == len(cache)
    np.testing.assert_array_equal(backward(dout, again)[1], backward(dout, cache)[1])
    # the closed-form batchnorm backward pass takes batchnorm_forward's cache, as the course's does
    backward, dout, cache = pairs["batchnorm"]
    for got, expected in zip(layers.batchnorm_backward_alt(dout, cache), backward(dout, cache)):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_every_backward_pass_names_itself_when_dout_is_no_float_array_of_the_caches_library():
    """dout was checked by its shape only in 15 of the 20 backward passes: a list failed as "'list'
    object has no attribute 'shape'", another library's array inside that library ("Expected Array
    or Python scalar") or under the name of a layer inside a sandwich, and integers or a square
    np.matrix gave numbers (dropout_backward multiplied the matrix by its mask as matrices)."""
    import array_api_strict

    unnamed = []
    for backward, out, cache in _layer_pairs().values():
        out = np.asarray(out)
        wrong = {
            "a list": (out.tolist(), "dout must be an array, got list"),
            "integers": (out.astype(np.int64), "dout must be a floating-point array, got dtype int64"),
            "array_api_strict": (
                array_api_strict.asarray(out),
                "arrays from different libraries (dout from array_api_strict",
            ),
        }
        if out.ndim == 2:
            wrong["np.matrix"] = (np.matrix(out), "dout is a matrix: np.matrix's * and ** are matrix products")
        for kind, (dout, message) in wrong.items():
            unnamed += _unless_refused_by_name(backward, dout, cache, message, kind)
    assert unnamed == []


def test_a_sandwich_given_the_cache_of_a_forward_pass_in_test_mode_names_itself():
    """The batchnorm layer inside refused it, naming itself: batchnorm_backward_alt (which the
    caller never called) for affine_norm_relu_dropout's, spatial_batchnorm_backward for the conv ones'."""
    from xpnet import layer_utils

    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((4, 3, 3, 3)), np.zeros(4)
    g, beta, conv = np.ones(4), np.zeros(4), {"stride": 1, "pad": 1}
    pool = {"pool_height": 2, "pool_width": 2, "stride": 2}

    def test_mode():
        return {"mode": "test", "running_mean": np.zeros(4), "running_var": np.ones(4)}

    rows = x.reshape(2, -1)[:, :5]
    sandwiches = {
        "affine_norm_relu_dropout": (
            layer_utils.affine_norm_relu_dropout_backward,
            layer_utils.affine_norm_relu_dropout_forward(rows, rng.standard_normal((5, 4)), np.zeros(4), g, beta,
                                                         test_mode(), "batchnorm", {"p": 0.5, "mode": "test"})),
        "conv_bn_relu": (layer_utils.conv_bn_relu_backward,
                         layer_utils.conv_bn_relu_forward(x, w, b, g, beta, conv, test_mode())),
        "conv_bn_relu_pool": (layer_utils.conv_bn_relu_pool_backward,
                              layer_utils.conv_bn_relu_pool_forward(x, w, b, g, beta, conv, test_mode(), pool)),
    }  # fmt: skip
    for name, (backward, (out, cache)) in sandwiches.items():
        with pytest.raises(
            ValueError, match=rf"^{name}_backward: the cache is None, which a forward pass in test mode"
        ):
            backward(np.ones_like(out), cache)


def test_every_public_forward_pass_with_a_tuple_cache_says_which_it_is():
    """A forward pass added without ``@makes_cache`` would hand out caches that only their part count
    can check; relu_forward's cache is its input array, which relu_backward checks as one."""
    from xpnet import fast_layers, layer_utils

    forwards = {name: getattr(module, name) for module in (layers, layer_utils, fast_layers)
                for name in module.__all__ if "_forward" in name}  # fmt: skip
    assert len(forwards) == 23
    assert [name for name, f in forwards.items() if not hasattr(f, "__wrapped__")] == ["relu_forward"]


def test_a_sandwich_given_a_dout_of_another_shape_names_itself_and_its_output():
    """conv_relu_pool_backward given the unpooled shape was refused by relu_backward inside it,
    naming a shape the caller never saw as x's."""
    from xpnet import layer_utils

    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((4, 3, 3, 3)), np.zeros(4)
    g, beta, bn = np.ones(4), np.zeros(4), {"mode": "train"}
    conv, pool = {"stride": 1, "pad": 1}, {"pool_height": 2, "pool_width": 2, "stride": 2}
    unpooled, pooled = np.ones((2, 4, 8, 8)), np.ones((2, 4, 4, 4))
    x2, w2 = rng.standard_normal((2, 6)), rng.standard_normal((6, 5))
    out_of = {  # name: (its backward pass, the cache of its forward pass, a dout of another shape, its output's shape)
        "conv_relu_pool": (layer_utils.conv_relu_pool_backward,
                           layer_utils.conv_relu_pool_forward(x, w, b, conv, pool)[1], unpooled, (2, 4, 4, 4)),
        "conv_relu": (layer_utils.conv_relu_backward, layer_utils.conv_relu_forward(x, w, b, conv)[1], pooled,
                      (2, 4, 8, 8)),
        "conv_bn_relu": (layer_utils.conv_bn_relu_backward,
                         layer_utils.conv_bn_relu_forward(x, w, b, g, beta, conv, bn)[1], pooled, (2, 4, 8, 8)),
        "conv_bn_relu_pool": (layer_utils.conv_bn_relu_pool_backward,
                              layer_utils.conv_bn_relu_pool_forward(x, w, b, g, beta, conv, bn, pool)[1], unpooled,
                              (2, 4, 4, 4)),
        "affine_relu": (layer_utils.affine_relu_backward, layer_utils.affine_relu_forward(x2, w2, np.zeros(5))[1],
                        np.ones((5, 2)), (2, 5)),
        "affine_norm_relu_dropout": (layer_utils.affine_norm_relu_dropout_backward,
                                     layer_utils.affine_norm_relu_dropout_forward(x2, w2, np.zeros(5))[1],
                                     np.ones((5, 2)), (2, 5)),
    }  # fmt: skip
    for name, (backward, cache, dout, shape) in out_of.items():
        message = f"{name}_backward: dout has shape {dout.shape}, expected {shape} (the forward pass's output)"
        with pytest.raises(ValueError, match=re.escape(message)):
            backward(dout, cache)
