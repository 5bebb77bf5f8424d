"""The cuDNN binding's host side: library lookup and its error, and the descriptors,
whose output shape must be the layers' (these need cuDNN installed, not a GPU).
tests/test_gpu.py runs the convolutions themselves."""

from __future__ import annotations

import ctypes

import pytest

import xpnet
from xpnet.backend import cudnn
from xpnet.conv_common import conv_geometry


def _library_or_skip():
    try:
        return cudnn.find_library()
    except RuntimeError as exc:
        pytest.skip(str(exc))


def test_a_missing_library_is_named_with_how_to_install_it(monkeypatch):
    monkeypatch.setattr(cudnn, "_LIBRARY", None)
    monkeypatch.setenv("XPNET_CUDNN_LIBRARY", "/nowhere/libcudnn.so.9")

    def refuse(path):
        raise OSError(f"{path}: cannot open shared object file")

    monkeypatch.setattr(cudnn.ctypes, "CDLL", refuse)
    with pytest.raises(RuntimeError, match=r'cuDNN is not installed: pip install "xpnet\[cudnn12\]".*/nowhere/'):
        cudnn.find_library()


@pytest.mark.parametrize("layout", ["cudnn/lib", "cu13/lib"])
def test_the_wheels_copy_is_found_in_either_layout(monkeypatch, tmp_path, layout):
    import sys
    import types

    library = tmp_path / "nvidia" / layout / "libcudnn.so.9"
    library.parent.mkdir(parents=True)
    library.write_bytes(b"")
    (tmp_path / "nvidia" / "cublas" / "lib").mkdir(parents=True)  # another wheel's folder, no cuDNN in it
    nvidia = types.ModuleType("nvidia")
    nvidia.__path__ = [str(tmp_path / "nvidia")]
    monkeypatch.setitem(sys.modules, "nvidia", nvidia)
    assert cudnn._wheel_copies() == [str(library)]
    monkeypatch.setitem(sys.modules, "nvidia", None)  # no wheels at all
    assert cudnn._wheel_copies() == []


def test_backends_without_cudnn_refuse_to_switch_it_on():
    backend = xpnet.get_backend("numpy")
    backend.set_cudnn(False)
    with pytest.raises(ValueError, match="cuDNN applies to CUDA GPUs; backend 'numpy'"):
        backend.set_cudnn(True)


@pytest.mark.parametrize(
    "x_shape, w_shape, stride, pad",
    [
        ((100, 3, 31, 31), (25, 3, 3, 3), 2, 1),  # the course's timing shapes
        ((1024, 3, 32, 32), (24, 3, 2, 2), 1, 0),  # the recipe's whitening layer
        ((8, 64, 15, 15), (256, 64, 3, 3), 1, 1),
        ((2, 4, 9, 7), (5, 4, 3, 1), 2, 0),  # non-square kernel
    ],
)
@pytest.mark.parametrize("dtype_char", ["f", "d", "e"])
def test_plans_give_the_layers_output_shape(x_shape, w_shape, stride, pad, dtype_char):
    import numpy as np

    lib = _library_or_skip()
    plan = cudnn.ConvolutionPlan(lib, x_shape, w_shape, stride, pad, dtype_char)
    x, w = np.empty(x_shape), np.empty(w_shape)
    _, _, _, h_out, w_out = conv_geometry("test", x, w, None, {"stride": stride, "pad": pad})
    assert plan.out_shape == (x_shape[0], w_shape[0], h_out, w_out)
    if dtype_char == "e":  # float16 products are exact on tensor cores, summed in float32
        assert plan.math == cudnn._TENSOR_OP_MATH
        assert plan.one.value == 1.0 and isinstance(plan.one, ctypes.c_float)
        return
    assert plan.math == cudnn._FMA_MATH  # exact unless TF32 is asked for
    assert cudnn.ConvolutionPlan(lib, x_shape, w_shape, stride, pad, dtype_char, tf32=True).math == (
        cudnn._DEFAULT_MATH if dtype_char == "f" else cudnn._FMA_MATH  # as PyTorch: TENSOR_OP would not use TF32
    )


