"""The fast CIFAR-10 recipe: FastConvNet, lookahead, the per-epoch augmentation, TTA,
the recipe's hyper-parameters, parity with the same recipe in PyTorch, and an end-to-end run."""

import math
import re
import warnings

import numpy as np
import pytest
from helpers import (
    arr,
    assert_trains_alike,
    float32_gradient_errors,
    labels,
    recipe_state,
    recipe_with_numpys_draws,
    shared_cifar,
    small_recipe,
    to_np,
)

from xpnet import data_utils
from xpnet.augment import AlternatingFlipTranslate, crop_padded, reflect_pad, translate_images, tta_scores
from xpnet.backend import get_backend, to_numpy
from xpnet.cnn import FastConvNet
from xpnet.recipes import Fast94Settings, Fast94Trainer, fast94
from xpnet.recipes.fast94 import sgd_hyper_parameters, warmup_decay
from xpnet.training import DivergenceWarning
from xpnet.training.lookahead import Lookahead, cubic_lookahead_decay
from xpnet.whitening import whitening_filters


# ----------------------------------------------------------------------------- the network
def test_fast_conv_net_sizes_and_initialisation(backend):
    model = FastConvNet(widths=(4, 6, 5), backend=backend, seed=0, dtype="float64")
    assert model.final_size == (3, 3)  # 32 -> 31 -> 15 -> 7 -> 3, then the global pool
    shapes = {k: tuple(v.shape) for k, v in model.params.items()}
    assert shapes["whiten_b"] == (24,) and shapes["W1"] == (4, 24, 3, 3) and shapes["W2"] == (4, 4, 3, 3)
    assert shapes["W3"] == (6, 4, 3, 3) and shapes["W6"] == (5, 5, 3, 3) and shapes["W_out"] == (5, 10)
    w3 = to_np(model.params["W3"])
    np.testing.assert_array_equal(w3[:4, :, 1, 1], np.eye(4))  # Dirac on the first C_in filters
    assert np.count_nonzero(w3[:4]) == 4
    assert np.all(np.abs(w3[4:]) <= 1 / math.sqrt(4 * 9)) and np.count_nonzero(w3[4:]) == w3[4:].size
    np.testing.assert_array_equal(to_np(model.params["W2"])[:, :, 1, 1], np.eye(4))
    assert np.all(np.abs(to_np(model.params["W_out"])) <= 1 / math.sqrt(5))
    assert np.all(to_np(model.bn_params[0]["running_var"]) == 1.0)
    scores = model.loss(arr(backend, np.random.default_rng(0).standard_normal((3, 3, 32, 32))))
    assert tuple(scores.shape) == (3, 10)


def _sampled_numerical_gradient(f, x, indices, h=1e-6):
    """Centred differences of ``f()`` at the given elements of ``x`` (changed in place, then restored)."""
    values = []
    for index in indices:
        old = float(to_np(x[index]))
        x[index] = old + h
        plus = float(f())
        x[index] = old - h
        minus = float(f())
        x[index] = old
        values.append((plus - minus) / (2 * h))
    return np.array(values)


def test_fast_conv_net_gradients(backend, np_rng):
    """Each parameter's gradient against numerical ones at 8 random elements, float64, with
    random weights (the Dirac start makes near-ties in the max pools, where a numerical
    gradient means nothing)."""
    model = FastConvNet(input_dim=(2, 12, 12), widths=(3, 4, 3), dtype="float64", backend=backend, seed=0)
    model.frozen["whiten_W"] = arr(backend, np_rng.standard_normal((16, 2, 2, 2)))
    for name, value in model.params.items():
        model.params[name] = arr(backend, np_rng.standard_normal(tuple(value.shape)))
    X, y = arr(backend, np_rng.standard_normal((3, 2, 12, 12))), labels(backend, np_rng.integers(0, 10, 3))
    _, grads = model.loss(X, y)
    for name, value in model.params.items():
        indices = [tuple(int(np_rng.integers(n)) for n in value.shape) for _ in range(8)]
        numeric = _sampled_numerical_gradient(lambda: model.loss(X, y)[0], value, indices)
        analytic = np.array([float(to_np(grads[name][index])) for index in indices])
        assert np.linalg.norm(numeric - analytic) < 1e-6 * np.linalg.norm(numeric), name


def test_holding_the_whitening_bias_fixed_skips_only_the_work_its_gradient_needs(backend, np_rng, monkeypatch):
    """train_whitening_bias=False: the same loss and gradients, none for whiten_b, and the first
    3x3 conv's backward pass without its input gradient (the whitening GELU's backward needs it)."""
    import xpnet.cnn

    model = FastConvNet(input_dim=(2, 12, 12), widths=(3, 4, 3), dtype="float64", backend=backend, seed=0)
    model.frozen["whiten_W"] = arr(backend, np_rng.standard_normal((16, 2, 2, 2)))
    X, y = arr(backend, np_rng.standard_normal((3, 2, 12, 12))), labels(backend, np_rng.integers(0, 10, 3))
    input_grads = []

    def recording(dout, cache, input_grad=True):
        input_grads.append(input_grad)
        return conv_backward_fast(dout, cache, input_grad)

    conv_backward_fast = xpnet.cnn.conv_backward_fast
    monkeypatch.setattr(xpnet.cnn, "conv_backward_fast", recording)
    loss, grads = model.loss(X, y)
    assert input_grads == [True] * 6 and grads["whiten_b"] is not None
    input_grads.clear()
    model.train_whitening_bias = False
    fixed_loss, fixed_grads = model.loss(X, y)
    assert input_grads == [True] * 5 + [False]  # the first group's first conv comes last
    assert float(fixed_loss) == float(loss) and fixed_grads["whiten_b"] is None
    assert sorted(fixed_grads) == sorted(model.params)
    for name in model.params:
        if name != "whiten_b":
            np.testing.assert_array_equal(to_np(fixed_grads[name]), to_np(grads[name]), err_msg=name)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"widths": (8, 8)}, "three groups' widths"),
        ({"input_dim": (3, 8, 8)}, "too small for three 2x2 pools"),
        ({"widths": (8, 0, 8)}, "each of widths must be a positive integer"),
        # A string's characters passed for widths ("got '8'"); a single number failed inside tuple().
        ({"widths": "888"}, "widths must be the three groups' widths, got '888'"),
        ({"widths": 64}, "widths must be the three groups' widths, got 64"),
        ({"input_dim": "332"}, r"input_dim must be \(C, H, W\), got '332'"),
        ({"input_dim": 32}, r"input_dim must be \(C, H, W\), got 32"),
        # refused at the first loss before, in the layers' words ("bn_param['momentum']", "reduction")
        ({"bn_momentum": 2}, r"^FastConvNet: bn_momentum must be a number in \[0, 1\], got 2$"),
        ({"bn_eps": 0.0}, r"^FastConvNet: bn_eps must be a finite number > 0, got 0.0$"),
        ({"label_smoothing": 1.0}, r"^FastConvNet: label_smoothing must be in \[0, 1\), got 1.0$"),
        ({"loss_reduction": "avg"}, r"^FastConvNet: loss_reduction must be 'mean' or 'sum', got 'avg'$"),
    ],
)
def test_fast_conv_net_refuses_bad_arguments(options, message):
    with pytest.raises(ValueError, match=message):
        FastConvNet(**options)


