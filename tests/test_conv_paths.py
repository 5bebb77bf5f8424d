"""Which path a convolution takes on CuPy: the switches' choice, or the fastest by timing.

ConvPaths on its own with a fake clock, then CupyKernels (run on the CPU through
tests/cpu_kernels.py) choosing between the direct kernels and im2col inside
conv_forward_fast, with timings that the test decides.
"""

from __future__ import annotations

import numpy as np
import pytest
from cpu_kernels import COMPILER, cupy_kernels_on_cpu

from xpnet import fast_layers, layers
from xpnet.backend import dispatch, get_backend
from xpnet.backend.conv_paths import ConvGeometry, ConvPaths


class Clock:
    """elapsed_ms for ConvPaths: runs what it is given and reports the next of ``readings``
    for the path that ran (each trial appends its path to ``ran``)."""

    def __init__(self, readings: dict):
        self.readings = {path: list(values) for path, values in readings.items()}
        self.ran: list = []

    def trial(self, path):
        self.ran.append(path)

    def __call__(self, run):
        before = len(self.ran)
        run()
        (path,) = self.ran[before:]
        return self.readings[path].pop(0)


G = ConvGeometry(0, (2, 3, 8, 8), False, (4, 3, 2, 2), "float64/float64/float64", 2, 0, False)
H = G._replace(x_shape=(1, 3, 8, 8))


def _paths(readings, repeats=3):
    clock = Clock(readings)
    paths = ConvPaths(clock, repeats=repeats)
    paths.autotune = True
    return paths, clock


def test_the_switches_decide_while_autotune_is_off():
    paths, clock = _paths({})
    paths.autotune = False
    assert paths.choose(G, lambda: ["direct", "cudnn", "im2col"], "cudnn", clock.trial, capturing=False) == "cudnn"
    assert clock.ran == [] and paths.timings == {}


def test_autotune_times_each_path_once_per_geometry_and_keeps_the_fastest_median():
    # im2col's one slow reading (a hiccup) does not count against it: medians 2 (direct), 3 (im2col)... 1.5
    paths, clock = _paths({"direct": [2, 2, 9], "im2col": [1.5, 40, 1], "cudnn": [3, 3, 3]})
    available = ["direct", "cudnn", "im2col"]
    assert paths.choose(G, lambda: available, "direct", clock.trial, capturing=False) == "im2col"
    # one untimed run of each, then three interleaved rounds
    assert clock.ran == available + available * 3
    assert paths.timings == {G: {"direct": 2, "cudnn": 3, "im2col": 1.5}}
    asked = []
    assert paths.choose(G, lambda: asked.append(1) or available, "direct", clock.trial, capturing=False) == "im2col"
    assert len(clock.ran) == 12 and asked == []  # remembered: nothing timed again, nor the paths worked out
    assert paths.report() == [
        {**G._asdict(), "ms": {"direct": 2, "cudnn": 3, "im2col": 1.5}, "failed": {}, "chosen": "im2col"}
    ]
    with pytest.raises(IndexError):  # another geometry is timed afresh (the clock has no readings left)
        paths.choose(H, lambda: available, "direct", clock.trial, capturing=False)


def test_threads_asking_for_one_geometry_at_once_time_it_once():
    import threading
    import time

    paths, clock = _paths({"direct": [1, 1, 1], "im2col": [2, 2, 2]})
    results = []

    def trial(path):
        time.sleep(0.005)  # long enough for the other threads to arrive while it is being timed
        clock.trial(path)

    def ask():
        results.append(paths.choose(G, lambda: ["direct", "im2col"], "im2col", trial, capturing=False))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["direct"] * 4 and len(clock.ran) == 8  # two untimed runs, then three rounds of two


def test_a_tie_goes_to_the_path_the_switches_would_rank_first():
    paths, clock = _paths({"direct": [1, 1, 1], "im2col": [1, 1, 1]})
    assert paths.choose(G, lambda: ["direct", "im2col"], "im2col", clock.trial, capturing=False) == "direct"


def test_nothing_is_timed_during_a_capture_nor_remembered_from_it():
    paths, clock = _paths({"direct": [5, 5, 5], "im2col": [1, 1, 1]})
    assert paths.choose(G, lambda: ["direct", "im2col"], "direct", clock.trial, capturing=True) == "direct"
    assert clock.ran == [] and paths.timings == {}
    assert paths.choose(G, lambda: ["direct", "im2col"], "direct", clock.trial, capturing=False) == "im2col"
    assert paths.choose(G, lambda: ["direct", "im2col"], "direct", clock.trial, capturing=True) == "im2col"
    # cuDNN, which loading would allocate for, is not offered during a capture: the path kept still holds
    assert paths.choose(G, lambda: ["im2col"], "direct", clock.trial, capturing=True) == "im2col"


def test_one_path_is_no_choice():
    paths, clock = _paths({})
    assert paths.choose(G, lambda: ["im2col"], "im2col", clock.trial, capturing=False) == "im2col"
    assert clock.ran == []


