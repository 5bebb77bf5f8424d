"""Fast convolution and max pooling: im2col built from strided slices, one GEMM.

The array API has neither scatter nor strided views, so the column matrix is
filled from HH·WW strided slices of the input (one per kernel offset), each
written where that offset sees the input and zeros where it sees padding (no
padded copy of the input is made), and col2im adds the column gradients back one
offset at a time, each a strided slice. For a batch of 8 or more the columns' positions are
laid out with the batch innermost (:func:`column_layout`), so that each of those slices
copies runs of N contiguous values. Max pooling takes the maximum over the window's
rows (strided slices of whole rows), then over its columns, and its backward pass routes
the gradient to each window's first maximum, offset by offset. Everything is array API,
so it runs unchanged on NumPy, CuPy, PyTorch and array-api-strict; the matrix
products go through :func:`xpnet.layers.matmul`, which on CuPy uses xpnet's
capturable cuBLAS handle, and im2col, col2im and each max-pool pass are one fused
kernel each there. With ``CupyKernels.direct_small_convs`` on, a convolution of at most
32 taps (C·HH·WW, a network's first layer) runs there without columns: one kernel for
the output and one for the filters' gradient. Which path a convolution takes on CuPy
(those kernels, cuDNN, or im2col) is the backend's to say (``CupyKernels.conv_path``).

Same signatures and results as the naive layers in :mod:`xpnet.layers`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from array_api_compat import device

from .array_types import Array, Cache
from .backend import accelerated, backend_of, namespace
from .conv_common import channel_sum, conv_geometry, offset_slice, padded_offset, pool_geometry, strided
from .input_checks import check_dout, check_flag, makes_cache, unpack_cache
from .layers import matmul

__all__ = [
    "conv_forward_fast",
    "conv_backward_fast",
    "max_pool_forward_fast",
    "max_pool_backward_fast",
    # The course's fast_layers.py has three conv and three pool implementations; xpnet has one of
    # each, which takes every case, under all of the course's names, so that code written against
    # any of them ports by its import. The caches are the same whichever name made them.
    "conv_forward_im2col",
    "conv_backward_im2col",
    "conv_forward_strides",
    "conv_backward_strides",
    "max_pool_forward_reshape",
    "max_pool_backward_reshape",
    "max_pool_forward_im2col",
    "max_pool_backward_im2col",
]


# The three names of each layer make one kind of cache: any of them may go to any backward name.
_conv_cache = makes_cache("conv_forward_fast", "conv_forward_im2col", "conv_forward_strides")
_pool_cache = makes_cache("max_pool_forward_fast", "max_pool_forward_reshape", "max_pool_forward_im2col")


# How the reference path lays out the columns' positions, as a permutation of x's axes (N, C, H, W):
# channels first, positions N·H'·W' (the fused kernels' order), or also batch last, positions H'·W'·N.
CHANNELS_FIRST = (1, 0, 2, 3)  # (C, N, H, W); its own inverse
BATCH_LAST = (1, 2, 3, 0)  # (C, H, W, N)
_BATCH_LAST_FROM = 8  # images: fewer make runs too short to pay for the copy of x


def column_layout(x: Array) -> tuple[int, ...]:
    """The layout of the columns that :func:`columns` builds from x (N, C, H, W):
    :data:`BATCH_LAST` on the reference path on a CPU for a batch of 8 or more, else
    :data:`CHANNELS_FIRST` (the fused kernels' order, and a GPU's, where it has not been measured).

    With the batch innermost every strided slice that im2col and col2im copy is a run of N
    contiguous values, where channels first it is a row of W' values, strided by the stride
    (on NumPy, in float32: the course's stride-2 forward 1.3-1.5x as fast, its backward
    1.2-1.35x; two images of 64x64 0.6x, hence the threshold). The convolution's output is then
    laid out (F, H', W', N) too, which the pools and normalisations after it read in the same
    long runs and hand back their gradients in. A dout in C order costs the backward pass a
    transposing copy into that layout instead (about 10 ms for a (128, 32, 32, 32) float32
    one on two cores; 2 ms channels first)."""
    if accelerated(x) is None and x.shape[0] >= _BATCH_LAST_FROM and not backend_of(x).is_gpu:
        return BATCH_LAST
    return CHANNELS_FIRST


def laid_out(shape: tuple, layout: tuple[int, ...]) -> tuple:
    """``shape`` (N, C, H, W) in ``layout``'s order of axes."""
    return tuple(shape[axis] for axis in layout)


