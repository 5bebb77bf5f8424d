"""The reference convolution and max pool: loops over output positions, each one
vectorised over the batch and the filters. Plain to read and check; the fast
versions (:mod:`xpnet.fast_layers`) must give the same results.

Written against the array API only, like every layer.
"""

from __future__ import annotations

from array_api_compat import device

from .array_types import Array, Cache
from .conv_common import conv_geometry, pad2d, pool_geometry
from .input_checks import check_dout, makes_cache, unpack_cache

__all__ = ["conv_forward_naive", "conv_backward_naive", "max_pool_forward_naive", "max_pool_backward_naive"]


@makes_cache("conv_forward_naive")
def conv_forward_naive(x: Array, w: Array, b: Array, conv_param: dict) -> tuple[Array, Cache]:
    """Convolution (cross-correlation, no kernel flip) with zero padding on every side.

    Args:
        x: (N, C, H, W) input; w: (F, C, HH, WW) filters; b: (F,) biases, or None for none.
        conv_param: {'stride': s, 'pad': p}.
    Returns:
        out (N, F, H', W') with H' = 1 + (H + 2p − HH) / s, W' = 1 + (W + 2p − WW) / s;
        cache (x, w, b, conv_param).
    """
    xp, stride, pad, h_out, w_out = conv_geometry("conv_forward_naive", x, w, b, conv_param)
    n, f, hh, ww = x.shape[0], w.shape[0], w.shape[2], w.shape[3]
    xpad = pad2d(xp, x, pad)
    w_rows = xp.reshape(w, (f, -1))
    columns = []
    for i in range(h_out):
        for j in range(w_out):
            window = xpad[:, :, i * stride : i * stride + hh, j * stride : j * stride + ww]
            column = xp.reshape(window, (n, -1)) @ w_rows.T  # (N, F)
            columns.append(column if b is None else column + b)
    out = xp.reshape(xp.stack(columns, axis=2), (n, f, h_out, w_out))
    return out, (x, w, b, conv_param)


def conv_backward_naive(dout: Array, cache: Cache) -> tuple[Array, Array, Array]:
    """Backward pass of :func:`conv_forward_naive`.

    Args:
        dout: (N, F, H', W') upstream gradient; cache from the forward pass.
    Returns:
        dx (N, C, H, W), dw (F, C, HH, WW), db (F,) (None when the forward pass had no bias).
    """
    x, w, b, conv_param = unpack_cache("conv_backward_naive", cache, 4, "conv_forward_naive")
    xp, stride, pad, h_out, w_out = conv_geometry("conv_backward_naive", x, w, b, conv_param)
    n, f, hh, ww = x.shape[0], w.shape[0], w.shape[2], w.shape[3]
    check_dout("conv_backward_naive", dout, (n, f, h_out, w_out), like={"x": x})
    xpad = pad2d(xp, x, pad)
    dxpad = xp.zeros(xpad.shape, dtype=x.dtype, device=device(x))
    w_rows = xp.reshape(w, (f, -1))
    dw_rows = xp.zeros(w_rows.shape, dtype=w.dtype, device=device(w))
    for i in range(h_out):
        for j in range(w_out):
            rows, cols = slice(i * stride, i * stride + hh), slice(j * stride, j * stride + ww)
            d = dout[:, :, i, j]  # (N, F)
            dw_rows += d.T @ xp.reshape(xpad[:, :, rows, cols], (n, -1))
            dxpad[:, :, rows, cols] += xp.reshape(d @ w_rows, (n, x.shape[1], hh, ww))
    dx = dxpad[:, :, pad : pad + x.shape[2], pad : pad + x.shape[3]]
    db = None if b is None else xp.sum(dout, axis=(0, 2, 3))
    return dx, xp.reshape(dw_rows, w.shape), db


def _first_max_mask(xp, windows):
    """(N, C, K) one-hot of the first maximum along the last axis (row-major order of the window)."""
    first = xp.argmax(windows, axis=-1)
    positions = xp.arange(windows.shape[-1], device=device(windows))
    return xp.astype(first[..., None] == positions, windows.dtype)


@makes_cache("max_pool_forward_naive")
def max_pool_forward_naive(x: Array, pool_param: dict) -> tuple[Array, Cache]:
    """Max pooling.

    Args:
        x: (N, C, H, W); pool_param: {'pool_height', 'pool_width', 'stride'}, and optionally
            'drop_remainder': True to pool only the windows that fit where they do not tile
            the input (PyTorch's MaxPool2d; the rows and columns left over get no gradient),
            which is refused otherwise.
    Returns:
        out (N, C, H', W') with H' = 1 + (H − pool_height) // stride; cache (x, pool_param).
    """
    xp, ph, pw, stride, h_out, w_out = pool_geometry("max_pool_forward_naive", x, pool_param)
    n, c = x.shape[0], x.shape[1]
    maxima = [
        xp.max(x[:, :, i * stride : i * stride + ph, j * stride : j * stride + pw], axis=(2, 3))
        for i in range(h_out)
        for j in range(w_out)
    ]
    return xp.reshape(xp.stack(maxima, axis=2), (n, c, h_out, w_out)), (x, pool_param)


def max_pool_backward_naive(dout: Array, cache: Cache) -> Array:
    """Backward pass of max pooling: each window's gradient goes to its first maximum
    (row-major order), so ties never double-count.

    Returns:
        dx (N, C, H, W).
    """
    x, pool_param = unpack_cache("max_pool_backward_naive", cache, 2, "max_pool_forward_naive")
    xp, ph, pw, stride, h_out, w_out = pool_geometry("max_pool_backward_naive", x, pool_param)
    n, c = x.shape[0], x.shape[1]
    expected = (n, c, h_out, w_out)
    check_dout("max_pool_backward_naive", dout, expected, like={"x": x})
    dx = xp.zeros(x.shape, dtype=x.dtype, device=device(x))
    for i in range(h_out):
        for j in range(w_out):
            rows, cols = slice(i * stride, i * stride + ph), slice(j * stride, j * stride + pw)
            mask = _first_max_mask(xp, xp.reshape(x[:, :, rows, cols], (n, c, ph * pw)))
            dx[:, :, rows, cols] += xp.reshape(mask * dout[:, :, i, j][..., None], (n, c, ph, pw))
    return dx
