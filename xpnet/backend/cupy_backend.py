"""CuPy on a CUDA GPU: specs "cupy" and "cupy:N". Its arrays get the fused
kernels of :mod:`xpnet.backend.cupy_kernels`, and a training step can be
captured as a CUDA graph."""

from __future__ import annotations

from array_api_compat import is_cupy_array

from .base import Backend, CapturedGraph, DeviceRNG, seed_to_int
from .dispatch import accelerated
from .registry import import_library, register_backend


class CupyRNG(DeviceRNG):
    """``cupy.random.Generator``: draws happen on the GPU (and can be graph-captured)."""

    def __init__(self, backend, seed=None):
        self.backend, self.seed = backend, seed
        with backend.lib.cuda.Device(backend.device_index):
            self._gen = backend.lib.random.default_rng(seed_to_int(seed))

    def _draw_integers(self, low, high, shape):
        return self._gen.integers(low, high, size=shape, dtype=self.backend.lib.int64)

    def _draw_normal(self, shape, std, dtype):
        out = self._gen.standard_normal(size=shape, dtype=dtype)
        return out * std if std != 1.0 else out

    def _draw_uniform(self, shape, dtype):
        return self._gen.random(size=shape, dtype=dtype)

    def _draw_permutation(self, n):
        # cupy.random.Generator has no permutation: sort uniform keys instead.
        return self.backend.lib.argsort(self._gen.random(size=n)).astype(self.backend.lib.int64)


class CupyBackend(Backend):
    rng_class = CupyRNG
    is_gpu = True
    can_capture = True

    @property
    def device_index(self) -> int:
        return self.device.id

    @property
    def random_stream(self) -> str:
        return "cupy"

    def owns(self, x) -> bool:
        return isinstance(x, self.lib.ndarray) and x.device.id == self.device.id

    def _library_asarray(self, obj, dtype, copy):
        with self.device:
            out = self.lib.asarray(obj, dtype=dtype)
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

    def set_tf32(self, enabled: bool) -> None:
        """TF32 tensor cores for xpnet's float32 GEMMs (and so its convolutions) on this GPU.

        Off by default, so float32 results are exact; TF32 rounds the GEMM inputs to
        a 10-bit mantissa and is several times faster on Ampere and later GPUs."""
        kernels = accelerated(self.lib.empty(0))
        kernels.set_tf32(self.switch("set_tf32", enabled))
        kernels.prepare(self.device.id)

    def set_cudnn(self, enabled: bool) -> None:
        """Convolutions through cuDNN on this GPU (off by default: im2col + cuBLAS GEMMs).

        cuDNN comes from the nvidia-cudnn wheels (``pip install "xpnet[cudnn12]"``) or
        ``$XPNET_CUDNN_LIBRARY``; RuntimeError when it cannot be loaded."""
        kernels = accelerated(self.lib.empty(0))
        kernels.set_cudnn(self.switch("set_cudnn", enabled))
        with self.device:
            try:
                kernels.prepare(self.device.id)
            except Exception:
                kernels.set_cudnn(False)
                raise

    def set_conv_autotune(self, enabled: bool) -> None:
        """Time each way a convolution can run (the direct kernels for few taps, cuDNN where it
        loads, im2col + cuBLAS), forward and backward, the first time its shape, dtypes,
        memory order and TF32 setting run outside a graph capture, and keep the fastest.

        Off by default: the paths round differently, and timings decide between them, so the
        last bits of results may differ from run to run (as under PyTorch's
        ``cudnn.benchmark``). Run a step eagerly before capturing it, as ``cuda_graph=True``
        does, so that the timing happens then."""
        accelerated(self.lib.empty(0)).conv_paths.autotune = self.switch("set_conv_autotune", enabled)

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


def _parse_index(spec: str, text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"invalid device index {text!r} in backend spec {spec!r}")
    return int(text)


def make_cupy(spec: str) -> Backend:
    index = _parse_index(spec, spec.partition(":")[2] or "0")  # a malformed spec is wrong with or without CuPy
    lib = import_library("cupy", "cupy")
    try:
        count = lib.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or no device at all
        raise RuntimeError(f"backend {spec!r}: CuPy is installed but no CUDA GPU is visible ({exc})") from exc
    if count == 0:
        raise RuntimeError(f"backend {spec!r}: CuPy is installed but no CUDA GPU is visible")
    if index >= count:
        raise ValueError(f"backend {spec!r}: GPU {index} requested but only {count} visible")
    import array_api_compat.cupy as xp

    return CupyBackend(f"cupy:{index}", xp, lib.cuda.Device(index), lib)


def _kernels():
    from .cupy_kernels import CupyKernels

    return CupyKernels()


register_backend(
    "cupy",
    make_cupy,
    is_cupy_array,
    install_hint='CuPy is not installed. Install it with: pip install "xpnet[cuda12]" '
    '(CUDA 12) or pip install "xpnet[cuda13]" (CUDA 13).',
    spec_of=lambda x: f"cupy:{x.device.id}",
    specs=("cupy", "cupy:N"),
    kernels=_kernels,
)
