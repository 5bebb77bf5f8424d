"""Pieces of the fast CIFAR-10 recipe: erf and the exact GELU, softmax loss with label
smoothing and summed reduction, batchnorm without a scale parameter; against
independent references and numerical gradients in float64 on every backend."""

import math

import numpy as np
import pytest
from helpers import arr, check_backward, labels, to_np

from xpnet import cache_blocks, layers
from xpnet.gradient_check import eval_numerical_gradient, rel_error, rounding_floor
from xpnet.special import erf, erfc, normal_cdf, normal_pdf


def test_erf_and_erfc_to_a_few_ulp(backend):
    edges = [0.0, 0.46875, -0.46875, 0.46876, 4.0, -4.0, 4.0001, 26.0, -26.0, 27.5, 40.0]  # Cody's ranges meet
    z = np.concatenate([np.linspace(-9, 9, 4001), edges])
    got_erf, got_erfc = to_np(erf(arr(backend, z))), to_np(erfc(arr(backend, z)))
    np.testing.assert_allclose(got_erf, [math.erf(v) for v in z], rtol=0, atol=2e-15)
    expected = np.array([math.erfc(v) for v in z])
    np.testing.assert_allclose(got_erfc, expected, rtol=5e-14, atol=1e-300)
    cdf = 0.5 * np.array([math.erfc(-v / math.sqrt(2)) for v in z])
    np.testing.assert_allclose(to_np(normal_cdf(arr(backend, z))), cdf, rtol=5e-14, atol=1e-300)
    limits = arr(backend, [np.inf, -np.inf])
    np.testing.assert_array_equal(to_np(erf(limits)), [1.0, -1.0])
    np.testing.assert_array_equal(to_np(erfc(limits)), [0.0, 2.0])


@pytest.mark.parametrize("function", [erf, erfc, normal_cdf, normal_pdf])
def test_special_functions_refuse_integers_and_lists(function):
    """An integer array large enough for NumPy's cache blocks got its values written back into
    an integer buffer (erf of ones gave zeros); a smaller one gave floats; booleans failed in sign."""
    name = function.__name__
    for dtype in ("int64", "bool"):
        with pytest.raises(TypeError, match=rf"^{name}: x must be a floating-point array, got dtype {dtype}$"):
            function(np.ones(2 * cache_blocks.BLOCK, dtype=dtype))
    with pytest.raises(TypeError, match=rf"^{name}: x must be an array, got list"):
        function([0.5])


def _ulps(got, exact):
    """|got - exact| in units of the last place of float32 at ``exact``."""
    spacing = np.spacing(np.abs(exact.astype(np.float32))).astype(np.float64)
    return np.abs(np.asarray(got, dtype=np.float64) - exact) / spacing


def test_float32_values_are_correctly_rounded_on_the_host(backend):
    """Float32 in, float32 out: on the host computed in float64 and rounded, so within half a
    unit in the last place (float32 arithmetic through Cody's rationals is off by up to 6, and
    by 150 in normal_cdf's deep tail, where -x/√2 is rounded), the small range and the deep tail
    included. A GPU computes in float32: there, within float32 arithmetic's 2e-5 relative."""
    edges = [0.46875, -0.46875, 0.4687501, 4.0, -4.0, 4.0001, -9.0, 9.0]
    x = np.concatenate([np.linspace(-13, 13, 20001), np.linspace(-1, 1, 20001), np.logspace(-7, 0, 701), edges])
    x = x.astype(np.float32)
    wide = x.astype(np.float64)
    exact = {
        erf: np.array([math.erf(v) for v in wide]),
        erfc: np.array([math.erfc(v) for v in wide]),
        normal_cdf: np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in wide]),
    }
    for function, expected in exact.items():
        got = to_np(function(backend.asarray(x, dtype="float32")))
        assert got.dtype == np.float32
        normal = np.abs(expected) > 1e-37  # float32's normal numbers
        if backend.is_gpu:
            np.testing.assert_allclose(got[normal], expected[normal], rtol=2e-5, err_msg=function.__name__)
            continue
        worst = _ulps(got[normal], expected[normal]).max()
        assert worst <= 0.5 + 0.01, f"{function.__name__}: {worst:.2f} ulp"  # beneath the rounding, 3e-10 at most
    limits = backend.asarray(np.array([np.inf, -np.inf, 40.0, -40.0, np.nan], dtype=np.float32), dtype="float32")
    for function, expected in ((erf, [1, -1, 1, -1]), (erfc, [0, 2, 0, 2]), (normal_cdf, [1, 0, 1, 0])):
        got = to_np(function(limits))
        np.testing.assert_array_equal(got[:4], expected)
        assert np.isnan(got[4])