def test_plans_refuse_other_dtypes_and_report_cudnn_errors_by_name():
    lib = _library_or_skip()
    with pytest.raises(ValueError, match="float16, float32 or float64, got dtype 'g'"):
        cudnn.ConvolutionPlan(lib, (1, 1, 4, 4), (1, 1, 3, 3), 1, 0, "g")
    with pytest.raises(RuntimeError, match="cudnnSetFilter4dDescriptor failed: CUDNN_STATUS_BAD_PARAM"):
        cudnn.ConvolutionPlan(lib, (1, 1, 4, 4), (1, 1, 0, 3), 1, 0, "f")


class _FakeCudnn:
    """Stands in for libcudnn: descriptors are numbered, the output size is the layers'
    arithmetic, the algorithm searches offer a tensor-op algorithm first, and each
    convolution call is recorded with the descriptors and pointers it was given."""

    TENSOR_OP_ALGO, FMA_ALGO = 7, 2

    def __init__(self):
        self.calls, self.descriptors, self.next_id = [], {}, 100
        self.memory = {self.TENSOR_OP_ALGO: 0, self.FMA_ALGO: 0}  # workspace bytes each algorithm asks for
        self.workspaces = []  # (pointer, bytes) each search and each convolution was given

    def __getattr__(self, name):
        def call(*args):
            return self._call(name, args)

        return call

    def _call(self, name, args):
        import ctypes

        if name.startswith("cudnnCreate") and name.endswith("Descriptor"):
            self.next_id += 1
            args[0]._obj.value = self.next_id
            return 0
        if name in ("cudnnSetTensor4dDescriptor", "cudnnSetFilter4dDescriptor"):
            self.descriptors[args[0].value] = args[-4:]
            return 0
        if name == "cudnnSetConvolutionMathType":
            self.calls.append((name, args[1]))
            return 0
        if name == "cudnnSetConvolution2dDescriptor":
            self.descriptors[args[0].value] = args[1:3] + args[3:5]  # pads, strides
            return 0
        if name == "cudnnGetConvolution2dForwardOutputDim":
            (pad, _, stride, _), x, w = (
                self.descriptors[args[0].value],
                self.descriptors[args[1].value],
                self.descriptors[args[2].value],
            )
            dims = (x[0], w[0], (x[2] + 2 * pad - w[2]) // stride + 1, (x[3] + 2 * pad - w[3]) // stride + 1)
            for out, value in zip(args[3:], dims):
                out._obj.value = value
            return 0
        if "Algorithm" in name:
            self.calls.append((name,))
            count, results = (args[9], args[10]) if name.startswith("cudnnFind") else (args[6], args[7])
            count._obj.value = 2
            results[0].algo, results[0].status, results[0].mathType = self.TENSOR_OP_ALGO, 0, 1
            results[1].algo, results[1].status, results[1].mathType = self.FMA_ALGO, 0, 3
            results[0].memory, results[1].memory = self.memory[self.TENSOR_OP_ALGO], self.memory[self.FMA_ALGO]
            if name.startswith("cudnnFind"):
                self.workspaces.append((args[11], args[12]))
            return 0
        if name.startswith("cudnnConvolution"):
            self.calls.append((name, args[2].value, args[3], args[4].value, args[5], args[7], args[11].value, args[12]))
            self.workspaces.append((args[8], args[9]))
        return 0 if name != "cudnnGetErrorString" else ctypes.c_char_p(b"fake")


@pytest.fixture(autouse=True)
def small_search_workspace(monkeypatch):
    """The fake device's searches get 256 bytes, not a GiB of host memory."""
    monkeypatch.setattr(cudnn, "_SEARCH_BYTES", 256)


def _fake_engine(capturing=False, free_bytes=1 << 20):
    import threading
    import types

    import numpy as np

    class DeviceArray(np.ndarray):
        @property
        def data(self):
            return types.SimpleNamespace(ptr=self.ctypes.data)

    class OutOfMemoryError(Exception):
        pass

    def empty(shape, dtype):  # a workspace (bytes) larger than free_bytes does not fit
        if np.dtype(dtype) == np.uint8 and np.prod(shape) > free_bytes:
            raise OutOfMemoryError(f"out of memory allocating {shape}")
        return np.empty(shape, dtype).view(DeviceArray)

    stream = types.SimpleNamespace(ptr=0, is_capturing=lambda: capturing)
    cupy = types.SimpleNamespace(
        ascontiguousarray=lambda a: np.ascontiguousarray(a).view(DeviceArray),
        empty=empty,
        uint8=np.uint8,
        result_type=np.result_type,
        cuda=types.SimpleNamespace(
            get_current_stream=lambda: stream, memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError)
        ),
    )
    lib = _FakeCudnn()
    engine = object.__new__(cudnn.CudnnConvolutions)  # no cudnnCreate: there is no GPU
    engine.cupy, engine.lib, engine.handle, engine.tf32 = cupy, lib, cudnn.ctypes.c_void_p(1), False
    engine.workspace, engine._plans, engine._lock = np.empty(16, np.uint8).view(DeviceArray), {}, threading.Lock()
    engine._retired = []
    return engine, lib, cupy