def test_a_path_that_fails_is_left_out_and_reported_unless_every_path_fails():
    """Out of device memory, or a library that refuses the geometry: the other paths are timed."""
    paths, clock = _paths({"im2col": [4, 4, 4]})

    def trial(path):
        if path == "direct":
            raise MemoryError("out of memory allocating 1024 bytes")
        if path == "cudnn":
            raise RuntimeError("cuDNN has no Forward algorithm for this convolution")
        clock.trial(path)

    assert paths.choose(G, lambda: ["direct", "cudnn", "im2col"], "cudnn", trial, capturing=False) == "im2col"
    assert paths.timings == {G: {"im2col": 4}}
    (entry,) = paths.report()
    assert entry["failed"] == {"direct": "MemoryError: out of memory allocating 1024 bytes",
                               "cudnn": "RuntimeError: cuDNN has no Forward algorithm for this convolution"}  # fmt: skip

    def nothing_runs(path):
        raise MemoryError(f"{path}: out of memory")

    with pytest.raises(MemoryError, match="im2col: out of memory"):
        paths.choose(H, lambda: ["cudnn", "im2col"], "cudnn", nothing_runs, capturing=False)

    def broken(path):
        raise ValueError(f"{path}: a fault, not a refusal")

    with pytest.raises(ValueError, match="direct: a fault"):  # other errors are not swallowed
        paths.choose(H, lambda: ["direct", "im2col"], "im2col", broken, capturing=False)


def test_backends_without_a_choice_of_paths_refuse_autotuning_by_name():
    backend = get_backend("numpy")
    backend.set_conv_autotune(False)
    with pytest.raises(ValueError, match="convolution autotuning applies to CUDA GPUs; backend 'numpy'"):
        backend.set_conv_autotune(True)


needs_compiler = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler to build the kernel sources with")


@pytest.fixture
def kernels(monkeypatch):
    """CupyKernels on the CPU, taking NumPy's arrays (cuDNN cannot be loaded there)."""
    kernels = cupy_kernels_on_cpu()
    monkeypatch.setitem(dispatch._ACCELERATORS, np.ndarray, kernels)
    return kernels


def _timed_by_kernel(kernels, monkeypatch, direct_ms, im2col_ms):
    """Make the kernels' clock read ``direct_ms`` for a trial that ran the direct kernels and
    ``im2col_ms`` for one that ran im2col; returns the list of the paths each trial took."""
    ran = []
    for name in ("direct_conv_forward", "im2col"):
        method = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _m=method, _n=name: ran.append(_n) or _m(*a))

    def elapsed_ms(run):
        before = len(ran)
        run()
        (path,) = ran[before:]
        return direct_ms if path == "direct_conv_forward" else im2col_ms

    monkeypatch.setattr(kernels.conv_paths, "elapsed_ms", elapsed_ms)
    return ran


@needs_compiler
@pytest.mark.parametrize(
    "direct_ms, im2col_ms, expected", [(1.0, 2.0, "_SmallFilterConvolution"), (2.0, 1.0, "_Columns")]
)
def test_autotuned_convolutions_take_the_faster_path_and_give_its_results(kernels, monkeypatch, direct_ms, im2col_ms,
                                                                          expected):  # fmt: skip
    """A 12-tap convolution (the direct kernels apply, the switch is off): timed once, forward
    and backward along each path, then run along the faster with the reference's results."""
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((4, 3, 2, 2)), rng.standard_normal(4)
    param = {"stride": 2, "pad": 0}
    ran = _timed_by_kernel(kernels, monkeypatch, direct_ms, im2col_ms)
    backward = []
    for name in ("direct_conv_filter_grad", "col2im"):
        method = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _m=method, _n=name: backward.append(_n) or _m(*a))
    kernels.conv_paths.autotune = True

    out, cache = fast_layers.conv_forward_fast(x, w, b, param)
    # an untimed pass of each path, three timed rounds, then the chosen one for the caller
    assert ran == ["direct_conv_forward", "im2col"] * 4 + [ran[-1]]
    assert backward.count("direct_conv_filter_grad") == 4 and backward.count("col2im") == 8  # dx along both paths
    assert type(cache[-1]).__name__ == expected
    fast_layers.conv_forward_fast(x, w, b, param)
    assert len(ran) == 10  # the geometry's path is remembered
    (timings,) = kernels.conv_paths.timings.values()
    assert timings == {"direct": direct_ms, "im2col": im2col_ms}

    expected_out, naive_cache = layers.conv_forward_naive(x, w, b, param)
    dout = rng.standard_normal(out.shape)
    np.testing.assert_allclose(out, expected_out, rtol=1e-13, atol=1e-13)
    for got, want in zip(fast_layers.conv_backward_fast(dout, cache), layers.conv_backward_naive(dout, naive_cache),
                         strict=True):  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


