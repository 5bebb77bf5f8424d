"""Normalisation of (N, C, H, W) activations: spatial batchnorm (statistics per
channel over N, H and W) and spatial groupnorm (statistics per sample over each
group of C / G channels and H, W)."""

from __future__ import annotations

from typing import Any, NamedTuple

from .array_types import Array, Cache
from .backend import accelerated
from .input_checks import (
    as_int,
    check_cache_source,
    check_dout,
    check_param_keys,
    layer_namespace,
    makes_cache,
    unpack_cache,
)
from .layers import (
    batch_normalized,
    batchnorm_mode,
    ensure_running_statistics,
    gelu_backward,
    gelu_forward,
    mean_and_centered,
    normalization_backward,
    normalization_eps,
    normalized_input_grad,
    train_mode_cache,
    update_running_statistics,
)
from .precision import narrowed, widened

__all__ = [
    "spatial_batchnorm_forward",
    "spatial_batchnorm_backward",
    "spatial_batchnorm_gelu_forward",
    "spatial_batchnorm_gelu_backward",
    "spatial_groupnorm_forward",
    "spatial_groupnorm_backward",
]


def _check_nchw(function, x):
    """ValueError unless x is (N, C, H, W) with at least one channel and pixel: statistics
    over none are 0 / 0 (an empty batch is for each layer to judge)."""
    if x.ndim != 4:
        raise ValueError(f"{function}: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] == 0 or x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"{function}: x {tuple(x.shape)} has no channels or no pixels to normalise")


def _to_groups(xp, x, groups):
    """(N, C, H, W) -> (N, G, C/G·H·W): one row per sample and group (sizes spelled out, since
    an empty batch leaves -1 undefined)."""
    n, c, h, w = x.shape
    return xp.reshape(x, (n, groups, c // groups * h * w))


class _FusedBatchnormCache(NamedTuple):
    """What the fused kernels' backward pass needs: x̂ (N, C, H, W), 1/std (C,),
    gamma, and beta where a GELU followed in the same pass (None where none did)."""

    kernels: Any  # the backend's fused kernels (CupyKernels)
    x_hat: Array
    inv_std: Array
    gamma: Array | None
    gelu_beta: Array | None

    @property
    def forwards(self) -> tuple:
        """The forward pass that made it, as a tagged cache says (:func:`check_cache_source`)."""
        return ("spatial_batchnorm_forward",) if self.gelu_beta is None else ("spatial_batchnorm_gelu_forward",)


def _fused_batchnorm_forward(kernels, x, gamma, beta, bn_param, mode, eps, gelu):
    """Spatial batchnorm (``gelu``: and the GELU after it) through a backend's fused kernels;
    the running averages (made or checked by the caller) as in :func:`xpnet.layers.batchnorm_forward`."""
    if mode == "test":
        running = bn_param["running_mean"], bn_param["running_var"]
        return kernels.spatial_batchnorm_apply(x, gamma, beta, *running, eps, gelu=gelu), None
    out, x_hat, mean, var, inv_std = kernels.spatial_batchnorm_train(x, gamma, beta, eps, gelu=gelu)
    n, _, h, w = x.shape
    update_running_statistics(bn_param, mean, var, n * h * w)
    return out, _FusedBatchnormCache(kernels, x_hat, inv_std, gamma, beta if gelu else None)


def _batchnorm_forward(name, x, gamma, beta, bn_param, gelu):
    """Spatial batchnorm, followed by the exact GELU when ``gelu``, for the layer ``name``."""
    xp = layer_namespace(name, {"x": x, "beta": beta, **({} if gamma is None else {"gamma": gamma})})
    _check_nchw(name, x)
    n, c, h, w = x.shape
    mode, eps = batchnorm_mode(name, bn_param), normalization_eps(name, "bn_param", bn_param)
    if mode == "train" and n * h * w < 2:
        raise ValueError(f"{name}: train mode needs at least 2 values per channel, got x {tuple(x.shape)}")
    gamma_shape = (c,) if gamma is None else tuple(gamma.shape)
    if gamma_shape != (c,) or tuple(beta.shape) != (c,):
        raise ValueError(
            f"{name}: gamma and beta must be ({c},) for x {tuple(x.shape)}, got {gamma_shape} and {tuple(beta.shape)}"
        )
    ensure_running_statistics(name, bn_param, x, c)
    fast = accelerated(x)
    if fast is not None:
        return _fused_batchnorm_forward(fast, x, gamma, beta, bn_param, mode, eps, gelu)
    # Statistics over N, H and W where the pixels lie: no transposing to rows (twice as slow),
    # whose column sums NumPy adds a row at a time (float32 results were off by up to 5e-4).
    out, cache = batch_normalized(widened(xp, x), widened(xp, gamma), widened(xp, beta), bn_param, mode, eps)
    out = narrowed(xp, out, x.dtype)  # the cache is None in test mode, as the fused kernels'
    if gelu:
        out, gelu_cache = gelu_forward(out)
        cache = None if cache is None else (cache, gelu_cache)
    return out, cache


def _fused_cache(name, dout, cache) -> _FusedBatchnormCache | None:
    """``cache`` if the fused kernels made it (after checking dout's shape against it), else None."""
    if not isinstance(train_mode_cache(name, cache), _FusedBatchnormCache):
        return None
    check_dout(name, dout, cache.x_hat.shape, like={"x": cache.x_hat})
    return cache


@makes_cache("spatial_batchnorm_forward")
def spatial_batchnorm_forward(x: Array, gamma: Array, beta: Array, bn_param: dict) -> tuple[Array, Cache]:
    """Batch normalisation of each channel over N, H and W.

    Args:
        x: (N, C, H, W); gamma, beta: (C,) (gamma None: no scale parameter, dgamma None).
        bn_param: as for :func:`xpnet.layers.batchnorm_forward` ('mode', 'eps',
            'momentum', 'running_mean' and 'running_var' of shape (C,)).
    Returns:
        out (N, C, H, W) and the cache. Float16 x is normalised with float32 statistics
        (the running averages keep their own dtype) and out is float16.
    """
    return _batchnorm_forward("spatial_batchnorm_forward", x, gamma, beta, bn_param, gelu=False)


def spatial_batchnorm_backward(dout: Array, cache: Cache) -> tuple[Array, Array, Array]:
    """Backward pass of spatial batchnorm: dx (N, C, H, W), dgamma (C,), dbeta (C,) (for
    float16 activations: dx float16, dgamma and dbeta float32)."""
    fused = _fused_cache("spatial_batchnorm_backward", dout, cache)
    if fused is not None:
        check_cache_source("spatial_batchnorm_backward", fused, "spatial_batchnorm_forward")
        return fused.kernels.spatial_batchnorm_backward(dout, fused.x_hat, fused.gamma, fused.inv_std)
    return normalization_backward("spatial_batchnorm_backward", dout, cache, "spatial_batchnorm_forward")


@makes_cache("spatial_batchnorm_gelu_forward")
def spatial_batchnorm_gelu_forward(x: Array, gamma: Array, beta: Array, bn_param: dict) -> tuple[Array, Cache]:
    """:func:`spatial_batchnorm_forward` followed by :func:`~xpnet.layers.gelu_forward`
    (the blocks of :class:`~xpnet.cnn.FastConvNet`), with the same arguments and results.

    On CuPy the normalisation and the GELU are one pass that stores only x̂ and the
    output, and the backward pass recomputes the batchnorm's output and the GELU's
    derivative from them; elsewhere the two layers run one after the other.
    """
    return _batchnorm_forward("spatial_batchnorm_gelu_forward", x, gamma, beta, bn_param, gelu=True)


def spatial_batchnorm_gelu_backward(dout: Array, cache: Cache) -> tuple[Array, Array, Array]:
    """Backward pass of :func:`spatial_batchnorm_gelu_forward`: dx (N, C, H, W), dgamma (C,)
    (None without gamma), dbeta (C,)."""
    fused = _fused_cache("spatial_batchnorm_gelu_backward", dout, cache)
    if fused is not None:
        check_cache_source("spatial_batchnorm_gelu_backward", fused, "spatial_batchnorm_gelu_forward")
        return fused.kernels.spatial_batchnorm_backward(dout, fused.x_hat, fused.gamma, fused.inv_std, fused.gelu_beta)
    bn_cache, gelu_cache = unpack_cache("spatial_batchnorm_gelu_backward", cache, 2, "spatial_batchnorm_gelu_forward")
    x = unpack_cache("spatial_batchnorm_gelu_backward", gelu_cache, 2, "gelu_forward")[0]
    check_dout("spatial_batchnorm_gelu_backward", dout, x.shape, like={"x": x})
    return spatial_batchnorm_backward(gelu_backward(dout, gelu_cache), bn_cache)


class _FusedGroupnormCache(NamedTuple):
    """What the fused kernels' groupnorm backward pass needs: x̂ (N, C, H, W), 1/std (N, G), gamma."""

    kernels: Any  # the backend's fused kernels (CupyKernels)
    x_hat: Array
    inv_std: Array
    gamma: Array

    @property
    def forwards(self) -> tuple:
        """The forward pass that made it, as a tagged cache says (:func:`check_cache_source`)."""
        return ("spatial_groupnorm_forward",)


@makes_cache("spatial_groupnorm_forward")
def spatial_groupnorm_forward(x: Array, gamma: Array, beta: Array, G: int, gn_param: dict) -> tuple[Array, Cache]:
    """Group normalisation: each sample's channels split into ``G`` groups, each group
    normalised over its channels and all positions.

    Args:
        x: (N, C, H, W); gamma, beta: (1, C, 1, 1) as in the course; G: groups, dividing C.
        gn_param: optional 'eps' (1e-5).
    Returns:
        out (N, C, H, W) and the cache.
    """
    xp = layer_namespace("spatial_groupnorm_forward", {"x": x, "gamma": gamma, "beta": beta})
    _check_nchw("spatial_groupnorm_forward", x)
    n, c, h, w = x.shape
    groups = as_int(G)
    if groups is None or groups <= 0:
        raise ValueError(f"spatial_groupnorm_forward: G, the number of groups, must be a positive integer, got {G!r}")
    if c % groups:
        raise ValueError(
            f"spatial_groupnorm_forward: G = {G!r} groups must divide the {c} channels of x {tuple(x.shape)}"
        )
    G = groups
    for name, value in (("gamma", gamma), ("beta", beta)):
        if tuple(value.shape) != (1, c, 1, 1):
            raise ValueError(f"spatial_groupnorm_forward: {name} must be (1, {c}, 1, 1), got {tuple(value.shape)}")
    check_param_keys("spatial_groupnorm_forward", "gn_param", gn_param, ("eps", "mode"))
    eps = normalization_eps("spatial_groupnorm_forward", "gn_param", gn_param)
    fast = accelerated(x) if n else None  # an empty batch: nothing for a kernel to launch over
    if fast is not None:
        out, x_hat, inv_std = fast.spatial_groupnorm_train(x, gamma, beta, G, eps)
        return out, _FusedGroupnormCache(fast, x_hat, inv_std, gamma)
    centered = mean_and_centered(xp, _to_groups(xp, x, G), axis=2)[1]
    std = xp.sqrt(xp.mean(centered * centered, axis=2, keepdims=True) + eps)
    x_hat = xp.reshape(centered / std, x.shape)
    return gamma * x_hat + beta, (x_hat, std, gamma, G)


def spatial_groupnorm_backward(dout: Array, cache: Cache) -> tuple[Array, Array, Array]:
    """Backward pass of groupnorm: dx (N, C, H, W), dgamma and dbeta (1, C, 1, 1)."""
    if isinstance(cache, _FusedGroupnormCache):
        xp = check_dout("spatial_groupnorm_backward", dout, cache.x_hat.shape, like={"x": cache.x_hat})
        dx, dgamma, dbeta = cache.kernels.spatial_groupnorm_backward(dout, cache.x_hat, cache.gamma, cache.inv_std)
        c = dout.shape[1]
        return dx, xp.reshape(dgamma, (1, c, 1, 1)), xp.reshape(dbeta, (1, c, 1, 1))
    x_hat, std, gamma, G = unpack_cache("spatial_groupnorm_backward", cache, 4, "spatial_groupnorm_forward")
    xp = check_dout("spatial_groupnorm_backward", dout, x_hat.shape, like={"x": x_hat})
    dgamma = xp.sum(dout * x_hat, axis=(0, 2, 3), keepdims=True)
    dbeta = xp.sum(dout, axis=(0, 2, 3), keepdims=True)
    dx = normalized_input_grad(xp, _to_groups(xp, dout * gamma, G), _to_groups(xp, x_hat, G), std, axis=2)
    return xp.reshape(dx, dout.shape), dgamma, dbeta
