"""Backend selection: the one module that names NumPy, CuPy, PyTorch or array-api-strict.

Everything else in xpnet works on ``backend.xp``, the array API namespace, and
reaches the library-specific parts (which device, random numbers, moving data
to and from the host, synchronisation) only through a :class:`Backend`.

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

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
from array_api_compat import array_namespace

__all__ = [
    "accelerated",
    "namespace",
    "fused_kernels",
    "Backend",
    "DeviceRNG",
    "backend_of",
    "get_backend",
    "set_backend",
    "using_backend",
    "current_backend",
    "VALID_SPECS",
]

VALID_SPECS = (
    "numpy",
    "cupy",
    "cupy:N",
    "torch",
    "torch:cpu",
    "torch:cuda",
    "torch:cuda:N",
    "array_api_strict",
    "array_api_strict:device1",
)

_INSTALL_HINTS = {
    "cupy": 'CuPy is not installed. Install it with: pip install "xpnet[cuda12]" '
    '(CUDA 12) or pip install "xpnet[cuda13]" (CUDA 13).',
    "torch": "PyTorch is not installed. Install it with: pip install torch",
    "array_api_strict": "array-api-strict is not installed. Install it with: "
    'pip install array-api-strict (or pip install "xpnet[test]").',
}


def _seed_to_int(seed) -> int | None:
    """Fold an int or a sequence of ints into one 63-bit seed (None stays None).

    Libraries whose generators take a single integer seed (CuPy, PyTorch) get
    the same well-mixed value NumPy's SeedSequence would start from, so
    ``rng((seed, epoch))`` gives independent streams everywhere.
    """
    if seed is None:
        return None
    state = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def _same_dtype(a, b) -> bool:
    """dtype equality that tolerates objects of unrelated libraries (False, not an error)."""
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except TypeError:
        return False


# --------------------------------------------------------------------------
# Random generators living on the backend's device
# --------------------------------------------------------------------------
class DeviceRNG:
    """A random generator whose draws are arrays on the backend's device.

    ``seed`` is None (fresh entropy), an int, or a sequence of ints
    (e.g. ``(seed, epoch)``), which gives an independent, reproducible stream.
    """

    def __init__(self, backend: "Backend", seed=None):
        self.backend = backend
        self.seed = seed

    def integers(self, low: int, high: int, size) -> Any:
        """Integers uniform in [low, high), shape ``size``, dtype int64."""
        raise NotImplementedError

    def normal(self, shape, std: float = 1.0, dtype=None) -> Any:
        """Normal(0, std²) samples of ``shape`` (dtype default float64)."""
        raise NotImplementedError

    def uniform(self, shape, dtype=None) -> Any:
        """Uniform samples in [0, 1) of ``shape`` (dtype default float64)."""
        raise NotImplementedError

    def permutation(self, n: int) -> Any:
        """A random permutation of ``range(n)`` as an int64 array of shape (n,)."""
        raise NotImplementedError


class _NumpyRNG(DeviceRNG):
    """NumPy ``Generator``; also draws on the host for array-api-strict."""

    def __init__(self, backend, seed=None):
        super().__init__(backend, seed)
        self._gen = np.random.default_rng(seed)

    def _np_dtype(self, dtype):
        return np.float64 if dtype is None else self.backend.numpy_dtype(dtype)

    def _move(self, a):
        return self.backend.asarray(a)

    def integers(self, low, high, size):
        return self._move(self._gen.integers(low, high, size=size, dtype=np.int64))

    def normal(self, shape, std=1.0, dtype=None):
        dt = self._np_dtype(dtype)
        out = self._gen.standard_normal(shape, dtype=dt)
        if std != 1.0:
            out *= dt.type(std)
        return self._move(out)

    def uniform(self, shape, dtype=None):
        return self._move(self._gen.random(shape, dtype=self._np_dtype(dtype)))

    def permutation(self, n):
        return self._move(self._gen.permutation(n).astype(np.int64))


class _CupyRNG(DeviceRNG):
    """``cupy.random.Generator``: draws happen on the GPU (and can be graph-captured)."""

    def __init__(self, backend, seed=None):
        super().__init__(backend, seed)
        cp = backend.lib
        with backend.lib.cuda.Device(backend.device_index):
            self._gen = cp.random.default_rng(_seed_to_int(seed))

    def _dt(self, dtype):
        return self.backend.lib.float64 if dtype is None else dtype

    def integers(self, low, high, size):
        return self._gen.integers(low, high, size=size, dtype=self.backend.lib.int64)

    def normal(self, shape, std=1.0, dtype=None):
        out = self._gen.standard_normal(size=shape, dtype=self._dt(dtype))
        return out * std if std != 1.0 else out

    def uniform(self, shape, dtype=None):
        return self._gen.random(size=shape, dtype=self._dt(dtype))

    def permutation(self, n):
        # cupy.random.Generator has no permutation: sort uniform keys instead.
        return self.backend.lib.argsort(self._gen.random(size=n)).astype(self.backend.lib.int64)


class _TorchRNG(DeviceRNG):
    """``torch.Generator`` on the backend's device."""

    def __init__(self, backend, seed=None):
        super().__init__(backend, seed)
        torch = backend.lib
        self._gen = torch.Generator(device=backend.device)
        if seed is None:
            self._gen.seed()
        else:
            self._gen.manual_seed(_seed_to_int(seed))

    def _kw(self, dtype):
        torch = self.backend.lib
        return dict(
            generator=self._gen,
            device=self.backend.device,
            dtype=torch.float64 if dtype is None else dtype,
        )

    def integers(self, low, high, size):
        torch = self.backend.lib
        size = (size,) if isinstance(size, int) else tuple(size)
        return torch.randint(low, high, size, generator=self._gen, device=self.backend.device, dtype=torch.int64)

    def normal(self, shape, std=1.0, dtype=None):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        out = self.backend.lib.randn(shape, **self._kw(dtype))
        return out * std if std != 1.0 else out

    def uniform(self, shape, dtype=None):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return self.backend.lib.rand(shape, **self._kw(dtype))

    def permutation(self, n):
        torch = self.backend.lib
        return torch.randperm(n, generator=self._gen, device=self.backend.device)


