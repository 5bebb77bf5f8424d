"""Convolutional layers, pooling, spatial normalisation and ThreeLayerConvNet: the
course's printed values, independent NumPy references, numerical gradients in
float64 on every backend, and the fast layers against the naive ones."""

import numpy as np
import pytest
from helpers import arr, check_backward, shared_cifar, to_np

from xpnet import fast_layers, layer_utils, layers
from xpnet.backend import backend_of
from xpnet.cnn import ThreeLayerConvNet
from xpnet.gradient_check import eval_numerical_gradient, rel_error, rounding_floor
from xpnet.solver import Solver


def reference_conv(x, w, b, stride, pad):
    """Four nested loops over NumPy arrays: what a convolution means."""
    n, c, h, wd = x.shape
    f, _, hh, ww = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    h_out, w_out = 1 + (h + 2 * pad - hh) // stride, 1 + (wd + 2 * pad - ww) // stride
    out = np.zeros((n, f, h_out, w_out))
    for i in range(n):
        for k in range(f):
            for r in range(h_out):
                for s in range(w_out):
                    window = xp[i, :, r * stride : r * stride + hh, s * stride : s * stride + ww]
                    out[i, k, r, s] = np.sum(window * w[k]) + b[k]
    return out


def reference_pool(x, ph, pw, stride):
    n, c, h, w = x.shape
    h_out, w_out = 1 + (h - ph) // stride, 1 + (w - pw) // stride
    out = np.zeros((n, c, h_out, w_out))
    for r in range(h_out):
        for s in range(w_out):
            out[:, :, r, s] = x[:, :, r * stride : r * stride + ph, s * stride : s * stride + pw].max(axis=(2, 3))
    return out


# ----------------------------------------------------------------------------- the course's printed values
def test_conv_forward_naive_reproduces_the_course_values(backend):
    x_shape, w_shape = (2, 3, 4, 4), (3, 3, 4, 4)
    x = np.linspace(-0.1, 0.5, num=np.prod(x_shape)).reshape(x_shape)
    w = np.linspace(-0.2, 0.3, num=np.prod(w_shape)).reshape(w_shape)
    b = np.linspace(-0.1, 0.2, num=3)
    out, _ = layers.conv_forward_naive(arr(backend, x), arr(backend, w), arr(backend, b), {"stride": 2, "pad": 1})
    correct_out = np.array(
        [
            [[[-0.08759809, -0.10987781], [-0.18387192, -0.2109216]],
             [[0.21027089, 0.21661097], [0.22847626, 0.23004637]],
             [[0.50813986, 0.54309974], [0.64082444, 0.67101435]]],
            [[[-0.98053589, -1.03143541], [-1.19128892, -1.24695841]],
             [[0.69108355, 0.66880383], [0.59480972, 0.56776003]],
             [[2.36270298, 2.36904306], [2.38090835, 2.38247847]]],
        ]
    )  # fmt: skip
    assert rel_error(to_np(out), correct_out) < 1e-7


def test_max_pool_forward_naive_reproduces_the_course_values(backend):
    x_shape = (2, 3, 4, 4)
    x = np.linspace(-0.3, 0.4, num=np.prod(x_shape)).reshape(x_shape)
    out, _ = layers.max_pool_forward_naive(arr(backend, x), {"pool_width": 2, "pool_height": 2, "stride": 2})
    correct_out = np.array(
        [
            [[[-0.26315789, -0.24842105], [-0.20421053, -0.18947368]],
             [[-0.14526316, -0.13052632], [-0.08631579, -0.07157895]],
             [[-0.02736842, -0.01263158], [0.03157895, 0.04631579]]],
            [[[0.09052632, 0.10526316], [0.14947368, 0.16421053]],
             [[0.20842105, 0.22315789], [0.26736842, 0.28210526]],
             [[0.32631579, 0.34105263], [0.38526316, 0.4]]],
        ]
    )  # fmt: skip
    assert rel_error(to_np(out), correct_out) < 1e-7


# ----------------------------------------------------------------------------- convolution
GEOMETRIES = [
    # x shape, w shape, stride, pad
    ((2, 3, 5, 5), (4, 3, 3, 3), 1, 1),
    ((2, 3, 7, 7), (3, 3, 3, 3), 2, 1),
    ((1, 2, 6, 7), (3, 2, 2, 3), 2, 0),  # a batch of one, a non-square kernel and input
    ((2, 1, 4, 4), (2, 1, 5, 5), 1, 2),
    # batches of 8 or more, whose columns the reference path lays out with the batch innermost
    ((8, 2, 7, 6), (3, 2, 3, 2), 2, 1),
    ((9, 1, 4, 4), (2, 1, 5, 5), 1, 2),  # offsets that see only padding
]
BACKWARD_GEOMETRIES = GEOMETRIES[:3] + GEOMETRIES[4:5]


