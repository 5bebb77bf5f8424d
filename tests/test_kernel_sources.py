"""The CUDA kernels' source, run on the CPU (tests/cpu_kernels.py) against the
array-API reference on NumPy: their arithmetic and indexing are checked on every
machine with a C++ compiler, not only where a GPU is at hand (tests/test_gpu.py
runs the kernels themselves there)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from cpu_kernels import COMPILER, run_elementwise, run_reduction, run_single_thread

from xpnet import fast_layers, layers, optim
from xpnet.backend import kernel_sources as sources
from xpnet.fast_layers import _col2im, _im2col
from xpnet.spatial_norm import spatial_batchnorm_backward, spatial_batchnorm_forward

pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler to build the kernel sources with")

FLOATS = [np.float32, np.float64]


def tolerance(dtype):
    return {"rtol": 2e-6, "atol": 2e-6} if dtype == np.float32 else {"rtol": 1e-13, "atol": 1e-14}


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.mark.parametrize("dtype", FLOATS)
def test_relu_backward_and_bias_relu(rng, dtype):
    x = rng.standard_normal((5, 7)).astype(dtype)
    dout = rng.standard_normal((5, 7)).astype(dtype)
    b = rng.standard_normal(7).astype(dtype)
    dx = run_elementwise(sources.RELU_BACKWARD, dout, x, np.empty_like(x))
    np.testing.assert_array_equal(dx, layers.relu_backward(dout, x))
    out = run_elementwise(sources.BIAS_RELU, x, b, np.empty_like(x))
    np.testing.assert_array_equal(out, np.maximum(x + b, 0))


@pytest.mark.parametrize("dtype", FLOATS)
def test_gelu_forward_and_backward(rng, dtype):
    x = np.concatenate([rng.standard_normal(200) * 3, [0.0, -6.0, 6.0, -30.0, 30.0]]).astype(dtype)
    dout = rng.standard_normal(x.shape).astype(dtype)
    out, cdf = run_elementwise(sources.GELU_FORWARD, x, np.empty_like(x), np.empty_like(x))
    expected, cache = layers.gelu_forward(x)
    np.testing.assert_allclose(out, expected, **tolerance(dtype))
    np.testing.assert_allclose(cdf, cache[1], **tolerance(dtype))
    dx = run_elementwise(sources.GELU_BACKWARD, dout, x, cdf, np.empty_like(x))
    np.testing.assert_allclose(dx, layers.gelu_backward(dout, cache), **tolerance(dtype))


CONV_GEOMETRIES = [
    # (N, C, H, W), (KH, KW), stride, pad
    ((2, 3, 7, 7), (3, 3), 1, 1),
    ((2, 3, 9, 9), (3, 3), 2, 1),
    ((1, 2, 9, 8), (3, 2), 2, 0),  # non-square kernel, no padding
    ((2, 1, 5, 5), (5, 5), 1, 2),  # windows that see only padding along their rows
    ((3, 2, 6, 6), (2, 2), 2, 0),  # tiling, as the whitening layer
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape, kernel, stride, pad", CONV_GEOMETRIES)
def test_im2col_and_col2im_equal_the_reference(rng, dtype, shape, kernel, stride, pad):
    n, c, h, w = shape
    kh, kw = kernel
    h_out, w_out = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    x = rng.standard_normal(shape).astype(dtype)
    reference = _im2col(np, np.permute_dims(x, (1, 0, 2, 3)), kh, kw, stride, pad, h_out, w_out)
    cols = np.empty((c * kh * kw, n * h_out * w_out), dtype=dtype)
    geometry = (c, h, w, kh, kw, n, h_out, w_out, stride, pad)
    run_elementwise(sources.IM2COL, x, *geometry, cols)
    np.testing.assert_array_equal(cols, reference)

    dcols = rng.standard_normal(cols.shape).astype(dtype)
    expected = np.permute_dims(_col2im(np, dcols, (c, n, h, w), kh, kw, stride, pad, h_out, w_out), (1, 0, 2, 3))
    dx = run_elementwise(sources.COL2IM, dcols, *geometry, np.empty(shape, dtype=dtype))
    np.testing.assert_allclose(dx, expected, **tolerance(dtype))


def test_conv_through_the_kernel_columns_equals_the_naive_layer(rng):
    """im2col's column order is the one the GEMM with w.reshape(F, -1) needs."""
    x, w = rng.standard_normal((2, 3, 7, 7)), rng.standard_normal((4, 3, 3, 3))
    cols = np.empty((27, 2 * 4 * 4))
    run_elementwise(sources.IM2COL, x, 3, 7, 7, 3, 3, 2, 4, 4, 2, 1, cols)
    out = np.permute_dims((w.reshape(4, -1) @ cols).reshape(4, 2, 4, 4), (1, 0, 2, 3))
    expected, _ = layers.conv_forward_naive(x, w, np.zeros(4), {"stride": 2, "pad": 1})
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


