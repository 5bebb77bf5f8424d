"""Half-precision activations (xpnet.precision): float16 storage, float32 arithmetic, in
the reference layers, on every backend with a float16 type."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import to_np

from xpnet import layers
from xpnet.precision import is_half, narrowed, widened


@pytest.fixture
def half_backend(backend):
    if not hasattr(backend.xp, "float16"):
        pytest.skip(f"{backend.name} has no float16")
    return backend


def half(backend, a):
    return backend.asarray(np.asarray(a, dtype=np.float16))


def test_widened_and_narrowed_change_only_what_they_must(half_backend):
    xp = half_backend.xp
    x16, x32 = half(half_backend, [1.0, 2.5]), half_backend.asarray(np.array([1.0, 2.5], dtype=np.float32))
    assert is_half(xp, x16) and not is_half(xp, x32)
    assert widened(xp, x16).dtype == xp.float32 and widened(xp, x32) is x32 and widened(xp, None) is None
    assert narrowed(xp, x32, xp.float32) is x32 and narrowed(xp, x32, xp.float16).dtype == xp.float16


def test_float16_products_are_summed_in_float32(half_backend, np_rng):
    # 4096 ones: a float16 running sum stops at 2048 (2048 + 1 rounds back to 2048); float32's does not.
    ones = np.ones((1, 4096))
    assert float(to_np(layers.matmul(half(half_backend, ones), half(half_backend, ones.T)))[0, 0]) == 4096.0
    b = np_rng.standard_normal((300, 7)).astype(np.float16)
    x = np_rng.standard_normal((5, 300)).astype(np.float16)
    out = layers.matmul(half(half_backend, x), half(half_backend, b))
    assert out.dtype == half_backend.xp.float16
    exact = (x.astype(np.float64) @ b.astype(np.float64)).astype(np.float16)  # one rounding, at the end
    ulp = np.spacing(np.abs(exact)).astype(np.float64)
    assert np.all(np.abs(to_np(out).astype(np.float64) - exact) <= ulp)


def test_float16_gelu_is_the_exact_gelu_rounded_once(half_backend, np_rng):
    x = np.concatenate([np_rng.standard_normal(200) * 3, [0.0, -8.0, 8.0]]).astype(np.float16)
    out, cache = layers.gelu_forward(half(half_backend, x))
    exact = np.array([v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])
    assert out.dtype == half_backend.xp.float16
    np.testing.assert_allclose(to_np(out), exact, rtol=2**-10, atol=2**-24)
    dout = np_rng.standard_normal(x.shape).astype(np.float16)
    dx = layers.gelu_backward(half(half_backend, dout), cache)
    pdf = np.exp(-0.5 * x.astype(np.float64) ** 2) / math.sqrt(2 * math.pi)
    stored_cdf = to_np(cache[1]).astype(np.float64)  # the backward pass reads Φ(x) as stored, in float16
    cdf = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])
    np.testing.assert_allclose(stored_cdf, cdf, rtol=2**-11, atol=2**-25)
    expected = dout.astype(np.float64) * (stored_cdf + x * pdf)
    np.testing.assert_allclose(to_np(dx), expected, rtol=2**-10, atol=2**-24)


def test_float16_spatial_batchnorm_keeps_its_statistics_in_float32(half_backend, np_rng):
    xp = half_backend.xp
    # Far from zero and spread: float16 sums over N·H·W values would lose the variance.
    x = (np_rng.standard_normal((16, 3, 8, 8)) * 2 + 300).astype(np.float16)
    beta = np.array([0.5, -1.0, 0.0], dtype=np.float16)
    bn_param = {"mode": "train", "momentum": 0.0}
    out, cache = layers.spatial_batchnorm_forward(half(half_backend, x), None, half(half_backend, beta), bn_param)
    wide = x.astype(np.float64)
    mean, var = wide.mean(axis=(0, 2, 3)), wide.var(axis=(0, 2, 3))
    expected = (wide - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5) + beta[:, None, None]
    assert out.dtype == xp.float16
    np.testing.assert_allclose(to_np(out), expected, atol=4e-3)
    assert bn_param["running_mean"].dtype == xp.float32
    np.testing.assert_allclose(to_np(bn_param["running_mean"]), mean, rtol=1e-6)
    np.testing.assert_allclose(to_np(bn_param["running_var"]), var, rtol=1e-4)

    dout = np_rng.standard_normal(x.shape).astype(np.float16)
    dx, dgamma, dbeta = layers.spatial_batchnorm_backward(half(half_backend, dout), cache)
    assert dx.dtype == xp.float16 and dbeta.dtype == xp.float32
    np.testing.assert_allclose(to_np(dbeta), dout.astype(np.float64).sum(axis=(0, 2, 3)), rtol=1e-5)
