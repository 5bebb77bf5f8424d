"""Run the CUDA kernel sources of :mod:`xpnet.backend.kernel_sources` on the CPU.

Each kernel's text is compiled by the system's C++ compiler and called through ctypes on
NumPy arrays. An elementwise kernel runs inside a loop over the element index ``i`` (its
threads do not cooperate, so one at a time is enough). A raw kernel runs as its launch
would on a GPU (:func:`run_raw_kernel`): every thread of every block of its grid, each with
its own indices and stack, blocks of warps of 32 lanes, ``__syncthreads()`` and
``__shfl_down_sync`` waiting for the threads they name, and the warps run in an order that
shows a missing barrier (see ``_SIMT``). The arguments follow CuPy's conventions, so a test
passes what ``cupy_kernels`` passes: non-raw arguments broadcast to one shape and are read
(outputs: written) at index ``i``, ``raw`` ones are whole C-contiguous arrays. This checks
the kernels' arithmetic, indexing and cooperation on machines without a GPU; it says
nothing of their speed, and CUDA's math functions are stood in for by the C library's.

:func:`cupy_kernels_on_cpu` goes one step further: it loads
:mod:`xpnet.backend.cupy_kernels` itself against a stand-in for the ``cupy`` module
whose arrays are NumPy's and whose kernels run here, so that the Python code
around each launch (argument order, shapes, dtypes, grids) runs too.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import numpy as np

from xpnet.backend.kernel_sources import Elementwise, Reduction

COMPILER = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")

# What CUDA gives a kernel that the C++ library does not (a raw kernel's threads: _SIMT).
_PRELUDE = r"""
#include <cmath>
#include <algorithm>
using namespace std;
#define __global__
#define __device__
// A block's shared memory: statics in a section of their own, which a raw kernel's launch
// fills with 0xFF (NaN as floats) before each block, as a GPU leaves it unwritten.
#define __shared__ static __attribute__((section("xpnet_shared")))
static inline unsigned int __umulhi(unsigned int a, unsigned int b) { return (unsigned int)(((unsigned long long)a * b) >> 32); }
// CuPy's float16 (cupy/float16.cuh): 16 bits stored, every operation on it done in float
// through its implicit conversions, and a float rounded back only when stored.
struct float16 {
    _Float16 data_;
    float16() {}
    float16(float v) : data_((_Float16)v) {}
    explicit float16(double v) : data_((_Float16)v) {}
    explicit float16(int v) : data_((_Float16)v) {}
    explicit float16(long long v) : data_((_Float16)v) {}
    operator float() const { return (float)data_; }
    float16& operator=(const float16&) = default;
    template <typename U> float16& operator=(const U& rhs) { *this = static_cast<float16>(rhs); return *this; }
    template <typename U> float16& operator+=(const U& rhs) { *this = *this + rhs; return *this; }
};
"""

# A raw kernel's launch as a GPU runs it, on one CPU thread: every thread of a block is a
# fiber with its own stack, the blocks run one after another, a warp is 32 lanes. Between
# two of the block's barriers, its warps run one after another in a shuffled order, and each
# warp runs its lanes (in a shuffled order) through all its shuffles up to the barrier: so
# one warp gets as far ahead of another as a GPU may let it, and a read of shared memory
# that no barrier orders after its write (or before the next write) sees the wrong value.
# The orders are drawn from a fixed sequence per block, so a launch runs the same each time.
# A barrier that some threads never reach, or a full-mask shuffle that some lanes never
# reach, is an error (undefined on a GPU), returned by the launch. A kernel that waits for
# another warp without a barrier (a spin on a flag) would wait forever here. On x86-64 a
# fiber switch is six registers and the stack pointer; elsewhere ucontext's, which also
# asks the kernel for the signal mask each time.
_SIMT = r"""
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ucontext.h>
struct _Dim3 { unsigned int x, y, z; };
static _Dim3 threadIdx = {0, 0, 0}, blockIdx = {0, 0, 0}, blockDim = {1, 1, 1}, gridDim = {1, 1, 1};
static const int warpSize = 32;
namespace _simt {
#if defined(__x86_64__) && !defined(XPNET_SIMT_UCONTEXT)
extern "C" void _simt_switch(void** save_sp, void* load_sp) __attribute__((visibility("hidden")));
asm(R"(
    .text
    .globl _simt_switch
    .hidden _simt_switch
    .type _simt_switch, @function
_simt_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size _simt_switch, .-_simt_switch
)");
struct Context { void* sp; };
// A stack whose first switch pops six zero registers and returns into entry, which never returns.
static void start(Context& c, char* stack, size_t size, void (*entry)()) {
    void** sp = (void**)(((uintptr_t)(stack + size)) & ~(uintptr_t)15);
    *--sp = nullptr;
    *--sp = (void*)entry;
    for (int r = 0; r < 6; ++r) *--sp = nullptr;
    c.sp = sp;
}
static void swap(Context& from, Context& to) { _simt_switch(&from.sp, to.sp); }
#else
struct Context { ucontext_t u; };
static void start(Context& c, char* stack, size_t size, void (*entry)()) {
    getcontext(&c.u);
    c.u.uc_stack.ss_sp = stack;
    c.u.uc_stack.ss_size = size;
    c.u.uc_link = nullptr;
    makecontext(&c.u, entry, 0);
}
static void swap(Context& from, Context& to) { swapcontext(&from.u, &to.u); }
#endif

enum State { READY, AT_BARRIER, AT_SHUFFLE, DONE };
struct Fiber {
    Context context;
    State state;
    _Dim3 index;
    unsigned int mask;
    int delta, size;
    unsigned char value[8], result[8];
};
static Fiber* fibers = nullptr;
static int current = 0;
static Context scheduler;
// the kernel with its arguments, as a function of the closure that holds them
static void (*body)(void*) = nullptr;
static void* closure = nullptr;
static char message[200];

static void wait(State state) {
    fibers[current].state = state;
    swap(fibers[current].context, scheduler);
}

static void run_fiber() {
    body(closure);
    wait(DONE);  // never resumed
}

// The lanes first..first+lanes-1 of a warp, ``waiting`` of which wait at a shuffle: all 32
// must, with the full mask; each then gets the value of lane + delta (its own past the
// warp's end). Returns NULL, or what went wrong.
static const char* release_shuffle(int first, int lanes, int waiting) {
    for (int l = 0; l < lanes; ++l) {
        const Fiber& f = fibers[first + l];
        if (lanes != warpSize || f.state != AT_SHUFFLE || f.mask != 0xffffffffu || f.size != fibers[first].size) {
            snprintf(message, sizeof message, "a full-mask shuffle that %d of the %d lanes of warp %d reach "
                     "(block (%u, %u, %u); a warp has %d lanes)", waiting, lanes, first / warpSize,
                     blockIdx.x, blockIdx.y, blockIdx.z, warpSize);
            return message;
        }
    }
    for (int l = 0; l < lanes; ++l) {
        Fiber& f = fibers[first + l];
        const int source = l + f.delta < warpSize ? l + f.delta : l;
        memcpy(f.result, fibers[first + source].value, f.size);
        f.state = READY;
    }
    return nullptr;
}

// The order in which the threads take their turns: a fixed sequence, seeded per block.
static unsigned long long order_state = 1;
static void permute(int* order, int n) {
    for (int i = 0; i < n; ++i) order[i] = i;
    for (int i = n - 1; i > 0; --i) {
        order_state ^= order_state << 13;
        order_state ^= order_state >> 7;
        order_state ^= order_state << 17;
        const int j = (int)(order_state % (unsigned long long)(i + 1));
        const int kept = order[i];
        order[i] = order[j];
        order[j] = kept;
    }
}

// Runs the warp's lanes, in a shuffled order, and its shuffles as they fill, until every
// lane waits at a barrier or has returned.
static const char* run_warp(int first, int lanes) {
    int order[32];
    for (;;) {
        permute(order, lanes);
        for (int k = 0; k < lanes; ++k) {
            const int t = first + order[k];
            if (fibers[t].state != READY) continue;
            current = t;
            threadIdx = fibers[t].index;
            swap(scheduler, fibers[t].context);
        }
        int at_shuffle = 0;
        for (int l = 0; l < lanes; ++l) at_shuffle += fibers[first + l].state == AT_SHUFFLE;
        if (at_shuffle == 0) return nullptr;
        if (const char* error = release_shuffle(first, lanes, at_shuffle)) return error;
    }
}

// The linker's bounds of the shared-memory section (null where the kernel declares none).
extern "C" char __start_xpnet_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_xpnet_shared[] __attribute__((weak, visibility("hidden")));

static const char* run_block(int threads, char* stacks, size_t stack_size) {
    if (__start_xpnet_shared != nullptr) memset(__start_xpnet_shared, 0xFF, __stop_xpnet_shared - __start_xpnet_shared);
    for (int t = 0; t < threads; ++t) {
        Fiber& f = fibers[t];
        start(f.context, stacks + t * stack_size, stack_size, run_fiber);
        f.state = READY;
        f.index = {t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y)};
    }
    const unsigned long long block_number = (blockIdx.z * gridDim.y + blockIdx.y) * (unsigned long long)gridDim.x
                                            + blockIdx.x;
    order_state = 0x9E3779B97F4A7C15ull * (block_number + 1);
    const int warps = (threads + warpSize - 1) / warpSize;
    int order[1024 / 32];
    for (;;) {
        permute(order, warps);
        for (int k = 0; k < warps; ++k) {
            const int first = order[k] * warpSize;
            const char* error = run_warp(first, std::min(warpSize, threads - first));
            if (error) return error;
        }
        int done = 0, at_barrier = 0;
        for (int t = 0; t < threads; ++t) {
            done += fibers[t].state == DONE;
            at_barrier += fibers[t].state == AT_BARRIER;
        }
        if (done == threads) return nullptr;
        if (at_barrier == threads) {
            for (int t = 0; t < threads; ++t) fibers[t].state = READY;
            continue;
        }
        snprintf(message, sizeof message, "a __syncthreads() that %d of the %d threads of block (%u, %u, %u) reach "
                 "(the others returned)", at_barrier, threads, blockIdx.x, blockIdx.y, blockIdx.z);
        return message;
    }
}