@pytest.mark.parametrize("x_shape, w_shape, stride, pad", GEOMETRIES)
def test_conv_forward_matches_loops_and_fast_matches_naive(backend, np_rng, x_shape, w_shape, stride, pad):
    x, w, b = np_rng.standard_normal(x_shape), np_rng.standard_normal(w_shape), np_rng.standard_normal(w_shape[0])
    param = {"stride": stride, "pad": pad}
    naive, _ = layers.conv_forward_naive(arr(backend, x), arr(backend, w), arr(backend, b), param)
    fast, _ = fast_layers.conv_forward_fast(arr(backend, x), arr(backend, w), arr(backend, b), param)
    expected = reference_conv(x, w, b, stride, pad)
    assert backend_of(naive) == backend and backend_of(fast) == backend
    np.testing.assert_allclose(to_np(naive), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_np(fast), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x_shape, w_shape, stride, pad", BACKWARD_GEOMETRIES)
@pytest.mark.parametrize("kind", ["naive", "fast"])
def test_conv_backward_matches_numerical_gradients(backend, np_rng, x_shape, w_shape, stride, pad, kind):
    forward = layers.conv_forward_naive if kind == "naive" else fast_layers.conv_forward_fast
    backward = layers.conv_backward_naive if kind == "naive" else fast_layers.conv_backward_fast
    x, w = arr(backend, np_rng.standard_normal(x_shape)), arr(backend, np_rng.standard_normal(w_shape))
    b = arr(backend, np_rng.standard_normal(w_shape[0]))
    param = {"stride": stride, "pad": pad}
    out, cache = forward(x, w, b, param)
    dout = arr(backend, np_rng.standard_normal(tuple(out.shape)))
    grads = backward(dout, cache)
    check_backward(backend, lambda x, w, b: forward(x, w, b, param)[0], (x, w, b), grads, dout)


def test_fast_conv_backward_equals_naive_and_skips_the_input_gradient(backend, np_rng):
    x, w = arr(backend, np_rng.standard_normal((3, 4, 9, 9))), arr(backend, np_rng.standard_normal((5, 4, 3, 3)))
    b = arr(backend, np_rng.standard_normal(5))
    param = {"stride": 2, "pad": 1}
    out, naive_cache = layers.conv_forward_naive(x, w, b, param)
    _, fast_cache = fast_layers.conv_forward_fast(x, w, b, param)
    dout = arr(backend, np_rng.standard_normal(tuple(out.shape)))
    for naive, fast in zip(
        layers.conv_backward_naive(dout, naive_cache), fast_layers.conv_backward_fast(dout, fast_cache)
    ):
        assert rel_error(naive, fast) < 1e-12
    dx, dw, _ = fast_layers.conv_backward_fast(dout, fast_cache, input_grad=False)
    assert dx is None and tuple(dw.shape) == (5, 4, 3, 3)
    # a string is truthy: input_grad="False" computed dx, as did affine_backward's (and the sandwiches')
    with pytest.raises(ValueError, match="^conv_backward_fast: input_grad must be True or False, got 'False'$"):
        fast_layers.conv_backward_fast(dout, fast_cache, input_grad="False")
    _, affine_cache = layers.affine_forward(
        x, arr(backend, np_rng.standard_normal((324, 2))), arr(backend, np.zeros(2))
    )
    with pytest.raises(ValueError, match="^affine_backward: input_grad must be True or False, got 'no'$"):
        layers.affine_backward(arr(backend, np.ones((3, 2))), affine_cache, input_grad="no")
    _, relu_cache = layer_utils.conv_relu_forward(x, w, b, param)
    with pytest.raises(ValueError, match="input_grad must be True or False, got 'False'$"):
        layer_utils.conv_relu_backward(dout, relu_cache, input_grad="False")
    assert fast_layers.conv_backward_fast(dout, fast_cache, input_grad=np.bool_(False))[0] is None


def test_the_reference_columns_put_a_batch_of_eight_or_more_innermost_and_chain_as_laid_out(np_rng, monkeypatch):
    """The layout is a choice of speed, not of results: each side of it, and a convolution
    fed another's output as that is laid out, gives what the naive layers give. It was
    measured on CPUs only: a GPU's reference path keeps the channels first."""
    assert fast_layers.column_layout(np.zeros((7, 1, 1, 1))) == fast_layers.CHANNELS_FIRST
    assert fast_layers.column_layout(np.zeros((8, 1, 1, 1))) == fast_layers.BATCH_LAST
    with monkeypatch.context() as patch:
        patch.setattr(type(backend_of(np.zeros(1))), "is_gpu", True)
        assert fast_layers.column_layout(np.zeros((8, 1, 1, 1))) == fast_layers.CHANNELS_FIRST
    for n in (7, 8):
        x = np_rng.standard_normal((n, 3, 9, 8))
        w1, w2 = np_rng.standard_normal((4, 3, 3, 3)), np_rng.standard_normal((5, 4, 3, 3))
        b1, b2 = np_rng.standard_normal(4), np_rng.standard_normal(5)
        param = {"stride": 1, "pad": 1}
        fast1, cache1 = fast_layers.conv_forward_fast(x, w1, b1, param)
        fast2, cache2 = fast_layers.conv_forward_fast(fast1, w2, b2, param)
        naive1, naive_cache1 = layers.conv_forward_naive(x, w1, b1, param)
        naive2, naive_cache2 = layers.conv_forward_naive(naive1, w2, b2, param)
        batch_innermost = fast1.strides[0] == fast1.itemsize
        assert batch_innermost == (n >= 8) and (fast2.strides[0] == fast2.itemsize) == (n >= 8)
        assert_close_to(fast2, naive2)
        dout = np_rng.standard_normal(naive2.shape)
        dx2, dw2, db2 = fast_layers.conv_backward_fast(dout, cache2)
        naive_grads2 = layers.conv_backward_naive(dout, naive_cache2)
        for fast, naive in zip((dx2, dw2, db2), naive_grads2):
            assert_close_to(fast, naive)
        for fast, naive in zip(
            fast_layers.conv_backward_fast(dx2, cache1), layers.conv_backward_naive(naive_grads2[0], naive_cache1)
        ):
            assert_close_to(fast, naive)


def assert_close_to(actual, expected):
    """Equal but for rounding: within 1e-12 of expected's largest magnitude (two chained
    layers leave some elements near zero, where a relative error means nothing)."""
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12 * float(np.max(np.abs(expected))))


@pytest.mark.parametrize("dtype", [None, "float64"])
def test_channel_sum_is_the_sum_over_batch_and_space(backend, np_rng, dtype):
    from xpnet.conv_common import channel_sum

    x_np = np_rng.standard_normal((3, 5, 4, 7)).astype(np.float32)
    x = backend.asarray(x_np, dtype="float32")
    total = channel_sum(backend.xp, x, dtype=None if dtype is None else backend.xp.float64)
    assert tuple(total.shape) == (5,) and str(total.dtype).endswith(dtype or "float32")
    np.testing.assert_allclose(to_np(total), x_np.astype(np.float64).sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["naive", "fast"])
def test_conv_without_bias_equals_a_zero_bias_and_has_no_bias_gradient(backend, np_rng, kind):
    forward = layers.conv_forward_naive if kind == "naive" else fast_layers.conv_forward_fast
    backward = layers.conv_backward_naive if kind == "naive" else fast_layers.conv_backward_fast
    x, w = arr(backend, np_rng.standard_normal((2, 3, 7, 7))), arr(backend, np_rng.standard_normal((4, 3, 3, 3)))
    param = {"stride": 2, "pad": 1}
    out, cache = forward(x, w, None, param)
    with_zeros, zero_cache = forward(x, w, arr(backend, np.zeros(4)), param)
    np.testing.assert_array_equal(to_np(out), to_np(with_zeros))
    dout = arr(backend, np_rng.standard_normal(tuple(out.shape)))
    dx, dw, db = backward(dout, cache)
    dx0, dw0, _ = backward(dout, zero_cache)
    assert db is None
    np.testing.assert_array_equal(to_np(dx), to_np(dx0))
    np.testing.assert_array_equal(to_np(dw), to_np(dw0))