def test_float16_activations_agree_with_float32_and_keep_the_parameters_in_float32(backend, np_rng):
    if not hasattr(backend.xp, "float16"):
        with pytest.raises(ValueError, match=f"'float16'.*backend '{backend.name}' has no float16"):
            FastConvNet(input_dim=(3, 16, 16), widths=(4, 8, 8), backend=backend, activation_dtype="float16")
        return
    X = backend.asarray(np_rng.standard_normal((8, 3, 16, 16)).astype(np.float32))
    y = labels(backend, np_rng.integers(0, 10, 8))
    whiten_W = np_rng.standard_normal((24, 3, 2, 2)).astype(np.float32) * 0.5
    models = {}
    for act in (None, "float16"):
        model = FastConvNet(input_dim=(3, 16, 16), widths=(4, 8, 8), backend=backend, seed=0, activation_dtype=act)
        model.frozen["whiten_W"][...] = backend.asarray(whiten_W)
        models[act] = (model, *model.loss(X, y))
    (full, loss, grads), (half, half_loss, half_grads) = models[None], models["float16"]
    assert half.activation_dtype == backend.xp.float16 and full.activation_dtype == backend.xp.float32
    assert float(half_loss) == pytest.approx(float(loss), rel=2e-3) and float(half_loss) != float(loss)
    for name, grad in grads.items():
        assert half_grads[name].dtype == half.params[name].dtype == backend.xp.float32, name
        a, b = to_np(half_grads[name]), to_np(grad)
        # float16's 2^-11 grows through a dozen layers and batchnorm over few values (8 images).
        assert np.linalg.norm(a - b) < 5e-2 * np.linalg.norm(b), name
    for bn in half.bn_params:
        assert bn["running_mean"].dtype == bn["running_var"].dtype == backend.xp.float32
    scores = half.loss(X)
    assert scores.dtype == backend.xp.float32
    np.testing.assert_allclose(to_np(scores), to_np(full.loss(X)), atol=2e-2 * float(np.max(np.abs(to_np(scores)))))


def test_fast_conv_net_refuses_activation_dtypes_other_than_float16():
    for bad in ("float64", "int32", "bfloat16"):
        with pytest.raises(ValueError, match=f"activation_dtype must be None .* or 'float16', got '{bad}'"):
            FastConvNet(input_dim=(3, 16, 16), widths=(4, 8, 8), activation_dtype=bad)
    assert FastConvNet(input_dim=(3, 16, 16), widths=(4, 8, 8), activation_dtype="float32").activation_dtype == (
        np.float32
    )


# ----------------------------------------------------------------------------- lookahead
def test_lookahead_moves_the_slow_copy_every_k_steps_and_ends_on_it(backend):
    fast = [arr(backend, [1.0, 2.0]), arr(backend, [[3.0]])]
    total, every = 7, 3
    lookahead = Lookahead(fast, total, every)
    host_fast = [to_np(a).copy() for a in fast]
    host_slow = [a.copy() for a in host_fast]
    for step in range(1, total + 1):
        for i, a in enumerate(fast):  # a training step moves the fast weights
            a += 0.5 * step
            host_fast[i] += 0.5 * step
        lookahead.step()
        if step % every == 0:
            decay = 0.95**5 * (step / total) ** 3
            for i in range(2):
                host_slow[i] = host_slow[i] + (1 - decay) * (host_fast[i] - host_slow[i])
                host_fast[i] = host_slow[i].copy()
        for a, expected in zip(fast, host_fast):
            np.testing.assert_allclose(to_np(a), expected, rtol=1e-15)
        for a, expected in zip(lookahead.slow, host_slow):  # untouched between two points
            np.testing.assert_allclose(to_np(a), expected, rtol=1e-15)
    assert lookahead.steps == total
    lookahead.finish()
    for a, expected in zip(fast, host_slow):
        np.testing.assert_allclose(to_np(a), expected, rtol=1e-15)
    assert cubic_lookahead_decay(7, 7) == pytest.approx(0.95**5)


def test_lookahead_refuses_what_cannot_work(backend):
    with pytest.raises(ValueError, match="every must be a positive integer"):
        Lookahead([arr(backend, [1.0])], 10, every=0)
    with pytest.raises(ValueError, match="at least one array"):
        Lookahead([], 10)


# ----------------------------------------------------------------------------- augmentation and TTA
def test_alternating_flips_mirror_every_image_on_odd_epochs(backend, np_rng):
    images = arr(backend, np_rng.standard_normal((6, 2, 4, 5)))
    augmenter = AlternatingFlipTranslate(images, backend.rng(3), flip=True, max_shift=0)
    mask = to_np(augmenter.flip_mask)
    host = to_np(images)
    first = np.where(mask[:, None, None, None], host[..., ::-1], host)
    buffer = augmenter.images
    for epoch in range(4):
        out = augmenter.epoch(epoch)
        assert out is buffer  # one array for every epoch: a captured step reads it
        expected = first if epoch % 2 == 0 else first[..., ::-1]
        np.testing.assert_array_equal(to_np(out), expected)


