"""The table of backends: which spec prefixes exist, how each is built, which
arrays belong to it, and the default backend of the process or of a block.

A library joins with one call to :func:`register_backend` in its own module.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Backend

__all__ = [
    "register_backend",
    "registered_backends",
    "get_backend",
    "set_backend",
    "using_backend",
    "current_backend",
    "backend_of",
    "library_of",
    "to_numpy",
    "import_library",
    "valid_specs",
    "check_backend_spec",
]


@dataclass(frozen=True)
class Registration:
    """How one library becomes a backend.

    Attributes:
        prefix: the spec's library part, e.g. "cupy" in "cupy:1".
        factory: builds the Backend from a normalised spec (lower case, "-" as "_").
        is_array: whether an object is an array of this library (cheap: no import).
        spec_of: the spec of the backend an array of this library lives on.
        install_hint: what to tell a user who lacks the library.
        specs: the spec forms to list in messages.
        kernels: builds the fused kernels for this library's arrays (None: the array-API code).
        refuses: why arrays of a given type of this library cannot go into the layers (a
            subclass whose operators mean something else), or None where they can.
        one_device: whether the library's arrays all live on one device (NumPy's), so that the
            layers need not compare the devices of the arrays they are given.
    """

    prefix: str
    factory: Callable[[str], Backend]
    is_array: Callable[[object], bool]
    spec_of: Callable[[Any], str]
    install_hint: str
    specs: tuple
    kernels: Callable[[], object] | None = None
    refuses: Callable[[type], str | None] | None = None
    one_device: bool = False


_REGISTRY: dict[str, Registration] = {}


def register_backend(
    prefix: str,
    factory: Callable[[str], Backend],
    is_array: Callable[[object], bool],
    install_hint: str,
    spec_of: Callable[[Any], str] | None = None,
    specs: tuple = (),
    kernels: Callable[[], object] | None = None,
    refuses: Callable[[type], str | None] | None = None,
    one_device: bool = False,
) -> Registration:
    """Make ``prefix`` (and ``prefix:...``) a backend spec; returns the registration.

    ``factory(spec)`` builds the backend (raising ImportError when the library is
    missing: :func:`import_library` adds ``install_hint``); ``is_array(x)`` tells
    its arrays apart; ``spec_of(x)`` names the backend of such an array (default:
    ``prefix``); ``refuses(type)`` says why arrays of that type, though the library's, cannot
    go into the layers (None: they can); ``one_device`` says that all its arrays live on one
    device (the CPU's). Registering a prefix again replaces it.
    """
    registration = Registration(
        prefix=prefix,
        factory=factory,
        is_array=is_array,
        spec_of=spec_of or (lambda x: prefix),
        install_hint=install_hint,
        specs=tuple(specs) or (prefix,),
        kernels=kernels,
        refuses=refuses,
        one_device=one_device,
    )
    _REGISTRY[prefix] = registration
    with _CACHE_LOCK:
        for key in [k for k in _CACHE if k.partition(":")[0] == prefix]:
            del _CACHE[key]
    from . import dispatch

    dispatch.forget_kernels()
    dispatch.forget_namespaces()
    dispatch.forget_device_counts()
    return registration


def registered_backends() -> dict:
    """Prefix -> :class:`Registration`, in registration order."""
    return dict(_REGISTRY)


def valid_specs() -> tuple:
    return tuple(spec for registration in _REGISTRY.values() for spec in registration.specs)


def import_library(prefix: str, module: str):
    """``import module``, or ImportError carrying the install hint of backend ``prefix``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(_REGISTRY[prefix].install_hint) from exc


# --------------------------------------------------------------------------- construction
_CACHE: dict[str, Backend] = {}
_CACHE_LOCK = threading.Lock()


def _parse_spec(spec) -> tuple[str, str]:
    """(normalised spec, library prefix) of a spec string; TypeError or ValueError naming it."""
    if not isinstance(spec, str):
        raise TypeError(f"backend must be a spec string or a Backend, not {type(spec).__name__}")
    library, colon, device_part = spec.strip().lower().partition(":")
    library = library.replace("-", "_")  # array-api-strict, as pip spells it; not in 'cupy:-1'
    key = library + colon + device_part
    if library not in _REGISTRY:
        raise ValueError(f"unknown backend {spec!r}; valid backends: {', '.join(valid_specs())}")
    return key, library


def check_backend_spec(spec: str | Backend | None) -> None:
    """ValueError (or TypeError) unless ``spec`` is None, a Backend or names a registered
    library, without importing it: for work that makes its backend elsewhere (another process,
    another machine). The details after the prefix are the library's factory's to check."""
    if spec is not None and not isinstance(spec, Backend):
        _parse_spec(spec)


def get_backend(spec: str | Backend | None = None) -> Backend:
    """Return the :class:`Backend` for ``spec`` (None: the current default).

    A ``Backend`` passed in is returned as is. Raises ``ValueError`` for an
    unknown spec, ``ImportError`` (with an install command) for a library that
    is not installed and ``RuntimeError`` when CuPy finds no GPU.
    """
    if spec is None:
        return current_backend()
    if isinstance(spec, Backend):
        return spec
    key, library = _parse_spec(spec)
    with _CACHE_LOCK:
        if key not in _CACHE:
            backend = _REGISTRY[library].factory(key)
            # "cupy" and "cupy:0" are the same backend: share one object.
            _CACHE.setdefault(backend.name, backend)
            _CACHE[key] = _CACHE[backend.name]
        return _CACHE[key]


def backend_of(x) -> Backend:
    """The backend that array ``x`` belongs to (library and device)."""
    for registration in _REGISTRY.values():
        if registration.is_array(x):
            return get_backend(registration.spec_of(x))
    raise TypeError(f"arrays of type {type(x).__module__}.{type(x).__name__} are not supported by xpnet")


def library_of(x) -> str:
    """The prefix of the backend whose library ``x`` is an array of ("numpy" for any ndarray
    subclass, wherever it is defined), else the root of its type's module."""
    for registration in _REGISTRY.values():
        if registration.is_array(x):
            return registration.prefix
    return type(x).__module__.split(".")[0]


def to_numpy(x) -> np.ndarray:
    """Copy any supported array (or a Python/NumPy value) to NumPy on the host."""
    if isinstance(x, (np.ndarray, np.generic, int, float, bool)):
        return np.array(x, copy=True)
    return backend_of(x).to_numpy(x)


# --------------------------------------------------------------------------- the default backend
_PROCESS_DEFAULT: list[str | Backend | None] = [None]
_SCOPED: contextvars.ContextVar[Backend | None] = contextvars.ContextVar("xpnet_backend", default=None)


def current_backend() -> Backend:
    """The backend in force: a ``using_backend`` block, else set_backend, else $XPNET_BACKEND."""
    scoped = _SCOPED.get()
    if scoped is not None:
        return scoped
    spec = _PROCESS_DEFAULT[0]
    if spec is None:
        spec = os.environ.get("XPNET_BACKEND") or "numpy"
        if spec != "numpy":
            return _backend_from_environment(spec)
    return get_backend(spec)


def _backend_from_environment(spec: str) -> Backend:
    """get_backend(spec), its error naming $XPNET_BACKEND: set long ago in a shell's profile, an
    unknown or missing backend was reported as if the caller had asked for it."""
    try:
        return get_backend(spec)
    except (ValueError, ImportError, RuntimeError) as error:
        if type(error) not in (ValueError, ImportError, RuntimeError):  # a subclass may take other arguments
            raise
        raise type(error)(f"XPNET_BACKEND={spec!r} in the environment: {error}") from error


def set_backend(spec: str | Backend) -> Backend:
    """Make ``spec`` the default backend for the whole process; returns it."""
    backend = get_backend(spec)
    _PROCESS_DEFAULT[0] = backend
    return backend


@contextlib.contextmanager
def using_backend(spec: str | Backend) -> Iterator[Backend]:
    """``with using_backend("cupy"):`` makes it the default inside the block only.

    The choice lives in a context variable, and context variables are per thread:
    a thread started inside the block does not inherit it (it sees the process
    default). Pass ``backend=`` explicitly to work done in other threads, or
    enter ``using_backend`` in the thread itself.
    """
    backend = get_backend(spec)
    token = _SCOPED.set(backend)
    try:
        yield backend
    finally:
        _SCOPED.reset(token)
