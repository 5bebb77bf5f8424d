"""Data, models and payloads that several test modules use."""

from __future__ import annotations

import functools
import os
import pickle
import signal
from pathlib import Path

import numpy as np

import xpnet
from xpnet import data_utils
from xpnet.backend import backend_of, to_numpy
from xpnet.gradient_check import eval_numerical_gradient_array, rel_error


def to_np(x):
    """Any backend's array (or a scalar) as NumPy, for independent reference checks."""
    return to_numpy(x)


def arr(backend, a):
    """Host data as a float64 array of ``backend``."""
    return backend.asarray(np.asarray(a), dtype="float64")


def labels(backend, a):
    """Host integers as an int64 array of ``backend``."""
    return backend.asarray(np.asarray(a, dtype=np.int64))


def check_backward(backend, forward, inputs, grads, dout, tol=1e-7):
    """Each analytic gradient against a numerical one of sum(forward(*inputs) * dout), float64."""
    for i, (x, analytic) in enumerate(zip(inputs, grads)):
        numeric = eval_numerical_gradient_array(lambda _: forward(*inputs), x, dout)
        assert backend_of(analytic) == backend
        assert rel_error(numeric, analytic) < tol, f"gradient {i}: {rel_error(numeric, analytic):.2e}"


def write_fake_cifar(folder: Path, per_batch=20, seed=0):
    """Six batch files in the official format; returns the images and labels written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in data_utils.CIFAR10_FILES:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        batch_labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": batch_labels, b"batch_label": name.encode()}, f, protocol=2)
        written[name] = (data, batch_labels)
    return written


def shared_cifar():
    """The CIFAR-10 folder of $XPNET_DATA_DIR or of ../shared beside the checkout, or None."""
    candidates = [
        os.environ.get("XPNET_DATA_DIR"),
        Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar-10-batches-py",
    ]
    for candidate in candidates:
        if candidate:
            try:
                return data_utils.find_CIFAR10(candidate)
            except FileNotFoundError:
                pass
    return None


def blobs(n, d=6, c=3, seed=0, noise=0.6):
    """``n`` points around ``c`` random centres in ``d`` dimensions: (X float32 (n, d), y int64 (n,))."""
    rng = np.random.default_rng(seed)
    centres = 2.0 * rng.standard_normal((c, d))
    y = rng.integers(0, c, n)
    return (centres[y] + noise * rng.standard_normal((n, d))).astype(np.float32), y


def small_data(n_train=200, n_val=60):
    X, y = blobs(n_train + n_val)
    return {"X_train": X[:n_train], "y_train": y[:n_train], "X_val": X[n_train:], "y_val": y[n_train:]}


def small_model(backend, **kwargs):
    options = dict(input_dim=6, num_classes=3, weight_scale=0.1, seed=0, backend=backend)
    options.update(kwargs)
    return xpnet.FullyConnectedNet([16, 16], **options)


class MakeFolderWhenUnpickled:
    """A harmless stand-in for a malicious pickle: unpickling it creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def write_pickle_payload(path, marker, protocol=2):
    """A pickle file at ``path`` that would create the folder ``marker`` if it were unpickled."""
    with open(path, "wb") as f:
        pickle.dump({b"data": MakeFolderWhenUnpickled(marker), b"labels": [0]}, f, protocol=protocol)


def small_recipe(backend, n=128, widths=(4, 8, 8), batch_size=32, cuda_graph=False, seed=0):
    """A fast CIFAR-10 recipe problem small enough for a test, float64: 5 epochs of
    n / batch_size steps on n random images. Returns (settings, normalized images on
    ``backend``, labels as NumPy, a function making a FastConvNet whitened on the images)."""
    from xpnet.cnn import FastConvNet
    from xpnet.recipes import Fast94Settings
    from xpnet.recipes.fast94 import normalized_images
    from xpnet.whitening import whitening_filters

    rng = np.random.default_rng(seed)
    pixels, y = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.float64), rng.integers(0, 10, n)
    settings = Fast94Settings().with_overrides(
        dict(widths=widths, batch_size=batch_size, epochs=5, dtype="float64", whiten_images=n, cuda_graph=cuda_graph)
    )
    images = normalized_images(backend, pixels, "float64")

    def make_model():
        model = FastConvNet(widths=settings.widths, dtype="float64", backend=backend, seed=seed)
        model.frozen["whiten_W"][...] = whitening_filters(images, 2, settings.whiten_eps)
        return model

    return settings, images, y, make_model