# --------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------
class Backend:
    """An array library on one device.

    Attributes:
        name: the canonical spec, e.g. ``"numpy"``, ``"cupy:0"``.
        xp: the array API namespace (array-api-compat's wrapper where needed).
        device: the device object that ``xp`` functions take as ``device=``.
        lib: the underlying library module (numpy, cupy, torch, array_api_strict).
    """

    _rng_class = _NumpyRNG
    is_gpu = False

    def __init__(self, name: str, xp, device, lib):
        self.name = name
        self.xp = xp
        self.device = device
        self.lib = lib
        self._default_rng: DeviceRNG | None = None
        self._rng_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Backend({self.name!r}, device={self.device!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Backend) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    # -- dtypes --------------------------------------------------------------
    def dtype(self, spec):
        """The namespace's dtype for ``spec``: "float32", np.float32, np.dtype(...) or an xp dtype."""
        if spec is None:
            return self.xp.float64
        for name in ("float32", "float64", "int32", "int64", "bool", "uint8"):
            if (spec == name) if isinstance(spec, str) else _same_dtype(spec, getattr(self.xp, name)):
                return getattr(self.xp, name)
        try:
            name = np.dtype(spec).name
        except TypeError:
            name = None
        if name is None or not hasattr(self.xp, name):
            raise ValueError(f"unsupported dtype {spec!r}: use 'float32' or 'float64' (or the matching numpy dtype)")
        return getattr(self.xp, name)

    def numpy_dtype(self, dtype) -> np.dtype:
        """The NumPy dtype matching an xp dtype (or any spec :meth:`dtype` accepts)."""
        xp_dtype = self.dtype(dtype)
        for name in ("float32", "float64", "int32", "int64", "bool", "uint8"):
            if _same_dtype(xp_dtype, getattr(self.xp, name)):
                return np.dtype(name)
        raise ValueError(f"no NumPy dtype for {dtype!r}")

    # -- moving data ---------------------------------------------------------
    def asarray(self, obj, dtype=None, copy=None):
        """Host data (or an array of this backend) as an array on this backend's device.

        As with ``xp.asarray``, the result may share memory with ``obj`` (NumPy
        on the CPU) unless ``copy=True``.
        """
        dt = None if dtype is None else self.dtype(dtype)
        return self.xp.asarray(obj, dtype=dt, device=self.device, copy=copy)

    def to_numpy(self, x) -> np.ndarray:
        """Copy an array of this backend to a NumPy array on the host.

        This is the one function in xpnet that moves array data to the host.
        """
        return np.asarray(x)

    def to_floats(self, scalars) -> list:
        """A list of 0-d arrays of this backend as Python floats, in one transfer."""
        if not scalars:
            return []
        xp = self.xp
        stacked = xp.stack([xp.astype(xp.reshape(s, ()), xp.float64) for s in scalars])
        return [float(v) for v in self.to_numpy(stacked)]

    def sync(self) -> None:
        """Wait until all queued work on the device has finished."""

    @property
    def device_name(self) -> str:
        """A human-readable name of the device (CPU model or GPU name)."""
        import platform

        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()

    # -- random numbers --------------------------------------------------------
    def rng(self, seed=None) -> DeviceRNG:
        """A new generator on this device; ``seed`` is None, an int or a sequence of ints."""
        return self._rng_class(self, seed)

    def default_rng(self) -> DeviceRNG:
        """The backend's shared generator (used where no seed is given)."""
        with self._rng_lock:
            if self._default_rng is None:
                self._default_rng = self.rng()
            return self._default_rng

    def seed(self, seed) -> None:
        """Re-seed the backend's shared generator (like ``np.random.seed``)."""
        with self._rng_lock:
            self._default_rng = self.rng(seed)

    def owns(self, x) -> bool:
        """Whether ``x`` is an array of this backend's library on this device."""
        try:
            return backend_of(x) == self
        except TypeError:
            return False

    # -- CUDA graphs -------------------------------------------------------------
    can_capture = False

    def capture(self, fn):
        """Record ``fn()`` (device work only) as a CUDA graph; see :class:`CapturedGraph`."""
        raise NotImplementedError(
            f"backend {self.name!r} cannot capture CUDA graphs; cuda_graph=True needs the cupy backend"
        )


class CapturedGraph:
    """A recorded CUDA graph, the memory its intermediates live in, and ``fn``'s outputs.

    ``replay()`` runs the recorded work again on the current stream: the outputs
    (and any array updated in place) then hold the new results.
    """

    def __init__(self, graph, pool, outputs):
        self._graph = graph
        self._pool = pool  # private to this graph: nothing else may reuse its memory
        self.outputs = outputs

    def replay(self):
        self._graph.launch()
        return self.outputs


class _NumpyBackend(Backend):
    def owns(self, x) -> bool:
        return type(x) is np.ndarray


class _StrictBackend(Backend):
    def owns(self, x) -> bool:
        return isinstance(x, self._array_type) and x.device == self.device

    @functools.cached_property
    def _array_type(self):
        return type(self.lib.asarray(0))

    def to_numpy(self, x):
        cpu = self.lib.Device("CPU_DEVICE")
        if x.device != cpu:
            x = x.to_device(cpu)
        return np.asarray(x)


class _CupyBackend(Backend):
    _rng_class = _CupyRNG
    is_gpu = True

    @property
    def device_index(self) -> int:
        return self.device.id

    def owns(self, x) -> bool:
        return isinstance(x, self.lib.ndarray) and x.device.id == self.device.id

    def asarray(self, obj, dtype=None, copy=None):
        dt = None if dtype is None else self.dtype(dtype)
        with self.device:
            out = self.lib.asarray(obj, dtype=dt)
            # cupy.asarray copies host data anyway; copy device arrays when asked.
            return out.copy() if copy and out is obj else out

    def to_numpy(self, x):
        return self.lib.asnumpy(x)

    def sync(self):
        self.device.synchronize()

    @property
    def device_name(self) -> str:
        props = self.lib.cuda.runtime.getDeviceProperties(self.device.id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    can_capture = True

    def capture(self, fn):
        cp = self.lib
        with self.device:
            accelerated(cp.empty(0)).prepare(self.device.id)  # cuBLAS handle and workspace, before capturing
        pool = cp.cuda.MemoryPool()
        stream = cp.cuda.Stream(non_blocking=True)
        with self.device, cp.cuda.using_allocator(pool.malloc), stream:
            stream.begin_capture()
            try:
                outputs = fn()
            except BaseException as exc:
                try:
                    stream.end_capture()
                except Exception:
                    pass
                raise RuntimeError(f"capturing a CUDA graph failed: {exc}") from exc
            graph = stream.end_capture()
        return CapturedGraph(graph, pool, outputs)


class _TorchBackend(Backend):
    _rng_class = _TorchRNG

    @property
    def is_gpu(self):
        return self.device.type == "cuda"

    def to_numpy(self, x):
        return x.detach().cpu().numpy()

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return self.lib.cuda.get_device_name(self.device)
        return super().device_name

    def sync(self):
        if self.device.type == "cuda":
            self.lib.cuda.synchronize(self.device)


# --------------------------------------------------------------------------
# Construction from a spec
# --------------------------------------------------------------------------
_CACHE: dict[str, Backend] = {}
_CACHE_LOCK = threading.Lock()


def _import(libname: str):
    import importlib

    try:
        return importlib.import_module(libname)
    except ImportError as exc:
        raise ImportError(_INSTALL_HINTS[libname]) from exc


def _parse_index(spec: str, text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"invalid device index {text!r} in backend spec {spec!r}")
    return int(text)


def _make_numpy(spec: str) -> Backend:
    import array_api_compat.numpy as xp

    device = spec.partition(":")[2]
    if device not in ("", "cpu"):
        raise ValueError(f"backend {spec!r}: NumPy runs on the CPU only and has no device {device!r}; use 'numpy'")

    return _NumpyBackend("numpy", xp, "cpu", np)


def _make_strict(spec: str) -> Backend:
    lib = _import("array_api_strict")
    device_name = spec.partition(":")[2] or "CPU_DEVICE"
    try:
        device = lib.Device(device_name)
    except ValueError as exc:
        raise ValueError(
            f"unknown array_api_strict device {device_name!r} in {spec!r}: "
            "use 'array_api_strict' or 'array_api_strict:device1'"
        ) from exc
    name = "array_api_strict" if device_name == "CPU_DEVICE" else f"array_api_strict:{device_name}"
    return _StrictBackend(name, lib, device, lib)


def _make_cupy(spec: str) -> Backend:
    lib = _import("cupy")
    index = _parse_index(spec, spec.partition(":")[2] or "0")
    try:
        count = lib.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or no device at all
        raise RuntimeError(f"backend {spec!r}: CuPy is installed but no CUDA GPU is visible ({exc})") from exc
    if count == 0:
        raise RuntimeError(f"backend {spec!r}: CuPy is installed but no CUDA GPU is visible")
    if index >= count:
        raise ValueError(f"backend {spec!r}: GPU {index} requested but only {count} visible")
    import array_api_compat.cupy as xp

    return _CupyBackend(f"cupy:{index}", xp, lib.cuda.Device(index), lib)


def _make_torch(spec: str) -> Backend:
    torch = _import("torch")
    import array_api_compat.torch as xp

    where = spec.partition(":")[2] or "cpu"
    if where.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"backend {spec!r}: PyTorch sees no CUDA GPU")
        index = _parse_index(spec, where.partition(":")[2] or "0")
        device = torch.device("cuda", index)
    elif where == "cpu":
        device = torch.device("cpu")
    else:
        raise ValueError(f"unknown torch device {where!r} in {spec!r}: use cpu, cuda or cuda:N")
    return _TorchBackend(f"torch:{device}", xp, device, torch)


_FACTORIES = {
    "numpy": _make_numpy,
    "cupy": _make_cupy,
    "torch": _make_torch,
    "array_api_strict": _make_strict,
}


def get_backend(spec: "str | Backend | None" = None) -> Backend:
    """Return the :class:`Backend` for ``spec`` (None: the current default).

    A ``Backend`` passed in is returned as is. Raises ``ValueError`` for an
    unknown spec, ``ImportError`` (with an install command) for a library that
    is not installed and ``RuntimeError`` when CuPy finds no GPU.
    """
    if spec is None:
        return current_backend()
    if isinstance(spec, Backend):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"backend must be a spec string or a Backend, not {type(spec).__name__}")
    key = spec.strip().lower().replace("-", "_")
    library = key.partition(":")[0]
    if library not in _FACTORIES:
        raise ValueError(f"unknown backend {spec!r}; valid backends: {', '.join(VALID_SPECS)}")
    with _CACHE_LOCK:
        if key not in _CACHE:
            backend = _FACTORIES[library](key)
            # "cupy" and "cupy:0" are the same backend: share one object.
            _CACHE.setdefault(backend.name, backend)
            _CACHE[key] = _CACHE[backend.name]
        return _CACHE[key]


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
    return get_backend(spec)