def test_translations_crop_the_padded_images_each_epoch(backend, np_rng):
    images = arr(backend, np_rng.standard_normal((8, 2, 6, 6)))
    augmenter = AlternatingFlipTranslate(images, backend.rng(4), flip=False, max_shift=2)
    previous = None
    for epoch in range(2):
        out = to_np(augmenter.epoch(epoch)).copy()
        shifts = augmenter.shifts
        assert to_np(shifts).min() >= -2 and to_np(shifts).max() <= 2
        expected = to_np(translate_images(images, shifts[0, :], shifts[1, :], 2))
        np.testing.assert_array_equal(out, expected)
        assert previous is None or not np.array_equal(out, previous)
        previous = out
    padded = reflect_pad(images, 2)
    zero = labels(backend, np.zeros(8, dtype=np.int64))
    np.testing.assert_array_equal(to_np(crop_padded(padded, zero, zero, 2)), to_np(images))


def test_tta_levels_average_the_views_as_described(backend, np_rng):
    images = arr(backend, np_rng.standard_normal((5, 1, 4, 4)))
    weights = np_rng.standard_normal((16, 3))

    def scores_of(x):
        return x.reshape(x.shape[0], -1) @ weights

    host = to_np(images)
    padded = np.pad(host, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    up_left, down_right = padded[:, :, :4, :4], padded[:, :, 2:, 2:]

    def mirrored(x):
        return 0.5 * scores_of(x) + 0.5 * scores_of(x[..., ::-1])

    expected = 0.5 * mirrored(host) + 0.25 * mirrored(up_left) + 0.25 * mirrored(down_right)

    def backend_scores(x):
        return arr(backend, scores_of(to_np(x)))

    for level, want in ((0, scores_of(host)), (1, mirrored(host)), (2, expected)):
        got = tta_scores(backend_scores, images, level, batch_size=2)
        np.testing.assert_allclose(to_np(got), want, rtol=1e-12)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        tta_scores(backend_scores, images, 2, batch_size=0)
    for level in (3, 2.0, True, "2"):  # 2.0 failed in "tuple indices must be integers"
        with pytest.raises(ValueError, match=rf"tta_scores: level must be 0, 1 or 2, got {level!r}"):
            tta_scores(backend_scores, images, level)
    np.testing.assert_allclose(to_np(tta_scores(backend_scores, images, np.int64(2))), expected, rtol=1e-12)
    # Scores of another shape were averaged on (a flat (N,) came out as (N,)); each level names them.
    for level in (0, 1, 2):
        with pytest.raises(ValueError, match=r"tta_scores: scores_of\(images\) must return class scores of shape \(N, C\), "
                           r"one row for each of the 2 inputs; got shape \(2,\)$"):  # fmt: skip
            tta_scores(lambda x: backend_scores(x)[:, 0], images, level, batch_size=2)


def test_tta_on_the_cpu_scores_a_hundred_images_at_a_time_and_gets_the_whole_batchs_scores(np_rng):
    model = FastConvNet(input_dim=(3, 16, 16), widths=(4, 4, 4), dtype="float64", backend="numpy", seed=0)
    images = np_rng.standard_normal((250, 3, 16, 16))
    model.frozen["whiten_W"][...] = whitening_filters(images, 2)
    sizes = []

    def scores_of(x):
        sizes.append(x.shape[0])
        return model.loss(x)

    tta_scores(scores_of, images, 0)
    assert sizes == [100, 100, 50]
    np.testing.assert_array_equal(tta_scores(model.loss, images, 2), tta_scores(model.loss, images, 2, batch_size=250))
    # the model itself for its loss: "'FastConvNet' object is not callable" from inside the batching before
    np.testing.assert_array_equal(tta_scores(model, images, 1), tta_scores(model.loss, images, 1))
    with pytest.raises(TypeError, match=r"tta_scores: scores_of must be a model or a function from images to "
                                        r"scores \(such as model.loss\), got ndarray"):  # fmt: skip
        tta_scores(images, images, 1)


# ----------------------------------------------------------------------------- hyper-parameters
def test_sgd_hyper_parameters_and_schedule_follow_the_published_recipe():
    settings = Fast94Settings()
    others, biases = sgd_hyper_parameters(settings)
    scale = 1024 * (1 + 1 / (1 - 0.85))
    assert others["learning_rate"] == pytest.approx(11.5 / scale, rel=1e-15)
    assert biases["learning_rate"] == pytest.approx(64 * 11.5 / scale, rel=1e-15)
    decay = 0.0153 * 1024 / scale  # the same absolute decay for every group
    assert others["learning_rate"] * others["weight_decay"] == pytest.approx(decay, rel=1e-15)
    assert biases["learning_rate"] * biases["weight_decay"] == pytest.approx(decay, rel=1e-15)
    total = 476  # ceil(48 · 9.9)
    warm = int(0.23 * total)
    assert warmup_decay(0, total, settings) == pytest.approx(0.2)
    assert warmup_decay(warm, total, settings) == pytest.approx(1.0)
    assert warmup_decay(warm // 2, total, settings) == pytest.approx(0.2 + 0.8 * (warm // 2) / warm)
    assert warmup_decay(total, total, settings) == pytest.approx(0.07)
    with pytest.raises(ValueError, match="unknown settings lr"):
        settings.with_overrides({"lr": 1.0})


# ----------------------------------------------------------------------------- parity with PyTorch
def test_the_captured_step_is_captured_once_while_the_whitening_bias_trains_and_once_after(monkeypatch):
    """The recipe holds the whitening bias fixed after 3 epochs, which changes the step, so a
    graph run captures it twice in all, never per step or per epoch; the lookahead's graph is
    captured once. A stand-in capture that
    replays by running the step checks the keying on the CPU; tests/test_gpu.py compares a
    real graph run with an eager one."""
    from dataclasses import replace

    from xpnet.backend.numpy_backend import NumpyBackend

    class Replayed:
        def __init__(self, step):
            self.replay = step

    monkeypatch.setattr(NumpyBackend, "can_capture", True)
    monkeypatch.setattr(NumpyBackend, "capture", lambda self, step: Replayed(step))
    backend = get_backend("numpy")
    settings, images, y, make_model = small_recipe(backend)  # 5 epochs of 4 steps
    trains = []
    graphed = Fast94Trainer(make_model(), images, backend.asarray(y), replace(settings, cuda_graph=True))
    graph_losses = graphed.train(on_epoch=lambda epoch, trainer: trains.append(trainer.model.train_whitening_bias))
    eager_losses = Fast94Trainer(make_model(), images, backend.asarray(y), settings).train()
    assert trains == [True, True, True, False, False] and graphed.model.train_whitening_bias
    assert graphed.graph.captures == 2
    assert graphed.lookahead_graph.captures == 1  # its first point runs eagerly, the other three replay
    assert [float(v) for v in graph_losses] == [float(v) for v in eager_losses]


@pytest.mark.parametrize("epochs, steps", [(5, 20), (4.6, 19)])
def test_every_step_equals_the_pytorch_recipe_to_1e_9(epochs, steps):
    """Same initial parameters, batches and augmentation draws, float64: 20 steps (5 epochs of 4)
    cover the warm-up and decay, four lookahead points, the whitening bias freezing after
    3 epochs, alternating flips and the final lookahead; 4.6 epochs (the published recipe's
    9.9 are not whole either) end on a short epoch of 3 steps, the final lookahead after a
    step that is not one of its points."""
    torch = pytest.importorskip("torch")
    from dataclasses import replace

    from xpnet.recipes import fast94_torch

    backend = get_backend("numpy")
    settings, images, y, make_model = small_recipe(backend)
    settings = replace(settings, epochs=epochs)
    model = make_model()
    net = fast94_torch.make_net(settings, torch.float64)
    names = fast94_torch.xpnet_names(net)
    with torch.no_grad():
        for name, value in recipe_state(model).items():
            names[name].copy_(torch.from_numpy(value.T.copy() if name == "W_out" else value))

    draws = {}

    def record(epoch, trainer):
        if epoch == 0:
            draws["flip"] = to_numpy(trainer.augmenter.flip_mask).copy()
        draws["shifts", epoch] = to_numpy(trainer.augmenter.shifts).T.copy()  # (N, 2) as PyTorch's
        draws["order", epoch] = to_numpy(trainer.sampler._order).copy()

    ours = Fast94Trainer(model, images, backend.asarray(y), settings, seed=0).train(on_epoch=record)

    class Replay:
        def flip_mask(self, n):
            return torch.from_numpy(draws["flip"])

        def shifts(self, epoch, n, max_shift):
            return torch.from_numpy(draws["shifts", epoch])

        def order(self, epoch, n):
            return torch.from_numpy(draws["order", epoch])

    theirs = fast94_torch.train(net, torch.from_numpy(np.array(images)), torch.from_numpy(y), settings, Replay())
    assert len(ours) == len(theirs) == steps
    np.testing.assert_allclose([float(v) for v in ours], [float(v) for v in theirs], rtol=1e-9)
    final = recipe_state(model)
    for name, tensor in names.items():
        expected = tensor.detach().numpy()
        expected = expected.T if name == "W_out" else expected
        np.testing.assert_allclose(final[name], expected, rtol=1e-9, atol=1e-9, err_msg=name)
    frozen = fast94_torch.xpnet_names(fast94_torch.make_net(settings, torch.float64))["whiten_b"]
    assert not np.allclose(final["whiten_b"], frozen.detach().numpy())  # it trained, then stopped


def test_the_recipe_trains_alike_on_every_backend_given_the_same_draws(backend, monkeypatch):
    """The trainer, the model and the update on each backend against NumPy: from the same start
    and draws, 20 steps in float64 give the same losses and the same final state (the
    PyTorch test above ties NumPy's run to PyTorch's; tests/test_gpu.py runs this on CuPy with
    CUDA graphs)."""
    assert_trains_alike(*recipe_with_numpys_draws(backend, monkeypatch))


@pytest.mark.parametrize("through_cupy_kernels", [False, True])
def test_float32_gradients_are_as_accurate_as_pytorchs(monkeypatch, through_cupy_kernels):
    """Rounding, not the algorithm: from the same float32 weights and batch, each float32
    gradient lies no further from the float64 one than three times PyTorch's does (they are
    within 0.2-1.1 times of each other here; a GELU whose float32 cdf is off by 6e-5 makes it
    about 60 times). Also through CuPy's fused kernels, run on the CPU (their float32
    arithmetic; NumPy's products stand in for cuBLAS's). tests/test_gpu.py asks the same of the
    card, in float32 and in TF32."""
    pytest.importorskip("torch")
    if through_cupy_kernels:
        from cpu_kernels import COMPILER, cupy_kernels_on_cpu

        from xpnet.backend import dispatch

        if COMPILER is None:
            pytest.skip("no C++ compiler to build the kernels with")
        monkeypatch.setitem(dispatch._ACCELERATORS, np.ndarray, cupy_kernels_on_cpu())
        assert dispatch.accelerated(np.zeros(1)) is not None
    for name, (ours, theirs) in float32_gradient_errors(get_backend("numpy")).items():
        assert 0 < ours < 3 * theirs, f"{name}: relative error {ours:.2e} in float32, PyTorch's {theirs:.2e}"


def test_the_pytorch_evaluation_with_tta_scores_as_ours_does():
    """The benchmark compares test accuracies, so both sides must score alike: the same parameters
    and (random) running statistics in float64 give the same logits at each TTA level."""
    torch = pytest.importorskip("torch")
    from xpnet.recipes import fast94_torch

    backend = get_backend("numpy")
    settings, images, _, make_model = small_recipe(backend, n=48)
    model = make_model()
    rng = np.random.default_rng(1)
    for bn in model.bn_params:
        bn["running_mean"][...] = 0.1 * rng.standard_normal(bn["running_mean"].shape)
        bn["running_var"][...] = rng.uniform(0.5, 2.0, bn["running_var"].shape)
    net = fast94_torch.make_net(settings, torch.float64)
    names = fast94_torch.xpnet_names(net)
    with torch.no_grad():
        for name, value in recipe_state(model).items():
            names[name].copy_(torch.from_numpy(value.T.copy() if name == "W_out" else value))
    host_images = torch.from_numpy(np.array(to_numpy(images)))
    for level in (0, 1, 2):
        ours = to_numpy(tta_scores(model.loss, images, level, batch_size=20))
        theirs = fast94_torch.evaluate(net, host_images, level, batch_size=20).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12, err_msg=f"TTA level {level}")
    assert np.abs(ours).max() > 1e-3  # not a trivial agreement of zeros


def test_both_sides_normalise_the_pixels_alike():
    torch = pytest.importorskip("torch")
    from xpnet.recipes import fast94_torch
    from xpnet.recipes.fast94 import normalized_images

    pixels = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3)).astype(np.float64)
    ours = to_numpy(normalized_images(get_backend("numpy"), pixels, "float64"))
    theirs = fast94_torch.normalize(torch.from_numpy(pixels)).numpy()
    assert ours.shape == theirs.shape == (5, 3, 32, 32)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def test_pytorch_whitening_filters_equal_ours_up_to_sign():
    torch = pytest.importorskip("torch")
    from xpnet.recipes import fast94_torch

    images = np.random.default_rng(1).standard_normal((20, 3, 8, 8))
    layer = torch.nn.Conv2d(3, 24, 2).double()
    fast94_torch.init_whitening(layer, torch.from_numpy(images), 5e-4)
    theirs = layer.weight.detach().numpy().reshape(24, -1)
    ours = whitening_filters(images, 2, 5e-4).reshape(24, -1)
    signs = np.sign(np.sum(theirs * ours, axis=1))[:, None]
    np.testing.assert_allclose(ours * signs, theirs, rtol=1e-8, atol=1e-10)