@needs_compiler
def test_autotuning_tells_geometries_apart_and_asks_for_cudnn_once(kernels, monkeypatch):
    """Another batch size, memory order or TF32 setting is timed afresh; cuDNN, which cannot
    be loaded here, is tried once and left out of every choice."""
    asked = []
    unloadable = kernels._cudnn_engine
    monkeypatch.setattr(kernels, "_cudnn_engine", lambda device: asked.append(device) or unloadable(device))
    _timed_by_kernel(kernels, monkeypatch, 1.0, 2.0)
    kernels.conv_paths.autotune = True
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 2, 2))
    x = rng.standard_normal((2, 3, 8, 8))
    x_outer = np.permute_dims(np.ascontiguousarray(np.permute_dims(x, (1, 0, 2, 3))), (1, 0, 2, 3))
    for x_now in (x, x[:1], x_outer):
        fast_layers.conv_forward_fast(x_now, w, None, {"stride": 2, "pad": 0})
    kernels.tf32 = True
    fast_layers.conv_forward_fast(x, w, None, {"stride": 2, "pad": 0})
    assert len(kernels.conv_paths.timings) == 4
    assert all(set(times) == {"direct", "im2col"} for times in kernels.conv_paths.timings.values())
    assert asked == [0] and kernels._cudnn_missing == "cuDNN does not run on the CPU"


@needs_compiler
def test_without_autotune_the_switch_alone_sends_a_convolution_to_the_direct_kernels(kernels, monkeypatch):
    ran = _timed_by_kernel(kernels, monkeypatch, 2.0, 1.0)
    x, w = np.ones((1, 3, 4, 4)), np.ones((2, 3, 2, 2))
    for switch, path in ((False, "im2col"), (True, "direct_conv_forward")):
        kernels.direct_small_convs = switch
        ran.clear()
        fast_layers.conv_forward_fast(x, w, None, {"stride": 2, "pad": 0})
        assert ran == [path]
    assert kernels.conv_paths.timings == {}


@needs_compiler
def test_nothing_is_timed_nor_cudnn_loaded_while_a_graph_is_captured(kernels, monkeypatch):
    """Loading cuDNN allocates its workspace, which must not come from a capture's memory."""
    import types

    cupy_here = type(kernels).__init__.__globals__["cupy"]  # the stand-in module the kernels were loaded with
    monkeypatch.setattr(cupy_here.cuda, "get_current_stream", lambda: types.SimpleNamespace(is_capturing=lambda: True))
    asked = []
    monkeypatch.setattr(kernels, "_cudnn_engine", lambda device: asked.append(device))
    ran = _timed_by_kernel(kernels, monkeypatch, 1.0, 2.0)
    kernels.conv_paths.autotune = True
    fast_layers.conv_forward_fast(np.ones((1, 3, 4, 4)), np.ones((2, 3, 2, 2)), None, {"stride": 2, "pad": 0})
    assert ran == ["im2col"] and asked == [] and kernels.conv_paths.timings == {}


@needs_compiler
def test_the_recipe_autotunes_its_convolutions_in_its_first_step_and_trains_as_without(kernels, monkeypatch):
    """fast94 with conv_autotune and captured steps, through CuPy's kernels on the CPU (a stand-in
    capture replays by running the step): only the whitening conv (12 taps) has two paths; its
    geometries are timed in eager calls, the captured steps keep what was kept, the losses are
    those of the run without autotuning to rounding, and autotuning is off after the run."""
    import types

    from xpnet.backend.numpy_backend import NumpyBackend
    from xpnet.recipes import fast94

    monkeypatch.setattr(NumpyBackend, "can_capture", True)
    monkeypatch.setattr(NumpyBackend, "capture", lambda self, step: types.SimpleNamespace(replay=step))
    monkeypatch.setattr(NumpyBackend, "set_conv_autotune", lambda self, on: setattr(kernels.conv_paths, "autotune", on))
    ran = _timed_by_kernel(kernels, monkeypatch, 1.0, 2.0)  # the direct kernels "faster"
    rng = np.random.default_rng(0)
    data = {"X_train": rng.integers(0, 256, (64, 32, 32, 3)), "y_train": rng.integers(0, 10, 64)}
    data |= {"X_test": rng.integers(0, 256, (12, 32, 32, 3)), "y_test": rng.integers(0, 10, 12)}
    small = {"widths": (4, 8, 8), "batch_size": 8, "epochs": 2, "seed": 0, "backend": "numpy", "tta_level": 1,
             "dtype": "float64", "cuda_graph": True}  # fmt: skip
    tuned = fast94(data, conv_autotune=True, **small)
    report = kernels.conv_paths.report()
    assert {entry["w_shape"] for entry in report} == {(24, 3, 2, 2)}
    assert all(entry["chosen"] == "direct" and set(entry["ms"]) == {"direct", "im2col"} for entry in report)
    assert (8, 3, 32, 32) in {entry["x_shape"] for entry in report}  # the training batch's
    assert ran.count("direct_conv_forward") > 4 * len(report)  # beyond each geometry's four trials: the kept path
    assert not kernels.conv_paths.autotune
    ran.clear()
    plain = fast94(data, **small)
    assert "direct_conv_forward" not in ran
    np.testing.assert_allclose(tuned.losses, plain.losses, rtol=1e-10)
    assert tuned.test_accuracy == plain.test_accuracy