def set_backend(spec: "str | Backend") -> Backend:
    """Make ``spec`` the default backend for the whole process; returns it."""
    backend = get_backend(spec)
    _PROCESS_DEFAULT[0] = backend
    return backend


@contextlib.contextmanager
def using_backend(spec: "str | Backend") -> Iterator[Backend]:
    """``with using_backend("cupy"):`` makes it the default inside the block only.

    The choice lives in a context variable, and context variables are per thread:
    a thread started inside the block does not inherit it (it sees the process
    default). Pass ``backend=`` explicitly to work done in other threads, or
    enter ``using_backend`` in the thread itself.
    """
    token = _SCOPED.set(get_backend(spec))
    try:
        yield _SCOPED.get()
    finally:
        _SCOPED.reset(token)


# --------------------------------------------------------------------------
# Fused kernels: CuPy arrays get them, everything else the array-API reference
# --------------------------------------------------------------------------
_ACCELERATORS: dict = {}
_FUSED = contextvars.ContextVar("xpnet_fused_kernels", default=True)


def accelerated(x):
    """Fused kernels for arrays like ``x`` (CuPy's), or None: then use the array-API code.

    A dict lookup on the array's type, so the reference path pays next to nothing.
    """
    if not _FUSED.get():
        return None
    kind = type(x)
    try:
        return _ACCELERATORS[kind]
    except KeyError:
        kernels = None
        if kind.__module__.startswith("cupy"):
            from .cupy_kernels import CupyKernels

            kernels = CupyKernels()
        return _ACCELERATORS.setdefault(kind, kernels)


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
    """``array_namespace(*arrays)``, cached by array type (the layers call it on every step)."""
    kind = type(arrays[0])
    xp = _NAMESPACES.get(kind)
    if xp is not None and all(type(a) is kind for a in arrays):
        return xp
    xp = array_namespace(*arrays)
    if all(type(a) is kind for a in arrays):
        _NAMESPACES[kind] = xp
    return xp


def backend_of(x) -> Backend:
    """The backend that array ``x`` belongs to (library and device)."""
    xp = array_namespace(x)
    module = xp.__name__
    if module.startswith("array_api_strict"):
        for name in ("device1", "device2"):
            if x.device == xp.Device(name):
                return get_backend(f"array_api_strict:{name}")
        return get_backend("array_api_strict")
    if module.startswith("array_api_compat.numpy") or module == "numpy":
        return get_backend("numpy")
    if module.startswith("array_api_compat.cupy") or module == "cupy":
        return get_backend(f"cupy:{x.device.id}")
    if module.startswith("array_api_compat.torch") or module == "torch":
        return get_backend(f"torch:{x.device}")
    raise TypeError(f"arrays of {module} are not supported by xpnet")


def to_numpy(x) -> np.ndarray:
    """Copy any supported array (or a Python/NumPy value) to NumPy on the host."""
    if isinstance(x, (np.ndarray, np.generic, int, float, bool)):
        return np.asarray(x)
    return backend_of(x).to_numpy(x)