def test_values_within_four_give_the_same_bits_with_or_without_a_tail_value_beside_them(backend):
    # On the CPU a block whose erfc arguments all lie within 4 skips Cody's outer range: the
    # values must be those of a block that needs that range too, and as accurate.
    z = np.concatenate([np.linspace(-4, 4, 2001), [0.46875, -0.46875, 4.0, -4.0, np.nan]])
    alone = {f: to_np(f(arr(backend, z))) for f in (erf, erfc)}
    beside_a_tail = {f: to_np(f(arr(backend, np.append(z, 7.5))))[:-1] for f in (erf, erfc)}
    for f in (erf, erfc):
        np.testing.assert_array_equal(alone[f], beside_a_tail[f], err_msg=f.__name__)
    finite = z[:-1]
    np.testing.assert_allclose(alone[erf][:-1], [math.erf(v) for v in finite], rtol=0, atol=2e-15)
    np.testing.assert_allclose(alone[erfc][:-1], [math.erfc(v) for v in finite], rtol=5e-14, atol=1e-300)
    assert np.isnan(alone[erf][-1]) and np.isnan(alone[erfc][-1])
    x = 4 * math.sqrt(2) * np.linspace(-1, 1, 1001)  # normal_cdf's erfc arguments within 4
    cdf = to_np(normal_cdf(arr(backend, x)))
    np.testing.assert_array_equal(cdf, to_np(normal_cdf(arr(backend, np.append(x, -9.0))))[:-1])
    np.testing.assert_allclose(cdf, [0.5 * math.erfc(-v / math.sqrt(2)) for v in x], rtol=5e-14, atol=1e-300)


@pytest.mark.parametrize("shape", [(37, 101), (1500, 2)])  # blocks of 27 rows; rows longer than a block
def test_blocks_give_what_the_whole_array_gives(backend, np_rng, monkeypatch, shape):
    # Large arrays are evaluated block by block on the CPU: blocks that do not divide the
    # array, and a transposed (non-contiguous) input, must give the one-pass values exactly,
    # in the input's memory layout (which later reductions' rounding depends on).
    x_np = 6 * np_rng.standard_normal(shape)
    whole = {f: f(arr(backend, x_np).T) for f in (erf, erfc, normal_cdf)}
    monkeypatch.setattr(cache_blocks, "BLOCK", 1000)
    monkeypatch.setattr(backend, "cache_blocks", True)  # NumPy's; the slices must work on every backend
    for f, expected in whole.items():
        got = f(arr(backend, x_np).T)
        assert tuple(got.shape) == shape[::-1]
        np.testing.assert_array_equal(to_np(got), to_np(expected), err_msg=f.__name__)
        if isinstance(got, np.ndarray):
            assert got.strides == expected.strides, f.__name__
    got = to_np(whole[erfc])
    np.testing.assert_allclose(got, [[math.erfc(v) for v in row] for row in x_np.T], rtol=5e-14, atol=1e-300)