RULES = {
    # rule: (kernel, the state keys in the kernel's argument order, the hyper-parameters in it)
    "sgd": (sources.SGD, (), ("learning_rate",)),
    "sgd_momentum": (sources.SGD_MOMENTUM, ("velocity",), ("learning_rate", "momentum")),
    "sgd_nesterov_momentum": (sources.SGD_NESTEROV, ("velocity",), ("learning_rate", "momentum")),
    "nesterov_sgd": (sources.NESTEROV_SGD, ("velocity",), ("learning_rate", "momentum", "weight_decay")),
    "rmsprop": (sources.RMSPROP, ("cache",), ("learning_rate", "decay_rate", "epsilon")),
}
HYPER = {"learning_rate": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "decay_rate": 0.95, "epsilon": 1e-8}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("rule", sorted(RULES))
def test_update_rules_equal_the_reference_over_three_steps(rng, dtype, rule):
    kernel, state_keys, hyper_keys = RULES[rule]
    w = rng.standard_normal((4, 5)).astype(dtype)
    w_ref, config = w.copy(), {key: HYPER[key] for key in hyper_keys}
    state = [np.zeros_like(w) for _ in state_keys]
    for _ in range(3):
        dw = rng.standard_normal(w.shape).astype(dtype)
        hyper = [dtype(config[key]) for key in hyper_keys]
        run_elementwise(kernel, dw, *hyper, w, *state)
        w_ref, config = optim.UPDATE_RULES[rule](w_ref, dw, config)
    np.testing.assert_allclose(w, w_ref, **tolerance(dtype))
    for key, value in zip(state_keys, state):
        np.testing.assert_allclose(value, config[key], **tolerance(dtype))


@pytest.mark.parametrize("dtype", FLOATS)
def test_adam_reads_its_step_count_from_memory(rng, dtype):
    w = rng.standard_normal((3, 4)).astype(dtype)
    m, v = np.zeros_like(w), np.zeros_like(w)
    w_ref, config = w.copy(), {"learning_rate": 1e-2}
    t = np.zeros((), dtype=np.int64)
    for _ in range(4):
        dw = rng.standard_normal(w.shape).astype(dtype)
        t += 1  # as CupyKernels.adam does on the device before the launch
        run_elementwise(sources.ADAM, dw, t, dtype(1e-2), dtype(0.9), dtype(0.999), dtype(1e-8), w, m, v)
        w_ref, config = optim.adam(w_ref, dw, config)
    np.testing.assert_allclose(w, w_ref, **tolerance(dtype))
    np.testing.assert_allclose(m, config["m"], **tolerance(dtype))
    np.testing.assert_allclose(v, config["v"], **tolerance(dtype))


@pytest.mark.parametrize("dtype", FLOATS)
def test_softmax_loss_kernel(rng, dtype):
    c_type = {np.float32: "float", np.float64: "double"}[dtype]
    source = sources.SOFTMAX_LOSS.replace("{T}", c_type).replace("{name}", c_type)
    x = (rng.standard_normal((6, 5)) * 4).astype(dtype)
    y = np.array([0, 4, 2, 2, 1, 3], dtype=np.int64)
    dx, loss = np.empty_like(x), np.empty((), dtype=dtype)
    run_single_thread(source, f"softmax_loss_{c_type}", x, y, ctypes.c_int(6), ctypes.c_int(5), dx, loss)
    expected_loss, expected_dx = layers.softmax_loss(x, y)
    np.testing.assert_allclose(loss, expected_loss, **tolerance(dtype))
    np.testing.assert_allclose(dx, expected_dx, **tolerance(dtype))

    y[3] = 5  # out of range: NaN loss and a NaN row, never a read past the row
    run_single_thread(source, f"softmax_loss_{c_type}", x, y, ctypes.c_int(6), ctypes.c_int(5), dx, loss)
    assert np.isnan(loss) and np.isnan(dx[3]).all() and np.isfinite(np.delete(dx, 3, axis=0)).all()


def test_a_kernel_that_does_not_compile_is_reported_with_its_source():
    broken = sources.Elementwise("T x", "T y", "y = x +* 2", "broken")
    with pytest.raises(RuntimeError, match="does not compile"):
        run_elementwise(broken, np.ones(3), np.empty(3))


