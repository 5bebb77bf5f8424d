"""The recipe's flags for the last call of a GPU run, chosen from what its first call found.

    python benchmarks/recipe_flags.py DIR

DIR holds that call's test_gpu.log (pytest -q on tests/test_gpu.py) and, if the ops suite
ran, bench_ops_gpu.json. Prints the flags for ``bench.py --recipe`` on one line (TF32 always:
the issue compares the two sides in the same precision) and, on stderr, why each switch
was or was not added:

- ``--conv-autotune`` where the run of the GPU tests finished and neither the autotuning
  test nor the direct kernels' test failed (autotuning trusts every path it times), nor any
  run of the whole training against NumPy's (``given_the_same_draws``), and the ops suite's
  whole network was not slower with it;
- ``--warp-plane-sums`` where no batchnorm, groupnorm or plane-sum test failed and the ops
  suite's whole network was faster with them.

``gpu_check.sh`` runs this for ``RECIPE_FLAGS=auto``, so that the last call decides without a
reader between calls while the machine waits.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# the tests each switch needs passing, by the substrings of their names
NEEDS = {
    "--conv-autotune": ("test_autotuned_convolutions", "test_direct_small_filter_convs", "given_the_same_draws"),
    "--warp-plane-sums": ("plane_sums", "spatial_batchnorm", "spatial_groupnorm", "channel_totals"),
}
# the ops suite's whole-network variant each switch is timed as
NET_VARIANT = {"--conv-autotune": "xpnet autotuned convs", "--warp-plane-sums": "xpnet warp sums"}


def failed_tests(log: str) -> list[str] | None:
    """The names of the tests pytest reported as failed or in error; None where the log has
    no final summary (the run was cut off, or never started)."""
    if not re.search(r"^=* ?\d+ (passed|failed)", log, re.MULTILINE):
        return None
    return re.findall(r"^(?:FAILED|ERROR) \S+::(\w+)", log, re.MULTILINE)


def net_times(folder: Path) -> dict:
    """{variant: µs} of the ops suite's whole-network row, or {} where it did not run."""
    path = folder / "bench_ops_gpu.json"
    try:
        results = json.loads(path.read_text())["ops"]["net"]["results"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {name: value["us"] for name, value in results.items() if isinstance(value, dict) and "us" in value}


def choose(folder: Path) -> tuple[list[str], list[str]]:
    """(flags, reasons)."""
    flags, reasons = ["--tf32"], []
    log = folder / "test_gpu.log"
    failed = failed_tests(log.read_text(errors="replace")) if log.exists() else None
    if failed is None:
        return flags, [f"no finished run of the GPU tests in {log}: no switch is trusted"]
    times = net_times(folder)
    for flag, needed in NEEDS.items():
        broken = sorted({name for name in failed if any(part in name for part in needed)})
        if broken:
            reasons.append(f"{flag} left out: {', '.join(broken)} failed")
            continue
        base, switched = times.get("xpnet"), times.get(NET_VARIANT[flag])
        if base is None or switched is None:
            verdict = "its tests passed (the ops suite did not time it)"
            if flag == "--warp-plane-sums":  # off by default until a measurement favours it
                reasons.append(f"{flag} left out: {verdict}")
                continue
        elif switched > base * (1.0 if flag == "--warp-plane-sums" else 1.05):
            reasons.append(f"{flag} left out: the whole network took {switched:.0f} µs with it, {base:.0f} without")
            continue
        else:
            verdict = f"its tests passed; the whole network {switched:.0f} µs with it, {base:.0f} without"
        flags.append(flag)
        reasons.append(f"{flag}: {verdict}")
    return flags, reasons


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    flags, reasons = choose(Path(args[0]))
    for reason in reasons:
        print(reason, file=sys.stderr)
    print(" ".join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
