"""Backends: the one package that names NumPy, CuPy, PyTorch or array-api-strict.

Everything else in xpnet works on ``backend.xp``, the array API namespace, and
reaches the library-specific parts (which device, random numbers, moving data
to and from the host, synchronisation, CUDA graphs) only through a
:class:`Backend`. Each library has a module of its own that registers it with
one :func:`register_backend` call; adding a backend is a new module and an
import line below.

Specs understood by :func:`get_backend`::

    "numpy"
    "cupy", "cupy:N"                          CUDA GPU N (default 0)
    "torch", "torch:cpu", "torch:cuda", "torch:cuda:N"
    "array_api_strict", "array_api_strict:device1"

The default backend is read from ``XPNET_BACKEND`` (else ``"numpy"``);
:func:`set_backend` changes it for the process and :func:`using_backend`
for a ``with`` block (scoped by a context variable, so it does not leak
between threads).
"""

from . import cupy_backend, numpy_backend, strict_backend, torch_backend  # noqa: F401 (each registers itself)
from .base import Backend, CapturedGraph, DeviceRNG, check_generator, seed_to_int
from .dispatch import accelerated, fused_kernels, namespace
from .registry import (
    backend_of,
    check_backend_spec,
    current_backend,
    get_backend,
    register_backend,
    registered_backends,
    set_backend,
    to_numpy,
    using_backend,
    valid_specs,
)

__all__ = [
    "accelerated",
    "namespace",
    "fused_kernels",
    "Backend",
    "CapturedGraph",
    "DeviceRNG",
    "check_generator",
    "backend_of",
    "check_backend_spec",
    "get_backend",
    "set_backend",
    "using_backend",
    "current_backend",
    "register_backend",
    "registered_backends",
    "seed_to_int",
    "to_numpy",
    "valid_specs",
]
