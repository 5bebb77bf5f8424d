"""Pictures: a grid of images, and training curves on a matplotlib Figure (matplotlib is optional)."""

from __future__ import annotations

import functools
import io
import os
from math import ceil, isfinite, sqrt

import numpy as np

from .atomic_files import atomic_write
from .backend import to_numpy
from .input_checks import as_int, file_path, is_number

__all__ = ["visualize_grid", "vis_grid", "vis_nn", "plot_history", "new_figure"]


def _host_images(name, Xs):
    """``Xs`` as (N, H, W, C) NumPy images of 1, 3 or 4 channels, each value a finite number;
    ValueError naming ``name`` otherwise."""
    Xs = np.asarray(Xs) if isinstance(Xs, (list, tuple)) else to_numpy(Xs)  # a GPU array: copied once
    if Xs.ndim != 4:
        raise ValueError(f"{name} expects (N, H, W, C) images, got shape {Xs.shape}")
    if Xs.shape[3] not in (1, 3, 4):  # what an image can show; conv weights (F, C, HH, WW) are the likely slip
        hint = ""
        if Xs.shape[1] in (1, 3, 4):
            hint = "; these look like images with their channels first: Xs.transpose(0, 2, 3, 1) puts them last"
        raise ValueError(f"{name} tiles images of 1, 3 or 4 channels (N, H, W, C), got shape {Xs.shape}" + hint)
    if Xs.shape[0] == 0:
        raise ValueError(f"{name}: no images to tile, got shape {Xs.shape}")
    if Xs.dtype.kind not in "biuf" or not np.all(np.isfinite(Xs)):
        # weights after a divergence: each tile was NaN (blank), or inf / inf under a RuntimeWarning
        raise ValueError(f"{name}: the images hold NaN or infinite values (or are not numbers)")
    return Xs


def visualize_grid(Xs, ubound=255.0, padding=1):
    """Tile a batch of images into one image, each scaled to [0, ubound] by its own range.

    Args:
        Xs: (N, H, W, C) images: an array of any backend (copied to the host), or nested lists.
        ubound: output values are scaled to [0, ubound].
        padding: pixels between tiles.
    Returns:
        (G·(H+padding)-padding, G·(W+padding)-padding, C) array with G = ceil(sqrt(N)).
    """
    Xs = _host_images("visualize_grid", Xs)
    if as_int(padding) is None or padding < 0:
        raise ValueError(f"visualize_grid: padding must be a non-negative integer, got {padding!r}")
    if not is_number(ubound) or not isfinite(ubound) or ubound <= 0:
        raise ValueError(f"visualize_grid: ubound must be a finite number > 0, got {ubound!r}")
    N, H, W, C = Xs.shape
    grid_size = int(ceil(sqrt(N)))
    grid = np.zeros((grid_size * (H + padding) - padding, grid_size * (W + padding) - padding, C))
    for index in range(N):
        row, col = divmod(index, grid_size)
        img = Xs[index]
        low, high = np.min(img), np.max(img)
        scaled = ubound * (img - low) / (high - low) if high > low else np.zeros_like(img, dtype=float)
        y0, x0 = row * (H + padding), col * (W + padding)
        grid[y0 : y0 + H, x0 : x0 + W] = scaled
    return grid


def vis_grid(Xs):
    """Tile a batch of images into one, as the course's ``vis_grid``: one pixel after each tile,
    the empty places and gaps at the images' minimum, the whole grid scaled to [0, 1] together.

    Args:
        Xs: (N, H, W, C) images: an array of any backend (copied to the host), or nested lists.
    Returns:
        (A·(H+1), A·(W+1), C) float array with A = ceil(sqrt(N)).
    """
    Xs = _host_images("vis_grid", Xs)
    side = int(ceil(sqrt(Xs.shape[0])))
    return _course_grid(Xs, side, side, np.min(Xs))


def vis_nn(rows):
    """Tile rows of images, as the course's ``vis_nn``: ``rows[i][j]`` (H, W, C) goes to row i,
    column j, one pixel after each tile; the gaps hold 1 (the course's value) before the whole
    grid is scaled to [0, 1] together.

    Args:
        rows: a list of equally long lists of (H, W, C) images of one shape (arrays of any backend).
    Returns:
        (len(rows)·(H+1), len(rows[0])·(W+1), C) float array.
    """
    if not isinstance(rows, (list, tuple)) or not rows or not all(isinstance(r, (list, tuple)) for r in rows):
        raise ValueError("vis_nn expects a list of rows, each a list of (H, W, C) images")
    counts = {len(r) for r in rows}
    if len(counts) != 1:
        raise ValueError(f"vis_nn: every row must hold as many images; got rows of {sorted(counts)}")
    images = [np.asarray(image) if isinstance(image, (list, tuple)) else to_numpy(image) for r in rows for image in r]
    shapes = sorted({image.shape for image in images})
    if len(shapes) != 1 or len(shapes[0]) != 3:
        raise ValueError(f"vis_nn: the images must be (H, W, C) arrays of one shape, got shapes {shapes}")
    return _course_grid(_host_images("vis_nn", np.stack(images)), len(rows), len(rows[0]), 1.0)


