"""Fused CuPy kernels behind xpnet's layer functions and update rules.

The array-API code in xpnet.layers and xpnet.optim is the reference; on CuPy
arrays the same functions call these kernels instead, which do each hot chain
in one launch (softmax + cross-entropy + its gradient, ReLU and GELU, im2col
and col2im, max pooling, each update rule) or a few (spatial batchnorm, alone or
with the GELU after it, and spatial groupnorm). Their source is :mod:`xpnet.backend.kernel_sources`.
Matrix products go to cuBLAS through its C API on a handle of our own, which,
unlike CuPy's matmul, may be recorded inside a CUDA graph.
"""

from __future__ import annotations

import ctypes
import threading

import cupy

from . import kernel_sources as sources
from .conv_paths import ConvGeometry, ConvPaths
from .cudnn import CudnnConvolutions

__all__ = ["CupyKernels"]

_relu_backward = cupy.ElementwiseKernel(*sources.RELU_BACKWARD)
_bias_relu = cupy.ElementwiseKernel(*sources.BIAS_RELU)
_gelu_forward = cupy.ElementwiseKernel(*sources.GELU_FORWARD)
_gelu_backward = cupy.ElementwiseKernel(*sources.GELU_BACKWARD)
_im2col = cupy.ElementwiseKernel(*sources.IM2COL)
_col2im = cupy.ElementwiseKernel(*sources.COL2IM)
_max_pool_forward = cupy.ElementwiseKernel(*sources.MAX_POOL_FORWARD)
_max_pool_backward = cupy.ElementwiseKernel(*sources.MAX_POOL_BACKWARD)
_shifted_sum = cupy.ReductionKernel(*sources.SHIFTED_SUM)
_squared_deviation_sum = cupy.ReductionKernel(*sources.SQUARED_DEVIATION_SUM)
# by the statistics' dtype: PRODUCT_SUM's F comes from no array argument, so it is fixed here
_product_sum = {
    cupy.dtype(dtype): cupy.ReductionKernel(*sources.with_type(sources.PRODUCT_SUM, "F", dtype))
    for dtype in ("float32", "float64")
}
_running_averages = cupy.ElementwiseKernel(*sources.RUNNING_AVERAGES)


_C_TYPES = {"float32": "float", "float64": "double"}


def _raw_kernels(source: str, function: str) -> dict:
    """A raw kernel's ``source`` built for float and double ({T} and {name} filled in),
    by dtype; ``function`` is its name without the type's suffix. CuPy compiles each on first use."""
    return {
        cupy.dtype(dtype): cupy.RawKernel(sources.raw_source(source, c), f"{function}_{c}")
        for dtype, c in _C_TYPES.items()
    }


_filter_size_kernels: dict = {}  # by (source, dtype, C, KH, KW)


def _filter_size_kernel(source: str, function: str, dtype, c: int, kh: int, kw: int):
    """A raw kernel of kernel_sources.FILTER_SIZE_KERNELS built for ``dtype`` (float32 or
    float64) and filters of c channels, kh rows and kw columns; made once per key."""
    key = (source, cupy.dtype(dtype), c, kh, kw)
    kernel = _filter_size_kernels.get(key)
    if kernel is None:
        name = _C_TYPES[key[1].name]
        kernel = cupy.RawKernel(sources.raw_source(source, name, C=c, KH=kh, KW=kw), f"{function}_{name}")
        _filter_size_kernels[key] = kernel
    return kernel


_softmax_loss = _raw_kernels(sources.SOFTMAX_LOSS, "softmax_loss")
_channel_totals_kernels = _raw_kernels(sources.CHANNEL_TOTALS, "channel_totals")
_plane_sums_kernels = _raw_kernels(sources.PLANE_SUMS, "plane_sums")
_batchnorm_train = cupy.ElementwiseKernel(*sources.BATCHNORM_TRAIN)
_batchnorm_apply = cupy.ElementwiseKernel(*sources.BATCHNORM_APPLY)
_batchnorm_backward = cupy.ElementwiseKernel(*sources.BATCHNORM_BACKWARD)
_batchnorm_gelu_train = cupy.ElementwiseKernel(*sources.BATCHNORM_GELU_TRAIN)
_batchnorm_gelu_apply = cupy.ElementwiseKernel(*sources.BATCHNORM_GELU_APPLY)
_batchnorm_gelu_backward = cupy.ElementwiseKernel(*sources.BATCHNORM_GELU_BACKWARD)
_groupnorm_backward = cupy.ElementwiseKernel(*sources.GROUPNORM_BACKWARD)
_gelu_grad_sums = {  # (sum of g, sum of g·x̂), by the statistics' dtype as _product_sum
    cupy.dtype(dtype): tuple(
        cupy.ReductionKernel(*sources.with_type(kernel, "F", dtype))
        for kernel in (sources.GELU_GRAD_SUM, sources.GELU_GRAD_X_HAT_SUM)
    )
    for dtype in ("float32", "float64")
}
_sgd = cupy.ElementwiseKernel(*sources.SGD)
_sgd_momentum = cupy.ElementwiseKernel(*sources.SGD_MOMENTUM)
_sgd_nesterov = cupy.ElementwiseKernel(*sources.SGD_NESTEROV)
_nesterov_sgd = cupy.ElementwiseKernel(*sources.NESTEROV_SGD)
_rmsprop = cupy.ElementwiseKernel(*sources.RMSPROP)
_lookahead = cupy.ElementwiseKernel(*sources.LOOKAHEAD)
_adam = cupy.ElementwiseKernel(*sources.ADAM)

# cuBLAS enums and sizes
_OP_N, _OP_T = 0, 1
_DEFAULT_MATH, _TF32_TENSOR_OP_MATH = 0, 3
_CUDA_R_16F, _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT = 2, 68, -1
_WORKSPACE_BYTES = 32 * 1024 * 1024


