"""What an .npz file from elsewhere must satisfy before NumPy reads any array from it.

``np.load(..., allow_pickle=False)`` runs no code, but it allocates whatever a member's .npy
header declares: a header of a few bytes can declare terabytes, a deflated member can claim to
expand to far more than the file, and members can overlap, each one's data holding the next
ones, so that the members together declare many times the file. All three are checked here
from the zip and .npy headers alone, so a crafted file is refused by name instead of raising
MemoryError (or taking the machine's memory). The zip's directory itself is bounded first:
zipfile reads it whole and makes an object of several hundred bytes for each entry of about
a hundred.
"""

from __future__ import annotations

import math
import os
import struct
import tokenize
import zipfile

from numpy.lib import format as npy_format

__all__ = ["check_npz_members", "UnsafeNpzError", "DEFLATE_MAX_RATIO"]

# deflate's longest match (258 bytes) costs at least 2 bits: no stream expands more than ~1032:1
DEFLATE_MAX_RATIO = 1032

# About 40,000 members of 100 bytes: a checkpoint of a net of 1,000 layers, with its optimizer's
# state and best parameters, holds under 10,000. A directory of 90 MB (a million members) had
# zipfile make about 1 GB of entry objects before any member was looked at.
MAX_DIRECTORY_BYTES = 4 * 2**20


class UnsafeNpzError(ValueError):
    """An .npz member that NumPy must not be asked to read: its message names the file and member."""


def check_npz_members(path, label: str, compressed: bool = True) -> None:
    """:class:`UnsafeNpzError` naming ``label`` (how the caller speaks of the file) unless every member of
    the .npz at ``path`` is a .npy of version 1 or 2, stored (or deflated, where ``compressed``,
    as ``np.savez_compressed`` writes it) and declaring no more data than it holds, and the
    members' data fit in the file side by side.

    A zip or .npy header that cannot be read raises what zipfile or NumPy raise (``BadZipFile``,
    OSError, EOFError, ValueError)."""
    directory = _directory_size(path)
    if directory is not None and directory > MAX_DIRECTORY_BYTES:
        raise UnsafeNpzError(
            f"{label} has a zip directory of {directory} bytes (about {directory // 100} members), more than "
            f"{MAX_DIRECTORY_BYTES} bytes: no checkpoint or data file holds that many arrays"
        )
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
                try:
                    shape, _, dtype = read_header(member)
                except (tokenize.TokenError, SyntaxError) as exc:  # NumPy's header filter lets these through
                    unreadable = f"{label} is corrupt: member {name!r} has an unreadable header ({exc})"
                    raise UnsafeNpzError(unreadable) from None
            declared = math.prod(shape) * dtype.itemsize
            if declared > info.file_size:
                raise UnsafeNpzError(
                    f"{label} is corrupt: member {name!r} declares an array of shape {shape} "
                    f"({declared} bytes) in {info.file_size} bytes"
                )


def _directory_size(path) -> int | None:
    """The size in bytes of the zip's central directory, as zipfile will read it: from the end
    record, or from the zip64 end record just before it where there is one; None where no end
    record can be found (zipfile then raises BadZipFile)."""
    end_record, locator, zip64_record = 22, 20, 56  # their fixed sizes
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - end_record - 0xFFFF)  # the end record, then a comment of up to 64 KiB
        f.seek(start)
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < end_record:
            return None
        (directory,) = struct.unpack_from("<I", tail, at + 12)
        if at >= locator and tail[at - locator : at - locator + 4] == b"PK\x06\x07":
            record_at = start + at - locator - zip64_record
            if record_at >= 0:
                f.seek(record_at)
                record = f.read(zip64_record)
                if record[:4] == b"PK\x06\x06":
                    (directory,) = struct.unpack_from("<Q", record, 40)
    return directory
