"""array-api-strict, the standard's reference implementation, for testing:
specs "array_api_strict" (its CPU device) and "array_api_strict:device1".

Its second device keeps arrays off the "CPU", so any array the code moves to
the host by accident, or mixes across devices, fails loudly.
"""

from __future__ import annotations

import functools

import numpy as np

from .base import Backend
from .registry import import_library, register_backend

# Devices this backend answers for; another module may register array_api_strict's others.
DEVICES = ("CPU_DEVICE", "device1")


class StrictBackend(Backend):
    def owns(self, x) -> bool:
        return isinstance(x, self._array_type) and x.device == self.device

    @functools.cached_property
    def _array_type(self):
        return type(self.lib.asarray(0))

    def to_numpy(self, x):
        cpu = self.lib.Device("CPU_DEVICE")
        if x.device != cpu:
            x = x.to_device(cpu)
        return np.array(x, copy=True)


def make_strict(spec: str) -> Backend:
    lib = import_library("array_api_strict", "array_api_strict")
    device_name = spec.partition(":")[2] or "CPU_DEVICE"
    if device_name not in DEVICES:
        raise ValueError(
            f"unknown array_api_strict device {device_name!r} in {spec!r}: "
            "use 'array_api_strict' or 'array_api_strict:device1'"
        )
    name = "array_api_strict" if device_name == "CPU_DEVICE" else f"array_api_strict:{device_name}"
    return StrictBackend(name, lib, lib.Device(device_name), lib)


def is_strict_array(x, devices=DEVICES) -> bool:
    """An array_api_strict array on one of ``devices`` (without importing the library)."""
    if not type(x).__module__.startswith("array_api_strict"):
        return False
    return _device_name(x) in devices


def _device_name(x) -> str:
    # Device objects print as array_api_strict.Device('device1'): take the name inside.
    text = repr(x.device)
    return text[text.find("(") + 2 : -2]


def spec_of(x) -> str:
    name = _device_name(x)
    return "array_api_strict" if name == "CPU_DEVICE" else f"array_api_strict:{name}"


register_backend(
    "array_api_strict",
    make_strict,
    is_strict_array,
    install_hint="array-api-strict is not installed. Install it with: pip install array-api-strict "
    '(or pip install "xpnet[test]").',
    spec_of=spec_of,
    specs=("array_api_strict", "array_api_strict:device1"),
)
