"""CuPy only: fused kernels against the array-API reference, CuPy against
NumPy on the same parameters and batch, CUDA-graph training against eager
training, and no host synchronisation inside training steps.

Run with `nox -s gpu`; skipped cleanly where CuPy or a GPU is missing.
"""

import numpy as np
import pytest

import xpnet
from xpnet import layers, optim
from xpnet.backend import accelerated, fused_kernels, to_numpy
from xpnet.solver import Solver

cp = pytest.importorskip("cupy")
try:
    CUPY = xpnet.get_backend("cupy")
except (ImportError, RuntimeError) as exc:  # CuPy installed, no GPU
    pytest.skip(f"no usable GPU: {exc}", allow_module_level=True)

pytestmark = pytest.mark.gpu


def both(fn, fused=()):
    """fn() with CuPy's fused kernels and with the array-API reference code.

    ``fused`` names the CupyKernels methods the fast run must call (at least once
    each) and the reference run must not: agreement alone would also pass if the
    fused path were silently skipped.
    """
    kernels = accelerated(CUPY.asarray([0.0]))
    calls = {name: 0 for name in fused}
    originals = {name: getattr(kernels, name) for name in fused}

    def counting(name):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)

        return wrapper

    for name in fused:
        setattr(kernels, name, counting(name))
    try:
        fast = fn()
        ran_fast = dict(calls)
        with fused_kernels(False):
            reference = fn()
    finally:
        for name in fused:
            delattr(kernels, name)  # the class's method shows through again
    for name in fused:
        assert ran_fast[name] > 0, f"the fused {name} did not run"
        assert calls[name] == ran_fast[name], f"the reference run called the fused {name}"
    return fast, reference


def assert_close(a, b, dtype):
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(257, 10), (3, 1000), (1, 1)])
@pytest.mark.parametrize("label_smoothing, reduction", [(0.0, "mean"), (0.2, "sum")])
def test_fused_softmax_loss_matches_reference(dtype, shape, label_smoothing, reduction):
    rng = np.random.default_rng(0)
    x = CUPY.asarray(3 * rng.standard_normal(shape), dtype=dtype)
    y = CUPY.asarray(rng.integers(0, shape[1], shape[0]))
    (loss, dx), (ref_loss, ref_dx) = both(
        lambda: layers.softmax_loss(x, y, label_smoothing, reduction), fused=["softmax_loss"]
    )
    assert loss.shape == () and loss.dtype == x.dtype
    assert_close(loss, ref_loss, dtype)
    assert_close(dx, ref_dx, dtype)


