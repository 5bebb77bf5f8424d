"""Checkpoint files: safe to read, written atomically, readable on any backend.

A checkpoint is one ``.npz`` file. Its arrays are members of their own; everything
else (settings, histories, optimizer scalars, the format version) is one JSON
document in the member ``__xpnet__.json``, where each array appears as
``{"__array__": "<member name>"}``. It is read with ``allow_pickle=False``, so
loading a checkpoint can never run code, whoever wrote the file.

Writes are atomic (:func:`xpnet.atomic_files.atomic_write`): a crash while writing
leaves the old file or the complete new one, and a later write into the same folder
removes what writers killed mid-write left behind.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile

import numpy as np

from xpnet.atomic_files import atomic_write, remove_stale_temporaries, unwritable_reason
from xpnet.backend import namespace, to_numpy
from xpnet.input_checks import check_flag, file_path, is_array
from xpnet.npz_members import UnsafeNpzError, check_npz_members

__all__ = [
    "save_checkpoint",
    "unwritable_reason",
    "load_checkpoint",
    "check_checkpoint_file",
    "remove_stale_temporaries",
    "is_finite_tree",
    "non_finite_path",
    "tree_to_host",
    "tree_to_device",
    "not_float_array",
    "CheckpointError",
    "CheckpointWriteError",
]

FORMAT = "xpnet-checkpoint"
VERSION = 2
META = "__xpnet__.json"
_ARRAY = "__array__"
_LEGACY_FORMAT = "xpnet-checkpoint-1"  # the pickle files of version 1
# How deep dicts and lists may nest in a payload: far beyond any state xpnet writes, and well
# inside Python's recursion limit, so that a crafted file is refused by name.
MAX_DEPTH = 64


class CheckpointError(ValueError):
    """A checkpoint file is not one xpnet wrote, is damaged, or needs an explicit opt-in."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, folder removed, no permission); names the path."""


# --------------------------------------------------------------------------- writing
def _encode(tree, arrays: dict, depth: int = 0):
    """``tree`` as JSON-ready data, its NumPy arrays moved into ``arrays`` (member name -> array)."""
    if isinstance(tree, (dict, list, tuple)) and depth >= MAX_DEPTH:
        raise ValueError(f"a checkpoint's dicts and lists may nest {MAX_DEPTH} levels deep at most")
    if isinstance(tree, dict):
        for key in tree:
            if not isinstance(key, str):
                raise TypeError(f"checkpoint keys must be strings, got {key!r}")
        if set(tree) == {_ARRAY}:  # read back as an array reference: the file was saved, and did not load
            raise ValueError(f"a checkpoint dict may not have {_ARRAY!r} as its only key: the file marks arrays so")
        return {key: _encode(value, arrays, depth + 1) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_encode(value, arrays, depth + 1) for value in tree]
    if isinstance(tree, np.ndarray):
        if tree.dtype.hasobject:
            raise TypeError("checkpoint arrays must hold numbers, not Python objects")
        if isinstance(tree, np.ma.MaskedArray):  # .npy keeps the data under the mask and drops the mask
            raise TypeError(
                "a checkpoint cannot hold a masked array: its mask would be lost; save np.ma.getdata(x) and "
                "np.ma.getmaskarray(x) as two arrays, or x.filled(value)"
            )
        name = f"a{len(arrays)}"
        arrays[name] = tree
        return {_ARRAY: name}
    if isinstance(tree, np.generic):
        value = tree.item()
        if isinstance(value, (bool, int, float, str)):
            return value
        # complex, datetime64, bytes: JSON has no such value, and a 0-d array keeps its dtype and value
        return _encode(np.asarray(tree), arrays, depth)
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if is_array(tree):  # a CuPy or PyTorch array: the file holds host arrays
        hint = "; move it to the host first, backend.to_numpy(x) (a model's state_dict() does)"
    elif hasattr(tree, "state_dict"):  # a model
        hint = "; save model.state_dict(), and load it back with model.load_state_dict(load_checkpoint(path))"
    else:
        hint = ""
    raise TypeError(
        f"a checkpoint cannot hold a {type(tree).__name__}: only NumPy arrays, numbers, strings and None{hint}"
    )


