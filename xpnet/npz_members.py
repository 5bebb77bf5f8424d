"""What an .npz file from elsewhere must satisfy before NumPy reads any array from it.

``np.load(..., allow_pickle=False)`` runs no code, but it allocates whatever a member's .npy
header declares: a header of a few bytes can declare terabytes, a deflated member can claim to
expand to far more than the file, and members can overlap, each one's data holding the next
ones, so that the members together declare many times the file. All three are checked here
from the zip and .npy headers alone, so a crafted file is refused by name instead of raising
MemoryError (or taking the machine's memory).
"""

from __future__ import annotations

import math
import os
import zipfile

from numpy.lib import format as npy_format

__all__ = ["check_npz_members", "UnsafeNpzError", "DEFLATE_MAX_RATIO"]

# deflate's longest match (258 bytes) costs at least 2 bits: no stream expands more than ~1032:1
DEFLATE_MAX_RATIO = 1032


class UnsafeNpzError(ValueError):
    """An .npz member that NumPy must not be asked to read: its message names the file and member."""


def check_npz_members(path, label: str, compressed: bool = True) -> None:
    """:class:`UnsafeNpzError` naming ``label`` (how the caller speaks of the file) unless every member of
    the .npz at ``path`` is a .npy of version 1 or 2, stored (or deflated, where ``compressed``,
    as ``np.savez_compressed`` writes it) and declaring no more data than it holds, and the
    members' data fit in the file side by side.

    A zip or .npy header that cannot be read raises what zipfile or NumPy raise (``BadZipFile``,
    OSError, EOFError, ValueError)."""
    with zipfile.ZipFile(path) as archive:
        # Members whose bytes overlap (each one's data holding the next members) let a file of
        # 0.5 MB declare 100 MB across 200 members; members that do not overlap fit in the file.
        stored = sum(info.compress_size for info in archive.infolist())
        size = os.path.getsize(path)
        if stored > size:
            raise UnsafeNpzError(
                f"{label} is corrupt: its members' data add up to {stored} bytes in a file of {size} (they overlap)"
            )
        for info in archive.infolist():
            name = info.filename
            method = info.compress_type
            if method != zipfile.ZIP_STORED and not (compressed and method == zipfile.ZIP_DEFLATED):
                readable = "stored or deflated members" if compressed else "uncompressed members"
                raise UnsafeNpzError(
                    f"{label} has a compressed member {name!r} (method {method}); only {readable} are read"
                )
            if method == zipfile.ZIP_DEFLATED and info.file_size > DEFLATE_MAX_RATIO * info.compress_size + 1024:
                raise UnsafeNpzError(
                    f"{label} is corrupt: member {name!r} claims {info.file_size} bytes from "
                    f"{info.compress_size} compressed ones, more than deflate can expand"
                )
            with archive.open(info) as member:
                version = npy_format.read_magic(member)
                if version not in ((1, 0), (2, 0)):
                    raise UnsafeNpzError(f"{label}: member {name!r} is .npy version {version}")
                read_header = (
                    npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
                )
                shape, _, dtype = read_header(member)
            declared = math.prod(shape) * dtype.itemsize
            if declared > info.file_size:
                raise UnsafeNpzError(
                    f"{label} is corrupt: member {name!r} declares an array of shape {shape} "
                    f"({declared} bytes) in {info.file_size} bytes"
                )