def back_from(xp, a: Array, layout: tuple[int, ...]) -> Array:
    """``a``, laid out in ``layout``, as an (N, C, H, W) view."""
    return xp.permute_dims(a, tuple(layout.index(axis) for axis in range(4)))


def _positions(n: int, h_out: int, w_out: int, layout: tuple[int, ...]) -> tuple:
    """The output positions' axes in ``layout``: (N, H', W') or (H', W', N) (both layouts put the channels first)."""
    return laid_out((n, 1, h_out, w_out), layout)[1:]


def _spatial(layout, rows, cols) -> tuple:
    """The index of (rows, cols) of every image and channel of an array laid out in
    ``layout``, whatever axes stand before the spatial ones."""
    return (Ellipsis, rows, cols, slice(None)) if layout == BATCH_LAST else (Ellipsis, rows, cols)


def _at_offset(layout, k, rows, cols) -> tuple:
    """The index of kernel offset ``k``'s output positions (rows, cols) in columns shaped
    (C, HH·WW, positions in ``layout``)."""
    return (slice(None), k, *_spatial(layout, rows, cols))


def _im2col(xp, source, hh, ww, stride, pad, h_out, w_out, layout=CHANNELS_FIRST):
    """(C·HH·WW, positions) columns of ``source`` (x laid out in ``layout``) zero-padded by
    ``pad``: row c·HH·WW + ki·WW + kj holds what kernel offset (ki, kj) of channel c sees at
    each output position, the positions in ``layout``'s order (N·H'·W' or H'·W'·N)."""
    n, c, h, w = back_from(xp, source, layout).shape
    shape = (c, hh * ww, *_positions(n, h_out, w_out, layout))
    cols = xp.empty(shape, dtype=source.dtype, device=device(source))
    every = slice(None)
    for k in range(hh * ww):
        (r_lo, r_hi), (c_lo, c_hi), (_, in_rows, in_cols) = padded_offset(
            k // ww, k % ww, stride, pad, (h, w), (h_out, w_out)
        )
        cols[_at_offset(layout, k, slice(r_lo, r_hi), slice(c_lo, c_hi))] = source[_spatial(layout, in_rows, in_cols)]
        # Only the borders that see padding are zeroed: filling all of cols first would cost a pass.
        if r_lo > 0:
            cols[_at_offset(layout, k, slice(None, r_lo), every)] = 0
        if r_hi < h_out:  # all of them when the offset sees no input row (r_hi = 0)
            cols[_at_offset(layout, k, slice(r_hi, None), every)] = 0
        if c_lo > 0:
            cols[_at_offset(layout, k, every, slice(None, c_lo))] = 0
        if c_hi < w_out:
            cols[_at_offset(layout, k, every, slice(c_hi, None))] = 0
    return xp.reshape(cols, (c * hh * ww, -1))


def _contiguous(xp, a: Array) -> Array:
    """``a`` itself where its memory is laid out in its order of axes, else such a copy."""
    return xp.reshape(xp.reshape(a, (-1,)), a.shape)


class _Columns(NamedTuple):
    """The im2col path's columns and the order of their positions: the backward pass must
    lay dout out the same way, whichever path (fused or reference) it takes itself."""

    matrix: Array  # (C·HH·WW, positions)
    layout: tuple[int, ...]  # CHANNELS_FIRST or BATCH_LAST


