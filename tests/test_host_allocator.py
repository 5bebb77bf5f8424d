"""Host memory: importing xpnet keeps freed buffers in the process on glibc, unless the
environment says otherwise. Each case runs in a fresh interpreter (the setting is
process-wide and made once, at import)."""

import ctypes
import os
import subprocess
import sys

import pytest

# How many bytes glibc holds in mmapped blocks after a 4 MiB NumPy array is made: with the
# thresholds raised, the array comes from the heap and this does not grow.
PROBE = """
import ctypes, numpy as np, xpnet
from xpnet.backend.host_allocator import host_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblkhd
buffer = np.ones(4 << 20, dtype=np.uint8)
print(libc.mallinfo2().hblkhd - before)
print(host_allocator())
"""


def _glibc_with_mallinfo2() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION")) and hasattr(ctypes.CDLL(None), "mallinfo2")
    except (OSError, ValueError, AttributeError):
        return False


needs_glibc = pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc 2.33 or later (mallinfo2)")


def run_probe(**settings):
    """Run PROBE in a fresh interpreter whose environment has only ``settings`` of the
    variables that choose the allocator's thresholds."""
    chooser = ("XPNET_HOST_ALLOCATOR", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    env = {k: v for k, v in os.environ.items() if k not in chooser}
    env.update(settings)
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)


@needs_glibc
def test_importing_xpnet_keeps_large_numpy_buffers_on_the_heap():
    done = run_probe()
    assert done.returncode == 0, done.stderr
    mmapped, state = done.stdout.splitlines()
    assert int(mmapped) == 0
    assert state.startswith("freed buffers kept")


@needs_glibc
def test_system_setting_leaves_glibc_alone():
    done = run_probe(XPNET_HOST_ALLOCATOR="system")
    assert done.returncode == 0, done.stderr
    mmapped, state = done.stdout.splitlines()
    assert int(mmapped) >= 4 << 20  # glibc's own threshold (128 KiB at start) maps it
    assert "XPNET_HOST_ALLOCATOR=system" in state


@needs_glibc
def test_glibc_variables_in_the_environment_win():
    done = run_probe(MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    assert done.returncode == 0, done.stderr
    mmapped, state = done.stdout.splitlines()
    assert int(mmapped) >= 4 << 20
    assert "MALLOC_MMAP_THRESHOLD_" in state


def test_an_unknown_setting_is_named_in_a_warning_and_leaves_glibc_alone():
    done = run_probe(XPNET_HOST_ALLOCATOR="fast")
    assert done.returncode == 0, done.stderr  # importing xpnet still works
    assert "RuntimeWarning: XPNET_HOST_ALLOCATOR must be 'tuned' or 'system', got 'fast'" in done.stderr
    assert done.stdout.splitlines()[1] == "system defaults (XPNET_HOST_ALLOCATOR='fast' is not a setting)"
