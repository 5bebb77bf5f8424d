"""The CUDA kernels, run on the CPU against the array-API reference on NumPy.

tests/cpu_kernels.py compiles each kernel's source with the C++ compiler and loads
xpnet.backend.cupy_kernels itself over NumPy arrays, so every fused path (the
kernels, and the Python around each launch) is checked on every machine with a
compiler, not only where a GPU is at hand; tests/test_gpu.py runs them on CuPy.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from cpu_kernels import COMPILER, cupy_kernels_on_cpu, run_elementwise
from helpers import small_recipe

from xpnet import fast_layers, layer_utils, layers, optim, spatial_norm
from xpnet.backend import dispatch, fused_kernels
from xpnet.backend import kernel_sources as sources
from xpnet.fast_layers import _col2im, _im2col
from xpnet.layer_utils import affine_relu_forward
from xpnet.spatial_norm import (
    spatial_batchnorm_backward,
    spatial_batchnorm_forward,
    spatial_batchnorm_gelu_backward,
    spatial_batchnorm_gelu_forward,
)

pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler to build the kernel sources with")

FLOATS = [np.float32, np.float64]


def tolerance(dtype):
    return {"rtol": 2e-6, "atol": 2e-6} if dtype == np.float32 else {"rtol": 1e-13, "atol": 1e-14}


@pytest.fixture
def rng():
    return np.random.default_rng(7)


CONV_GEOMETRIES = [
    # (N, C, H, W), (KH, KW), stride, pad
    ((2, 3, 7, 7), (3, 3), 1, 1),
    ((2, 3, 9, 9), (3, 3), 2, 1),
    ((1, 2, 9, 8), (3, 2), 2, 0),  # non-square kernel, no padding
    ((2, 1, 5, 5), (5, 5), 1, 2),  # windows that see only padding along their rows
    ((3, 2, 6, 6), (2, 2), 2, 0),  # tiling, as the whitening layer
    ((1, 2, 9, 10), (2, 3), 3, 1),  # stride above the kernel height: rows no window covers
    ((2, 1, 8, 10), (4, 3), 3, 1),  # rows two windows cover, columns one each
]


def _index(kernel, bits):
    """``kernel`` as it is (bits 32: the index arithmetic of every launch under 2^32 elements),
    or always taking its 64-bit index path (bits 64: larger launches)."""
    if bits == 32:
        return kernel
    assert kernel.operation.count("i <= 0xFFFFFFFFLL") == 1
    return kernel._replace(operation=kernel.operation.replace("i <= 0xFFFFFFFFLL", "i < 0"))


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape, kernel, stride, pad", CONV_GEOMETRIES)
@pytest.mark.parametrize("channels_outer", [False, True])
def test_im2col_and_col2im_equal_the_reference(rng, dtype, shape, kernel, stride, pad, bits, channels_outer):
    """x and dx stored (N, C, H, W), or (C, N, H, W) as a convolution's output is."""
    n, c, h, w = shape
    kh, kw = kernel
    h_out, w_out = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    x = rng.standard_normal(shape).astype(dtype)
    stored = np.ascontiguousarray(np.permute_dims(x, (1, 0, 2, 3)) if channels_outer else x)
    reference = _im2col(np, np.permute_dims(x, (1, 0, 2, 3)), kh, kw, stride, pad, h_out, w_out)
    cols = np.empty((c * kh * kw, n * h_out * w_out), dtype=dtype)
    geometry = (c, h, w, kh, kw, n, h_out, w_out, stride, pad, int(channels_outer))
    divide = sources.divisors(w_out, h_out, n, kw, kh)
    run_elementwise(_index(sources.IM2COL, bits), stored, *geometry, *divide, cols)
    np.testing.assert_array_equal(cols, reference)

    dcols = rng.standard_normal(cols.shape).astype(dtype)
    expected_cn = _col2im(np, dcols, (n, c, h, w), kh, kw, stride, pad, h_out, w_out)
    inner = n if channels_outer else c
    dx = np.empty(((c, n) if channels_outer else (n, c)) + (h, w), dtype=dtype)
    run_elementwise(_index(sources.COL2IM, bits), dcols, *geometry, inner, *sources.divisors(w, h, inner), dx)
    np.testing.assert_allclose(dx, expected_cn if channels_outer else np.permute_dims(expected_cn, (1, 0, 2, 3)),
                               **tolerance(dtype))  # fmt: skip


def test_the_kernels_division_by_multiplier_and_shift_is_exact_for_every_32_bit_index():
    """t // d as the kernels compute it, (t + umulhi(t, m)) >> s in 64 bits, for divisors
    of every size class and indices at both ends of the 32-bit range and between."""
    rng = np.random.default_rng(3)
    sizes = [*range(1, 1100), 4095, 4096, 4097, 65535, 65536, 99991, 1 << 20, (1 << 31) - 1, 1 << 31, (1 << 32) - 1]
    ends = np.array([0, 1, 2, 3, (1 << 31) - 1, 1 << 31, (1 << 32) - 2, (1 << 32) - 1], dtype=np.uint64)
    for size in sizes:
        magic, shift = sources.divisors(size)
        assert 0 <= magic < 1 << 32 and 0 <= shift <= 32
        t = np.concatenate(
            [ends, rng.integers(0, 1 << 32, 2000, dtype=np.uint64), size * np.arange(0, 3, dtype=np.uint64)]
        )
        t = t[t < 1 << 32]
        high = (t * np.uint64(magic)) >> np.uint64(32)
        np.testing.assert_array_equal((t + high) >> np.uint64(shift), t // np.uint64(size), err_msg=f"size {size}")
    with pytest.raises(ValueError, match="cannot divide by 0"):
        sources.divisors(0)


def test_conv_through_the_kernel_columns_equals_the_naive_layer(rng):
    """im2col's column order is the one the GEMM with w.reshape(F, -1) needs."""
    x, w = rng.standard_normal((2, 3, 7, 7)), rng.standard_normal((4, 3, 3, 3))
    cols = np.empty((27, 2 * 4 * 4))
    run_elementwise(sources.IM2COL, x, 3, 7, 7, 3, 3, 2, 4, 4, 2, 1, 0, *sources.divisors(4, 4, 2, 3, 3), cols)
    out = np.permute_dims((w.reshape(4, -1) @ cols).reshape(4, 2, 4, 4), (1, 0, 2, 3))
    expected, _ = layers.conv_forward_naive(x, w, np.zeros(4), {"stride": 2, "pad": 1})
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


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
    ((1, 2, 11, 11), (2, 2), 3),  # gaps: rows and columns no window covers
]


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape, window, stride", POOLS)
@pytest.mark.parametrize("channels_outer", [False, True])
def test_max_pool_kernels_equal_the_reference_with_ties(rng, dtype, shape, window, stride, bits, channels_outer):
    """x and dx stored (N, C, H, W), or (C, N, H, W) as a convolution's output is; out,
    argmax and dout (N, C, H', W') either way."""
    n, c, h, w = shape
    ph, pw = window
    h_out, w_out = (h - ph) // stride + 1, (w - pw) // stride + 1
    x = rng.integers(-2, 3, size=shape).astype(dtype)  # few values: many tied windows
    stored = np.ascontiguousarray(np.permute_dims(x, (1, 0, 2, 3)) if channels_outer else x)
    param = {"pool_height": ph, "pool_width": pw, "stride": stride}
    expected, cache = fast_layers.max_pool_forward_fast(x, param)
    out_shape = (n, c, h_out, w_out)
    out, argmax = np.empty(out_shape, dtype=dtype), np.empty(out_shape, dtype=np.int32)
    geometry = (h, w, ph, pw, h_out, w_out, stride)
    forward = (*geometry, c, n, int(channels_outer), *sources.divisors(w_out, h_out, c))
    run_elementwise(_index(sources.MAX_POOL_FORWARD, bits), stored, *forward, out, argmax)
    np.testing.assert_array_equal(out, expected)
    rows, cols = stride * (h_out - 1) + 1, stride * (w_out - 1) + 1
    windows = np.stack([x[..., i : i + rows : stride, j : j + cols : stride] for i in range(ph) for j in range(pw)], 2)
    np.testing.assert_array_equal(argmax, np.argmax(windows, axis=2))  # offsets in row-major order

    dout = rng.standard_normal(out_shape).astype(dtype)
    inner = n if channels_outer else c
    backward = (*geometry, c, int(channels_outer), inner, *sources.divisors(w, h, inner))
    dx = np.empty(stored.shape, dtype=dtype)
    run_elementwise(_index(sources.MAX_POOL_BACKWARD, bits), dout, argmax, *backward, dx)
    expected_dx = fast_layers.max_pool_backward_fast(dout, cache)
    np.testing.assert_array_equal(dx, np.permute_dims(expected_dx, (1, 0, 2, 3)) if channels_outer else expected_dx)