def save_checkpoint(path, payload: dict) -> str:
    """Write ``payload`` (nested dicts and lists of NumPy arrays, numbers, strings,
    None) to ``path`` as an xpnet ``.npz`` checkpoint, atomically.

    A crash at any moment leaves either the old file or the complete new one.
    A new file gets the usual permissions (those the umask allows), one that exists keeps
    its own, and a link is written through (see :func:`atomic_write`). Raises
    :class:`CheckpointWriteError` naming ``path`` when the disk refuses.
    """
    path = file_path("save_checkpoint", "path", path, hint="; it takes (path, payload)")
    if not isinstance(payload, dict):  # load_checkpoint refuses any other: the file could never be read
        _encode(payload, {})  # first, what no checkpoint holds at all is named so (a model: its state_dict())
        raise TypeError(f"save_checkpoint: payload must be a dict, got {type(payload).__name__}")
    arrays: dict = {}
    document = json.dumps({"format": FORMAT, "version": VERSION, "payload": _encode(payload, arrays)})
    try:
        with atomic_write(path, "wb") as f:
            np.savez(f, **{META: np.frombuffer(document.encode(), dtype=np.uint8), **arrays})
    except OSError as exc:
        reason = unwritable_reason(path) or exc.strerror or exc
        raise CheckpointWriteError(exc.errno, f"could not write checkpoint {path}: {reason}") from exc
    return path


# --------------------------------------------------------------------------- reading
def _decode(tree, members, path, depth=0):
    if isinstance(tree, dict) and set(tree) == {_ARRAY}:  # an array, not a level of nesting
        name = tree[_ARRAY]
        if not isinstance(name, str) or name not in members:
            raise CheckpointError(f"checkpoint {path!r} is damaged: array {name!r} is missing")
        return members[name]
    if isinstance(tree, (dict, list)) and depth >= MAX_DEPTH:
        raise CheckpointError(f"checkpoint {path!r} nests its contents more than {MAX_DEPTH} levels deep")
    if isinstance(tree, dict):
        return {key: _decode(value, members, path, depth + 1) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_decode(value, members, path, depth + 1) for value in tree]
    return tree


def _newest_checkpoint_hint(folder: str) -> str:
    """', e.g. <the newest .npz in folder>' (the likeliest one meant), or '' when it has none."""
    files = [entry for entry in os.scandir(folder) if entry.name.endswith(".npz") and entry.is_file()]
    if not files:
        return ""
    return f", e.g. {os.path.join(folder, max(files, key=lambda entry: entry.stat().st_mtime).name)!r}"


def _file_format(path: str, trust_pickle: bool) -> str:
    """The file's format by its first bytes, "npz" or "pickle", after the checks that need no more
    of it: the file exists and is one, it is one of the two, and a pickle is trusted."""
    # Only True opts in: a string is truthy, and trust_pickle="no" unpickled the file.
    trust_pickle = check_flag("trust_pickle", trust_pickle)
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path!r} is a folder; give one file in it{_newest_checkpoint_hint(path)}")
    if not os.path.isfile(path):
        if os.path.exists(path):  # a device or a pipe: reading one may never end
            raise CheckpointError(f"checkpoint {path!r} is not a regular file")
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"\x80") or head[:1] in (b"(", b"}", b"]"):
        if not trust_pickle:
            raise CheckpointError(
                f"checkpoint {path!r} is in the old pickle format, and reading a pickle can run any code "
                "the file carries. Load it only if you trust where it came from: "
                "load_checkpoint(path, trust_pickle=True), Solver.resume(path, trust_pickle=True) "
                "or train.py --trust-pickle; the next checkpoint is then written in the safe .npz format."
            )
        return "pickle"
    if not head.startswith(b"PK"):
        raise CheckpointError(f"checkpoint {path!r} is not an xpnet checkpoint (not an .npz file)")
    return "npz"


def check_checkpoint_file(path, trust_pickle: bool = False) -> None:
    """What :func:`load_checkpoint` checks before reading the file's contents (it exists, it is a
    file, it is an .npz, or a pickle with ``trust_pickle``), for a command to check its
    ``--resume`` before it loads a data set; the same errors."""
    _file_format(file_path("check_checkpoint_file", "path", path), trust_pickle)