def _find_cublas() -> ctypes.CDLL:
    """The libcublas that CuPy itself loaded (so both use one library)."""
    cupy.cuda.device.get_cublas_handle()  # makes CuPy load it
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcublas.so" in line and "Lt" not in line.split("/")[-1]}
    for path in sorted(paths):
        return ctypes.CDLL(path)
    for name in ("libcublas.so.13", "libcublas.so.12", "libcublas.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    raise RuntimeError("xpnet could not find the cuBLAS library that CuPy uses")


class _Cublas:
    """A cuBLAS handle of our own on one device, with a fixed workspace so that
    GEMMs can be captured into CUDA graphs."""

    def __init__(self, device_id: int):
        lib = _find_cublas()
        handle = ctypes.c_void_p()
        with cupy.cuda.Device(device_id):
            status = lib.cublasCreate_v2(ctypes.byref(handle))
            if status != 0:
                raise RuntimeError(f"cublasCreate failed with status {status}")
            self.workspace = cupy.empty(_WORKSPACE_BYTES, dtype=cupy.uint8)
        self.lib, self.handle = lib, handle
        self._set_workspace()
        ptr, i = ctypes.c_void_p, ctypes.c_int
        for fn, scalar in ((lib.cublasSgemm_v2, ctypes.c_float), (lib.cublasDgemm_v2, ctypes.c_double)):
            fn.argtypes = [ptr, i, i, i, i, i, ctypes.POINTER(scalar), ptr, i, ptr, i, ctypes.POINTER(scalar), ptr, i]
            fn.restype = i
        # float16: cublasGemmEx with float16 operands and product, summed in float32.
        lib.cublasGemmEx.argtypes = [ptr, i, i, i, i, i, ptr, ptr, i, i, ptr, i, i, ptr, ptr, i, i, i, i]
        lib.cublasGemmEx.restype = i
        lib.cublasSetStream_v2.argtypes = [ptr, ptr]
        lib.cublasSetMathMode.argtypes = [ptr, i]
        self.tf32 = False
        self._gemm = {
            cupy.dtype(cupy.float32): (lib.cublasSgemm_v2, ctypes.c_float(1.0), ctypes.c_float(0.0)),
            cupy.dtype(cupy.float64): (lib.cublasDgemm_v2, ctypes.c_double(1.0), ctypes.c_double(0.0)),
            cupy.dtype(cupy.float16): (self._half_gemm, ctypes.c_float(1.0), ctypes.c_float(0.0)),
        }
        self._stream: int | None = None

    def _half_gemm(self, handle, op_b, op_a, n, m, k, one, b, ld_b, a, ld_a, zero, out, ld_out):
        """cublasSgemm's arguments, for float16 matrices through cublasGemmEx (float32 sums)."""
        half = _CUDA_R_16F
        return self.lib.cublasGemmEx(
            handle, op_b, op_a, n, m, k, one, b, half, ld_b, a, half, ld_a, zero, out, half, ld_out,
            _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT,
        )  # fmt: skip

    def set_tf32(self, enabled: bool) -> None:
        """Let float32 GEMMs use TF32 tensor cores (10-bit mantissa inputs, float32 sums)."""
        mode = _TF32_TENSOR_OP_MATH if enabled else _DEFAULT_MATH
        self._check(self.lib.cublasSetMathMode(self.handle, mode), "cublasSetMathMode")
        self.tf32 = bool(enabled)

    def _set_workspace(self):
        """Point cuBLAS at our fixed workspace: allocating its own inside a graph capture would fail."""
        self._check(
            self.lib.cublasSetWorkspace_v2(
                self.handle, ctypes.c_void_p(self.workspace.data.ptr), ctypes.c_size_t(_WORKSPACE_BYTES)
            ),
            "cublasSetWorkspace",
        )

    def use_stream(self, stream: int) -> None:
        """Run the handle's work on ``stream`` (a pointer). cublasSetStream resets the
        workspace to cuBLAS's default pool, so the fixed one is set again after it."""
        if stream != self._stream:
            self._check(self.lib.cublasSetStream_v2(self.handle, ctypes.c_void_p(stream)), "cublasSetStream")
            self._set_workspace()
            self._stream = stream

    @staticmethod
    def _check(status, what):
        if status != 0:
            raise RuntimeError(f"{what} failed with cuBLAS status {status}")

    def gemm(self, a, b, exact=False):
        """Row-major ``a (m, k) @ b (k, n)`` into a new (m, n) array; ``exact``: in float32
        arithmetic even where TF32 is on (a sum written as a product).

        cuBLAS is column-major: a row-major C-contiguous matrix is its own
        transpose there, so we compute Cᵀ = Bᵀ Aᵀ, choosing for each operand
        'N' (C-contiguous) or 'T' (F-contiguous, e.g. ``w.T``).
        """
        m, k = a.shape
        n = b.shape[1]
        op_b, ld_b, b = _operand(b, n, b.shape[0])
        op_a, ld_a, a = _operand(a, k, m)
        out = cupy.empty((m, n), dtype=a.dtype)
        if m == 0 or n == 0:
            return out
        if k == 0:
            out.fill(0)
            return out
        self.use_stream(cupy.cuda.get_current_stream().ptr)
        fn, one, zero = self._gemm[a.dtype]
        in_float32 = exact and self.tf32
        if in_float32:  # the math mode is read as the call chooses its kernel, captured or not
            self._check(self.lib.cublasSetMathMode(self.handle, _DEFAULT_MATH), "cublasSetMathMode")
        try:
            status = fn(
                self.handle,
                op_b,
                op_a,
                n,
                m,
                k,
                ctypes.byref(one),
                b.data.ptr,
                ld_b,
                a.data.ptr,
                ld_a,
                ctypes.byref(zero),
                out.data.ptr,
                max(n, 1),
            )
        finally:
            if in_float32:
                self.set_tf32(True)
        if status != 0:
            raise RuntimeError(f"cuBLAS gemm failed with status {status}")
        return out


def _device_id(x) -> int:
    """The GPU that array x is on."""
    return x.device.id


def _elapsed_ms(run) -> float:
    """The milliseconds the current stream spends on what ``run()`` launches (waits for it)."""
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    run()
    stop.record()
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop)