def _columns(x: Array, hh: int, ww: int, stride: int, pad: int, h_out: int, w_out: int) -> _Columns:
    """The columns of x (N, C, H, W) that :func:`conv_forward_fast` multiplies by the filters,
    laid out as :func:`column_layout` says: one fused kernel where the backend has one (channels
    first), else :func:`_im2col`."""
    layout = column_layout(x)
    fast = accelerated(x)
    if fast is not None:
        return _Columns(fast.im2col(x, hh, ww, stride, pad, h_out, w_out), layout)
    xp = namespace(x)
    source = xp.permute_dims(x, layout)  # the columns' layout: they need no transpose
    if layout == BATCH_LAST:  # each copy then reads runs of N values (no copy where x is laid out so)
        source = _contiguous(xp, source)
    return _Columns(_im2col(xp, source, hh, ww, stride, pad, h_out, w_out, layout), layout)


def columns(x: Array, hh: int, ww: int, stride: int, pad: int, h_out: int, w_out: int) -> Array:
    """The (C·HH·WW, positions) columns of x (N, C, H, W) that :func:`conv_forward_fast`
    multiplies by the filters, the positions in :func:`column_layout`'s order."""
    return _columns(x, hh, ww, stride, pad, h_out, w_out).matrix


def _col2im(xp, cols, shape, hh, ww, stride, pad, h_out, w_out, layout=CHANNELS_FIRST):
    """The adjoint of :func:`_im2col`: (C·HH·WW, positions) back to an input of ``shape``
    (N, C, H, W), laid out in ``layout``; overlaps added, what fell on the padding dropped."""
    n, c, h, w = shape
    cols = xp.reshape(cols, (c, hh * ww, *_positions(n, h_out, w_out, layout)))
    out = xp.zeros(laid_out(shape, layout), dtype=cols.dtype, device=device(cols))
    for k in range(hh * ww):
        (r_lo, r_hi), (c_lo, c_hi), (_, in_rows, in_cols) = padded_offset(
            k // ww, k % ww, stride, pad, (h, w), (h_out, w_out)
        )
        if r_hi > r_lo and c_hi > c_lo:
            out[_spatial(layout, in_rows, in_cols)] += cols[_at_offset(layout, k, slice(r_lo, r_hi), slice(c_lo, c_hi))]
    return out


def _filter_rows(xp, dout, layout):
    """dout (N, F, H', W') as (F, positions) rows, one a filter, the positions in ``layout``'s order."""
    return xp.reshape(xp.permute_dims(dout, layout), (dout.shape[1], -1))


class _LibraryConvolution(NamedTuple):
    """A convolution a backend's library ran without columns (cuDNN): its backward pass too."""

    engine: Any  # the backend's convolution library (xpnet.backend.cudnn)


class _SmallFilterConvolution(NamedTuple):
    """A convolution with few taps that the fused kernels ran without columns: its filters'
    gradient comes straight from x and dout too, its input gradient through columns."""

    kernels: Any  # the backend's fused kernels (CupyKernels)


@_conv_cache
def conv_forward_fast(x: Array, w: Array, b: Array, conv_param: dict) -> tuple[Array, Cache]:
    """Convolution as im2col + one GEMM; the same contract as :func:`xpnet.layers.conv_forward_naive`.

    Args:
        x: (N, C, H, W); w: (F, C, HH, WW); b: (F,) or None (no bias); conv_param: {'stride', 'pad'}.
    Returns:
        out (N, F, H', W') and the cache (x, w, b, conv_param, columns); with cuDNN switched
        on (``backend.set_cudnn(True)``, CuPy) cuDNN runs it and the cache holds no columns,
        nor does it where CuPy's direct kernels take a convolution with few taps. With
        ``backend.set_conv_autotune(True)`` (CuPy), the fastest of those paths, by timing.
    """
    return _conv_forward(x, w, b, conv_param, conv_geometry("conv_forward_fast", x, w, b, conv_param))


