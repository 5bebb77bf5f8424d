"""First-order update rules: ``next_w, config = rule(w, dw, config)``.

Each rule takes the weights ``w``, their gradient ``dw`` (same shape) and a
config dict of hyperparameters and state, which it fills with defaults on first
use. The weights and the state arrays are updated in place (the array API's
in-place operators) and ``w`` is returned as ``next_w``, so steady-state
training allocates no new parameter arrays. Scalar bookkeeping (Adam's step
count and bias corrections) stays in Python floats: no update forces a device
synchronisation. On CuPy arrays each rule is one fused kernel; the array-API
code is the reference it is tested against. On NumPy, arrays larger than the
caches are updated a block of rows at a time by the rules with six or more
passes over them (:mod:`xpnet.cache_blocks`): the same operations on the same
values, Adam about 1.4x faster on millions of them.
"""

from __future__ import annotations

import math

from .array_types import Array, Config
from .backend import accelerated, namespace
from .cache_blocks import update_in_blocks
from .input_checks import as_int, check_writable, dtype_name, is_array, is_number, layer_namespace, short_repr

__all__ = [
    "sgd",
    "sgd_momentum",
    "sgd_nesterov_momentum",
    "nesterov_sgd",
    "rmsprop",
    "adam",
    "UPDATE_RULES",
    "check_config",
    "MAX_STEP_COUNT",
]


def _start(rule: str, w, dw, config):
    """``config`` (a new dict for None), after checking that w and dw are floating-point arrays
    of one library and one shape (a dw that broadcasts against w would update it wrongly
    without a word) and that the config holds no key the rule does not know."""
    if not (is_array(w) and is_array(dw)):
        raise TypeError(f"{rule}: w and dw must be arrays, got {type(w).__name__} and {type(dw).__name__}")
    layer_namespace(rule, {"w": w, "dw": dw})
    if tuple(dw.shape) != tuple(w.shape):
        raise ValueError(f"{rule}: dw has shape {tuple(dw.shape)} but w has shape {tuple(w.shape)}")
    check_writable(rule, "w", w, "the update rules change w in place")
    if config is None:
        return {}
    if not isinstance(config, dict):  # adam(w, dw, 1e-3): the learning rate where its dict goes
        hint = ""
        if is_number(config):
            hint = f"; a learning rate goes in it: {rule}(w, dw, {{'learning_rate': {config!r}}})"
        raise TypeError(f"{rule}: config must be a dict of settings (or None), got {type(config).__name__}{hint}")
    _check_keys(rule, config)
    return config


def _state(rule, config, key, like):
    """The state array ``config[key]``, created as zeros like ``like`` on first use. Naming
    ``rule``: a ValueError for one of another shape (one config shared by two weights, say), a
    TypeError for one of another dtype or for something that is not an array."""
    state = config.get(key)
    if state is None:
        config[key] = state = namespace(like).zeros_like(like)
    elif not is_array(state):
        raise TypeError(f"{rule}: config[{key!r}] must be an array like w, got {type(state).__name__}")
    elif tuple(state.shape) != tuple(like.shape):
        raise ValueError(f"{rule}: config[{key!r}] has shape {tuple(state.shape)} but w has shape {tuple(like.shape)}")
    elif state.dtype != like.dtype:
        # An integer state failed inside the in-place update; a narrower float one rounded it every step.
        raise TypeError(
            f"{rule}: config[{key!r}] has dtype {dtype_name(state.dtype)} but w has dtype {dtype_name(like.dtype)}"
        )
    return state


def sgd(w: Array, dw: Array, config: Config | None = None) -> tuple[Array, Config]:
    """Vanilla SGD: ``w -= learning_rate * dw``. Config: learning_rate (1e-2)."""
    config = _start("sgd", w, dw, config)
    config.setdefault("learning_rate", 1e-2)
    fast = accelerated(w)
    if fast is not None:
        fast.sgd(w, dw, config["learning_rate"])
    else:
        w -= config["learning_rate"] * dw  # two passes: blocks would cost more than they save
    return w, config


def sgd_momentum(w: Array, dw: Array, config: Config | None = None) -> tuple[Array, Config]:
    """SGD with momentum: ``v = momentum * v - learning_rate * dw; w += v``.

    Config: learning_rate (1e-2), momentum (0.9), velocity (state, zeros like w).
    """
    config = _start("sgd_momentum", w, dw, config)
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("momentum", 0.9)
    v = _state("sgd_momentum", config, "velocity", w)
    fast = accelerated(w)
    if fast is not None:
        fast.sgd_momentum(w, dw, v, config["learning_rate"], config["momentum"])
        return w, config
    # Four passes: blocks would cost more than they save (the rules below have six or more).
    v *= config["momentum"]
    v -= config["learning_rate"] * dw
    w += v
    return w, config