def test_max_pool_kernel_propagates_nan():
    x = np.array([[[[1.0, np.nan], [3.0, 2.0]]]])
    out, argmax = np.empty((1, 1, 1, 1)), np.empty((1, 1, 1, 1), dtype=np.int32)
    run_elementwise(sources.MAX_POOL_FORWARD, x, 2, 2, 2, 2, 1, 1, 2, 1, 1, 0, *sources.divisors(1, 1, 1), out, argmax)
    assert np.isnan(out).all() and argmax.item() == 1


# -- the fused paths of the layers and update rules, end to end ------------------------
@pytest.fixture(scope="module")
def kernels():
    return cupy_kernels_on_cpu()


def module_of(kernels) -> dict:
    """The globals of the cupy_kernels module that ``kernels`` was loaded as (its kernel
    tables, helpers and launch sizes, which a test may cap with monkeypatch.setitem)."""
    return type(kernels).__init__.__globals__


def fused_and_reference(kernels, monkeypatch, fn, fused):
    """fn() with NumPy arrays sent through ``kernels`` (CupyKernels running on the CPU),
    then through the array-API reference; each method named in ``fused`` must have run
    in the first call and not in the second."""
    calls = {name: 0 for name in fused}

    def counting(name, method):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return method(*args, **kwargs)

        return wrapper

    for name in fused:
        monkeypatch.setattr(kernels, name, counting(name, getattr(kernels, name)))
    monkeypatch.setitem(dispatch._ACCELERATORS, np.ndarray, kernels)
    fast = fn()
    ran = dict(calls)
    with fused_kernels(False):
        reference = fn()
    for name in fused:
        assert ran[name] > 0, f"the fused {name} did not run"
        assert calls[name] == ran[name], f"the reference run called the fused {name}"
    return fast, reference


def assert_all_close(fast, reference, dtype):
    for a, b in zip(fast, reference, strict=True):
        np.testing.assert_allclose(a, b, **tolerance(dtype))


@pytest.mark.parametrize("dtype", FLOATS)
def test_fused_conv_layers(rng, kernels, monkeypatch, dtype):
    x = rng.standard_normal((3, 2, 9, 7)).astype(dtype)  # no two sizes alike: each divisor in its place
    w, b = rng.standard_normal((4, 2, 3, 3)).astype(dtype), rng.standard_normal(4).astype(dtype)
    dout = rng.standard_normal((3, 4, 5, 4)).astype(dtype)

    def run():
        out, cache = fast_layers.conv_forward_fast(x, w, b, {"stride": 2, "pad": 1})
        return (out, *fast_layers.conv_backward_fast(dout, cache))

    assert_all_close(*fused_and_reference(kernels, monkeypatch, run, ["im2col", "col2im"]), dtype)


def _stored_like(a, channels_outer):
    """a (N, C, H, W) with its elements stored (C, N, H, W) (a convolution's output on the
    im2col path) or C-ordered."""
    return np.permute_dims(np.ascontiguousarray(np.permute_dims(a, (1, 0, 2, 3))), (1, 0, 2, 3)) if channels_outer \
        else np.ascontiguousarray(a)  # fmt: skip


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape, kernel, stride, pad", CONV_GEOMETRIES)
@pytest.mark.parametrize("x_outer, dout_outer", [(False, False), (True, True), (False, True)])
def test_direct_conv_kernels_equal_the_naive_layers(rng, kernels, monkeypatch, dtype, shape, kernel, stride, pad, bits,
                                                    x_outer, dout_outer):  # fmt: skip
    """The small-filter kernels against conv_forward_naive / conv_backward_naive, x and dout
    stored either way (every geometry here has at most DIRECT_CONV_MAX_TAPS taps)."""
    for name in sources.FILTER_SIZE_KERNELS:
        source = getattr(sources, name)
        assert source.count("i <= 0xFFFFFFFFLL") == 1
        monkeypatch.setattr(sources, name, source if bits == 32 else source.replace("i <= 0xFFFFFFFFLL", "i < 0"))
    monkeypatch.setattr(kernels, "direct_small_convs", True)
    x = _stored_like(rng.standard_normal(shape).astype(dtype), x_outer)
    weights = rng.standard_normal((4, shape[1], *kernel)).astype(dtype)
    _assert_the_direct_kernels_equal_the_naive_layers(rng, kernels, x, weights, stride, pad, dout_outer)


@pytest.mark.parametrize("dtype", FLOATS)
def test_the_direct_kernels_step_over_the_work_beyond_their_grid(rng, kernels, monkeypatch, dtype):
    """Grids capped: the forward pass's at 2 blocks (1,200 outputs a filter, 7 filters), the
    filters' gradient's at 2 blocks of positions and 3 of filters, so that each thread
    steps through several outputs, positions and filters."""
    stand_in = module_of(kernels)
    for name, cap in (("_MAX_GRID_X", 2), ("_MAX_GRID_Y", 3), ("_FILTER_GRAD_BLOCKS", 14)):
        monkeypatch.setitem(stand_in, name, cap)
    monkeypatch.setattr(kernels, "direct_small_convs", True)
    x = rng.standard_normal((3, 2, 20, 20)).astype(dtype)
    weights = rng.standard_normal((7, 2, 3, 3)).astype(dtype)
    _assert_the_direct_kernels_equal_the_naive_layers(rng, kernels, x, weights, 1, 1, dout_outer=True)


