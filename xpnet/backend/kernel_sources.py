"""The source of xpnet's CUDA kernels, as plain text that needs no CuPy to import.

:mod:`xpnet.backend.cupy_kernels` builds CuPy kernels from these definitions; the
test suite also compiles them for the CPU with a C++ compiler and checks each one
against the array-API reference, so the kernels' arithmetic is tested on machines
without a GPU. An :class:`Elementwise` has CuPy's ElementwiseKernel arguments: each
non-raw argument is one element at index ``i``, ``raw`` ones are whole arrays
indexed by hand, ``T`` is the floating type of the call.
"""

from __future__ import annotations

import re
from typing import NamedTuple


class Elementwise(NamedTuple):
    """The arguments of ``cupy.ElementwiseKernel(in_params, out_params, operation, name)``."""

    in_params: str
    out_params: str
    operation: str
    name: str


class Reduction(NamedTuple):
    """The arguments of ``cupy.ReductionKernel``: ``map_expr`` of each element, summed
    (``a + b`` from ``identity``) over the reduced axes, then ``post_map_expr``."""

    in_params: str
    out_params: str
    map_expr: str
    reduce_expr: str
    post_map_expr: str
    identity: str
    name: str


def with_type(kernel, placeholder: str, dtype: str):
    """``kernel`` (an Elementwise or a Reduction) with the type name ``placeholder`` fixed
    to ``dtype`` ("float32" or "float64"): by that name in its parameters, as CuPy reads
    them, and by its C name (float, double) in its code."""
    c_type = {"float32": "float", "float64": "double"}[dtype]
    word = re.compile(rf"\b{re.escape(placeholder)}\b")
    return type(kernel)(
        *(word.sub(dtype if name.endswith("_params") else c_type, field) for name, field in zip(kernel._fields, kernel))
    )


# One block; {T} is float or double, {name} the same word (the kernel's suffix).
SOFTMAX_LOSS = r"""
extern "C" __global__ void softmax_loss_{name}(
        const {T}* __restrict__ x, const long long* __restrict__ y, const int n, const int c,
        const {T} on_target, const {T} off_target, const {T} scale,
        {T}* __restrict__ dx, {T}* __restrict__ loss) {
    // One block: each thread takes whole rows; the loss is reduced in double. The target of
    // row i is off_target everywhere and off_target + on_target at its label (label
    // smoothing: on_target = 1 - eps, off_target = eps / c); scale is 1/n for the mean.
    __shared__ double partial[256];
    double total = 0.0;
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
        const {T} log_s = log(s);
        const {T} inv_s = ({T})1 / s;
        for (int j = 0; j < c; ++j) {
            const {T} target = j == label ? ({T})(off_target + on_target) : off_target;
            if (target != ({T})0) total += (double)target * (double)(log_s - (xr[j] - m));
            const {T} p = exp(xr[j] - m) * inv_s;
            dr[j] = (p - target) * scale;
        }
    }
    partial[threadIdx.x] = total;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) loss[0] = ({T})(partial[0] * (double)scale);
}
"""

RELU_BACKWARD = Elementwise("T dout, T x", "T dx", "dx = x > (T)0 ? dout : (T)0", "xpnet_relu_backward")
BIAS_RELU = Elementwise("T a, T b", "T out", "out = max(a + b, (T)0)", "xpnet_bias_relu")
# The exact GELU in one pass each way, with CUDA's erfc (the array-API reference spends
# about 80 elementwise operations on it, each a launch and a trip through memory). Its
# constants and Φ(x) are taken in the type of x·1.0f: T's own for float and double, float for
# CuPy's float16 (whose arithmetic is float's), as the reference evaluates float16 in float32.
# A float16 constant (1/√2 as 0.70703) moved Φ by up to 7e-4 of itself near x = -2.5, and x times
# the stored float16 Φ(x) lost out's last places where Φ(x) is subnormal; out is rounded once.


def _wide(value: str) -> str:
    """C++: the type in which the GELU kernels compute from ``value`` (of type T)."""
    return f"decltype({value} * 1.0f)"


def _gelu_unrounded_cdf(y: str) -> str:
    """C++: Φ(y) in the wide type, as GELU_FORWARD multiplies y by it."""
    return f"(({_wide(y)})0.5 * erfc(-{y} * ({_wide(y)})0.70710678118654752440))"