def sgd_nesterov_momentum(w: Array, dw: Array, config: Config | None = None) -> tuple[Array, Config]:
    """Nesterov momentum: ``v_new = mu * v - lr * dw; w += v_new + mu * (v_new - v)``.

    Config: learning_rate (1e-2), momentum (0.9), velocity (state).
    """
    config = _start("sgd_nesterov_momentum", w, dw, config)
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("momentum", 0.9)
    lr, mu = config["learning_rate"], config["momentum"]
    v = _state("sgd_nesterov_momentum", config, "velocity", w)
    fast = accelerated(w)
    if fast is not None:
        fast.sgd_nesterov_momentum(w, dw, v, lr, mu)
        return w, config

    def step(w, dw, v):
        # w + v_new + mu (v_new - v) = w + (1 + mu) v_new - mu v, with v_new = mu v - lr dw
        w -= mu * v
        v *= mu
        v -= lr * dw
        w += (1 + mu) * v

    update_in_blocks(step, w, dw, v)
    return w, config


def rmsprop(w: Array, dw: Array, config: Config | None = None) -> tuple[Array, Config]:
    """RMSProp: ``cache = decay * cache + (1 - decay) * dw²; w -= lr * dw / (sqrt(cache) + eps)``.

    Config: learning_rate (1e-2), decay_rate (0.99), epsilon (1e-8), cache (state).
    """
    config = _start("rmsprop", w, dw, config)
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("decay_rate", 0.99)
    config.setdefault("epsilon", 1e-8)
    xp = namespace(w, dw)
    lr, decay, eps = config["learning_rate"], config["decay_rate"], config["epsilon"]
    cache = _state("rmsprop", config, "cache", w)
    fast = accelerated(w)
    if fast is not None:
        fast.rmsprop(w, dw, cache, lr, decay, eps)
        return w, config

    def step(w, dw, cache):
        cache *= decay
        cache += (1 - decay) * (dw * dw)
        w -= lr * dw / (xp.sqrt(cache) + eps)

    update_in_blocks(step, w, dw, cache)
    return w, config


# Adam's step count is an int64 on the device where the fused update keeps it (CuPy), and one
# more step must fit there: 2**70 failed inside CuPy's conversion, 2**63 - 1 would wrap around.
MAX_STEP_COUNT = 2**63 - 2


def adam(w: Array, dw: Array, config: Config | None = None) -> tuple[Array, Config]:
    """Adam with bias correction; ``t`` is incremented before the correction.

    Config: learning_rate (1e-3), beta1 (0.9), beta2 (0.999), epsilon (1e-8),
    m and v (state arrays), t (step count: a Python int; on CuPy a 0-d device
    array, so that a CUDA graph replaying the update counts its steps too).
    """
    config = _start("adam", w, dw, config)
    config.setdefault("learning_rate", 1e-3)
    config.setdefault("beta1", 0.9)
    config.setdefault("beta2", 0.999)
    config.setdefault("epsilon", 1e-8)
    config.setdefault("t", 0)
    t = config["t"]
    if type(t) is not int or not 0 <= t <= MAX_STEP_COUNT:  # a Python int, the common case, first
        # (a 0-d device array where the fused update keeps it: comparing it would synchronise)
        count = as_int(t)
        if count is None and not is_array(t) or count is not None and not 0 <= count <= MAX_STEP_COUNT:
            raise ValueError(
                f"adam: config['t'], the step count, must be an integer from 0 to 2**63 - 2, got {short_repr(t)}"
            )
    xp = namespace(w, dw)
    beta1, beta2 = config["beta1"], config["beta2"]
    m = _state("adam", config, "m", w)
    v = _state("adam", config, "v", w)
    fast = accelerated(w)
    if fast is not None:  # keeps t on the device, so the step can be replayed from a CUDA graph
        fast.adam(w, dw, m, v, config)
        return w, config
    config["t"] = t = int(config["t"]) + 1
    m_correction = 1.0 - beta1**t
    v_correction = 1.0 - beta2**t
    lr, eps = config["learning_rate"], config["epsilon"]

    def step(w, dw, m, v):
        m *= beta1
        m += (1 - beta1) * dw
        v *= beta2
        v += (1 - beta2) * (dw * dw)
        w -= lr * (m / m_correction) / (xp.sqrt(v / v_correction) + eps)

    update_in_blocks(step, w, dw, m, v)
    return w, config


