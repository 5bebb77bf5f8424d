"""Composite layers ("sandwiches") built from :mod:`xpnet.layers` and :mod:`xpnet.fast_layers`."""

from __future__ import annotations

from .array_types import Array, Cache
from .backend import accelerated, namespace
from .conv_common import channel_sum, conv_geometry, pool_geometry
from .fast_layers import (
    _conv_forward,
    conv_backward_fast,
    conv_forward_fast,
    max_pool_backward_fast,
    max_pool_forward_fast,
)
from .input_checks import check_dout, makes_cache, unpack_cache
from .layers import (
    affine_backward,
    affine_forward,
    affine_input,
    batchnorm_backward_alt,
    batchnorm_forward,
    dropout_backward,
    dropout_forward,
    layernorm_backward,
    layernorm_forward,
    relu_backward,
    relu_forward,
    spatial_batchnorm_backward,
    spatial_batchnorm_forward,
    train_mode_cache,
)

__all__ = [
    "affine_relu_forward",
    "affine_relu_backward",
    "affine_norm_relu_dropout_forward",
    "affine_norm_relu_dropout_backward",
    "NORMALIZATIONS",
    "conv_relu_forward",
    "conv_relu_backward",
    "conv_relu_pool_forward",
    "conv_relu_pool_backward",
    "conv_bn_relu_forward",
    "conv_bn_relu_backward",
    "conv_bn_relu_pool_forward",
    "conv_bn_relu_pool_backward",
]

NORMALIZATIONS = (None, "batchnorm", "layernorm")


# A sandwich checks dout against its own output and names itself: the layer inside it would
# name a shape the caller never saw (before the pool, say).
OUTPUT = " (the forward pass's output)"


@makes_cache("affine_relu_forward")
def affine_relu_forward(x: Array, w: Array, b: Array) -> tuple[Array, Cache]:
    """Affine transform followed by ReLU: x (N, ...), w (D, M), b (M,) -> out (N, M)."""
    fast = accelerated(x)
    if fast is not None:
        # One pass for bias and ReLU after the GEMM. ReLU's backward only needs to
        # know where its input was positive, which the output tells as well.
        out = fast.affine_relu(affine_input(x, w, b), w, b)
        return out, ((x, w, b), out)
    a, fc_cache = affine_forward(x, w, b)
    out, relu_cache = relu_forward(a)
    return out, (fc_cache, relu_cache)


def affine_relu_backward(dout: Array, cache: Cache, input_grad: bool = True) -> tuple[Array | None, Array, Array]:
    """Backward pass of :func:`affine_relu_forward`: returns (dx, dw, db); dx is None
    when ``input_grad`` is False."""
    fc_cache, relu_cache = unpack_cache("affine_relu_backward", cache, 2, "affine_relu_forward")
    # the ReLU's input (or, fused, its output)
    check_dout("affine_relu_backward", dout, relu_cache.shape, OUTPUT, like={"the cache": relu_cache})
    return affine_backward(relu_backward(dout, relu_cache), fc_cache, input_grad)


@makes_cache("affine_norm_relu_dropout_forward")
def affine_norm_relu_dropout_forward(
    x, w, b, gamma=None, beta=None, norm_param=None, normalization=None, dropout_param=None
):
    """affine - [batchnorm | layernorm] - relu - [dropout], the hidden block of FullyConnectedNet.

    Args:
        x: (N, ...) input; w (D, M), b (M,).
        gamma, beta: (M,) scale and shift, used when ``normalization`` is set.
        norm_param: the bn_param / ln_param dict of that layer.
        normalization: None, "batchnorm" or "layernorm".
        dropout_param: dict for :func:`dropout_forward`, or None for no dropout.
    Returns:
        out (N, M) and the cache.
    """
    # a string only: an array here failed as "The truth value of an array ... is ambiguous"
    if normalization is not None and (not isinstance(normalization, str) or normalization not in NORMALIZATIONS):
        raise ValueError(
            f"affine_norm_relu_dropout_forward: unknown normalization {normalization!r}; use one of {NORMALIZATIONS}"
        )
    if normalization is None:
        out, (fc_cache, relu_cache) = affine_relu_forward(x, w, b)
        return _dropout_tail(out, dropout_param, fc_cache, None, None, relu_cache)
    out, fc_cache = affine_forward(x, w, b)
    norm_cache = None
    if normalization == "batchnorm":
        out, norm_cache = batchnorm_forward(out, gamma, beta, norm_param)
    else:
        out, norm_cache = layernorm_forward(out, gamma, beta, norm_param)
    out, relu_cache = relu_forward(out)
    return _dropout_tail(out, dropout_param, fc_cache, normalization, norm_cache, relu_cache)