@_conv_cache
def conv_forward_im2col(x: Array, w: Array, b: Array, conv_param: dict) -> tuple[Array, Cache]:
    """The course's name for :func:`conv_forward_fast` (im2col and one GEMM is what it does)."""
    return _conv_forward(x, w, b, conv_param, conv_geometry("conv_forward_im2col", x, w, b, conv_param))


@_conv_cache
def conv_forward_strides(x: Array, w: Array, b: Array, conv_param: dict) -> tuple[Array, Cache]:
    """The course's name for :func:`conv_forward_fast` (its columns come from strided slices)."""
    return _conv_forward(x, w, b, conv_param, conv_geometry("conv_forward_strides", x, w, b, conv_param))


def _conv_forward(x, w, b, conv_param, geometry):
    """:func:`conv_forward_fast` with its arguments already checked: ``geometry`` is what
    :func:`conv_geometry` returned for them (the sandwiches check them under their own names)."""
    fast = accelerated(x)
    if fast is None:
        return _im2col_conv(fast, x, w, b, conv_param, geometry)

    def trial(path):  # one forward and backward pass along ``path``, which the backend may time
        out, cache = _CONV_PATHS[path](fast, x, w, b, conv_param, geometry)
        conv_backward_fast(out, cache)

    path = fast.conv_path(x, w, b, geometry[1], geometry[2], trial)
    return _CONV_PATHS[path](fast, x, w, b, conv_param, geometry)


def _direct_conv(fast, x, w, b, conv_param, geometry):
    """The fused kernels' convolution without columns (few taps)."""
    _, stride, pad, h_out, w_out = geometry
    out = fast.direct_conv_forward(x, w, b, stride, pad, h_out, w_out)
    return out, (x, w, b, conv_param, _SmallFilterConvolution(fast))


def _library_conv(fast, x, w, b, conv_param, geometry):
    """The convolution through a library the backend loads (cuDNN)."""
    xp, stride, pad = geometry[:3]
    engine = fast.cudnn_engine(x)
    x = engine.contiguous(x)  # the backward pass reads the same copy, if one is made
    out = engine.forward(x, w, stride, pad)
    if b is not None:
        out += xp.reshape(b, (1, w.shape[0], 1, 1))
    return out, (x, w, b, conv_param, _LibraryConvolution(engine))


def _im2col_conv(fast, x, w, b, conv_param, geometry):
    """The convolution as im2col and one GEMM (``fast`` unused: :func:`_columns` asks for it)."""
    xp, stride, pad, h_out, w_out = geometry
    n, f, hh, ww = x.shape[0], w.shape[0], w.shape[2], w.shape[3]
    cols = _columns(x, hh, ww, stride, pad, h_out, w_out)
    out = matmul(xp.reshape(w, (f, -1)), cols.matrix)  # (F, positions), a fresh array
    if b is not None:
        out += b[:, None]
    out = back_from(xp, xp.reshape(out, laid_out((n, f, h_out, w_out), cols.layout)), cols.layout)
    return out, (x, w, b, conv_param, cols)


# The backend's conv_path names one of these.
_CONV_PATHS = {"direct": _direct_conv, "cudnn": _library_conv, "im2col": _im2col_conv}


def conv_backward_fast(dout: Array, cache: Cache, input_grad: bool = True) -> tuple[Array | None, Array, Array]:
    """Backward pass of :func:`conv_forward_fast`: dx (N, C, H, W) (None when
    ``input_grad`` is False, as for a network's first layer), dw (F, C, HH, WW), db (F,)
    (None without a bias)."""
    return _conv_backward("conv_backward_fast", "conv_forward_fast", dout, cache, input_grad)


def conv_backward_im2col(dout: Array, cache: Cache, input_grad: bool = True) -> tuple[Array | None, Array, Array]:
    """The course's name for :func:`conv_backward_fast`; the cache of any of the three forward names will do."""
    return _conv_backward("conv_backward_im2col", "conv_forward_im2col", dout, cache, input_grad)


def conv_backward_strides(dout: Array, cache: Cache, input_grad: bool = True) -> tuple[Array | None, Array, Array]:
    """The course's name for :func:`conv_backward_fast`; the cache of any of the three forward names will do."""
    return _conv_backward("conv_backward_strides", "conv_forward_strides", dout, cache, input_grad)