def _assert_the_direct_kernels_equal_the_naive_layers(rng, kernels, x, weights, stride, pad, dout_outer):
    """direct_conv_forward and direct_conv_filter_grad against the naive layers in float64,
    each element within its sum's rounding bound (terms · eps · the sum of the terms' magnitudes)."""
    dtype = x.dtype
    n, c = x.shape[:2]
    f, _, kh, kw = weights.shape
    param = {"stride": stride, "pad": pad}
    expected, cache = layers.conv_forward_naive(x.astype(np.float64), weights.astype(np.float64), np.zeros(f), param)
    magnitude, _ = layers.conv_forward_naive(np.abs(x.astype(np.float64)), np.abs(weights.astype(np.float64)),
                                             np.zeros(f), param)  # fmt: skip
    eps = np.finfo(dtype).eps
    h_out, w_out = expected.shape[2:]
    out = kernels.direct_conv_forward(x, weights, None, stride, pad, h_out, w_out)
    assert out.dtype == dtype and np.permute_dims(out, (1, 0, 2, 3)).flags.c_contiguous  # stored as im2col's path
    assert np.all(np.abs(out - expected) <= c * kh * kw * eps * magnitude)
    b = rng.standard_normal(f).astype(dtype)
    biased = kernels.direct_conv_forward(x, weights, b, stride, pad, h_out, w_out)
    np.testing.assert_array_equal(biased, out + b[:, None, None])  # the bias added last, rounded once

    dout = _stored_like(rng.standard_normal(expected.shape).astype(dtype), dout_outer)
    _, dw_expected, _ = layers.conv_backward_naive(dout.astype(np.float64), cache)
    _, dw_magnitude, _ = layers.conv_backward_naive(np.abs(dout.astype(np.float64)), (np.abs(cache[0]), *cache[1:]))
    dw = kernels.direct_conv_filter_grad(x, dout, kh, kw, stride, pad)
    assert dw.shape == weights.shape and dw.dtype == dtype
    assert np.all(np.abs(dw - dw_expected) <= n * h_out * w_out * eps * dw_magnitude)


def test_a_nan_filter_weight_reaches_every_output_of_its_filter_as_through_the_columns(kernels, monkeypatch):
    """A tap on the padding multiplies a zero, as a column of im2col's does, rather than being left out."""
    monkeypatch.setattr(kernels, "direct_small_convs", True)
    x, w = np.ones((1, 1, 3, 3)), np.ones((2, 1, 3, 3))
    w[0, 0, 0, 0] = np.nan  # the corner tap: on the padding for the first row and column of outputs
    out = kernels.direct_conv_forward(x, w, None, 1, 1, 3, 3)
    assert np.isnan(out[:, 0]).all() and not np.isnan(out[:, 1]).any()


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_small_filter_convs_run_without_columns_and_equal_the_reference(rng, kernels, monkeypatch, dtype, input_grad,
                                                                        with_bias):  # fmt: skip
    """conv_forward_fast and conv_backward_fast through the direct kernels where they are
    switched on: no columns in the cache, the input gradient through columns as before."""
    monkeypatch.setattr(kernels, "direct_small_convs", True)
    x = rng.standard_normal((3, 3, 9, 7)).astype(dtype)
    w = rng.standard_normal((5, 3, 2, 2)).astype(dtype)
    b = rng.standard_normal(5).astype(dtype) if with_bias else None
    caches = []

    def run():
        out, cache = fast_layers.conv_forward_fast(x, w, b, {"stride": 1, "pad": 0})
        caches.append(cache)
        dout = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
        grads = fast_layers.conv_backward_fast(dout, cache, input_grad)
        assert (grads[0] is None) == (not input_grad) and (grads[2] is None) == (not with_bias)
        return (out, *(g for g in grads if g is not None))

    fused = ["direct_conv_forward", "direct_conv_filter_grad"] + (["col2im"] if input_grad else [])
    assert_all_close(*fused_and_reference(kernels, monkeypatch, run, fused), dtype)
    assert type(caches[0][-1]).__name__ == "_SmallFilterConvolution"  # the fused run kept no column matrix
    assert caches[1][-1].matrix.shape == (12, 3 * 8 * 6)  # the reference's columns


@pytest.mark.parametrize("fused_forward", [True, False])
def test_a_backward_pass_on_the_other_path_than_its_forward_pass_reads_the_columns_as_laid_out(
    rng, kernels, monkeypatch, fused_forward
):
    """The fused columns put the channels first, the reference's a batch of 8 innermost: a
    forward pass run with the fused kernels and its backward pass without them, or the other
    way round, still pair each column with its own row of dout."""
    monkeypatch.setitem(dispatch._ACCELERATORS, np.ndarray, kernels)
    x, w, b = rng.standard_normal((8, 3, 7, 5)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    param = {"stride": 2, "pad": 1}
    with fused_kernels(fused_forward):
        out, cache = fast_layers.conv_forward_fast(x, w, b, param)
    assert cache[-1].layout == (fast_layers.CHANNELS_FIRST if fused_forward else fast_layers.BATCH_LAST)
    expected, naive_cache = layers.conv_forward_naive(x, w, b, param)
    dout = rng.standard_normal(expected.shape)
    with fused_kernels(not fused_forward):
        grads = fast_layers.conv_backward_fast(dout, cache)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, layers.conv_backward_naive(dout, naive_cache), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["switched off", "too many taps", "float16", "mixed dtypes"])
def test_the_direct_kernels_decline_what_they_do_not_cover(rng, kernels, monkeypatch, case):
    """Then the convolution takes the im2col path: its cache holds the columns. Asked directly,
    the kernels refuse what they do not cover by name."""
    monkeypatch.setattr(kernels, "direct_small_convs", case != "switched off")
    dtype = np.float16 if case == "float16" else np.float32
    x = rng.standard_normal((2, 4 if case == "too many taps" else 3, 6, 6)).astype(dtype)  # 4·3·3 = 36 taps
    w = rng.standard_normal((2, x.shape[1], 3, 3)).astype(np.float64 if case == "mixed dtypes" else dtype)
    if case != "switched off":
        with pytest.raises(ValueError, match="at most 32 taps in float32 or float64 throughout"):
            kernels.direct_conv_forward(x, w, None, 1, 1, 6, 6)
    monkeypatch.setitem(dispatch._ACCELERATORS, np.ndarray, kernels)
    if case != "mixed dtypes":  # which the layer refuses by itself
        _, cache = fast_layers.conv_forward_fast(x, w, None, {"stride": 1, "pad": 1})
        assert cache[-1].matrix.shape == (x.shape[1] * 9, 2 * 36)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("size, window, stride", [(8, 2, 2), (9, 3, 2), (9, 2, 2), (10, 3, 2)])
def test_fused_max_pool_layers_equal_the_reference_bit_for_bit(rng, kernels, monkeypatch, dtype, size, window, stride):
    x = rng.integers(-2, 3, size=(2, 3, size, size + 2)).astype(dtype)  # few values: many tied windows
    # (9, 2, 2) and (10, 3, 2) leave a row and a column over, which the pools drop
    param = {"pool_height": window, "pool_width": window, "stride": stride, "drop_remainder": True}

    def run():
        out, cache = fast_layers.max_pool_forward_fast(x, param)
        dout = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
        return out, fast_layers.max_pool_backward_fast(dout, cache)

    fast, reference = fused_and_reference(kernels, monkeypatch, run, ["max_pool_forward", "max_pool_backward"])
    for a, b in zip(fast, reference):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("pooled", [False, True])
