"""Layer functions: each ``*_forward`` returns ``(out, cache)`` and each
``*_backward`` takes ``(dout, cache)`` and returns the gradients.

Written against the Python array API standard only (``xp = namespace(x)``),
so the same code runs on NumPy, CuPy, PyTorch and array-api-strict.
Losses return the loss as a 0-d array on the arrays' device: nothing here
forces a device-to-host synchronisation.

On CuPy arrays the hot chains (softmax loss, ReLU backward) and the matrix
products run as fused kernels from the backend (``accelerated(x)``); the
array-API code below is the reference they are tested against.
"""

from __future__ import annotations

import math

from array_api_compat import device

from .array_types import Array, Cache
from .backend import accelerated, backend_of, check_generator, namespace
from .input_checks import (
    array_cache,
    check_dout,
    check_flag,
    check_param_keys,
    check_same_shape,
    check_seed,
    is_array,
    is_number,
    layer_namespace,
    makes_cache,
    unpack_cache,
)
from .precision import is_half, narrowed, widened
from .special import normal_cdf, normal_pdf

__all__ = [
    "affine_forward",
    "affine_backward",
    "relu_forward",
    "relu_backward",
    "gelu_forward",
    "gelu_backward",
    "softmax_loss",
    "svm_loss",
    "batchnorm_forward",
    "batchnorm_backward",
    "batchnorm_backward_alt",
    "layernorm_forward",
    "layernorm_backward",
    "dropout_forward",
    "dropout_backward",
    "conv_forward_naive",
    "conv_backward_naive",
    "max_pool_forward_naive",
    "max_pool_backward_naive",
    "spatial_batchnorm_forward",
    "spatial_batchnorm_backward",
    "spatial_batchnorm_gelu_forward",
    "spatial_batchnorm_gelu_backward",
    "spatial_groupnorm_forward",
    "spatial_groupnorm_backward",
]


# --------------------------------------------------------------------------
# Affine and ReLU
# --------------------------------------------------------------------------
@makes_cache("affine_forward")
def affine_forward(x: Array, w: Array, b: Array) -> tuple[Array, Cache]:
    """Fully connected layer: ``out = x.reshape(N, D) @ w + b``.

    Args:
        x: (N, d_1, ..., d_k) input, flattened to (N, D) with D = d_1 * ... * d_k.
        w: (D, M) weights.
        b: (M,) biases.
    Returns:
        out (N, M) and cache ``(x, w, b)``.
    """
    x2 = affine_input(x, w, b)
    out = matmul(x2, w) + b
    return out, (x, w, b)


def affine_input(x: Array, w: Array, b: Array) -> Array:
    """``x`` flattened to (N, D) after checking that x, w (D, M) and b (M,) fit together."""
    xp = layer_namespace("affine_forward", {"x": x, "w": w, "b": b})
    if w.ndim != 2 or b.ndim != 1 or b.shape[0] != w.shape[1]:
        raise ValueError(f"affine_forward: w must be (D, M) and b (M,), got w {tuple(w.shape)} and b {tuple(b.shape)}")
    if x.ndim < 1:
        raise ValueError("affine_forward: x must have a leading batch dimension")
    if x.shape[0] == 0:
        raise ValueError(f"affine_forward: empty batch, x has shape {tuple(x.shape)}")
    x2 = xp.reshape(x, (x.shape[0], -1))
    if x2.shape[1] != w.shape[0]:
        raise ValueError(
            f"affine_forward: x {tuple(x.shape)} flattens to {x2.shape[1]} features "
            f"but w {tuple(w.shape)} expects {w.shape[0]}"
            + ("; for one example, give a batch of one: x[None]" if math.prod(x.shape) == w.shape[0] else "")
        )
    return x2


