"""The whitening first layer of the fast CIFAR-10 recipe: filters from the eigenvectors
of the covariance of small image patches, scaled to unit variance, and their negatives."""

from __future__ import annotations

import math

from .array_types import Array
from .backend import namespace
from .conv_common import offset_slice
from .input_checks import as_int, is_number, layer_namespace

__all__ = ["image_patches", "whitening_filters"]


def image_patches(x: Array, size: int = 2) -> Array:
    """Every size×size patch of every image (stride 1, no padding) as rows: (N·H'·W', C·size·size),
    each row laid out like a conv filter (channel, row, column)."""
    xp = namespace(x)
    if x.ndim != 4:
        raise ValueError(f"image_patches: images must be (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if as_int(size) is None or not 1 <= size <= min(h, w):
        raise ValueError(f"image_patches: size must be an integer from 1 to the images' sides {(h, w)}, got {size!r}")
    size = int(size)
    h_out, w_out = h - size + 1, w - size + 1
    slices = [x[offset_slice(i, j, 1, h_out, w_out)] for i in range(size) for j in range(size)]
    stacked = xp.stack(slices, axis=2)  # (N, C, size², H', W')
    stacked = xp.permute_dims(stacked, (0, 3, 4, 1, 2))  # (N, H', W', C, size²)
    return xp.reshape(stacked, (n * h_out * w_out, c * size * size))


def whitening_filters(x: Array, size: int = 2, eps: float = 5e-4) -> Array:
    """Conv weights (2·C·size², C, size, size) that whiten size×size patches of ``x``.

    The covariance of the patches (uncentred, as in the recipe) is decomposed with
    ``linalg.eigh``; each eigenvector, largest eigenvalue first, is scaled by
    1 / sqrt(eigenvalue + eps); the negatives follow, so that a GELU after the layer keeps both signs.
    """
    # Integer images wrapped around in patchesᵀ·patches, and the filters came out NaN.
    xp = layer_namespace("whitening_filters", {"images": x})
    if x.ndim == 4 and x.shape[0] == 0:  # else named as NaN pixels: the covariance is 0 / 0
        raise ValueError(f"whitening_filters: no images, got shape {tuple(x.shape)}")
    if not is_number(eps) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"whitening_filters: eps must be a finite number >= 0, got {eps!r}")
    patches = image_patches(x, size)
    c, size = x.shape[1], int(size)
    covariance = patches.T @ patches / patches.shape[0]
    # One host read, once per training: NaN pixels would otherwise surface as eigh's "did not converge".
    if not bool(xp.all(xp.isfinite(covariance))):
        raise ValueError("whitening_filters: the images hold NaN or infinite values (or overflow when squared)")
    eigenvalues, eigenvectors = xp.linalg.eigh(covariance)  # ascending
    smallest = float(eigenvalues[0])  # a second host read, once per training
    if not smallest + eps > 0:  # constant or linearly dependent patches, with eps 0: filters of inf or NaN
        raise ValueError(
            f"whitening_filters: the patches' covariance is singular (smallest eigenvalue {smallest:.3g}), "
            f"so 1 / sqrt(eigenvalue + eps) has no finite value with eps = {eps!r}; give eps > 0"
        )
    eigenvalues = xp.flip(eigenvalues, axis=0)
    vectors = xp.flip(eigenvectors, axis=1).T  # one eigenvector per row, largest eigenvalue first
    scaled = vectors / xp.sqrt(eigenvalues + eps)[:, None]
    filters = xp.reshape(scaled, (c * size * size, c, size, size))
    return xp.concat([filters, -filters], axis=0)
