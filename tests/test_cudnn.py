"""The cuDNN binding's host side: library lookup and its error, and the descriptors,
whose output shape must be the layers' (these need cuDNN installed, not a GPU).
tests/test_gpu.py runs the convolutions themselves."""

from __future__ import annotations

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
@pytest.mark.parametrize("dtype_char", ["f", "d"])
def test_plans_give_the_layers_output_shape(x_shape, w_shape, stride, pad, dtype_char):
    import numpy as np

    lib = _library_or_skip()
    plan = cudnn.ConvolutionPlan(lib, x_shape, w_shape, stride, pad, dtype_char)
    x, w = np.empty(x_shape), np.empty(w_shape)
    _, _, _, h_out, w_out = conv_geometry("test", x, w, None, {"stride": stride, "pad": pad})
    assert plan.out_shape == (x_shape[0], w_shape[0], h_out, w_out)
    assert plan.math == cudnn._FMA_MATH  # exact unless TF32 is asked for
    assert cudnn.ConvolutionPlan(lib, x_shape, w_shape, stride, pad, dtype_char, tf32=True).math == (
        cudnn._TENSOR_OP_MATH if dtype_char == "f" else cudnn._FMA_MATH
    )


def test_plans_refuse_other_dtypes_and_report_cudnn_errors_by_name():
    lib = _library_or_skip()
    with pytest.raises(ValueError, match="float32 or float64, got dtype 'e'"):
        cudnn.ConvolutionPlan(lib, (1, 1, 4, 4), (1, 1, 3, 3), 1, 0, "e")
    with pytest.raises(RuntimeError, match="cudnnSetFilter4dDescriptor failed: CUDNN_STATUS_BAD_PARAM"):
        cudnn.ConvolutionPlan(lib, (1, 1, 4, 4), (1, 1, 0, 3), 1, 0, "f")
