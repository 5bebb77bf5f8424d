"""Data augmentation drawn and applied on the device, in the array API: horizontal
flips and random translations with reflect padding (the fast CIFAR-10 recipe's).

Images are (N, C, H, W). Random choices come from a :class:`~xpnet.backend.DeviceRNG`
passed in, so a seeded run draws the same augmentations every time.
"""

from __future__ import annotations

from .array_types import Array
from .backend import namespace

__all__ = ["reflect_pad", "flip_images", "random_flip_mask", "translate_images", "random_translate"]


def _check_images(function, x):
    if x.ndim != 4:
        raise ValueError(f"{function}: images must be (N, C, H, W), got shape {tuple(x.shape)}")


def reflect_pad(x: Array, pad: int) -> Array:
    """``x`` (N, C, H, W) padded by ``pad`` on every side, mirroring without repeating the edge
    (PyTorch's ``mode='reflect'``): [a b c d] padded by 2 is [c b a b c d c b]."""
    _check_images("reflect_pad", x)
    if pad == 0:
        return x
    if pad >= min(x.shape[2], x.shape[3]):
        raise ValueError(f"reflect_pad: pad {pad} must be smaller than the image's sides {tuple(x.shape[2:])}")
    xp = namespace(x)
    left, right = xp.flip(x[..., 1 : pad + 1], axis=3), xp.flip(x[..., -pad - 1 : -1], axis=3)
    x = xp.concat([left, x, right], axis=3)
    top, bottom = xp.flip(x[:, :, 1 : pad + 1, :], axis=2), xp.flip(x[:, :, -pad - 1 : -1, :], axis=2)
    return xp.concat([top, x, bottom], axis=2)


def random_flip_mask(rng, n: int) -> Array:
    """(N,) booleans, each True with probability 1/2, drawn on the device."""
    return rng.uniform((n,)) < 0.5


def flip_images(x: Array, mask: Array) -> Array:
    """Images mirrored left to right where ``mask`` (N,) is True, the others as they are."""
    _check_images("flip_images", x)
    xp = namespace(x, mask)
    return xp.where(mask[:, None, None, None], xp.flip(x, axis=3), x)


def translate_images(x: Array, shift_rows: Array, shift_cols: Array, max_shift: int) -> Array:
    """Each image moved by its own (rows, cols) offset in [-max_shift, max_shift], the gap
    filled by reflection: a crop of the reflect-padded image. shift_*: (N,) integers."""
    _check_images("translate_images", x)
    xp = namespace(x, shift_rows, shift_cols)
    h, w = x.shape[2], x.shape[3]
    padded = reflect_pad(x, max_shift)
    # Rows first, then columns: 2·(2·max_shift + 1) selections instead of one per (row, col) pair.
    # A shift of +s shows the content that sits s pixels further on, as torch.roll(x, -s) would.
    rows = xp.zeros_like(padded[:, :, :h, :])
    for k in range(2 * max_shift + 1):
        chosen = (shift_rows + max_shift == k)[:, None, None, None]
        rows = xp.where(chosen, padded[:, :, k : k + h, :], rows)
    out = xp.zeros_like(x)
    for k in range(2 * max_shift + 1):
        chosen = (shift_cols + max_shift == k)[:, None, None, None]
        out = xp.where(chosen, rows[..., k : k + w], out)
    return out


def random_translate(x: Array, rng, max_shift: int = 2) -> Array:
    """Each image translated by offsets drawn uniformly from [-max_shift, max_shift] on the device."""
    n = x.shape[0]
    shifts = rng.integers(-max_shift, max_shift + 1, (2, n))
    return translate_images(x, shifts[0, :], shifts[1, :], max_shift)