def _dropout_tail(out, dropout_param, fc_cache, normalization, norm_cache, relu_cache):
    drop_cache = None
    if dropout_param is not None:
        out, drop_cache = dropout_forward(out, dropout_param)
    return out, (fc_cache, normalization, norm_cache, relu_cache, drop_cache)


def affine_norm_relu_dropout_backward(dout: Array, cache: Cache, input_grad: bool = True) -> tuple:
    """Backward pass of :func:`affine_norm_relu_dropout_forward`.

    Returns:
        (dx, dw, db, dgamma, dbeta); dgamma and dbeta are None without
        normalisation, dx is None when ``input_grad`` is False.
    """
    fc_cache, normalization, norm_cache, relu_cache, drop_cache = unpack_cache(
        "affine_norm_relu_dropout_backward", cache, 5, "affine_norm_relu_dropout_forward"
    )
    # dropout keeps the shape
    check_dout("affine_norm_relu_dropout_backward", dout, relu_cache.shape, OUTPUT, like={"the cache": relu_cache})
    if normalization is not None:  # a forward pass in test mode: said here, not by the layer inside
        train_mode_cache("affine_norm_relu_dropout_backward", norm_cache)
    if drop_cache is not None:
        dout = dropout_backward(dout, drop_cache)
    dout = relu_backward(dout, relu_cache)
    dgamma = dbeta = None
    if normalization == "batchnorm":
        dout, dgamma, dbeta = batchnorm_backward_alt(dout, norm_cache)
    elif normalization == "layernorm":
        dout, dgamma, dbeta = layernorm_backward(dout, norm_cache)
    dx, dw, db = affine_backward(dout, fc_cache, input_grad)
    return dx, dw, db, dgamma, dbeta


# --------------------------------------------------------------------------- convolutional sandwiches
# They use the fast layers, as the course's do. The convolution runs without its bias, which is
# added in the ReLU's pass instead (one pass over the activations fewer), and after the pool
# where there is one: a window's maximum plus b is the maximum of the window plus b exactly
# (rounding is monotone), on a quarter of the values for 2x2 pools.
def _bias_relu(x: Array, b: Array | None) -> Array:
    """max(x + b, 0) for x (N, C, H, W) and b (C,) or None (the ReLU alone), in x's memory order."""
    if b is None:
        return relu_forward(x)[0]
    fast = accelerated(x)
    if fast is not None:
        return fast.channel_bias_relu(x, b)
    xp = namespace(x)
    return xp.maximum(x + xp.reshape(b, (1, -1, 1, 1)), 0)


def _bias_relu_backward(dout: Array, out: Array, with_bias: bool) -> tuple[Array, Array | None]:
    """(the gradient before the ReLU, db (C,) or None) from the ReLU's output ``out``,
    which is positive exactly where its input was."""
    da = relu_backward(dout, out)
    return da, channel_sum(namespace(da), da) if with_bias else None


@makes_cache("conv_relu_forward")
def conv_relu_forward(x: Array, w: Array, b: Array, conv_param: dict) -> tuple[Array, Cache]:
    """Convolution followed by ReLU: x (N, C, H, W), w (F, C, HH, WW), b (F,) -> (N, F, H', W')."""
    a, conv_cache = _conv_forward(x, w, None, conv_param, conv_geometry("conv_relu_forward", x, w, b, conv_param))
    out = _bias_relu(a, b)
    return out, (conv_cache, out, b is not None)


def conv_relu_backward(dout: Array, cache: Cache, input_grad: bool = True) -> tuple[Array | None, Array, Array]:
    """Backward pass of :func:`conv_relu_forward`: (dx, dw, db); dx is None when ``input_grad`` is False."""
    conv_cache, out, with_bias = unpack_cache("conv_relu_backward", cache, 3, "conv_relu_forward")
    check_dout("conv_relu_backward", dout, out.shape, OUTPUT, like={"the cache": out})
    da, db = _bias_relu_backward(dout, out, with_bias)
    dx, dw, _ = conv_backward_fast(da, conv_cache, input_grad)
    return dx, dw, db


@makes_cache("conv_relu_pool_forward")
def conv_relu_pool_forward(x: Array, w: Array, b: Array, conv_param: dict, pool_param: dict) -> tuple[Array, Cache]:
    """Convolution, ReLU, then max pooling: x (N, C, H, W) -> (N, F, H'', W'').

    Pooling runs before the bias and the ReLU: the three commute (a window's maximum of ReLUs
    is the ReLU of its maximum), and so do their gradients, ties included (a window whose
    maximum is not positive passes no gradient either way), so the bias, the ReLU and their
    backward passes run on the pooled values only, a quarter of them for 2x2 pools."""
    geometry = conv_geometry("conv_relu_pool_forward", x, w, b, conv_param)
    a, conv_cache = _conv_forward(x, w, None, conv_param, geometry)
    pooled, pool_cache = max_pool_forward_fast(a, pool_param)
    out = _bias_relu(pooled, b)
    return out, (conv_cache, pool_cache, out, b is not None)


