"""Fused CuPy kernels behind xpnet's layer functions and update rules.

The array-API code in xpnet.layers and xpnet.optim is the reference; on CuPy
arrays the same functions call these kernels instead, which do each hot chain
in one launch (softmax + cross-entropy + its gradient, ReLU backward, each
update rule). Matrix products go to cuBLAS through its C API on a handle of our
own, which, unlike CuPy's matmul, may be recorded inside a CUDA graph.
"""

from __future__ import annotations

import ctypes
import threading

import cupy

__all__ = ["CupyKernels"]

_SOFTMAX_SOURCE = r"""
extern "C" __global__ void softmax_loss_{name}(
        const {T}* __restrict__ x, const long long* __restrict__ y, const int n, const int c,
        {T}* __restrict__ dx, {T}* __restrict__ loss) {
    // One block: each thread takes whole rows; the loss is reduced in double.
    __shared__ double partial[256];
    double total = 0.0;
    const {T} inv_n = ({T})1 / ({T})n;
    for (int row = threadIdx.x; row < n; row += blockDim.x) {
        const {T}* xr = x + (long long)row * c;
        {T}* dr = dx + (long long)row * c;
        const long long label = y[row];
        if (label < 0 || label >= c) {  // out-of-range label: NaN, never an out-of-bounds read
            total += nan("");
            for (int j = 0; j < c; ++j) dr[j] = ({T})nan("");
            continue;
        }
        {T} m = xr[0];
        for (int j = 1; j < c; ++j) m = max(m, xr[j]);
        {T} s = 0;
        for (int j = 0; j < c; ++j) s += exp(xr[j] - m);
        total += (double)(log(s) - (xr[label] - m));
        const {T} inv_s = ({T})1 / s;
        for (int j = 0; j < c; ++j) {
            const {T} p = exp(xr[j] - m) * inv_s;
            dr[j] = (p - (j == label ? ({T})1 : ({T})0)) * inv_n;
        }
    }
    partial[threadIdx.x] = total;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) loss[0] = ({T})(partial[0] / n);
}
"""

