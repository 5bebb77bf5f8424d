"""The course's nets against the same nets written with PyTorch's own layers, in float64:
loss, every gradient (autograd) and the batchnorm running averages, from the same
parameters and batch. An independent reference for whole networks, beside the numerical
gradient checks; runs where PyTorch (its CPU build) is installed."""

import numpy as np
import pytest
from helpers import to_np

import xpnet
from xpnet.cnn import ThreeLayerConvNet

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_params(model):
    """The model's parameters as float64 leaf tensors that collect gradients."""
    return {
        name: torch.tensor(to_np(value), dtype=torch.float64, requires_grad=True)
        for name, value in model.params.items()
    }


def torch_batchnorm(x, p, i, running):
    """PyTorch's batchnorm in training mode with layer i's gamma and beta; ``running`` holds its
    running averages (momentum 0.1 in PyTorch's convention is the course's 0.9)."""
    mean, var = running
    return F.batch_norm(x, mean, var, p[f"gamma{i}"], p[f"beta{i}"], training=True, momentum=0.1, eps=1e-5)


def l2(p, names, reg):
    return 0.5 * reg * sum((p[name] ** 2).sum() for name in names)


def compare(model, X, y, torch_loss, running=()):
    """xpnet's loss and gradients against ``torch_loss(p)``'s and its autograd's."""
    loss, grads = model.loss(X, y)
    p = torch_params(model)
    expected = torch_loss(p)
    expected.backward()
    assert float(loss) == pytest.approx(expected.item(), rel=1e-13)
    assert set(grads) == set(p)
    for name, tensor in p.items():
        # atol: the biases before a batchnorm have no gradient in exact arithmetic, only rounding (~1e-17)
        np.testing.assert_allclose(to_np(grads[name]), tensor.grad.numpy(), rtol=1e-10, atol=1e-14, err_msg=name)
    for bn_param, (mean, var) in zip(model.bn_params, running, strict=True):
        np.testing.assert_allclose(to_np(bn_param["running_mean"]), mean.numpy(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(to_np(bn_param["running_var"]), var.numpy(), rtol=1e-12, atol=1e-15)


def fresh_running(sizes):
    """Running averages as a new course layer starts them: mean and variance 0 (PyTorch's own
    layers start the variance at 1)."""
    return [(torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)) for n in sizes]


@pytest.mark.parametrize("normalization", [None, "batchnorm", "layernorm"])
def test_fully_connected_net_equals_pytorch(backend, normalization):
    rng = np.random.default_rng(0)
    model = xpnet.FullyConnectedNet([7, 6], input_dim=12, num_classes=5, normalization=normalization, reg=0.3,
                                    weight_scale=0.5, dtype="float64", seed=0, backend=backend)  # fmt: skip
    for i, size in ((1, 7), (2, 6)):  # scales and shifts of their own, so that a mix-up would show
        if normalization:
            model.params[f"gamma{i}"] = backend.asarray(rng.uniform(0.5, 1.5, size), dtype="float64")
            model.params[f"beta{i}"] = backend.asarray(rng.uniform(-0.5, 0.5, size), dtype="float64")
    for bn_param in model.bn_params:
        bn_param["unbiased_running_var"] = True  # as PyTorch averages it
    X, y = rng.standard_normal((8, 3, 2, 2)), rng.integers(0, 5, 8)
    running = fresh_running((7, 6)) if normalization == "batchnorm" else []

    def theirs(p):
        out = torch.from_numpy(X).reshape(8, -1)
        for i in (1, 2):
            out = out @ p[f"W{i}"] + p[f"b{i}"]
            if normalization == "batchnorm":
                out = torch_batchnorm(out, p, i, running[i - 1])
            elif normalization == "layernorm":
                out = F.layer_norm(out, (out.shape[1],), p[f"gamma{i}"], p[f"beta{i}"], eps=1e-5)
            out = F.relu(out)
        scores = out @ p["W3"] + p["b3"]
        return F.cross_entropy(scores, torch.from_numpy(y)) + l2(p, ("W1", "W2", "W3"), 0.3)

    compare(model, backend.asarray(X, dtype="float64"), backend.asarray(y), theirs, running)


@pytest.mark.parametrize("use_batchnorm", [False, True])
def test_three_layer_convnet_equals_pytorch(backend, use_batchnorm):
    rng = np.random.default_rng(1)
    model = ThreeLayerConvNet(input_dim=(3, 8, 8), num_filters=4, filter_size=5, hidden_dim=6, num_classes=5,
                              weight_scale=0.2, reg=0.1, dtype="float64", use_batchnorm=use_batchnorm, seed=0,
                              backend=backend)  # fmt: skip
    if use_batchnorm:
        for i, size in ((1, 4), (2, 6)):
            model.params[f"gamma{i}"] = backend.asarray(rng.uniform(0.5, 1.5, size), dtype="float64")
            model.params[f"beta{i}"] = backend.asarray(rng.uniform(-0.5, 0.5, size), dtype="float64")
        for bn_param in model.bn_params:
            bn_param["unbiased_running_var"] = True
    model.params["b1"] = backend.asarray(rng.uniform(-0.5, 0.5, 4), dtype="float64")  # a bias of its own
    X, y = rng.standard_normal((6, 3, 8, 8)), rng.integers(0, 5, 6)
    running = fresh_running((4, 6)) if use_batchnorm else []

    def theirs(p):
        out = F.conv2d(torch.from_numpy(X), p["W1"], p["b1"], padding=2)
        if use_batchnorm:
            out = torch_batchnorm(out, p, 1, running[0])
        out = F.max_pool2d(F.relu(out), 2).reshape(6, -1) @ p["W2"] + p["b2"]
        if use_batchnorm:
            out = torch_batchnorm(out, p, 2, running[1])
        scores = F.relu(out) @ p["W3"] + p["b3"]
        return F.cross_entropy(scores, torch.from_numpy(y)) + l2(p, ("W1", "W2", "W3"), 0.1)

    compare(model, backend.asarray(X, dtype="float64"), backend.asarray(y), theirs, running)