POOLS = [
    # (N, C, H, W), (pool height, pool width), stride
    ((2, 3, 8, 8), (2, 2), 2),
    ((2, 2, 7, 7), (3, 3), 2),  # overlapping windows
    ((1, 2, 5, 6), (3, 2), 1),
    ((1, 1, 4, 4), (4, 4), 4),  # one window per plane
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape, window, stride", POOLS)
def test_max_pool_kernels_equal_the_reference_with_ties(rng, dtype, shape, window, stride):
    ph, pw = window
    h_out, w_out = (shape[2] - ph) // stride + 1, (shape[3] - pw) // stride + 1
    x = rng.integers(-2, 3, size=shape).astype(dtype)  # few values: many tied windows
    param = {"pool_height": ph, "pool_width": pw, "stride": stride}
    expected, cache = fast_layers.max_pool_forward_fast(x, param)
    out_shape = (*shape[:2], h_out, w_out)
    out, argmax = np.empty(out_shape, dtype=dtype), np.empty(out_shape, dtype=np.int32)
    geometry = (shape[2], shape[3], ph, pw, h_out, w_out, stride)
    run_elementwise(sources.MAX_POOL_FORWARD, x, *geometry, out, argmax)
    np.testing.assert_array_equal(out, expected)
    windows = cache[2]  # (N, C, ph·pw, H', W'), row-major offsets
    np.testing.assert_array_equal(argmax, np.argmax(windows, axis=2))

    dout = rng.standard_normal(out_shape).astype(dtype)
    dx = run_elementwise(sources.MAX_POOL_BACKWARD, dout, argmax, *geometry, np.empty(shape, dtype=dtype))
    np.testing.assert_array_equal(dx, fast_layers.max_pool_backward_fast(dout, cache))


def test_max_pool_kernel_propagates_nan():
    x = np.array([[[[1.0, np.nan], [3.0, 2.0]]]])
    out, argmax = np.empty((1, 1, 1, 1)), np.empty((1, 1, 1, 1), dtype=np.int32)
    run_elementwise(sources.MAX_POOL_FORWARD, x, 2, 2, 2, 2, 1, 1, 2, out, argmax)
    assert np.isnan(out).all() and argmax.item() == 1


def _per_channel(v):
    return v.reshape(1, -1, 1, 1)


def _kernel_batchnorm_train(x, gamma, beta, eps):
    """CupyKernels.spatial_batchnorm_train's passes, with the kernels run on the CPU."""
    n, c, h, w = x.shape
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = run_reduction(sources.SQUARED_DEVIATION_SUM, x, mean, axis=(0, 2, 3), keepdims=True) / (n * h * w)
    inv_std = 1 / np.sqrt(var + eps)
    scale = x.dtype.type(1) if gamma is None else _per_channel(gamma)
    out, x_hat = np.empty_like(x), np.empty_like(x)
    run_elementwise(sources.BATCHNORM_TRAIN, x, mean, inv_std, scale, _per_channel(beta), out, x_hat)
    return out, x_hat, mean.reshape(c), var.reshape(c), inv_std


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("with_gamma", [True, False])
def test_batchnorm_kernels_equal_the_reference(rng, dtype, with_gamma):
    n, c, h, w = 4, 3, 5, 6
    x = (rng.standard_normal((n, c, h, w)) * 3 + 2).astype(dtype)
    gamma = rng.standard_normal(c).astype(dtype) if with_gamma else None
    beta = rng.standard_normal(c).astype(dtype)
    bn_param = {"mode": "train", "eps": 1e-5}
    expected, cache = spatial_batchnorm_forward(x, gamma, beta, bn_param)
    out, x_hat, mean, var, inv_std = _kernel_batchnorm_train(x, gamma, beta, 1e-5)
    np.testing.assert_allclose(out, expected, **tolerance(dtype))
    # The running averages start at zero, so after one step they are (1 - momentum)·batch.
    np.testing.assert_allclose(0.1 * mean, bn_param["running_mean"], **tolerance(dtype))
    np.testing.assert_allclose(0.1 * var, bn_param["running_var"], **tolerance(dtype))

    dout = rng.standard_normal(x.shape).astype(dtype)
    dx_ref, dgamma_ref, dbeta_ref = spatial_batchnorm_backward(dout, cache)
    dbeta = dout.sum(axis=(0, 2, 3))
    dgamma = run_reduction(sources.PRODUCT_SUM, dout, x_hat, axis=(0, 2, 3))
    scale = inv_std if gamma is None else _per_channel(gamma) * inv_std
    count = n * h * w
    dx = run_elementwise(
        sources.BATCHNORM_BACKWARD,
        dout,
        x_hat,
        scale,
        _per_channel(dbeta / count),
        _per_channel(dgamma / count),
        np.empty_like(x),
    )
    np.testing.assert_allclose(dx, dx_ref, **tolerance(dtype))
    np.testing.assert_allclose(dbeta, dbeta_ref, **tolerance(dtype))
    if with_gamma:
        np.testing.assert_allclose(dgamma, dgamma_ref, **tolerance(dtype))

    bn_param["mode"] = "test"
    expected, _ = spatial_batchnorm_forward(x, gamma, beta, bn_param)
    inv_running_std = 1 / np.sqrt(_per_channel(bn_param["running_var"]) + 1e-5)
    scale = dtype(1) if gamma is None else _per_channel(gamma)
    out = run_elementwise(
        sources.BATCHNORM_APPLY,
        x,
        _per_channel(bn_param["running_mean"]),
        inv_running_std,
        scale,
        _per_channel(beta),
        np.empty_like(x),
    )
    np.testing.assert_allclose(out, expected, **tolerance(dtype))