def _course_grid(images, rows, columns, background):
    """(K, H, W, C) ``images`` placed row by row on ``rows`` × ``columns`` places, one pixel after
    each, the rest at ``background``; the whole grid scaled to [0, 1] by its own minimum and
    maximum (zeros where it is constant, where the course's code divided 0 by 0)."""
    _, H, W, C = images.shape
    grid = np.full((rows * (H + 1), columns * (W + 1), C), background, dtype=np.result_type(images, float))
    for index, image in enumerate(images):
        row, col = divmod(index, columns)
        grid[row * (H + 1) : row * (H + 1) + H, col * (W + 1) : col * (W + 1) + W] = image
    low, high = np.min(grid), np.max(grid)
    return (grid - low) / (high - low) if high > low else np.zeros_like(grid)


@functools.cache
def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError('plotting needs matplotlib: pip install "xpnet[plot]"') from exc

    class InlineFigure(Figure):
        """A Figure that a notebook shows as a PNG, with no pyplot and no global backend."""

        def _repr_png_(self):
            buffer = io.BytesIO()
            self.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
            return buffer.getvalue()

    return InlineFigure


def _extension(path) -> str:
    """The format a file name asks matplotlib for, as savefig reads it ("" for none)."""
    return os.path.splitext(os.fspath(path))[1][1:].lower()


def plotting_unavailable(path=None) -> str | None:
    """None when matplotlib can draw xpnet's figures (and save one at ``path``, whose extension
    names the format; none is PNG), else why not: for a command to check before a run, not after it."""
    try:
        _figure_class()
    except ImportError as exc:
        return str(exc)
    if path is None:
        return None
    from matplotlib.backend_bases import FigureCanvasBase

    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):  # savefig would write <folder>.png beside it
        return f"{path} is a folder; name a file in it, such as {os.path.join(path, 'history.png')}"
    extension = _extension(path)
    supported = FigureCanvasBase.get_supported_filetypes()
    if extension and extension not in supported:
        return f"matplotlib cannot save a figure as .{extension}; end the file name in one of .{', .'.join(supported)}"
    return None


def save_figure(fig, path, **kwargs) -> str:
    """Write ``fig`` to ``path`` whole or not at all (:func:`~xpnet.atomic_files.atomic_write`),
    in the format its extension names, as ``fig.savefig(path, **kwargs)`` would: a name without
    one gets matplotlib's default (".png"). Returns the path written."""
    path = os.fspath(path)
    extension = _extension(path)
    if not extension:  # matplotlib's own rule for a name without an extension
        extension = fig.canvas.get_default_filetype()
        path = f"{path.rstrip('.')}.{extension}"
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=extension, **kwargs)
    return path


def new_figure(**kwargs):
    """A matplotlib ``Figure`` (``figsize=...`` and the rest as for Figure) that displays
    inline in a notebook as the value of a cell, without pyplot or a change of backend."""
    return _figure_class()(**kwargs)


_HISTORIES = ("loss_history", "train_acc_history", "val_acc_history")


def _histories(history) -> list:
    """The three histories of a Solver or of a dict like TwoLayerNet.train's, or a ValueError
    naming those it lacks."""
    if isinstance(history, dict):
        missing = [key for key in _HISTORIES if key not in history]
    else:
        missing = [key for key in _HISTORIES if not hasattr(history, key)]
    if missing:
        raise ValueError(
            f"plot_history: history needs {', '.join(_HISTORIES[:-1])} and {_HISTORIES[-1]} (a Solver after "
            f"train(), or the dict TwoLayerNet.train returns); {type(history).__name__} has no {', '.join(missing)}"
        )
    return [history[key] if isinstance(history, dict) else getattr(history, key) for key in _HISTORIES]


def plot_history(history, path=None, title=None):
    """Training curves: the loss per iteration and the train/val accuracy per check.

    Drawn on a matplotlib ``Figure`` of its own (:func:`new_figure`: no pyplot state,
    no change of the global backend), so it shows inline in a notebook and saves anywhere.

    Args:
        history: a Solver after ``train()``, or a dict with 'loss_history',
            'train_acc_history' and 'val_acc_history' (lists of floats).
        path: if given, the figure is also written there (PNG, PDF, ... by extension).
        title: a title above both panels.
    Returns:
        the ``matplotlib.figure.Figure``.
    """
    losses, train_accs, val_accs = _histories(history)
    path = file_path("plot_history", "path", path) if path is not None else None
    folder = os.path.dirname(os.path.abspath(path)) if path is not None else None
    fig = new_figure(figsize=(8, 7))  # first: without matplotlib, an ImportError that says how to install it
    if folder is not None and not os.path.isdir(folder):  # before the drawing, not after it
        raise FileNotFoundError(f"plot_history: folder {folder} does not exist")
    unsaveable = plotting_unavailable(path) if path is not None else None
    if unsaveable:
        raise ValueError(f"plot_history: {unsaveable}")
    ax_loss, ax_acc = fig.subplots(2, 1)
    ax_loss.plot(losses, ".", markersize=2)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("training loss")
    ax_acc.plot(train_accs, "-o", label="train")
    ax_acc.plot(val_accs, "-o", label="val")
    ax_acc.set_xlabel("accuracy check (epoch)")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path, dpi=100)
    return fig