def test_the_pytorch_recipe_in_its_published_fp16_channels_last_setting_runs_on_the_cpu():
    # The benchmark reports this setting beside the float32 comparison on a GPU only; the
    # code path (half-precision net, float32 batchnorm, channels-last batches) runs here too.
    torch = pytest.importorskip("torch")
    from xpnet.recipes import fast94_torch

    rng = np.random.default_rng(0)
    images = fast94_torch.normalize(torch.as_tensor(rng.integers(0, 256, (128, 32, 32, 3)).astype(np.float32)))
    labels_ = torch.as_tensor(rng.integers(0, 10, 128))
    settings = Fast94Settings().with_overrides({"widths": (8, 16, 16), "batch_size": 32, "epochs": 1})
    data = (images, labels_, images[:32], labels_[:32])
    full = fast94_torch.fast94_torch(*data, settings, seed=0)
    half = fast94_torch.fast94_torch(*data, settings, seed=0, dtype=torch.float16, channels_last=True)
    assert half.steps == full.steps == 4 and 0.0 <= half.test_accuracy <= 1.0
    # The same initial weights and draws: the losses agree to half precision's rounding.
    np.testing.assert_allclose(half.losses, full.losses, rtol=2e-2)
    assert half.losses != full.losses  # and they were computed in half precision