static const char* launch(_Dim3 grid, _Dim3 block, void (*kernel)(void*), void* arguments) {
    // CUDA's limits: 1024 threads a block, at most 64 along z; grids of 2^31 - 1 by 65535 by 65535
    const long long threads = (long long)block.x * block.y * block.z;
    if (threads < 1 || threads > 1024 || block.z > 64 || grid.x < 1 || grid.y < 1 || grid.z < 1
        || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
        snprintf(message, sizeof message, "a launch of (%u, %u, %u) blocks of (%u, %u, %u) threads", grid.x, grid.y,
                 grid.z, block.x, block.y, block.z);
        return message;
    }
    // the stacks stay allocated between launches: only the pages a fiber touches are ever mapped
    const size_t stack_size = 64 * 1024;
    static char* stacks = nullptr;
    static long long stacks_for = 0;
    if (stacks_for < threads) {
        free(stacks);
        stacks = (char*)malloc(threads * stack_size);
        stacks_for = threads;
    }
    fibers = (Fiber*)calloc(threads, sizeof(Fiber));
    body = kernel;
    closure = arguments;
    gridDim = grid;
    blockDim = block;
    const char* error = nullptr;
    for (unsigned int z = 0; z < grid.z && !error; ++z)
        for (unsigned int y = 0; y < grid.y && !error; ++y)
            for (unsigned int x = 0; x < grid.x && !error; ++x) {
                blockIdx = {x, y, z};
                error = run_block((int)threads, stacks, stack_size);
            }
    free(fibers);
    fibers = nullptr;
    return error;
}
template <typename Call> static const char* launch(_Dim3 grid, _Dim3 block, Call call) {
    return launch(grid, block, [](void* c) { (*(Call*)c)(); }, &call);
}
}  // namespace _simt