def _conv_backward(name, forward, dout, cache, input_grad):
    """:func:`conv_backward_fast` reporting a fault as ``name``, the backward pass of ``forward``."""
    x, w, b, conv_param, cols = unpack_cache(name, cache, 5, forward)
    input_grad = check_flag(f"{name}: input_grad", input_grad)  # "False" is truthy: dx was computed
    xp, stride, pad, h_out, w_out = conv_geometry(name, x, w, b, conv_param)
    n, f, hh, ww = x.shape[0], w.shape[0], w.shape[2], w.shape[3]
    check_dout(name, dout, (n, f, h_out, w_out), like={"x": x})
    if isinstance(cols, _LibraryConvolution):
        engine = cols.engine
        dw = engine.backward_filter(x, dout, tuple(w.shape), stride, pad)
        db = None if b is None else channel_sum(xp, dout)
        dx = engine.backward_data(w, dout, tuple(x.shape), stride, pad) if input_grad else None
        return dx, dw, db
    if isinstance(cols, _SmallFilterConvolution):
        layout = CHANNELS_FIRST  # the fused col2im's
        dout_rows = None  # made below only if dx is wanted: a copy unless dout has its channels outermost
        dw = cols.kernels.direct_conv_filter_grad(x, dout, hh, ww, stride, pad)
        db = None if b is None else channel_sum(xp, dout)
    else:
        layout = cols.layout  # dout's rows follow the columns' positions
        dout_rows = _filter_rows(xp, dout, layout)
        dw = xp.reshape(matmul(dout_rows, cols.matrix.T), w.shape)
        db = None if b is None else xp.sum(dout_rows, axis=1)
    if not input_grad:
        return None, dw, db
    if dout_rows is None:
        dout_rows = _filter_rows(xp, dout, layout)
    dcols = matmul(xp.reshape(w, (f, -1)).T, dout_rows)
    fast = accelerated(dcols)
    if fast is not None and layout == CHANNELS_FIRST:  # the fused kernel's order
        return fast.col2im(dcols, x, hh, ww, stride, pad, h_out, w_out), dw, db
    dx = _col2im(xp, dcols, tuple(x.shape), hh, ww, stride, pad, h_out, w_out, layout)
    return back_from(xp, dx, layout), dw, db


class _FusedPoolCache(NamedTuple):
    """What the fused kernels' backward pass needs: each window's first maximum, as the
    offset ki·pw + kj (N, C, H', W')."""

    kernels: Any  # the backend's fused kernels (CupyKernels)
    argmax: Array


@_pool_cache
def max_pool_forward_fast(x: Array, pool_param: dict) -> tuple[Array, Cache]:
    """Max pooling over strided slices; the same contract as :func:`xpnet.layers.max_pool_forward_naive`.

    The maximum of ph row slices, then of pw column slices of that (no copy of the windows).
    The cache is (x, pool_param, out), or on a backend with fused kernels (x, pool_param,
    each window's first maximum)."""
    return _max_pool_forward("max_pool_forward_fast", x, pool_param)


@_pool_cache
def max_pool_forward_reshape(x: Array, pool_param: dict) -> tuple[Array, Cache]:
    """The course's name for :func:`max_pool_forward_fast`, which takes any pool (the course's
    needs square windows that tile the input)."""
    return _max_pool_forward("max_pool_forward_reshape", x, pool_param)


@_pool_cache
def max_pool_forward_im2col(x: Array, pool_param: dict) -> tuple[Array, Cache]:
    """The course's name for :func:`max_pool_forward_fast` (it pools strided slices, no columns)."""
    return _max_pool_forward("max_pool_forward_im2col", x, pool_param)


