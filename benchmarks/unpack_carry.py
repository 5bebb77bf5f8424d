"""Put the CIFAR-10 pieces a GPU call carried where benchmarks/gpu_check.sh reads them.

    python benchmarks/unpack_carry.py CARRY DEST

Each file in CARRY/cifar*/ goes to DEST (made if missing): ``NAME.xz`` decompressed to
``NAME`` (benchmarks/stage_gpu_run.sh compresses the batch files with a delta filter and LZMA2,
which the standard library's lzma reads), anything else copied as it is. DEST outlives the
call while the machine stays up, so the pieces of consecutive calls add up to the data set.
Prints what it wrote.
"""

from __future__ import annotations

import lzma
import shutil
import sys
from pathlib import Path


def unpack(carry: Path, dest: Path) -> list[Path]:
    """The files written to ``dest``, one per file of ``carry``'s cifar* folders."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sorted(carry.glob("cifar*/*")):
        if source.suffix == ".xz":
            target = dest / source.stem
            with lzma.open(source) as packed, open(target, "wb") as out:
                shutil.copyfileobj(packed, out, 1 << 20)
        else:
            target = dest / source.name
            shutil.copyfile(source, target)
        written.append(target)
    return written


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    for path in unpack(Path(args[0]), Path(args[1])):
        print(f"{path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
