"""What the commands share."""

from __future__ import annotations

import argparse
import zipfile

import numpy as np

__all__ = ["HelpFormatter", "load_npz_arrays"]


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
    empty dict). A file that cannot be read, is not an .npz of plain arrays, or lacks one
    of ``keys`` is refused with a ValueError that names it, what ``purpose`` reads and what
    the file holds."""
    try:
        with zipfile.ZipFile(path):  # np.load would also take a .npy and return one array
            pass
        archive = np.load(path, allow_pickle=False)
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
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