@pytest.mark.parametrize(
    "x_shape, w_shape, param, message",
    [
        (
            (2, 3, 6, 6),
            (4, 3, 3, 3),
            {"stride": 2, "pad": 0},
            r"kernel height 3 with stride 2 does not tile a size of 6",
        ),
        (
            (2, 3, 5, 5),
            (4, 2, 3, 3),
            {"stride": 1, "pad": 1},
            r"x \(2, 3, 5, 5\) has 3 channels but w \(4, 2, 3, 3\) expects 2",
        ),
        ((2, 3, 2, 2), (4, 3, 3, 3), {"stride": 1, "pad": 0}, r"kernel height 3 is larger than the input's 2"),
        ((2, 3, 5, 5), (0, 3, 3, 3), {"stride": 1, "pad": 1}, r"w \(0, 3, 3, 3\) is empty; it needs at least one"),
        ((2, 0, 5, 5), (4, 0, 3, 3), {"stride": 1, "pad": 1}, r"w \(4, 0, 3, 3\) is empty"),
        ((2, 3, 5, 5), (4, 3, 0, 3), {"stride": 1, "pad": 1}, r"w \(4, 3, 0, 3\) is empty"),
        ((2, 3, 5, 5), (4, 3, 3, 3), {"stride": 0, "pad": 1}, r"conv_param\['stride'\] must be a positive integer"),
        ((3, 5, 5), (4, 3, 3, 3), {"stride": 1, "pad": 1}, r"x must be \(N, C, H, W\)"),
        ((2, 3, 5, 5), (4, 3, 3, 3), {"strides": 2, "pad": 1}, r"conv_param has unknown key\(s\) 'strides'"),
    ],
)
@pytest.mark.parametrize("forward", [layers.conv_forward_naive, fast_layers.conv_forward_fast])
def test_conv_refuses_what_cannot_be_right(forward, x_shape, w_shape, param, message):
    x, w, b = np.ones(x_shape), np.ones(w_shape), np.ones(w_shape[0])
    with pytest.raises(ValueError, match=message):
        forward(x, w, b, param)


def test_numpy_integers_set_strides_pads_pools_and_groups(np_rng):
    """Parameters computed with NumPy (np.int64) are integers like Python's; NumPy bools are not."""
    x, w, b = np_rng.standard_normal((2, 4, 6, 6)), np_rng.standard_normal((3, 4, 3, 3)), np_rng.standard_normal(3)
    i = np.int64
    for forward in (layers.conv_forward_naive, fast_layers.conv_forward_fast):
        out, _ = forward(x, w, b, {"stride": i(1), "pad": i(1)})
        np.testing.assert_array_equal(out, forward(x, w, b, {"stride": 1, "pad": 1})[0])
        with pytest.raises(ValueError, match=r"conv_param\['pad'\] must be a non-negative integer, got np.True_"):
            forward(x, w, b, {"stride": 1, "pad": np.True_})
    for forward in (layers.max_pool_forward_naive, fast_layers.max_pool_forward_fast):
        out, _ = forward(x, {"pool_height": i(2), "pool_width": i(2), "stride": i(2)})
        np.testing.assert_array_equal(out, forward(x, {"pool_height": 2, "pool_width": 2, "stride": 2})[0])
    gamma, beta = np.ones((1, 4, 1, 1)), np.zeros((1, 4, 1, 1))
    out, _ = layers.spatial_groupnorm_forward(x, gamma, beta, i(2), {})
    np.testing.assert_array_equal(out, layers.spatial_groupnorm_forward(x, gamma, beta, 2, {})[0])
    for not_a_count in (True, 2.0, 0, -2):  # 2.0 was told that 2.0 groups must divide the 4 channels
        with pytest.raises(
            ValueError, match=rf"G, the number of groups, must be a positive integer, got {not_a_count}"
        ):
            layers.spatial_groupnorm_forward(x, gamma, beta, not_a_count, {})


# ----------------------------------------------------------------------------- max pooling
POOLS = [
    ((2, 3, 4, 4), 2, 2, 2),
    ((2, 2, 7, 7), 3, 3, 2),  # overlapping windows
    ((1, 2, 6, 4), 3, 2, 1),  # non-square, a batch of one
    ((2, 2, 5, 6), 1, 2, 2),  # one row: the separable maximum's row pass is a slice of x
    ((2, 2, 6, 5), 3, 1, 1),  # one column: its column pass is a slice of the rows' maximum
]


# Pools whose windows leave rows or columns over, which pool_param['drop_remainder'] drops as
# PyTorch's MaxPool2d does (the last one tiles: the option changes nothing there).
REMAINDER_POOLS = [((2, 3, 7, 5), 2, 2, 2), ((2, 2, 8, 7), 3, 3, 2), ((1, 2, 6, 4), 2, 2, 2)]


@pytest.mark.parametrize(
    "x_shape, ph, pw, stride, drop", [(*p, False) for p in POOLS] + [(*p, True) for p in REMAINDER_POOLS]
)
def test_max_pool_forward_matches_loops_and_backward_matches_numerical(backend, np_rng, x_shape, ph, pw, stride, drop):
    """Naive and fast pools against loops, and their gradients numerically. With drop_remainder
    the input is a transposed view, as a convolution's output is, and what the windows leave
    over gets no gradient."""
    x_np = np_rng.standard_normal(x_shape)
    if drop:
        x_np = np.permute_dims(np.ascontiguousarray(np.permute_dims(x_np, (1, 0, 2, 3))), (1, 0, 2, 3))
    param = {"pool_height": ph, "pool_width": pw, "stride": stride, **({"drop_remainder": True} if drop else {})}
    x = arr(backend, x_np)
    expected = reference_pool(x_np, ph, pw, stride)
    covered_h, covered_w = (expected.shape[2] - 1) * stride + ph, (expected.shape[3] - 1) * stride + pw
    for forward, backward in (
        (layers.max_pool_forward_naive, layers.max_pool_backward_naive),
        (fast_layers.max_pool_forward_fast, fast_layers.max_pool_backward_fast),
    ):
        out, cache = forward(x, param)
        np.testing.assert_array_equal(to_np(out), expected)
        dout = arr(backend, np_rng.standard_normal(expected.shape))
        dx = backward(dout, cache)
        assert tuple(dx.shape) == x_shape
        assert not to_np(dx)[:, :, covered_h:, :].any() and not to_np(dx)[:, :, :, covered_w:].any()
        check_backward(backend, lambda x, f=forward: f(x, param)[0], (x,), (dx,), dout)


def test_max_pool_ties_send_the_gradient_to_the_first_maximum(backend):
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = 5.0  # two maxima in the first 2x2 window; the top-right one comes first
    param = {"pool_height": 2, "pool_width": 2, "stride": 1}  # overlapping: ties in every window
    dout = np.arange(1.0, 5.0).reshape(1, 1, 2, 2)
    expected = np.zeros((1, 1, 3, 3))
    expected[0, 0, 0, 1] = 1.0 + 2.0  # windows (0, 0) and (0, 1)
    expected[0, 0, 1, 0] = 3.0  # window (1, 0)
    expected[0, 0, 1, 1] = 4.0  # window (1, 1): all zeros, its first element
    for forward, backward in (
        (layers.max_pool_forward_naive, layers.max_pool_backward_naive),
        (fast_layers.max_pool_forward_fast, fast_layers.max_pool_backward_fast),
    ):
        _, cache = forward(arr(backend, x), param)
        np.testing.assert_array_equal(to_np(backward(arr(backend, dout), cache)), expected)