def test_each_direction_passes_its_descriptors_and_buffers_in_cudnns_order():
    import numpy as np

    engine, lib, cupy = _fake_engine()
    x, w = (
        cupy.ascontiguousarray(np.ones((4, 3, 9, 9), np.float32)),
        cupy.ascontiguousarray(np.ones((5, 3, 3, 3), np.float32)),
    )
    y = engine.forward(x, w, 2, 1)
    assert y.shape == (4, 5, 5, 5) and y.dtype == np.float32
    dx = engine.backward_data(w, y, x.shape, 2, 1)
    dw = engine.backward_filter(x, y, w.shape, 2, 1)
    assert dx.shape == x.shape and dw.shape == w.shape
    plan = next(iter(engine._plans.values()))
    runs = [c for c in lib.calls if len(c) > 2]
    ptr = lambda a: a.ctypes.data  # noqa: E731
    assert runs == [
        ("cudnnConvolutionForward", plan.x.value, ptr(x), plan.w.value, ptr(w), lib.FMA_ALGO, plan.y.value, ptr(y)),
        ("cudnnConvolutionBackwardData", plan.w.value, ptr(w), plan.y.value, ptr(y), lib.FMA_ALGO, plan.x.value, ptr(dx)),
        ("cudnnConvolutionBackwardFilter", plan.x.value, ptr(x), plan.y.value, ptr(y), lib.FMA_ALGO, plan.w.value, ptr(dw)),
    ]  # fmt: skip
    # Timed once per direction (the tensor-op algorithm refused: float32 stays exact), then reused.
    engine.forward(x, w, 2, 1)
    searches = [c[0] for c in lib.calls if len(c) == 1]
    assert searches == [f"cudnnFindConvolution{d}AlgorithmEx" for d in ("Forward", "BackwardData", "BackwardFilter")]
    # Exact float32 stays in FMA math from the plan's creation on.
    assert [c for c in lib.calls if c[0] == "cudnnSetConvolutionMathType"] == [("cudnnSetConvolutionMathType", 3)]


def test_tf32_takes_the_tensor_op_algorithm_and_a_capture_asks_the_heuristics():
    import numpy as np

    engine, lib, cupy = _fake_engine(capturing=True)
    engine.tf32 = True
    x, w = (
        cupy.ascontiguousarray(np.ones((2, 3, 8, 8), np.float32)),
        cupy.ascontiguousarray(np.ones((4, 3, 3, 3), np.float32)),
    )
    engine.forward(x, w, 1, 1)
    # The plan is made in DEFAULT math (TF32 allowed); the algorithm runs in the math type it was found with.
    assert lib.calls[0] == ("cudnnSetConvolutionMathType", cudnn._DEFAULT_MATH)
    assert [c[0] for c in lib.calls[1:]] == [
        "cudnnGetConvolutionForwardAlgorithm_v7", "cudnnSetConvolutionMathType", "cudnnConvolutionForward"
    ]  # fmt: skip
    assert lib.calls[2] == ("cudnnSetConvolutionMathType", cudnn._TENSOR_OP_MATH)
    assert lib.calls[3][5] == lib.TENSOR_OP_ALGO
    # The next direction searches in the plan's math type again, then runs in its algorithm's.
    engine.backward_filter(x, engine.forward(x, w, 1, 1), w.shape, 1, 1)
    maths = [c[1] for c in lib.calls[4:] if c[0] == "cudnnSetConvolutionMathType"]
    assert maths == [cudnn._DEFAULT_MATH, cudnn._TENSOR_OP_MATH]