def test_the_recipe_with_float16_activations_follows_the_float32_run():
    # The same initial weights and draws: float16 activations change the losses by rounding only.
    rng = np.random.default_rng(0)
    data = {"X_train": rng.integers(0, 256, (128, 32, 32, 3)).astype(np.float32), "y_train": rng.integers(0, 10, 128)}
    data |= {"X_test": data["X_train"][:32], "y_test": data["y_train"][:32]}
    small = {"widths": (8, 16, 16), "batch_size": 32, "epochs": 1, "seed": 0, "backend": "numpy"}
    full = fast94(data, **small)
    half = fast94(data, activation_dtype="float16", **small)
    assert half.steps == full.steps == 4 and 0.0 <= half.test_accuracy <= 1.0
    np.testing.assert_allclose(half.losses, full.losses, rtol=2e-2)
    assert half.losses != full.losses


# ----------------------------------------------------------------------------- end to end
def test_the_recipe_runs_end_to_end_on_512_cifar_images():
    """The whole recipe (whitening, augmentation, lookahead, TTA) at a small scale, with every
    setting published except the head's scale: 1/9 is tuned for 476 steps of 1024 images and
    learns too slowly to show in 16 steps of 64, so the smoke run uses 1."""
    root = shared_cifar()
    if root is None:
        pytest.skip("CIFAR-10 is not available (set XPNET_DATA_DIR)")
    X_train, y_train, X_test, y_test = data_utils.load_CIFAR10(root, dtype="float32")
    data = {"X_train": X_train[:512], "y_train": y_train[:512], "X_test": X_test[:200], "y_test": y_test[:200]}
    result = fast94(data, backend="numpy", seed=0, widths=(8, 16, 16), batch_size=64, epochs=2, scale=1.0)
    losses = np.array(result.losses)
    assert result.steps == 16 and result.epochs == 2.0 and losses.shape == (16,)
    assert np.all(np.isfinite(losses))
    assert losses[-8:].mean() < 0.9 * losses[0], losses
    assert losses[-8:].mean() < 64 * math.log(10)  # better than predicting every class equally
    assert 0.0 <= result.test_accuracy <= 1.0
    parts = result.whiten_seconds + result.train_seconds + result.eval_seconds
    assert result.seconds == pytest.approx(parts)


def _small_run(**settings):
    rng = np.random.default_rng(0)
    data = {"X_train": rng.integers(0, 256, (64, 32, 32, 3)).astype(np.float32), "y_train": rng.integers(0, 10, 64)}
    data |= {"X_test": rng.integers(0, 256, (24, 32, 32, 3)).astype(np.float32), "y_test": rng.integers(0, 10, 24)}
    small = {"widths": (4, 8, 8), "batch_size": 32, "epochs": 1, "seed": 0, "backend": "numpy", "tta_level": 1}
    return data, fast94(data, **(small | settings))


def test_fewer_training_images_than_the_whitening_takes_run_on_every_backend(backend):
    """The whitening reads the first 5,000 training images; from 64 the slice's stop lay past the
    end, which the array API leaves unspecified and array-api-strict refused (an IndexError)."""
    data, result = _small_run(backend=backend)
    assert result.settings.whiten_images > data["X_train"].shape[0]
    assert result.steps == 2 and 0 <= result.test_accuracy <= 1 and result.diverged is None