@pytest.mark.parametrize("forward", [layers.max_pool_forward_naive, fast_layers.max_pool_forward_fast])
def test_a_one_by_one_pool_returns_a_new_array(forward):
    # The separable maximum of a 1x1 window is a slice of x, unless copied.
    x = np.arange(25.0).reshape(1, 1, 5, 5)
    out, _ = forward(x, {"pool_height": 1, "pool_width": 1, "stride": 2})
    np.testing.assert_array_equal(out, x[..., ::2, ::2])
    out[...] = -1.0
    np.testing.assert_array_equal(x, np.arange(25.0).reshape(1, 1, 5, 5))


@pytest.mark.parametrize("forward", [layers.max_pool_forward_naive, fast_layers.max_pool_forward_fast])
def test_pool_that_does_not_tile_is_refused(forward):
    with pytest.raises(ValueError, match=r"pool height 2 with stride 2 does not tile a size of 5 \(x \(1, 1, 5, 4\)"):
        forward(np.ones((1, 1, 5, 4)), {"pool_height": 2, "pool_width": 2, "stride": 2})
    with pytest.raises(ValueError, match=r"pool_param\['drop_remainder'\] must be True or False, got 'yes'"):
        forward(np.ones((1, 1, 5, 4)), {"pool_height": 2, "pool_width": 2, "stride": 2, "drop_remainder": "yes"})


# ----------------------------------------------------------------------------- the course's other names
COURSE_CONV_NAMES = [("im2col", "im2col"), ("strides", "strides"), ("im2col", "strides"), ("fast", "im2col")]
COURSE_POOL_NAMES = [("reshape", "reshape"), ("im2col", "im2col"), ("reshape", "fast"), ("fast", "im2col")]


@pytest.mark.parametrize("made_by, taken_by", COURSE_CONV_NAMES)
def test_the_course_conv_names_give_the_naive_results_and_share_caches(backend, np_rng, made_by, taken_by):
    """The course's fast_layers.py calls its convolution conv_forward_im2col, _strides and _fast;
    ported code may pair any forward name with any backward name."""
    x, w, b = np_rng.standard_normal((2, 3, 7, 7)), np_rng.standard_normal((4, 3, 3, 3)), np_rng.standard_normal(4)
    dout = np_rng.standard_normal((2, 4, 4, 4))
    param = {"stride": 2, "pad": 1}
    expected_out, naive_cache = layers.conv_forward_naive(x, w, b, param)
    expected_grads = layers.conv_backward_naive(dout, naive_cache)
    forward = getattr(fast_layers, f"conv_forward_{made_by}")
    backward = getattr(fast_layers, f"conv_backward_{taken_by}")
    out, cache = forward(arr(backend, x), arr(backend, w), arr(backend, b), param)
    np.testing.assert_allclose(to_np(out), expected_out, rtol=1e-12, atol=1e-12)
    for got, expected in zip(backward(arr(backend, dout), cache), expected_grads):
        np.testing.assert_allclose(to_np(got), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("made_by, taken_by", COURSE_POOL_NAMES)
def test_the_course_pool_names_give_the_naive_results_and_share_caches(backend, np_rng, made_by, taken_by):
    """The course's max_pool_forward_reshape took only square windows that tile the input; this
    one takes any pool, here an overlapping 3×2 one with ties."""
    x = np.round(np_rng.standard_normal((2, 3, 7, 6)))  # rounded: windows with ties
    param = {"pool_height": 3, "pool_width": 2, "stride": 2}
    dout = np_rng.standard_normal((2, 3, 3, 3))
    expected_out, naive_cache = layers.max_pool_forward_naive(x, param)
    forward = getattr(fast_layers, f"max_pool_forward_{made_by}")
    backward = getattr(fast_layers, f"max_pool_backward_{taken_by}")
    out, cache = forward(arr(backend, x), param)
    np.testing.assert_array_equal(to_np(out), expected_out)
    dx = backward(arr(backend, dout), cache)
    np.testing.assert_allclose(to_np(dx), layers.max_pool_backward_naive(dout, naive_cache), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("name", ["im2col", "strides"])
def test_the_course_conv_names_name_themselves_in_errors(name):
    x, w, b = np.ones((2, 3, 5, 5)), np.ones((4, 2, 3, 3)), np.ones(4)
    with pytest.raises(ValueError, match=rf"^conv_forward_{name}: .*has 3 channels but w"):
        getattr(fast_layers, f"conv_forward_{name}")(x, w, b, {"stride": 1, "pad": 1})
    _, cache = fast_layers.conv_forward_fast(x, np.ones((4, 3, 3, 3)), b, {"stride": 1, "pad": 1})
    with pytest.raises(ValueError, match=rf"^conv_backward_{name}: dout has shape \(2, 4, 4, 4\), expected"):
        getattr(fast_layers, f"conv_backward_{name}")(np.ones((2, 4, 4, 4)), cache)
    with pytest.raises(ValueError, match=rf"^conv_backward_{name}: .*the 5 parts conv_forward_{name} returns"):
        getattr(fast_layers, f"conv_backward_{name}")(np.ones((2, 4, 5, 5)), cache[:4])


@pytest.mark.parametrize("name", ["reshape", "im2col"])
def test_the_course_pool_names_name_themselves_in_errors(name):
    x = np.ones((2, 3, 5, 5))
    with pytest.raises(ValueError, match=rf"^max_pool_forward_{name}: "):
        getattr(fast_layers, f"max_pool_forward_{name}")(x, {"pool_height": 2, "pool_width": 2, "stride": 2})
    _, cache = fast_layers.max_pool_forward_fast(x[:, :, :4, :4], {"pool_height": 2, "pool_width": 2, "stride": 2})
    with pytest.raises(ValueError, match=rf"^max_pool_backward_{name}: dout has shape \(2, 3, 1, 1\), expected"):
        getattr(fast_layers, f"max_pool_backward_{name}")(np.ones((2, 3, 1, 1)), cache)
    with pytest.raises(ValueError, match=rf"^max_pool_backward_{name}: .*the 3 parts max_pool_forward_{name} returns"):
        getattr(fast_layers, f"max_pool_backward_{name}")(np.ones((2, 3, 2, 2)), cache[:2])


# ----------------------------------------------------------------------------- spatial normalisation
def test_spatial_batchnorm_normalises_each_channel_and_keeps_running_averages(backend):
    rng = np.random.RandomState(231)  # the course's data for this check
    N, C, H, W = 2, 3, 4, 5
    x_np = 4 * rng.randn(N, C, H, W) + 10
    gamma, beta = np.array([3.0, 4.0, 5.0]), np.array([6.0, 7.0, 8.0])
    bn_param = {"mode": "train"}
    out, _ = layers.spatial_batchnorm_forward(arr(backend, x_np), arr(backend, gamma), arr(backend, beta), bn_param)
    out = to_np(out)
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), beta, atol=1e-12)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), gamma, rtol=1e-5)  # eps 1e-5 against var ~16
    np.testing.assert_allclose(to_np(bn_param["running_mean"]), 0.1 * x_np.mean(axis=(0, 2, 3)), rtol=1e-12)
    bn_param["mode"] = "test"
    test_out, _ = layers.spatial_batchnorm_forward(
        arr(backend, x_np), arr(backend, gamma), arr(backend, beta), bn_param
    )
    expected = (x_np - to_np(bn_param["running_mean"])[:, None, None]) / np.sqrt(
        to_np(bn_param["running_var"])[:, None, None] + 1e-5
    ) * gamma[:, None, None] + beta[:, None, None]
    np.testing.assert_allclose(to_np(test_out), expected, rtol=1e-12)


