"""Per-call dispatch on the array type: the array namespace, and the fused kernels
a library registered (CuPy's), or None where the array-API code runs."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from array_api_compat import array_namespace

__all__ = [
    "accelerated",
    "fused_kernels",
    "namespace",
    "forget_kernels",
    "forget_namespaces",
    "refusal",
    "on_one_device",
    "forget_device_counts",
]

_ACCELERATORS: dict = {}
_FUSED = contextvars.ContextVar("xpnet_fused_kernels", default=True)


def accelerated(x):
    """Fused kernels for arrays like ``x``, or None: then use the array-API code.

    A dict lookup on the array's type, so the reference path pays next to nothing.
    """
    if not _FUSED.get():
        return None
    kind = type(x)
    try:
        return _ACCELERATORS[kind]
    except KeyError:
        from .registry import registered_backends

        kernels = None
        for registration in registered_backends().values():
            if registration.kernels is not None and registration.is_array(x):
                kernels = registration.kernels()
                break
        return _ACCELERATORS.setdefault(kind, kernels)


def forget_kernels() -> None:
    """Drop the per-type cache (after a registration changes)."""
    _ACCELERATORS.clear()


@contextlib.contextmanager
def fused_kernels(enabled: bool) -> Iterator[None]:
    """``with fused_kernels(False):`` runs the array-API reference code on every backend."""
    token = _FUSED.set(bool(enabled))
    try:
        yield
    finally:
        _FUSED.reset(token)


_NAMESPACES: dict = {}


def namespace(*arrays):
    """``array_namespace(*arrays)``, cached by array type (the layers call it on every step).

    Raises TypeError for an array type its library refuses (:func:`refusal`); such types are
    never cached, so they are refused on every call.
    """
    kind = type(arrays[0])
    xp = _NAMESPACES.get(kind)
    if xp is not None:
        for a in arrays:  # a loop, not all(...): its generator cost more than the lookup it guards
            if type(a) is not kind:
                break
        else:
            return xp
    for a in arrays:
        reason = refusal(a)
        if reason is not None:
            raise TypeError(f"arrays of type {type(a).__module__}.{type(a).__name__}: {reason}")
    xp = array_namespace(*arrays)
    if all(type(a) is kind for a in arrays):
        _NAMESPACES[kind] = xp
    return xp


def refusal(x) -> str | None:
    """Why ``x``, though an array of a registered library, cannot go into the layers (a
    subclass whose operators mean something else, as np.matrix's ``*``), or None."""
    from .registry import registered_backends

    for registration in registered_backends().values():
        if registration.refuses is not None and registration.is_array(x):
            return registration.refuses(type(x))
    return None


def forget_namespaces() -> None:
    """Drop the per-type namespace cache (after a registration changes what is refused)."""
    _NAMESPACES.clear()


_ONE_DEVICE: dict = {}


def on_one_device(x) -> bool:
    """Whether every array of ``x``'s type lives on one device (NumPy's, on the CPU), so that
    arrays of that type need no comparison of devices. A dict lookup on the type: the layers
    ask on every call, and an array's ``.device`` costs NumPy about 0.3 µs."""
    kind = type(x)
    try:
        return _ONE_DEVICE[kind]
    except KeyError:
        from .registry import registered_backends

        one = any(r.one_device and r.is_array(x) for r in registered_backends().values())
        return _ONE_DEVICE.setdefault(kind, one)


def forget_device_counts() -> None:
    """Drop the per-type cache of :func:`on_one_device` (after a registration changes)."""
    _ONE_DEVICE.clear()
