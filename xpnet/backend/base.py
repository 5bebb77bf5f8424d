"""What every backend has: the :class:`Backend` (an array library on one device),
its :class:`DeviceRNG`, and :class:`CapturedGraph` for CUDA-graph replay.

A library's own module (``numpy_backend.py``, ``cupy_backend.py``, ...) subclasses
these where the library differs and registers itself with
:func:`xpnet.backend.registry.register_backend`.
"""

from __future__ import annotations

import numbers
import threading
from typing import Any

import numpy as np

__all__ = [
    "Backend",
    "DeviceRNG",
    "NumpyGlobalRNG",
    "check_generator",
    "CapturedGraph",
    "seed_to_int",
    "in_native_layout",
]


def seed_to_int(seed) -> int | None:
    """Fold an int or a sequence of ints into one 63-bit seed (None stays None).

    Libraries whose generators take a single integer seed (CuPy, PyTorch) get
    the same well-mixed value NumPy's SeedSequence would start from, so
    ``rng((seed, epoch))`` gives independent streams everywhere.
    """
    if seed is None:
        return None
    state = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def _is_int(value) -> bool:
    """An integer, Python's or NumPy's, that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_rng_seed(caller: str, seed) -> None:
    """ValueError naming ``caller`` unless ``seed`` is None, a non-negative integer or a non-empty
    sequence of them (NumPy's SeedSequence would refuse others without naming the call)."""
    if seed is None:
        return
    parts = seed if isinstance(seed, (tuple, list)) else (seed,)
    if not parts or not all(_is_int(v) and int(v) >= 0 for v in parts):
        raise ValueError(f"{caller}: seed must be None, a non-negative integer or a sequence of them, got {seed!r}")


# What NumPy makes of data that holds no numbers, by dtype kind.
_NON_NUMERIC_KINDS = {"U": "text", "S": "bytes", "O": "Python objects", "M": "dates", "m": "time spans", "V": "records"}


def _same_dtype(a, b) -> bool:
    """dtype equality that tolerates objects of unrelated libraries (False, not an error)."""
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except TypeError:
        return False


def in_native_layout(obj):
    """Host data as every library takes it. PyTorch refuses a NumPy array with a negative
    stride (``X[:, :, ::-1]``, a flip) or a non-native byte order (big-endian data read from a
    file); such an array is copied into C order and native bytes, any other object passes as is."""
    if isinstance(obj, np.ndarray) and (not obj.dtype.isnative or any(s < 0 for s in obj.strides)):
        return obj.astype(obj.dtype.newbyteorder("="), order="C")
    return obj


def foreign_array_on_host(obj) -> np.ndarray | None:
    """A host copy of ``obj`` when it is an array of a registered library (through that
    library's own transfer), else None. For arrays another library cannot take directly: NumPy
    refuses CuPy's and PyTorch's CUDA arrays and array-api-strict's device1 ones, each with an
    error of its own library."""
    from .registry import backend_of

    try:
        source = backend_of(obj)
    except TypeError:
        return None
    return source.to_numpy(obj)


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class DeviceRNG:
    """A random generator whose draws are arrays on the backend's device.

    ``seed`` is None (fresh entropy), an int, or a sequence of ints
    (e.g. ``(seed, epoch)``), which gives an independent, reproducible stream.
    The public methods check their arguments (so that every library refuses the same calls
    with the same words) and hand a shape tuple and the namespace's dtype to the ``_draw_*``
    methods. This base class draws with NumPy on the host and moves the result to the
    device; libraries with generators of their own override the four ``_draw_*`` methods.
    """

    def __init__(self, backend: Backend, seed=None):
        self.backend = backend
        self.seed = seed
        self._gen = np.random.default_rng(seed)

    # -- the public draws: arguments checked once, for every library -------------------
    def integers(self, low: int, high: int, size) -> Any:
        """Integers uniform in [low, high), shape ``size`` (an int or a tuple), dtype int64."""
        if not (_is_int(low) and _is_int(high)):
            raise TypeError(f"DeviceRNG.integers: low and high must be integers, got {low!r} and {high!r}")
        if not _INT64_MIN <= int(low) < int(high) <= _INT64_MAX:
            raise ValueError(f"DeviceRNG.integers: need low < high, both within int64, got low={low}, high={high}")
        return self._draw_integers(int(low), int(high), self._shape("integers", size))

    def normal(self, shape, std: float = 1.0, dtype=None) -> Any:
        """Normal(0, std²) samples of ``shape`` (an int or a tuple; dtype float32 or float64, default float64)."""
        if not isinstance(std, numbers.Real) or isinstance(std, bool) or not 0.0 <= float(std) < float("inf"):
            raise ValueError(f"DeviceRNG.normal: std must be a finite number >= 0, got {std!r}")
        return self._draw_normal(self._shape("normal", shape), float(std), self._float_dtype("normal", dtype))

    def uniform(self, shape, dtype=None) -> Any:
        """Uniform samples in [0, 1) of ``shape`` (an int or a tuple; dtype float32 or float64, default float64)."""
        return self._draw_uniform(self._shape("uniform", shape), self._float_dtype("uniform", dtype))

    def permutation(self, n: int) -> Any:
        """A random permutation of ``range(n)`` as an int64 array of shape (n,)."""
        if not _is_int(n) or n < 0:
            raise ValueError(f"DeviceRNG.permutation: n must be an integer >= 0, got {n!r}")
        return self._draw_permutation(int(n))

    @staticmethod
    def _shape(method: str, size) -> tuple[int, ...]:
        dims = (size,) if _is_int(size) else size
        if not isinstance(dims, (tuple, list)) or not all(_is_int(d) and d >= 0 for d in dims):
            raise ValueError(f"DeviceRNG.{method}: the shape must be an integer >= 0 or a tuple of them, got {size!r}")
        return tuple(int(d) for d in dims)

    def _float_dtype(self, method: str, dtype):
        try:
            xp_dtype = self.backend.dtype(dtype)  # None: float64
        except ValueError:
            xp_dtype = None
        if xp_dtype is None or not any(
            _same_dtype(xp_dtype, getattr(self.backend.xp, name)) for name in ("float32", "float64")
        ):
            raise ValueError(f"DeviceRNG.{method}: dtype must be float32 or float64, got {dtype!r}")
        return xp_dtype

    # -- the draws: NumPy's generator on the host, moved to the device ------------------
    def _draw_integers(self, low: int, high: int, shape: tuple[int, ...]) -> Any:
        return self.backend.asarray(self._gen.integers(low, high, size=shape, dtype=np.int64))

    def _draw_normal(self, shape: tuple[int, ...], std: float, dtype) -> Any:
        dt = self.backend.numpy_dtype(dtype)
        out = self._gen.standard_normal(shape, dtype=dt)
        if std != 1.0:
            out *= dt.type(std)
        return self.backend.asarray(out)

    def _draw_uniform(self, shape: tuple[int, ...], dtype) -> Any:
        return self.backend.asarray(self._gen.random(shape, dtype=self.backend.numpy_dtype(dtype)))

    def _draw_permutation(self, n: int) -> Any:
        return self.backend.asarray(self._gen.permutation(n).astype(np.int64))


def check_generator(name: str, rng, backend: Backend | None, owner: str, seed_hint: str) -> DeviceRNG:
    """``rng`` when it is a generator of ``backend``, the backend ``owner`` lives on (None: of any
    backend), else an error naming ``name``, with ``seed_hint`` (where a seed goes) for an int.
    A seed or NumPy's own Generator failed at the first draw ("'int' object has no attribute
    'normal'"), and another backend's generator drew on the wrong device."""
    if not isinstance(rng, DeviceRNG):
        seed_like = isinstance(rng, numbers.Integral) and not isinstance(rng, bool)
        raise TypeError(
            f"{name} must be a generator of the backend, backend.rng(seed), got {type(rng).__name__}"
            + (f"; {seed_hint}" if seed_like and seed_hint else "")
        )
    if backend is not None and rng.backend.name != backend.name:
        raise ValueError(
            f"{name} draws on backend {rng.backend.name!r} but {owner} lives on {backend.name!r}; "
            f"make it with get_backend({backend.name!r}).rng(seed)"
        )
    return rng


class NumpyGlobalRNG(DeviceRNG):
    """NumPy's global generator (``np.random.seed``, ``np.random.randn``): the shared generator of
    the backends that draw with NumPy on the host. A course notebook seeds it with
    ``np.random.seed(0)`` before building a model, and gets the weights the course printed."""

    def __init__(self, backend: Backend):
        self.backend, self.seed = backend, None

    def _host(self, values, dtype):
        """Draws made in float64, as the course's ``std * np.random.randn(...)``, then cast."""
        dt = self.backend.numpy_dtype(dtype)
        return self.backend.asarray(values if values.dtype == dt else values.astype(dt))

    def _draw_integers(self, low, high, shape):
        return self.backend.asarray(np.random.randint(low, high, size=shape, dtype=np.int64))

    def _draw_normal(self, shape, std, dtype):
        out = np.random.standard_normal(shape)
        return self._host(std * out if std != 1.0 else out, dtype)

    def _draw_uniform(self, shape, dtype):
        return self._host(np.random.random_sample(shape), dtype)

    def _draw_permutation(self, n):
        return self.backend.asarray(np.random.permutation(n).astype(np.int64))


class Backend:
    """An array library on one device.

    Attributes:
        name: the canonical spec, e.g. ``"numpy"``, ``"cupy:0"``.
        xp: the array API namespace (array-api-compat's wrapper where needed).
        device: the device object that ``xp`` functions take as ``device=``.
        lib: the underlying library module (numpy, cupy, torch, array_api_strict).
    """

    rng_class: type[DeviceRNG] = DeviceRNG
    is_gpu = False
    can_capture = False
    # Whether a chain of elementwise operations on a large array runs faster a cache-sized block
    # of rows at a time (xpnet.cache_blocks): where each operation costs about a microsecond to
    # call (NumPy), yes; on a GPU each is a launch, and PyTorch's CPU tensors and array-api-strict
    # cost more per call than the cache saves (Adam 1.3-2.9x and 2.5x slower in blocks).
    cache_blocks = False

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

    def __reduce__(self):
        # A backend is a handle on a library and a device, one object per spec in a process:
        # a copied or unpickled model names its backend, and gets the process's object back.
        from .registry import get_backend

        return get_backend, (self.name,)

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
        on the CPU) unless ``copy=True``. Data that makes no array (a ragged list) is a
        ValueError, and data that makes no array of numbers or booleans (strings, None,
        other objects, which NumPy would keep as an object or string array) a TypeError.
        """
        dt = None if dtype is None else self.dtype(dtype)
        try:
            out = self._library_asarray(in_native_layout(obj), dt, copy)
        except (TypeError, RuntimeError, ValueError) as error:
            # Another library's array (CuPy's, PyTorch's on CUDA) goes through the host.
            host = None if isinstance(obj, np.ndarray) else foreign_array_on_host(obj)
            if host is None:
                raise self._conversion_error(obj, error) from error
            out = self._library_asarray(host, dt, None)
        if not self.xp.isdtype(out.dtype, ("bool", "numeric")):
            raise self._conversion_error(obj, None)
        return out

    def _conversion_error(self, obj, error: Exception | None) -> Exception:
        """The same error whichever library refused ``obj``: a TypeError for data of no numeric
        type (strings, None, other objects, which NumPy keeps as string or object arrays), a
        ValueError naming the library's complaint for anything else (a ragged list)."""
        what = type(obj).__name__
        try:
            kind = np.asarray(obj).dtype.kind
        except (TypeError, ValueError):
            kind = "b"  # no array at all: the library's own words say why
        if kind not in "biufc":
            held = _NON_NUMERIC_KINDS.get(kind, "values of no numeric type")
            return TypeError(f"{self.name} backend: arrays hold numbers or booleans, got a {what} of {held}")
        return ValueError(f"{self.name} backend: cannot make an array of this {what}: {error}")

    def _library_asarray(self, obj, dtype, copy):
        """The library's own conversion of ``obj`` to an array on this device."""
        return self.xp.asarray(obj, dtype=dtype, device=self.device, copy=copy)

    def to_numpy(self, x) -> np.ndarray:
        """Copy an array of this backend to a NumPy array on the host.

        This (with :meth:`to_floats`) is how array data reaches the host in xpnet. Always a
        copy, on every backend: np.asarray shared NumPy's memory (and PyTorch's CPU tensors',
        array-api-strict's), so a model's state_dict() changed with the next update on those
        backends only.
        """
        return np.array(x, copy=True)

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
        check_rng_seed("Backend.rng", seed)
        return self.rng_class(self, seed)

    @property
    def random_stream(self) -> str:
        """Names the generator behind :meth:`rng`: backends that share the name draw the same numbers
        from a seed; "numpy" for those that draw with NumPy on the host."""
        return "numpy" if self.rng_class is DeviceRNG else self.rng_class.__qualname__

    def default_rng(self) -> DeviceRNG:
        """The backend's shared generator, for code that is given none (course-style calls): NumPy's
        global one (:class:`NumpyGlobalRNG`) where the backend draws with NumPy, else one of its own."""
        with self._rng_lock:
            if self._default_rng is None:
                self._default_rng = NumpyGlobalRNG(self) if self.random_stream == "numpy" else self.rng()
            return self._default_rng

    def seed(self, seed) -> None:
        """Re-seed the backend's shared generator (where that is NumPy's global one: ``np.random.seed``)."""
        check_rng_seed("Backend.seed", seed)
        if self.random_stream == "numpy":
            np.random.seed(seed)
            return
        with self._rng_lock:
            self._default_rng = self.rng(seed)

    def owns(self, x) -> bool:
        """Whether ``x`` is an array of this backend's library on this device."""
        from .registry import backend_of

        try:
            return backend_of(x) == self
        except TypeError:
            return False

    # -- precision -----------------------------------------------------------------
    @staticmethod
    def switch(method: str, enabled) -> bool:
        """``enabled`` as True or False, or a ValueError naming ``method``: a string is truthy,
        and set_tf32("False") on CuPy switched TF32 on."""
        from ..input_checks import check_flag  # input_checks imports this package

        return check_flag(f"{method}: enabled", enabled)

    def set_tf32(self, enabled: bool) -> None:
        """Let float32 matrix products use TF32 tensor cores (CUDA backends); off by default."""
        if self.switch("set_tf32", enabled):
            raise ValueError(f"TF32 applies to CUDA GPUs; backend {self.name!r} computes float32 exactly")

    def set_cudnn(self, enabled: bool) -> None:
        """Run convolutions through cuDNN (CUDA backends with cuDNN installed); off by default."""
        if self.switch("set_cudnn", enabled):
            raise ValueError(f"cuDNN applies to CUDA GPUs; backend {self.name!r} has no cuDNN path")

    def set_conv_autotune(self, enabled: bool) -> None:
        """Time each way a convolution can run the first time its shape runs, and keep the
        fastest (CUDA backends); off by default."""
        if self.switch("set_conv_autotune", enabled):
            raise ValueError(f"convolution autotuning applies to CUDA GPUs; backend {self.name!r} has one path")

    # -- CUDA graphs -------------------------------------------------------------
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