def test_spatial_batchnorm_can_average_the_unbiased_variance_as_pytorch_does(backend, np_rng):
    x_np = 1 + 3 * np_rng.standard_normal((4, 3, 2, 5))
    bn_param = {"mode": "train", "momentum": 0.6, "unbiased_running_var": True}
    layers.spatial_batchnorm_forward(arr(backend, x_np), None, arr(backend, np.zeros(3)), bn_param)
    unbiased = x_np.transpose(1, 0, 2, 3).reshape(3, -1).var(axis=1, ddof=1)
    np.testing.assert_allclose(to_np(bn_param["running_var"]), 0.4 * unbiased, rtol=1e-12)
    np.testing.assert_allclose(to_np(bn_param["running_mean"]), 0.4 * x_np.mean(axis=(0, 2, 3)), rtol=1e-12)


def test_spatial_batchnorm_backward(backend, np_rng):
    x = arr(backend, 3 + 2 * np_rng.standard_normal((2, 3, 4, 5)))
    gamma, beta = arr(backend, np_rng.standard_normal(3)), arr(backend, np_rng.standard_normal(3))
    dout = arr(backend, np_rng.standard_normal((2, 3, 4, 5)))
    _, cache = layers.spatial_batchnorm_forward(x, gamma, beta, {"mode": "train"})
    grads = layers.spatial_batchnorm_backward(dout, cache)
    forward = lambda x, g, b: layers.spatial_batchnorm_forward(x, g, b, {"mode": "train"})[0]  # noqa: E731
    check_backward(backend, forward, (x, gamma, beta), grads, dout, tol=1e-6)


def test_spatial_batchnorm_gelu_backward(backend, np_rng):
    x = arr(backend, 3 + 2 * np_rng.standard_normal((2, 3, 4, 5)))
    gamma, beta = arr(backend, np_rng.standard_normal(3)), arr(backend, np_rng.standard_normal(3))
    dout = arr(backend, np_rng.standard_normal((2, 3, 4, 5)))
    for scale in (gamma, None):  # FastConvNet's batchnorms have no scale
        out, cache = layers.spatial_batchnorm_gelu_forward(x, scale, beta, {"mode": "train"})
        normed, _ = layers.spatial_batchnorm_forward(x, scale, beta, {"mode": "train"})
        np.testing.assert_allclose(to_np(out), to_np(layers.gelu_forward(normed)[0]), rtol=1e-15, atol=1e-15)
        dx, dgamma, dbeta = layers.spatial_batchnorm_gelu_backward(dout, cache)
        assert (dgamma is None) == (scale is None)
        if scale is None:
            forward = lambda x, b: layers.spatial_batchnorm_gelu_forward(x, None, b, {"mode": "train"})[0]  # noqa: E731
            check_backward(backend, forward, (x, beta), (dx, dbeta), dout, tol=1e-6)
        else:
            forward = lambda x, g, b: layers.spatial_batchnorm_gelu_forward(x, g, b, {"mode": "train"})[0]  # noqa: E731
            check_backward(backend, forward, (x, gamma, beta), (dx, dgamma, dbeta), dout, tol=1e-6)


def test_backward_after_a_test_mode_forward_is_refused_by_name(backend, np_rng):
    """A test-mode batchnorm keeps no cache; each backward pass says so rather than failing to unpack None."""
    x2, x4 = arr(backend, np_rng.standard_normal((4, 3))), arr(backend, np_rng.standard_normal((2, 3, 4, 4)))
    gamma, beta = arr(backend, np.ones(3)), arr(backend, np.zeros(3))
    for forward, backward, x in (
        (layers.batchnorm_forward, layers.batchnorm_backward, x2),
        (layers.batchnorm_forward, layers.batchnorm_backward_alt, x2),
        (layers.spatial_batchnorm_forward, layers.spatial_batchnorm_backward, x4),
        (layers.spatial_batchnorm_gelu_forward, layers.spatial_batchnorm_gelu_backward, x4),
    ):
        out, cache = forward(x, gamma, beta, {"mode": "test"})
        assert cache is None
        with pytest.raises(
            ValueError, match=f"^{backward.__name__}: the cache is None, .* forward pass in train mode$"
        ):
            backward(out, cache)
    w, b = arr(backend, np_rng.standard_normal((3, 3, 3, 3))), arr(backend, np.zeros(3))
    out, cache = layer_utils.conv_bn_relu_forward(x4, w, b, gamma, beta, {"stride": 1, "pad": 1}, {"mode": "test"})
    with pytest.raises(ValueError, match="^conv_bn_relu_backward: the cache is None"):
        layer_utils.conv_bn_relu_backward(out, cache)


def test_spatial_groupnorm_normalises_each_group(backend):
    rng = np.random.RandomState(231)
    N, C, H, W, G = 2, 6, 4, 5, 2
    x_np = 4 * rng.randn(N, C, H, W) + 10
    gamma, beta = np.ones((1, C, 1, 1)), np.zeros((1, C, 1, 1))
    out, _ = layers.spatial_groupnorm_forward(arr(backend, x_np), arr(backend, gamma), arr(backend, beta), G, {})
    groups = to_np(out).reshape(N, G, -1)
    np.testing.assert_allclose(groups.mean(axis=2), 0.0, atol=1e-12)
    np.testing.assert_allclose(groups.std(axis=2), 1.0, rtol=1e-5)
    scaled, _ = layers.spatial_groupnorm_forward(
        arr(backend, x_np), arr(backend, 2 * gamma), arr(backend, beta + 3), G, {}
    )
    np.testing.assert_allclose(to_np(scaled), 2 * to_np(out) + 3, rtol=1e-12)


def test_spatial_groupnorm_backward(backend, np_rng):
    x = arr(backend, 3 + 2 * np_rng.standard_normal((2, 6, 3, 4)))
    gamma, beta = arr(backend, np_rng.standard_normal((1, 6, 1, 1))), arr(backend, np_rng.standard_normal((1, 6, 1, 1)))
    dout = arr(backend, np_rng.standard_normal((2, 6, 3, 4)))
    _, cache = layers.spatial_groupnorm_forward(x, gamma, beta, 3, {})
    grads = layers.spatial_groupnorm_backward(dout, cache)
    forward = lambda x, g, b: layers.spatial_groupnorm_forward(x, g, b, 3, {})[0]  # noqa: E731
    check_backward(backend, forward, (x, gamma, beta), grads, dout, tol=1e-6)