def load_checkpoint(path, trust_pickle: bool = False) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    The file is read without unpickling anything. A checkpoint of the earlier
    pickle format (``.pkl``) is refused unless ``trust_pickle=True``: unpickling
    a file can run any code it carries, so only do that for files you made.

    Raises FileNotFoundError for a missing file and :class:`CheckpointError`
    (a ValueError) naming the file for anything that is not a sound checkpoint.
    """
    path = file_path("load_checkpoint", "path", path)
    if _file_format(path, trust_pickle) == "pickle":
        return _load_pickle(path, trust_pickle)
    try:
        # the members' headers, before NumPy allocates what they declare; xpnet writes none compressed
        check_npz_members(path, f"checkpoint {path!r}", compressed=False)
        with np.load(path, allow_pickle=False) as archive:
            if META not in archive.files:
                raise CheckpointError(f"checkpoint {path!r} is not an xpnet checkpoint (no {META} member)")
            members = {name: archive[name] for name in archive.files}
    except CheckpointError:
        raise
    except UnsafeNpzError as exc:
        raise CheckpointError(str(exc)) from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError) as exc:
        # allow_pickle=False refuses object arrays with a ValueError: the file tried to carry pickled data.
        # zipfile raises RuntimeError for a member marked as encrypted.
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not an xpnet checkpoint ({exc})") from exc
    meta = members.pop(META)
    try:
        if meta.dtype != np.uint8 or meta.ndim != 1:
            raise ValueError("metadata is not a byte string")
        document = json.loads(meta.tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested past Python's limit
        raise CheckpointError(f"checkpoint {path!r} has unreadable metadata ({exc})") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path!r} is not an xpnet checkpoint")
    if document.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path!r} has format version {document.get('version')!r}; this xpnet reads version {VERSION}"
        )
    payload = _decode(document.get("payload"), members, path)
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path!r} is not an xpnet checkpoint")
    return payload


def _load_pickle(path, trust_pickle):
    if not trust_pickle:  # _file_format refuses it first; kept beside the one call that unpickles
        raise CheckpointError(f"checkpoint {path!r} is a pickle, and trust_pickle is False")
    try:
        with open(path, "rb") as f:
            payload = pickle.load(f)  # noqa: S301 (explicit opt-in above)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not an xpnet checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != _LEGACY_FORMAT:
        raise CheckpointError(f"checkpoint {path!r} is not an xpnet checkpoint")
    payload = dict(payload)
    payload.pop("format")
    return payload


def is_finite_tree(tree) -> bool:
    """Whether every float in a tree (arrays of any library and Python floats) is finite."""
    return non_finite_path(tree) is None


def non_finite_path(tree, path: str = "") -> str | None:
    """Where the first NaN or infinity of a tree of dicts, lists and tuples (arrays of any
    library and Python floats) is, as ``path`` then the keys and indices that lead to it joined
    by dots; None when there is none. Another library's arrays are checked on their device: a
    state made of PyTorch or array-api-strict arrays passed unchecked."""
    if isinstance(tree, (dict, list, tuple)):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        for key, value in items:
            found = non_finite_path(value, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
        return None
    if isinstance(tree, np.ndarray) and tree.dtype.kind == "f":
        return None if np.isfinite(tree).all() else path
    if is_array(tree) and not isinstance(tree, np.ndarray):
        xp = namespace(tree)
        if xp.isdtype(tree.dtype, "real floating") and not to_numpy(xp.all(xp.isfinite(tree))):
            return path
        return None
    if isinstance(tree, float) and not math.isfinite(tree):
        return path
    return None


# --------------------------------------------------------------------------- moving trees
def tree_to_host(tree, backend):
    """Nested dicts/lists with the backend's arrays replaced by NumPy arrays."""
    if isinstance(tree, dict):
        return {k: tree_to_host(v, backend) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_to_host(v, backend) for v in tree)
    if backend.owns(tree):
        return backend.to_numpy(tree)
    return tree


def not_float_array(value) -> str:
    """'' for an array of floats of any library, else what ``value`` is ("int64 array", "str"),
    for an error message."""
    if isinstance(value, np.ndarray):
        return "" if value.dtype.kind == "f" else f"{value.dtype} array"
    if not is_array(value):
        return type(value).__name__
    return "" if namespace(value).isdtype(value.dtype, "real floating") else f"{value.dtype} array"


def tree_to_device(tree, backend, dtype=None):
    """Inverse of :func:`tree_to_host`: NumPy arrays, and any library's, copied onto
    ``backend``, the floating ones in ``dtype`` (when given)."""
    if isinstance(tree, dict):
        return {k: tree_to_device(v, backend, dtype) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_to_device(v, backend, dtype) for v in tree)
    if not isinstance(tree, np.ndarray) and is_array(tree) and not backend.owns(tree):
        tree = to_numpy(tree)  # another library's array (a state built from another model's params)
    if isinstance(tree, np.ndarray) or is_array(tree):
        # A copy: the optimizers update in place and must not write into the caller's arrays
        # (a backend's own arrays were taken as they were, and training one model changed another).
        floating = namespace(tree).isdtype(tree.dtype, "real floating")
        return backend.asarray(tree, dtype=dtype if floating else None, copy=True)
    return tree
