"""What the convolution and pooling layers share: argument checks in xpnet's words,
zero padding, and the strided slice that one kernel offset sees.

Shapes: x (N, C, H, W); w (F, C, HH, WW); out (N, F, H', W') with
H' = 1 + (H + 2·pad − HH) / stride (and the same for W').
"""

from __future__ import annotations

from array_api_compat import device

from .array_types import Array
from .backend import accelerated
from .input_checks import as_int, check_param_keys, layer_namespace

__all__ = [
    "conv_geometry",
    "pool_geometry",
    "pad2d",
    "strided",
    "offset_slice",
    "padded_offset",
    "channel_sum",
]


def _positive_int(function, name, value):
    number = as_int(value)
    if number is None or number <= 0:
        raise ValueError(f"{function}: {name} must be a positive integer, got {value!r}")
    return number


def _tiles(function, what, size, kernel, stride, shape_text, drop_remainder=False, hint=""):
    """H' for one axis, or ValueError (ending with ``hint``) when the windows do not tile
    ``size`` and ``drop_remainder`` does not allow what they leave over."""
    if kernel > size:
        raise ValueError(f"{function}: the {what} {kernel} is larger than the input's {size} ({shape_text})")
    if (size - kernel) % stride and not drop_remainder:
        raise ValueError(
            f"{function}: {what} {kernel} with stride {stride} does not tile a size of {size} "
            f"({shape_text}): (size - {what}) must be a multiple of the stride{hint}"
        )
    return 1 + (size - kernel) // stride


def conv_geometry(function: str, x: Array, w: Array, b: Array, conv_param: dict):
    """Check a convolution's arguments (``b`` may be None: no bias); returns (xp, stride, pad, H_out, W_out)."""
    xp = layer_namespace(function, {"x": x, "w": w, **({} if b is None else {"b": b})})
    b_shape = None if b is None else tuple(b.shape)
    if x.ndim != 4 or w.ndim != 4 or (b is not None and b.ndim != 1):
        raise ValueError(
            f"{function}: x must be (N, C, H, W), w (F, C, HH, WW) and b (F,) or None; "
            f"got x {tuple(x.shape)}, w {tuple(w.shape)}, b {b_shape}"
        )
    if 0 in tuple(w.shape):  # NumPy failed reshaping the empty columns, which named neither array
        raise ValueError(
            f"{function}: w {tuple(w.shape)} is empty; it needs at least one filter, channel, row and column"
        )
    if x.shape[1] != w.shape[1]:
        raise ValueError(
            f"{function}: x {tuple(x.shape)} has {x.shape[1]} channels but w {tuple(w.shape)} expects {w.shape[1]}"
        )
    if b is not None and b.shape[0] != w.shape[0]:
        raise ValueError(f"{function}: b {b_shape} must have one bias per filter of w {tuple(w.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{function}: empty batch, x has shape {tuple(x.shape)}")
    check_param_keys(function, "conv_param", conv_param, ("stride", "pad"))
    stride = _positive_int(function, "conv_param['stride']", conv_param.get("stride", 1))
    pad = as_int(conv_param.get("pad", 0))
    if pad is None or pad < 0:
        raise ValueError(f"{function}: conv_param['pad'] must be a non-negative integer, got {conv_param.get('pad')!r}")
    text = f"x {tuple(x.shape)}, w {tuple(w.shape)}, stride {stride}, pad {pad}"
    h_out = _tiles(function, "kernel height", x.shape[2] + 2 * pad, w.shape[2], stride, text)
    w_out = _tiles(function, "kernel width", x.shape[3] + 2 * pad, w.shape[3], stride, text)
    return xp, stride, pad, h_out, w_out