def test_spatial_groupnorm_takes_an_empty_batch_and_refuses_a_dout_of_another_shape(backend, np_rng):
    """Groupnorm works per sample, as layernorm does: an empty batch passes through. A dout with
    the cache's size but its height and width swapped (channels-last code) is refused, not
    reshaped into wrong gradients."""
    gamma, beta = arr(backend, np_rng.standard_normal((1, 4, 1, 1))), arr(backend, np_rng.standard_normal((1, 4, 1, 1)))
    empty = arr(backend, np.zeros((0, 4, 3, 5)))
    out, cache = layers.spatial_groupnorm_forward(empty, gamma, beta, 2, {})
    dx, dgamma, dbeta = layers.spatial_groupnorm_backward(out, cache)
    assert tuple(out.shape) == tuple(dx.shape) == (0, 4, 3, 5)
    np.testing.assert_array_equal(to_np(dgamma), np.zeros((1, 4, 1, 1)))
    np.testing.assert_array_equal(to_np(dbeta), np.zeros((1, 4, 1, 1)))
    _, cache = layers.spatial_groupnorm_forward(arr(backend, np_rng.standard_normal((2, 4, 3, 5))), gamma, beta, 2, {})
    with pytest.raises(ValueError, match=r"dout has shape \(2, 4, 5, 3\), expected \(2, 4, 3, 5\)"):
        layers.spatial_groupnorm_backward(arr(backend, np.zeros((2, 4, 5, 3))), cache)


def test_spatial_norms_refuse_bad_arguments():
    x = np.ones((2, 6, 3, 3))
    with pytest.raises(ValueError, match=r"G = 4 groups must divide the 6 channels of x \(2, 6, 3, 3\)"):
        layers.spatial_groupnorm_forward(x, np.ones((1, 6, 1, 1)), np.zeros((1, 6, 1, 1)), 4, {})
    with pytest.raises(ValueError, match=r"gamma must be \(1, 6, 1, 1\)"):
        layers.spatial_groupnorm_forward(x, np.ones(6), np.zeros((1, 6, 1, 1)), 2, {})
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        layers.spatial_batchnorm_forward(np.ones((1, 6, 1, 1)), np.ones(6), np.zeros(6), {"mode": "train"})


# ----------------------------------------------------------------------------- sandwiches
def test_conv_sandwiches(backend, np_rng):
    x = arr(backend, np_rng.standard_normal((2, 3, 6, 6)))
    w, b = arr(backend, np_rng.standard_normal((3, 3, 3, 3))), arr(backend, np_rng.standard_normal(3))
    gamma, beta = arr(backend, np_rng.standard_normal(3)), arr(backend, np_rng.standard_normal(3))
    conv, pool = {"stride": 1, "pad": 1}, {"pool_height": 2, "pool_width": 2, "stride": 2}

    out, cache = layer_utils.conv_relu_pool_forward(x, w, b, conv, pool)
    dout = arr(backend, np_rng.standard_normal(tuple(out.shape)))
    grads = layer_utils.conv_relu_pool_backward(dout, cache)
    check_backward(
        backend, lambda x, w, b: layer_utils.conv_relu_pool_forward(x, w, b, conv, pool)[0], (x, w, b), grads, dout
    )

    out, cache = layer_utils.conv_relu_forward(x, w, b, conv)
    dout = arr(backend, np_rng.standard_normal(tuple(out.shape)))
    grads = layer_utils.conv_relu_backward(dout, cache)
    check_backward(backend, lambda x, w, b: layer_utils.conv_relu_forward(x, w, b, conv)[0], (x, w, b), grads, dout)

    def bn_forward(x, w, gamma, beta):
        return layer_utils.conv_bn_relu_forward(x, w, b, gamma, beta, conv, {"mode": "train"})[0]

    out, cache = layer_utils.conv_bn_relu_forward(x, w, b, gamma, beta, conv, {"mode": "train"})
    dout = arr(backend, np_rng.standard_normal(tuple(out.shape)))
    dx, dw, db, dgamma, dbeta = layer_utils.conv_bn_relu_backward(dout, cache)
    assert float(backend.xp.max(backend.xp.abs(db))) < 1e-12  # the batch mean cancels the bias
    check_backward(backend, bn_forward, (x, w, gamma, beta), (dx, dw, dgamma, dbeta), dout, tol=1e-6)


# ----------------------------------------------------------------------------- ThreeLayerConvNet
def test_three_layer_convnet_shapes_and_initial_loss(backend):
    model = ThreeLayerConvNet(input_dim=(3, 8, 8), num_filters=4, filter_size=3, hidden_dim=6, seed=0, backend=backend)
    shapes = {k: tuple(v.shape) for k, v in model.params.items()}
    assert shapes == {"W1": (4, 3, 3, 3), "b1": (4,), "W2": (64, 6), "b2": (6,), "W3": (6, 10), "b3": (10,)}
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((5, 3, 8, 8)), rng.integers(0, 10, 5)
    loss, _ = model.loss(X, y)
    assert float(loss) == pytest.approx(np.log(10), rel=1e-3)  # tiny weights: uniform scores
    model.reg = 1e3
    reg_loss, _ = model.loss(X, y)
    weights = sum((to_np(model.params[k]) ** 2).sum() for k in ("W1", "W2", "W3"))
    assert float(reg_loss) == pytest.approx(float(loss) + 0.5 * 1e3 * weights, rel=1e-5)
    assert tuple(model.loss(X).shape) == (5, 10)


@pytest.mark.parametrize("reg", [0.0, 0.5])
def test_three_layer_convnet_gradients(backend, reg):
    model = ThreeLayerConvNet(
        input_dim=(2, 6, 6), num_filters=3, filter_size=3, hidden_dim=5, num_classes=4, weight_scale=0.3,
        reg=reg, dtype="float64", seed=0, backend=backend,
    )  # fmt: skip
    rng = np.random.default_rng(1)
    X = backend.asarray(rng.standard_normal((3, 2, 6, 6)), dtype="float64")
    y = backend.asarray(rng.integers(0, 4, 3))
    loss, grads = model.loss(X, y)
    for name in sorted(grads):
        numeric = eval_numerical_gradient(lambda _: model.loss(X, y)[0], model.params[name], verbose=False, h=1e-6)
        assert rel_error(numeric, grads[name], floor=1e-7) < 1e-6, name