def test_gelu_is_x_times_the_normal_cdf_and_its_gradient_checks(backend, np_rng):
    x_np = 3 * np_rng.standard_normal((6, 7))
    x = arr(backend, x_np)
    out, cache = layers.gelu_forward(x)
    expected = np.array([[v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in row] for row in x_np])
    np.testing.assert_allclose(to_np(out), expected, rtol=1e-14, atol=1e-300)
    dout = arr(backend, np_rng.standard_normal((6, 7)))
    check_backward(backend, lambda x: layers.gelu_forward(x)[0], (x,), (layers.gelu_backward(dout, cache),), dout)


def reference_smoothed_loss(x, y, eps, reduction):
    n, c = x.shape
    log_p = x - x.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    target = np.full((n, c), eps / c)
    target[np.arange(n), y] += 1 - eps
    per_row = -(target * log_p).sum(1)
    return per_row.mean() if reduction == "mean" else per_row.sum()


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_softmax_loss_with_label_smoothing_and_sum(backend, np_rng, eps, reduction):
    x_np, y_np = np_rng.standard_normal((8, 5)), np_rng.integers(0, 5, 8)
    x, y = arr(backend, x_np), labels(backend, y_np)
    loss, dx = layers.softmax_loss(x, y, label_smoothing=eps, reduction=reduction)
    assert float(loss) == pytest.approx(reference_smoothed_loss(x_np, y_np, eps, reduction), rel=1e-13)
    numeric = eval_numerical_gradient(
        lambda _: layers.softmax_loss(x, y, label_smoothing=eps, reduction=reduction)[0], x, verbose=False
    )
    # Elements of dx near 0 (where p meets the smoothed target) are compared against the
    # centred difference's rounding floor, as in the nets' gradient checks.
    assert rel_error(numeric, dx, floor=rounding_floor(loss)) < 1e-6


def test_softmax_loss_refuses_bad_smoothing_and_reduction():
    x, y = np.zeros((2, 3)), np.array([0, 1])
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got 1.0"):
        layers.softmax_loss(x, y, label_smoothing=1.0)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'max'"):
        layers.softmax_loss(x, y, reduction="max")


def test_batchnorm_without_a_scale_parameter(backend, np_rng):
    x = arr(backend, 3 + 2 * np_rng.standard_normal((6, 4)))
    beta = arr(backend, np_rng.standard_normal(4))
    dout = arr(backend, np_rng.standard_normal((6, 4)))
    bn_param = {"mode": "train", "momentum": 0.6, "eps": 1e-12}
    out, cache = layers.batchnorm_forward(x, None, beta, bn_param)
    x_np = to_np(x)
    expected = (x_np - x_np.mean(0)) / np.sqrt(x_np.var(0) + 1e-12) + to_np(beta)
    np.testing.assert_allclose(to_np(out), expected, rtol=1e-12)
    np.testing.assert_allclose(to_np(bn_param["running_mean"]), 0.4 * x_np.mean(0), rtol=1e-12)
    for backward in (layers.batchnorm_backward, layers.batchnorm_backward_alt):
        dx, dgamma, dbeta = backward(dout, cache)
        assert dgamma is None
        forward = lambda x, beta: layers.batchnorm_forward(x, None, beta, {"mode": "train", "eps": 1e-12})[0]  # noqa: E731
        check_backward(backend, forward, (x, beta), (dx, dbeta), dout, tol=1e-6)
    images = arr(backend, np_rng.standard_normal((2, 4, 3, 3)))
    out, cache = layers.spatial_batchnorm_forward(images, None, beta, {"mode": "train"})
    dx, dgamma, _ = layers.spatial_batchnorm_backward(arr(backend, np.ones((2, 4, 3, 3))), cache)
    assert dgamma is None and tuple(dx.shape) == (2, 4, 3, 3)


