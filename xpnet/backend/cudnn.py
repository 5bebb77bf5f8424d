"""cuDNN's convolutions for CuPy arrays, through cuDNN's C API (ctypes).

An optional path beside im2col + cuBLAS (``CupyBackend.set_cudnn(True)``): CuPy 14
has no cuDNN bindings of its own, so this module loads ``libcudnn.so.9`` itself,
from ``$XPNET_CUDNN_LIBRARY``, the copy already loaded in the process (PyTorch's),
the ``nvidia-cudnn-cu12``/``-cu13`` wheel (``pip install "xpnet[cudnn12]"``), or the
system's. It uses cuDNN's legacy convolution API (still in cuDNN 9): one descriptor
set per geometry, the fastest algorithm found by timing them all the first time a
geometry runs (as PyTorch's ``cudnn.benchmark=True``, with as large a workspace as it
may need, up to 1 GiB), and a workspace that grows to what the chosen algorithms need
and whose earlier buffers stay allocated, so that calls recorded in a CUDA graph keep
valid pointers. float32 is exact (FMA math) unless TF32
is switched on, float64 is supported, and float16 tensors are convolved with float32
sums on tensor cores; tensors are NCHW and C-contiguous.

The descriptor code needs no GPU, so tests check it wherever the library is installed.
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading

__all__ = ["ConvolutionPlan", "CudnnConvolutions", "find_library"]

# cuDNN enums (cudnn_graph.h, cudnn_cnn.h)
_DATA_TYPES = {"f": 0, "d": 1, "e": 2}  # CUDNN_DATA_FLOAT, CUDNN_DATA_DOUBLE, CUDNN_DATA_HALF
_FLOAT = _DATA_TYPES["f"]
_NCHW = 0
_CROSS_CORRELATION = 1
# cudnnMathType_t. As PyTorch sets them: float16 TENSOR_OP; float32 with TF32 DEFAULT (TENSOR_OP
# does not convert float32 operands to TF32); exact float32 (and float64) FMA.
_DEFAULT_MATH, _TENSOR_OP_MATH, _FMA_MATH = 0, 1, 3
_TENSOR_OP_MATHS = (1, 2)  # CUDNN_TENSOR_OP_MATH, CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION
_WORKSPACE_BYTES = 64 * 1024 * 1024  # the workspace to start with
# The search may time algorithms that need up to this much (less when the device lacks it):
# at batch 1024 the fastest ones often need more than the starting workspace.
_SEARCH_BYTES = 1024 * 1024 * 1024
_MAX_ALGORITHMS = 8
# direction: (the cuDNN name part, the plan's descriptors of its two operands and of its result),
# in the order of cuDNN's arguments
_DIRECTIONS = {
    "fwd": ("Forward", "x", "w", "y"),
    "bwd_data": ("BackwardData", "w", "y", "x"),
    "bwd_filter": ("BackwardFilter", "x", "y", "w"),
}


class _AlgoPerf(ctypes.Structure):
    """cudnnConvolution{Fwd,BwdData,BwdFilter}AlgoPerf_t (the three share one layout)."""

    _fields_ = [
        ("algo", ctypes.c_int),
        ("status", ctypes.c_int),
        ("time", ctypes.c_float),
        ("memory", ctypes.c_size_t),
        ("determinism", ctypes.c_int),
        ("mathType", ctypes.c_int),
        ("reserved", ctypes.c_int * 3),
    ]


def _loaded_copy():
    """The path of a libcudnn.so already mapped into this process (PyTorch's), or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libcudnn.so"):
                    return path
    except OSError:
        pass
    return None


def _wheel_copies():
    """libcudnn.so.9 in the nvidia-cudnn-cu12 / -cu13 wheels: nvidia/cudnn/lib/ first, then any
    other nvidia/*/lib/ (the CUDA 13 wheels of NVIDIA's libraries moved to nvidia/cu13/lib/)."""
    try:
        import nvidia  # the namespace package those wheels install into
    except ImportError:
        return []
    found = []
    for root in getattr(nvidia, "__path__", []):
        found += glob.glob(os.path.join(root, "cudnn", "lib", "libcudnn.so.9"))
        found += sorted(glob.glob(os.path.join(root, "*", "lib", "libcudnn.so.9")))
    return list(dict.fromkeys(found))


_LIBRARY = None
_LIBRARY_LOCK = threading.Lock()


def find_library() -> ctypes.CDLL:
    """libcudnn (version 9), loaded once; RuntimeError saying how to install it when absent."""
    global _LIBRARY
    with _LIBRARY_LOCK:
        if _LIBRARY is None:
            candidates = [os.environ.get("XPNET_CUDNN_LIBRARY"), _loaded_copy(), *_wheel_copies(), "libcudnn.so.9"]
            tried = []
            for path in filter(None, candidates):
                try:
                    _LIBRARY = _declare(ctypes.CDLL(path))
                    break
                except OSError as exc:
                    tried.append(f"{path}: {exc}")
            else:
                raise RuntimeError(
                    'cuDNN is not installed: pip install "xpnet[cudnn12]" (or [cudnn13] for CUDA 13), or set '
                    "XPNET_CUDNN_LIBRARY to a libcudnn.so.9 (" + "; ".join(tried) + ")"
                )
        return _LIBRARY


def _declare(lib):
    """Argument types for the functions used here, so ctypes passes sizes and pointers right."""
    p, i, pp, pi = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int)
    size, perf = ctypes.c_size_t, ctypes.POINTER(_AlgoPerf)
    signatures = {
        "cudnnGetVersion": ([], size),
        "cudnnGetErrorString": ([i], ctypes.c_char_p),
        "cudnnCreate": ([pp], i),
        "cudnnSetStream": ([p, p], i),
        "cudnnCreateTensorDescriptor": ([pp], i),
        "cudnnSetTensor4dDescriptor": ([p, i, i, i, i, i, i], i),
        "cudnnCreateFilterDescriptor": ([pp], i),
        "cudnnSetFilter4dDescriptor": ([p, i, i, i, i, i, i], i),
        "cudnnCreateConvolutionDescriptor": ([pp], i),
        "cudnnSetConvolution2dDescriptor": ([p, i, i, i, i, i, i, i, i], i),
        "cudnnSetConvolutionMathType": ([p, i], i),
        "cudnnGetConvolution2dForwardOutputDim": ([p, p, p, pi, pi, pi, pi], i),
        "cudnnFindConvolutionForwardAlgorithmEx": ([p, p, p, p, p, p, p, p, i, pi, perf, p, size], i),
        "cudnnFindConvolutionBackwardDataAlgorithmEx": ([p, p, p, p, p, p, p, p, i, pi, perf, p, size], i),
        "cudnnFindConvolutionBackwardFilterAlgorithmEx": ([p, p, p, p, p, p, p, p, i, pi, perf, p, size], i),
        "cudnnGetConvolutionForwardAlgorithm_v7": ([p, p, p, p, p, i, pi, perf], i),
        "cudnnGetConvolutionBackwardDataAlgorithm_v7": ([p, p, p, p, p, i, pi, perf], i),
        "cudnnGetConvolutionBackwardFilterAlgorithm_v7": ([p, p, p, p, p, i, pi, perf], i),
        "cudnnConvolutionForward": ([p, p, p, p, p, p, p, i, p, size, p, p, p], i),
        "cudnnConvolutionBackwardData": ([p, p, p, p, p, p, p, i, p, size, p, p, p], i),
        "cudnnConvolutionBackwardFilter": ([p, p, p, p, p, p, p, i, p, size, p, p, p], i),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    return lib


def _check(lib, status, what):
    if status != 0:
        raise RuntimeError(f"cuDNN {what} failed: {lib.cudnnGetErrorString(status).decode()} (status {status})")


class ConvolutionPlan:
    """cuDNN's descriptors for one convolution geometry: x (N, C, H, W), w (F, C, HH, WW),
    stride and zero padding on every side, dtype 'f', 'd' or 'e' (NumPy's type characters;
    float16 sums in float32 on tensor cores); TF32 allowed or not for float32. Algorithms
    are found later, once per direction."""

    def __init__(self, lib, x_shape, w_shape, stride, pad, dtype_char, tf32=False):
        if dtype_char not in _DATA_TYPES:
            raise ValueError(f"cuDNN convolutions take float16, float32 or float64, got dtype {dtype_char!r}")
        self.lib, data_type = lib, _DATA_TYPES[dtype_char]
        self.x = self._descriptor("cudnnCreateTensorDescriptor")
        _check(lib, lib.cudnnSetTensor4dDescriptor(self.x, _NCHW, data_type, *x_shape), "cudnnSetTensor4dDescriptor")
        self.w = self._descriptor("cudnnCreateFilterDescriptor")
        _check(lib, lib.cudnnSetFilter4dDescriptor(self.w, data_type, _NCHW, *w_shape), "cudnnSetFilter4dDescriptor")
        self.conv = self._descriptor("cudnnCreateConvolutionDescriptor")
        half = dtype_char == "e"
        compute_type = _FLOAT if half else data_type  # float16 data, float32 sums
        status = lib.cudnnSetConvolution2dDescriptor(
            self.conv, pad, pad, stride, stride, 1, 1, _CROSS_CORRELATION, compute_type
        )
        _check(lib, status, "cudnnSetConvolution2dDescriptor")
        self.math = _TENSOR_OP_MATH if half else _DEFAULT_MATH if (tf32 and dtype_char == "f") else _FMA_MATH
        self.set_math(self.math)
        dims = [ctypes.c_int() for _ in range(4)]
        status = lib.cudnnGetConvolution2dForwardOutputDim(self.conv, self.x, self.w, *map(ctypes.byref, dims))
        _check(lib, status, "cudnnGetConvolution2dForwardOutputDim")
        self.out_shape = tuple(d.value for d in dims)
        self.y = self._descriptor("cudnnCreateTensorDescriptor")
        _check(
            lib, lib.cudnnSetTensor4dDescriptor(self.y, _NCHW, data_type, *self.out_shape), "cudnnSetTensor4dDescriptor"
        )
        scalar = ctypes.c_double if dtype_char == "d" else ctypes.c_float  # float16's scalars are float
        self.one, self.zero = scalar(1.0), scalar(0.0)
        self.algorithms: dict[str, tuple[int, int]] = {}  # direction: (algorithm, its math type)

    def set_math(self, math: int) -> None:
        """The convolution descriptor's math type (a host-side setting, allowed during a capture)."""
        _check(self.lib, self.lib.cudnnSetConvolutionMathType(self.conv, math), "cudnnSetConvolutionMathType")
        self.current_math = math

    def _descriptor(self, create):
        handle = ctypes.c_void_p()
        _check(self.lib, getattr(self.lib, create)(ctypes.byref(handle)), create)
        return handle


class CudnnConvolutions:
    """cuDNN convolutions on one GPU: a handle, a workspace, and a plan per geometry."""

    def __init__(self, cupy, device_id: int):
        self.cupy, self.lib = cupy, find_library()
        self.handle = ctypes.c_void_p()
        with cupy.cuda.Device(device_id):
            _check(self.lib, self.lib.cudnnCreate(ctypes.byref(self.handle)), "cudnnCreate")
            self.workspace = cupy.empty(_WORKSPACE_BYTES, dtype=cupy.uint8)
        self._retired: list = []  # earlier workspaces: captured graphs may still point into them
        self._plans: dict = {}
        self._lock = threading.Lock()
        self.tf32 = False

    def _plan(self, x_shape, w_shape, stride, pad, dtype):
        key = (tuple(x_shape), tuple(w_shape), stride, pad, dtype.char, self.tf32)
        plan = self._plans.get(key)
        if plan is None:
            with self._lock:
                plan = self._plans.setdefault(
                    key, ConvolutionPlan(self.lib, x_shape, w_shape, stride, pad, dtype.char, self.tf32)
                )
        return plan

    def _on_stream(self):
        stream = self.cupy.cuda.get_current_stream()
        _check(self.lib, self.lib.cudnnSetStream(self.handle, ctypes.c_void_p(stream.ptr)), "cudnnSetStream")
        return stream.is_capturing()

    def _algorithm(self, plan, direction, capturing, a, b, out):
        """(algorithm, math type): the fastest algorithm for ``direction``, timed on the real
        buffers the first time with a search workspace of up to ``_SEARCH_BYTES`` (the
        workspace then grows to what it needs), or while a graph is being captured, cuDNN's
        heuristic choice among those that fit the workspace as it is. With it, the math type
        it was found with, which the descriptor must carry when it runs (cuDNN picks
        tensor-core kernels by both)."""
        if direction in plan.algorithms:
            return plan.algorithms[direction]
        if plan.current_math != plan.math:  # search in the plan's own math type, not another direction's
            plan.set_math(plan.math)
        lib, count, results = self.lib, ctypes.c_int(), (_AlgoPerf * _MAX_ALGORITHMS)()
        name, first, second, result = _DIRECTIONS[direction]
        first, second, result = getattr(plan, first), getattr(plan, second), getattr(plan, result)
        if capturing:
            limit = self.workspace.nbytes
            function = f"cudnnGetConvolution{name}Algorithm_v7"
            status = getattr(lib, function)(
                self.handle, first, second, plan.conv, result, _MAX_ALGORITHMS, ctypes.byref(count), results
            )
        else:
            search = self._search_workspace()
            limit = search.nbytes
            function = f"cudnnFindConvolution{name}AlgorithmEx"
            status = getattr(lib, function)(
                self.handle, first, a.data.ptr, second, b.data.ptr, plan.conv, result, out.data.ptr,
                _MAX_ALGORITHMS, ctypes.byref(count), results, search.data.ptr, limit,
            )  # fmt: skip
            del search
        _check(lib, status, function)
        # Exact float32 takes no tensor-op algorithm, whatever cuDNN offers, and keeps its FMA
        # math type (DEFAULT would let cuDNN use TF32).
        exact = plan.math == _FMA_MATH
        usable = [
            r
            for r in results[: count.value]
            if r.status == 0 and r.memory <= limit and not (exact and r.mathType in _TENSOR_OP_MATHS)
        ]
        if not usable:
            raise RuntimeError(f"cuDNN has no {name} algorithm for this convolution within {limit} bytes of workspace")
        self._grow_workspace(usable[0].memory)
        plan.algorithms[direction] = usable[0].algo, plan.math if exact else usable[0].mathType
        return plan.algorithms[direction]

    def _search_workspace(self):
        """A scratch buffer for timing the algorithms: ``_SEARCH_BYTES``, halved while the
        device cannot spare it, never below the workspace already held."""
        size = max(_SEARCH_BYTES, self.workspace.nbytes)
        while True:
            try:
                return self.cupy.empty(size, dtype=self.cupy.uint8)
            except self.cupy.cuda.memory.OutOfMemoryError:
                if size <= self.workspace.nbytes:
                    return self.workspace
                size = max(size // 2, self.workspace.nbytes)

    def _grow_workspace(self, nbytes: int) -> None:
        """At least ``nbytes`` of workspace from now on; the old buffer is kept, not freed."""
        if nbytes > self.workspace.nbytes:
            self._retired.append(self.workspace)
            self.workspace = self.cupy.empty(nbytes, dtype=self.cupy.uint8)

    def _run(self, plan, direction, a, b, out_shape):
        """``direction``'s result (out_shape) from its two operands, C-contiguous device arrays."""
        out = self.cupy.empty(tuple(out_shape), dtype=a.dtype)
        algo, math = self._algorithm(plan, direction, self._on_stream(), a, b, out)
        if math != plan.current_math:
            plan.set_math(math)
        name, first, second, result = _DIRECTIONS[direction]
        status = getattr(self.lib, f"cudnnConvolution{name}")(
            self.handle, ctypes.byref(plan.one), getattr(plan, first), a.data.ptr, getattr(plan, second), b.data.ptr,
            plan.conv, algo, self.workspace.data.ptr, self.workspace.nbytes, ctypes.byref(plan.zero),
            getattr(plan, result), out.data.ptr,
        )  # fmt: skip
        _check(self.lib, status, f"cudnnConvolution{name}")
        return out

    def _operands(self, a, b):
        """Both operands C-contiguous and of their common dtype, as the im2col path promotes them."""
        dtype = self.cupy.result_type(a.dtype, b.dtype)
        return self.contiguous(a.astype(dtype, copy=False)), self.contiguous(b.astype(dtype, copy=False))

    def contiguous(self, a):
        """``a`` as cuDNN reads it, C-contiguous (``a`` itself where it is already): a layer
        keeps this for its backward pass, so that an input stored in another order (a
        convolution's output, channels outermost, on the im2col path) is copied once, not twice."""
        return self.cupy.ascontiguousarray(a)

    def forward(self, x, w, stride, pad):
        """The convolution of x (N, C, H, W) with w (F, C, HH, WW): (N, F, H', W')."""
        x, w = self._operands(x, w)
        plan = self._plan(x.shape, w.shape, stride, pad, x.dtype)
        return self._run(plan, "fwd", x, w, plan.out_shape)

    def backward_data(self, w, dy, x_shape, stride, pad):
        """dx (x_shape) of the convolution, from w and dy (N, F, H', W')."""
        w, dy = self._operands(w, dy)
        return self._run(self._plan(x_shape, w.shape, stride, pad, dy.dtype), "bwd_data", w, dy, x_shape)

    def backward_filter(self, x, dy, w_shape, stride, pad):
        """dw (w_shape) of the convolution, from x and dy (N, F, H', W')."""
        x, dy = self._operands(x, dy)
        return self._run(self._plan(x.shape, w_shape, stride, pad, x.dtype), "bwd_filter", x, dy, w_shape)