def test_fused_conv_relu_sandwiches_equal_the_reference(rng, kernels, monkeypatch, dtype, pooled):
    """The bias and the ReLU in one pass after the convolution (or after its pool), read and
    stored in their input's memory order."""
    x = rng.standard_normal((3, 2, 6, 6)).astype(dtype)
    w, b = rng.standard_normal((4, 2, 3, 3)).astype(dtype), rng.standard_normal(4).astype(dtype)
    conv, pool = {"stride": 1, "pad": 1}, {"pool_height": 2, "pool_width": 2, "stride": 2}
    forward, backward = (
        (lambda: layer_utils.conv_relu_pool_forward(x, w, b, conv, pool), layer_utils.conv_relu_pool_backward)
        if pooled
        else (lambda: layer_utils.conv_relu_forward(x, w, b, conv), layer_utils.conv_relu_backward)
    )

    def run():
        out, cache = forward()
        dout = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
        return (out, *backward(dout, cache))

    fast, reference = fused_and_reference(kernels, monkeypatch, run, ["channel_bias_relu", "relu_backward"])
    # in their input's order: the convolution's (channels outermost), or the pool's (N, C, H', W')
    assert fast[0].flags.c_contiguous == pooled
    assert_all_close(fast, reference, dtype)
    assert np.sum(fast[0] == 0) > 0 and np.sum(fast[0] > 0) > 0  # the ReLU cut some values, not all


BATCHNORM_LAYERS = {  # without and with the GELU after it
    False: (spatial_batchnorm_forward, spatial_batchnorm_backward),
    True: (spatial_batchnorm_gelu_forward, spatial_batchnorm_gelu_backward),
}


def counting_plane_sums(kernels, monkeypatch) -> list:
    """A list that grows by one at each PLANE_SUMS launch of ``kernels``."""
    launches = []
    table = module_of(kernels)["_plane_sums_kernels"]
    for dtype, kernel in list(table.items()):
        monkeypatch.setitem(table, dtype, lambda *args, _kernel=kernel: (launches.append(1), _kernel(*args))[1])
    return launches


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("with_gamma", [True, False])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("channels_outer", [True, False])
@pytest.mark.parametrize("warp", [False, True])
def test_fused_spatial_batchnorm(rng, kernels, monkeypatch, dtype, with_gamma, gelu, channels_outer, warp):
    """warp: the per-plane sums through PLANE_SUMS, in one launch per pass, instead of CuPy's reductions."""
    monkeypatch.setattr(kernels, "warp_plane_sums", warp)
    launches = counting_plane_sums(kernels, monkeypatch)
    forward, backward = BATCHNORM_LAYERS[gelu]
    n, c, h, w = 4, 3, 5, 6
    # A permuted view, as a convolution's output is, or a C-ordered array.
    x = np.permute_dims((rng.standard_normal((c, n, h, w)) * 3 + 2).astype(dtype), (1, 0, 2, 3))
    x = x if channels_outer else np.ascontiguousarray(x)
    gamma = rng.standard_normal(c).astype(dtype) if with_gamma else None
    beta = rng.standard_normal(c).astype(dtype)
    dout = rng.standard_normal((n, c, h, w)).astype(dtype)
    start = np.abs(rng.standard_normal((2, c))).astype(dtype)  # the running averages before the step

    def run():
        bn_param = {"mode": "train", "momentum": 0.6, "eps": 1e-5, "unbiased_running_var": True}
        bn_param["running_mean"], bn_param["running_var"] = start.copy()
        out, cache = forward(x, gamma, beta, bn_param)
        dx, dgamma, dbeta = backward(dout, cache)
        assert (dgamma is None) == (gamma is None)
        bn_param["mode"] = "test"
        test_out, _ = forward(x, gamma, beta, bn_param)
        grads = (dx, dbeta) if gamma is None else (dx, dgamma, dbeta)
        return (out, *grads, bn_param["running_mean"], bn_param["running_var"], test_out)

    fused = ["spatial_batchnorm_train", "spatial_batchnorm_backward", "spatial_batchnorm_apply", "running_averages"]
    assert_all_close(*fused_and_reference(kernels, monkeypatch, run, fused), dtype)
    assert len(launches) == (3 if warp else 0)  # the mean and the variance, then both gradient sums at once


@pytest.mark.parametrize("layer", ["batchnorm", "batchnorm_gelu", "groupnorm"])
@pytest.mark.parametrize("channels_outer", [True, False])
@pytest.mark.parametrize("warp", [False, True])
def test_fused_normalisation_keeps_its_digits_for_values_far_from_zero(kernels, monkeypatch, layer, channels_outer,
                                                                        warp):  # fmt: skip
    """float32 values near 1000 with a spread of 1: the fused kernels summed x for the mean and
    normalised x - mean with the mean rounded to float32, off by up to half its last place, so x̂
    was off by 3.7e-5 (spatial batchnorm) and 4.6e-5 (groupnorm) where the array-API layers are
    within 1e-6. Now they sum and subtract around a shift, each channel's (or group's) first value."""
    monkeypatch.setattr(kernels, "warp_plane_sums", warp)
    n, c, h, w = 32, 4, 16, 16
    x = np.permute_dims((np.random.default_rng(12345).standard_normal((c, n, h, w)) + 1000).astype(np.float32),
                        (1, 0, 2, 3))  # fmt: skip
    x = x if channels_outer else np.ascontiguousarray(x)
    wide = x.astype(np.float64)
    if layer == "groupnorm":
        out, x_hat, _ = kernels.spatial_groupnorm_train(x, np.ones((1, c, 1, 1), np.float32), np.zeros((1, c, 1, 1),
                                                        np.float32), 2, 1e-5)  # fmt: skip
        grouped = wide.reshape(n, 2, -1)
        centered = grouped - grouped.mean(axis=2, keepdims=True)
        expected = (centered / np.sqrt((centered * centered).mean(axis=2, keepdims=True) + 1e-5)).reshape(x.shape)
    else:
        gelu = layer == "batchnorm_gelu"
        _, x_hat, mean, var, _ = kernels.spatial_batchnorm_train(x, None, np.zeros(c, np.float32), 1e-5, gelu=gelu)
        centered = wide - wide.mean(axis=(0, 2, 3), keepdims=True)
        expected = centered / np.sqrt((centered * centered).mean(axis=(0, 2, 3), keepdims=True) + 1e-5)
        # the mean within a float32 ulp, the variance to float32's rounding
        np.testing.assert_allclose(mean, wide.mean(axis=(0, 2, 3)), rtol=1.2e-7, atol=0)
        np.testing.assert_allclose(var, wide.var(axis=(0, 2, 3)), rtol=1e-6, atol=0)
    np.testing.assert_allclose(x_hat, expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("channels_outer", [True, False])
@pytest.mark.parametrize("warp", [False, True])
def test_fused_spatial_groupnorm(rng, kernels, monkeypatch, dtype, groups, channels_outer, warp):
    """Per-group statistics from per-plane sums, one normalising pass, and a backward pass
    whose group means come from the same per-plane sums as dgamma and dbeta."""
    monkeypatch.setattr(kernels, "warp_plane_sums", warp)
    n, c, h, w = 3, 6, 5, 4
    x = np.permute_dims((rng.standard_normal((c, n, h, w)) * 3 + 2).astype(dtype), (1, 0, 2, 3))
    x = x if channels_outer else np.ascontiguousarray(x)
    gamma, beta = (rng.standard_normal((1, c, 1, 1)).astype(dtype) for _ in range(2))
    dout = rng.standard_normal((n, c, h, w)).astype(dtype)

    def run():
        out, cache = spatial_norm.spatial_groupnorm_forward(x, gamma, beta, groups, {"eps": 1e-5})
        return (out, *spatial_norm.spatial_groupnorm_backward(dout, cache))

    fast, reference = fused_and_reference(
        kernels, monkeypatch, run, ["spatial_groupnorm_train", "spatial_groupnorm_backward"]
    )
    assert [a.shape for a in fast] == [(n, c, h, w), (n, c, h, w), (1, c, 1, 1), (1, c, 1, 1)]
    assert all(a.dtype == dtype for a in fast)
    assert_all_close(fast, reference, dtype)
    with pytest.raises(ValueError, match=r"dout has shape \(3, 6, 5, 5\), expected \(3, 6, 5, 4\)"):
        monkeypatch.setitem(dispatch._ACCELERATORS, np.ndarray, kernels)
        _, cache = spatial_norm.spatial_groupnorm_forward(x, gamma, beta, groups, {})
        spatial_norm.spatial_groupnorm_backward(np.zeros((3, 6, 5, 5), dtype), cache)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("channels_outer", [True, False])
def test_channel_sums_through_the_warp_per_plane_kernel_equal_the_reference(rng, kernels, monkeypatch, dtype,
                                                                             channels_outer):  # fmt: skip
    monkeypatch.setattr(kernels, "warp_plane_sums", True)
    launches = counting_plane_sums(kernels, monkeypatch)
    x = np.permute_dims(rng.standard_normal((5, 3, 7, 6)).astype(dtype), (1, 0, 2, 3))
    x = x if channels_outer else np.ascontiguousarray(x)
    total = kernels.channel_sum(x)
    np.testing.assert_allclose(total, x.astype(np.float64).sum(axis=(0, 2, 3)), **tolerance(dtype))
    assert total.dtype == dtype and len(launches) == 1
    kernels.channel_sum(x, dtype=np.float32 if x.dtype == np.float64 else np.float64)  # another: CuPy's reductions
    assert len(launches) == 1


@pytest.mark.parametrize("plane_size", [10, 45])
@pytest.mark.parametrize("channels_outer", [False, True])
def test_each_plane_sum_mode_adds_its_map_over_each_plane(rng, kernels, monkeypatch, channels_outer, plane_size):
    """PLANE_SUMS's five modes against NumPy, planes stored (C, N) or (N, C), shorter and
    longer than a warp, and more of them (77) than its grid, capped at two blocks, has warps
    (16): each warp takes four or five."""
    stand_in = module_of(kernels)
    monkeypatch.setitem(stand_in, "_MAX_PLANE_BLOCKS", 2)
    plane_sums = stand_in["_plane_sums"]
    a, b = 7, 11
    channels = a if channels_outer else b
    x, y = rng.standard_normal((a, b, plane_size)), rng.standard_normal((a, b, plane_size))
    p0, p1 = rng.standard_normal(channels), rng.standard_normal(channels)
    per_plane = (slice(None), None, None) if channels_outer else (None, slice(None), None)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-12, atol=1e-12)
    close(plane_sums(0, x, channels_outer, warp=True), x.sum(axis=2))
    close(plane_sums(1, x, channels_outer, p0=p0, warp=True), ((x - p0[per_plane]) ** 2).sum(axis=2))
    for warp in (True, False):  # the shifted sums, in PLANE_SUMS and in the SHIFTED_SUM reduction
        close(plane_sums(4, x, channels_outer, p0=p0, warp=warp), (x - p0[per_plane]).sum(axis=2))
    total, product = plane_sums(2, x, channels_outer, y, warp=True)
    close(total, x.sum(axis=2))
    close(product, (x * y).sum(axis=2))
    # mode 3 (dout x, x̂ y, gamma p0, beta p1) against the reductions of the same maps
    warp = plane_sums(3, x, channels_outer, y, p0, p1, warp=True)
    reductions = plane_sums(3, x, channels_outer, y, p0, p1, warp=False)
    for got, want in zip(warp, reductions, strict=True):
        close(got, want)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("batch_axis", [0, 1])