def recipe_state(model) -> dict:
    """A FastConvNet's parameters, frozen whitening filters and batchnorm running statistics, as NumPy."""
    arrays = {**model.params, **model.frozen}
    for i, bn in enumerate(model.bn_params, 1):
        arrays[f"running_mean{i}"], arrays[f"running_var{i}"] = bn["running_mean"], bn["running_var"]
    return {k: np.array(to_numpy(v)) for k, v in arrays.items()}


def _train_small_recipe(backend, cuda_graph=False, start=None):
    """:func:`small_recipe`'s 20 steps on ``backend``, from ``start`` (parameter and frozen
    arrays by name) where given: (losses, final :func:`recipe_state`) as NumPy."""
    from xpnet.recipes import Fast94Trainer

    settings, images, y, make_model = small_recipe(backend, cuda_graph=cuda_graph)
    model = make_model()
    for name, value in (start or {}).items():
        (model.params if name in model.params else model.frozen)[name][...] = backend.asarray(value)
    losses = Fast94Trainer(model, images, backend.asarray(y), settings, seed=0).train()
    return np.array(backend.to_floats(losses)), recipe_state(model)


@functools.cache
def _small_recipe_on_numpy():
    """NumPy's start (parameters and whitening filters) and its :func:`_train_small_recipe` run."""
    from xpnet.backend.base import DeviceRNG

    numpy_backend = xpnet.get_backend("numpy")
    assert type(numpy_backend.rng(0)) is DeviceRNG  # what "NumPy's draws" means in recipe_with_numpys_draws
    start = {k: v for k, v in recipe_state(small_recipe(numpy_backend)[3]()).items() if not k.startswith("running")}
    return start, _train_small_recipe(numpy_backend)


def recipe_with_numpys_draws(backend, monkeypatch, cuda_graph=False):
    """:func:`small_recipe`'s 20 steps on ``backend`` from NumPy's initial parameters and
    whitening filters (a seed draws other numbers on another library, and an eigenvector's sign
    is the solver's choice) and with NumPy's random draws: ``backend`` draws with the base
    :class:`~xpnet.backend.base.DeviceRNG`, NumPy's generator on the host, as NumPy's backend
    does. Returns ((losses, final state) on ``backend``, the same on NumPy)."""
    from xpnet.backend.base import DeviceRNG

    start, reference = _small_recipe_on_numpy()
    monkeypatch.setattr(backend, "rng_class", DeviceRNG)
    return _train_small_recipe(backend, cuda_graph, start), reference


def assert_trains_alike(run, reference):
    """Two :func:`recipe_with_numpys_draws` runs, (losses, final state), equal to float64's rounding."""
    (losses, state), (expected_losses, expected) = run, reference
    assert len(losses) == len(expected_losses) == 20
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-9)
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(state[name], value, rtol=1e-9, atol=1e-12, err_msg=name)


def assert_the_recipes_draws_are_fair(backend, n=60000):
    """The draws the fast CIFAR-10 recipe's trainer makes on ``backend`` (its augmenter and its
    sampler, on n tiny images), tested for what the recipe assumes of them: translations uniform
    over -2..2 in each direction, flips with probability 1/2, batch orders that are permutations
    with no trend, and no correlation between two epochs' translations or between the flips and
    the order, which come from the generators of two seeds (each within 5 standard deviations)."""
    from xpnet.augment import AlternatingFlipTranslate
    from xpnet.training.sampling import EpochPermutation

    augmenter = AlternatingFlipTranslate(backend.asarray(np.zeros((n, 1, 4, 4), np.float32)), backend.rng((0, 1)))
    shifts = []
    for epoch in range(2):
        augmenter.epoch(epoch)
        shifts.append(to_numpy(augmenter.shifts))
    for axis, row in enumerate(shifts[0]):
        counts = np.array([np.count_nonzero(row == v) for v in range(-2, 3)])
        assert counts.sum() == n, f"shifts outside -2..2: {np.unique(row)}"
        assert np.all(np.abs(counts - n / 5) < 5 * np.sqrt(n * 0.2 * 0.8)), f"axis {axis}: counts {counts}"
    flips = to_numpy(augmenter.flip_mask).astype(np.float64)
    assert abs(flips.sum() - n / 2) < 5 * np.sqrt(n / 4)
    sampler = EpochPermutation(n, 64)
    sampler.start_epoch(backend.rng((0, 2)))
    order = to_numpy(sampler._order)
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    limit = 5 / np.sqrt(n)  # a correlation of n independent pairs has a standard deviation of about 1/sqrt(n)
    pairs = {
        "order and position": (order, np.arange(n)),
        "two epochs' shifts": (shifts[0][0], shifts[1][0]),
        "flips and order": (flips, order),
    }
    for what, (a, b) in pairs.items():
        assert abs(np.corrcoef(a, b)[0, 1]) < limit, what