def pool_geometry(function: str, x: Array, pool_param: dict):
    """Check a max pool's arguments; returns (xp, pool_height, pool_width, stride, H_out, W_out)."""
    xp = layer_namespace(function, {"x": x})
    if x.ndim != 4:
        raise ValueError(f"{function}: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    check_param_keys(function, "pool_param", pool_param, ("pool_height", "pool_width", "stride", "drop_remainder"))
    ph = _positive_int(function, "pool_param['pool_height']", pool_param.get("pool_height", 2))
    pw = _positive_int(function, "pool_param['pool_width']", pool_param.get("pool_width", 2))
    stride = _positive_int(function, "pool_param['stride']", pool_param.get("stride", 2))
    drop = pool_param.get("drop_remainder", False)
    if not isinstance(drop, bool):
        raise ValueError(f"{function}: pool_param['drop_remainder'] must be True or False, got {drop!r}")
    text = f"x {tuple(x.shape)}, pool {ph}x{pw}, stride {stride}"
    hint = ", or pool_param['drop_remainder'] True to pool only the windows that fit"
    h_out = _tiles(function, "pool height", x.shape[2], ph, stride, text, drop, hint)
    w_out = _tiles(function, "pool width", x.shape[3], pw, stride, text, drop, hint)
    return xp, ph, pw, stride, h_out, w_out


def pad2d(xp, x: Array, pad: int) -> Array:
    """``x`` (..., H, W) with ``pad`` zeros on every side of the last two axes."""
    if pad == 0:
        return x
    *lead, h, w = x.shape
    # One zero buffer and one strided copy: concatenating along the last axes of a
    # permuted input costs several copies, 8x the time on NumPy.
    out = xp.zeros((*lead, h + 2 * pad, w + 2 * pad), dtype=x.dtype, device=device(x))
    out[..., pad : pad + h, pad : pad + w] = x
    return out


def strided(k: int, stride: int, count: int) -> slice:
    """Along one axis, what kernel offset ``k`` sees at ``count`` output positions: k, k + stride, ..."""
    return slice(k, k + stride * (count - 1) + 1, stride)


def offset_slice(ki: int, kj: int, stride: int, h_out: int, w_out: int) -> tuple:
    """The index of what kernel offset (ki, kj) sees at every output position:
    rows ki, ki + stride, ..., and the same for columns (an (..., H', W') view)."""
    return (Ellipsis, strided(ki, stride, h_out), strided(kj, stride, w_out))


def _inside(k: int, pad: int, stride: int, size: int, out: int) -> tuple[int, int, slice]:
    """Along one axis, for kernel offset ``k``: the output positions [lo, hi) whose input
    position i·stride + k − pad falls inside the unpadded input, and those inputs' slice."""
    lo = max(0, -(-(pad - k) // stride))
    hi = min(out, (size - 1 + pad - k) // stride + 1)
    if hi <= lo:
        return 0, 0, slice(0, 0)
    start = lo * stride + k - pad
    return lo, hi, slice(start, start + (hi - lo - 1) * stride + 1, stride)


def padded_offset(ki: int, kj: int, stride: int, pad: int, size: tuple, out: tuple):
    """What kernel offset (ki, kj) sees of an input of ``size`` (H, W) zero-padded by
    ``pad``, without building the padded input: ``(rows, cols, source)`` where
    ``rows`` = (lo, hi) and ``cols`` = (lo, hi) are the output positions (of ``out`` =
    (H', W')) that see the input itself, through the index ``source`` (an (..., h, w) view
    of the unpadded input); every other output position sees padding."""
    r_lo, r_hi, r_slice = _inside(ki, pad, stride, size[0], out[0])
    c_lo, c_hi, c_slice = _inside(kj, pad, stride, size[1], out[1])
    return (r_lo, r_hi), (c_lo, c_hi), (Ellipsis, r_slice, c_slice)


def channel_sum(xp, x: Array, dtype=None) -> Array:
    """The sum of x (N, C, H, W) over N, H and W: (C,), summed in ``dtype`` (x's by default).

    H·W is summed first, then N: the same result as one sum over axes (0, 2, 3), but on a GPU
    the first pass runs over contiguous rows with many blocks, where a single reduction gets
    one block per channel."""
    fast = accelerated(x)
    if fast is not None:  # reads x in its memory order, which may have the channels outermost
        return fast.channel_sum(x, dtype)
    n, c, h, w = x.shape
    return xp.sum(xp.sum(xp.reshape(x, (n, c, h * w)), axis=2, dtype=dtype), axis=0, dtype=dtype)
