"""Data augmentation drawn and applied on the device, in the array API: horizontal
flips and random translations with reflect padding, the fast CIFAR-10 recipe's
per-epoch scheme (:class:`AlternatingFlipTranslate`), and test-time augmentation
(:func:`tta_scores`).

Images are (N, C, H, W). Random choices come from a :class:`~xpnet.backend.DeviceRNG`
passed in, so a seeded run draws the same augmentations every time.
"""

from __future__ import annotations

from .array_types import Array
from .backend import backend_of, check_generator, namespace
from .batching import checked_scores
from .input_checks import as_int, check_flag, dtype_name, is_array

__all__ = [
    "reflect_pad",
    "flip_images",
    "random_flip_mask",
    "translate_images",
    "crop_padded",
    "random_translate",
    "AlternatingFlipTranslate",
    "tta_scores",
]


def _check_images(function, x, floats=False):
    """TypeError or ValueError naming ``function`` unless ``x`` is an (N, C, H, W) array, of
    floats where ``floats`` (a translation marks an image whose offset is out of range with NaN)."""
    if not is_array(x):
        raise TypeError(f"{function}: images must be an (N, C, H, W) array, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{function}: images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if floats and not namespace(x).isdtype(x.dtype, "real floating"):
        raise TypeError(
            f"{function}: images must be floating-point (an offset out of range makes an image NaN), "
            f"got dtype {dtype_name(x.dtype)}"
        )


def _per_image(function, name, values, n: int, kind: str) -> None:
    """ValueError unless ``values`` is an (n,) array of ``kind`` ('bool' or 'integral'): one
    flag or offset per image (a shape check on the host; the values stay on the device)."""
    if not is_array(values):
        raise TypeError(
            f"{function}: {name} must be an array of ({n},) values, one per image; got {type(values).__name__}"
        )
    xp = namespace(values)
    if tuple(values.shape) != (n,) or not xp.isdtype(values.dtype, kind):
        what = "booleans" if kind == "bool" else "integers"
        raise ValueError(
            f"{function}: {name} must be ({n},) {what}, one per image; "
            f"got {tuple(values.shape)} {dtype_name(values.dtype)}"
        )


def _non_negative_int(function, name, value) -> int:
    """``value`` as an int, or ValueError naming ``function`` unless it is a non-negative integer."""
    number = as_int(value)
    if number is None or number < 0:
        raise ValueError(f"{function}: {name} must be a non-negative integer, got {value!r}")
    return number


def check_reflect_pad(function: str, name: str, pad, x) -> int:
    """``pad`` as an int, or ValueError naming ``function`` and ``name`` unless reflect padding
    of images ``x`` (N, C, H, W) can take it: a non-negative integer below both sides."""
    pad = _non_negative_int(function, name, pad)
    if pad and pad >= min(x.shape[2], x.shape[3]):
        raise ValueError(f"{function}: {name} {pad} must be smaller than the images' sides {tuple(x.shape[2:])}")
    return pad


def reflect_pad(x: Array, pad: int) -> Array:
    """``x`` (N, C, H, W) padded by ``pad`` on every side, mirroring without repeating the edge
    (PyTorch's ``mode='reflect'``): [a b c d] padded by 2 is [c b a b c d c b]."""
    _check_images("reflect_pad", x)
    pad = check_reflect_pad("reflect_pad", "pad", pad, x)
    if pad == 0:
        return x
    xp = namespace(x)
    left, right = xp.flip(x[..., 1 : pad + 1], axis=3), xp.flip(x[..., -pad - 1 : -1], axis=3)
    x = xp.concat([left, x, right], axis=3)
    top, bottom = xp.flip(x[:, :, 1 : pad + 1, :], axis=2), xp.flip(x[:, :, -pad - 1 : -1, :], axis=2)
    return xp.concat([top, x, bottom], axis=2)


def random_flip_mask(rng, n: int) -> Array:
    """(N,) booleans, each True with probability 1/2, drawn on the device by ``rng``."""
    check_generator("random_flip_mask: rng", rng, None, "", "it takes (rng, n), the generator first")
    n = _non_negative_int("random_flip_mask", "n", n)  # a negative one failed inside the generator
    return rng.uniform((n,)) < 0.5


def flip_images(x: Array, mask: Array) -> Array:
    """Images mirrored left to right where ``mask`` (N,) is True, the others as they are."""
    _check_images("flip_images", x)
    _per_image("flip_images", "mask", mask, x.shape[0], "bool")
    xp = namespace(x, mask)
    return xp.where(mask[:, None, None, None], xp.flip(x, axis=3), x)


def translate_images(x: Array, shift_rows: Array, shift_cols: Array, max_shift: int) -> Array:
    """Each image moved by its own (rows, cols) offset in [-max_shift, max_shift], the gap
    filled by reflection: a crop of the reflect-padded image. shift_*: (N,) integers."""
    _check_images("translate_images", x, floats=True)
    max_shift = _non_negative_int("translate_images", "max_shift", max_shift)
    for name, shifts in (("shift_rows", shift_rows), ("shift_cols", shift_cols)):
        _per_image("translate_images", name, shifts, x.shape[0], "integral")
    return crop_padded(reflect_pad(x, max_shift), shift_rows, shift_cols, max_shift)


def crop_padded(padded: Array, shift_rows: Array, shift_cols: Array, max_shift: int) -> Array:
    """:func:`translate_images` of images already padded by ``max_shift`` on every side:
    (N, C, H + 2·max_shift, W + 2·max_shift) in, (N, C, H, W) out. An image whose offset lies
    outside [-max_shift, max_shift] comes out NaN (the offsets stay on the device, unread), so
    that the finite-loss check stops a run fed with one."""
    _check_images("crop_padded", padded, floats=True)
    max_shift = _non_negative_int("crop_padded", "max_shift", max_shift)
    for name, shifts in (("shift_rows", shift_rows), ("shift_cols", shift_cols)):
        _per_image("crop_padded", name, shifts, padded.shape[0], "integral")
    xp = namespace(padded, shift_rows, shift_cols)
    h, w = padded.shape[2] - 2 * max_shift, padded.shape[3] - 2 * max_shift
    # Rows first, then columns: 2·(2·max_shift + 1) selections instead of one per (row, col) pair.
    # A shift of +s shows the content that sits s pixels further on, as torch.roll(x, -s) would.
    rows = xp.full_like(padded[:, :, :h, :], float("nan"))
    for k in range(2 * max_shift + 1):
        chosen = (shift_rows + max_shift == k)[:, None, None, None]
        rows = xp.where(chosen, padded[:, :, k : k + h, :], rows)
    out = xp.full_like(rows[..., :w], float("nan"))
    for k in range(2 * max_shift + 1):
        chosen = (shift_cols + max_shift == k)[:, None, None, None]
        out = xp.where(chosen, rows[..., k : k + w], out)
    return out


def random_translate(x: Array, rng, max_shift: int = 2) -> Array:
    """Each image translated by offsets drawn uniformly from [-max_shift, max_shift] on the device."""
    _check_images("random_translate", x, floats=True)
    max_shift = _non_negative_int("random_translate", "max_shift", max_shift)
    check_generator("random_translate: rng", rng, backend_of(x), "x", "")
    n = x.shape[0]
    shifts = rng.integers(-max_shift, max_shift + 1, (2, n))
    return translate_images(x, shifts[0, :], shifts[1, :], max_shift)


class AlternatingFlipTranslate:
    """The fast CIFAR-10 recipe's training images, one epoch at a time, on the device.

    In the first epoch each image is mirrored or not at random; in later epochs every
    image is mirrored on alternate epochs relative to that first choice, so each one is
    seen both ways equally often. Each epoch also moves every image by a random offset of
    up to ``max_shift`` pixels in each direction (reflect padding). Each epoch's images are
    written into the same array (:attr:`images`), which a captured training step reads.

    Args:
        images: (N, C, H, W) normalised training images on the device.
        rng: the :class:`~xpnet.backend.DeviceRNG` for the flips and the offsets.
        flip: mirror as described; max_shift: 0 for no translation.

    Attributes:
        flip_mask: (N,) the first epoch's choices; shifts: the last epoch's (2, N) offsets
            (rows, columns); both on the device, for whoever wants to replay the draws.
    """

    def __init__(self, images: Array, rng, flip: bool = True, max_shift: int = 2):
        _check_images("AlternatingFlipTranslate", images)
        max_shift = check_reflect_pad("AlternatingFlipTranslate", "max_shift", max_shift, images)
        if max_shift:  # the first epoch's translation failed on integer pixels, named as crop_padded's
            _check_images("AlternatingFlipTranslate", images, floats=True)
        check_generator("AlternatingFlipTranslate: rng", rng, backend_of(images), "images", "")
        flip = check_flag("AlternatingFlipTranslate: flip", flip)
        self.rng, self.flip, self.max_shift = rng, flip, max_shift
        self.flip_mask = random_flip_mask(rng, images.shape[0]) if flip else None
        base = flip_images(images, self.flip_mask) if flip else images
        self._padded = reflect_pad(base, max_shift)  # padded once: every epoch crops from it
        self.images = namespace(images).asarray(base, copy=True)
        self.shifts: Array | None = None

    def epoch(self, epoch: int) -> Array:
        """The images of ``epoch`` (0-based), in :attr:`images`."""
        xp = namespace(self.images)
        if self.max_shift:
            self.shifts = self.rng.integers(-self.max_shift, self.max_shift + 1, (2, self.images.shape[0]))
            out = crop_padded(self._padded, self.shifts[0, :], self.shifts[1, :], self.max_shift)
        else:
            out = self._padded
        if self.flip and epoch % 2 == 1:
            out = xp.flip(out, axis=3)
        self.images[...] = out
        return self.images


def _scoring_function(caller: str, scores_of):
    """``scores_of`` when it is callable, else a model's ``loss`` (passing ``model`` for
    ``model.loss`` is the likely slip), else a TypeError naming ``caller``."""
    if callable(scores_of):
        return scores_of
    loss = getattr(scores_of, "loss", None)
    if callable(loss):
        return loss
    raise TypeError(
        f"{caller}: scores_of must be a model or a function from images to scores (such as model.loss), "
        f"got {type(scores_of).__name__}"
    )


def tta_scores(scores_of, images: Array, level: int = 2, batch_size: int | None = None) -> Array:
    """Class scores averaged over test-time augmentations, in batches on the device.

    level 0: the images as they are; 1: the mean of the image and its mirror; 2: half
    of that, plus half the mean over the mirror pair shifted one pixel up-left and one
    pixel down-right (reflect padding), as in the fast CIFAR-10 recipe.

    Args:
        scores_of: ``images (B, C, H, W) -> scores (B, K)`` (e.g. ``model.loss``), or a model,
            whose ``loss`` is then used.
        images: (N, C, H, W).
        batch_size: images per call of ``scores_of``; None: 2000 on a GPU, as the recipe
            publishes, and 100 on the CPU, where 2000 images' temporaries (GBs at the
            recipe's widths) come as fresh pages from the kernel on every batch (2.3x
            slower on two cores). A network in test mode scores each image on its own, so
            the batch size changes the time, and the scores at most in their rounding
            (on NumPy not at all).
    Returns:
        (N, K) scores.
    """
    scores_of = _scoring_function("tta_scores", scores_of)
    _check_images("tta_scores", images)
    if as_int(level) not in (0, 1, 2):  # 2.0 == 2, but indexes nothing; True == 1
        raise ValueError(f"tta_scores: level must be 0, 1 or 2, got {level!r}")
    level = int(level)
    if batch_size is None:
        batch_size = 2000 if backend_of(images).is_gpu else 100
    rows = as_int(batch_size)
    if rows is None or rows < 1:
        raise ValueError(f"tta_scores: batch_size must be a positive integer, got {batch_size!r}")
    batch_size = rows
    xp = namespace(images)

    def scores(x):
        return checked_scores(scores_of, x, "tta_scores", "scores_of(images)")

    def mirrored(x):
        return 0.5 * scores(x) + 0.5 * scores(xp.flip(x, axis=3))

    def translated(x):
        h, w = x.shape[2], x.shape[3]
        padded = reflect_pad(x, 1)
        shifted = [padded[:, :, :h, :w], padded[:, :, 2 : h + 2, 2 : w + 2]]
        return 0.5 * mirrored(x) + 0.5 * (0.5 * mirrored(shifted[0]) + 0.5 * mirrored(shifted[1]))

    score = (scores, mirrored, translated)[level]
    n = images.shape[0]
    return xp.concat([score(images[i : min(i + batch_size, n), ...]) for i in range(0, n, batch_size)], axis=0)