def _max_pool_forward(name, x, pool_param):
    """:func:`max_pool_forward_fast` reporting a fault as ``name``."""
    xp, ph, pw, stride, h_out, w_out = pool_geometry(name, x, pool_param)
    fast = accelerated(x)
    if fast is not None:
        out, argmax = fast.max_pool_forward(x, ph, pw, stride, h_out, w_out)
        return out, (x, pool_param, _FusedPoolCache(fast, argmax))
    # Separable: the maximum over the window's rows first, on whole rows (unit stride, so the
    # passes vectorise), then over its columns on ph times less data: about half the time of one
    # pass per window offset on NumPy.
    rows = _running_maximum(xp, [x[..., strided(ki, stride, h_out), :] for ki in range(ph)])
    out = _running_maximum(xp, [rows[..., strided(kj, stride, w_out)] for kj in range(pw)])
    if pw == 1:
        out = xp.asarray(out, copy=True)  # a slice of x or of rows: a new array of its own
    return out, (x, pool_param, out)


def _running_maximum(xp, slices):
    """The elementwise maximum of equally shaped arrays (the first one itself if there is one)."""
    out = slices[0]
    for piece in slices[1:]:
        out = xp.maximum(out, piece)
    return out


def max_pool_backward_fast(dout: Array, cache: Cache) -> Array:
    """Backward pass of :func:`max_pool_forward_fast`: each window's gradient goes to its
    first maximum (row-major order); overlapping windows add up. Returns dx (N, C, H, W)."""
    return _max_pool_backward("max_pool_backward_fast", "max_pool_forward_fast", dout, cache)


def max_pool_backward_reshape(dout: Array, cache: Cache) -> Array:
    """The course's name for :func:`max_pool_backward_fast`; the cache of any of the three forward names will do."""
    return _max_pool_backward("max_pool_backward_reshape", "max_pool_forward_reshape", dout, cache)


def max_pool_backward_im2col(dout: Array, cache: Cache) -> Array:
    """The course's name for :func:`max_pool_backward_fast`; the cache of any of the three forward names will do."""
    return _max_pool_backward("max_pool_backward_im2col", "max_pool_forward_im2col", dout, cache)


def _max_pool_backward(name, forward, dout, cache):
    """:func:`max_pool_backward_fast` reporting a fault as ``name``, the backward pass of ``forward``."""
    x, pool_param, saved = unpack_cache(name, cache, 3, forward)
    xp, ph, pw, stride, h_out, w_out = pool_geometry(name, x, pool_param)
    expected = (x.shape[0], x.shape[1], h_out, w_out)
    check_dout(name, dout, expected, like={"x": x})
    if isinstance(saved, _FusedPoolCache):
        return saved.kernels.max_pool_backward(dout, saved.argmax, x, ph, pw, stride, h_out, w_out)
    out = saved
    # Every array below is made *_like x or out, and dout is copied once into out's memory order:
    # x is often a convolution's output, laid out as its columns (column_layout), and NumPy keeps that order
    # for *_like arrays, so each pass then walks all its operands alike (about twice as fast as
    # mixing orders), and dx comes out in the order the convolution's backward pass reads.
    dout_like_out = xp.empty_like(out)
    dout_like_out[...] = dout
    # Offset by offset in row-major order, each window's first element equal to its maximum.
    unclaimed = xp.ones_like(out, dtype=xp.bool)
    disjoint = stride >= ph and stride >= pw  # no element in two windows: write each slice, never add
    # every element in exactly one window (no remainder dropped): no zero fill either
    tiles = stride == ph == pw and (h_out * stride, w_out * stride) == (x.shape[2], x.shape[3])
    dx = (xp.empty_like if tiles else xp.zeros_like)(x)
    for k in range(ph * pw):
        index = offset_slice(k // pw, k % pw, stride, h_out, w_out)
        hit = (x[index] == out) & unclaimed
        unclaimed &= ~hit
        # A product, not a where: NumPy's where mispredicts a branch per element on such masks (~8x slower).
        routed = dout_like_out * xp.astype(hit, dout.dtype)
        if disjoint:
            dx[index] = routed
        else:
            dx[index] += routed
    return dx
