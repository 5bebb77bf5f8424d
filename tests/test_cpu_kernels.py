"""The CPU stand-in runs a raw kernel's launch as a GPU would: every thread of every block,
with its own indices, barriers and warp shuffles that wait for the threads they name, and
an error, not a quiet answer, where a GPU's behaviour would be undefined.

The fused kernels' tests (tests/test_kernel_sources.py) rely on it for the block sums and
warp shuffles of the raw kernels; these tests check the stand-in itself, with kernels
written here, through both of its ways of switching between threads.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from cpu_kernels import COMPILER, run_raw_kernel

pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler to build the kernels with")


@pytest.fixture(params=[False, True], ids=["registers", "ucontext"])
def run(request):
    """run_raw_kernel, its fibers switching by the x86-64 register swap or through ucontext."""

    def launch(source, name, grid, block, *args):
        return run_raw_kernel(source, name, grid, block, *args, ucontext=request.param)

    return launch


INDICES = r"""
extern "C" __global__ void indices(long long* __restrict__ out) {
    const long long block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const long long thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    const long long i = block * blockDim.x * blockDim.y * blockDim.z + thread;
    out[6 * i + 0] = blockIdx.x; out[6 * i + 1] = blockIdx.y; out[6 * i + 2] = blockIdx.z;
    out[6 * i + 3] = threadIdx.x; out[6 * i + 4] = threadIdx.y; out[6 * i + 5] = threadIdx.z;
}
"""


def test_every_thread_of_every_block_runs_once_with_its_own_indices(run):
    grid, block = (3, 2, 2), (4, 3, 2)
    out = np.full((2, 2, 3, 2, 3, 4, 6), -1, dtype=np.int64)  # blocks z, y, x, then threads z, y, x
    run(INDICES, "indices", grid, block, out)
    bz, by, bx, tz, ty, tx = np.meshgrid(*(np.arange(n) for n in out.shape[:6]), indexing="ij")
    np.testing.assert_array_equal(out, np.stack([bx, by, bz, tx, ty, tz], axis=-1))


SHUFFLE = r"""
template <typename V> __device__ void shuffle(const V* in, V* out, const int delta) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    out[i] = __shfl_down_sync(0xffffffffu, in[i], delta);
}
extern "C" __global__ void shuffle_float(const float* in, float* out, const int delta) { shuffle(in, out, delta); }
extern "C" __global__ void shuffle_double(const double* in, double* out, const int delta) { shuffle(in, out, delta); }
extern "C" __global__ void shuffle_int(const int* in, int* out, const int delta) { shuffle(in, out, delta); }
"""


@pytest.mark.parametrize("dtype, name", [(np.float32, "float"), (np.float64, "double"), (np.int32, "int")])
@pytest.mark.parametrize("delta", [1, 2, 16, 31])
def test_a_shuffle_down_gives_each_lane_the_value_of_the_lane_delta_above_within_its_warp(run, dtype, name, delta):
    values = np.arange(2 * 64, dtype=dtype) * 3 + 1  # two blocks of two warps
    out = np.zeros_like(values)
    run(SHUFFLE, f"shuffle_{name}", 2, 64, values, out, np.int32(delta))
    lane = np.arange(values.size) % 32
    source = np.where(lane + delta < 32, np.arange(values.size) + delta, np.arange(values.size))
    np.testing.assert_array_equal(out, values[source])


TREE_SUM = r"""
extern "C" __global__ void tree_sum(const double* in, double* out) {
    __shared__ double partial[256];
    partial[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}
"""


def test_a_block_sum_through_shared_memory_adds_every_threads_value(run):
    values = np.random.default_rng(3).integers(-1000, 1000, (5, 256)).astype(np.float64)
    out = np.zeros(5)
    run(TREE_SUM, "tree_sum", 5, 256, values, out)
    np.testing.assert_array_equal(out, values.sum(axis=1))


@pytest.mark.parametrize("barrier", ["after the stores", "in the loop"])
def test_a_missing_barrier_gives_a_wrong_sum_not_a_lucky_one(run, barrier):
    """Without either barrier, some read of shared memory comes before the write it needs:
    the stand-in runs the warps one after another between barriers, in a shuffled order."""
    first, second = (i for i, line in enumerate(TREE_SUM.splitlines()) if "__syncthreads();" in line)
    lines = TREE_SUM.splitlines()
    del lines[first if barrier == "after the stores" else second]
    values = np.arange(1, 4 * 256 + 1, dtype=np.float64).reshape(4, 256)
    out = np.zeros(4)
    run("\n".join(lines), "tree_sum", 4, 256, values, out)
    assert np.any(out != values.sum(axis=1))


DIVERGENT = r"""
extern "C" __global__ void divergent(const int which, float* out) {
    float v = threadIdx.x;
    if (which == 0 && threadIdx.x < 16) __syncthreads();
    if (which == 1 && threadIdx.x % 32 < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
    if (which == 2) v = __shfl_down_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}
"""


@pytest.mark.parametrize(
    "which, block, message",
    [
        (0, 64, "a __syncthreads() that 16 of the 64 threads"),
        (1, 64, "a full-mask shuffle that 16 of the 32 lanes of warp 0"),
        (2, 48, "a full-mask shuffle that 16 of the 16 lanes of warp 1"),  # a block that ends mid-warp
    ],
    ids=["barrier", "shuffle", "partial warp"],
)
def test_a_barrier_or_shuffle_that_not_every_thread_reaches_is_an_error(run, which, block, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        run(DIVERGENT, "divergent", 1, block, np.int32(which), np.zeros(block, dtype=np.float32))


@pytest.mark.parametrize(
    "grid, block", [(1, 0), (1, 1025), (1, (1, 1, 65)), (0, 32), ((1, 0), 32), ((1, 65536), 32), ((1, 1, 65536), 32)]
)
def test_a_launch_no_gpu_takes_is_an_error(run, grid, block):
    with pytest.raises(RuntimeError, match="a launch of"):
        run(DIVERGENT, "divergent", grid, block, np.int32(3), np.zeros(2048, dtype=np.float32))


# Per filter f, each warp's lane 0 stores its lanes' sum; after the barrier, thread 0 adds
# the warps' sums; the second barrier keeps the next filter's stores from overwriting them first.
WARP_SUMS = r"""
extern "C" __global__ void warp_sums(const double* in, double* out, const int filters) {
    __shared__ double sums[32];
    for (int f = 0; f < filters; ++f) {
        double s = in[f * blockDim.x + threadIdx.x];
        for (int offset = warpSize / 2; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
        if (threadIdx.x % warpSize == 0) sums[threadIdx.x / warpSize] = s;
        __syncthreads();
        if (threadIdx.x == 0) {
            double total = 0;
            for (int w = 0; w < blockDim.x / warpSize; ++w) total += sums[w];
            out[f] = total;
        }
        __syncthreads();
    }
}
"""


@pytest.mark.parametrize("second_barrier", [True, False])
def test_a_warp_runs_ahead_of_the_others_as_far_as_the_barriers_let_it(run, second_barrier):
    """Without the second barrier a warp may store the next filter's sum before thread 0 has
    read this one's, through several shuffles in between: the stand-in lets it."""
    source = WARP_SUMS if second_barrier else WARP_SUMS[: WARP_SUMS.rindex("__syncthreads();")] + "}\n}\n"
    values = np.random.default_rng(4).integers(-9, 9, (5, 256)).astype(np.float64)
    out = np.zeros(5)
    run(source, "warp_sums", 1, 256, values, out, np.int32(5))
    assert np.array_equal(out, values.sum(axis=1)) == second_barrier


OFF_THE_END = r"""
extern "C" __global__ void off_the_end(const float* in, float* out, const int n, const int shift) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i + shift] = in[i - shift];
}
"""


def test_a_write_past_either_end_of_an_array_is_an_error_and_a_read_past_it_gives_nan(run):
    values, out = np.arange(1.0, 65.0, dtype=np.float32), np.zeros(64, dtype=np.float32)
    run(OFF_THE_END, "off_the_end", 2, 32, values, out, np.int32(64), np.int32(0))
    np.testing.assert_array_equal(out, values)  # within bounds: the writes reach the array handed in
    for shift in (1, -1):
        with pytest.raises(RuntimeError, match=r"off_the_end: a write outside out \(float32 \(64,\)\)"):
            run(OFF_THE_END, "off_the_end", 2, 32, values, np.zeros(64, dtype=np.float32), np.int32(64),
                np.int32(shift))  # fmt: skip
    shifted = np.zeros(65, dtype=np.float32)  # room for the write: the read of in[-1] is what is off the end
    run(OFF_THE_END, "off_the_end", 2, 32, values, shifted, np.int32(64), np.int32(1))
    assert np.isnan(shifted[1]) and np.array_equal(shifted[2:], values[:-1])


def test_an_elementwise_kernel_writing_past_a_raw_array_is_an_error():
    from cpu_kernels import run_elementwise

    from xpnet.backend.kernel_sources import Elementwise

    scatter = Elementwise("T x, raw T out", "", "out[i + 1] = x", "scatter")
    with pytest.raises(RuntimeError, match=r"scatter: a write outside out"):
        run_elementwise(scatter, np.ones(4), np.zeros(4))
    out = np.zeros(5)
    run_elementwise(scatter, np.ones(4), out)
    np.testing.assert_array_equal(out, [0, 1, 1, 1, 1])


UNWRITTEN = r"""
extern "C" __global__ void unwritten(float* out) {
    __shared__ float half_written[64];
    if (threadIdx.x < 32 && blockIdx.x == 0) half_written[threadIdx.x] = threadIdx.x;
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = half_written[threadIdx.x];
}
"""


def test_shared_memory_that_no_thread_of_the_block_wrote_reads_as_nan(run):
    """Each block starts with its shared memory filled with NaN, as a GPU leaves it
    unwritten: not zeros, and not what another block left there."""
    out = np.zeros((2, 64), dtype=np.float32)
    run(UNWRITTEN, "unwritten", 2, 64, out)
    np.testing.assert_array_equal(out[0, :32], np.arange(32))
    assert np.isnan(out[0, 32:]).all() and np.isnan(out[1]).all()