def nesterov_sgd(w: Array, dw: Array, config: Config | None = None) -> tuple[Array, Config]:
    """SGD with Nesterov momentum and weight decay as PyTorch applies them
    (``torch.optim.SGD(nesterov=True, weight_decay=wd)``): the decay joins the gradient
    before the momentum, so it follows the learning-rate schedule.

    ``g = dw + weight_decay * w; v = momentum * v + g; w -= learning_rate * (g + momentum * v)``

    Config: learning_rate (1e-2), momentum (0.9), weight_decay (0.0), velocity (state).
    """
    config = _start("nesterov_sgd", w, dw, config)
    config.setdefault("learning_rate", 1e-2)
    config.setdefault("momentum", 0.9)
    config.setdefault("weight_decay", 0.0)
    v = _state("nesterov_sgd", config, "velocity", w)
    lr, mu, wd = config["learning_rate"], config["momentum"], config["weight_decay"]
    fast = accelerated(w)
    if fast is not None:
        fast.nesterov_sgd(w, dw, v, lr, mu, wd)
        return w, config

    def step(w, dw, v):
        g = dw + wd * w if wd else dw
        v *= mu
        v += g
        w -= lr * (g + mu * v)

    update_in_blocks(step, w, dw, v)
    return w, config


UPDATE_RULES = {
    "sgd": sgd,
    "sgd_momentum": sgd_momentum,
    "sgd_nesterov_momentum": sgd_nesterov_momentum,
    "rmsprop": rmsprop,
    "adam": adam,
    "nesterov_sgd": nesterov_sgd,
}

# The keys each rule reads from its config: hyper-parameters, then its state.
CONFIG_KEYS = {
    "sgd": (("learning_rate",), ()),
    "sgd_momentum": (("learning_rate", "momentum"), ("velocity",)),
    "sgd_nesterov_momentum": (("learning_rate", "momentum"), ("velocity",)),
    "rmsprop": (("learning_rate", "decay_rate", "epsilon"), ("cache",)),
    "adam": (("learning_rate", "beta1", "beta2", "epsilon"), ("m", "v", "t")),
    "nesterov_sgd": (("learning_rate", "momentum", "weight_decay"), ("velocity",)),
}
# The state that averages squared gradients, which no update makes negative: the next step
# takes its square root.
SQUARED_STATE = {"rmsprop": ("cache",), "adam": ("v",)}


# [low, high) of each hyper-parameter beside the learning rate: a momentum or a beta of 1 or
# more never forgets (Adam's bias correction divides by 0 at beta1 = 1), and a negative
# epsilon or weight decay turns the update around.
_RANGES = {
    "momentum": (0, 1),
    "beta1": (0, 1),
    "beta2": (0, 1),
    "decay_rate": (0, 1),
    "epsilon": (0, None),
    "weight_decay": (0, None),
}


_KNOWN_KEYS = {rule: frozenset(hyper + state) for rule, (hyper, state) in CONFIG_KEYS.items()}


def _check_keys(rule_name: str, config: dict) -> None:
    """ValueError naming the keys of ``config`` that the rule neither reads nor keeps as state:
    a misspelt one would otherwise be ignored and its default used."""
    if config.keys() <= _KNOWN_KEYS[rule_name]:  # every update calls this: the cheap test first
        return
    hyper, state = CONFIG_KEYS[rule_name]
    unknown = sorted(set(config) - set(hyper) - set(state))
    if unknown:
        raise ValueError(
            f"unknown optim_config key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"for update rule {rule_name!r}; it takes {', '.join(hyper)}"
        )


def check_config(rule_name: str, config: dict) -> None:
    """ValueError naming the problem when ``config`` has a key ``rule_name`` does not
    read, a learning rate that is not a finite number > 0, or another hyper-parameter
    outside its range (:data:`_RANGES`)."""
    if rule_name in CONFIG_KEYS:
        _check_keys(rule_name, config)
    lr = config.get("learning_rate")
    if lr is not None:
        if not is_number(lr) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"learning_rate must be a finite number > 0, got {lr!r}")
    for key, (low, high) in _RANGES.items():
        value = config.get(key)
        if value is None:
            continue
        if not is_number(value) or not math.isfinite(value) or value < low or (high is not None and value >= high):
            where = f"in [{low}, {high})" if high is not None else f">= {low}"
            raise ValueError(f"{key} must be a finite number {where}, got {value!r}")