@pytest.mark.parametrize("batch, threads", [(600, 256), (257, 256), (256, 256), (100, 128), (33, 64), (2, 32)])
def test_channel_totals_add_a_channels_partial_sums_in_a_block_that_covers_the_batch(kernels, monkeypatch, dtype,
                                                                                     batch_axis, batch, threads):  # fmt: skip
    """CHANNEL_TOTALS adds each channel's partial sums (one per image) in one block: a power of
    two of threads that covers the batch, from a warp to 256; over 256 images each thread takes
    two or three, then the block's tree adds them."""
    module = module_of(kernels)
    blocks = []
    launches = module["_channel_totals_kernels"]
    monkeypatch.setitem(module, "_channel_totals_kernels", {
        key: (lambda grid, block, args, launch=launch: blocks.append(block) or launch(grid, block, args))
        for key, launch in launches.items()
    })  # fmt: skip
    sums = np.random.default_rng(5).standard_normal((batch, 7) if batch_axis == 0 else (7, batch)) + 2.0
    total, mean, inv_std = module["_channel_totals"](sums.astype(dtype), batch_axis, batch * 9, eps=1e-5)
    assert blocks == [(threads,)]
    expected = sums.astype(dtype).astype(np.float64).sum(axis=batch_axis)
    close = functools.partial(np.testing.assert_allclose, **tolerance(dtype))
    close(total, expected)
    close(mean, expected / (batch * 9))
    close(inv_std, 1 / np.sqrt(expected / (batch * 9) + 1e-5))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("with_gamma", [True, False])
def test_batchnorm_and_gelu_in_one_pass_equal_the_two_fused_layers_bit_for_bit(rng, kernels, monkeypatch, dtype,
                                                                                with_gamma):  # fmt: skip
    """The fused batchnorm-GELU kernels recompute the batchnorm's output and the GELU's derivative
    from x̂, rounding each value where the separate kernels store it: in float32 and float64 the
    results are theirs exactly (summed in the same order here, where NumPy sums both)."""
    n, c, h, w = 4, 3, 5, 6
    x = np.permute_dims((rng.standard_normal((c, n, h, w)) * 3 + 2).astype(dtype), (1, 0, 2, 3))
    gamma = rng.standard_normal(c).astype(dtype) if with_gamma else None
    beta, dout = rng.standard_normal(c).astype(dtype), rng.standard_normal((n, c, h, w)).astype(dtype)
    monkeypatch.setitem(dispatch._ACCELERATORS, np.ndarray, kernels)

    def run(one_pass):
        bn_param = {"mode": "train", "momentum": 0.6, "eps": 1e-5}
        if one_pass:
            out, cache = spatial_batchnorm_gelu_forward(x, gamma, beta, bn_param)
            grads = spatial_batchnorm_gelu_backward(dout, cache)
        else:
            normed, bn_cache = spatial_batchnorm_forward(x, gamma, beta, bn_param)
            out, gelu_cache = layers.gelu_forward(normed)
            grads = spatial_batchnorm_backward(layers.gelu_backward(dout, gelu_cache), bn_cache)
        bn_param["mode"] = "test"
        test_out = (spatial_batchnorm_gelu_forward(x, gamma, beta, bn_param)[0] if one_pass
                    else layers.gelu_forward(spatial_batchnorm_forward(x, gamma, beta, bn_param)[0])[0])  # fmt: skip
        return [out, *[g for g in grads if g is not None], test_out]

    for a, b in zip(run(True), run(False), strict=True):
        np.testing.assert_array_equal(a, b)


def _channels_outermost(a):
    return not a.flags.c_contiguous and np.permute_dims(a, (1, 0, 2, 3)).flags.c_contiguous


