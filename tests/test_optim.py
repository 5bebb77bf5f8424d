"""Update rules against independent out-of-place NumPy computations."""

import numpy as np
import pytest
from helpers import to_np

from xpnet import optim


def reference_steps(rule, w, grads, config):
    """The textbook formulas, written out of place in NumPy."""
    w = w.copy()
    lr = config.get("learning_rate", 1e-3 if rule == "adam" else 1e-2)
    mu = config.get("momentum", 0.9)
    v = np.zeros_like(w)
    m = np.zeros_like(w)
    cache = np.zeros_like(w)
    for t, dw in enumerate(grads, start=1):
        if rule == "sgd":
            w = w - lr * dw
        elif rule == "sgd_momentum":
            v = mu * v - lr * dw
            w = w + v
        elif rule == "sgd_nesterov_momentum":
            v_old = v
            v = mu * v - lr * dw
            w = w + v + mu * (v - v_old)
        elif rule == "rmsprop":
            decay, eps = config.get("decay_rate", 0.99), config.get("epsilon", 1e-8)
            cache = decay * cache + (1 - decay) * dw**2
            w = w - lr * dw / (np.sqrt(cache) + eps)
        elif rule == "nesterov_sgd":  # PyTorch's SGD(nesterov=True, weight_decay=wd)
            g = dw + config.get("weight_decay", 0.0) * w
            v = mu * v + g
            w = w - lr * (g + mu * v)
        elif rule == "adam":
            b1, b2, eps = config.get("beta1", 0.9), config.get("beta2", 0.999), config.get("epsilon", 1e-8)
            m = b1 * m + (1 - b1) * dw
            cache = b2 * cache + (1 - b2) * dw**2
            w = w - lr * (m / (1 - b1**t)) / (np.sqrt(cache / (1 - b2**t)) + eps)
    return w


RULES = ["sgd", "sgd_momentum", "sgd_nesterov_momentum", "nesterov_sgd", "rmsprop", "adam"]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("config", [{}, {"learning_rate": 0.05, "momentum": 0.5, "decay_rate": 0.9, "beta1": 0.8}])
def test_update_rules_match_reference(backend, np_rng, rule, config):
    config = {k: v for k, v in config.items() if k in optim.CONFIG_KEYS[rule][0]}
    if rule == "nesterov_sgd" and config:
        config["weight_decay"] = 0.3
    w0 = np.linspace(-0.4, 0.6, 20).reshape(4, 5)
    grads = [np_rng.standard_normal((4, 5)) for _ in range(4)]
    w = backend.asarray(w0, dtype="float64", copy=True)  # the rules update w in place
    cfg = dict(config)
    for dw in grads:
        w, cfg = getattr(optim, rule)(w, backend.asarray(dw, dtype="float64"), cfg)
    np.testing.assert_allclose(to_np(w), reference_steps(rule, w0, grads, config), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "rule, defaults",
    [
        ("sgd", {"learning_rate": 1e-2}),
        ("sgd_momentum", {"learning_rate": 1e-2, "momentum": 0.9}),
        ("sgd_nesterov_momentum", {"learning_rate": 1e-2, "momentum": 0.9}),
        ("rmsprop", {"learning_rate": 1e-2, "decay_rate": 0.99, "epsilon": 1e-8}),
        ("adam", {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}),
        ("nesterov_sgd", {"learning_rate": 1e-2, "momentum": 0.9, "weight_decay": 0.0}),
    ],
)
def test_defaults_and_state_keys(backend, rule, defaults):
    w = backend.asarray(np.ones((2, 3)), dtype="float64")
    _, config = getattr(optim, rule)(w, backend.asarray(np.ones((2, 3)), dtype="float64"))
    for key, value in defaults.items():
        assert config[key] == value
    state = {
        "sgd": [],
        "sgd_momentum": ["velocity"],
        "sgd_nesterov_momentum": ["velocity"],
        "nesterov_sgd": ["velocity"],
        "rmsprop": ["cache"],
        "adam": ["m", "v"],
    }[rule]
    for key in state:
        assert tuple(config[key].shape) == (2, 3)
    if rule == "adam":
        assert int(config["t"]) == 1  # a Python int; a 0-d device array on CuPy


def test_adam_step_count_is_incremented_before_bias_correction(backend):
    # With t incremented first, the first Adam step moves every weight by ~lr * sign(dw).
    w = backend.asarray(np.zeros(4), dtype="float64")
    dw = backend.asarray(np.array([3.0, -0.5, 1e-3, -20.0]), dtype="float64")
    w, _ = optim.adam(w, dw, {"learning_rate": 0.1})
    np.testing.assert_allclose(to_np(w), [-0.1, 0.1, -0.1, 0.1], rtol=1e-4)


def test_updates_are_in_place(backend):
    w = backend.asarray(np.ones(3), dtype="float64")
    next_w, _ = optim.sgd_momentum(w, backend.asarray(np.ones(3), dtype="float64"))
    assert next_w is w
