"""Shared fixtures: the test suite runs the same test functions on every backend.

Backends come from $XPNET_TEST_BACKENDS (comma-separated specs) when set;
otherwise numpy, array_api_strict and array_api_strict:device1 always, plus
cupy and torch when they are installed and usable, and ``numpy+cupy-kernels``
where a C++ compiler is: NumPy's arrays sent through CuPy's fused kernels, which
``cpu_kernels.py`` runs on the CPU, so that every backend-parametrised test checks
those kernels (and the Python around each launch) without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import signal

import numpy as np
import pytest

import xpnet


def _optional_backends():
    specs = []
    if importlib.util.find_spec("cupy") is not None:
        try:
            xpnet.get_backend("cupy")
            specs.append("cupy")
        except (ImportError, RuntimeError):
            pass
    if importlib.util.find_spec("torch") is not None:
        specs.append("torch:cpu")
        try:
            xpnet.get_backend("torch:cuda")
            specs.append("torch:cuda")
        except RuntimeError:
            pass
    return specs


KERNELS_ON_CPU = "numpy+cupy-kernels"


def backend_specs():
    chosen = os.environ.get("XPNET_TEST_BACKENDS")
    if chosen:
        return [s.strip() for s in chosen.split(",") if s.strip()]
    from cpu_kernels import COMPILER

    kernels_on_cpu = [KERNELS_ON_CPU] if COMPILER else []
    return ["numpy", "array_api_strict", "array_api_strict:device1", *_optional_backends(), *kernels_on_cpu]


BACKENDS = backend_specs()


@functools.cache
def _kernels_on_cpu():
    from cpu_kernels import cupy_kernels_on_cpu

    return cupy_kernels_on_cpu()


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Each backend the suite runs on, as an xpnet Backend (NumPy for numpy+cupy-kernels, whose
    arrays then take CuPy's fused kernels on the CPU for the test's duration)."""
    if request.param == KERNELS_ON_CPU:
        from xpnet.backend import dispatch

        monkeypatch.setitem(dispatch._ACCELERATORS, np.ndarray, _kernels_on_cpu())
        return xpnet.get_backend("numpy")
    return xpnet.get_backend(request.param)


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """Both floating dtypes the nets support."""
    return request.param


@pytest.fixture
def np_rng():
    """A NumPy generator for test data, fixed so failures reproduce."""
    return np.random.default_rng(12345)


@pytest.fixture
def sigint_raises():
    """SIGINT raising KeyboardInterrupt, as at a terminal, for the duration of a test, even where
    the suite was started with SIGINT ignored (a shell's background job ignores it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
