"""NumPy on the CPU: spec "numpy" (or "numpy:cpu").

Importing it keeps freed host buffers in the process (see :mod:`.host_allocator`).
"""

from __future__ import annotations

import numpy as np
from array_api_compat import is_numpy_array

from .base import Backend
from .host_allocator import keep_freed_buffers
from .registry import register_backend


class NumpyBackend(Backend):
    cache_blocks = True

    def owns(self, x) -> bool:
        return type(x) is np.ndarray


def make_numpy(spec: str) -> Backend:
    import array_api_compat.numpy as xp

    device = spec.partition(":")[2]
    if device not in ("", "cpu"):
        raise ValueError(f"backend {spec!r}: NumPy runs on the CPU only and has no device {device!r}; use 'numpy'")
    return NumpyBackend("numpy", xp, "cpu", np)


def refused_subclass(kind: type) -> str | None:
    """Why arrays of NumPy subclass ``kind`` cannot go into the layers, or None. The layers'
    ``*`` and ``**`` are elementwise: np.matrix's are matrix products, which on square
    arrays give wrong numbers without an error; a masked array's mask would be ignored."""
    if issubclass(kind, np.matrix):
        return "np.matrix's * and ** are matrix products; np.asarray(...) makes the plain array the layers expect"
    if issubclass(kind, np.ma.MaskedArray):
        return "the layers do not honour masks; fill the masked values first (.filled(0)) or take np.asarray(...)"
    return None


register_backend(
    "numpy",
    make_numpy,
    is_numpy_array,
    install_hint="NumPy is not installed: pip install numpy",
    refuses=refused_subclass,
    one_device=True,
)
keep_freed_buffers()