def _statistics_dtype(x):
    """The dtype of batchnorm's statistics of x: x's own, float32 for float16 activations."""
    return cupy.dtype(cupy.float32) if x.dtype == cupy.float16 else x.dtype


def _channels_outer(x) -> bool:
    """Whether x (N, C, H, W) is stored with its channels outermost: its (C, N, H, W)
    transpose is C-contiguous and it is not (a convolution's output on the im2col path)."""
    return x.ndim == 4 and not x.flags.c_contiguous and x.transpose(1, 0, 2, 3).flags.c_contiguous


def _stored_as(x, channels_outer):
    """x's elements as a C-contiguous (C, N, H, W) array if ``channels_outer``, else as
    (N, C, H, W) (x itself where it is stored so, else a copy)."""
    return cupy.ascontiguousarray(x.transpose(1, 0, 2, 3) if channels_outer else x)


def _stored(x):
    """(the C-contiguous array of x's elements in their memory order, whether that order
    has the channels outermost). The kernels below run on the stored array and give their
    outputs in its order, so no layer copies a convolution's output to (N, C, H, W), and
    the convolution's backward pass gets its gradient back in the order it reads."""
    outer = _channels_outer(x)
    return _stored_as(x, outer), outer


def _viewed(stored, channels_outer):
    """The (N, C, H, W) view of an array stored as :func:`_stored` gives it."""
    return stored.transpose(1, 0, 2, 3) if channels_outer else stored


def _planes(stored):
    """A stored (A, B, H, W) array as (A, B, H·W). Per-channel sums reduce that last axis
    first, then the batch axis: one reduction over the batch and H, W gives CuPy one block
    per channel, far too few to fill the GPU, each walking its channel with an index
    division per element."""
    a, b, h, w = stored.shape
    return stored.reshape(a, b, h * w)


def _batch_axis(channels_outer):
    """The batch's axis in a stored array, and in its planes' sums over H·W."""
    return 1 if channels_outer else 0


def _per_channel(values, dtype, channels_outer, ndim=4):
    """values (C,) of ``dtype``, shaped to broadcast along the channel axis of a stored
    array (axis 0 where the channels are outermost, else 1) of ``ndim`` axes."""
    shape = [1] * ndim
    shape[1 - _batch_axis(channels_outer)] = -1
    return values.reshape(shape).astype(dtype, copy=False)


def _channel_totals(sums, batch_axis, count, eps=0.0):
    """(total, total / count, 1 / sqrt(total / count + eps)), each (C,), of per-plane sums
    (C, N) or (N, C) (``batch_axis`` 1 or 0), summed over the batch in one launch."""
    sums = cupy.ascontiguousarray(sums)
    stat = sums.dtype
    batch, channels = sums.shape[batch_axis], sums.shape[1 - batch_axis]
    channel_stride, batch_stride = (batch, 1) if batch_axis == 1 else (1, channels)
    total, mean, inv_std = (cupy.empty(channels, dtype=stat) for _ in range(3))
    # a power of two that covers the batch, from a warp to 256: a small batch leaves no warps idle
    threads = min(256, max(32, 1 << (batch - 1).bit_length()))
    _channel_totals_kernels[stat](
        (channels,),
        (threads,),
        (sums, cupy.int64(channel_stride), cupy.int64(batch_stride), cupy.int32(channels), cupy.int32(batch),
         stat.type(count), stat.type(eps), total, mean, inv_std),
    )  # fmt: skip
    return total, mean, inv_std


# The direct convolution kernels' launches: threads a block, blocks at most along x (each
# thread then steps through the rest) and along y, and the filter gradient's blocks in all.
_THREADS = 256
_MAX_GRID_X, _MAX_GRID_Y = 1 << 20, 65535
_FILTER_GRAD_BLOCKS = 4096


