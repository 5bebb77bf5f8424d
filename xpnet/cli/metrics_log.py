"""``xpnet-train --log``: one JSON line per logging point, kept across a resume.

The file is opened at the first record, so a command that fails before training (a
missing data set, a refused checkpoint) leaves an earlier log as it was. After
``--resume`` the log goes on where the checkpoint stopped: the records up to the
checkpoint's iteration are kept, those logged after it (by the run that was
interrupted, which the resumed run logs again) and that run's closing record are
dropped, so the file reads as the log of one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from typing import IO, Any

from xpnet.atomic_files import atomic_write

__all__ = ["MetricsLog"]

# The command's closing record (test accuracy and wall time) has this key; logging points do not.
_CLOSING_KEY = "wall_s"


class MetricsLog:
    """The JSON-lines log at ``path`` (None: no log)."""

    def __init__(self, path):
        self.path = path
        self.resumed_at: int | None = None
        self._file: IO[Any] | None = None

    def continue_after(self, iteration: int) -> None:
        """Keep the existing log's records up to ``iteration`` (a resumed checkpoint's) and append after them."""
        self.resumed_at = iteration

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        if self._file is None:
            self._file = self._open()
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self) -> IO[Any]:
        # Only a regular file holds records to keep: /dev/stdout or a pipe is written as it is.
        if self.resumed_at is None or not os.path.isfile(self.path):
            return open(self.path, "w")  # noqa: SIM115 (closed by close())
        kept = _records_up_to(self.path, self.resumed_at)
        with atomic_write(self.path, "w") as f:
            f.writelines(kept)
        return open(self.path, "a")  # noqa: SIM115 (closed by close())


def _records_up_to(path, iteration: int) -> list[str]:
    """The lines of the log file at ``path`` that are logging points at or before ``iteration``;
    a line cut short by a crash is not one."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        at = record.get("iteration") if isinstance(record, dict) else None
        if isinstance(at, int) and at <= iteration and _CLOSING_KEY not in record:
            kept.append(line if line.endswith("\n") else line + "\n")
    return kept
