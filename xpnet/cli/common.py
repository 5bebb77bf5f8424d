"""What the commands share."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import zipfile

import numpy as np

from xpnet.atomic_files import what_stands_at
from xpnet.backend import accelerated
from xpnet.npz_members import UnsafeNpzError, check_npz_members

__all__ = [
    "UsageError",
    "check_output_file",
    "check_output_folder",
    "HelpFormatter",
    "conv_paths_chosen",
    "format_conv_paths",
    "load_npz_arrays",
    "positive_int",
    "non_negative_int",
    "non_negative_float",
    "positive_float",
    "user_path",
]


class UsageError(Exception):
    """A mistake in the command line found after parsing; ends with exit code 2."""


def check_output_file(flag, path, *, stream=False):
    """UsageError unless ``path`` can be created or overwritten: checked before any work, so a
    long run never ends on a file it cannot write.

    Whatever stands at ``path`` must be writable (a read-only file is kept, as by ``open()``). A
    file written whole goes under a temporary name into its folder (a link's target's) and is
    renamed over the old one, so that folder must be writable, and a pipe or a device is refused.
    A stream (``stream=True``, the ``--log`` lines) is written where it is, so a pipe or terminal
    that may be written (``/dev/stdout``) is enough.
    """
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder, not a file")
    exists = os.path.exists(path)
    if exists and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: is not writable")
    if exists and not os.path.isfile(path):  # a pipe, a terminal, a device
        if stream:
            return  # written where it is
        raise UsageError(
            f"{flag} {path}: is not a regular file (a pipe or a device); this output is written whole "
            "under a temporary name and renamed into place, so give the path of a file"
        )
    folder = os.path.dirname(os.path.realpath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: folder {folder} is not writable")


def check_output_folder(flag, path):
    """Create the folder ``path`` and write a probe file into it: a folder that cannot take the
    command's files fails now, with UsageError, not after an epoch or a trial."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is {what_stands_at(path)}, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from exc


def positive_int(text):
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    """An argparse type: an integer >= 0 (a seed, a count that may be zero)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def user_path(text):
    """An argparse type: a path with a leading ``~`` expanded. A shell expands it only at the
    start of a word, so ``--resume=~/run.npz`` arrived as it was written. An empty one, what an
    unset shell variable gives (``--checkpoint-dir "$DIR"``), is refused: it was taken as no
    path at all, and the run went on without its checkpoints."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path (an unset shell variable?)")
    return os.path.expanduser(text)


def positive_float(text):
    """An argparse type: a finite number > 0 (NaN and infinity are not)."""
    return _bounded_float(text, lambda value: value > 0, "> 0")


def non_negative_float(text):
    """An argparse type: a finite number >= 0 (a strength that may be zero)."""
    return _bounded_float(text, lambda value: value >= 0, ">= 0")


def _bounded_float(text, holds, bound):
    value = float(text)
    if not holds(value):  # NaN holds no bound
        raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
    if math.isinf(value):  # a budget or a number of epochs that never ends, a step that overflows
        raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each flag's default in --help (unless its help names it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == argparse.SUPPRESS:
            return text
        return f"{text} (default: {default})".strip()


def load_npz_arrays(path, keys: tuple, purpose: str, read: bool = True) -> dict:
    """The arrays ``keys`` of the .npz file at ``path`` (read with ``allow_pickle=False``:
    nothing in it can run code); with ``read`` False, only a check that they are there (an
    empty dict). A file that cannot be read, is not an .npz of plain arrays (each member's header
    is checked before NumPy allocates what it declares: :mod:`xpnet.npz_members`), or lacks one
    of ``keys`` is refused with a ValueError that names it, what ``purpose`` reads and what
    the file holds."""
    try:
        # also refuses a .npy (np.load would return its one array), and headers declaring more than they hold
        check_npz_members(path, str(path))
        archive = np.load(path, allow_pickle=False)
    except UnsafeNpzError:
        raise
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, RuntimeError) as exc:  # RuntimeError: encrypted
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from None
    with archive:
        missing = [key for key in keys if key not in archive.files]
        if missing:
            held = ", ".join(archive.files) or "no arrays"
            wanted = ", ".join(keys)
            raise ValueError(f"{path}: no {', '.join(missing)} in it ({purpose} reads {wanted}; it holds {held})")
        try:
            return {key: archive[key] for key in keys} if read else {}
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:  # a damaged member; an object array
            raise ValueError(f"{path}: {exc}") from None


def conv_paths_chosen(backend) -> list:
    """The convolutions that set_conv_autotune has timed in this process (CuPy), each with
    its paths' median ms and the path kept; [] elsewhere."""
    kernels = accelerated(backend.xp.empty(0))
    paths = getattr(kernels, "conv_paths", None)
    return [] if paths is None else paths.report()


def format_conv_paths(chosen: list) -> str:
    """A markdown table of :func:`conv_paths_chosen`: which path autotuning kept for each
    convolution it timed, and why (each path's ms for a forward and backward pass)."""
    if not chosen:
        return "autotuning timed no convolution: none here had more than one path to take"
    lines = ["| autotuned convolution (x → w, stride, pad) | dtypes | TF32 | ms per path | kept |", "|" + "---|" * 5]
    for c in chosen:
        order = " (channels outermost)" if c["channels_outer"] else ""
        geometry = f"{tuple(c['x_shape'])}{order} → {tuple(c['w_shape'])}, {c['stride']}, {c['pad']}"
        times = ", ".join(
            [f"{path} {ms:.3f}" for path, ms in c["ms"].items()]
            + [f"{path} failed ({why})" for path, why in c.get("failed", {}).items()]
        )
        lines.append(f"| {geometry} | {c['dtypes']} | {'on' if c['tf32'] else 'off'} | {times} | {c['chosen']} |")
    return "\n".join(lines)