@pytest.mark.parametrize("dtype", FLOATS)
def test_the_fused_layers_read_a_convolutions_output_in_its_memory_order(rng, kernels, monkeypatch, dtype):
    """A convolution's output on the im2col path is stored channels outermost. The fused
    layers after it read it in place: a pool gives (N, C, H', W') back, which a layer that
    flattens it reads as it is, and its backward pass gives the gradient back in the
    convolution's order, which the convolution's backward pass reads as rows without a copy;
    the values are those of the same layers on an (N, C, H, W) copy."""
    monkeypatch.setitem(dispatch._ACCELERATORS, np.ndarray, kernels)
    n, c, size = 3, 4, 7
    w = rng.standard_normal((c, c, 3, 3)).astype(dtype)
    beta = rng.standard_normal(c).astype(dtype)
    dout = rng.standard_normal((n, c, 3, 3)).astype(dtype)
    pool = {"pool_height": 2, "pool_width": 2, "stride": 2, "drop_remainder": True}

    def block(x):
        """conv - pool - batchnorm + GELU - GELU, forward and backward, as FastConvNet runs them."""
        a, conv_cache = fast_layers.conv_forward_fast(x, w, None, {"stride": 1, "pad": 1})
        pooled, pool_cache = fast_layers.max_pool_forward_fast(a, pool)
        normed, norm_cache = spatial_batchnorm_gelu_forward(pooled, None, beta, {"mode": "train"})
        out, gelu_cache = layers.gelu_forward(normed)
        dnormed = layers.gelu_backward(dout, gelu_cache)
        dpooled = spatial_batchnorm_gelu_backward(dnormed, norm_cache)[0]
        da = fast_layers.max_pool_backward_fast(dpooled, pool_cache)
        dx = fast_layers.conv_backward_fast(da, conv_cache)[0]
        return {"conv": a, "pool": pooled, "norm": normed, "gelu": out, "dgelu": dnormed, "dnorm": dpooled,
                "dpool": da, "dconv": dx}  # fmt: skip

    x_cn = rng.standard_normal((c, n, size, size)).astype(dtype)
    from_conv_output, from_nchw = (
        block(np.permute_dims(x_cn, (1, 0, 2, 3))),
        block(np.permute_dims(x_cn, (1, 0, 2, 3)).copy()),
    )
    for name, value in from_conv_output.items():
        if name in ("conv", "dpool", "dconv"):  # dconv: as x, itself a convolution's output here
            assert _channels_outermost(value), name
        else:  # the pool's output and all that follows it
            assert value.flags.c_contiguous, name
        np.testing.assert_array_equal(value, from_nchw[name], err_msg=name)
    assert from_nchw["dconv"].flags.c_contiguous  # an (N, C, H, W) input gets its gradient so


def test_the_batchnorm_backward_passes_refuse_each_others_fused_caches(rng, kernels, monkeypatch):
    monkeypatch.setitem(dispatch._ACCELERATORS, np.ndarray, kernels)
    x, beta = rng.standard_normal((2, 3, 4, 4)), np.zeros(3)
    _, plain = spatial_batchnorm_forward(x, None, beta, {"mode": "train"})
    _, with_gelu = spatial_batchnorm_gelu_forward(x, None, beta, {"mode": "train"})
    with pytest.raises(ValueError, match="cache comes from spatial_batchnorm_forward, not spatial_batchnorm_gelu_"):
        spatial_batchnorm_gelu_backward(x, plain)
    with pytest.raises(ValueError, match="cache comes from spatial_batchnorm_gelu_forward, not spatial_batchnorm_for"):
        spatial_batchnorm_backward(x, with_gelu)


def test_every_backward_pass_names_itself_when_given_another_layers_fused_cache(kernels, monkeypatch):
    """The fused kernels' records (spatial batchnorm's and groupnorm's) passed the part count of
    another layer's cache and failed inside it: "batchnorm_backward: x must be an array, got
    CupyKernels", or a sandwich's dout "expected (3,)". They say which forward pass made them,
    as the tagged caches of the array-API layers do."""
    from test_layers import _layer_pairs, unnamed_cache_mixups

    monkeypatch.setitem(dispatch._ACCELERATORS, np.ndarray, kernels)
    pairs = _layer_pairs()
    assert type(pairs["spatial_batchnorm"][2]).__name__ == "_FusedBatchnormCache"  # the fused kernels made it
    assert unnamed_cache_mixups(pairs) == []


def test_the_fused_float16_gelu_is_the_exact_gelu_rounded_once(kernels, monkeypatch):
    """With T = float16 the kernel rounded 1/√2 and 1/√(2π) to float16 (Φ off by up to 7e-4 of
    itself near -2.5) and multiplied x by the stored float16 Φ(x): 30 of 203 outputs were off by
    more than one rounding, as tests/test_precision.py asks of every backend with float16."""
    import math

    monkeypatch.setitem(dispatch._ACCELERATORS, np.ndarray, kernels)
    rng = np.random.default_rng(12345)
    x = np.concatenate([rng.standard_normal(200) * 3, [0.0, -8.0, 8.0]]).astype(np.float16)
    out, (_, cdf) = layers.gelu_forward(x)
    wide = x.astype(np.float64)
    exact_cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in wide])
    np.testing.assert_allclose(out, wide * exact_cdf, rtol=2**-11, atol=2**-25)  # half a float16 place
    np.testing.assert_allclose(cdf, exact_cdf, rtol=2**-11, atol=2**-25)
    dout = rng.standard_normal(x.shape).astype(np.float16)
    stored = cdf.astype(np.float64)  # the backward pass reads Φ(x) as stored
    expected = dout * (stored + wide * np.exp(-0.5 * wide**2) / math.sqrt(2 * math.pi))
    np.testing.assert_allclose(layers.gelu_backward(dout, (x, cdf)), expected, rtol=2**-11, atol=2**-25)


@pytest.mark.parametrize("dtype", FLOATS)
def test_fused_activations_and_softmax_loss(rng, kernels, monkeypatch, dtype):
    x = np.concatenate([rng.standard_normal(60) * 3, [0.0, -6.0, 6.0, -30.0, 30.0]]).astype(dtype).reshape(5, 13)
    dout = rng.standard_normal(x.shape).astype(dtype)
    w, b = rng.standard_normal((13, 4)).astype(dtype), rng.standard_normal(4).astype(dtype)
    y = np.array([0, 3, 1, 1, 2])

    def run():
        gelu, gelu_cache = layers.gelu_forward(x)
        relu, relu_cache = layers.relu_forward(x)
        hidden, _ = affine_relu_forward(x, w, b)
        loss, dscores = layers.softmax_loss(x, y)
        dgelu, drelu = layers.gelu_backward(dout, gelu_cache), layers.relu_backward(dout, relu_cache)
        return gelu, dgelu, relu, drelu, hidden, loss, dscores

    fused = ["gelu_forward", "gelu_backward", "relu_backward", "affine_relu", "softmax_loss"]
    assert_all_close(*fused_and_reference(kernels, monkeypatch, run, fused), dtype)


@pytest.mark.parametrize("rows", [37, 600])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("label_smoothing, reduction", [(0.2, "sum"), (0.2, "mean"), (0.0, "sum"), (0.5, "mean")])
def test_fused_softmax_loss_with_label_smoothing(rng, kernels, monkeypatch, dtype, label_smoothing, reduction, rows):
    """The recipe's loss (label smoothing 0.2, summed) in the one fused kernel, against the
    reference; 600 rows: each of the block's 256 threads takes two or three."""
    x = (rng.standard_normal((rows, 10)) * 4).astype(dtype)
    y = rng.integers(0, 10, rows)

    def run():
        return layers.softmax_loss(x, y, label_smoothing, reduction)

    fast, reference = fused_and_reference(kernels, monkeypatch, run, ["softmax_loss"])
    assert fast[0].dtype == fast[1].dtype == dtype
    assert_all_close(fast, reference, dtype)