_relu_backward = cupy.ElementwiseKernel("T dout, T x", "T dx", "dx = x > (T)0 ? dout : (T)0", "xpnet_relu_backward")
_bias_relu = cupy.ElementwiseKernel("T a, T b", "T out", "out = max(a + b, (T)0)", "xpnet_bias_relu")
# The exact GELU in one pass each way, with CUDA's erfc (the array-API reference spends
# about 80 elementwise operations on it, each a launch and a trip through memory).
_gelu_forward = cupy.ElementwiseKernel(
    "T x", "T out, T cdf", "cdf = (T)0.5 * erfc(-x * (T)0.70710678118654752440); out = x * cdf", "xpnet_gelu_forward"
)
_gelu_backward = cupy.ElementwiseKernel(
    "T dout, T x, T cdf",
    "T dx",
    "dx = dout * (cdf + x * exp((T)-0.5 * x * x) * (T)0.39894228040143267794)",
    "xpnet_gelu_backward",
)
# im2col and col2im in one launch each (the array-API code takes HH·WW strided copies).
# cols is (C, KH, KW, N, OH, OW) flattened: one thread per element, zero where the window
# sees padding. col2im gathers instead of scattering, one thread per element of dx
# (N, C, H, W), so that overlapping windows add up without atomics.
_im2col = cupy.ElementwiseKernel(
    "raw T x, int32 C, int32 H, int32 W, int32 KH, int32 KW, int32 N, int32 OH, int32 OW, int32 stride, int32 pad",
    "T col",
    """
    long long t = i;
    const int ow = t % OW; t /= OW;
    const int oh = t % OH; t /= OH;
    const int n = t % N; t /= N;
    const int kj = t % KW; t /= KW;
    const int ki = t % KH;
    const int c = t / KH;
    const int ih = oh * stride + ki - pad;
    const int iw = ow * stride + kj - pad;
    col = (ih >= 0 && ih < H && iw >= 0 && iw < W) ? x[(((long long)n * C + c) * H + ih) * W + iw] : (T)0;
    """,
    "xpnet_im2col",
)
_col2im = cupy.ElementwiseKernel(
    "raw T cols, int32 C, int32 H, int32 W, int32 KH, int32 KW, int32 N, int32 OH, int32 OW, int32 stride, int32 pad",
    "T dx",
    """
    long long t = i;
    const int iw = t % W; t /= W;
    const int ih = t % H; t /= H;
    const int c = t % C;
    const int n = t / C;
    T total = 0;
    for (int ki = 0; ki < KH; ++ki) {
        const int r = ih + pad - ki;
        if (r < 0 || r % stride != 0 || r / stride >= OH) continue;
        const int oh = r / stride;
        for (int kj = 0; kj < KW; ++kj) {
            const int q = iw + pad - kj;
            if (q < 0 || q % stride != 0 || q / stride >= OW) continue;
            const int ow = q / stride;
            total += cols[(((((long long)c * KH + ki) * KW + kj) * N + n) * OH + oh) * OW + ow];
        }
    }
    dx = total;
    """,
    "xpnet_col2im",
)
_sgd = cupy.ElementwiseKernel("T dw, T lr", "T w", "w = w - lr * dw", "xpnet_sgd")
_sgd_momentum = cupy.ElementwiseKernel(
    "T dw, T lr, T mu", "T w, T v", "v = mu * v - lr * dw; w = w + v", "xpnet_sgd_momentum"
)
_sgd_nesterov = cupy.ElementwiseKernel(
    "T dw, T lr, T mu",
    "T w, T v",
    "T v_old = v; v = mu * v - lr * dw; w = w + v + mu * (v - v_old)",
    "xpnet_sgd_nesterov",
)
# PyTorch's SGD(nesterov=True, weight_decay=wd): the decay joins the gradient before the momentum.
_nesterov_sgd = cupy.ElementwiseKernel(
    "T dw, T lr, T mu, T wd",
    "T w, T v",
    "const T g = dw + wd * w; v = mu * v + g; w = w - lr * (g + mu * v)",
    "xpnet_nesterov_sgd",
)
_rmsprop = cupy.ElementwiseKernel(
    "T dw, T lr, T decay, T eps",
    "T w, T cache",
    "cache = decay * cache + ((T)1 - decay) * dw * dw; w = w - lr * dw / (sqrt(cache) + eps)",
    "xpnet_rmsprop",
)
# Adam reads its step count from the device, so a CUDA graph replaying the update
# sees each new count (a count passed as an argument would be frozen at capture).
_adam = cupy.ElementwiseKernel(
    "T dw, raw int64 t, T lr, T beta1, T beta2, T eps",
    "T w, T m, T v",
    """const T step = (T)t[0];
       const T m_correction = (T)1 - pow(beta1, step);
       const T v_correction = (T)1 - pow(beta2, step);
       m = beta1 * m + ((T)1 - beta1) * dw;
       v = beta2 * v + ((T)1 - beta2) * dw * dw;
       w = w - lr * (m / m_correction) / (sqrt(v / v_correction) + eps)""",
    "xpnet_adam",
)