def matmul(a: Array, b: Array) -> Array:
    """``a @ b`` for 2-D arrays; on CuPy through xpnet's cuBLAS handle, which a CUDA graph can
    capture. float16 operands are summed in float32 and the product rounded to float16."""
    fast = accelerated(a)
    if fast is not None:
        return fast.matmul(a, b)
    xp = namespace(a)
    if is_half(xp, a):
        return narrowed(xp, widened(xp, a) @ widened(xp, b), a.dtype)
    return a @ b


def affine_backward(dout: Array, cache: Cache, input_grad: bool = True) -> tuple[Array | None, Array, Array]:
    """Backward pass of :func:`affine_forward`.

    Args:
        dout: (N, M) upstream gradient.
        cache: ``(x, w, b)`` from the forward pass.
        input_grad: compute dx; a network's first layer passes False, since
            nothing needs the gradient of the data (it saves a third of that
            layer's backward work).
    Returns:
        dx with the shape of x (None when input_grad is False), dw (D, M), db (M,).
    """
    x, w, _ = unpack_cache("affine_backward", cache, 3, "affine_forward")
    input_grad = check_flag("affine_backward: input_grad", input_grad)  # "False" is truthy: dx was computed
    expected, detail = (x.shape[0], w.shape[1]), f" for x {tuple(x.shape)} and w {tuple(w.shape)}"
    xp = check_dout("affine_backward", dout, expected, detail, like={"x": x})
    x2 = xp.reshape(x, (x.shape[0], -1))
    dx = xp.reshape(matmul(dout, w.T), x.shape) if input_grad else None
    dw = matmul(x2.T, dout)
    fast = accelerated(dout)
    db = fast.column_sums(dout) if fast is not None else xp.sum(dout, axis=0)
    return dx, dw, db


def relu_forward(x: Array) -> tuple[Array, Cache]:
    """Rectified linear unit, elementwise ``max(x, 0)``; cache is ``x``."""
    xp = layer_namespace("relu_forward", {"x": x})
    return xp.maximum(x, 0), x


def relu_backward(dout: Array, cache: Cache) -> Array:
    """Backward pass of :func:`relu_forward`: ``dout`` where the input was positive."""
    x = array_cache("relu_backward", cache, "relu_forward")
    xp = layer_namespace("relu_backward", {"dout": dout, "x": x})
    check_same_shape("relu_backward", "dout", dout, "x", x)
    fast = accelerated(dout)
    if fast is not None:
        return fast.relu_backward(dout, x)
    return dout * xp.astype(x > 0, dout.dtype)


@makes_cache("gelu_forward")
def gelu_forward(x: Array) -> tuple[Array, Cache]:
    """GELU in its exact form, x·Φ(x) with Φ the standard normal's cdf (PyTorch's default,
    ``approximate='none'``). The array API has no erf: :mod:`xpnet.special` supplies one."""
    xp = layer_namespace("gelu_forward", {"x": x})
    fast = accelerated(x)
    if fast is not None:
        out, cdf = fast.gelu_forward(x)
        return out, (x, cdf)
    wide = widened(xp, x)  # float16: evaluated in float32, out and Φ(x) stored in float16
    cdf = normal_cdf(wide)
    return narrowed(xp, wide * cdf, x.dtype), (x, narrowed(xp, cdf, x.dtype))


def gelu_backward(dout: Array, cache: Cache) -> Array:
    """Backward pass of :func:`gelu_forward`: dout·(Φ(x) + x·φ(x))."""
    x, cdf = unpack_cache("gelu_backward", cache, 2, "gelu_forward")
    xp = layer_namespace("gelu_backward", {"dout": dout, "x": x})
    check_same_shape("gelu_backward", "dout", dout, "x", x)
    fast = accelerated(dout)
    if fast is not None:
        return fast.gelu_backward(dout, x, cdf)
    x_wide = widened(xp, x)
    dx = widened(xp, dout) * (widened(xp, cdf) + x_wide * normal_pdf(x_wide))
    return narrowed(xp, dx, dout.dtype)