def test_float16_scores_take_the_reference_softmax_loss(kernels, monkeypatch):
    """The fused loss is built for float32 and float64; float16 scores go the array-API way."""
    monkeypatch.setitem(dispatch._ACCELERATORS, np.ndarray, kernels)
    x = np.random.default_rng(0).standard_normal((6, 10)).astype(np.float16)
    y = np.arange(6)
    loss, dx = layers.softmax_loss(x, y, 0.2, "sum")
    with fused_kernels(False):
        ref_loss, ref_dx = layers.softmax_loss(x, y, 0.2, "sum")
    assert loss.dtype == dx.dtype == np.float16
    np.testing.assert_array_equal(dx, ref_dx)
    assert loss == ref_loss


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_fused_softmax_loss_with_a_masked_class(rng, kernels, monkeypatch, label_smoothing):
    """Scores of -inf away from the labels: the same loss and dx as the reference (finite
    without label smoothing, inf with it)."""
    x = rng.standard_normal((4, 5))
    x[[0, 1, 3], [2, 0, 4]] = -np.inf
    y = np.array([0, 3, 1, 2])
    fast, reference = fused_and_reference(
        kernels, monkeypatch, lambda: layers.softmax_loss(x, y, label_smoothing), ["softmax_loss"]
    )
    assert np.isfinite(fast[0]) == (label_smoothing == 0)
    assert_all_close(fast, reference, np.float64)


def test_fused_softmax_loss_gives_nan_for_an_out_of_range_label(kernels, monkeypatch):
    monkeypatch.setitem(dispatch._ACCELERATORS, np.ndarray, kernels)
    x = np.random.default_rng(0).standard_normal((4, 3))
    loss, dx = layers.softmax_loss(x, np.array([0, 3, 1, 2]))
    assert np.isnan(loss) and np.isnan(dx[1]).all() and np.isfinite(np.delete(dx, 1, axis=0)).all()