static inline void __syncthreads() { _simt::wait(_simt::AT_BARRIER); }
template <typename V> static inline V __shfl_down_sync(unsigned int mask, V v, int delta) {
    static_assert(sizeof(V) <= 8, "a shuffle moves at most 8 bytes");
    _simt::Fiber& f = _simt::fibers[_simt::current];
    f.mask = mask;
    f.delta = delta;
    f.size = sizeof(V);
    memcpy(f.value, &v, sizeof(V));
    _simt::wait(_simt::AT_SHUFFLE);
    memcpy(&v, _simt::fibers[_simt::current].result, sizeof(V));
    return v;
}
"""

_C_TYPES = {
    "int32": ("int", np.int32),
    "int64": ("long long", np.int64),
    "uint32": ("unsigned int", np.uint32),
    "uint8": ("unsigned char", np.uint8),
    "bool": ("bool", np.bool_),
    "float32": ("float", np.float32),
    "float64": ("double", np.float64),
}
_FLOAT_C = {np.dtype(np.float16): "float16", np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_build_dir = None
_libraries: dict = {}


class _Param:
    def __init__(self, text, is_output):
        words = text.split()
        self.raw = words[0] == "raw"
        if self.raw:
            words = words[1:]
        self.type_name, self.name = words
        self.is_output = is_output

    @property
    def is_placeholder(self):
        """A type named by the call's arguments (T, F, ...), as CuPy's one-letter type names."""
        return self.type_name not in _C_TYPES

    def c_type(self):
        return self.type_name if self.is_placeholder else _C_TYPES[self.type_name][0]

    def np_dtype(self, placeholders):
        return placeholders[self.type_name] if self.is_placeholder else np.dtype(_C_TYPES[self.type_name][1])


def _params(in_params, out_params):
    split = lambda s: [p.strip() for p in s.split(",") if p.strip()]  # noqa: E731
    return [_Param(p, False) for p in split(in_params)] + [_Param(p, True) for p in split(out_params)]


def _library(source: str):
    """Compile ``source`` (once per text) and load it."""
    global _build_dir
    if COMPILER is None:
        raise RuntimeError("no C++ compiler found")
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    if key not in _libraries:
        if _build_dir is None:
            _build_dir = Path(tempfile.mkdtemp(prefix="xpnet-kernels-"))
        cpp, lib = _build_dir / f"{key}.cpp", _build_dir / f"{key}.so"
        cpp.write_text(source)
        done = subprocess.run(
            [COMPILER, "-std=c++17", "-O1", "-shared", "-fPIC", "-fcf-protection=none", "-o", str(lib), str(cpp)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the kernel does not compile:\n{done.stderr}\n{source}")
        _libraries[key] = ctypes.CDLL(str(lib))
    return _libraries[key]


def _elementwise_source(params, operation, placeholders, cuda=False):
    """The kernel as a C++ loop over ``i`` (or, with ``cuda``, a CUDA kernel looping over
    its grid, for NVRTC); ``placeholders`` maps each type name (T, F) to its C type."""
    signature, loads = [], []
    for p in params:
        if p.raw:
            signature.append(f"{p.c_type()}* {p.name}")
        elif p.is_output:
            signature.append(f"{p.c_type()}* _{p.name}")
            loads.append(f"{p.c_type()}& {p.name} = _{p.name}[i];")
        else:
            signature.append(f"const {p.c_type()}* _{p.name}")
            loads.append(f"const {p.c_type()} {p.name} = _{p.name}[i];")
    body = "\n        ".join(loads)
    typedefs = "".join(f"typedef {c_type} {name};\n" for name, c_type in placeholders.items())
    if cuda:
        head = f'{typedefs}extern "C" __global__ void run({", ".join(signature)}, long long _n) {{\n'
        loop = "for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < _n; i += (long long)blockDim.x * gridDim.x)"
    else:
        head = f'{_PRELUDE}\n{typedefs}extern "C" void run({", ".join(signature)}, long long _n) {{\n'
        loop = "for (long long i = 0; i < _n; ++i)"
    return f"{head}    {loop} {{\n        {body}\n        {operation};\n    }}\n}}\n"


def _call(library, arrays, n):
    library.run(*[ctypes.c_void_p(a.ctypes.data) for a in arrays], ctypes.c_longlong(n))


def _placeholder_dtypes(params, args):
    """The dtype that each type name (T, F) stands for: that of the first array argument
    declared with it, as CuPy binds them (a scalar, NumPy's too, binds none)."""
    placeholders = {}
    for p, a in zip(params, args):
        if p.is_placeholder and p.type_name not in placeholders and isinstance(a, np.ndarray):
            placeholders[p.type_name] = a.dtype
    missing = {p.type_name for p in params if p.is_placeholder} - set(placeholders)
    if missing:
        raise ValueError(f"no array argument gives the type of {sorted(missing)}")
    return placeholders


# Bytes of 0xFF on each side of every raw array a kernel is handed here: a float's or a
# double's all-ones bytes are a NaN, so a read past either end shows in the result.
_GUARD_BYTES = 4096


class _Guarded:
    """Copies of the arrays a kernel indexes by its own arithmetic (``raw`` ones), each inside
    a buffer with guard bytes on both sides, to hand to the kernel in their place;
    :meth:`check` then raises where the kernel wrote past an end, and copies each copy that
    the kernel changed back into its original. An array passed twice becomes two copies, so
    a kernel that reads through one argument what it writes through another would not see
    it here (none of xpnet's does)."""

    def __init__(self, kernel_name: str, arrays: dict):
        self.kernel_name, self.copies = kernel_name, {}
        for name, a in arrays.items():
            buffer = np.empty(a.nbytes + 2 * _GUARD_BYTES, dtype=np.uint8)
            buffer[:_GUARD_BYTES] = buffer[_GUARD_BYTES + a.nbytes :] = 0xFF
            inner = buffer[_GUARD_BYTES : _GUARD_BYTES + a.nbytes].view(a.dtype).reshape(a.shape)
            inner[...] = a
            self.copies[name] = (a, buffer, inner)

    def __getitem__(self, name):
        return self.copies[name][2]

    def check(self):
        for name, (a, buffer, _) in self.copies.items():
            if np.any(buffer[:_GUARD_BYTES] != 0xFF) or np.any(buffer[_GUARD_BYTES + a.nbytes :] != 0xFF):
                raise RuntimeError(f"{self.kernel_name}: a write outside {name} ({a.dtype} {tuple(a.shape)})")
        # every copy compared with its original before any original is written (two may be one array)
        changed = [(a, inner) for a, _, inner in self.copies.values() if not _same_bytes(a, inner)]
        for a, inner in changed:
            a[...] = inner


def _same_bytes(a, b):
    return np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


def run_elementwise(kernel: Elementwise, *args):
    """Run ``kernel`` as CuPy would with these arguments (inputs, then outputs, which are
    written in place); returns the outputs."""
    params = _params(kernel.in_params, kernel.out_params)
    n_in = sum(not p.is_output for p in params)
    if len(args) not in (n_in, len(params)):
        raise TypeError(f"{kernel.name} takes {n_in} inputs and optionally the outputs, got {len(args)} arguments")
    types = _placeholder_dtypes(params, args)
    shape = np.broadcast_shapes(*[np.shape(a) for p, a in zip(params, args) if not p.raw])
    if len(args) == n_in:  # CuPy allocates the outputs
        args = (*args, *[np.empty(shape, dtype=p.np_dtype(types)) for p in params[n_in:]])
    arrays, outputs, write_back = [], [], []
    for p, a in zip(params, args):
        dtype = p.np_dtype(types)
        if p.is_output and not p.raw and isinstance(a, np.ndarray) and a.dtype == dtype and a.shape == shape:
            # CuPy writes an output of any strides in place (a transposed weight, say): here the
            # kernel runs on a C-ordered copy of it, written back afterwards
            work = a if a.flags.c_contiguous else np.ascontiguousarray(a)
            if work is not a:
                write_back.append((a, work))
            arrays.append(work)
            outputs.append(a)
        elif p.raw or p.is_output:
            if not (isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.c_contiguous):
                raise TypeError(f"{kernel.name}: {p.name} must be a C-contiguous {dtype} array")
            if p.is_output and a.shape != shape:
                raise TypeError(f"{kernel.name}: output {p.name} must have shape {shape}")
            arrays.append(a)
            if p.is_output:
                outputs.append(a)
        else:
            arrays.append(np.ascontiguousarray(np.broadcast_to(np.asarray(a, dtype=dtype), shape)))
    # a raw array is indexed by the kernel's own arithmetic: guarded; the others only at i
    guarded = _Guarded(kernel.name, {p.name: a for p, a in zip(params, arrays) if p.raw})
    arrays = [guarded[p.name] if p.raw else a for p, a in zip(params, arrays)]
    library = _library(_elementwise_source(params, kernel.operation, {k: _FLOAT_C[v] for k, v in types.items()}))
    _call(library, arrays, int(np.prod(shape)))
    guarded.check()
    for a, work in write_back:
        a[...] = work
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def run_reduction(kernel: Reduction, *inputs, axis, keepdims=False):
    """Run a summing ``kernel`` as ``kernel(*inputs, axis=axis, keepdims=keepdims)`` would:
    ``map_expr`` element by element (C++), the sum over ``axis`` (NumPy), then ``post_map_expr`` (C++)."""
    if kernel.reduce_expr.replace(" ", "") != "a+b" or kernel.identity.strip() != "0":
        raise ValueError(f"{kernel.name}: only sums can be run here")
    params = _params(kernel.in_params, "")
    (out,) = _params("", kernel.out_params)
    types = _placeholder_dtypes(params, inputs)
    reduce_dtype = out.np_dtype(types)  # CuPy sums in the output's type
    mapped = np.empty(np.broadcast_shapes(*[np.shape(a) for a in inputs]), dtype=reduce_dtype)
    map_kernel = Elementwise(kernel.in_params, f"{out.type_name} _mapped", f"_mapped = {kernel.map_expr}", kernel.name)
    run_elementwise(map_kernel, *inputs, mapped)
    a = np.sum(mapped, axis=axis, keepdims=keepdims, dtype=reduce_dtype)
    result = np.empty(a.shape, dtype=reduce_dtype)
    post_kernel = Elementwise(f"{out.type_name} a", f"{out.type_name} {out.name}", kernel.post_map_expr, kernel.name)
    run_elementwise(post_kernel, np.ascontiguousarray(a), result)
    return result


_C_SCALARS = {
    np.int32: ctypes.c_int,
    np.uint32: ctypes.c_uint,
    np.int64: ctypes.c_longlong,
    np.float32: ctypes.c_float,
    np.float64: ctypes.c_double,
}


# The C types each kernel is built with for NVRTC: T, F (the statistics' type) and R (running averages').
_PRECISIONS = {
    "float": {"T": "float", "F": "float", "R": "float"},
    "double": {"T": "double", "F": "double", "R": "double"},
    "float16": {"T": "float16", "F": "float", "R": "float"},  # only kernel_sources.FLOAT16_KERNELS
}


def cuda_sources():
    """(name, CUDA source) of every kernel in kernel_sources, for float and double (and
    float16 activations where they pass), as CuPy would build them (a reduction as its map
    and post-map expressions): what ``python tests/cpu_kernels.py --nvrtc`` compiles."""
    from xpnet.backend import kernel_sources

    for label, c_types in _PRECISIONS.items():
        half = label == "float16"
        head = "#include <cupy/float16.cuh>\n" if half else ""  # CuPy's float16 class, as CuPy includes it
        for name, kernel in vars(kernel_sources).items():
            if half and name not in kernel_sources.FLOAT16_KERNELS:
                continue
            if isinstance(kernel, Elementwise):
                params = _params(kernel.in_params, kernel.out_params)
                yield f"{name}_{label}", head + _elementwise_source(params, kernel.operation, c_types, cuda=True)
            elif isinstance(kernel, Reduction):
                (out,) = _params("", kernel.out_params)
                mapped = _params(kernel.in_params, f"{out.type_name} _mapped")
                map_source = _elementwise_source(mapped, f"_mapped = {kernel.map_expr}", c_types, cuda=True)
                yield f"{name}_map_{label}", head + map_source
                post = _params(f"{out.type_name} a", f"{out.type_name} {out.name}")
                yield f"{name}_post_{label}", head + _elementwise_source(post, kernel.post_map_expr, c_types, cuda=True)
        if not half:
            for name in kernel_sources.RAW_KERNELS:
                # a filter size's kernels as the fast recipe's whitening conv builds them (3 channels, 2x2)
                yield (
                    f"{name}_{label}",
                    kernel_sources.raw_source(getattr(kernel_sources, name), label, C=3, KH=2, KW=2),
                )


_NUMPY_TYPES = {"float": np.float32, "double": np.float64, "float16": np.float16}


def cupy_generated_sources():
    """(name, CUDA source) of every ElementwiseKernel and ReductionKernel of kernel_sources
    as CuPy itself writes them at a launch: its own code generator (the private functions
    behind ``cupy.ElementwiseKernel`` and ``cupy.ReductionKernel`` in CuPy 13 and 14) and the
    headers it puts in front, for float and double (and float16 activations where they pass).
    Arrays are described as broadcast 4-D operands, CuPy's most general form; scalars as
    scalars. Unlike :func:`cuda_sources` this compiles what a GPU will run, CArray and
    CIndexer included, but needs CuPy's internals: a CuPy that changed them fails here by name."""
    import cupy
    from cupy._core import _carray, _kernel, _reduction, _scalar, core

    from xpnet.backend import kernel_sources

    array, indexer, scalar = 1, 2, 3  # CuPy's _ArgKind
    head = "".join(f"#include <{header}>\n" for header in core._cupy_header_list)

    def infos(params, types, extra, ndim_in, ndim_out):
        """CuPy's description of each argument: ``extra`` gives CuPy's own (indexers by their
        ndim, the block stride as 0); inputs are strided ndim_in-D arrays (a broadcast operand;
        a scalar compiles the same expression), outputs strided ndim_out-D arrays, raw arrays
        C-contiguous."""
        found = []
        for p in params:
            if p.name in extra:
                if extra[p.name]:
                    found.append(_kernel._ArgInfo(indexer, _carray.Indexer, None, extra[p.name], True, True))
                else:
                    found.append(_kernel._ArgInfo(scalar, _scalar.CScalar, np.int32, 0, True, True))
                continue
            dtype = np.dtype(types[p.ctype] if p.dtype is None else p.dtype).type
            ndim = ndim_in if p.is_const and not p.raw else ndim_out
            found.append(_kernel._ArgInfo(array, cupy.ndarray, dtype, ndim, p.raw, True))
        return tuple(found)

    for label, c_types in _PRECISIONS.items():
        half = label == "float16"
        types = {name: _NUMPY_TYPES[c] for name, c in c_types.items()}
        for name, kernel in vars(kernel_sources).items():
            if half and name not in kernel_sources.FLOAT16_KERNELS:
                continue
            if isinstance(kernel, Elementwise):
                inputs = _kernel._get_param_info(kernel.in_params, True)
                outputs = _kernel._get_param_info(kernel.out_params, False)
                params = inputs + outputs + _kernel._get_param_info("CIndexer _ind", False)
                used = sorted({p.ctype for p in inputs + outputs if p.dtype is None})
                type_map = _kernel._TypeMap(tuple((t, np.dtype(types[t]).type) for t in used))
                arg_infos = infos(params, types, {"_ind": 4}, 4, 4)
                code = _kernel._get_elementwise_kernel_code(
                    arg_infos, type_map, params, kernel.operation, kernel.name, ""
                )
            elif isinstance(kernel, Reduction):
                reduction = cupy.ReductionKernel(*kernel[:6], name=kernel.name)
                params = reduction._params
                used = sorted({p.ctype for p in reduction.in_params + reduction.out_params if p.dtype is None})
                pairs = tuple((t, np.dtype(types[t]).type) for t in used) + (("IndexT", np.int32),)
                (out,) = reduction.out_params
                reduce_type = _kernel._get_typename(np.dtype(types[out.ctype] if out.dtype is None else out.dtype).type)
                arg_infos = infos(params, types, {"_in_ind": 2, "_out_ind": 1, "_block_stride": 0}, 2, 1)
                code = _reduction._ReductionKernel_get_cached_function_code(
                    len(reduction.in_params), 1, params, arg_infos, _kernel._TypeMap(pairs), kernel.name, 512,
                    reduce_type, kernel.identity, kernel.map_expr, kernel.reduce_expr, kernel.post_map_expr, "", (),
                )  # fmt: skip
            else:
                continue
            yield f"{name}_{label} (CuPy's code)", head + code


def _nvrtc_include_options() -> list[str]:
    """-I options for CuPy's headers (cupy/float16.cuh) and the CUDA headers they include
    (cuda_fp16.h, from the nvidia-cuda-runtime wheel)."""
    import cupy

    folders = [Path(cupy.__file__).parent / "_core" / "include"]
    for entry in map(Path, sys.path):
        folders += sorted(p.parent for p in entry.glob("nvidia/*/include/cuda_fp16.h"))
    return [f"-I{folder}" for folder in folders]


def compile_with_nvrtc(arch="compute_90") -> int:
    """Compile every kernel with CUDA's run-time compiler (no GPU needed: CuPy's NVRTC
    bindings, the nvidia-cuda-nvrtc wheel and, for float16, the nvidia-cuda-runtime wheel's
    headers); prints each failure's log, returns their count."""
    from cupy._core import core
    from cupy_backends.cuda.libs import nvrtc

    options = [f"-arch={arch}", "-std=c++17", *_nvrtc_include_options()]
    cupy_options = [f"-arch={arch}", *core.assemble_cupy_compiler_options(()), *_nvrtc_include_options()]
    failures = 0
    for sources, with_options in ((cuda_sources(), options), (cupy_generated_sources(), cupy_options)):
        for name, source in sources:
            program = nvrtc.createProgram(source, f"{name.split()[0]}.cu", [], [])
            try:
                nvrtc.compileProgram(program, with_options)
                print(f"ok    {name}")
            except Exception:
                failures += 1
                print(f"FAIL  {name}\n{nvrtc.getProgramLog(program)}\n{source}")
    return failures + _spilling_filter_size_kernels(nvrtc)


def _spilling_filter_size_kernels(nvrtc) -> int:
    """Build the filter-size kernels for sm_90 at the most taps they take (ptxas's report),
    and count those that spill a register to memory: their per-tap sums are meant to stay
    in registers, which is why they are built per filter size."""
    from xpnet.backend import kernel_sources

    failures = 0
    taps = kernel_sources.DIRECT_CONV_MAX_TAPS
    for name in kernel_sources.FILTER_SIZE_KERNELS:
        for c_type in ("float", "double"):
            source = kernel_sources.raw_source(getattr(kernel_sources, name), c_type, C=2, KH=4, KW=taps // 8)
            program = nvrtc.createProgram(source, f"{name}.cu", [], [])
            nvrtc.compileProgram(program, ["-arch=sm_90", "-std=c++17", "--ptxas-options=-v"])
            log = nvrtc.getProgramLog(program)
            spills = re.findall(r"(\d+) bytes spill stores", log)
            if not spills or any(int(count) for count in spills):
                failures += 1
                print(f"FAIL  {name}_{c_type} at {taps} taps spills registers (or ptxas said nothing):\n{log}")
            else:
                print(f"ok    {name}_{c_type} at {taps} taps, no spills")
    return failures


def _kernel_parameters(source: str, name: str) -> tuple[str, list[str]]:
    """The raw kernel ``name``'s parameter list as written in ``source``, and their names."""
    found = re.search(rf'extern "C" __global__ void {name}\(([^)]*)\)', source)
    if found is None:
        raise ValueError(f"no kernel {name} in the source")
    return found.group(1), [re.findall(r"\w+", p)[-1] for p in found.group(1).split(",")]


def _launcher(source: str, name: str, ucontext: bool) -> str:
    """``source`` with an ``extern "C"`` function ``_launch_<name>(grid x, y, z, block x, y, z,
    the kernel's parameters)`` that runs the kernel ``name`` over that grid (_SIMT) and returns
    NULL, or what went wrong; ``ucontext``: its fibers switch through ucontext on x86-64 too."""
    parameters, names = _kernel_parameters(source, name)
    dims = "unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx, unsigned int by, unsigned int bz"
    define = "#define XPNET_SIMT_UCONTEXT\n" if ucontext else ""
    call = f"{name}({', '.join(names)})"
    return (
        f"{define}{_PRELUDE}{_SIMT}{source}\n"
        f'extern "C" const char* _launch_{name}({dims}, {parameters}) {{\n'
        f"    return _simt::launch({{gx, gy, gz}}, {{bx, by, bz}}, [&]() {{ {call}; }});\n}}\n"
    )


_LAUNCH_LOCK = threading.Lock()


def _dims(value) -> list[int]:
    """A launch's grid or block, as CuPy takes it (an int, or a tuple of one to three), as x, y, z."""
    dims = [value] if isinstance(value, int) else list(value)
    return dims + [1] * (3 - len(dims))


def run_raw_kernel(source: str, name: str, grid, block, *args, ucontext=False):
    """Run a raw kernel's ``source`` (with its ``{T}`` and ``{name}`` filled in) over ``grid``
    blocks of ``block`` threads, as ``cupy.RawKernel(source, name)(grid, block, args)`` would;
    ``args`` are NumPy arrays (pointers) or NumPy scalars. Raises RuntimeError where the launch
    would be undefined on a GPU (a barrier or a shuffle that not every thread reaches) or
    where it writes outside an array it is given (each is handed over between guard bytes).
    ``ucontext``: switch between the fibers through ucontext, as on machines other than x86-64."""
    function = getattr(_library(_launcher(source, name, ucontext)), f"_launch_{name}")
    function.restype = ctypes.c_char_p
    _, names = _kernel_parameters(source, name)
    if len(names) != len(args):
        raise TypeError(f"{name} takes {len(names)} arguments, got {len(args)}")
    guarded = _Guarded(name, {n: a for n, a in zip(names, args) if isinstance(a, np.ndarray)})
    values = [
        ctypes.c_void_p(guarded[n].ctypes.data) if isinstance(a, np.ndarray) else _C_SCALARS[type(a)](a)
        for n, a in zip(names, args)
    ]
    with _LAUNCH_LOCK:  # a launch's fibers and scheduler are statics of the kernel's library
        error = function(*[ctypes.c_uint(d) for d in _dims(grid) + _dims(block)], *values)
    if error is not None:
        raise RuntimeError(f"{name}: {error.decode()}")
    guarded.check()


class _ElementwiseKernel:
    def __init__(self, *args):
        self.source = Elementwise(*args)

    def __call__(self, *args):
        return run_elementwise(self.source, *args)


class _ReductionKernel:
    def __init__(self, *args):
        self.source = Reduction(*args)

    def __call__(self, *inputs, axis=None, keepdims=False):
        return run_reduction(self.source, *inputs, axis=axis, keepdims=keepdims)


class _RawKernel:
    def __init__(self, source, name):
        self.source, self.name = source, name

    def __call__(self, grid, block, args):
        run_raw_kernel(self.source, self.name, grid, block, *args)


def cupy_on_cpu() -> types.ModuleType:
    """A stand-in for the ``cupy`` module: NumPy's arrays and functions, and kernels
    that run through this module (enough of CuPy for CupyKernels' layer and update methods)."""
    fake = types.ModuleType("cupy")
    for name in ("asarray", "ascontiguousarray", "dtype", "empty", "empty_like", "ndarray", "ones", "sqrt", "zeros"):
        setattr(fake, name, getattr(np, name))
    for name in ("int32", "uint32", "int64", "float16", "float32", "float64"):
        setattr(fake, name, getattr(np, name))
    fake.ElementwiseKernel, fake.ReductionKernel, fake.RawKernel = _ElementwiseKernel, _ReductionKernel, _RawKernel
    # one device, and a stream that is never capturing a graph
    stream = types.SimpleNamespace(is_capturing=lambda: False)
    fake.cuda = types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=0), get_current_stream=lambda: stream)
    return fake