def _grid(elements: int) -> int:
    """Blocks of _THREADS for one thread per element, at most _MAX_GRID_X."""
    return max(1, min(-(-elements // _THREADS), _MAX_GRID_X))


# What PLANE_SUMS sums in each of its modes (kernel_sources.PLANE_SUMS)
_SUM, _SQUARED_DEVIATION, _SUM_AND_PRODUCT, _GELU_GRAD_SUMS, _SHIFTED_SUM = range(5)
_PAIRS = (_SUM_AND_PRODUCT, _GELU_GRAD_SUMS)  # the modes that give two sums
_WARPS_PER_BLOCK = 8
_MAX_PLANE_BLOCKS = 1 << 20  # more planes than this many blocks have warps: each warp takes several


def _plane_sums(mode, rows, channels_outer, other=None, p0=None, p1=None, warp=False):
    """Per-plane sums of ``rows`` (A, B, H·W), a stored array's planes: (A, B), or a pair of
    them in modes _SUM_AND_PRODUCT and _GELU_GRAD_SUMS (``other`` is then x̂'s planes); p0 and
    p1 are (C,) per-channel operands (the means or shifts, or gamma and beta), in the statistics' dtype.
    ``warp``: one PLANE_SUMS launch, a warp per plane (float32 and float64 planes only); else
    CuPy's reductions, one per sum."""
    stat = _statistics_dtype(rows)
    if warp and rows.dtype == stat:
        a, b, size = rows.shape
        planes = a * b
        sums = [cupy.empty((a, b), dtype=stat) for _ in range(2 if mode in _PAIRS else 1)]
        blocks = min(-(-planes // _WARPS_PER_BLOCK), _MAX_PLANE_BLOCKS)
        channels, batch = (a, b) if channels_outer else (b, a)
        operands = [rows, rows if other is None else other, *(rows if v is None else v for v in (p0, p1))]
        _plane_sums_kernels[stat](
            (blocks,),
            (32 * _WARPS_PER_BLOCK,),
            (*operands, cupy.int64(planes), cupy.int32(size), cupy.int32(channels), cupy.int32(batch),
             cupy.int32(int(channels_outer)), cupy.int32(mode), sums[0], sums[-1]),
        )  # fmt: skip
        return sums[0] if len(sums) == 1 else tuple(sums)
    if mode == _SUM:
        return rows.sum(axis=2, dtype=stat)
    if mode == _SHIFTED_SUM:
        return _shifted_sum(rows, _per_channel(p0, stat, channels_outer, 3), axis=2)
    if mode == _SQUARED_DEVIATION:
        return _squared_deviation_sum(rows, _per_channel(p0, stat, channels_outer, 3), axis=2)
    if mode == _SUM_AND_PRODUCT:
        return rows.sum(axis=2, dtype=stat), _product_sum[stat](rows, other, axis=2)
    gamma3, beta3 = (_per_channel(v, stat, channels_outer, 3) for v in (p0, p1))
    return tuple(kernel(rows, other, gamma3, beta3, axis=2) for kernel in _gelu_grad_sums[stat])


def _groupnorm_shapes(n, c, groups):
    """The shapes that broadcast groupnorm's per-group (N, G) and per-channel (C,) operands
    over an (N, C, H, W) array viewed as (N, G, C / G, H·W)."""
    return (n, groups, 1, 1), (1, groups, c // groups, 1)


def _normalization(means, inv_std, gamma, beta, dtype, channels_outer):
    """The batchnorm kernels' per-channel operands: ``means`` (the mean, or in train mode the
    shift and the mean around it), 1/std, gamma (a 1 of ``dtype`` for batchnorm without a
    scale) and beta, each (C,) shaped for a stored array."""
    scale = dtype.type(1) if gamma is None else _per_channel(gamma, dtype, channels_outer)
    per_channel = [_per_channel(v, dtype, channels_outer) for v in (*means, inv_std, beta)]
    return (*per_channel[:-1], scale, per_channel[-1])


def _batch_statistics(rows, channels_outer, count, eps, warp):
    """Each channel's statistics from a stored array's planes ``rows`` (A, B, H·W), the channel
    the outer axis where ``channels_outer`` (groupnorm's groups are such channels): (shift,
    shifted mean, mean, biased variance, 1/sqrt(var + eps)), each (C,) in the statistics' dtype.

    The sums run around a shift, each channel's first value: a float32 Σx near 1000 lost the
    mean's last digits, and so did x - mean with the mean rounded to float32, where the
    normalising kernels now take x - shift - shifted mean (x - shift exact near the shift)."""
    stat = _statistics_dtype(rows)
    shift = (rows[:, 0, 0] if channels_outer else rows[0, :, 0]).astype(stat)  # a (C,) copy
    shifted = _plane_sums(_SHIFTED_SUM, rows, channels_outer, p0=shift, warp=warp)
    batch_axis = _batch_axis(channels_outer)
    _, shifted_mean, _ = _channel_totals(shifted, batch_axis, count)
    mean = shift + shifted_mean
    deviations = _plane_sums(_SQUARED_DEVIATION, rows, channels_outer, p0=mean, warp=warp)
    _, var, inv_std = _channel_totals(deviations, batch_axis, count, eps)
    return shift, shifted_mean, mean, var, inv_std


def _operand(x, ld_if_c, ld_if_f):
    """(op, leading dimension, array) for a row-major operand, copying if it is neither C- nor F-contiguous."""
    if x.flags.c_contiguous:
        return _OP_N, max(ld_if_c, 1), x
    if x.flags.f_contiguous:
        return _OP_T, max(ld_if_f, 1), x
    x = cupy.ascontiguousarray(x)
    return _OP_N, max(ld_if_c, 1), x


class CupyKernels:
    """The fused implementations that xpnet's layers and update rules use on CuPy arrays."""

    def __init__(self):
        self._cublas: dict[int, _Cublas] = {}
        self._ones_cache: dict = {}
        self._cudnn: dict[int, CudnnConvolutions] = {}
        self._lock = threading.Lock()
        self.tf32 = False
        self.use_cudnn = False
        # Batchnorm's per-plane sums through PLANE_SUMS (a warp per plane) instead of CuPy's
        # reductions: off until measured on a GPU (bench.py --suite ops times both).
        self.warp_plane_sums = False
        # Convolutions with at most sources.DIRECT_CONV_MAX_TAPS taps (C·HH·WW) through the direct
        # kernels instead of im2col + cuBLAS: off until measured on a GPU (bench.py --suite conv
        # and --suite ops time both).
        self.direct_small_convs = False
        # Which path each convolution takes; with conv_paths.autotune on, the fastest by timing.
        self.conv_paths = ConvPaths(_elapsed_ms)
        self._cudnn_missing: str | None = None  # why cuDNN could not be loaded, once it could not

    def prepare(self, device_id: int) -> None:
        """Create the cuBLAS handle and workspace now (never inside a graph capture)."""
        if device_id not in self._cublas:
            with self._lock:
                if device_id not in self._cublas:
                    handle = _Cublas(device_id)
                    handle.set_tf32(self.tf32)
                    self._cublas[device_id] = handle
        if self.use_cudnn:
            self._cudnn_engine(device_id)

    def _cudnn_engine(self, device_id: int) -> CudnnConvolutions:
        """cuDNN's convolutions on GPU ``device_id``, made on first use (RuntimeError where
        cuDNN cannot be loaded)."""
        if device_id not in self._cudnn:
            with self._lock:
                if device_id not in self._cudnn:
                    engine = CudnnConvolutions(cupy, device_id)
                    engine.tf32 = self.tf32
                    self._cudnn[device_id] = engine
        return self._cudnn[device_id]

    def set_tf32(self, enabled: bool) -> None:
        """TF32 tensor cores for every float32 GEMM of xpnet's handles (off by default: exact fp32)."""
        self.tf32 = bool(enabled)
        for handle in self._cublas.values():
            handle.set_tf32(self.tf32)
        for engine in self._cudnn.values():
            engine.tf32 = self.tf32

    def set_cudnn(self, enabled: bool) -> None:
        """Convolutions through cuDNN (True) or im2col + cuBLAS (False, the default)."""
        self.use_cudnn = bool(enabled)

    def cudnn_engine(self, x):
        """cuDNN's convolutions on x's GPU."""
        return self._cudnn_engine(_device_id(x))

    def _cudnn_loads(self, x) -> bool:
        """Whether cuDNN's convolutions can run on x's GPU; asked once, the answer kept."""
        if self._cudnn_missing is None:
            try:
                self.cudnn_engine(x)
            except (OSError, RuntimeError) as exc:
                self._cudnn_missing = str(exc)
        return self._cudnn_missing is None

    def conv_path(self, x, w, b, stride, pad, trial):
        """The path that convolves x (N, C, H, W) with w (F, C, HH, WW) (plus b (F,) unless it
        is None): "direct" (:meth:`direct_conv_forward`), "cudnn" (:meth:`cudnn_engine`) or
        "im2col". The switches pick it (direct_small_convs, then use_cudnn, else im2col),
        or with ``conv_paths.autotune`` on, the fastest of those the convolution can take,
        timed through ``trial(path)`` (one forward and backward pass) once per geometry.
        """
        direct = self._direct_applies(x, w, b)
        static = "direct" if direct and self.direct_small_convs else "cudnn" if self.use_cudnn else "im2col"
        if not self.conv_paths.autotune:
            return static

        def available():  # asked only outside a capture: loading cuDNN allocates its workspace
            return [path for path, ok in (("direct", direct), ("cudnn", self._cudnn_loads(x))) if ok] + ["im2col"]

        dtypes = f"{x.dtype.name}/{w.dtype.name}/{'no bias' if b is None else b.dtype.name}"
        key = ConvGeometry(_device_id(x), tuple(x.shape), _channels_outer(x), tuple(w.shape), dtypes, stride, pad,
                           self.tf32)  # fmt: skip
        return self.conv_paths.choose(key, available, static, trial, cupy.cuda.get_current_stream().is_capturing())

    # -- matrix product ----------------------------------------------------------
    def matmul(self, a, b, exact=False):
        """``a @ b`` for 2-D float16/float32/float64 arrays through our cuBLAS handle
        (float16 is summed in float32); ``exact``: no TF32 even where it is on."""
        if a.ndim != 2 or b.ndim != 2 or a.dtype != b.dtype or a.dtype.char not in "efd":
            return a @ b
        if a.shape[1] != b.shape[0]:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not align")
        device = _device_id(a)
        if device not in self._cublas:
            self.prepare(device)
        return self._cublas[device].gemm(a, b, exact)

    def column_sums(self, a):
        """``sum(a, axis=0)`` of a 2-D float array as ``ones(N) @ a`` through cuBLAS,
        which reads ``a`` once at full bandwidth (CuPy's axis-0 reduction does not). In
        float32 arithmetic even where TF32 is on: TF32 is for products, and PyTorch sums
        a bias's gradient in float32 too."""
        if a.ndim != 2 or a.dtype.char not in "fd":
            return a.sum(axis=0)
        ones = self._ones(a.shape[0], a.dtype)
        return self.matmul(ones, a, exact=True).reshape(a.shape[1])

    def _ones(self, n, dtype):
        """A (1, n) row of ones; cached, except while a graph is being captured (its
        memory then belongs to the graph and must not outlive it)."""
        key = (cupy.cuda.Device().id, n, cupy.dtype(dtype))
        ones = self._ones_cache.get(key)
        if ones is None:
            ones = cupy.ones((1, n), dtype=dtype)
            if not cupy.cuda.get_current_stream().is_capturing():
                self._ones_cache[key] = ones
        return ones

    # -- layers ------------------------------------------------------------------
    def affine_relu(self, x2, w, b):
        """``max(x2 @ w + b, 0)``: the bias add and the ReLU in one pass after the GEMM."""
        return _bias_relu(self.matmul(x2, w), b)

    @staticmethod
    def softmax_loss(x, y, label_smoothing=0.0, reduction="mean"):
        """Loss (0-d) and dx (N, C) in one launch; x (N, C) float32 or float64, y (N,) integer labels;
        the target (1 - label_smoothing)·one_hot + label_smoothing / C, the loss summed over
        the batch or (``reduction`` "mean") averaged."""
        n, c = x.shape
        kernel = _softmax_loss[x.dtype]
        x = cupy.ascontiguousarray(x)
        y = cupy.ascontiguousarray(y.astype(cupy.int64, copy=False))
        dx = cupy.empty_like(x)
        loss = cupy.empty((), dtype=x.dtype)
        scale = 1.0 / n if reduction == "mean" else 1.0
        # each constant rounded once to x's dtype, as the reference's Python floats are
        targets_and_scale = [x.dtype.type(v) for v in (1.0 - label_smoothing, label_smoothing / c, scale)]
        kernel((1,), (256,), (x, y, cupy.int32(n), cupy.int32(c), *targets_and_scale, dx, loss))
        return loss, dx

    @staticmethod
    def relu_backward(dout, x):
        return _relu_backward(dout, x)

    @staticmethod
    def channel_bias_relu(x, b):
        """max(x + b, 0) for x (N, C, H, W) and b (C,) in one pass, stored in x's order."""
        stored, outer = _stored(x)
        return _viewed(_bias_relu(stored, _per_channel(b, x.dtype, outer)), outer)

    @staticmethod
    def im2col(x, kh, kw, stride, pad, h_out, w_out):
        """(C·KH·KW, N·H'·W') columns of x (N, C, H, W) zero-padded by ``pad``, in one launch."""
        n, c, h, w = x.shape
        cols = cupy.empty((c * kh * kw, n * h_out * w_out), dtype=x.dtype)
        divide = sources.divisors(w_out, h_out, n, kw, kh)
        stored, outer = _stored(x)
        _im2col(stored, c, h, w, kh, kw, n, h_out, w_out, stride, pad, int(outer), *divide, cols)
        return cols

    @staticmethod
    def col2im(cols, like, kh, kw, stride, pad, h_out, w_out):
        """The adjoint of :meth:`im2col`: dx (N, C, H, W), overlapping windows added, shaped
        and stored like ``like`` (the convolution's input)."""
        n, c, h, w = like.shape
        outer = _channels_outer(like)
        dx = cupy.empty((c, n, h, w) if outer else (n, c, h, w), dtype=cols.dtype)
        inner = n if outer else c
        divide = sources.divisors(w, h, inner)
        _col2im(cupy.ascontiguousarray(cols), c, h, w, kh, kw, n, h_out, w_out, stride, pad, int(outer), inner,
                *divide, dx)  # fmt: skip
        return _viewed(dx, outer)

    @staticmethod
    def _direct_applies(x, w, b) -> bool:
        """Whether the direct kernels take this convolution: at most DIRECT_CONV_MAX_TAPS taps
        (C·HH·WW), and x, w and b (unless None) all float32 or all float64."""
        if w.shape[1] * w.shape[2] * w.shape[3] > sources.DIRECT_CONV_MAX_TAPS or x.dtype.name not in _C_TYPES:
            return False
        return w.dtype == x.dtype and (b is None or b.dtype == x.dtype)

    def direct_conv_forward(self, x, w, b, stride, pad, h_out, w_out):
        """x (N, C, H, W) convolved with w (F, C, HH, WW), plus b (F,) unless it is None, one
        thread per output and no column matrix: out (N, F, H', W'), stored (F, N, H', W') as
        the im2col path stores it. ValueError where the kernels do not apply (more than
        sources.DIRECT_CONV_MAX_TAPS taps, or not float32 or float64 throughout); the switch
        direct_small_convs is :meth:`conv_path`'s to read."""
        if not self._direct_applies(x, w, b):
            raise ValueError(
                f"direct_conv_forward: the direct kernels take at most {sources.DIRECT_CONV_MAX_TAPS} taps in float32 "
                f"or float64 throughout, not x {x.dtype} {tuple(x.shape)}, w {w.dtype} {tuple(w.shape)}"
            )
        n, c, h, wd = x.shape
        f, _, kh, kw = w.shape
        stored, outer = _stored(x)
        out = cupy.empty((f, n, h_out, w_out), dtype=x.dtype)
        w = cupy.ascontiguousarray(w)
        bias = w if b is None else cupy.ascontiguousarray(b)  # any array: has_bias 0 leaves it unread
        divide = (cupy.uint32(v) for v in sources.divisors(w_out, h_out, n))
        kernel = _filter_size_kernel(sources.DIRECT_CONV_FORWARD, "direct_conv_forward", x.dtype, c, kh, kw)
        kernel(
            (_grid(out.size),),
            (_THREADS,),
            (stored, w, bias, cupy.int32(b is not None), cupy.int64(out.size), cupy.int32(n), cupy.int32(h),
             cupy.int32(wd), cupy.int32(h_out), cupy.int32(w_out), cupy.int32(stride), cupy.int32(pad),
             cupy.int32(int(outer)), *divide, out),
        )  # fmt: skip
        return out.transpose(1, 0, 2, 3)

    @staticmethod
    def direct_conv_filter_grad(x, dout, kh, kw, stride, pad):
        """dw (F, C, HH, WW) of :meth:`direct_conv_forward`'s convolution, from x (N, C, H, W)
        and dout (N, F, H', W'), each read in its memory order: the kernel's per-block sums
        over shares of the output positions, added over the blocks (no atomics: the same
        sums each run)."""
        n, c, h, wd = x.shape
        f, h_out, w_out = dout.shape[1:]
        stored_x, x_outer = _stored(x)
        stored_dout, dout_outer = _stored(dout.astype(x.dtype, copy=False))
        positions = n * h_out * w_out
        # about _FILTER_GRAD_BLOCKS blocks in all, none without positions to add
        blocks = max(1, min(-(-positions // _THREADS), -(-_FILTER_GRAD_BLOCKS // f)))
        partial = cupy.zeros((f, blocks, c * kh * kw), dtype=x.dtype)
        divide = (cupy.uint32(v) for v in sources.divisors(w_out, h_out))
        kernel = _filter_size_kernel(sources.DIRECT_CONV_FILTER_GRAD, "direct_conv_filter_grad", x.dtype, c, kh, kw)
        kernel(
            (blocks, min(f, _MAX_GRID_Y)),
            (_THREADS,),
            (stored_dout, stored_x, cupy.int64(positions), cupy.int32(f), cupy.int32(n), cupy.int32(h),
             cupy.int32(wd), cupy.int32(h_out), cupy.int32(w_out), cupy.int32(stride), cupy.int32(pad),
             cupy.int32(int(x_outer)), cupy.int32(int(dout_outer)), cupy.int32(blocks), *divide, partial),
        )  # fmt: skip
        return partial.sum(axis=1).reshape(f, c, kh, kw)

    @staticmethod
    def max_pool_forward(x, ph, pw, stride, h_out, w_out):
        """Max pooling of x (N, C, H, W), read in its memory order, in one launch: out
        (N, C, H', W') and, for the backward pass, each window's first maximum as the offset
        ki·pw + kj (int32, same shape), both C-contiguous."""
        n, c, h, w = x.shape
        stored, outer = _stored(x)
        out = cupy.empty((n, c, h_out, w_out), dtype=x.dtype)
        argmax = cupy.empty(out.shape, dtype=cupy.int32)
        divide = sources.divisors(w_out, h_out, c)
        _max_pool_forward(stored, h, w, ph, pw, h_out, w_out, stride, c, n, int(outer), *divide, out, argmax)
        return out, argmax

    @staticmethod
    def max_pool_backward(dout, argmax, like, ph, pw, stride, h_out, w_out):
        """dx shaped and stored like ``like`` (the pool's input, (N, C, H, W)): each
        window's gradient at its first maximum, overlaps added."""
        n, c, h, w = like.shape
        outer = _channels_outer(like)
        dx = cupy.empty((c, n, h, w) if outer else (n, c, h, w), dtype=dout.dtype)
        inner = n if outer else c
        divide = sources.divisors(w, h, inner)
        _max_pool_backward(cupy.ascontiguousarray(dout), argmax, h, w, ph, pw, h_out, w_out, stride, c, int(outer),
                           inner, *divide, dx)  # fmt: skip
        return _viewed(dx, outer)

    def spatial_batchnorm_train(self, x, gamma, beta, eps, gelu=False):
        """Batchnorm of x (N, C, H, W) with its statistics over N, H and W, in three passes:
        out and x̂ (N, C, H, W), stored in x's order, the batch mean and biased variance (C,),
        and 1/sqrt(var + eps) (C,). gamma None: a scale of 1. ``gelu``: out is the exact
        GELU of the normalised values, in the same last pass. For float16 x the statistics
        are summed and kept in float32; out and x̂ are float16."""
        count = x.size // x.shape[1]
        stat = _statistics_dtype(x)
        stored, outer = _stored(x)
        shift, shifted_mean, mean, var, inv_std = _batch_statistics(
            _planes(stored), outer, count, eps, self.warp_plane_sums
        )
        normalize = _batchnorm_gelu_train if gelu else _batchnorm_train
        out, x_hat = normalize(stored, *_normalization((shift, shifted_mean), inv_std, gamma, beta, stat, outer))
        return _viewed(out, outer), _viewed(x_hat, outer), mean, var, inv_std

    @staticmethod
    def spatial_batchnorm_apply(x, gamma, beta, mean, var, eps, gelu=False):
        """Test-mode batchnorm of x (N, C, H, W) with given statistics (C,), in one pass
        (``gelu``: followed by the exact GELU in the same pass); out is stored in x's order."""
        stat = _statistics_dtype(x)
        stored, outer = _stored(x)
        inv_std = (1 / cupy.sqrt(var.astype(stat, copy=False) + eps)).astype(stat, copy=False)
        apply = _batchnorm_gelu_apply if gelu else _batchnorm_apply
        return _viewed(apply(stored, *_normalization((mean,), inv_std, gamma, beta, stat, outer)), outer)

    def spatial_batchnorm_backward(self, dout, x_hat, gamma, inv_std, gelu_beta=None):
        """dx (N, C, H, W), stored in x̂'s order, dgamma (C,) (None without gamma) and dbeta
        (C,), in three passes; dgamma and dbeta are summed in the statistics' dtype
        (inv_std's) and have it. ``gelu_beta``: the forward pass had a GELU after the
        batchnorm with this beta (C,), and dout is the gradient at the GELU's output: each
        pass recomputes the gradient at the batchnorm's output from x̂ and dout."""
        c = dout.shape[1]
        count = dout.size // c
        stat = inv_std.dtype
        x_hat, outer = _stored(x_hat)
        dout = _stored_as(dout, outer)
        dout_rows, x_hat_rows, batch = _planes(dout), _planes(x_hat), _batch_axis(outer)
        scale = _per_channel(inv_std if gamma is None else gamma.astype(stat, copy=False) * inv_std, stat, outer)
        if gelu_beta is None:
            sums = _plane_sums(_SUM_AND_PRODUCT, dout_rows, outer, x_hat_rows, warp=self.warp_plane_sums)
            (dbeta, mean_g), (dgamma, mean_g_x_hat) = (_channel_totals(v, batch, count)[:2] for v in sums)
            means = [_per_channel(v, stat, outer) for v in (mean_g, mean_g_x_hat)]
            dx = _batchnorm_backward(dout, x_hat, scale, *means)
            return _viewed(dx, outer), None if gamma is None else dgamma, dbeta
        # gamma and beta per channel, as arrays: reductions take arrays (a cached row of ones
        # for batchnorm without a scale, so that a captured step does not fill it each time)
        gamma_c = self._ones(c, stat).reshape(c) if gamma is None else gamma.astype(stat, copy=False)
        beta_c = gelu_beta.astype(stat, copy=False)
        sums = _plane_sums(_GELU_GRAD_SUMS, dout_rows, outer, x_hat_rows, gamma_c, beta_c, self.warp_plane_sums)
        (dbeta, mean_g), (dgamma, mean_g_x_hat) = (_channel_totals(v, batch, count)[:2] for v in sums)
        means = [_per_channel(v, stat, outer) for v in (mean_g, mean_g_x_hat)]
        gamma4, beta4 = (_per_channel(v, stat, outer) for v in (gamma_c, gelu_beta))
        dx = _batchnorm_gelu_backward(dout, x_hat, gamma4, beta4, scale, *means)
        return _viewed(dx, outer), None if gamma is None else dgamma, dbeta

    def spatial_groupnorm_train(self, x, gamma, beta, groups, eps):
        """Groupnorm of x (N, C, H, W): each image's channels in ``groups`` groups of C / G,
        each normalised over its channels and positions, then scaled and shifted per channel
        by gamma and beta (C,). out and x̂ (N, C, H, W), C-ordered, and 1/sqrt(var + eps)
        (N, G), in the statistics' dtype."""
        n, c, h, w = x.shape
        stat, size = _statistics_dtype(x), c // groups * h * w
        stored = _stored_as(x, False)  # each image's group is then one run of C / G planes
        planes = stored.reshape(n * groups, c // groups, h * w)  # a group's planes, the groups outermost
        shift, shifted_mean, _, _, inv_std = _batch_statistics(planes, True, size, eps, self.warp_plane_sums)
        by_group, per_channel = _groupnorm_shapes(n, c, groups)
        gamma4, beta4 = (v.reshape(per_channel).astype(stat, copy=False) for v in (gamma, beta))
        per_group = (v.reshape(by_group) for v in (shift, shifted_mean, inv_std))
        out, x_hat = _batchnorm_train(stored.reshape(n, groups, c // groups, h * w), *per_group, gamma4, beta4)
        return out.reshape(x.shape), x_hat.reshape(x.shape), inv_std.reshape(n, groups)

    def spatial_groupnorm_backward(self, dout, x_hat, gamma, inv_std):
        """dx (N, C, H, W), C-ordered, dgamma and dbeta (C,) of :meth:`spatial_groupnorm_train`
        (x̂ and 1/std (N, G) as it gave them). One read of dout and x̂ gives each plane's Σdout
        and Σdout·x̂: summed over the batch they are dbeta and dgamma, and, weighted by gamma
        and summed over each group's channels, the group means that dx needs."""
        n, c, h, w = dout.shape
        groups, stat = inv_std.shape[1], inv_std.dtype
        dout = _stored_as(dout, False)
        sums = _plane_sums(_SUM_AND_PRODUCT, _planes(dout), False, _planes(x_hat), warp=self.warp_plane_sums)
        dbeta, dgamma = (_channel_totals(s, 0, n * h * w)[0] for s in sums)  # (N, C) plane sums, over the batch
        gamma_c = gamma.reshape(c).astype(stat, copy=False)
        size = c // groups * h * w
        mean_g, mean_g_x_hat = ((s * gamma_c).reshape(n, groups, -1).sum(axis=2) / size for s in sums)
        by_group, per_channel = _groupnorm_shapes(n, c, groups)
        grouped = (n, groups, c // groups, h * w)
        per_group = (v.reshape(by_group) for v in (inv_std, mean_g, mean_g_x_hat))
        dx = _groupnorm_backward(
            dout.reshape(grouped), x_hat.reshape(grouped), gamma_c.reshape(per_channel), *per_group
        )
        return dx.reshape(dout.shape), dgamma, dbeta

    @staticmethod
    def running_averages(running_mean, running_var, mean, var, momentum, var_scale):
        """``running = momentum·running + (1 - momentum)·batch`` for the mean and for the
        variance times ``var_scale``, in place, in one pass (see
        :func:`xpnet.layers.update_running_statistics`)."""
        rest = mean.dtype.type(1 - momentum)
        _running_averages(mean, var, running_mean.dtype.type(momentum), rest, mean.dtype.type(var_scale),
                          running_mean, running_var)  # fmt: skip

    @staticmethod
    def gelu_forward(x):
        """(x·Φ(x), Φ(x)) in one kernel, stored in x's order."""
        stored, outer = _stored(x)
        out, cdf = _gelu_forward(stored)
        return _viewed(out, outer), _viewed(cdf, outer)

    @staticmethod
    def gelu_backward(dout, x, cdf):
        """dx, stored in x's order."""
        x, outer = _stored(x)
        return _viewed(_gelu_backward(_stored_as(dout, outer), x, _stored_as(cdf, outer)), outer)

    def channel_sum(self, x, dtype=None):
        """The sum of x (N, C, H, W) over N, H and W (C,), summed in ``dtype`` (x's by
        default), H·W first, read in x's memory order."""
        stored, outer = _stored(x)
        rows = _planes(stored)
        if self.warp_plane_sums and dtype in (None, x.dtype) and x.dtype == _statistics_dtype(x):
            sums = _plane_sums(_SUM, rows, outer, warp=True)
        else:
            sums = rows.sum(axis=2, dtype=dtype)
        return sums.sum(axis=_batch_axis(outer), dtype=dtype)

    # -- update rules (in place) -------------------------------------------------------
    @staticmethod
    def sgd(w, dw, lr):
        _sgd(dw, lr, w)

    @staticmethod
    def sgd_momentum(w, dw, v, lr, mu):
        _sgd_momentum(dw, lr, mu, w, v)

    @staticmethod
    def sgd_nesterov_momentum(w, dw, v, lr, mu):
        _sgd_nesterov(dw, lr, mu, w, v)

    @staticmethod
    def nesterov_sgd(w, dw, v, lr, mu, wd):
        _nesterov_sgd(dw, lr, mu, wd, w, v)

    @staticmethod
    def lookahead(fast, slow, step):
        """``slow += step·(fast - slow)``, then ``fast[...] = slow``, in one pass; ``step`` is a
        0-d array of their dtype."""
        _lookahead(step, slow, fast)

    @staticmethod
    def rmsprop(w, dw, cache, lr, decay, eps):
        _rmsprop(dw, lr, decay, eps, w, cache)

    @staticmethod
    def adam(w, dw, m, v, config):
        """Adam in place; ``config['t']`` becomes a 0-d int64 device array, incremented on the device."""
        t = config["t"]
        if not isinstance(t, cupy.ndarray):
            t = cupy.asarray(int(t), dtype=cupy.int64)
        t += 1
        config["t"] = t
        _adam(dw, t, config["learning_rate"], config["beta1"], config["beta2"], config["epsilon"], w, m, v)