HYPER = {"learning_rate": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "decay_rate": 0.95, "epsilon": 1e-8}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("rule", sorted(optim.UPDATE_RULES))
def test_fused_update_rules_over_three_steps(rng, kernels, monkeypatch, dtype, rule):
    w0 = rng.standard_normal((4, 5)).astype(dtype)
    grads = [rng.standard_normal(w0.shape).astype(dtype) for _ in range(3)]
    hyper_keys, state_keys = optim.CONFIG_KEYS[rule]

    def run():
        w, config = w0.copy(), {key: HYPER[key] for key in hyper_keys if key in HYPER}
        for dw in grads:
            w, config = optim.UPDATE_RULES[rule](w, dw, config)
        return (w, *[np.asarray(config[key]) for key in state_keys])

    assert_all_close(*fused_and_reference(kernels, monkeypatch, run, [rule]), dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_fused_lookahead_moves_as_the_reference_bit_for_bit(rng, kernels, monkeypatch, dtype):
    """Three lookahead points over arrays the training moves in between, in one pass per array."""
    from xpnet.training.lookahead import Lookahead

    start = [rng.standard_normal(shape).astype(dtype) for shape in ((5, 3), (7,), (2, 3, 3, 3))]
    moves = [[rng.standard_normal(a.shape).astype(dtype) for a in start] for _ in range(3)]

    def run():
        arrays = [a.copy() for a in start]
        lookahead = Lookahead(arrays, total=12, every=2)
        for move in moves:
            for a, delta in zip(arrays, move):
                a += delta  # what the training steps between two points did
            lookahead.step(), lookahead.step()
        return (*arrays, *lookahead.slow)

    fast, reference = fused_and_reference(kernels, monkeypatch, run, ["lookahead"])
    for a, b in zip(fast, reference, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("direct", [False, True])
def test_fast_conv_net_gives_the_same_loss_and_gradients_through_the_fused_kernels(kernels, monkeypatch, direct):
    """Every fused layer of the fast CIFAR-10 recipe's net at once, with its caches passed
    between them; ``direct``: the whitening conv (12 taps) through the direct kernels."""
    from xpnet.cnn import FastConvNet

    monkeypatch.setattr(kernels, "direct_small_convs", direct)
    applied, forward = [], kernels.direct_conv_forward
    monkeypatch.setattr(kernels, "direct_conv_forward", lambda *a: applied.append(forward(*a)) or applied[-1])

    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((6, 3, 32, 32)), rng.integers(0, 10, 6)
    model = FastConvNet(widths=(4, 8, 8), dtype="float64", backend="numpy", seed=0)
    model.frozen["whiten_W"][...] = rng.standard_normal(model.frozen["whiten_W"].shape)

    def run():
        loss, grads = model.loss(X, y)
        return (loss, *[grads[name] for name in sorted(grads)])

    fused = ["im2col", "max_pool_forward", "max_pool_backward", "spatial_batchnorm_train", "gelu_forward"]
    assert_all_close(*fused_and_reference(kernels, monkeypatch, run, fused), np.float64)
    assert any(out is not None for out in applied) == direct  # the whitening conv ran without columns


def test_three_layer_convnet_with_batchnorm_gives_the_same_loss_gradients_and_scores_through_the_fused_kernels(
    kernels, monkeypatch
):
    """The course's net with batchnorm: spatial batchnorm, the pool and the convolution fused,
    in training mode (the loss and gradients) and in test mode (the scores, from the running
    averages the training pass left)."""
    from xpnet.cnn import ThreeLayerConvNet

    rng = np.random.default_rng(4)
    X, y = rng.standard_normal((5, 3, 8, 8)), rng.integers(0, 10, 5)

    def run():
        model = ThreeLayerConvNet(input_dim=(3, 8, 8), num_filters=4, filter_size=3, hidden_dim=6, weight_scale=0.3,
                                  dtype="float64", use_batchnorm=True, seed=0, backend="numpy")  # fmt: skip
        loss, grads = model.loss(X, y)
        return (loss, *[grads[name] for name in sorted(grads)], model.loss(X))

    fused = ["im2col", "max_pool_forward", "max_pool_backward", "spatial_batchnorm_train", "spatial_batchnorm_apply"]
    assert_all_close(*fused_and_reference(kernels, monkeypatch, run, fused), np.float64)


def test_the_published_fast_conv_net_gives_the_same_loss_and_gradients_with_every_switch_on(kernels, monkeypatch):
    """At the published widths (64, 256, 256), two images: grids of hundreds of blocks, planes
    of 961 down to 9 values a warp each, 256 channels' totals, through the direct kernels and
    the warp sums as a GPU run may switch them on."""
    from xpnet.cnn import FastConvNet

    monkeypatch.setattr(kernels, "direct_small_convs", True)
    monkeypatch.setattr(kernels, "warp_plane_sums", True)
    launches = counting_plane_sums(kernels, monkeypatch)
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((2, 3, 32, 32)), rng.integers(0, 10, 2)
    model = FastConvNet(dtype="float64", backend="numpy", seed=0)
    model.frozen["whiten_W"][...] = rng.standard_normal(model.frozen["whiten_W"].shape)

    def run():
        loss, grads = model.loss(X, y)
        return (loss, *[grads[name] for name in sorted(grads)])

    fused = ["direct_conv_forward", "spatial_batchnorm_train", "spatial_batchnorm_backward", "max_pool_forward"]
    assert_all_close(*fused_and_reference(kernels, monkeypatch, run, fused), np.float64)
    assert launches


def test_float16_activations_give_the_same_loss_and_gradients_through_the_fused_kernels(kernels, monkeypatch):
    """FastConvNet on float16 copies of its float32 parameters: the fused kernels (float16
    storage, arithmetic in float, batchnorm statistics in float32) against the reference
    layers (each computing in float32, rounding what it stores), to float16's precision."""
    from xpnet.cnn import FastConvNet

    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((6, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, 6)
    whiten_W = rng.standard_normal((24, 3, 2, 2)).astype(np.float32) * 0.5

    def run():
        model = FastConvNet(widths=(4, 8, 8), backend="numpy", seed=0, activation_dtype="float16")
        model.frozen["whiten_W"][...] = whiten_W
        loss, grads = model.loss(X, y)
        running = [bn[key].copy() for bn in model.bn_params for key in ("running_mean", "running_var")]
        return (loss, *[grads[name] for name in sorted(grads)], *running, model.loss(X))

    fused = ["im2col", "col2im", "max_pool_forward", "max_pool_backward", "spatial_batchnorm_train",
             "spatial_batchnorm_backward", "spatial_batchnorm_apply", "gelu_forward", "gelu_backward"]  # fmt: skip
    fast, reference = fused_and_reference(kernels, monkeypatch, run, fused)
    for a, b in zip(fast, reference, strict=True):
        assert a.dtype == b.dtype == np.float32  # gradients, statistics, loss and scores: the parameters' dtype
        scale = max(float(np.max(np.abs(b))), 1e-3)
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-2 * scale)


@pytest.mark.parametrize("switched_on", [False, True], ids=["defaults", "warp sums and direct convs"])
def test_the_fast_recipe_trains_the_same_through_the_fused_kernels(kernels, monkeypatch, switched_on):
    """20 steps of the fast CIFAR-10 recipe (grouped Nesterov updates with schedules held in
    arrays, lookahead, batchnorm running statistics, the whitening bias freezing) through
    every fused path at once, against the reference code, float64; ``switched_on``: also
    with batchnorm's plane sums a warp per plane and the whitening conv through the direct
    kernels, as a GPU run may choose (gpu_check.sh's RECIPE_FLAGS)."""
    from xpnet import get_backend
    from xpnet.recipes import Fast94Trainer

    monkeypatch.setattr(kernels, "warp_plane_sums", switched_on)
    monkeypatch.setattr(kernels, "direct_small_convs", switched_on)
    plane_sum_launches = counting_plane_sums(kernels, monkeypatch)
    backend = get_backend("numpy")
    settings, images, y, make_model = small_recipe(backend)

    def run():
        model = make_model()
        losses = Fast94Trainer(model, images, backend.asarray(y), settings, seed=0).train()
        state = [model.params[name] for name in sorted(model.params)]
        state += [bn[key] for bn in model.bn_params for key in ("running_mean", "running_var")]
        return (np.asarray(losses), *state)

    fused = ["nesterov_sgd", "spatial_batchnorm_train", "max_pool_backward", "gelu_backward", "col2im"]
    fused += ["direct_conv_forward"] if switched_on else []  # the whitening filters are frozen: no dw
    fast, reference = fused_and_reference(kernels, monkeypatch, run, fused)
    assert bool(plane_sum_launches) == switched_on
    for a, b in zip(fast, reference, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


# -- the launches of a training step, counted ------------------------------------------
# a reshape that copies is recorded as "copy (reshape)" (the method) or "reshape" (the function)
_COPIES = {"copy to C order", "copy into a slice", "astype", "copy (reshape)", "reshape", "copy"}


def test_the_census_records_copies_and_skips_views():
    """tests/kernel_census.py's arrays: a copy to another order is a launch, a view is none."""
    from kernel_census import CENSUS, Tracked

    x = np.arange(24.0).reshape(2, 3, 4).view(Tracked)
    CENSUS.launches.clear()
    CENSUS.recording = True
    try:
        _ = x.transpose(1, 0, 2), x.reshape(6, 4), x[:, 1:], np.reshape(x, (4, 6))  # views: nothing
        assert CENSUS.launches == []
        _ = x.transpose(1, 0, 2).reshape(3, 8)  # not expressible as a view: a copy
        y = x + 1.0
        y[0] = x[1]
        np.sum(x, axis=2)
    finally:
        CENSUS.recording = False
    names = [launch.name for launch in CENSUS.launches]
    assert names == ["copy (reshape)", "add", "copy into a slice", "sum"]
    assert [launch.written for launch in CENSUS.launches] == [192, 192, 96, 48]
    CENSUS.launches.clear()


def test_a_recipe_step_through_the_fused_kernels_copies_no_activation():
    """One training step of the fast CIFAR-10 recipe as CuPy would launch it, counted on the
    CPU: every layer runs as its fused kernel, and no activation-sized array is copied to
    another memory order or dtype on the way (the fused layers keep a convolution's order)."""
    from kernel_census import recipe_step_census

    census = recipe_step_census(batch=4, widths=(4, 8, 8))
    names = {launch.name for launch in census.launches}
    for kernel in ("im2col", "col2im", "max_pool_forward", "max_pool_backward", "batchnorm_gelu_train",
                   "batchnorm_gelu_backward", "gelu_forward", "gelu_backward", "nesterov_sgd"):  # fmt: skip
        assert f"kernel xpnet_{kernel}" in names
    activation = max(launch.written for launch in census.launches if launch.name == "kernel xpnet_gelu_forward")
    copies = [launch for launch in census.launches if launch.name in _COPIES and launch.written >= activation // 64]
    assert copies == []
    assert sum(launch.name == "GEMM" for launch in census.launches) == 22  # 7 convs, 6 of them with dx, the head


def test_a_three_layer_convnet_step_copies_no_activation():
    """The course's ThreeLayerConvNet under the Solver, as CuPy would launch it: the pool reads
    the convolution's output in its order and gives (N, F, H', W') back, which the affine layer
    flattens, and its gradient comes back, without a copy; the bias and the ReLU are one pass."""
    from kernel_census import convnet_step_census

    batch = 4
    census = convnet_step_census(batch)
    assert [launch.name for launch in census.launches].count("kernel xpnet_bias_relu") == 2  # conv, hidden layer
    pooled = batch * 32 * 16 * 16 * 4  # bytes of the pooled activations (32 filters on 32x32 images)
    large = [launch.name for launch in census.launches if launch.written >= pooled // 4]
    assert not set(large) & (_COPIES | {"add"})  # no copy, and no bias added on its own


def test_the_recipes_whitening_conv_runs_as_one_launch_through_the_direct_kernels():
    """With the direct kernels on, the whitening conv's im2col, its GEMM and its bias add are one
    launch that writes the whitened images (a raw kernel's output counted as written)."""
    from collections import Counter

    from kernel_census import census_kernels, recipe_step_census

    kernels = census_kernels()
    batch, launches = 4, {}
    for direct in (False, True):
        kernels.direct_small_convs = direct
        launches[direct] = recipe_step_census(batch, (8, 16, 16), kernels=kernels).launches
    before, after = (Counter(launch.name for launch in launches[d]) for d in (False, True))
    assert before - after == Counter({"kernel xpnet_im2col": 1, "GEMM": 1, "add": 1})
    assert after - before == Counter({"kernel direct_conv_forward_float": 1})
    (direct,) = [launch for launch in launches[True] if launch.name == "kernel direct_conv_forward_float"]
    assert direct.written == batch * 24 * 31 * 31 * 4