def test_three_layer_convnet_with_batchnorm_has_its_parameters_and_running_averages(backend):
    """use_batchnorm, as the ECE C147/C247 version of the net takes it (positionally too, after dtype)."""
    model = ThreeLayerConvNet((3, 8, 8), 4, 3, 6, 10, 1e-3, 0.0, "float32", True, seed=0, backend=backend)
    shapes = {k: tuple(v.shape) for k, v in model.params.items()}
    assert shapes == {"W1": (4, 3, 3, 3), "b1": (4,), "W2": (64, 6), "b2": (6,), "W3": (6, 10), "b3": (10,),
                      "gamma1": (4,), "beta1": (4,), "gamma2": (6,), "beta2": (6,)}  # fmt: skip
    assert model.buffers() is model.bn_params and len(model.bn_params) == 2
    X = np.random.default_rng(0).standard_normal((5, 3, 8, 8))
    model.loss(X, np.arange(5))
    for bn_param, size in zip(model.bn_params, (4, 6)):
        assert tuple(bn_param["running_mean"].shape) == (size,) and float(backend.xp.max(bn_param["running_var"])) > 0
    assert ThreeLayerConvNet(input_dim=(3, 8, 8), num_filters=4, filter_size=3, hidden_dim=6).bn_params == []


@pytest.mark.parametrize("reg", [0.0, 0.5])
def test_three_layer_convnet_with_batchnorm_gradients(backend, reg):
    model = ThreeLayerConvNet(
        input_dim=(2, 6, 6), num_filters=3, filter_size=3, hidden_dim=5, num_classes=4, weight_scale=0.3,
        reg=reg, dtype="float64", use_batchnorm=True, seed=0, backend=backend,
    )  # fmt: skip
    xp = backend.xp
    for i, size in ((1, 3), (2, 5)):  # scales and shifts away from 1 and 0, so that a mix-up would show
        model.params[f"gamma{i}"] = backend.asarray(np.linspace(0.5, 1.5, size), dtype="float64")
        model.params[f"beta{i}"] = backend.asarray(np.linspace(-0.2, 0.3, size), dtype="float64")
    rng = np.random.default_rng(1)
    X = backend.asarray(rng.standard_normal((4, 2, 6, 6)), dtype="float64")
    y = backend.asarray(rng.integers(0, 4, 4))
    loss, grads = model.loss(X, y)
    assert sorted(grads) == sorted(model.params)
    # The batch mean cancels the biases before each batchnorm: their gradients vanish.
    assert float(xp.max(xp.abs(grads["b1"]))) < 1e-12 and float(xp.max(xp.abs(grads["b2"]))) < 1e-12
    floor = rounding_floor(loss)
    for name in sorted(grads):
        numeric = eval_numerical_gradient(lambda _: model.loss(X, y)[0], model.params[name], verbose=False)
        assert rel_error(numeric, grads[name], floor=floor) < 1e-6, name


def test_three_layer_convnet_with_batchnorm_scores_each_image_alone_at_test_time(backend):
    """Test mode normalises with the running averages, not the batch: an image's scores do not
    depend on the others in its batch, and a training step moves them."""
    model = ThreeLayerConvNet(input_dim=(2, 6, 6), num_filters=3, filter_size=3, hidden_dim=5, weight_scale=0.3,
                              dtype="float64", use_batchnorm=True, seed=0, backend=backend)  # fmt: skip
    rng = np.random.default_rng(2)
    X = backend.asarray(rng.standard_normal((6, 2, 6, 6)) + 1.0, dtype="float64")
    for _ in range(3):
        model.loss(X, backend.asarray(rng.integers(0, 10, 6)))
    scores = to_np(model.loss(X))
    for i in (0, 5):
        np.testing.assert_allclose(to_np(model.loss(X[i : i + 1, ...])), scores[i : i + 1], rtol=1e-12, atol=1e-12)
    assert all(bn_param["mode"] == "test" for bn_param in model.bn_params)
    model.loss(X[:2, ...], backend.asarray(rng.integers(0, 10, 2)))  # a training step: batch statistics
    assert all(bn_param["mode"] == "train" for bn_param in model.bn_params)
    assert not np.allclose(to_np(model.loss(X[:1, ...])), scores[:1])  # the averages moved with that step


def test_three_layer_convnet_with_batchnorm_overfits_50_digit_images_and_validates_on_running_averages():
    """Weights of std 1e-2 and 50 images: batchnorm makes the net train; the validation
    accuracy (test mode, the running averages) shows the averages track the batches."""
    from xpnet.data_utils import load_digits_data

    data = load_digits_data(seed=0, images=True)
    small = {"X_train": data["X_train"][:50], "y_train": data["y_train"][:50], "X_val": data["X_val"],
             "y_val": data["y_val"]}  # fmt: skip
    model = ThreeLayerConvNet(input_dim=(1, 8, 8), num_filters=8, filter_size=3, hidden_dim=50, weight_scale=1e-2,
                              use_batchnorm=True, seed=0, backend="numpy")  # fmt: skip
    solver = Solver(model, small, update_rule="adam", optim_config={"learning_rate": 1e-3}, batch_size=25,
                    num_epochs=10, verbose=False, seed=0)  # fmt: skip
    solver.train()
    assert solver.train_acc_history[-1] >= 0.9
    assert solver.val_acc_history[-1] >= 0.5  # 10 classes: chance is 0.1


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(input_dim=(3, 7, 8)), "even height and width"),
        (dict(filter_size=4), "filter_size must be odd"),
        (dict(num_classes=1), "num_classes must be an integer >= 2"),
        (dict(weight_scale=float("nan")), "weight_scale must be a finite number"),
        (dict(input_dim=(32, 32)), r"input_dim must be \(C, H, W\)"),
    ],
)
def test_three_layer_convnet_refuses_bad_arguments(options, message):
    with pytest.raises(ValueError, match=message):
        ThreeLayerConvNet(**options)


def test_conv_nets_name_the_image_layout_they_expect():
    """load_CIFAR10 returns images channels last; the nets and the Solver say how to turn them."""
    images = np.zeros((4, 8, 8, 3))  # (N, H, W, C)
    data = {"X_train": images, "y_train": np.arange(4), "X_val": images, "y_val": np.arange(4)}
    hint = r"these look like images with their channels last: {}\.transpose\(0, 3, 1, 2\) puts them first"
    model = ThreeLayerConvNet(input_dim=(3, 8, 8), num_filters=2, filter_size=3, hidden_dim=4)
    with pytest.raises(
        ValueError, match=r"ThreeLayerConvNet: inputs must be \(N, 3, 8, 8\), got \(4, 8, 8, 3\); " + hint.format("X")
    ):
        model.loss(images)
    with pytest.raises(
        ValueError,
        match=r"samples have shape \(8, 8, 3\) but the model expects \(3, 8, 8\); " + hint.format(r"data\['X_train'\]"),
    ):
        Solver(model, data, batch_size=2)
    # Flattened into rows, as the fully connected nets take them; one image without its batch axis.
    with pytest.raises(
        ValueError, match=r"got \(4, 192\); these look like images flattened into rows: X\.reshape\(-1, 3, 8, 8\)"
    ):
        model.loss(np.zeros((4, 192)))
    rows = {**data, "X_train": np.zeros((4, 192))}
    with pytest.raises(ValueError, match=r"flattened into rows: data\['X_train'\]\.reshape\(-1, 3, 8, 8\) restores"):
        Solver(model, rows, batch_size=2)
    with pytest.raises(ValueError, match=r"got \(3, 8, 8\); for one image, give a batch of one: X\[None\]$"):
        model.loss(np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match=r"inputs must be \(N, 3, 8, 8\), got \(4, 3, 8, 7\)$"):  # no hint
        model.loss(np.zeros((4, 3, 8, 7)))
    # One-channel images as load_digits gives them, (N, H, W)
    gray = ThreeLayerConvNet(input_dim=(1, 8, 8), num_filters=2, filter_size=3, hidden_dim=4)
    hint = r"got \(4, 8, 8\); these look like one-channel images without their channel axis: {}\[:, None\] adds it$"
    with pytest.raises(ValueError, match=hint.format("X")):
        gray.predict(np.zeros((4, 8, 8)))
    with pytest.raises(ValueError, match=r"samples have shape \(8, 8\) but the model expects \(1, 8, 8\); these look "
                                         r"like one-channel images without their channel axis: data\['X_val'\]\[:, None\]"):  # fmt: skip
        Solver(gray, {**data, "X_train": np.zeros((4, 1, 8, 8)), "X_val": np.zeros((4, 8, 8))}, batch_size=2)