def _cublas_like_matmul(a, b):
    """``a @ b`` as xpnet's cuBLAS calls give it: float16 operands summed in float32."""
    if a.dtype == np.float16:
        return (a.astype(np.float32) @ b.astype(np.float32)).astype(np.float16)
    return a @ b


def cupy_kernels_on_cpu():
    """A ``CupyKernels`` from :mod:`xpnet.backend.cupy_kernels` loaded against
    :func:`cupy_on_cpu`, for NumPy arrays. Its matrix products (cuBLAS on a GPU, no kernel
    of ours) are NumPy's; cuDNN cannot be loaded, and the clock that times convolution paths
    is the host's."""
    import xpnet.backend

    path = Path(xpnet.backend.__file__).with_name("cupy_kernels.py")
    spec = importlib.util.spec_from_file_location("xpnet.backend._cupy_kernels_on_cpu", path)
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = cupy_on_cpu()
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = saved
    module._device_id = lambda x: 0  # NumPy's arrays are on the stand-in's one device
    kernels = module.CupyKernels()
    kernels.matmul = _cublas_like_matmul
    kernels.column_sums = lambda a: a.sum(axis=0)
    kernels._cudnn_engine = _no_cudnn
    kernels.conv_paths.elapsed_ms = _elapsed_ms_on_cpu
    return kernels


def _no_cudnn(device_id):
    raise RuntimeError("cuDNN does not run on the CPU")


def _elapsed_ms_on_cpu(run):
    """What ``run()`` takes, in ms: the kernels here run before their launch returns."""
    start = time.perf_counter()
    run()
    return 1e3 * (time.perf_counter() - start)


if __name__ == "__main__":
    if sys.argv[1:] != ["--nvrtc"]:
        sys.exit("usage: python tests/cpu_kernels.py --nvrtc   (compile every kernel with NVRTC)")
    sys.exit(1 if compile_with_nvrtc() else 0)