def float32_gradient_errors(backend, torch_device="cpu", tf32=False, batch=32, widths=(16, 32, 32)):
    """How far each FastConvNet gradient computed in float32 (TF32 products where ``tf32``)
    lies from the float64 one, on ``backend`` and in the PyTorch recipe on ``torch_device``,
    from the same float32 weights and batch (float64 then computes the exact function of the
    same numbers): {name: (xpnet's relative error, PyTorch's)}. Random weights: the recipe's
    Dirac start makes near-ties in the pools, where rounding decides which input wins."""
    import torch

    from xpnet.recipes import Fast94Settings, fast94_torch
    from xpnet.recipes.fast94 import normalized_images, recipe_model
    from xpnet.whitening import whitening_filters

    numpy_backend = xpnet.get_backend("numpy")
    rng = np.random.default_rng(0)
    pixels, y = rng.integers(0, 256, (batch, 32, 32, 3)), rng.integers(0, 10, batch)
    images = np.asarray(normalized_images(numpy_backend, pixels, "float32"), dtype=np.float64)
    settings = {
        dtype: Fast94Settings().with_overrides({"widths": widths, "dtype": dtype}) for dtype in ("float32", "float64")
    }
    initial = recipe_model(numpy_backend, settings["float64"], 0, (3, 32, 32))
    start = {name: value + 0.05 * rng.standard_normal(value.shape) for name, value in initial.params.items()}
    start["whiten_W"] = whitening_filters(images, 2, 5e-4)
    start = {name: value.astype(np.float32).astype(np.float64) for name, value in start.items()}

    def ours(on, dtype):
        model = recipe_model(on, settings[dtype], 0, (3, 32, 32))
        for name, value in start.items():
            (model.params if name in model.params else model.frozen)[name][...] = on.asarray(value, dtype=dtype)
        _, grads = model.loss(on.asarray(images, dtype=dtype), on.asarray(y))
        return {name: np.asarray(to_numpy(g), dtype=np.float64) for name, g in grads.items()}

    def theirs(dtype):
        net = fast94_torch.make_net(settings["float64"], dtype, torch_device)
        names = fast94_torch.xpnet_names(net)
        with torch.no_grad():
            for name, value in start.items():
                names[name].copy_(torch.from_numpy(value.T.copy() if name == "W_out" else value))
        x = torch.from_numpy(images).to(device=torch_device, dtype=dtype)
        logits = net(x)
        label_smoothing = settings["float64"].label_smoothing
        target = torch.from_numpy(y).to(torch_device)
        torch.nn.functional.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction="sum").backward()
        grads = {name: t.grad.detach().cpu().double().numpy() for name, t in names.items() if t.grad is not None}
        return {name: g.T if name == "W_out" else g for name, g in grads.items()}

    expected = ours(numpy_backend, "float64")
    # PyTorch's cuDNN convolutions take TF32 by default: set both switches either way
    switches = (torch.backends.cuda.matmul, torch.backends.cudnn)
    before = [switch.allow_tf32 for switch in switches]
    for switch in switches:
        switch.allow_tf32 = tf32
    if tf32:
        backend.set_tf32(True)
    try:
        got, torch_got = ours(backend, "float32"), theirs(torch.float32)
    finally:
        if tf32:
            backend.set_tf32(False)
        for switch, value in zip(switches, before):
            switch.allow_tf32 = value
    error = lambda g, name: np.linalg.norm(g[name] - expected[name]) / np.linalg.norm(expected[name])  # noqa: E731
    assert got.keys() == torch_got.keys() == expected.keys()
    return {name: (error(got, name), error(torch_got, name)) for name in expected}


def deny_writing(monkeypatch, *paths):
    """Make ``os.access`` say that ``paths`` (files or folders) may not be written, as a user
    other than root finds them: the tests run as root, whom permissions do not stop."""
    denied = {os.path.realpath(p) for p in paths}
    access = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda p, mode, **kw: access(p, mode, **kw) and not (mode & os.W_OK and os.path.realpath(p) in denied),
    )


def sigint_as_at_a_terminal() -> None:
    """For ``subprocess.Popen(preexec_fn=...)``: the child starts with SIGINT's default action,
    so that Python installs its KeyboardInterrupt handler, whatever the suite inherited (a
    shell's background job ignores SIGINT, and its children with it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