def _gelu_derivative(y: str, cdf: str) -> str:
    """C++: Φ(y) + y·φ(y) in the wide type, with ``cdf`` for Φ(y) (as stored, or recomputed)."""
    return f"({cdf} + {y} * exp(({_wide(y)})-0.5 * {y} * {y}) * ({_wide(y)})0.39894228040143267794)"


GELU_FORWARD = Elementwise(
    "T x",
    "T out, T cdf",
    f"const auto phi = {_gelu_unrounded_cdf('x')}; cdf = phi; out = x * phi",
    "xpnet_gelu_forward",
)
GELU_BACKWARD = Elementwise(
    "T dout, T x, T cdf",
    "T dx",
    f"dx = dout * {_gelu_derivative('x', 'cdf')}",
    "xpnet_gelu_backward",
)


def divisors(*sizes: int) -> tuple:
    """The kernel arguments with which :func:`_coordinates`' code divides by each of
    ``sizes`` (1 ≤ size < 2^32), in order: its multiplier and its shift, such that for every
    32-bit t, t / size == (t + umulhi(t, multiplier)) >> shift with the sum in 64 bits
    (Granlund and Montgomery's division by an invariant integer, as PyTorch's IntDivider)."""
    found = []
    for size in sizes:
        if not 1 <= size < 1 << 32:
            raise ValueError(f"a kernel cannot divide by {size}: sizes must be in [1, 2^32)")
        shift = (size - 1).bit_length()  # the least s with 2^s >= size
        found += [((1 << 32) * ((1 << shift) - size)) // size + 1, shift]
    return tuple(found)


def _divisor_params(sizes: str) -> str:
    """The in_params that carry :func:`divisors` of ``sizes`` (their names) to a kernel."""
    return "".join(f", uint32 {z}_magic, uint32 {z}_shift" for z in sizes.split())


def _coordinates(names: str, sizes: str, rest: str, rest_type: str = "int") -> str:
    """C++ that splits the flat index ``i`` into coordinates: each of ``names`` is ``i``'s
    digit in the matching one of ``sizes`` (the fastest-varying first), ``rest`` what is left
    above them. The kernel takes :func:`_divisor_params` of ``sizes``. Wherever i fits in 32
    bits (every launch under 2^32 elements) each division is a multiply-high, an add and a
    shift: a division by a value known only at run time is a long instruction sequence on
    NVIDIA GPUs (a 64-bit one longer still), and im2col does five per element of its columns."""
    pairs = list(zip(names.split(), sizes.split(), strict=True))
    fast = " ".join(
        f"q = (unsigned int)(((unsigned long long)__umulhi(t, {z}_magic) + t) >> {z}_shift); {n} = t - q * {z}; t = q;"
        for n, z in pairs
    )
    slow = " ".join(f"{n} = t % {z}; t /= {z};" for n, z in pairs)
    return f"""
    int {", ".join(names.split())};
    {rest_type} {rest};
    if (i <= 0xFFFFFFFFLL) {{
        unsigned int t = (unsigned int)i, q;
        {fast} {rest} = t;
    }} else {{
        long long t = i;
        {slow} {rest} = t;
    }}"""


def _covering(o: str, position: str, window: str, count: str) -> str:
    """C++ that declares ``{o}_lo`` and ``{o}_hi``: along one axis, the first and last of the
    ``count`` output positions whose window (``window`` wide, starting at output·stride)
    covers ``position`` (a non-negative int expression, in padded coordinates); none when
    ``{o}_hi < {o}_lo``. Two unsigned divisions by the stride, none when it is 1: a gather
    that tried each window offset would divide twice per offset."""
    return f"""
    const unsigned int {o}_at = (unsigned int)({position});
    const int {o}_lo = {o}_at < (unsigned int){window} ? 0
        : (int)(stride == 1 ? {o}_at - {window} + 1 : ({o}_at - {window}) / (unsigned int)stride + 1);
    const int {o}_hi = min((int)(stride == 1 ? {o}_at : {o}_at / (unsigned int)stride), {count} - 1);"""


# im2col and col2im in one launch each (the array-API code takes HH·WW strided copies).
# cols is (C, KH, KW, N, OH, OW) flattened: one thread per element, zero where the window
# sees padding. col2im gathers instead of scattering, one thread per element of dx, so
# that overlapping windows add up without atomics, over the output positions that cover
# the element, in the order (ki, kj) that the array-API code adds them. The images x and
# dx are stored (N, C, H, W), or (C, N, H, W) where channels_outer is 1 (a convolution's
# output on this path is stored so, and the layers up to the next pool keep that order): plane p of
# the stored array is image p / C's channel p % C, or channel p / N of image p % N.
IM2COL = Elementwise(
    "raw T x, int32 C, int32 H, int32 W, int32 KH, int32 KW, int32 N, int32 OH, int32 OW, int32 stride, int32 pad,"
    " int32 channels_outer" + _divisor_params("OW OH N KW KH"),
    "T col",
    _coordinates("ow oh n kj ki", "OW OH N KW KH", "c")
    + """
    const int ih = oh * stride + ki - pad;
    const int iw = ow * stride + kj - pad;
    const long long plane = channels_outer ? (long long)c * N + n : (long long)n * C + c;
    col = (ih >= 0 && ih < H && iw >= 0 && iw < W) ? x[(plane * H + ih) * W + iw] : (T)0;
    """,
    "xpnet_im2col",
)
# P is the size of the stored array's second axis: C, or N where channels_outer is 1.
COL2IM = Elementwise(
    "raw T cols, int32 C, int32 H, int32 W, int32 KH, int32 KW, int32 N, int32 OH, int32 OW, int32 stride, int32 pad,"
    " int32 channels_outer, int32 P" + _divisor_params("W H P"),
    "T dx",
    _coordinates("iw ih inner", "W H P", "outer")
    + """
    const int n = channels_outer ? inner : outer, c = channels_outer ? outer : inner;"""
    + _covering("oh", "ih + pad", "KH", "OH")
    + _covering("ow", "iw + pad", "KW", "OW")
    + """
    decltype(+T()) total = 0;  // the type T's arithmetic yields: float for float16
    for (int oh = oh_hi; oh >= oh_lo; --oh) {  // descending: ki = ih + pad - oh·stride ascends
        const int ki = ih + pad - oh * stride;
        for (int ow = ow_hi; ow >= ow_lo; --ow) {
            const int kj = iw + pad - ow * stride;
            total += cols[(((((long long)c * KH + ki) * KW + kj) * N + n) * OH + oh) * OW + ow];
        }
    }
    dx = (T)total;
    """,
    "xpnet_col2im",
)
# Max pooling, one thread per output element: the window's first maximum in row-major
# order (a NaN wins and stays) and its offset ki·PW + kj, which is all the backward pass
# needs (the array-API code keeps the output and compares it again). The input x is stored
# (N, C, H, W), or (C, N, H, W) where channels_outer is 1 (a convolution's output on the
# im2col path); out and argmax are (N, C, OH, OW) either way, so that a layer that flattens
# the pooled images (an affine layer, a global pool's head) reads them without a copy. The
# backward pass gathers, one thread per element of dx (stored as x is; P is the size of its
# second axis, C, or N where channels_outer is 1), adding the windows that picked it in the
# order (ki, kj) that the array-API code adds them.
MAX_POOL_FORWARD = Elementwise(
    "raw T x, int32 H, int32 W, int32 PH, int32 PW, int32 OH, int32 OW, int32 stride, int32 C, int32 N,"
    " int32 channels_outer" + _divisor_params("OW OH C"),
    "T out, int32 argmax",
    _coordinates("ow oh c", "OW OH C", "n", "long long")
    + """
    const long long plane = channels_outer ? (long long)c * N + n : n * C + c;
    const long long corner = (plane * H + (long long)oh * stride) * W + (long long)ow * stride;
    T best = x[corner];
    int best_k = 0;
    for (int ki = 0; ki < PH; ++ki) {
        for (int kj = 0; kj < PW; ++kj) {
            const T v = x[corner + (long long)ki * W + kj];
            if (best == best && !(v <= best)) {
                best = v;
                best_k = ki * PW + kj;
            }
        }
    }
    out = best;
    argmax = best_k;
    """,
    "xpnet_max_pool_forward",
)
MAX_POOL_BACKWARD = Elementwise(
    "raw T dout, raw int32 argmax, int32 H, int32 W, int32 PH, int32 PW, int32 OH, int32 OW, int32 stride, int32 C,"
    " int32 channels_outer, int32 P" + _divisor_params("W H P"),
    "T dx",
    _coordinates("iw ih inner", "W H P", "outer")
    + """
    const int n = channels_outer ? inner : outer, c = channels_outer ? outer : inner;
    const long long plane = (long long)n * C + c;  // in dout and argmax, (N, C, OH, OW)"""
    + _covering("oh", "ih", "PH", "OH")
    + _covering("ow", "iw", "PW", "OW")
    + """
    decltype(+T()) total = 0;  // the type T's arithmetic yields: float for float16
    for (int oh = oh_hi; oh >= oh_lo; --oh) {  // descending: ki = ih - oh·stride ascends
        const int ki = ih - oh * stride;
        for (int ow = ow_hi; ow >= ow_lo; --ow) {
            const long long o = (plane * OH + oh) * OW + ow;
            if (argmax[o] == ki * PW + iw - ow * stride) total += dout[o];
        }
    }
    dx = (T)total;
    """,
    "xpnet_max_pool_backward",
)
# A batchnorm's per-channel statistics from its per-plane sums (one sum over H·W for each
# image and channel, stored (C, N) or (N, C): the strides say which), one block per channel:
# the channel's total, total / count, and 1 / sqrt(total / count + eps). One launch in place
# of a second reduction and three or four elementwise ones on (C,) arrays.
# {T} is float or double, {name} the same word; blockDim.x a power of two, at most 256.
CHANNEL_TOTALS = r"""
extern "C" __global__ void channel_totals_{name}(
        const {T}* __restrict__ sums, const long long channel_stride, const long long batch_stride,
        const int channels, const int batch, const {T} count, const {T} eps,
        {T}* __restrict__ total, {T}* __restrict__ mean, {T}* __restrict__ inv_std) {
    __shared__ {T} partial[256];
    for (int c = blockIdx.x; c < channels; c += gridDim.x) {
        {T} t = 0;
        for (int j = threadIdx.x; j < batch; j += blockDim.x) t += sums[c * channel_stride + j * batch_stride];
        partial[threadIdx.x] = t;
        __syncthreads();
        for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
            if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            const {T} m = partial[0] / count;
            total[c] = partial[0];
            mean[c] = m;
            inv_std[c] = ({T})1 / sqrt(m + eps);
        }
        __syncthreads();  // partial is reused for the next channel
    }
}
"""
# The raw kernels, each built per float type by replacing {T} and {name}.
RAW_KERNELS = ("SOFTMAX_LOSS", "CHANNEL_TOTALS", "PLANE_SUMS", "DIRECT_CONV_FORWARD", "DIRECT_CONV_FILTER_GRAD")
# The raw kernels above that are also built per filter size ({C}, {KH} and {KW}).
FILTER_SIZE_KERNELS = ("DIRECT_CONV_FORWARD", "DIRECT_CONV_FILTER_GRAD")


def raw_source(source: str, c_type: str, **sizes: int) -> str:
    """A raw kernel's source for ``c_type`` ("float" or "double": its {T} and {name}), with
    each {KEY} of ``sizes`` (a filter size's C, KH and KW) filled in."""
    for key, value in {"T": c_type, "name": c_type, **sizes}.items():
        source = source.replace("{" + key + "}", str(value))
    return source


# The running averages of a batchnorm's statistics in one pass, in place, rounded as
# xpnet.layers.update_running_statistics rounds them: R the buffers' type, F the batch's.
RUNNING_AVERAGES = Elementwise(
    "F mean, F var, R momentum, F rest, F var_scale",
    "R running_mean, R running_var",
    "running_mean = running_mean * momentum + (R)(rest * mean); "
    "running_var = running_var * momentum + (R)(rest * (var * var_scale))",
    "xpnet_running_averages",
)

# Spatial batchnorm: per-channel values arrive as (1, C, 1, 1) arrays (or a scalar
# scale of 1 without gamma), broadcast over (N, C, H, W). Each pass reads the
# activations once: the variance around a given mean, the normalisation with x̂ kept
# for the backward pass, and dx from the two per-channel means of the gradient.
# T is the activations' type, F that of the statistics and the per-channel values:
# the same type, or float for float16 activations, whose sums and statistics then
# stay in float (with T = F the arithmetic is the same as without the casts).
# Σ(x - shift): a batchnorm's first pass, around a value of its own channel (or group) taken
# from the data, so that the sum is of deviations and keeps digits that a plain Σx near 1000
# loses (see CupyKernels.spatial_batchnorm_train).
SHIFTED_SUM = Reduction(
    "T x, F shift",
    "F total",
    "(F)x - shift",
    "a + b",
    "total = a",
    "0",
    "xpnet_shifted_sum",
)
SQUARED_DEVIATION_SUM = Reduction(
    "T x, F mean",
    "F total",
    "((F)x - mean) * ((F)x - mean)",
    "a + b",
    "total = a",
    "0",
    "xpnet_squared_deviation_sum",
)
# No array argument has the type F here, and CuPy binds a placeholder only from an array:
# the kernel is built with F fixed (with_type), once per statistics type.
PRODUCT_SUM = Reduction(
    "T dout, T x_hat", "F total", "(F)dout * (F)x_hat", "a + b", "total = a", "0", "xpnet_product_sum"
)
# The batch mean arrives as shift + shifted_mean, and x - shift - shifted_mean is taken in that
# order: x - shift is exact for values near the shift, and the small shifted_mean keeps its own
# digits, where x - mean with the mean rounded to F was off by up to half its last place
# (3e-5 near 1000 in float32).
BATCHNORM_TRAIN = Elementwise(
    "T x, F shift, F shifted_mean, F inv_std, F gamma, F beta",
    "T out, T x_hat",
    "const F h = ((F)x - shift - shifted_mean) * inv_std; x_hat = (T)h; out = (T)(gamma * h + beta)",
    "xpnet_batchnorm_train",
)
BATCHNORM_APPLY = Elementwise(
    "T x, F mean, F inv_std, F gamma, F beta",
    "T out",
    "out = (T)(gamma * (((F)x - mean) * inv_std) + beta)",
    "xpnet_batchnorm_apply",
)
# dx = gamma/std · (dout - mean(dout) - x̂·mean(dout·x̂)), the means over N, H and W.
BATCHNORM_BACKWARD = Elementwise(
    "T dout, T x_hat, F scale, F mean_dout, F mean_dout_x_hat",
    "T dx",
    "dx = (T)(scale * ((F)dout - mean_dout - (F)x_hat * mean_dout_x_hat))",
    "xpnet_batchnorm_backward",
)
# Groupnorm's dx = 1/std · (gamma·dout - mean(gamma·dout) - x̂·mean(gamma·dout·x̂)), the means
# over each image's group of channels and positions (computed from per-plane sums).
GROUPNORM_BACKWARD = Elementwise(
    "T dout, T x_hat, F gamma, F inv_std, F mean_g, F mean_g_x_hat",
    "T dx",
    "dx = (T)(inv_std * (gamma * (F)dout - mean_g - (F)x_hat * mean_g_x_hat))",
    "xpnet_groupnorm_backward",
)
# Spatial batchnorm followed by the exact GELU (FastConvNet's blocks), fused. The forward
# pass writes x̂ and the GELU's output only; the backward passes recompute the batchnorm's
# output y = gamma·x̂ + beta and the GELU's derivative at y from x̂ and the upstream
# gradient, so neither y nor Φ(y) is stored or read back. Each value is rounded to T where
# the separate kernels store it (y, Φ(y), the GELU's input gradient g), so that for float32
# and float64 the fused passes give the separate ones' results; for float16 the recomputed
# y starts from the stored x̂ and may differ from the stored y in its last bit.
_BN_OUT_RECOMPUTED = "((T)(gamma * (F)x_hat + beta))"


def _gelu_cdf(y: str) -> str:
    """C++: Φ(y) rounded to T, as GELU_FORWARD stores it."""
    return f"((T){_gelu_unrounded_cdf(y)})"


def _gelu_input_grad(y: str) -> str:
    """C++: dout times the GELU's derivative at y, rounded to T, as GELU_BACKWARD stores it."""
    return f"((T)(dout * {_gelu_derivative(y, _gelu_cdf(y))}))"


BATCHNORM_GELU_TRAIN = Elementwise(
    "T x, F shift, F shifted_mean, F inv_std, F gamma, F beta",
    "T out, T x_hat",
    "const F h = ((F)x - shift - shifted_mean) * inv_std; x_hat = (T)h; const T y = (T)(gamma * h + beta); "
    f"out = y * {_gelu_unrounded_cdf('y')}",
    "xpnet_batchnorm_gelu_train",
)
BATCHNORM_GELU_APPLY = Elementwise(
    "T x, F mean, F inv_std, F gamma, F beta",
    "T out",
    f"const T y = (T)(gamma * (((F)x - mean) * inv_std) + beta); out = y * {_gelu_unrounded_cdf('y')}",
    "xpnet_batchnorm_gelu_apply",
)
# The per-channel sums of g and of g·x̂ (dbeta and dgamma), each reading dout and x̂ once.
GELU_GRAD_SUM = Reduction(
    "T dout, T x_hat, F gamma, F beta",
    "F total",
    f"(F){_gelu_input_grad(_BN_OUT_RECOMPUTED)}",
    "a + b",
    "total = a",
    "0",
    "xpnet_gelu_grad_sum",
)
GELU_GRAD_X_HAT_SUM = Reduction(
    "T dout, T x_hat, F gamma, F beta",
    "F total",
    f"(F){_gelu_input_grad(_BN_OUT_RECOMPUTED)} * (F)x_hat",
    "a + b",
    "total = a",
    "0",
    "xpnet_gelu_grad_x_hat_sum",
)
# BATCHNORM_BACKWARD with g, the gradient at the batchnorm's output, recomputed.
BATCHNORM_GELU_BACKWARD = Elementwise(
    "T dout, T x_hat, F gamma, F beta, F scale, F mean_g, F mean_g_x_hat",
    "T dx",
    f"const T g = {_gelu_input_grad(_BN_OUT_RECOMPUTED)}; dx = (T)(scale * ((F)g - mean_g - (F)x_hat * mean_g_x_hat))",
    "xpnet_batchnorm_gelu_backward",
)
# Per-plane sums for spatial batchnorm in one launch, one warp per plane: the lanes read
# the plane's H·W values side by side and add up by shuffles. CuPy's reductions give each
# plane a share of a 512-thread block and add up through shared memory, ten steps with a
# barrier each, which leaves such short planes (H·W of 225, 49 or 9) far from the memory's
# bandwidth. Planes are stored one after another, plane p being channel p % channels of an
# image (or, channels_outer, channel p / batch). ``mode`` picks the sums, the same maps as
# the reductions above: 0 Σx; 1 Σ(x - mean)² (p0 the means); 2 Σdout and Σdout·x̂ (a is dout,
# b x̂); 3 Σg and Σg·x̂ with g the gradient at the batchnorm's output recomputed through the
# GELU after it (p0 gamma, p1 beta); 4 Σ(x - shift) (p0 the shifts). sum1 is written in modes
# 2 and 3 only. {T} is float or double, {name} the same word; blockDim.x a multiple of warpSize.
PLANE_SUMS = (
    r"""
typedef {T} T;
typedef {T} F;
extern "C" __global__ void plane_sums_{name}(
        const T* __restrict__ a, const T* __restrict__ b, const F* __restrict__ p0, const F* __restrict__ p1,
        const long long planes, const int plane_size, const int channels, const int batch,
        const int channels_outer, const int mode, F* __restrict__ sum0, F* __restrict__ sum1) {
    const int lane = threadIdx.x % warpSize;
    const long long warps = (long long)gridDim.x * blockDim.x / warpSize;
    // p is the same for every lane of a warp, so whole warps leave the loop together
    for (long long p = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / warpSize; p < planes; p += warps) {
        const int c = channels_outer ? (int)(p / batch) : (int)(p % channels);
        const T* plane_a = a + p * plane_size;
        const T* plane_b = b + p * plane_size;
        F s0 = 0, s1 = 0;
        for (int j = lane; j < plane_size; j += warpSize) {
            if (mode == 0) {
                s0 += (F)plane_a[j];
            } else if (mode == 4) {
                s0 += (F)plane_a[j] - p0[c];
            } else if (mode == 1) {
                const F d = (F)plane_a[j] - p0[c];
                s0 += d * d;
            } else if (mode == 2) {
                s0 += (F)plane_a[j];
                s1 += (F)plane_a[j] * (F)plane_b[j];
            } else {
                const T dout = plane_a[j], x_hat = plane_b[j];
                const F gamma = p0[c], beta = p1[c];
                const F g = (F)"""
    + _gelu_input_grad(_BN_OUT_RECOMPUTED)
    + r""";
                s0 += g;
                s1 += g * (F)x_hat;
            }
        }
        for (int offset = warpSize / 2; offset > 0; offset /= 2) {
            s0 += __shfl_down_sync(0xffffffffu, s0, offset);
            s1 += __shfl_down_sync(0xffffffffu, s1, offset);
        }
        if (lane == 0) {
            sum0[p] = s0;
            if (mode == 2 || mode == 3) sum1[p] = s1;
        }
    }
}
"""
)
# Convolutions with small filters (C·KH·KW taps, at most DIRECT_CONV_MAX_TAPS: a network's
# first layer, such as the fast recipe's 3 -> 24 2x2 whitening conv), without a column matrix.
# im2col would write each input value KH·KW times and a GEMM with so few taps reads them back
# at a small fraction of its speed; here every output reads its window from the cache. Built
# per filter size ({C}, {KH} and {KW} fixed, with {T} and {name} as for the raw kernels above),
# so that the loops over the filter unroll and a thread's sums stay in registers. x is stored
# (N, C, H, W), or (C, N, H, W) where x_channels_outer is 1; out is stored (F, N, OH, OW), as
# the im2col path stores a convolution's output. Each output is the sum over (c, ki, kj) in
# that order, a tap on the padding multiplying zero (so a NaN in w reaches out as the GEMM's does).
DIRECT_CONV_MAX_TAPS = 32


def _over_window(statement: str) -> str:
    """C++ that runs ``statement`` for each tap (c, ki, kj) of the window of output
    (n, oh, ow), in that order, with k = (c·KH + ki)·KW + kj and v the input value the tap
    sees (zero where it sees the padding)."""
    return f"""
#pragma unroll
    for (int c = 0; c < C; ++c) {{
        const long long plane = x_channels_outer ? (long long)c * N + n : (long long)n * C + c;
#pragma unroll
        for (int ki = 0; ki < KH; ++ki) {{
            const int ih = oh * stride + ki - pad;
#pragma unroll
            for (int kj = 0; kj < KW; ++kj) {{
                const int iw = ow * stride + kj - pad, k = (c * KH + ki) * KW + kj;
                const T v = (ih >= 0 && ih < H && iw >= 0 && iw < W) ? x[(plane * H + ih) * W + iw] : (T)0;
                {statement}
            }}
        }}
    }}"""


DIRECT_CONV_FORWARD = (
    r"""
typedef {T} T;
extern "C" __global__ void direct_conv_forward_{name}(
        const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b, const int has_bias,
        const long long total, const int N, const int H, const int W, const int OH, const int OW,
        const int stride, const int pad, const int x_channels_outer,
        const unsigned int OW_magic, const unsigned int OW_shift, const unsigned int OH_magic,
        const unsigned int OH_shift, const unsigned int N_magic, const unsigned int N_shift, T* __restrict__ out) {
    const int C = {C}, KH = {KH}, KW = {KW};
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {"""
    + _coordinates("ow oh n", "OW OH N", "f")
    + r"""
        T sum = 0;"""
    + _over_window("sum += v * w[f * (C * KH * KW) + k];")
    + r"""
        out[i] = has_bias ? sum + b[f] : sum;
    }
}
"""
)
# The filters' gradient of DIRECT_CONV_FORWARD's convolution: dw[f, c, ki, kj] is the sum over
# the output positions of dout times the input value that tap sees there. Block (bx, by) takes
# filters by, by + gridDim.y, ... and, of each, the positions bx·blockDim.x + thread, stepping by
# the grid's threads; a thread keeps one sum per tap in registers, a warp adds them by shuffles,
# the block through shared memory, and partial[f, bx, tap] (``blocks`` = gridDim.x) gets the
# block's sums, which the caller adds over bx. dout is stored (N, F, OH, OW), or (F, N, OH, OW)
# where dout_channels_outer is 1. blockDim.x a multiple of warpSize, at most 1024.
DIRECT_CONV_FILTER_GRAD = (
    r"""
typedef {T} T;
extern "C" __global__ void direct_conv_filter_grad_{name}(
        const T* __restrict__ dout, const T* __restrict__ x, const long long positions, const int F,
        const int N, const int H, const int W, const int OH, const int OW, const int stride, const int pad,
        const int x_channels_outer, const int dout_channels_outer, const int blocks,
        const unsigned int OW_magic, const unsigned int OW_shift, const unsigned int OH_magic,
        const unsigned int OH_shift, T* __restrict__ partial) {
    const int C = {C}, KH = {KH}, KW = {KW};
    enum { TAPS = {C} * {KH} * {KW} };
    __shared__ T warp_sums[32][TAPS];
    const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
    const int warps = (blockDim.x + warpSize - 1) / warpSize;
    for (int f = blockIdx.y; f < F; f += gridDim.y) {
        T sums[TAPS];
#pragma unroll
        for (int k = 0; k < TAPS; ++k) sums[k] = 0;
        for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < positions;
             i += (long long)gridDim.x * blockDim.x) {"""
    + _coordinates("ow oh", "OW OH", "n")
    + r"""
            const T g = dout_channels_outer ? dout[(long long)f * positions + i]
                                            : dout[(((long long)n * F + f) * OH + oh) * OW + ow];
"""
    + _over_window("sums[k] += g * v;")
    + r"""
        }
#pragma unroll
        for (int k = 0; k < TAPS; ++k) {
            T s = sums[k];
            for (int offset = warpSize / 2; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
            if (lane == 0) warp_sums[warp][k] = s;
        }
        __syncthreads();
        for (int k = threadIdx.x; k < TAPS; k += blockDim.x) {
            T s = 0;
            for (int j = 0; j < warps; ++j) s += warp_sums[j][k];
            partial[((long long)f * blocks + blockIdx.x) * TAPS + k] = s;
        }
        __syncthreads();  // warp_sums is reused for the next filter
    }
}
"""
)
# The kernels that float16 activations pass through (FastConvNet's layers with
# activation_dtype="float16"), built with T = float16 and F = float as well. CuPy's
# float16 converts to float for every operation, so their arithmetic is float's.
FLOAT16_KERNELS = (
    "GELU_FORWARD",
    "GELU_BACKWARD",
    "IM2COL",
    "COL2IM",
    "MAX_POOL_FORWARD",
    "MAX_POOL_BACKWARD",
    "SHIFTED_SUM",
    "SQUARED_DEVIATION_SUM",
    "PRODUCT_SUM",
    "BATCHNORM_TRAIN",
    "BATCHNORM_APPLY",
    "BATCHNORM_BACKWARD",
    "BATCHNORM_GELU_TRAIN",
    "BATCHNORM_GELU_APPLY",
    "GELU_GRAD_SUM",
    "GELU_GRAD_X_HAT_SUM",
    "BATCHNORM_GELU_BACKWARD",
    "GROUPNORM_BACKWARD",
)
SGD = Elementwise("T dw, T lr", "T w", "w = w - lr * dw", "xpnet_sgd")
SGD_MOMENTUM = Elementwise("T dw, T lr, T mu", "T w, T v", "v = mu * v - lr * dw; w = w + v", "xpnet_sgd_momentum")
SGD_NESTEROV = Elementwise(
    "T dw, T lr, T mu",
    "T w, T v",
    "T v_old = v; v = mu * v - lr * dw; w = w + v + mu * (v - v_old)",
    "xpnet_sgd_nesterov",
)
# PyTorch's SGD(nesterov=True, weight_decay=wd): the decay joins the gradient before the momentum.
NESTEROV_SGD = Elementwise(
    "T dw, T lr, T mu, T wd",
    "T w, T v",
    "const T g = dw + wd * w; v = mu * v + g; w = w - lr * (g + mu * v)",
    "xpnet_nesterov_sgd",
)
# Lookahead at one of its points (xpnet.training.lookahead): the slow copy moves by ``step``
# of the way towards the fast array, which then takes it; as the reference rounds it.
LOOKAHEAD = Elementwise(
    "T step", "T slow, T fast", "slow = slow + step * (fast - slow); fast = slow", "xpnet_lookahead"
)
RMSPROP = Elementwise(
    "T dw, T lr, T decay, T eps",
    "T w, T cache",
    "cache = decay * cache + ((T)1 - decay) * dw * dw; w = w - lr * dw / (sqrt(cache) + eps)",
    "xpnet_rmsprop",
)
# Adam reads its step count from the device, so a CUDA graph replaying the update
# sees each new count (a count passed as an argument would be frozen at capture).
ADAM = Elementwise(
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