def test_a_model_file_under_the_home_folder_is_saved_and_loaded_by_a_tilde_path(tmp_path, monkeypatch):
    """load_checkpoint expanded "~/..." and the loader then read the file's size at "~/...": FileNotFoundError."""
    from xpnet.recipes import load_fast94_model, save_fast94_model

    monkeypatch.setenv("HOME", str(tmp_path))
    _, result = _small_run()
    assert save_fast94_model("~/runs/fast94.npz", result) == str(tmp_path / "runs" / "fast94.npz")
    assert load_fast94_model("~/runs/fast94.npz").widths == result.settings.widths
    # the network alone, or the arguments swapped, failed on `result.model` (AttributeError)
    with pytest.raises(TypeError, match=r"got FastConvNet: the result carries the settings .* save_checkpoint\(path"):
        save_fast94_model(tmp_path / "net.npz", result.model)
    with pytest.raises(TypeError, match=r"got str; the path comes first: save_fast94_model\(path, result\)$"):
        save_fast94_model(result, "~/runs/other.npz")
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["fast94.npz"]


def test_the_recipes_data_may_be_arrays_of_any_backend(backend):
    """np.asarray of array-api-strict's device1 arrays (as of CuPy's) failed in strict's words."""
    from xpnet.recipes.fast94 import device_data

    rng = np.random.default_rng(0)
    data = {"X_train": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), "y_train": rng.integers(0, 10, 8),
            "X_test": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), "y_test": rng.integers(0, 10, 4)}  # fmt: skip
    numpy = get_backend("numpy")
    expected = [to_numpy(a) for a in device_data(numpy, data)]
    moved = device_data(numpy, {key: backend.asarray(value) for key, value in data.items()})
    for got, want in zip(moved, expected):
        np.testing.assert_array_equal(to_numpy(got), want)


def test_the_trained_network_is_saved_and_loads_on_any_backend_scoring_as_it_did(backend, tmp_path):
    """Trained on NumPy, saved, loaded on each backend: the run's TTA scores and accuracy."""
    from xpnet.recipes import load_fast94_model, save_fast94_model
    from xpnet.recipes.fast94 import device_data

    data, result = _small_run(dtype="float64")
    assert isinstance(result.model, FastConvNet) and result.settings.widths == (4, 8, 8)
    path = save_fast94_model(tmp_path / "fast94.npz", result)
    model = load_fast94_model(path, backend=backend)
    assert model.backend is backend and model.widths == (4, 8, 8) and model.dtype == backend.dtype("float64")
    test_images = device_data(backend, data, "float64")[2]
    ours = to_numpy(tta_scores(model.loss, test_images, level=1))
    expected = to_numpy(tta_scores(result.model.loss, device_data(result.model.backend, data, "float64")[2], 1))
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)
    assert np.mean(np.argmax(ours, axis=1) == data["y_test"]) == result.test_accuracy


def test_a_file_that_holds_no_fast94_network_is_refused_by_name(tmp_path):
    from xpnet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from xpnet.recipes import load_fast94_model, save_fast94_model

    _, result = _small_run()
    good = load_checkpoint(save_fast94_model(tmp_path / "good.npz", result))
    broken = {
        "other": {"epoch": 3},
        "widths": good | {"settings": good["settings"] | {"widths": [4, 8]}},
        "shapes": good | {"model": good["model"] | {"params": good["model"]["params"] | {"W1": np.zeros((2, 2))}}},
        "not_arrays": good | {"model": good["model"] | {"params": good["model"]["params"] | {"W1": 3}}},
        # sizes that the file's arrays cannot hold: the network was built first, 72 GB of it from 23 KB
        "wide": good | {"settings": good["settings"] | {"widths": [20000, 20000, 20000]}},
        "channels": good | {"input_dim": [10**7, 32, 32]},
    }
    messages = {
        "other": "holds no fast94 network",
        "widths": r"widths must be three positive integers, got \[4, 8\]",
        "shapes": r"parameter W1 has shape \(2, 2\), the model expects \(4, 24, 3, 3\)",
        "not_arrays": r"parameter W1 is not an array of floats \(got int\)",
        "wide": r"wide.npz': declares a network of more values than the \d+ it has room for",
        "channels": r"channels.npz': declares a network of more values than the \d+ it has room for",
    }
    for name, payload in broken.items():
        save_checkpoint(tmp_path / f"{name}.npz", payload)
        with pytest.raises(CheckpointError, match=messages[name]):
            load_fast94_model(tmp_path / f"{name}.npz")
    torch = pytest.importorskip("torch")
    from xpnet.recipes import fast94_torch

    settings = Fast94Settings().with_overrides({"widths": (4, 8, 8), "batch_size": 32, "epochs": 1})
    images = torch.zeros((64, 3, 32, 32))
    theirs = fast94_torch.fast94_torch(images, torch.zeros(64, dtype=torch.int64), images[:8],
                                       torch.zeros(8, dtype=torch.int64), settings)  # fmt: skip
    with pytest.raises(ValueError, match="holds no xpnet network"):
        save_fast94_model(tmp_path / "theirs.npz", theirs)


def test_progress_tells_each_epoch_and_on_a_cpu_the_loss_of_the_epoch_before():
    lines = []
    _, result = _small_run(epochs=2, progress=lines.append)  # 2 steps of 32 images an epoch
    assert [line.split(",")[0] for line in lines] == [
        "fast94: epoch 1 of 2",
        "fast94: epoch 2 of 2",
        "fast94: evaluating 24 test images (TTA level 1)",
    ]
    assert "loss" not in lines[0]
    per_image = sum(result.losses[:2]) / 64
    assert lines[1].endswith(f"; training loss {per_image:.3f} per image in the epoch before")
    assert 1.0 < per_image < 4.0  # near ln(10) = 2.3 at the start


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("epochs", "abc", "epochs must be a finite number, got 'abc'"),
        ("epochs", float("nan"), "epochs must be a finite number, got nan"),
        ("batch_size", 64.0, "batch_size must be an integer, got 64.0"),
        ("batch_size", True, "batch_size must be an integer, got True"),
        ("widths", (8, 16), "widths must be three positive integers, got (8, 16)"),
        ("widths", (8, 0, 16), "widths must be three positive integers, got (8, 0, 16)"),
        ("flip", "yes", "flip must be True or False, got 'yes'"),
        ("cuda_graph", 1, "cuda_graph must be None, True or False, got 1"),
        ("dtype", "float16", "dtype must be 'float32' or 'float64', got 'float16'"),
        ("activation_dtype", "int8", "activation_dtype must be None or 'float16', got 'int8'"),
    ],
)
def test_settings_of_the_wrong_kind_are_refused_by_name(name, value, message):
    with pytest.raises(ValueError, match=re.escape(f"fast94: {message}")):
        Fast94Settings().with_overrides({name: value})