# --------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------
def _check_scores_and_labels(name, x, y):
    """Shape and dtype checks that need no device synchronisation."""
    if is_array(x) and is_array(y) and x.ndim == 1 and y.ndim == 2:  # else named as integer scores
        raise TypeError(
            f"{name}: the scores come first and the labels second, {name}(x, y); got x {tuple(x.shape)} "
            f"and y {tuple(y.shape)}, which look swapped"
        )
    xp = layer_namespace(name, {"x": x}, {"y": y})  # first: it names arrays of the wrong library
    if not _is_integer_array(y):
        raise TypeError(f"{name}: labels must be integers, got dtype {y.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name}: scores must be (N, C), got shape {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{name}: labels must be ({x.shape[0]},) to match scores {tuple(x.shape)}, got shape {tuple(y.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name}: empty batch, scores have shape {tuple(x.shape)}")
    if x.shape[1] == 0:  # no label can lie in [0, 0); the softmax's maximum has nothing to reduce
        raise ValueError(f"{name}: the scores have no classes, shape {tuple(x.shape)}")
    return xp


def _is_integer_array(y) -> bool:
    return namespace(y).isdtype(y.dtype, "integral")


def _nan_for_bad_labels(xp, loss, dx, y, c):
    """NaN loss (and NaN gradient rows) when a label lies outside [0, C), computed on the
    device: a wrong label must never produce a plausible number, nor cost a synchronisation."""
    valid = (y >= 0) & (y < c)
    nan = xp.asarray(float("nan"), dtype=dx.dtype, device=device(dx))
    loss = xp.where(xp.all(valid), loss, nan)
    return loss, xp.where(valid[:, None], dx, nan)


def _one_hot(xp, y, num_classes, dtype):
    """(N, C) array with 1 at ``[i, y[i]]``: the array API has no fancy-index assignment."""
    classes = xp.arange(num_classes, device=device(y), dtype=y.dtype)
    return xp.astype(y[:, None] == classes, dtype)