def test_operands_of_two_dtypes_meet_in_the_wider_one():
    """As the im2col path promotes (never cuDNN reading float64 memory as float32)."""
    import numpy as np

    engine, lib, cupy = _fake_engine()
    x, w = np.ones((2, 3, 8, 8), np.float32), np.ones((4, 3, 3, 3), np.float64)
    y = engine.forward(x, w, 1, 1)
    assert y.dtype == np.float64 and next(iter(engine._plans))[4] == "d"
    assert engine.backward_data(w, np.ones(y.shape, np.float32), x.shape, 1, 1).dtype == np.float64


def test_the_search_may_use_a_larger_workspace_which_then_grows_and_keeps_its_old_buffer():
    import numpy as np

    engine, lib, cupy = _fake_engine()
    lib.memory[lib.FMA_ALGO] = 200  # more than the 16 bytes held, within the 256 of the search
    x, w = (
        cupy.ascontiguousarray(np.ones((2, 3, 8, 8), np.float32)),
        cupy.ascontiguousarray(np.ones((4, 3, 3, 3), np.float32)),
    )
    first = engine.workspace
    engine.forward(x, w, 1, 1)
    (search, search_bytes), (used, used_bytes) = lib.workspaces
    assert search_bytes == 256
    assert used_bytes == engine.workspace.nbytes == 200 and used == engine.workspace.ctypes.data
    assert engine._retired == [first]  # a graph captured earlier may still point into it
    # A capture takes cuDNN's heuristic choice among the algorithms that fit the workspace held.
    engine2, lib2, _ = _fake_engine(capturing=True)
    lib2.memory[lib2.FMA_ALGO] = 200
    with pytest.raises(RuntimeError, match="no Forward algorithm for this convolution within 16 bytes"):
        engine2.forward(x, w, 1, 1)


def test_the_search_workspace_shrinks_to_what_the_device_can_spare():
    import numpy as np

    engine, lib, cupy = _fake_engine(free_bytes=100)
    x, w = (
        cupy.ascontiguousarray(np.ones((2, 3, 8, 8), np.float32)),
        cupy.ascontiguousarray(np.ones((4, 3, 3, 3), np.float32)),
    )
    engine.forward(x, w, 1, 1)
    assert lib.workspaces[0][1] == 64  # 256 refused, then 128, then 64 fits
    engine_full, lib_full, _ = _fake_engine(free_bytes=10)
    engine_full.forward(x, w, 1, 1)
    assert lib_full.workspaces[0] == (engine_full.workspace.ctypes.data, 16)  # the workspace held


def test_an_input_stored_in_another_order_is_copied_once_for_both_passes():
    """x channels outermost (a convolution's output on the im2col path): conv_forward_fast on
    cuDNN makes it C-contiguous once and its backward pass reads that copy."""
    import types

    import numpy as np

    from xpnet import fast_layers

    engine, lib, cupy = _fake_engine()
    copies = []
    contiguous = cupy.ascontiguousarray

    def counting(a):
        if not a.flags.c_contiguous:
            copies.append(a.shape)
        return contiguous(a)

    cupy.ascontiguousarray = counting
    x_cn = np.ascontiguousarray(np.ones((3, 2, 8, 8), np.float32)).view(type(engine.workspace))
    x = np.permute_dims(x_cn, (1, 0, 2, 3))  # (N, C, H, W) viewed, stored (C, N, H, W)
    w = np.ones((4, 3, 3, 3), np.float32).view(type(engine.workspace))
    param = {"stride": 1, "pad": 1}
    fast = types.SimpleNamespace(cudnn_engine=lambda a: engine)
    out, cache = fast_layers._library_conv(fast, x, w, None, param, conv_geometry("test", x, w, None, param))
    fast_layers.conv_backward_fast(out, cache)
    assert copies == [(2, 3, 8, 8)]
    runs = [c[0] for c in lib.calls if len(c) > 2]
    assert runs == [f"cudnnConvolution{d}" for d in ("Forward", "BackwardFilter", "BackwardData")]