@pytest.mark.parametrize(
    "name, value, allowed",
    [
        ("tta_level", 5, "0, 1 or 2"),  # failed at the evaluation, after the whole training run
        ("momentum", 1.5, "in [0, 1)"),  # failed as 'learning_rate must be > 0, got -0.72'
        ("learning_rate", -1.0, "> 0"),  # failed as 'learning_rate ... got -0.0082', converted
        ("label_smoothing", 1.5, "in [0, 1)"),
        ("translate", -2, ">= 0"),
        ("bn_momentum", 1.0, "in [0, 1)"),
        ("whiten_images", 0, ">= 1"),
        ("warmup", 1.5, "in [0, 1]"),
        ("bn_eps", 0.0, "> 0"),
    ],
)
def test_settings_out_of_range_are_refused_in_the_users_terms_before_any_work(name, value, allowed):
    with pytest.raises(ValueError, match=re.escape(f"fast94: {name} must be {allowed}, got {value!r}")):
        Fast94Settings().with_overrides({name: value})


def test_settings_of_the_right_kind_are_taken_as_given():
    settings = Fast94Settings().with_overrides(
        {"widths": [8, 16, 16], "epochs": 2, "dtype": np.float64, "cuda_graph": None, "activation_dtype": "float16"}
    )
    assert settings.widths == (8, 16, 16) and settings.epochs == 2 and settings.dtype is np.float64
    assert settings.with_overrides({"epochs": 0.5}).epochs == 0.5  # a float where an int was given before
    numpy_numbers = settings.with_overrides(
        {"batch_size": np.int64(64), "widths": np.array([4, 8, 8]), "scale": np.float32(0.5)}
    )
    assert numpy_numbers.batch_size == 64 and numpy_numbers.widths == (4, 8, 8) and numpy_numbers.scale == 0.5


def test_fast94_refuses_bad_data_and_settings():
    data = {"X_train": np.zeros((8, 32, 32, 3)), "y_train": np.zeros(8, dtype=np.int64)}
    with pytest.raises(ValueError, match="'X_test' is missing"):
        fast94(data, backend="numpy")
    # the four arrays as a list failed inside NumPy ("truth value ... is ambiguous"), and
    # fast94(backend, data) was named by its backend
    with pytest.raises(TypeError, match=r"^fast94: data must be a dict with .*, got list; load_CIFAR10's four arrays"):
        fast94(list(data.values()), backend="numpy")
    with pytest.raises(TypeError, match=r"^fast94: data must be a dict with .*, got str;"):
        fast94("numpy", data)
    data.update(X_test=np.zeros((4, 32, 32, 3)), y_test=np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="batch_size 1024 is larger than the 8 training images"):
        fast94(data, backend="numpy", warmup=False)
    # named as reflect_pad's pad, the name of nothing the caller had set
    with pytest.raises(
        ValueError, match=re.escape("fast94: translate 32 must be smaller than the images' sides (32, 32)")
    ):
        fast94(data, backend="numpy", batch_size=4, translate=32)
    with pytest.raises(ValueError, match=r"X_train must be colour images \(N, H, W, 3\) or \(N, 3, H, W\)"):
        fast94({**data, "X_train": np.zeros((8, 32, 32))}, backend="numpy")
    poisoned = np.zeros((4, 32, 32, 3))
    poisoned[1, 2, 3, 0] = np.nan  # surfaced as "Eigenvalues did not converge" from the whitening's eigh
    for key in ("X_train", "X_test"):
        with pytest.raises(ValueError, match=f"fast94: {key} contains NaN or infinite values"):
            fast94(
                {**data, key: np.concatenate([poisoned, poisoned]) if key == "X_train" else poisoned}, backend="numpy"
            )
    with pytest.raises(ValueError, match=re.escape("fast94: data['y_test'] has label 12 outside [0, 10)")):
        fast94({**data, "y_test": np.full(4, 12)}, backend="numpy")
    # pixels already normalised or scaled to [0, 1] would be normalised again, and train on in silence
    pixels = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3))
    normalised = (pixels - pixels.mean()) / pixels.std()
    with pytest.raises(ValueError, match=r"fast94: X_train must hold pixels in 0\.\.255, which it normalises itself; "
                                         r"got values from -1\.\d+ to 1\.\d+"):  # fmt: skip
        fast94({**data, "X_train": normalised}, backend="numpy")
    with pytest.raises(
        ValueError, match=r"X_test looks scaled to \[0, 1\] \(its largest value is 1\).*multiply them by 255"
    ):
        fast94({**data, "X_test": pixels[:4] / 255.0}, backend="numpy")
    with pytest.raises(ValueError, match=r"X_train must hold pixels in 0\.\.255.*got values from 1 to 1000"):
        fast94({**data, "X_train": np.where(pixels == 0, 1000, pixels)}, backend="numpy")
    ones = np.ones((8, 32, 32, 3), dtype=np.uint8)  # integers are pixels, whatever their largest
    with pytest.raises(ValueError, match="batch_size 1024 is larger than the 8 training images"):
        fast94({**data, "X_train": ones}, backend="numpy", warmup=False)
    for seed in (-1, "a", 1.5):  # NumPy's seeding said 'expected non-negative integer'
        with pytest.raises(ValueError, match=f"fast94: seed must be a non-negative integer, got {seed!r}"):
            fast94(data, backend="numpy", seed=seed)
    # a string is truthy: warmup="no" ran the whole recipe twice, verbose="False" printed
    with pytest.raises(ValueError, match=r"^fast94: warmup must be True or False \(or None\), got 'no'$"):
        fast94(data, backend="numpy", warmup="no")
    with pytest.raises(ValueError, match="^fast94: verbose must be True or False, got 'False'$"):
        fast94(data, backend="numpy", verbose="False")
    with pytest.raises(ValueError, match="^AlternatingFlipTranslate: flip must be True or False, got 'off'$"):
        AlternatingFlipTranslate(np.zeros((2, 3, 4, 4), np.float32), get_backend("numpy").rng(0), flip="off")