def check_label_smoothing(function: str, value) -> float:
    """``value`` as a float, or ValueError naming ``function`` unless it is a number in [0, 1)."""
    if not is_number(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{function}: label_smoothing must be in [0, 1), got {value!r}")
    return float(value)


def check_reduction(function: str, value, name: str = "reduction") -> str:
    """``value``, or ValueError naming ``function`` and ``name`` unless it is 'mean' or 'sum'."""
    if value not in ("mean", "sum"):
        raise ValueError(f"{function}: {name} must be 'mean' or 'sum', got {value!r}")
    return value


def softmax_loss(x: Array, y: Array, label_smoothing: float = 0.0, reduction: str = "mean") -> tuple[Array, Array]:
    """Softmax cross-entropy (numerically stable).

    Args:
        x: (N, C) class scores.
        y: (N,) integer labels in [0, C). A label outside that range makes the
            loss (and its row of dx) NaN, computed on the device: checking the
            range on the host would cost a synchronisation. The Solver checks
            the data set's labels once, up front.
        label_smoothing: ε in [0, 1): the target is (1 - ε)·one_hot + ε / C, as in
            PyTorch's ``CrossEntropyLoss(label_smoothing=ε)``.
        reduction: "mean" over the batch (the course's) or "sum".
    Returns:
        loss as a 0-d array, and dx (N, C).
    """
    xp = _check_scores_and_labels("softmax_loss", x, y)
    check_label_smoothing("softmax_loss", label_smoothing)
    check_reduction("softmax_loss", reduction)
    fast = accelerated(x)
    if fast is not None and not is_half(xp, x):
        return fast.softmax_loss(x, y, label_smoothing, reduction)
    n, c = x.shape
    shifted = x - xp.max(x, axis=1, keepdims=True)
    exp_shifted = xp.exp(shifted)
    sum_exp = xp.sum(exp_shifted, axis=1, keepdims=True)
    log_probs = shifted - xp.log(sum_exp)
    target = _one_hot(xp, y, c, x.dtype)
    if label_smoothing:
        target = (1.0 - label_smoothing) * target + label_smoothing / c
    scale = 1.0 / n if reduction == "mean" else 1.0
    # Only classes with a target count: a score of -inf (a masked class) has log_prob -inf,
    # and -inf · 0 would make the loss NaN where it is finite (the fused kernel skips them too).
    loss = -xp.sum(xp.where(target != 0, log_probs, 0.0) * target) * scale
    dx = (exp_shifted / sum_exp - target) * scale
    return _nan_for_bad_labels(xp, loss, dx, y, c)


def svm_loss(x: Array, y: Array) -> tuple[Array, Array]:
    """Multiclass SVM (hinge) loss with margin 1, averaged over the batch.

    Args:
        x: (N, C) class scores; y: (N,) integer labels in [0, C) (outside it: NaN, as in
            :func:`softmax_loss`).
    Returns:
        loss as a 0-d array, and dx (N, C).
    """
    xp = _check_scores_and_labels("svm_loss", x, y)
    n, c = x.shape
    one_hot = _one_hot(xp, y, c, x.dtype)
    is_label = one_hot != 0
    # Selected, not multiplied by the one-hot rows: an infinite score times 0 would be NaN.
    correct = xp.sum(xp.where(is_label, x, 0.0), axis=1, keepdims=True)
    margins = xp.where(is_label, 0.0, xp.maximum(x - correct + 1.0, 0))
    loss = xp.sum(margins) / n
    positive = xp.astype(margins > 0, x.dtype)
    dx = (positive - one_hot * xp.sum(positive, axis=1, keepdims=True)) / n
    return _nan_for_bad_labels(xp, loss, dx, y, c)


# --------------------------------------------------------------------------
# Normalisation: batchnorm normalises each feature (axis 1) over every other
# axis (the batch, and for images the pixels too), layernorm each sample over
# its features (axis 1); the algebra is shared.
# --------------------------------------------------------------------------
def _scaled(gamma, x_hat, beta):
    """gamma·x̂ + beta, with gamma None meaning a fixed scale of 1 (no scale parameter)."""
    return (x_hat if gamma is None else gamma * x_hat) + beta


def mean_and_centered(xp, x, axis):
    """The mean of ``x`` along ``axis`` (kept as axes of 1) and ``x`` minus it, the mean
    corrected by the mean of the first deviations. A float32 sum of many values far from 0
    keeps few digits of their spread (NumPy adds along axis 0 a row at a time), and a single
    pass left batchnorm of values near 1000 off by 5e-4; the second sums values near 0, and
    the result is within about 1e-6, as float64 arithmetic rounded to float32 is."""
    rough = xp.mean(x, axis=axis, keepdims=True)
    deviations = x - rough
    correction = xp.mean(deviations, axis=axis, keepdims=True)
    return rough + correction, deviations - correction


def _normalize_forward(x, gamma, beta, eps, axis):
    xp = namespace(x, beta)
    mean, centered = mean_and_centered(xp, x, axis)
    var = xp.mean(centered * centered, axis=axis, keepdims=True)
    std = xp.sqrt(var + eps)
    x_hat = centered / std
    return _scaled(gamma, x_hat, beta), (x_hat, centered, std, gamma, axis), mean, var


def normalized_input_grad(xp, dx_hat, x_hat, std, axis):
    """The gradient through x̂ = (x - mean) / std along ``axis``, in closed form:
    dx = (dx̂ - mean(dx̂) - x̂·mean(dx̂·x̂)) / std (batchnorm, layernorm and groupnorm share it)."""
    mean_dx_hat = xp.mean(dx_hat, axis=axis, keepdims=True)
    return (dx_hat - mean_dx_hat - x_hat * xp.mean(dx_hat * x_hat, axis=axis, keepdims=True)) / std


def normalization_backward(name, dout, cache, forward):
    """dx, dgamma (None without gamma) and dbeta of a normalisation whose train-mode cache
    ``forward`` made, in closed form; gamma and beta belong to axis 1 of dout, so their
    gradients sum over every other axis. ``name`` is the backward pass errors are named by.
    A float16 dout is summed in the cache's float32 (spatial batchnorm keeps x̂ so) and dx
    comes back in float16; dgamma and dbeta stay float32."""
    x_hat, _, std, gamma, axis = train_mode_cache(name, cache, 5, forward)
    xp = layer_namespace(name, {"dout": dout}, {"x": x_hat})
    check_same_shape(name, "dout", dout, "x", x_hat)  # a (1, D) dout would broadcast into wrong sums
    wide = widened(xp, dout)
    dx = normalized_input_grad(xp, wide if gamma is None else wide * gamma, x_hat, std, axis)
    per_feature = _all_but_features(wide)
    dgamma = None if gamma is None else xp.sum(wide * x_hat, axis=per_feature)
    dbeta = xp.sum(wide, axis=per_feature)
    return narrowed(xp, dx, dout.dtype), dgamma, dbeta


def _all_but_features(x) -> tuple:
    """Every axis of ``x`` but axis 1, which holds the features (N, D) or channels (N, C, H, W)."""
    return (0, *range(2, x.ndim))


def _check_norm_input(name, x, gamma, beta):
    layer_namespace(name, {"x": x, "beta": beta, **({} if gamma is None else {"gamma": gamma})})
    if x.ndim != 2:
        spatial = {
            "batchnorm_forward": "spatial_batchnorm_forward",
            "layernorm_forward": "spatial_groupnorm_forward (G=1 normalises each image over all its channels)",
        }
        hint = f"; for (N, C, H, W) images use {spatial[name]}" if x.ndim == 4 else ""
        raise ValueError(f"{name}: x must be (N, D), got shape {tuple(x.shape)}{hint}")
    d = x.shape[1]
    if d == 0:  # a mean over no features is 0 / 0
        raise ValueError(f"{name}: x {tuple(x.shape)} has no features to normalise")
    gamma_shape = (d,) if gamma is None else tuple(gamma.shape)
    if gamma_shape != (d,) or tuple(beta.shape) != (d,):
        raise ValueError(f"{name}: gamma and beta must be ({d},), got {gamma_shape} and {tuple(beta.shape)}")


@makes_cache("batchnorm_forward")
def batchnorm_forward(x: Array, gamma: Array | None, beta: Array, bn_param: dict) -> tuple[Array, Cache]:
    """Batch normalisation.

    In 'train' mode each feature is normalised with the batch mean and the
    biased batch variance, and the running averages are updated in ``bn_param``:
    ``running = momentum * running + (1 - momentum) * batch``. In 'test' mode
    the running averages are used.

    Args:
        x: (N, D); gamma, beta: (D,). gamma None: no scale parameter (a fixed 1), and
            the backward pass returns dgamma None.
        bn_param: dict with 'mode' ('train' or 'test'), optional 'eps' (1e-5),
            'momentum' (0.9), 'running_mean' and 'running_var' (D,) (created as
            zeros on first use), and 'unbiased_running_var' (False): when True the
            running variance averages the unbiased batch variance, N/(N-1) times the
            biased one, as PyTorch's BatchNorm does.
    Returns:
        out (N, D) and the cache for the backward pass.
    """
    _check_norm_input("batchnorm_forward", x, gamma, beta)
    mode, eps = (
        batchnorm_mode("batchnorm_forward", bn_param),
        normalization_eps("batchnorm_forward", "bn_param", bn_param),
    )
    ensure_running_statistics("batchnorm_forward", bn_param, x, x.shape[1])
    if mode == "train" and x.shape[0] < 2:
        raise ValueError(
            f"batchnorm_forward: train mode needs at least 2 rows to normalise over, got x {tuple(x.shape)}"
        )
    return batch_normalized(x, gamma, beta, bn_param, mode, eps)


def batch_normalized(x: Array, gamma: Array | None, beta: Array, bn_param: dict, mode: str, eps: float):
    """Batchnorm of checked inputs: each feature or channel of axis 1 of ``x`` (N, D) or
    (N, C, H, W) normalised over every other axis, as the array lies (images are not
    transposed to rows); gamma, beta and the running averages (C,). Returns out and the cache (None in
    test mode), and in train mode updates the running averages."""
    xp = namespace(x, beta)
    per_channel = (1, x.shape[1], *(1,) * (x.ndim - 2))
    if x.ndim > 2:
        gamma = None if gamma is None else xp.reshape(gamma, per_channel)
        beta = xp.reshape(beta, per_channel)
    if mode == "train":
        out, cache, mean, var = _normalize_forward(x, gamma, beta, eps, _all_but_features(x))
        count = math.prod(x.shape) // x.shape[1]
        update_running_statistics(bn_param, xp.reshape(mean, (-1,)), xp.reshape(var, (-1,)), count)
        return out, cache
    mean, var = (xp.reshape(bn_param[key], per_channel) for key in ("running_mean", "running_var"))
    return _scaled(gamma, (x - mean) / xp.sqrt(var + eps), beta), None


# Every key a normalisation layer reads from its parameter dict (layernorm: "eps" and "mode").
BATCHNORM_KEYS = ("mode", "eps", "momentum", "running_mean", "running_var", "unbiased_running_var")


def batchnorm_mode(function: str, bn_param: dict) -> str:
    """``bn_param['mode']`` ('train' by default), or ValueError for anything but 'train' and
    'test', for a key of ``bn_param`` that batchnorm does not read, or for a 'momentum'
    outside [0, 1] (the running averages would grow without bound)."""
    check_param_keys(function, "bn_param", bn_param, BATCHNORM_KEYS)
    mode = bn_param.get("mode", "train")
    if mode not in ("train", "test"):
        raise ValueError(f"{function}: invalid batchnorm mode {mode!r}: use 'train' or 'test'")
    check_momentum(function, bn_param.get("momentum", 0.9), "bn_param['momentum']")
    return mode


def check_momentum(function: str, value, name: str):
    """``value``, or ValueError naming ``function`` and ``name`` unless it is a number in [0, 1]:
    outside it the running averages would grow without bound."""
    if not is_number(value) or not 0 <= value <= 1:
        raise ValueError(f"{function}: {name} must be a number in [0, 1], got {value!r}")
    return value


def normalization_eps(function: str, param_name: str, param: dict) -> float:
    """``param['eps']`` (1e-5 by default), or ValueError unless it is a finite number > 0."""
    return check_eps(function, param.get("eps", 1e-5), f"{param_name}['eps']")


def check_eps(function: str, value, name: str) -> float:
    """``value`` as a float, or ValueError naming ``function`` and ``name`` unless it is a finite
    number > 0: with eps 0 a constant feature normalises to 0/0."""
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{function}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def ensure_running_statistics(function: str, bn_param: dict, like: Array, d: int) -> None:
    """Zeros (d,) for 'running_mean' and 'running_var' where ``bn_param`` has none yet,
    of ``like``'s dtype (float32 for float16 activations) and device; those it has must be
    float arrays of ``like``'s library (a list or an integer array failed deep inside) and of shape (d,)."""
    xp = namespace(like)
    dtype = xp.float32 if is_half(xp, like) else like.dtype
    for key in ("running_mean", "running_var"):
        running = bn_param.get(key)
        if running is None:
            bn_param[key] = xp.zeros((d,), dtype=dtype, device=device(like))
            continue
        if type(running) is not type(like) or running.dtype != dtype:  # those made here need no check
            layer_namespace(function, {"x": like, f"bn_param[{key!r}]": running})
        if tuple(running.shape) != (d,):
            raise ValueError(
                f"bn_param[{key!r}] has shape {tuple(running.shape)}, but the input has {d} "
                f"features (or channels): it must be ({d},)"
            )


def update_running_statistics(bn_param: dict, mean: Array, var: Array, count: int) -> None:
    """``running = momentum·running + (1 - momentum)·batch`` for the batch mean and biased
    variance (D,) of ``count`` values each; the variance made unbiased first when
    ``bn_param['unbiased_running_var']``. In place, so the buffers keep their identity
    (a CUDA graph writes into them)."""
    momentum = bn_param.get("momentum", 0.9)
    var_scale = count / (count - 1) if bn_param.get("unbiased_running_var", False) else 1.0
    fast = accelerated(mean)
    if fast is not None:
        fast.running_averages(bn_param["running_mean"], bn_param["running_var"], mean, var, momentum, var_scale)
        return
    if var_scale != 1.0:
        var = var * var_scale
    for key, batch_value in (("running_mean", mean), ("running_var", var)):
        running = bn_param[key]
        running *= momentum
        running += (1 - momentum) * batch_value


def train_mode_cache(function: str, cache: Cache, parts: int | None = None, forward: str = "") -> Cache:
    """``cache``, or ValueError naming ``function`` for None, the cache of a test-mode forward pass;
    given ``parts``, also for another layer's cache (see :func:`~xpnet.input_checks.unpack_cache`)."""
    if cache is None:
        raise ValueError(
            f"{function}: the cache is None, which a forward pass in test mode returns: "
            "gradients need the cache of a forward pass in train mode"
        )
    return cache if parts is None else unpack_cache(function, cache, parts, forward)


def batchnorm_backward(dout: Array, cache: Cache) -> tuple[Array, Array, Array]:
    """Backward pass of batchnorm, step by step through the computational graph.

    Args:
        dout: (N, D) upstream gradient; cache from :func:`batchnorm_forward` in train mode.
    Returns:
        dx (N, D), dgamma (D,), dbeta (D,).
    """
    x_hat, centered, std, gamma, _ = train_mode_cache("batchnorm_backward", cache, 5, "batchnorm_forward")
    xp = layer_namespace("batchnorm_backward", {"dout": dout}, {"x": x_hat})
    check_same_shape("batchnorm_backward", "dout", dout, "x", x_hat)
    n = dout.shape[0]
    dbeta = xp.sum(dout, axis=0)
    dgamma = None if gamma is None else xp.sum(dout * x_hat, axis=0)
    dx_hat = dout if gamma is None else dout * gamma
    # x_hat = centered * inv_std
    inv_std = 1.0 / std
    d_inv_std = xp.sum(dx_hat * centered, axis=0, keepdims=True)
    d_centered = dx_hat * inv_std
    # inv_std = 1 / sqrt(var + eps)
    d_var = d_inv_std * (-0.5) * inv_std * inv_std * inv_std
    # var = mean(centered²)
    d_centered = d_centered + 2.0 * centered * d_var / n
    # centered = x - mean(x)
    dx = d_centered - xp.sum(d_centered, axis=0, keepdims=True) / n
    return dx, dgamma, dbeta


def batchnorm_backward_alt(dout: Array, cache: Cache) -> tuple[Array, Array, Array]:
    """Backward pass of batchnorm in simplified closed form (same result, fewer passes)."""
    return normalization_backward("batchnorm_backward_alt", dout, cache, "batchnorm_forward")


@makes_cache("layernorm_forward")
def layernorm_forward(x: Array, gamma: Array, beta: Array, ln_param: dict) -> tuple[Array, Cache]:
    """Layer normalisation: each sample normalised over its D features.

    Args:
        x: (N, D); gamma, beta: (D,); ln_param: dict with optional 'eps' (1e-5).
    Returns:
        out (N, D) and the cache. Behaves the same at train and test time.
    """
    _check_norm_input("layernorm_forward", x, gamma, beta)
    # 'mode' is allowed and ignored: nets set it on every normalisation layer's dict.
    check_param_keys("layernorm_forward", "ln_param", ln_param, ("eps", "mode"))
    eps = normalization_eps("layernorm_forward", "ln_param", ln_param)
    out, cache, _, _ = _normalize_forward(x, gamma, beta, eps, axis=1)
    return out, cache


def layernorm_backward(dout: Array, cache: Cache) -> tuple[Array, Array, Array]:
    """Backward pass of layernorm: dx (N, D), dgamma (D,), dbeta (D,)."""
    return normalization_backward("layernorm_backward", dout, cache, "layernorm_forward")


# --------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------
@makes_cache("dropout_forward")
def dropout_forward(x: Array, dropout_param: dict) -> tuple[Array, Cache]:
    """Inverted dropout.

    Args:
        x: input of any shape.
        dropout_param: dict with
            'p': probability of DROPPING each unit, in [0, 1); 0 disables dropout.
            'mode': 'train' or 'test'; at test time dropout is the identity.
            'seed' (optional): the mask is then drawn from a generator seeded
                with it, so every call with the same seed uses the same mask
                (for gradient checks).
            'rng' (optional): a :class:`xpnet.backend.DeviceRNG` to draw from
                when no seed is given (default: the backend's shared generator).
    Returns:
        out (same shape as x) and cache ``(dropout_param, mask)``; kept units
        are scaled by 1 / (1 - p) at train time.
    """
    check_param_keys("dropout_forward", "dropout_param", dropout_param, ("p", "mode", "seed", "rng"))
    p = dropout_param.get("p", 0.0)
    if not is_number(p) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_forward: dropout probability p must be in [0, 1), got {p!r}")
    mode = dropout_param.get("mode", "train")
    if mode not in ("train", "test"):
        raise ValueError(f"dropout_forward: invalid dropout mode {mode!r}: use 'train' or 'test'")
    xp = layer_namespace("dropout_forward", {"x": x})
    if mode == "test" or p == 0.0:
        return x, (dropout_param, None)
    seed = check_seed(dropout_param.get("seed"), "dropout_param['seed']")
    backend = backend_of(x)
    if seed is not None:
        rng = backend.rng(seed)
    elif dropout_param.get("rng") is not None:
        rng = check_generator("dropout_forward: dropout_param['rng']", dropout_param["rng"], backend, "x",
                              "a seed goes in dropout_param['seed']")  # fmt: skip
    else:
        rng = backend.default_rng()
    # The course: rand < keep probability. Drawn in float32 for float16 activations: generators
    # draw float32 or float64, and a float16 draw could not tell most p apart.
    draw_dtype = xp.float64 if x.dtype == xp.float64 else xp.float32
    keep = rng.uniform(tuple(x.shape), dtype=draw_dtype) < 1.0 - p
    mask = xp.astype(keep, x.dtype) / (1.0 - p)
    return x * mask, (dropout_param, mask)


def dropout_backward(dout: Array, cache: Cache) -> Array:
    """Backward pass of :func:`dropout_forward`."""
    _, mask = unpack_cache("dropout_backward", cache, 2, "dropout_forward")
    layer_namespace("dropout_backward", {"dout": dout}, None if mask is None else {"x": mask})
    if mask is None:  # test mode, or p = 0: the identity
        return dout
    check_same_shape("dropout_backward", "dout", dout, "x", mask)
    return dout * mask


# The course's layers.py also holds the convolutional layers: their reference (naive)
# versions and the spatial normalisations live in modules of their own.
from .conv_naive import (  # noqa: E402
    conv_backward_naive,
    conv_forward_naive,
    max_pool_backward_naive,
    max_pool_forward_naive,
)
from .spatial_norm import (  # noqa: E402
    spatial_batchnorm_backward,
    spatial_batchnorm_forward,
    spatial_batchnorm_gelu_backward,
    spatial_batchnorm_gelu_forward,
    spatial_groupnorm_backward,
    spatial_groupnorm_forward,
)