def conv_relu_pool_backward(dout: Array, cache: Cache, input_grad: bool = True) -> tuple[Array | None, Array, Array]:
    """Backward pass of :func:`conv_relu_pool_forward`: (dx, dw, db); dx is None when ``input_grad`` is False."""
    conv_cache, pool_cache, out, with_bias = unpack_cache("conv_relu_pool_backward", cache, 4, "conv_relu_pool_forward")
    check_dout("conv_relu_pool_backward", dout, out.shape, OUTPUT, like={"the cache": out})
    dpooled, db = _bias_relu_backward(dout, out, with_bias)
    dx, dw, _ = conv_backward_fast(max_pool_backward_fast(dpooled, pool_cache), conv_cache, input_grad)
    return dx, dw, db


@makes_cache("conv_bn_relu_forward")
def conv_bn_relu_forward(
    x: Array, w: Array, b: Array, gamma: Array, beta: Array, conv_param: dict, bn_param: dict
) -> tuple[Array, Cache]:
    """Convolution, spatial batchnorm (gamma, beta (F,)), then ReLU."""
    a, conv_cache = conv_forward_fast(x, w, b, conv_param)
    normed, bn_cache = spatial_batchnorm_forward(a, gamma, beta, bn_param)
    out, relu_cache = relu_forward(normed)
    return out, (conv_cache, bn_cache, relu_cache)


def conv_bn_relu_backward(dout: Array, cache: Cache, input_grad: bool = True) -> tuple:
    """Backward pass of :func:`conv_bn_relu_forward`: (dx, dw, db, dgamma, dbeta)."""
    return _conv_bn_relu_backward("conv_bn_relu_backward", dout, cache, input_grad)


def _conv_bn_relu_backward(name, dout, cache, input_grad):
    """:func:`conv_bn_relu_backward` reporting a fault as ``name`` (the pooled sandwich's too), so that a
    cache of a forward pass in test mode is not named by the batchnorm layer inside."""
    conv_cache, bn_cache, relu_cache = unpack_cache(name, cache, 3, "conv_bn_relu_forward")
    check_dout(name, dout, relu_cache.shape, OUTPUT, like={"the cache": relu_cache})
    train_mode_cache(name, bn_cache)
    dnormed, dgamma, dbeta = spatial_batchnorm_backward(relu_backward(dout, relu_cache), bn_cache)
    dx, dw, db = conv_backward_fast(dnormed, conv_cache, input_grad)
    return dx, dw, db, dgamma, dbeta


@makes_cache("conv_bn_relu_pool_forward")
def conv_bn_relu_pool_forward(
    x: Array, w: Array, b: Array, gamma: Array, beta: Array, conv_param: dict, bn_param: dict, pool_param: dict
) -> tuple[Array, Cache]:
    """Convolution, spatial batchnorm (gamma, beta (F,)), ReLU, then max pooling: x (N, C, H, W) -> (N, F, H'', W'')."""
    a, bn_relu_cache = conv_bn_relu_forward(x, w, b, gamma, beta, conv_param, bn_param)
    out, pool_cache = max_pool_forward_fast(a, pool_param)
    return out, (bn_relu_cache, pool_cache)


def conv_bn_relu_pool_backward(dout: Array, cache: Cache, input_grad: bool = True) -> tuple:
    """Backward pass of :func:`conv_bn_relu_pool_forward`: (dx, dw, db, dgamma, dbeta); dx is None
    when ``input_grad`` is False."""
    bn_relu_cache, pool_cache = unpack_cache("conv_bn_relu_pool_backward", cache, 2, "conv_bn_relu_pool_forward")
    pool_input, pool_param = pool_cache[0], pool_cache[1]
    h_out, w_out = pool_geometry("conv_bn_relu_pool_backward", pool_input, pool_param)[4:]
    expected = (*pool_input.shape[:2], h_out, w_out)
    check_dout("conv_bn_relu_pool_backward", dout, expected, OUTPUT, like={"the cache": pool_input})
    return _conv_bn_relu_backward("conv_bn_relu_pool_backward", max_pool_backward_fast(dout, pool_cache), bn_relu_cache,
                                  input_grad)  # fmt: skip