def test_fast94_checks_its_labels_as_the_solver_does_wherever_they_are(backend):
    """Labels already on the device went unchecked (labels 1..10 trained on in silence), and
    a label count unlike the image count failed as an IndexError or a broadcasting error
    from deep inside the library."""
    be = get_backend(backend)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
    labels = np.arange(8) % 10
    data = {"X_train": pixels, "y_train": labels, "X_test": pixels[:4], "y_test": labels[:4]}
    for key, y, message in (
        ("y_train", labels[:7], "data['X_train'] has 8 rows but data['y_train'] has 7 labels"),
        ("y_test", labels[:3], "data['X_test'] has 4 rows but data['y_test'] has 3 labels"),
        ("y_train", labels + 3, "data['y_train'] has label 10 outside [0, 10) for a model with 10 classes"),
        ("y_test", labels[:4] - 1, "data['y_test'] has label -1 outside [0, 10)"),
        ("y_train", labels.astype(np.float32), "data['y_train'] must hold integer class labels, got dtype "),
        ("y_train", labels[:, None], "data['y_train'] must be 1-D, got shape (8, 1)"),
    ):
        for given in (y, be.asarray(y)):  # on the host, and on the device already
            with pytest.raises(ValueError, match="^" + re.escape(f"fast94: {message}")):
                fast94({**data, key: given}, backend=be, batch_size=4, warmup=False)


def test_fast_conv_net_trains_with_the_solver_and_its_state_round_trips(tmp_path):
    from xpnet.solver import Solver

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((64, 3, 16, 16)), rng.integers(0, 10, 64)
    data = {"X_train": X[:48], "y_train": y[:48], "X_val": X[48:], "y_val": y[48:]}
    model = FastConvNet(input_dim=(3, 16, 16), widths=(4, 4, 4), dtype="float64", backend="numpy", seed=0)
    model.init_whitening(X)
    np.testing.assert_array_equal(to_np(model.frozen["whiten_W"]), to_np(whitening_filters(X, 2)))
    solver = Solver(model, data, update_rule="nesterov_sgd", optim_config={"learning_rate": 1e-3}, batch_size=16,
                    num_epochs=1, sampler="epoch", verbose=False, seed=0, checkpoint_name=str(tmp_path / "fast"))  # fmt: skip
    solver.train()
    assert len(solver.loss_history) == 3 and np.all(np.isfinite(solver.loss_history))
    state = model.state_dict()
    again = FastConvNet(input_dim=(3, 16, 16), widths=(4, 4, 4), dtype="float64", backend="numpy", seed=1)
    again.load_state_dict(state)
    np.testing.assert_array_equal(to_np(again.frozen["whiten_W"]), to_np(model.frozen["whiten_W"]))
    np.testing.assert_array_equal(to_np(again.bn_params[3]["running_var"]), to_np(model.bn_params[3]["running_var"]))
    np.testing.assert_array_equal(to_np(again.loss(X[:5])), to_np(model.loss(X[:5])))
    assert (tmp_path / "fast_epoch_1.npz").is_file()


def test_fast_conv_net_trains_before_its_whitening_is_set_and_names_wrong_images():
    """Its whitening filters start as PyTorch's default conv initialisation: zeros made every
    batchnorm divide by sqrt(eps), and the first steps NaN."""
    from xpnet.solver import Solver

    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((60, 3, 32, 32)), rng.integers(0, 10, 60)
    data = {"X_train": X[:40], "y_train": y[:40], "X_val": X[40:], "y_val": y[40:]}
    model = FastConvNet(widths=(4, 8, 8), backend="numpy", seed=0)
    bound = 1 / math.sqrt(3 * 4)
    assert np.all(np.abs(to_np(model.frozen["whiten_W"])) <= bound) and np.count_nonzero(model.frozen["whiten_W"]) > 0
    solver = Solver(model, data, batch_size=20, num_epochs=2, verbose=False, seed=0)  # the course's SGD, 1e-2
    solver.train()
    assert solver.diverged is None and np.all(np.isfinite(solver.loss_history))
    with pytest.raises(
        ValueError, match=r"FastConvNet.init_whitening: inputs must be \(N, 3, 32, 32\), got \(5, 32, 32, 3\)"
    ):
        model.init_whitening(X[:5].transpose(0, 2, 3, 1))


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")  # NumPy's, on the way
def test_a_diverging_recipe_says_so():
    rng = np.random.default_rng(0)
    data = {"X_train": rng.integers(0, 256, (64, 32, 32, 3)), "y_train": rng.integers(0, 10, 64),
            "X_test": rng.integers(0, 256, (8, 32, 32, 3)), "y_test": rng.integers(0, 10, 8)}  # fmt: skip
    with pytest.warns(DivergenceWarning, match=r"fast94: the training loss became nan at step \d+ of 4"):
        result = fast94(data, backend="numpy", widths=(4, 4, 4), batch_size=32, epochs=2, learning_rate=1e30)
    assert not np.all(np.isfinite(result.losses))
    assert "training diverged" in result.diverged and "learning rate 1e+30 per 1024 examples" in result.diverged
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        assert fast94(data, backend="numpy", widths=(4, 4, 4), batch_size=32, epochs=2).diverged is None


def test_a_switch_refused_after_another_was_accepted_leaves_none_on(monkeypatch):
    """TF32 accepted, then convolution autotuning refused (NumPy has one path): TF32 is
    switched off again before the error reaches the caller."""
    from xpnet.backend.numpy_backend import NumpyBackend

    calls = []
    monkeypatch.setattr(NumpyBackend, "set_tf32", lambda self, on: calls.append(on))
    with pytest.raises(ValueError, match="convolution autotuning applies to CUDA GPUs"):
        _small_run(tf32=True, conv_autotune=True)
    assert calls == [True, False]