# cuBLAS enums and sizes
_OP_N, _OP_T = 0, 1
_DEFAULT_MATH, _TF32_TENSOR_OP_MATH = 0, 3
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
        lib.cublasSetStream_v2.argtypes = [ptr, ptr]
        lib.cublasSetMathMode.argtypes = [ptr, i]
        self._gemm = {
            cupy.dtype(cupy.float32): (lib.cublasSgemm_v2, ctypes.c_float(1.0), ctypes.c_float(0.0)),
            cupy.dtype(cupy.float64): (lib.cublasDgemm_v2, ctypes.c_double(1.0), ctypes.c_double(0.0)),
        }
        self._stream = None

    def set_tf32(self, enabled: bool) -> None:
        """Let float32 GEMMs use TF32 tensor cores (10-bit mantissa inputs, float32 sums)."""
        mode = _TF32_TENSOR_OP_MATH if enabled else _DEFAULT_MATH
        self._check(self.lib.cublasSetMathMode(self.handle, mode), "cublasSetMathMode")

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

    def gemm(self, a, b):
        """Row-major ``a (m, k) @ b (k, n)`` into a new (m, n) array.

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
        if status != 0:
            raise RuntimeError(f"cuBLAS gemm failed with status {status}")
        return out


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
        self._softmax: dict = {}
        self._ones_cache: dict = {}
        self._lock = threading.Lock()
        self.tf32 = False

    def prepare(self, device_id: int) -> None:
        """Create the cuBLAS handle and workspace now (never inside a graph capture)."""
        if device_id not in self._cublas:
            with self._lock:
                if device_id not in self._cublas:
                    handle = _Cublas(device_id)
                    handle.set_tf32(self.tf32)
                    self._cublas[device_id] = handle

    def set_tf32(self, enabled: bool) -> None:
        """TF32 tensor cores for every float32 GEMM of xpnet's handles (off by default: exact fp32)."""
        self.tf32 = bool(enabled)
        for handle in self._cublas.values():
            handle.set_tf32(self.tf32)

    # -- matrix product ----------------------------------------------------------
    def matmul(self, a, b):
        """``a @ b`` for 2-D float32/float64 arrays through our cuBLAS handle."""
        if a.ndim != 2 or b.ndim != 2 or a.dtype != b.dtype or a.dtype.char not in "fd":
            return a @ b
        if a.shape[1] != b.shape[0]:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not align")
        device = a.device.id
        if device not in self._cublas:
            self.prepare(device)
        return self._cublas[device].gemm(a, b)

    def column_sums(self, a):
        """``sum(a, axis=0)`` of a 2-D float array as ``ones(N) @ a`` through cuBLAS,
        which reads ``a`` once at full bandwidth (CuPy's axis-0 reduction does not)."""
        if a.ndim != 2 or a.dtype.char not in "fd":
            return a.sum(axis=0)
        ones = self._ones(a.shape[0], a.dtype)
        return self.matmul(ones, a).reshape(a.shape[1])

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

    def softmax_loss(self, x, y):
        """Loss (0-d) and dx (N, C) in one launch; x (N, C) float, y (N,) integer labels."""
        n, c = x.shape
        kernel = self._softmax_kernel(x.dtype)
        x = cupy.ascontiguousarray(x)
        y = cupy.ascontiguousarray(y.astype(cupy.int64, copy=False))
        dx = cupy.empty_like(x)
        loss = cupy.empty((), dtype=x.dtype)
        kernel((1,), (256,), (x, y, cupy.int32(n), cupy.int32(c), dx, loss))
        return loss, dx

    def _softmax_kernel(self, dtype):
        dtype = cupy.dtype(dtype)
        if dtype not in self._softmax:
            t = {"f": "float", "d": "double"}[dtype.char]
            source = _SOFTMAX_SOURCE.replace("{T}", t).replace("{name}", t)
            self._softmax[dtype] = cupy.RawKernel(source, f"softmax_loss_{t}")
        return self._softmax[dtype]

    @staticmethod
    def relu_backward(dout, x):
        return _relu_backward(dout, x)

    @staticmethod
    def im2col(x, kh, kw, stride, pad, h_out, w_out):
        """(C·KH·KW, N·H'·W') columns of x (N, C, H, W) zero-padded by ``pad``, in one launch."""
        n, c, h, w = x.shape
        cols = cupy.empty((c * kh * kw, n * h_out * w_out), dtype=x.dtype)
        _im2col(cupy.ascontiguousarray(x), c, h, w, kh, kw, n, h_out, w_out, stride, pad, cols)
        return cols

    @staticmethod
    def col2im(cols, shape, kh, kw, stride, pad, h_out, w_out):
        """The adjoint of :meth:`im2col`: dx of ``shape`` (N, C, H, W), overlapping windows added."""
        n, c, h, w = shape
        dx = cupy.empty(shape, dtype=cols.dtype)
        _col2im(cupy.ascontiguousarray(cols), c, h, w, kh, kw, n, h_out, w_out, stride, pad, dx)
        return dx

    @staticmethod
    def gelu_forward(x):
        """(x·Φ(x), Φ(x)) in one kernel."""
        return _gelu_forward(x)

    @staticmethod
    def gelu_backward(dout, x, cdf):
        return _gelu_backward(dout, x, cdf)

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
