"""Which of its paths a convolution takes on a GPU: the one the switches name, or the fastest by timing.

A convolution on CuPy can run three ways: the direct kernels (filters of few taps),
cuDNN, and im2col + cuBLAS. Which is fastest depends on the shape, the precision and the
card, so, as PyTorch's ``cudnn.benchmark`` does among cuDNN's algorithms, ``autotune``
times every path a convolution can take the first time its geometry runs (outside a graph
capture: forward and backward, after one untimed run of each) and keeps the fastest for
that geometry. The paths round differently, so which one wins, and so the last bits of the
results, can differ from one process to the next; with ``autotune`` off (the default) the
switches decide and results are reproducible.
"""

from __future__ import annotations

import functools
import statistics
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

__all__ = ["PATHS", "ConvGeometry", "ConvPaths"]

# Every path, in the order of precedence the switches give them.
PATHS = ("direct", "cudnn", "im2col")


class ConvGeometry(NamedTuple):
    """What a path's speed depends on, and so what a choice is kept for."""

    device: int
    x_shape: tuple  # (N, C, H, W)
    channels_outer: bool  # x stored (C, N, H, W), as a convolution's output on the im2col path
    w_shape: tuple  # (F, C, HH, WW)
    dtypes: str  # of x, w and b, e.g. "float32/float32/no bias"
    stride: int
    pad: int
    tf32: bool


class _Timed(NamedTuple):
    """What timing one geometry found."""

    chosen: str  # the path kept
    ms: dict  # {path: median ms of a forward and backward pass}
    failed: dict  # {path: why its untimed run failed}


class ConvPaths:
    """The paths chosen so far, by geometry.

    ``elapsed_ms(run)`` calls ``run()`` and returns the milliseconds the device spent on it;
    ``repeats`` timed runs of each path are compared by their median."""

    def __init__(self, elapsed_ms: Callable[[Callable[[], object]], float], repeats: int = 3):
        self.autotune = False
        self.elapsed_ms, self.repeats = elapsed_ms, repeats
        self._timed: dict[ConvGeometry, _Timed] = {}
        self._lock = threading.Lock()  # one geometry timed at a time, whatever the threads

    @property
    def timings(self) -> dict:
        """{geometry: {path: median ms}} of every geometry timed so far."""
        return {key: timed.ms for key, timed in self._timed.items()}

    def choose(self, key: ConvGeometry, available: Callable[[], Sequence[str]], static: str,
               trial: Callable[[str], object], capturing: bool) -> str:  # fmt: skip
        """The path for the convolution of geometry ``key``.

        available(): the paths it can take here (a subset of PATHS, in their order), asked
        only when a geometry is to be timed, so that a step whose geometries were all timed
        before does not work it out again; static: the one the switches pick; trial(path): one forward and
        backward pass along ``path``; capturing: whether a CUDA graph is being recorded,
        when nothing may be timed (a geometry not yet timed takes the static path then,
        and nothing is remembered)."""
        if not self.autotune:
            return static
        timed = self._timed.get(key)
        if timed is not None:
            return timed.chosen
        if capturing:
            return static
        with self._lock:
            if key not in self._timed:  # another thread may have timed it meanwhile
                paths = available()
                if len(paths) < 2:
                    return static
                self._timed[key] = self._time(paths, trial)
            return self._timed[key].chosen

    def _time(self, available, trial) -> _Timed:
        """Each usable path's median ms of its forward and backward, the paths interleaved,
        and the fastest. A path whose untimed run fails (out of device memory, a library that
        refuses the geometry) is left out, unless every path fails."""
        usable: list[str] = []
        failed: dict[str, str] = {}
        error: Exception | None = None
        for path in available:  # untimed: compiles kernels, finds cuDNN's algorithms
            try:
                trial(path)
            except (MemoryError, RuntimeError) as exc:
                failed[path], error = f"{type(exc).__name__}: {exc}", exc
                continue
            usable.append(path)
        if not usable:
            raise error or RuntimeError("no convolution path was on offer")
        samples: dict = {path: [] for path in usable}
        for _ in range(self.repeats):
            for path in usable:
                samples[path].append(self.elapsed_ms(functools.partial(trial, path)))
        ms = {path: statistics.median(values) for path, values in samples.items()}
        return _Timed(min(ms, key=lambda path: (ms[path], PATHS.index(path))), ms, failed)

    def report(self) -> list[dict]:
        """Each geometry timed so far: its fields, each path's median milliseconds, the paths
        that failed and why, and the path kept."""
        return [
            {**key._asdict(), "ms": timed.ms, "failed": timed.failed, "chosen": timed.chosen}
            for key, timed in self._timed.items()
        ]