def test_fused_softmax_loss_gives_nan_for_out_of_range_labels():
    x = CUPY.asarray(np.zeros((2, 3)), dtype="float32")
    loss, _ = layers.softmax_loss(x, CUPY.asarray(np.array([0, 7])))
    assert np.isnan(float(loss))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_relu_backward_matches_reference(dtype):
    rng = np.random.default_rng(1)
    x = CUPY.asarray(rng.standard_normal((64, 33)), dtype=dtype)
    dout = CUPY.asarray(rng.standard_normal((64, 33)), dtype=dtype)
    fast, reference = both(lambda: layers.relu_backward(dout, x), fused=["relu_backward"])
    np.testing.assert_array_equal(to_numpy(fast), to_numpy(reference))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_gelu_matches_the_array_api_reference(dtype):
    rng = np.random.default_rng(2)
    x = CUPY.asarray(np.concatenate([rng.standard_normal(4000) * 4, [0.0, -40.0, 40.0]]), dtype=dtype)
    dout = CUPY.asarray(rng.standard_normal(x.shape[0]), dtype=dtype)
    forward = both(lambda: layers.gelu_forward(x)[0], fused=["gelu_forward"])
    backward = both(lambda: layers.gelu_backward(dout, layers.gelu_forward(x)[1]), fused=["gelu_backward"])
    tol = 1e-6 if dtype == "float32" else 1e-14
    for fast, reference in (forward, backward):
        np.testing.assert_allclose(to_numpy(fast), to_numpy(reference), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_affine_relu_and_bias_gradient_match_reference(dtype):
    from xpnet.layer_utils import affine_relu_backward, affine_relu_forward

    rng = np.random.default_rng(6)
    x = CUPY.asarray(rng.standard_normal((40, 3, 5)), dtype=dtype)
    w = CUPY.asarray(rng.standard_normal((15, 24)), dtype=dtype)
    b = CUPY.asarray(rng.standard_normal(24), dtype=dtype)
    dout = CUPY.asarray(rng.standard_normal((40, 24)), dtype=dtype)

    def run():
        out, cache = affine_relu_forward(x, w, b)
        return (out, *affine_relu_backward(dout, cache))

    for fast, reference in zip(*both(run, fused=["affine_relu", "relu_backward", "column_sums", "matmul"])):
        assert fast.shape == reference.shape
        assert_close(fast, reference, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("pooled", [False, True])
def test_fused_conv_relu_sandwiches_match_reference(dtype, pooled):
    """The bias and the ReLU in one pass on the convolution's (or its pool's) output, which is
    stored channels outermost on this path."""
    from xpnet import layer_utils

    rng = np.random.default_rng(7)
    x = CUPY.asarray(rng.standard_normal((4, 3, 8, 8)), dtype=dtype)
    w = CUPY.asarray(rng.standard_normal((5, 3, 3, 3)), dtype=dtype)
    b = CUPY.asarray(rng.standard_normal(5), dtype=dtype)
    conv, pool = {"stride": 1, "pad": 1}, {"pool_height": 2, "pool_width": 2, "stride": 2}

    def run():
        if pooled:
            out, cache = layer_utils.conv_relu_pool_forward(x, w, b, conv, pool)
            grads = layer_utils.conv_relu_pool_backward(cp.ones_like(out), cache)
        else:
            out, cache = layer_utils.conv_relu_forward(x, w, b, conv)
            grads = layer_utils.conv_relu_backward(cp.ones_like(out), cache)
        return (out, *grads)

    for fast, reference in zip(*both(run, fused=["channel_bias_relu", "relu_backward", "im2col"])):
        assert fast.shape == reference.shape
        assert_close(fast, reference, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("a_t, b_t", [(False, False), (True, False), (False, True), (True, True)])
def test_cublas_matmul_matches_cupy(dtype, a_t, b_t):
    rng = np.random.default_rng(2)
    a_np = rng.standard_normal((37, 19) if a_t else (19, 37))
    b_np = rng.standard_normal((23, 37) if b_t else (37, 23))
    a, b = CUPY.asarray(a_np, dtype=dtype), CUPY.asarray(b_np, dtype=dtype)
    a, b = (a.T if a_t else a), (b.T if b_t else b)
    fast = xpnet.backend.accelerated(a).matmul(a, b)
    assert fast.shape == (19, 23)
    assert_close(fast, a @ b, dtype)
    sliced = a[:, ::2]  # neither C- nor F-contiguous: copied first
    assert_close(xpnet.backend.accelerated(a).matmul(sliced, b[::2, :]), sliced @ b[::2, :], dtype)


@pytest.mark.parametrize("rule", ["sgd", "sgd_momentum", "sgd_nesterov_momentum", "nesterov_sgd", "rmsprop", "adam"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_update_rules_match_reference(rule, dtype):
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((30, 20))
    grads = [CUPY.asarray(rng.standard_normal((30, 20)), dtype=dtype) for _ in range(3)]

    def run():
        w, config = CUPY.asarray(w0, dtype=dtype, copy=True), {"learning_rate": 0.05}
        for dw in grads:
            w, config = getattr(optim, rule)(w, dw, config)
        return w

    fast, reference = both(run, fused=[rule])
    assert_close(fast, reference, dtype)


@pytest.mark.parametrize("normalization", [None, "batchnorm", "layernorm"])
def test_nets_give_the_same_results_on_cupy_and_numpy(normalization):
    numpy_model, cupy_model = (
        xpnet.FullyConnectedNet(
            [64, 32],
            input_dim=48,
            num_classes=10,
            normalization=normalization,
            reg=0.01,
            weight_scale=0.1,
            seed=0,
            backend=backend,
        )
        for backend in ("numpy", CUPY)
    )
    cupy_model.load_state_dict(numpy_model.state_dict())  # same parameters
    rng = np.random.default_rng(4)
    X = rng.standard_normal((50, 48)).astype(np.float32)
    y = rng.integers(0, 10, 50)
    loss_np, grads_np = numpy_model.loss(X, y)
    loss_cp, grads_cp = cupy_model.loss(X, y)
    assert float(loss_cp) == pytest.approx(float(loss_np), rel=1e-5)
    for name, grad in grads_np.items():
        np.testing.assert_allclose(to_numpy(grads_cp[name]), grad, rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(to_numpy(cupy_model.loss(X)), numpy_model.loss(X), rtol=1e-4, atol=1e-5)


def blobs(n=600, d=32, c=5):
    rng = np.random.default_rng(5)
    centres = 2 * rng.standard_normal((c, d))
    y = rng.integers(0, c, n)
    X = (centres[y] + rng.standard_normal((n, d))).astype(np.float32)
    return {"X_train": X[:500], "y_train": y[:500], "X_val": X[500:], "y_val": y[500:]}


@pytest.mark.parametrize(
    "options",
    [
        dict(update_rule="sgd_momentum"),
        dict(update_rule="rmsprop", optim_config={"learning_rate": 1e-3}),
        dict(update_rule="adam", optim_config={"learning_rate": 1e-3}),
        dict(update_rule="sgd", normalization="batchnorm", dropout=0.2),
    ],
    ids=["momentum", "rmsprop", "adam", "batchnorm+dropout"],
)
def test_cuda_graph_training_equals_eager_training(options):
    options = dict(options)
    net_options = {k: options.pop(k) for k in ("normalization", "dropout") if k in options}
    results = []
    for cuda_graph in (False, True):
        model = xpnet.FullyConnectedNet(
            [64, 64], input_dim=32, num_classes=5, weight_scale=0.1, seed=0, backend=CUPY, **net_options
        )
        solver = Solver(
            model,
            blobs(),
            batch_size=50,
            num_epochs=3,
            lr_decay=0.9,
            seed=7,
            verbose=False,
            cuda_graph=cuda_graph,
            **options,
        )
        solver.train()
        results.append(solver)
    eager, graph = results
    assert graph.iteration == eager.iteration == 30
    np.testing.assert_allclose(graph.loss_history, eager.loss_history, rtol=1e-5)
    for name, value in eager.model.params.items():
        np.testing.assert_allclose(to_numpy(graph.model.params[name]), to_numpy(value), rtol=1e-5, atol=1e-6)
    assert graph.best_val_acc > 0.9


@pytest.mark.parametrize("use_batchnorm", [False, True])
def test_a_three_layer_convnet_trains_alike_under_cuda_graphs_and_eagerly(use_batchnorm):
    """The course's conv net (with and without its batchnorm layers, whose running averages
    move inside the captured step) on 2x4x4 images of the blobs."""
    from xpnet.cnn import ThreeLayerConvNet

    data = {k: v.reshape(-1, 2, 4, 4) if k.startswith("X") else v for k, v in blobs().items()}
    results = []
    for cuda_graph in (False, True):
        model = ThreeLayerConvNet(input_dim=(2, 4, 4), num_filters=4, filter_size=3, hidden_dim=16, num_classes=5,
                                  weight_scale=0.1, use_batchnorm=use_batchnorm, seed=0, backend=CUPY)  # fmt: skip
        solver = Solver(model, data, update_rule="adam", optim_config={"learning_rate": 1e-2}, batch_size=50,
                        num_epochs=3, seed=7, verbose=False, cuda_graph=cuda_graph)  # fmt: skip
        solver.train()
        results.append(solver)
    eager, graph = results
    np.testing.assert_allclose(graph.loss_history, eager.loss_history, rtol=1e-5)
    for name, value in eager.model.params.items():
        np.testing.assert_allclose(to_numpy(graph.model.params[name]), to_numpy(value), rtol=1e-4, atol=1e-5)
    for ours, theirs in zip(graph.model.bn_params, eager.model.bn_params, strict=True):
        for key in ("running_mean", "running_var"):
            np.testing.assert_allclose(to_numpy(ours[key]), to_numpy(theirs[key]), rtol=1e-4, atol=1e-6)
    assert graph.best_val_acc > 0.9


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_training_steps_never_synchronise(cuda_graph):
    import cupyx

    model = xpnet.FullyConnectedNet(
        [64], input_dim=32, num_classes=5, normalization="batchnorm", dropout=0.1, backend=CUPY
    )
    solver = Solver(
        model, blobs(), update_rule="sgd_momentum", batch_size=50, cuda_graph=cuda_graph, verbose=False, seed=0
    )
    rng = CUPY.rng(0)
    solver.step(rng)  # warm-up: compiles kernels (and, with graphs, creates optimizer state)
    with cupyx.allow_synchronize(False):
        losses = [solver.step(rng) for _ in range(20)]
    assert np.isfinite(CUPY.to_floats(losses)).all()


def test_adam_step_count_lives_on_the_device_and_survives_checkpoints():
    w = CUPY.asarray(np.zeros(3), dtype="float32", copy=True)
    config = {}
    for _ in range(3):
        w, config = optim.adam(w, CUPY.asarray(np.ones(3), dtype="float32"), config)
    assert isinstance(config["t"], cp.ndarray) and int(config["t"]) == 3
    from xpnet.checkpoint import tree_to_device, tree_to_host

    on_host = tree_to_host(config, CUPY)
    numpy_config = tree_to_device(on_host, xpnet.get_backend("numpy"))
    w_np, numpy_config = optim.adam(np.zeros(3, dtype=np.float32), np.ones(3, dtype=np.float32), numpy_config)
    assert numpy_config["t"] == 4


def test_large_gemms_capture_on_a_fresh_stream():
    """cublasSetStream resets the workspace to cuBLAS's pool; large GEMMs (which use a
    workspace) captured on a new stream must still find the fixed one."""
    rng = CUPY.rng(0)
    a = rng.normal((4096, 4096), dtype=cp.float32)
    b = rng.normal((4096, 4096), dtype=cp.float32)
    kernels = accelerated(a)
    first = kernels.matmul(a, b)  # on the default stream: the handle is bound to it
    graph = CUPY.capture(lambda: kernels.matmul(a.T, b) + kernels.matmul(a, b.T))
    with cp.cuda.Stream(non_blocking=True):  # replayed from yet another stream
        out = graph.replay()
    CUPY.sync()
    with fused_kernels(False):
        expected = a.T @ b + a @ b.T
    np.testing.assert_allclose(to_numpy(first), to_numpy(a @ b), rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(to_numpy(out), to_numpy(expected), rtol=1e-4, atol=1e-2)


def test_schedule_and_parameter_groups_follow_the_same_path_under_cuda_graphs(monkeypatch):
    """A per-iteration schedule, the epoch decay and per-group learning rates, held on the
    device: replayed graphs give the eager parameters, with one capture per epoch at most."""
    captures = []
    original_capture = type(CUPY).capture

    def counting_capture(self, fn):
        captures.append(1)
        return original_capture(self, fn)

    monkeypatch.setattr(type(CUPY), "capture", counting_capture)
    results = []
    for cuda_graph in (False, True):
        model = xpnet.FullyConnectedNet(
            [64, 64], input_dim=32, num_classes=5, normalization="batchnorm", weight_scale=0.1, seed=0, backend=CUPY
        )
        solver = Solver(
            model,
            blobs(),
            update_rule="sgd_nesterov_momentum",
            optim_config={"learning_rate": 0.05},
            param_groups=[{"params": lambda name: name.startswith("beta"), "learning_rate": 0.5}],
            lr_schedule=lambda t: min(1.0, (t + 1) / 10) * (1 - t / 45),
            lr_decay=0.9,
            sampler="epoch",
            batch_size=50,
            num_epochs=4,
            seed=7,
            verbose=False,
            cuda_graph=cuda_graph,
        )
        solver.train()
        results.append(solver)
    eager, graph = results
    assert 1 <= len(captures) <= 4
    np.testing.assert_allclose(graph.loss_history, eager.loss_history, rtol=1e-5)
    for name, value in eager.model.params.items():
        np.testing.assert_allclose(to_numpy(graph.model.params[name]), to_numpy(value), rtol=1e-5, atol=1e-6)


def test_tf32_is_off_by_default_and_can_be_switched_on():
    rng = np.random.default_rng(8)
    a = CUPY.asarray(rng.standard_normal((512, 512)), dtype="float32")
    b = CUPY.asarray(rng.standard_normal((512, 512)), dtype="float32")
    exact = a.astype(cp.float64) @ b.astype(cp.float64)
    kernels = accelerated(a)
    fp32 = kernels.matmul(a, b)
    try:
        CUPY.set_tf32(True)
        tf32 = kernels.matmul(a, b)
    finally:
        CUPY.set_tf32(False)
    again = kernels.matmul(a, b)
    scale = float(cp.abs(exact).max())
    fp32_error = float(cp.abs(fp32 - exact).max()) / scale
    tf32_error = float(cp.abs(tf32 - exact).max()) / scale
    assert fp32_error < 1e-5 and float(cp.abs(again - fp32).max()) == 0.0
    assert 1e-5 < tf32_error < 1e-2  # TF32 rounds the inputs to a 10-bit mantissa


def test_column_sums_stay_float32_sums_where_tf32_is_on():
    """TF32 is for products: a bias's gradient, summed through cuBLAS as ones @ dout, keeps
    float32 arithmetic (as PyTorch's does), and products after it still use TF32. (Whether
    cuBLAS would use tensor cores for a one-row product at all is its heuristics' choice.)"""
    rng = np.random.default_rng(9)
    a = CUPY.asarray(rng.uniform(1.0, 2.0, (64, 4096)), dtype="float32")  # 4096 sums of 64 values
    b = CUPY.asarray(rng.standard_normal((512, 512)), dtype="float32")
    exact_sums, exact_product = cp.sum(a.astype(cp.float64), axis=0), b.astype(cp.float64) @ b.astype(cp.float64)
    kernels = accelerated(a)
    try:
        CUPY.set_tf32(True)
        sums = kernels.column_sums(a)
        product = kernels.matmul(b, b)
    finally:
        CUPY.set_tf32(False)
    assert float(cp.max(cp.abs(sums - exact_sums) / exact_sums)) < 2e-6  # TF32 inputs: about 3e-5
    assert float(cp.abs(product - exact_product).max()) / float(cp.abs(exact_product).max()) > 1e-5


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "x_shape, w_shape, stride, pad",
    [((2, 3, 7, 7), (4, 3, 3, 3), 2, 1), ((2, 2, 5, 6), (3, 2, 2, 3), 1, 0), ((1, 2, 4, 4), (2, 2, 5, 5), 1, 2)],
)
def test_fused_im2col_and_col2im_match_the_array_api_reference(dtype, x_shape, w_shape, stride, pad):
    from xpnet import fast_layers

    rng = np.random.default_rng(4)
    x, w = (
        CUPY.asarray(rng.standard_normal(x_shape), dtype=dtype),
        CUPY.asarray(rng.standard_normal(w_shape), dtype=dtype),
    )
    param = {"stride": stride, "pad": pad}

    def run():
        out, cache = fast_layers.conv_forward_fast(x, w, None, param)
        dout = CUPY.asarray(np.random.default_rng(5).standard_normal(tuple(out.shape)), dtype=dtype)
        return (out, *fast_layers.conv_backward_fast(dout, cache)[:2])

    fast, reference = both(run, fused=["im2col", "col2im"])
    for a, b in zip(fast, reference):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "x_shape, w_shape, stride, pad",
    # the fast recipe's whitening conv, the course's timing shapes, one image with 5x5 filters
    [
        ((96, 3, 32, 32), (24, 3, 2, 2), 1, 0),
        ((100, 3, 31, 31), (25, 3, 3, 3), 2, 1),
        ((1, 1, 9, 8), (3, 1, 5, 5), 1, 2),
    ],
)
@pytest.mark.parametrize("channels_outer", [False, True])
def test_direct_small_filter_convs_match_numpy_within_their_rounding(dtype, x_shape, w_shape, stride, pad,
                                                                     channels_outer):  # fmt: skip
    """Many blocks and warps, on the card's own scheduling: the outputs and the
    filters' gradient against float64 NumPy, within each sum's rounding bound; then the
    layers through them against the im2col path."""
    from xpnet import fast_layers

    kernels = accelerated(CUPY.asarray([0.0]))
    rng = np.random.default_rng(21)
    x64, w64 = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    x = CUPY.asarray(x64, dtype=dtype)
    if channels_outer:
        x = cp.ascontiguousarray(x.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    w = CUPY.asarray(w64, dtype=dtype)
    param, f = {"stride": stride, "pad": pad}, w_shape[0]
    x64, w64 = to_numpy(x).astype(np.float64), to_numpy(w).astype(np.float64)  # the values as rounded to dtype
    expected, cache = fast_layers.conv_forward_fast(x64, w64, None, param)
    magnitude, magnitude_cache = fast_layers.conv_forward_fast(np.abs(x64), np.abs(w64), None, param)
    dout64 = rng.standard_normal(expected.shape)
    dout = CUPY.asarray(dout64, dtype=dtype)
    dout64 = to_numpy(dout).astype(np.float64)
    _, dw_expected, _ = fast_layers.conv_backward_fast(dout64, cache, input_grad=False)
    _, dw_magnitude, _ = fast_layers.conv_backward_fast(np.abs(dout64), magnitude_cache, input_grad=False)
    eps, taps, positions = np.finfo(dtype).eps, int(np.prod(w_shape[1:])), int(np.prod(expected.shape)) // f

    saved, kernels.direct_small_convs = kernels.direct_small_convs, True
    try:
        out = kernels.direct_conv_forward(x, w, None, stride, pad, *expected.shape[2:])
        dw = kernels.direct_conv_filter_grad(x, dout, *w_shape[2:], stride, pad)
        assert np.all(np.abs(to_numpy(out) - expected) <= taps * eps * magnitude)
        assert np.all(np.abs(to_numpy(dw) - dw_expected) <= positions * eps * dw_magnitude)

        b = CUPY.asarray(rng.standard_normal(f), dtype=dtype)

        def run():  # on a few images, so that sums taken in another order stay within assert_close
            out, cache = fast_layers.conv_forward_fast(x[:4], w, b, param)
            return (out, *fast_layers.conv_backward_fast(dout[:4], cache))

        fast, reference = both(run, fused=["direct_conv_forward", "direct_conv_filter_grad"])
    finally:
        kernels.direct_small_convs = saved
    for a, b in zip(fast, reference):
        assert_close(a, b, dtype)


def test_autotuned_convolutions_agree_with_numpy_and_keep_their_path_inside_a_capture():
    """set_conv_autotune: each geometry timed once, eagerly, along every path it can take
    (the 16-tap one along the direct kernels too); the results those paths give match
    NumPy's; a captured convolution takes the path chosen for its geometry, and one whose
    geometry was never timed takes the switches' path without being timed."""
    from xpnet import fast_layers

    kernels = accelerated(CUPY.asarray([0.0]))
    rng = np.random.default_rng(5)
    x64 = rng.standard_normal((8, 4, 16, 16))
    w_small, w_wide = rng.standard_normal((6, 4, 2, 2)), rng.standard_normal((5, 4, 3, 3))
    x, small, wide = (CUPY.asarray(a, dtype="float64") for a in (x64, w_small, w_wide))
    geometries = [(small, {"stride": 2, "pad": 0}, w_small), (wide, {"stride": 1, "pad": 1}, w_wide)]
    CUPY.set_conv_autotune(True)
    try:
        before = set(kernels.conv_paths.timings)
        for w, param, w64 in geometries:
            out, cache = fast_layers.conv_forward_fast(x, w, None, param)
            expected, naive_cache = layers.conv_forward_naive(x64, w64, None, param)
            dout64 = rng.standard_normal(expected.shape)
            got = fast_layers.conv_backward_fast(CUPY.asarray(dout64), cache)
            want = layers.conv_backward_naive(dout64, naive_cache)
            np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-12, atol=1e-12)
            for a, b in zip(got[:2], want[:2], strict=True):
                np.testing.assert_allclose(to_numpy(a), b, rtol=1e-12, atol=1e-12)
        timed = {key: times for key, times in kernels.conv_paths.timings.items() if key not in before}
        assert len(timed) == 2
        assert [set(times) >= {"im2col"} for times in timed.values()] == [True, True]
        assert sum("direct" in times for times in timed.values()) == 1  # 16 taps, not 36
        eager = fast_layers.conv_forward_fast(x, wide, None, {"stride": 1, "pad": 1})[0]
        graph = CUPY.capture(lambda: fast_layers.conv_forward_fast(x, wide, None, {"stride": 1, "pad": 1})[0])
        np.testing.assert_array_equal(to_numpy(graph.replay()), to_numpy(eager))  # the same path, the same bits
        CUPY.capture(lambda: fast_layers.conv_forward_fast(x[:3], wide, None, {"stride": 1, "pad": 1})[0])
        assert len(kernels.conv_paths.timings) == len(before) + 2  # nothing timed inside the capture
    finally:
        CUPY.set_conv_autotune(False)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape, window, stride", [((8, 16, 32, 32), 2, 2), ((3, 4, 9, 9), 3, 2), ((2, 3, 6, 5), 2, 1)])
@pytest.mark.parametrize("channels_outer", [False, True])
def test_fused_max_pool_matches_the_array_api_reference_with_ties(dtype, shape, window, stride, channels_outer):
    """x stored (N, C, H, W), or channels outermost as a convolution's output is."""
    from xpnet import fast_layers

    rng = np.random.default_rng(11)
    x = CUPY.asarray(rng.integers(-2, 3, size=shape), dtype=dtype)  # few values: many tied windows
    if channels_outer:
        x = cp.ascontiguousarray(x.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)
    param = {"pool_height": window, "pool_width": window, "stride": stride}

    def run():
        out, cache = fast_layers.max_pool_forward_fast(x, param)
        dout = CUPY.asarray(np.random.default_rng(12).standard_normal(tuple(out.shape)), dtype=dtype)
        return out, fast_layers.max_pool_backward_fast(dout, cache)

    fast, reference = both(run, fused=["max_pool_forward", "max_pool_backward"])
    for a, b in zip(fast, reference):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("with_gamma", [True, False])
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("warp", [False, True])
def test_fused_spatial_batchnorm_matches_the_array_api_reference(dtype, with_gamma, gelu, warp):
    """warp: the per-plane sums through PLANE_SUMS (a warp per plane) instead of CuPy's reductions."""
    from xpnet import spatial_norm

    kernels = accelerated(CUPY.asarray([0.0]))
    saved, kernels.warp_plane_sums = kernels.warp_plane_sums, warp
    prefix = "spatial_batchnorm_gelu" if gelu else "spatial_batchnorm"  # with the GELU after it in one pass, or not
    forward, backward = getattr(spatial_norm, f"{prefix}_forward"), getattr(spatial_norm, f"{prefix}_backward")

    rng = np.random.default_rng(13)
    n, c, h, w = 16, 8, 12, 10
    # A permuted view, as a convolution's output is: the kernels must follow its strides.
    x = cp.transpose(CUPY.asarray(rng.standard_normal((c, n, h, w)) * 3 + 1, dtype=dtype), (1, 0, 2, 3))
    gamma = CUPY.asarray(rng.standard_normal(c), dtype=dtype) if with_gamma else None
    beta = CUPY.asarray(rng.standard_normal(c), dtype=dtype)
    dout = CUPY.asarray(rng.standard_normal((n, c, h, w)), dtype=dtype)

    def run():
        bn_param = {"mode": "train", "momentum": 0.6, "eps": 1e-5, "unbiased_running_var": True}
        out, cache = forward(x, gamma, beta, bn_param)
        dx, dgamma, dbeta = backward(dout, cache)
        bn_param["mode"] = "test"
        test_out, _ = forward(x, gamma, beta, bn_param)
        grads = (dx, dbeta) if gamma is None else (dx, dgamma, dbeta)
        return (out, *grads, bn_param["running_mean"], bn_param["running_var"], test_out)

    fused = ["spatial_batchnorm_train", "spatial_batchnorm_backward", "spatial_batchnorm_apply", "running_averages"]
    try:
        fast, reference = both(run, fused=fused)
    finally:
        kernels.warp_plane_sums = saved
    # float32: per-channel sums of 1,920 terms taken in another order differ by a few 1e-5
    # (4e-5 at most over 30 draws of this test run on the CPU through tests/cpu_kernels.py).
    tol = 1e-4 if dtype == "float32" else 1e-12
    for a, b in zip(fast, reference):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("groups", [1, 4, 16])
@pytest.mark.parametrize("warp", [False, True])
def test_fused_spatial_groupnorm_matches_the_array_api_reference(dtype, groups, warp):
    from xpnet import spatial_norm

    kernels = accelerated(CUPY.asarray([0.0]))
    saved, kernels.warp_plane_sums = kernels.warp_plane_sums, warp
    rng = np.random.default_rng(17)
    n, c, h, w = 8, 16, 12, 10
    x = cp.transpose(CUPY.asarray(rng.standard_normal((c, n, h, w)) * 3 + 1, dtype=dtype), (1, 0, 2, 3))
    gamma, beta = (CUPY.asarray(rng.standard_normal((1, c, 1, 1)), dtype=dtype) for _ in range(2))
    dout = CUPY.asarray(rng.standard_normal((n, c, h, w)), dtype=dtype)

    def run():
        out, cache = spatial_norm.spatial_groupnorm_forward(x, gamma, beta, groups, {"eps": 1e-5})
        return (out, *spatial_norm.spatial_groupnorm_backward(dout, cache))

    try:
        fast, reference = both(run, fused=["spatial_groupnorm_train", "spatial_groupnorm_backward"])
    finally:
        kernels.warp_plane_sums = saved
    tol = 1e-4 if dtype == "float32" else 1e-12  # sums of up to 1,920 terms in another order, as for batchnorm
    for a, b in zip(fast, reference):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("plane_size", [1, 9, 31, 32, 33, 49, 225, 1000])
@pytest.mark.parametrize("channels_outer", [False, True])
def test_plane_sums_add_each_plane_across_a_warp(dtype, plane_size, channels_outer, monkeypatch):
    """PLANE_SUMS on planes shorter and longer than a warp, and more planes than its grid
    has warps (its grid capped at 16 blocks of 8 warps), against NumPy in float64: all five modes."""
    from xpnet.backend import cupy_kernels
    from xpnet.backend.cupy_kernels import _plane_sums

    monkeypatch.setattr(cupy_kernels, "_MAX_PLANE_BLOCKS", 16)
    rng = np.random.default_rng(17)
    a, b = (25, 7) if plane_size > 100 else (70, 11)  # 175 or 770 planes: each warp takes one to seven
    channels = a if channels_outer else b
    x, y = (rng.standard_normal((a, b, plane_size)) for _ in range(2))
    p0, p1 = rng.standard_normal(channels), rng.standard_normal(channels)
    gpu = [CUPY.asarray(v, dtype=dtype) for v in (x, y, p0, p1)]
    per_plane = (slice(None), None, None) if channels_outer else (None, slice(None), None)
    tol = 1e-5 if dtype == "float32" else 1e-12

    def check(got, want):
        np.testing.assert_allclose(to_numpy(got), want, rtol=tol, atol=tol * plane_size)

    check(_plane_sums(0, gpu[0], channels_outer, warp=True), x.sum(axis=2))
    check(_plane_sums(1, gpu[0], channels_outer, p0=gpu[2], warp=True), ((x - p0[per_plane]) ** 2).sum(axis=2))
    for warp in (True, False):  # mode 4, the shifted sums, in PLANE_SUMS and in CuPy's reduction
        check(_plane_sums(4, gpu[0], channels_outer, p0=gpu[2], warp=warp), (x - p0[per_plane]).sum(axis=2))
    total, product = _plane_sums(2, gpu[0], channels_outer, gpu[1], warp=True)
    check(total, x.sum(axis=2))
    check(product, (x * y).sum(axis=2))
    # mode 3 against CuPy's two reductions of the same maps
    warp = _plane_sums(3, gpu[0], channels_outer, gpu[1], gpu[2], gpu[3], warp=True)
    reductions = _plane_sums(3, gpu[0], channels_outer, gpu[1], gpu[2], gpu[3], warp=False)
    for got, want in zip(warp, reductions, strict=True):
        check(got, to_numpy(want))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch_axis", [0, 1])
@pytest.mark.parametrize("batch", [600, 100, 2])
def test_channel_totals_sum_a_channels_partial_sums_in_one_block(dtype, batch_axis, batch):
    """CHANNEL_TOTALS with 600 partial sums per channel (each of the 256 threads takes two or
    three, then the block's tree adds them), 100 (a block of 128) and 2 (a block of one warp)."""
    from xpnet.backend.cupy_kernels import _channel_totals

    rng = np.random.default_rng(5)
    sums = rng.standard_normal((batch, 7) if batch_axis == 0 else (7, batch)) + 2.0
    total, mean, inv_std = _channel_totals(cp.asarray(sums, dtype=dtype), batch_axis, batch * 9, eps=1e-5)
    expected = sums.sum(axis=batch_axis)
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(to_numpy(total), expected, rtol=tol)
    np.testing.assert_allclose(to_numpy(mean), expected / (batch * 9), rtol=tol)
    np.testing.assert_allclose(to_numpy(inv_std), 1 / np.sqrt(expected / (batch * 9) + 1e-5), rtol=tol)


def test_fast_conv_on_cupy_matches_numpy_and_runs_its_gemms_through_cublas():
    from xpnet import fast_layers

    rng = np.random.default_rng(9)
    x, w, b = rng.standard_normal((4, 3, 9, 9)), rng.standard_normal((5, 3, 3, 3)), rng.standard_normal(5)
    dout = rng.standard_normal((4, 5, 5, 5))
    param = {"stride": 2, "pad": 1}

    def run(backend):
        arrays = [backend.asarray(a, dtype="float64") for a in (x, w, b, dout)]
        out, cache = fast_layers.conv_forward_fast(*arrays[:3], param)
        return (out, *fast_layers.conv_backward_fast(arrays[3], cache))

    reference = run(xpnet.get_backend("numpy"))
    (fast, _) = both(lambda: run(CUPY), fused=["matmul"])
    for got, expected in zip(fast, reference):
        np.testing.assert_allclose(to_numpy(got), expected, rtol=1e-10, atol=1e-12)


def _switch_cudnn_on_or_skip():
    try:
        CUPY.set_cudnn(True)
    except RuntimeError as exc:
        pytest.skip(f"cuDNN cannot be loaded: {exc}")


CUDNN_GEOMETRIES = [((4, 3, 9, 9), (5, 3, 3, 3), 2, 1), ((8, 16, 15, 15), (32, 16, 3, 3), 1, 1), ((2, 3, 32, 32), (24, 3, 2, 2), 1, 0)]  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("x_shape, w_shape, stride, pad", CUDNN_GEOMETRIES)
def test_cudnn_convolutions_equal_im2col_and_cublas(dtype, x_shape, w_shape, stride, pad):
    from xpnet import fast_layers

    rng = np.random.default_rng(21)
    x, w = (
        CUPY.asarray(rng.standard_normal(x_shape), dtype=dtype),
        CUPY.asarray(rng.standard_normal(w_shape), dtype=dtype),
    )
    b = CUPY.asarray(rng.standard_normal(w_shape[0]), dtype=dtype)
    param = {"stride": stride, "pad": pad}

    def run():
        out, cache = fast_layers.conv_forward_fast(x, w, b, param)
        dout = CUPY.asarray(np.random.default_rng(22).standard_normal(tuple(out.shape)), dtype=dtype)
        return (out, *fast_layers.conv_backward_fast(dout, cache)), cache

    reference, reference_cache = run()
    _switch_cudnn_on_or_skip()
    try:
        got, cache = run()
    finally:
        CUPY.set_cudnn(False)
    assert type(cache[4]).__name__ == "_LibraryConvolution"  # no columns: cuDNN ran
    assert type(reference_cache[4]).__name__ == "_Columns"
    # float32: dw and db sum up to 1,800 products, in another order than the GEMM's.
    tol = 1e-4 if dtype == "float32" else 1e-12
    for a, b_ in zip(got, reference, strict=True):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b_), rtol=tol, atol=tol)


def test_cudnn_convolutions_replay_from_a_cuda_graph():
    from xpnet import fast_layers

    rng = CUPY.rng(3)
    x, w = rng.normal((16, 8, 15, 15), dtype=cp.float32), rng.normal((32, 8, 3, 3), dtype=cp.float32)
    param = {"stride": 1, "pad": 1}

    def step():
        out, cache = fast_layers.conv_forward_fast(x, w, None, param)
        return (out, *fast_layers.conv_backward_fast(out, cache)[:2])

    _switch_cudnn_on_or_skip()
    try:
        eager = [a.copy() for a in step()]  # the first call also finds the algorithms
        graph = CUPY.capture(step)
        x[...] = x * 0.5  # the replay must read the arrays anew
        replayed = graph.replay()
        expected = step()
    finally:
        CUPY.set_cudnn(False)
    CUPY.sync()
    assert not np.allclose(to_numpy(eager[0]), to_numpy(expected[0]))
    for a, b in zip(replayed, expected, strict=True):  # some algorithms add with atomics: not bit-stable
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-5, atol=1e-5)


def _fast94_run(cuda_graph, seed=0):
    from helpers import small_recipe

    from xpnet.recipes import Fast94Trainer

    settings, images, y, make_model = small_recipe(CUPY, 256, (16, 32, 32), 64, cuda_graph, seed)
    model = make_model()
    trainer = Fast94Trainer(model, images, CUPY.asarray(y), settings, seed=seed)
    return trainer, CUPY.to_floats(trainer.train()), model


def test_fast94_under_one_cuda_graph_equals_eager_training():
    """20 steps over 5 epochs (augmentation per epoch, lookahead, the whitening bias freezing):
    captured once while the whitening bias trains and once after (the lookahead once, in a
    graph of its own), and replayed, they give what eager steps give."""
    eager_trainer, eager_losses, eager = _fast94_run(False)
    graph_trainer, graph_losses, graph = _fast94_run(True)
    assert graph_trainer.graph.captures == 2 and graph_trainer.lookahead_graph.captures == 1
    np.testing.assert_allclose(graph_losses, eager_losses, rtol=1e-10)
    for name, value in eager.params.items():
        np.testing.assert_allclose(to_numpy(graph.params[name]), to_numpy(value), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("conv_path", [None, "autotune", "cudnn"])
def test_the_fast_recipe_on_cupy_trains_as_on_numpy_given_the_same_draws(monkeypatch, conv_path):
    """The whole training on the card (fused kernels, cuBLAS or cuDNN, the schedule, sampler and
    lookahead on the device, captured as the recipe runs; the test above ties eager steps to
    captured ones) against NumPy's, which the CPU tests tie to PyTorch's: from the same start and
    random draws, 20 steps in float64 give the same losses and final state. A difference here,
    and not on the CPU, would be a fault of the GPU path alone."""
    from helpers import assert_trains_alike, recipe_with_numpys_draws

    if conv_path == "cudnn":
        _switch_cudnn_on_or_skip()
    elif conv_path == "autotune":
        CUPY.set_conv_autotune(True)
    try:
        run, reference = recipe_with_numpys_draws(CUPY, monkeypatch, cuda_graph=True)
    finally:
        CUPY.set_cudnn(False)
        CUPY.set_conv_autotune(False)
    assert_trains_alike(run, reference)


def test_the_recipes_draws_on_the_card_are_fair():
    """CuPy's generators make the recipe's flips, translations and batch orders on the card:
    the same checks as on the CPU backends (tests/test_backend.py)."""
    from helpers import assert_the_recipes_draws_are_fair

    assert_the_recipes_draws_are_fair(CUPY, n=1_000_000)


@pytest.mark.parametrize("tf32", [False, True])
def test_float32_gradients_on_the_card_are_as_accurate_as_pytorchs(tf32):
    """FastConvNet's float32 gradients through the fused kernels and cuBLAS, against float64,
    beside PyTorch's on the same card from the same weights and batch (both in TF32 or neither):
    no further off than three times PyTorch's, as on the CPU (tests/test_fast94.py). A failure
    names a precision the GPU path loses that PyTorch keeps."""
    pytest.importorskip("torch")
    from helpers import float32_gradient_errors

    errors = float32_gradient_errors(CUPY, f"cuda:{CUPY.device_index}", tf32)
    for name, (ours, theirs) in errors.items():
        assert 0 < ours < 3 * theirs, f"{name}: relative error {ours:.2e}, PyTorch's {theirs:.2e} (TF32 {tf32})"


def test_fast94_steps_never_synchronise():
    import cupyx

    trainer, _, _ = _fast94_run(True)
    trainer.augmenter.epoch(0)
    trainer.sampler.start_epoch(CUPY.rng(1))
    key = trainer.capture_key
    trainer.graph.run(trainer._step, key)  # captured again: after training, the whitening bias trains
    with cupyx.allow_synchronize(False):
        for _ in range(3):
            trainer.graph.run(trainer._step, key)


# ----------------------------------------------------------------------------- float16 activations
@pytest.mark.parametrize("a_t, b_t", [(False, False), (True, False), (False, True)])
def test_cublas_float16_matmul_sums_in_float32(a_t, b_t):
    rng = np.random.default_rng(4)
    # a (37, 2000) @ b (2000, 23), each given as itself or as the transpose of a C-contiguous array
    a_np = rng.standard_normal((2000, 37) if a_t else (37, 2000)).astype(np.float16)
    b_np = rng.standard_normal((23, 2000) if b_t else (2000, 23)).astype(np.float16)
    a, b = CUPY.asarray(a_np), CUPY.asarray(b_np)
    a, b = (a.T if a_t else a), (b.T if b_t else b)
    fast = xpnet.backend.accelerated(a).matmul(a, b)
    assert fast.dtype == cp.float16 and fast.shape == (a.shape[0], 23)
    exact = (to_numpy(a).astype(np.float64) @ to_numpy(b).astype(np.float64)).astype(np.float16)
    ulp = np.spacing(np.abs(exact)).astype(np.float64)
    assert np.all(np.abs(to_numpy(fast).astype(np.float64) - exact) <= 2 * ulp)  # one rounding, not 2000


def _fast_net_run(backend, dtype="float32", activation_dtype="float16"):
    """FastConvNet's loss, gradients, running statistics and test-mode scores on ``backend``,
    from the same weights and batch on every backend, as NumPy arrays."""
    from xpnet.cnn import FastConvNet

    rng = np.random.default_rng(5)
    X = rng.standard_normal((16, 3, 32, 32)).astype(dtype)
    y = rng.integers(0, 10, 16)
    whiten_W = (rng.standard_normal((24, 3, 2, 2)) * 0.5).astype(dtype)
    options = dict(widths=(8, 16, 16), seed=0, dtype=dtype, activation_dtype=activation_dtype)
    model = FastConvNet(backend=backend, **options)
    # the same initial weights on every backend: a seed draws different numbers on CuPy and NumPy
    on_host = FastConvNet(backend="numpy", **options)
    for name, value in on_host.params.items():
        model.params[name][...] = backend.asarray(value)
    model.frozen["whiten_W"][...] = backend.asarray(whiten_W)
    loss, grads = model.loss(backend.asarray(X), backend.asarray(y))
    running = [bn[key] for bn in model.bn_params for key in ("running_mean", "running_var")]
    outputs = [loss, *[grads[name] for name in sorted(grads)], *running, model.loss(backend.asarray(X))]
    return [to_numpy(v) for v in outputs]


def test_float16_fast_conv_net_on_cupy_matches_numpy_and_the_reference():
    """FastConvNet's float16 path through the fused kernels, cuBLAS's GemmEx and CuPy's float16,
    against the same net's NumPy reference, to float16's precision; nothing float16 leaks out."""
    fused = ["im2col", "col2im", "max_pool_forward", "spatial_batchnorm_train", "spatial_batchnorm_backward",
             "gelu_forward", "gelu_backward", "matmul"]  # fmt: skip
    fast, reference = both(lambda: _fast_net_run(CUPY), fused)
    on_numpy = _fast_net_run(xpnet.get_backend("numpy"))
    for a, b, c in zip(fast, reference, on_numpy, strict=True):
        assert a.dtype == b.dtype == c.dtype == np.float32
        scale = max(float(np.max(np.abs(c))), 1e-3)
        np.testing.assert_allclose(a, c, rtol=0, atol=2e-2 * scale)
        np.testing.assert_allclose(b, c, rtol=0, atol=2e-2 * scale)


def test_float64_fast_conv_net_on_cupy_equals_numpy():
    """FastConvNet in float64 through the fused kernels and cuBLAS, and through the array-API
    code on CuPy, against NumPy: the same loss, gradients, running statistics and scores, whatever
    memory order each layer hands the next (a convolution's output is a transposed view)."""
    fused = ["im2col", "col2im", "max_pool_forward", "max_pool_backward", "spatial_batchnorm_train",
             "spatial_batchnorm_backward", "gelu_forward", "gelu_backward", "matmul"]  # fmt: skip
    fast, reference = both(lambda: _fast_net_run(CUPY, "float64", None), fused)
    on_numpy = _fast_net_run(xpnet.get_backend("numpy"), "float64", None)
    for a, b, c in zip(fast, reference, on_numpy, strict=True):
        assert a.dtype == b.dtype == c.dtype == np.float64
        scale = max(float(np.max(np.abs(c))), 1e-12)
        np.testing.assert_allclose(a, c, rtol=1e-9, atol=1e-12 * scale)
        np.testing.assert_allclose(b, c, rtol=1e-9, atol=1e-12 * scale)


@pytest.mark.parametrize("x_shape, w_shape, stride, pad", [((8, 24, 15, 15), (32, 24, 3, 3), 1, 1)])
def test_cudnn_float16_convolutions_equal_im2col_and_cublas(x_shape, w_shape, stride, pad):
    from xpnet import fast_layers

    rng = np.random.default_rng(6)
    x = CUPY.asarray(rng.standard_normal(x_shape).astype(np.float16))
    w = CUPY.asarray((rng.standard_normal(w_shape) * 0.1).astype(np.float16))
    conv = {"stride": stride, "pad": pad}
    out, cache = fast_layers.conv_forward_fast(x, w, None, conv)
    dout = CUPY.asarray(rng.standard_normal(out.shape).astype(np.float16))
    grads = fast_layers.conv_backward_fast(dout, cache)
    _switch_cudnn_on_or_skip()
    try:
        out_c, cache_c = fast_layers.conv_forward_fast(x, w, None, conv)
        grads_c = fast_layers.conv_backward_fast(dout, cache_c)
    finally:
        CUPY.set_cudnn(False)
    assert not hasattr(cache_c[4], "shape")  # no columns: cuDNN ran
    for a, b in zip((out_c, *grads_c[:2]), (out, *grads[:2])):
        assert a.dtype == b.dtype == cp.float16
        scale = float(cp.max(cp.abs(b.astype(cp.float32))))
        np.testing.assert_allclose(to_numpy(a).astype(np.float32), to_numpy(b).astype(np.float32), atol=4e-3 * scale)