def test_conv_relu_pool_equals_the_course_order_exactly_ties_included(backend, np_rng):
    # It pools before the bias and the ReLU; the course's order is conv (with its bias), ReLU,
    # pool. Small integers make ties, windows with no positive value, and zeros: every case
    # where the order could show. The gradient is made of integers too, so that every sum is
    # exact and the bias gradient (summed over the pooled values here, over the convolution's
    # in the course's order) must come out equal to the last bit.
    x = arr(backend, np_rng.integers(-1, 2, size=(3, 2, 6, 6)).astype(np.float64))
    w = arr(backend, np_rng.integers(-1, 2, size=(4, 2, 3, 3)).astype(np.float64))
    b = arr(backend, np.array([0.0, 1.0, -1.0, 0.0]))
    conv, pool = {"stride": 1, "pad": 1}, {"pool_height": 2, "pool_width": 2, "stride": 2}
    out, cache = layer_utils.conv_relu_pool_forward(x, w, b, conv, pool)
    a, conv_cache = fast_layers.conv_forward_fast(x, w, b, conv)
    relu, relu_cache = layers.relu_forward(a)
    expected, pool_cache = fast_layers.max_pool_forward_fast(relu, pool)
    np.testing.assert_array_equal(to_np(out), to_np(expected))
    assert np.sum(to_np(out) == 0) > out.shape[0]  # windows with nothing positive did occur
    dout = arr(backend, np_rng.integers(-3, 4, size=tuple(out.shape)).astype(np.float64))
    grads = layer_utils.conv_relu_pool_backward(dout, cache)
    da = layers.relu_backward(fast_layers.max_pool_backward_fast(dout, pool_cache), relu_cache)
    course = fast_layers.conv_backward_fast(da, conv_cache)
    for got, want in zip(grads, course, strict=True):
        np.testing.assert_array_equal(to_np(got), to_np(want))


def test_conv_relu_equals_the_convolution_with_its_bias_then_the_relu(backend, np_rng):
    """conv_relu adds the bias in the ReLU's pass: the values are those of the plain layers."""
    x = arr(backend, np_rng.integers(-1, 2, size=(2, 3, 5, 5)).astype(np.float64))
    w = arr(backend, np_rng.integers(-1, 2, size=(4, 3, 3, 3)).astype(np.float64))
    b = arr(backend, np.array([0.0, 1.0, -1.0, 2.0]))
    conv = {"stride": 2, "pad": 1}
    out, cache = layer_utils.conv_relu_forward(x, w, b, conv)
    a, conv_cache = fast_layers.conv_forward_fast(x, w, b, conv)
    expected, relu_cache = layers.relu_forward(a)
    np.testing.assert_array_equal(to_np(out), to_np(expected))
    dout = arr(backend, np_rng.integers(-3, 4, size=tuple(out.shape)).astype(np.float64))
    grads = layer_utils.conv_relu_backward(dout, cache)
    course = fast_layers.conv_backward_fast(layers.relu_backward(dout, relu_cache), conv_cache)
    for got, want in zip(grads, course, strict=True):
        np.testing.assert_array_equal(to_np(got), to_np(want))


def test_conv_sandwiches_check_the_bias_against_the_filters_by_their_own_name(backend):
    x, w = arr(backend, np.ones((1, 2, 4, 4))), arr(backend, np.ones((3, 2, 3, 3)))
    conv, pool = {"stride": 1, "pad": 1}, {"pool_height": 2, "pool_width": 2, "stride": 2}
    with pytest.raises(ValueError, match=r"conv_relu_forward: b \(2,\) must have one bias per filter"):
        layer_utils.conv_relu_forward(x, w, arr(backend, np.ones(2)), conv)
    with pytest.raises(ValueError, match=r"conv_relu_pool_forward: b \(4,\) must have one bias per filter"):
        layer_utils.conv_relu_pool_forward(x, w, arr(backend, np.ones(4)), conv, pool)


def cifar_images(n_train, n_val):
    from xpnet.data_utils import get_CIFAR10_data

    data = get_CIFAR10_data(shared_cifar(), num_training=n_train, num_validation=n_val, num_test=10)
    return data


@pytest.mark.skipif(shared_cifar() is None, reason="CIFAR-10 not present (set XPNET_DATA_DIR)")
def test_three_layer_convnet_overfits_50_cifar_images():
    data = cifar_images(1000, 100)
    small = {
        "X_train": data["X_train"][:50],
        "y_train": data["y_train"][:50],
        "X_val": data["X_val"],
        "y_val": data["y_val"],
    }
    model = ThreeLayerConvNet(weight_scale=1e-2, seed=0, backend="numpy")
    solver = Solver(model, small, update_rule="adam", optim_config={"learning_rate": 1e-3}, batch_size=25,
                    num_epochs=15, verbose=False, seed=0)  # fmt: skip
    solver.train()
    assert solver.train_acc_history[-1] >= 0.9


@pytest.mark.slow
@pytest.mark.skipif(shared_cifar() is None, reason="CIFAR-10 not present (set XPNET_DATA_DIR)")
def test_three_layer_convnet_one_epoch_of_cifar10_beats_40_percent():
    data = cifar_images(49000, 1000)
    model = ThreeLayerConvNet(weight_scale=1e-3, hidden_dim=500, reg=1e-3, seed=0, backend="numpy")
    solver = Solver(model, data, update_rule="adam", optim_config={"learning_rate": 1e-3}, batch_size=50,
                    num_epochs=1, print_every=100, verbose=True, seed=0)  # fmt: skip
    solver.train()
    assert solver.best_val_acc > 0.40