# ----------------------------------------------------------------------------- augmentation and whitening
def test_reflect_pad_matches_numpy(backend, np_rng):
    from xpnet.augment import reflect_pad

    x = np_rng.standard_normal((2, 3, 5, 6))
    out = reflect_pad(arr(backend, x), 2)
    np.testing.assert_array_equal(to_np(out), np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect"))
    with pytest.raises(ValueError, match="pad 5 must be smaller than the images' sides"):
        reflect_pad(arr(backend, x), 5)


def test_the_augmenters_name_images_that_are_no_array(backend):
    """A list or None failed as "'list' object has no attribute 'ndim'"; a 0-d array given to
    random_translate as "tuple index out of range"."""
    from xpnet.augment import flip_images, random_translate, reflect_pad, translate_images

    shifts = backend.asarray(np.zeros(2, dtype=np.int64))
    calls = {
        "reflect_pad": lambda images: reflect_pad(images, 1),
        "flip_images": lambda images: flip_images(images, shifts),
        "translate_images": lambda images: translate_images(images, shifts, shifts, 1),
        "random_translate": lambda images: random_translate(images, backend.rng(0)),
    }
    for images in ([[1.0]], None):
        for name, call in calls.items():
            got = type(images).__name__
            with pytest.raises(TypeError, match=rf"^{name}: images must be an \(N, C, H, W\) array, got {got}$"):
                call(images)
    with pytest.raises(ValueError, match=r"^random_translate: images must be \(N, C, H, W\), got shape \(\)$"):
        random_translate(arr(backend, np.ones(())), backend.rng(0))


def test_augmentation_and_whitening_refuse_sizes_that_cannot_be_right(backend):
    """A negative pad used to pad by a mirrored slice (8x8 became 15x15), a float one to fail
    inside slicing, a negative shift inside the generator, a window larger than the images to
    give NaN filters."""
    from xpnet.augment import AlternatingFlipTranslate, flip_images, random_translate, reflect_pad, translate_images
    from xpnet.whitening import whitening_filters

    x, rng = arr(backend, np.ones((2, 3, 8, 8))), backend.rng(0)
    shifts = backend.asarray(np.zeros(2, dtype=np.int64))
    for pad in (-1, 2.0, True):
        with pytest.raises(ValueError, match=f"reflect_pad: pad must be a non-negative integer, got {pad}"):
            reflect_pad(x, pad)
    with pytest.raises(ValueError, match="random_translate: max_shift must be a non-negative integer, got -1"):
        random_translate(x, rng, -1)
    with pytest.raises(ValueError, match="translate_images: max_shift must be a non-negative integer, got 1.5"):
        translate_images(x, shifts, shifts, 1.5)
    with pytest.raises(ValueError, match="AlternatingFlipTranslate: max_shift must be a non-negative integer"):
        AlternatingFlipTranslate(x, rng, max_shift=-2)
    # named as reflect_pad's pad before, a name the caller never gave
    with pytest.raises(ValueError, match=r"^AlternatingFlipTranslate: max_shift 8 must be smaller than the images' "
                                         r"sides \(8, 8\)$"):  # fmt: skip
        AlternatingFlipTranslate(x, rng, max_shift=8)
    for size in (0, 9, 2.0):
        with pytest.raises(
            ValueError,
            match=rf"image_patches: size must be an integer from 1 to the images' sides \(8, 8\), got {size}",
        ):
            whitening_filters(x, size)
    with pytest.raises(ValueError, match="whitening_filters: eps must be a finite number >= 0, got -0.001"):
        whitening_filters(x, 2, eps=-1e-3)
    nan_pixel = np.ones((2, 3, 8, 8))
    nan_pixel[1, 2, 3, 4] = np.nan
    with pytest.raises(ValueError, match="whitening_filters: the images hold NaN or infinite values"):  # not eigh's
        whitening_filters(arr(backend, nan_pixel), 2)
    # integer pixels wrapped around in the covariance, which gave NaN filters; no images gave 0 / 0
    with pytest.raises(TypeError, match="whitening_filters: images must be a floating-point array, got dtype uint8"):
        whitening_filters(backend.asarray(np.ones((2, 3, 8, 8), dtype=np.uint8)), 2)
    with pytest.raises(ValueError, match=r"whitening_filters: no images, got shape \(0, 3, 8, 8\)"):
        whitening_filters(arr(backend, np.ones((0, 3, 8, 8))), 2)
    # With eps 0 a singular covariance (constant images, or one channel a copy of another) gave
    # filters of inf or NaN, which trained to NaN; with eps > 0 the same images whiten.
    copied = np.random.default_rng(0).standard_normal((2, 3, 8, 8))
    copied[:, 1] = copied[:, 0]
    for images in (x, arr(backend, copied)):
        with pytest.raises(ValueError, match=r"whitening_filters: the patches' covariance is singular .* give eps > 0"):
            whitening_filters(images, 2, eps=0)
        assert np.isfinite(to_np(whitening_filters(images, 2, eps=5e-4))).all()
    assert tuple(reflect_pad(x, np.int64(2)).shape) == (2, 3, 12, 12)
    # integer pixels: the NaN that marks an offset out of range was cast to garbage under a
    # RuntimeWarning; a list of flags failed inside the array namespace's lookup
    pixels = backend.asarray(np.ones((2, 3, 8, 8), dtype=np.uint8))
    floats_only = r"images must be floating-point \(an offset out of range makes an image NaN\), got dtype uint8"
    with pytest.raises(TypeError, match=f"random_translate: {floats_only}"):
        random_translate(pixels, rng, 2)
    with pytest.raises(TypeError, match=f"translate_images: {floats_only}"):
        translate_images(pixels, shifts, shifts, 2)
    with pytest.raises(TypeError, match=f"AlternatingFlipTranslate: {floats_only}"):
        AlternatingFlipTranslate(pixels, rng)
    assert AlternatingFlipTranslate(pixels, rng, max_shift=0).epoch(0).dtype == pixels.dtype  # flips only
    with pytest.raises(
        TypeError, match=r"flip_images: mask must be an array of \(2,\) values, one per image; got list"
    ):
        flip_images(x, [True, False])


def test_flips_and_translations_per_image(backend, np_rng):
    from xpnet.augment import flip_images, random_flip_mask, random_translate, translate_images

    x = np_rng.standard_normal((4, 2, 6, 6))
    mask = np.array([True, False, True, False])
    flipped = to_np(flip_images(arr(backend, x), backend.asarray(mask)))
    np.testing.assert_array_equal(flipped[mask], x[mask][..., ::-1])
    np.testing.assert_array_equal(flipped[~mask], x[~mask])
    rows, cols = np.array([-2, 0, 1, 2]), np.array([1, -1, 0, 2])
    moved = to_np(translate_images(arr(backend, x), backend.asarray(rows), backend.asarray(cols), 2))
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    for i in range(4):
        np.testing.assert_array_equal(moved[i], padded[i, :, 2 + rows[i] : 8 + rows[i], 2 + cols[i] : 8 + cols[i]])
    rng = backend.rng(0)
    draws = to_np(random_flip_mask(rng, 10000))
    assert 0.47 < draws.mean() < 0.53
    once, again = random_translate(arr(backend, x), backend.rng(3)), random_translate(arr(backend, x), backend.rng(3))
    np.testing.assert_array_equal(to_np(once), to_np(again))


def test_flips_and_translations_refuse_a_mask_or_offsets_that_are_not_one_per_image(backend, np_rng):
    """A mask of another length failed inside where's broadcast; float offsets, and offsets beyond
    max_shift, gave images of zeros without a word."""
    from xpnet.augment import crop_padded, flip_images, reflect_pad, translate_images

    x = arr(backend, np_rng.standard_normal((4, 2, 6, 6)))
    for mask, got in ((np.array([True, False]), r"\(2,\) \S*bool"), (np.array([1, 0, 1, 0]), r"\(4,\) \S*int")):
        with pytest.raises(ValueError, match=r"flip_images: mask must be \(4,\) booleans, one per image; got " + got):
            flip_images(x, backend.asarray(mask))
    zeros = backend.asarray(np.zeros(4, dtype=np.int64))
    for bad, got in ((np.zeros(4), r"\(4,\) \S*float"), (np.zeros(3, dtype=np.int64), r"\(3,\) \S*int")):
        with pytest.raises(
            ValueError, match=r"translate_images: shift_cols must be \(4,\) integers, one per image; got " + got
        ):
            translate_images(x, zeros, backend.asarray(bad), 2)
        with pytest.raises(ValueError, match=r"crop_padded: shift_rows must be \(4,\) integers"):
            crop_padded(reflect_pad(x, 2), backend.asarray(bad), zeros, 2)
    # An offset beyond max_shift (read on the device, never on the host) makes its image NaN, the others exact.
    moved = to_np(translate_images(x, backend.asarray(np.array([3, 0, -3, 1])), zeros, 2))
    assert np.isnan(moved[[0, 2]]).all() and not np.isnan(moved[[1, 3]]).any()


def test_the_augmenters_name_a_generator_that_is_not_one(backend, np_rng):
    """Arguments in the wrong order, a seed or NumPy's own Generator failed inside the draw
    ("'int' object has no attribute 'uniform'")."""
    from xpnet.augment import AlternatingFlipTranslate, random_flip_mask, random_translate

    x = arr(backend, np_rng.standard_normal((4, 2, 6, 6)))
    with pytest.raises(TypeError, match=r"^random_flip_mask: rng must be a generator .* got int; it takes \(rng, n\)"):
        random_flip_mask(4, backend.rng(0))
    with pytest.raises(
        TypeError, match=r"^random_translate: rng must be a generator of the backend, backend.rng\(seed\), got int$"
    ):
        random_translate(x, 0)
    with pytest.raises(TypeError, match=r"^AlternatingFlipTranslate: rng must be a generator .* got Generator$"):
        AlternatingFlipTranslate(x, np.random.default_rng(0))
    assert tuple(random_flip_mask(backend.rng(0), 4).shape) == (4,)
    assert tuple(random_translate(x, backend.rng(0)).shape) == (4, 2, 6, 6)
    # a count that is no count failed inside the generator ("negative dimensions are not allowed")
    for n in (-1, 2.5):
        with pytest.raises(ValueError, match=rf"^random_flip_mask: n must be a non-negative integer, got {n}$"):
            random_flip_mask(backend.rng(0), n)


def test_whitening_filters_whiten_the_patches(backend, np_rng):
    from xpnet.fast_layers import conv_forward_fast
    from xpnet.whitening import image_patches, whitening_filters

    colour = np_rng.standard_normal((3, 3))
    x_np = np.einsum("ij,njhw->nihw", colour, np_rng.standard_normal((40, 3, 8, 8)))  # correlated channels
    x = arr(backend, x_np)
    patches = to_np(image_patches(x, 2))
    expected = np.stack([x_np[:, :, i : i + 7, j : j + 7] for i in range(2) for j in range(2)], axis=2)
    np.testing.assert_allclose(patches, expected.transpose(0, 3, 4, 1, 2).reshape(-1, 12), rtol=0, atol=0)
    filters = whitening_filters(x, 2, eps=0.0)
    assert tuple(filters.shape) == (24, 3, 2, 2)
    np.testing.assert_array_equal(to_np(filters[12:, ...]), -to_np(filters[:12, ...]))
    out, _ = conv_forward_fast(x, filters[:12, ...], arr(backend, np.zeros(12)), {"stride": 1, "pad": 0})
    responses = to_np(out).transpose(1, 0, 2, 3).reshape(12, -1)
    np.testing.assert_allclose(responses @ responses.T / responses.shape[1], np.eye(12), atol=1e-8)
    eigenvalues = np.linalg.eigvalsh(patches.T @ patches / patches.shape[0])[::-1]
    norms = np.linalg.norm(to_np(filters[:12, ...]).reshape(12, -1), axis=1)
    np.testing.assert_allclose(norms, 1 / np.sqrt(eigenvalues), rtol=1e-8)  # largest eigenvalue first
