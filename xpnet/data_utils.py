"""Data sets: CIFAR-10 in the official python-pickle layout, and scikit-learn's
handwritten digits (shipped inside scikit-learn, so it needs no network).

Loaders return NumPy arrays on the host; the Solver moves them to the device once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.request
from pathlib import Path, PurePosixPath

import numpy as np

from .atomic_files import atomic_write
from .input_checks import as_int, check_flag, check_seed, file_path, is_number
from .plain_pickle import UnsafePickleError, load_plain

__all__ = [
    "load_CIFAR_batch",
    "load_CIFAR10",
    "get_CIFAR10_data",
    "find_CIFAR10",
    "download_CIFAR10",
    "load_digits_data",
    "default_data_dirs",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
CIFAR10_SIZES = {"train": 50000, "test": 10000}  # images in the official training and test batches
# How to fetch the data set, from any entry point: only xpnet-train has a --download flag.
DOWNLOAD_HINT = "xpnet.data_utils.download_CIFAR10(), or xpnet-train --dataset cifar10 --download"
CIFAR10_VALIDATION_ROWS = 1000  # get_CIFAR10_data's validation split, the course's


class DataError(ValueError):
    """A data file is missing, unreadable or malformed."""


# The official batches are about 31 MB; a file far larger than that is not one.
MAX_BATCH_BYTES = 256 * 1024 * 1024


def _read_batch_pickle(filename):
    size = os.path.getsize(filename)
    if size > MAX_BATCH_BYTES:
        raise DataError(
            f"CIFAR-10 batch {filename!r} is {size / 2**20:.0f} MiB, far larger than a batch file "
            f"(about 30 MiB); refused"
        )
    try:
        with open(filename, "rb") as f:
            return load_plain(f, size)
    except UnsafePickleError as error:
        raise DataError(f"CIFAR-10 batch {filename!r} {error}. Download the data set again.") from None
    except Exception as exc:  # any unpickling failure means the same thing to the user
        raise DataError(
            f"CIFAR-10 batch {filename!r} is corrupt or not a CIFAR-10 python batch ({exc!r}); "
            f"delete it and download the data set again ({DOWNLOAD_HINT})"
        ) from exc


def _pixel_dtype(dtype, centred: bool) -> np.dtype:
    """``dtype`` as a NumPy dtype for images: a floating one, or uint8 for raw pixels that no
    mean is subtracted from (an integer array would wrap); else a ValueError naming it."""
    try:
        chosen = np.dtype(dtype)
    except TypeError:
        chosen = None
    if chosen is None or not (chosen.kind == "f" or (chosen == np.uint8 and not centred)):
        raw = "" if centred else ", or 'uint8' for raw pixels"
        why = ": raw pixels need subtract_mean=False (an integer array would wrap)" if chosen == np.uint8 else ""
        raise ValueError(f"dtype must be a floating type ('float32', 'float64', 'float16'{raw}), got {dtype!r}{why}")
    return chosen


def load_CIFAR_batch(filename, dtype="float64"):
    """Load one CIFAR-10 batch file (read by :mod:`xpnet.plain_pickle`: it cannot run code).

    Returns:
        X (N, 32, 32, 3) of ``dtype`` (pixel values 0..255; a float type, or uint8) and y (N,) int64.
    """
    dtype = _pixel_dtype(dtype, centred=False)
    filename = file_path("load_CIFAR_batch", "filename", filename)
    if os.path.isdir(filename):
        raise IsADirectoryError(
            f"CIFAR-10 batch {filename!r} is a folder; give one batch file in it, such as "
            f"{os.path.join(filename, 'data_batch_1')!r}, or load_CIFAR10 the whole folder"
        )
    if not os.path.isfile(filename):
        raise FileNotFoundError(
            f"CIFAR-10 batch {filename!r} is missing; point --data-dir (or $XPNET_DATA_DIR) "
            f"at a complete cifar-10-batches-py folder, or download it ({DOWNLOAD_HINT})"
        )
    batch = _read_batch_pickle(filename)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"CIFAR-10 batch {filename!r} is not a CIFAR-10 python batch (no data and labels)")
    data, labels = batch[b"data"], batch[b"labels"]
    # Checked as they stand before NumPy converts anything: nested lists that share one
    # inner list make a file of kilobytes into an array of gigabytes.
    if not isinstance(data, np.ndarray):
        raise DataError(f"CIFAR-10 batch {filename!r} holds its pixels as a {type(data).__name__}, not an array")
    if isinstance(labels, (list, tuple)):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
            raise DataError(f"CIFAR-10 batch {filename!r} has labels that are not a flat list of integers")
    elif not isinstance(labels, np.ndarray) or labels.dtype.kind not in "ui" or labels.ndim != 1:
        raise DataError(f"CIFAR-10 batch {filename!r} has labels that are not a flat list of integers")
    if data.dtype.kind not in "ui" or data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != len(labels):
        raise DataError(
            f"CIFAR-10 batch {filename!r} has data of shape {data.shape} ({data.dtype}) and "
            f"{len(labels)} labels; expected (N, 3072) integer pixels and N labels"
        )
    # Ranges checked in the file's own types: a label past int64 (a Python int) raised
    # OverflowError in the conversion, and pixels past 0..255 would train on in silence (or
    # wrap, as uint8).
    if len(labels) and (min(labels) < 0 or max(labels) > 9):
        raise DataError(f"CIFAR-10 batch {filename!r} has labels outside 0..9")
    if data.dtype != np.uint8 and data.size and (data.min() < 0 or data.max() > 255):
        raise DataError(f"CIFAR-10 batch {filename!r} has pixels from {data.min()} to {data.max()}, outside 0..255")
    labels = np.asarray(labels, dtype=np.int64)
    X = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(dtype)
    return X, labels


def _check_root(root) -> str:
    """``root`` as a path string (``~`` expanded), after naming one that cannot be the batches'
    folder: not a path (None failed inside os.path.join), a batch file itself, or the folder
    that holds cifar-10-batches-py (each was reported as a batch missing under it)."""
    root = file_path("load_CIFAR10", "root", root, "the cifar-10-batches-py folder's path")
    if os.path.isfile(root):
        raise NotADirectoryError(
            f"load_CIFAR10: root {os.fspath(root)!r} is a file; give the folder that holds the batches, "
            f"{os.path.dirname(os.path.abspath(root))!r}"
        )
    inner = os.path.join(root, CIFAR10_FOLDER)
    if not os.path.exists(os.path.join(root, "data_batch_1")) and os.path.isfile(os.path.join(inner, "data_batch_1")):
        raise FileNotFoundError(f"load_CIFAR10: no batches in {os.fspath(root)!r}, but {inner!r} holds them: give that")
    return root


def load_CIFAR10(root, dtype="float64"):
    """Load all of CIFAR-10 from ``root`` (data_batch_1..5 and test_batch).

    Returns:
        X_train (50000, 32, 32, 3), y_train (50000,), X_test (10000, 32, 32, 3), y_test (10000,).
    """
    root = _check_root(root)
    batches = [load_CIFAR_batch(os.path.join(root, f"data_batch_{i}"), dtype) for i in range(1, 6)]
    X_train = np.concatenate([b[0] for b in batches])
    y_train = np.concatenate([b[1] for b in batches])
    X_test, y_test = load_CIFAR_batch(os.path.join(root, "test_batch"), dtype)
    return X_train, y_train, X_test, y_test


def default_data_dirs(data_dir=None) -> list:
    """Where CIFAR-10 is looked for, in order: ``data_dir``, $XPNET_DATA_DIR, ~/.cache/xpnet."""
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        # get_CIFAR10_data(49000, 1000, 1000) is the course's call with its sizes by position.
        hint = (
            " (the sizes go by name: num_training=..., num_validation=..., num_test=...)" if is_number(data_dir) else ""
        )
        raise TypeError(f"data_dir must be a folder path (str or Path), got {data_dir!r}{hint}")
    dirs = [data_dir, os.environ.get("XPNET_DATA_DIR"), str(Path.home() / ".cache" / "xpnet")]
    return [Path(d).expanduser() for d in dirs if d]


def find_CIFAR10(data_dir=None) -> Path:
    """The first folder holding CIFAR-10 batches (or a cifar-10-batches-py folder inside it).

    Raises FileNotFoundError listing where it looked and what to do.
    """
    searched, files = [], []
    for base in default_data_dirs(data_dir):
        if base.is_file():  # a batch file itself, say: the folder that holds it is meant
            files.append(f"{base} is a file; give the folder that holds it, {base.parent}. ")
        for folder in (base, base / CIFAR10_FOLDER):
            searched.append(str(folder))
            if (folder / "data_batch_1").is_file():
                return folder
    raise FileNotFoundError(
        "CIFAR-10 not found; looked in: " + ", ".join(searched) + ". " + "".join(files) + "Pass --data-dir DIR "
        f"(or set XPNET_DATA_DIR) to a folder holding cifar-10-batches-py, or download it ({DOWNLOAD_HINT})."
    )


def download_CIFAR10(dest=None, url=None, md5=None, progress=True) -> Path:
    """Download and unpack the official CIFAR-10 python archive into ``dest``
    (default ~/.cache/xpnet), checking its md5 (default: the official archive's).
    Returns the batches folder.

    Each file is written whole or not at all, and ``data_batch_1``, by which
    :func:`find_CIFAR10` knows the folder, comes out last: an interrupted download
    leaves no part of an archive, and an interrupted unpacking no batches folder that
    looks complete; a second call replaces what is there."""
    from tqdm.auto import tqdm

    progress = check_flag("progress", progress)  # before any download
    url = url or CIFAR10_URL
    md5 = md5 or CIFAR10_MD5
    dest = Path(dest or default_data_dirs()[-1]).expanduser()
    archive = dest / "cifar-10-python.tar.gz"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_write(archive, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            digest = hashlib.md5()
            with tqdm(total=total, unit="B", unit_scale=True, desc="CIFAR-10", disable=not progress) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            actual = digest.hexdigest()
            if actual != md5:  # raised inside the write: no archive is left behind
                raise DataError(f"downloaded archive from {url} has md5 {actual}, expected {md5}; try again")
    except OSError as exc:
        raise OSError(f"downloading CIFAR-10 from {url} failed: {exc}") from exc
    folder = dest / CIFAR10_FOLDER
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if _is_batch_file(m)]
        # Only the bytes of plain files are copied, each under its own last name component:
        # no link, device file or path outside the folder can come out of the archive.
        for member in sorted(members, key=lambda m: m.name.endswith("/data_batch_1")):
            source = tar.extractfile(member)
            assert source is not None  # a plain file's, by _is_batch_file
            with source, atomic_write(folder / PurePosixPath(member.name).name, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
    archive.unlink()
    return folder


def _is_batch_file(member: tarfile.TarInfo) -> bool:
    """A plain file directly inside the archive's batches folder (never ``..`` or a link)."""
    parts = PurePosixPath(member.name).parts
    return member.isfile() and len(parts) == 2 and parts[0] == CIFAR10_FOLDER and parts[1] not in ("..", ".")


def _check_count(name: str, value, least: int) -> None:
    """ValueError unless ``value`` is an integer >= ``least``: a negative count would slice from
    the end, a float fails inside NumPy's indexing, and no training rows would give a mean of NaN."""
    number = as_int(value)
    if number is None or number < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _split_and_normalize(X_train, y_train, X_test, y_test, num_training, num_validation, num_test, subtract_mean):
    """The course's split: validation rows from the end of the training set; the mean
    image of the training rows subtracted from every split."""
    for name, value, least in (("num_training", num_training, 1), ("num_validation", num_validation, 0),
                               ("num_test", num_test, 0)):  # fmt: skip
        _check_count(name, value, least)
    if num_training + num_validation > X_train.shape[0]:
        raise ValueError(
            f"num_training + num_validation = {num_training + num_validation} exceeds "
            f"the {X_train.shape[0]} training rows"
        )
    if num_test > X_test.shape[0]:
        raise ValueError(f"num_test = {num_test} exceeds the {X_test.shape[0]} test rows")
    data = {
        "X_train": X_train[:num_training],
        "y_train": y_train[:num_training],
        "X_val": X_train[num_training : num_training + num_validation],
        "y_val": y_train[num_training : num_training + num_validation],
        "X_test": X_test[:num_test],
        "y_test": y_test[:num_test],
    }
    if subtract_mean:
        mean = data["X_train"].mean(axis=0)
        for key in ("X_train", "X_val", "X_test"):
            data[key] = data[key] - mean
    return data


def get_CIFAR10_data(
    data_dir=None,
    num_training=49000,
    num_validation=CIFAR10_VALIDATION_ROWS,
    num_test=1000,
    subtract_mean=True,
    channels_first=True,
    dtype="float32",
    download=False,
):
    """CIFAR-10 as the dict the Solver takes (NumPy arrays on the host).

    Args:
        data_dir: folder holding cifar-10-batches-py (None: $XPNET_DATA_DIR, then ~/.cache/xpnet).
        num_training, num_validation, num_test: rows per split; validation rows
            come from the end of the training set, as in the course.
        subtract_mean: subtract the mean training image.
        channels_first: (N, 3, 32, 32) if True, else (N, 32, 32, 3).
        dtype: dtype of the images: a float type (uint8 too without subtract_mean).
        download: download the official archive into ~/.cache/xpnet (or data_dir) if not found.
    Returns:
        dict with X_train, y_train, X_val, y_val, X_test, y_test.
    """
    # before the seconds that loading takes; a string is truthy (download="no" downloaded)
    subtract_mean = check_flag("subtract_mean", subtract_mean)
    channels_first = check_flag("channels_first", channels_first)
    download = check_flag("download", download)
    dtype = _pixel_dtype(dtype, centred=subtract_mean)
    try:
        root = find_CIFAR10(data_dir)
    except FileNotFoundError:
        if not download:
            raise
        root = download_CIFAR10(data_dir)
    X_train, y_train, X_test, y_test = load_CIFAR10(root, dtype=dtype)
    data = _split_and_normalize(X_train, y_train, X_test, y_test, num_training, num_validation, num_test, subtract_mean)
    if channels_first:
        for key in ("X_train", "X_val", "X_test"):
            data[key] = np.ascontiguousarray(data[key].transpose(0, 3, 1, 2))
    return data


def load_digits_data(num_validation=200, num_test=300, subtract_mean=True, dtype="float32", seed=0, images=False):
    """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) as the Solver's dict.

    Pixels (0..16) are scaled to [0, 1]; the rows are shuffled with ``seed``
    before the split. X arrays are (N, 64), or (N, 1, 8, 8) with ``images=True``
    (for convolutional nets).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the digits data set ships with scikit-learn: pip install scikit-learn") from exc
    dtype = _pixel_dtype(dtype, centred=True)  # scaled to [0, 1]: a float type
    subtract_mean, images = check_flag("subtract_mean", subtract_mean), check_flag("images", images)
    seed = check_seed(seed)  # NumPy's SeedSequence named neither the function nor the argument
    _check_count("num_validation", num_validation, 0)  # before they slice
    _check_count("num_test", num_test, 0)
    digits = load_digits()
    X = (digits.data / 16.0).astype(dtype)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(X.shape[0])
    X, y = X[order], y[order]
    num_training = X.shape[0] - num_validation - num_test
    if num_training <= 0:
        raise ValueError(f"num_validation + num_test must leave training rows out of {X.shape[0]}")
    if images:
        X = X.reshape(-1, 1, 8, 8)
    return _split_and_normalize(
        X[: num_training + num_validation],
        y[: num_training + num_validation],
        X[num_training + num_validation :],
        y[num_training + num_validation :],
        num_training,
        num_validation,
        num_test,
        subtract_mean,
    )
