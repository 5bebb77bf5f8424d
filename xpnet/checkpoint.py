"""Checkpoint files: written atomically, readable on any backend.

A checkpoint is a pickled dict whose arrays are NumPy arrays on the host, so a
file written during a CuPy run loads in a NumPy run and back.
"""

from __future__ import annotations

import os
import pickle
import tempfile

import numpy as np

__all__ = ["save_checkpoint", "load_checkpoint", "tree_to_host", "tree_to_device"]

FORMAT = "xpnet-checkpoint-1"


def save_checkpoint(path, payload: dict) -> str:
    """Pickle ``payload`` to ``path`` atomically: a temporary file in the same
    folder, flushed to disk, then renamed over ``path``. A crash at any moment
    leaves either the old file or the complete new one, never half of one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pkl", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump({"format": FORMAT, **payload}, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, with errors that name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            payload = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as exc:
        raise ValueError(f"checkpoint {path!r} is corrupt or not an xpnet checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path!r} is not an xpnet checkpoint")
    return payload


def tree_to_host(tree, backend):
    """Nested dicts/lists with the backend's arrays replaced by NumPy arrays."""
    if isinstance(tree, dict):
        return {k: tree_to_host(v, backend) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_to_host(v, backend) for v in tree)
    if backend.owns(tree):
        return backend.to_numpy(tree)
    return tree


def tree_to_device(tree, backend, dtype=None):
    """Inverse of :func:`tree_to_host`: NumPy arrays moved onto ``backend``."""
    if isinstance(tree, dict):
        return {k: tree_to_device(v, backend, dtype) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_to_device(v, backend, dtype) for v in tree)
    if isinstance(tree, np.ndarray):
        # A copy: the optimizers update in place and must not write into the caller's arrays.
        return backend.asarray(tree, dtype=dtype if tree.dtype.kind == "f" else None, copy=True)
    return tree
