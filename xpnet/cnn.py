"""Convolutional networks in the course's style: a params dict and ``loss(X, y)``
with an explicit forward and backward pass."""

from __future__ import annotations

from .conv_common import channel_sum
from .data_checks import check_image_batch
from .fast_layers import conv_backward_fast, conv_forward_fast, max_pool_backward_fast, max_pool_forward_fast
from .input_checks import check_flag
from .layer_utils import (
    affine_norm_relu_dropout_backward,
    affine_norm_relu_dropout_forward,
    conv_bn_relu_pool_backward,
    conv_bn_relu_pool_forward,
    conv_relu_pool_backward,
    conv_relu_pool_forward,
)
from .layers import (
    affine_backward,
    affine_forward,
    check_eps,
    check_label_smoothing,
    check_momentum,
    check_reduction,
    gelu_backward,
    gelu_forward,
    matmul,
    softmax_loss,
)
from .model import L2Strength, Model, check_finite, check_input_dim, check_num_classes, check_positive_int, check_sizes
from .precision import narrowed
from .spatial_norm import spatial_batchnorm_gelu_backward, spatial_batchnorm_gelu_forward
from .whitening import whitening_filters

__all__ = ["ThreeLayerConvNet", "FastConvNet"]


class ThreeLayerConvNet(Model):
    """conv - [spatial batchnorm] - relu - 2x2 max pool - affine - [batchnorm] - relu - affine - softmax.

    The convolution keeps the spatial size (stride 1, pad (filter_size - 1) // 2, so
    an odd filter size), and the pool halves it. Parameters: W1 (F, C, HH, WW), b1 (F,),
    W2 (F·H/2·W/2, hidden_dim), b2 (hidden_dim,), W3 (hidden_dim, num_classes), b3; with
    batchnorm also gamma1, beta1 (F,) and gamma2, beta2 (hidden_dim,).

    Args:
        input_dim: (C, H, W) of one input; H and W even.
        num_filters: F; filter_size: HH = WW (odd); hidden_dim: the affine layer's size.
        num_classes: C_out; weight_scale: std of the normal initial weights (biases 0).
        reg: L2 strength; the loss adds 0.5 * reg * sum of squared weights.
        dtype: "float32" (default, as in the course) or "float64".
        use_batchnorm: batchnorm after the convolution (spatial) and after the hidden affine
            layer, as the ECE C147/C247 version of this net offers; their running averages
            live in ``self.bn_params`` and are saved with the parameters.
        seed / rng: seed or generator for the initial weights; backend: spec or Backend.
    """

    reg = L2Strength()

    def __init__(
        self,
        input_dim=(3, 32, 32),
        num_filters=32,
        filter_size=7,
        hidden_dim=100,
        num_classes=10,
        weight_scale=1e-3,
        reg=0.0,
        dtype="float32",
        use_batchnorm=False,
        seed=None,
        backend=None,
        rng=None,
    ):
        super().__init__(backend, dtype)
        channels, height, width = check_input_dim(input_dim)
        if height % 2 or width % 2:
            raise ValueError(
                f"ThreeLayerConvNet: the 2x2 pool needs an even height and width, got input_dim {input_dim!r}"
            )
        num_filters = check_positive_int("num_filters", num_filters)
        hidden_dim = check_positive_int("hidden_dim", hidden_dim)
        filter_size = check_positive_int("filter_size", filter_size)
        if filter_size % 2 == 0:
            raise ValueError(f"filter_size must be odd so the convolution keeps the size, got {filter_size}")
        num_classes = check_num_classes(num_classes)
        self.weight_scale = check_finite("weight_scale", weight_scale, minimum=0)
        self.reg = reg
        self.input_dim = (channels, height, width)
        self.num_classes = num_classes
        self.conv_param = {"stride": 1, "pad": (filter_size - 1) // 2}
        self.pool_param = {"pool_height": 2, "pool_width": 2, "stride": 2}

        rng = self._init_rng(seed, rng)
        pooled = num_filters * (height // 2) * (width // 2)
        shapes = {
            "W1": (num_filters, channels, filter_size, filter_size),
            "W2": (pooled, hidden_dim),
            "W3": (hidden_dim, num_classes),
        }
        for i, (name, shape) in enumerate(shapes.items(), start=1):
            self.params[name] = self._weight(rng, shape, weight_scale)
            self.params[f"b{i}"] = self._zeros(shape[0] if i == 1 else shape[1])
        self.use_batchnorm = check_flag("use_batchnorm", use_batchnorm)
        self.bn_params = []  # the running averages of the two batchnorm layers, when there are any
        if self.use_batchnorm:
            for i, size in enumerate((num_filters, hidden_dim), start=1):
                self.params[f"gamma{i}"] = self._ones(size)
                self.params[f"beta{i}"] = self._zeros(size)
            self.bn_params = [{"mode": "train"}, {"mode": "train"}]

    def buffers(self):
        return self.bn_params

    @property
    def graph_key(self) -> tuple:
        return (self.reg,)

    def loss(self, X, y=None):
        """Class scores (N, C_out) when ``y`` is None, else ``(loss, grads)``.

        Args:
            X: (N, C, H, W) inputs; y: (N,) integer labels or None.
        """
        X = self.prepare_inputs(X)
        check_image_batch("ThreeLayerConvNet", X, self.input_dim)
        p, bn = self.params, self.use_batchnorm
        for bn_param in self.bn_params:
            bn_param["mode"] = "test" if y is None else "train"
        if bn:
            pooled, cache1 = conv_bn_relu_pool_forward(
                X, p["W1"], p["b1"], p["gamma1"], p["beta1"], self.conv_param, self.bn_params[0], self.pool_param
            )
        else:
            pooled, cache1 = conv_relu_pool_forward(X, p["W1"], p["b1"], self.conv_param, self.pool_param)
        hidden, cache2 = affine_norm_relu_dropout_forward(
            pooled, p["W2"], p["b2"], p.get("gamma2"), p.get("beta2"), self.bn_params[1] if bn else None,
            "batchnorm" if bn else None,
        )  # fmt: skip
        scores, cache3 = affine_forward(hidden, p["W3"], p["b3"])
        if y is None:
            return scores

        loss, dscores = softmax_loss(scores, self.prepare_labels(y))
        grads = {}
        dhidden, grads["W3"], grads["b3"] = affine_backward(dscores, cache3)
        dpooled, grads["W2"], grads["b2"], dgamma2, dbeta2 = affine_norm_relu_dropout_backward(dhidden, cache2)
        if bn:
            grads["gamma2"], grads["beta2"] = dgamma2, dbeta2
            _, grads["W1"], grads["b1"], grads["gamma1"], grads["beta1"] = conv_bn_relu_pool_backward(
                dpooled, cache1, input_grad=False
            )
        else:
            _, grads["W1"], grads["b1"] = conv_relu_pool_backward(dpooled, cache1, input_grad=False)
        return self._add_l2(loss, grads, ("W1", "W2", "W3"), self.reg)


# --------------------------------------------------------------------------- the fast CIFAR-10 net
_SAME = {"stride": 1, "pad": 1}  # 3x3 convolutions that keep the size
# 2x2 pools; an odd last row and column are left out, as PyTorch's MaxPool2d(2) leaves them
_POOL2 = {"pool_height": 2, "pool_width": 2, "stride": 2, "drop_remainder": True}


def _conv_bn_gelu_forward(x, w, beta, bn_param, pool):
    """conv3x3 (no bias) - [2x2 max pool] - batchnorm without scale - GELU."""
    a, conv_cache = conv_forward_fast(x, w, None, _SAME)
    pool_cache = None
    if pool:
        a, pool_cache = max_pool_forward_fast(a, _POOL2)
    out, norm_cache = spatial_batchnorm_gelu_forward(a, None, beta, bn_param)
    return out, (conv_cache, pool_cache, norm_cache)


def _conv_bn_gelu_backward(dout, cache, input_grad=True):
    """(dx, dw, dbeta) of :func:`_conv_bn_gelu_forward`; dx is None when ``input_grad`` is False."""
    conv_cache, pool_cache, norm_cache = cache
    da, _, dbeta = spatial_batchnorm_gelu_backward(dout, norm_cache)
    if pool_cache is not None:
        da = max_pool_backward_fast(da, pool_cache)
    dx, dw, _ = conv_backward_fast(da, conv_cache, input_grad)
    return dx, dw, dbeta


class FastConvNet(Model):
    """The fast CIFAR-10 recipe's network.

    whitening conv (2x2, C -> 2·C·4 filters, no padding; its weights fixed, its bias
    trained) - GELU - three groups - global max pool - linear (no bias) - × scale.
    Each group of width F: conv3x3 (pad 1, no bias) - 2x2 max pool (an odd last row
    and column left out) - batchnorm (no scale) - GELU - conv3x3 - batchnorm - GELU. On 32x32 inputs the
    sizes are 31 -> 15 -> 7 -> 3 -> 1.

    Parameters: "whiten_b" (2·C·4,); "W1".."W6" (F, C_in, 3, 3), two per group;
    "beta1".."beta6" (F,), the batchnorm biases; "W_out" (F_3, num_classes). The
    whitening filters "whiten_W" (2·C·4, C, 2, 2) are a buffer, not a parameter: set
    them from training images with :meth:`init_whitening` (until then they hold PyTorch's
    default initialisation of a conv).

    ``train_whitening_bias`` (True) set to False holds "whiten_b" fixed: ``loss`` then
    gives it None for a gradient and skips the backward pass that only it needs (the
    whitening GELU's and the first 3x3 conv's input gradient), as PyTorch does for a
    parameter that requires no gradient. The recipe trains the bias for its first 3
    epochs only.

    Initialisation as PyTorch's layers do it: conv weights and the head uniform in
    ±1/sqrt(fan_in), and the first min(F, C_in) filters of every 3x3 conv the identity
    (Dirac: a 1 at the centre of its own channel); batchnorm running means 0, variances 1.

    Args:
        input_dim: (C, H, W) of one input.
        widths: the three groups' widths (64, 256, 256 in the recipe).
        num_classes: C_out; scale: the factor on the head's output (1/9).
        bn_momentum: running = momentum·running + (1 − momentum)·batch (0.6); bn_eps: 1e-12.
            The running variance averages the unbiased batch variance, as PyTorch's does.
        label_smoothing: ε of the softmax loss (0.2); loss_reduction: "sum" (the recipe's) or "mean".
        dtype, seed / rng, backend: as for the other nets.
        activation_dtype: None (the parameters' dtype) or "float16": the layers then run on
            float16 copies of the parameters and the inputs, each computing in float32 and
            storing float16 (see :mod:`xpnet.precision`), while the parameters, their
            gradients, the batchnorm statistics, the loss and the scores stay in ``dtype``.
            On backends with a float16 type (NumPy, CuPy, PyTorch); it pays on GPUs.
    """

    def __init__(
        self,
        input_dim=(3, 32, 32),
        widths=(64, 256, 256),
        num_classes=10,
        scale=1 / 9,
        bn_momentum=0.6,
        bn_eps=1e-12,
        label_smoothing=0.2,
        loss_reduction="sum",
        dtype="float32",
        seed=None,
        backend=None,
        rng=None,
        activation_dtype=None,
    ):
        super().__init__(backend, dtype)
        self.activation_dtype = self._activation_dtype(activation_dtype)
        channels, height, width = check_input_dim(input_dim)
        self.widths = check_sizes("widths", widths, 3, "the three groups' widths")
        size = [height - 1, width - 1]  # after the 2x2 whitening conv
        for _ in range(3):
            if min(size) < 2:
                raise ValueError(f"FastConvNet: inputs of {height}x{width} are too small for three 2x2 pools")
            size = [s // 2 for s in size]
        self.input_dim = (channels, height, width)
        self.num_classes = check_num_classes(num_classes)
        self.scale = check_finite("scale", scale)
        self.label_smoothing = check_label_smoothing("FastConvNet", label_smoothing)
        self.loss_reduction = check_reduction("FastConvNet", loss_reduction, "loss_reduction")
        bn_momentum = check_momentum("FastConvNet", bn_momentum, "bn_momentum")
        bn_eps = check_eps("FastConvNet", bn_eps, "bn_eps")
        self.final_size = tuple(size)  # (H, W) before the global max pool
        whiten_width = 2 * channels * 4
        convs = self._conv_channels(channels, self.widths)
        self.train_whitening_bias = True
        self.bn_params = [
            {
                "mode": "train",
                "momentum": bn_momentum,
                "eps": bn_eps,
                "unbiased_running_var": True,
                "running_mean": self._zeros(f),
                "running_var": self._ones(f),
            }
            for f, _ in convs
        ]

        rng = self._init_rng(seed, rng)
        self.params["whiten_b"] = self._uniform(rng, (whiten_width,), channels * 4)
        for i, (f, c) in enumerate(convs, start=1):
            self.params[f"W{i}"] = self._dirac_conv(rng, f, c)
            self.params[f"beta{i}"] = self._zeros(f)
        self.params["W_out"] = self._uniform(rng, (self.widths[-1], num_classes), self.widths[-1])
        # Drawn last, so that the parameters above do not depend on it: PyTorch's default for a conv
        # until init_whitening sets the filters (zeros would leave the batchnorms nothing to normalise).
        self.frozen = {"whiten_W": self._uniform(rng, (whiten_width, channels, 2, 2), channels * 4)}

    @staticmethod
    def _conv_channels(channels: int, widths) -> list:
        """(F, C_in) of the six 3x3 convs, after a whitening conv of 2·channels·4 filters."""
        convs, c_in = [], 2 * channels * 4
        for f in widths:
            convs += [(f, c_in), (f, f)]
            c_in = f
        return convs

    def init_whitening(self, images, eps: float = 5e-4) -> None:
        """Set the whitening filters from (N, C, H, W) training images (the recipe uses 5,000) with
        :func:`xpnet.whitening.whitening_filters`; written in place, so captured graphs see them."""
        images = self.prepare_inputs(images)
        check_image_batch("FastConvNet.init_whitening", images, self.input_dim)
        self.frozen["whiten_W"][...] = whitening_filters(images, 2, eps)

    def _activation_dtype(self, spec):
        """The layers' dtype for ``spec``: the parameters' dtype or the backend's float16."""
        if spec is None:
            return self.dtype
        half = getattr(self.xp, "float16", None)
        try:
            resolved = self.backend.dtype(spec)
        except (TypeError, ValueError):
            resolved = None
        if resolved is not None and resolved in (self.dtype, half):
            return resolved
        available = "" if half is not None else f"; backend {self.backend.name!r} has no float16"
        raise ValueError(
            f"FastConvNet: activation_dtype must be None (the parameters' dtype) or 'float16', got {spec!r}{available}"
        )

    def _dirac_conv(self, rng, f, c):
        """(F, C, 3, 3) uniform weights whose first min(F, C) filters are the identity."""
        xp = self.xp
        w = self._uniform(rng, (f, c, 3, 3), c * 9)
        k = min(f, c)
        dirac = xp.zeros((k, c, 3, 3), dtype=self.dtype, device=self.backend.device)
        dirac[:, :k, 1, 1] = xp.eye(k, dtype=self.dtype, device=self.backend.device)
        return xp.concat([dirac, w[k:, ...]], axis=0)

    def buffers(self):
        return [*self.bn_params, self.frozen]

    @property
    def graph_key(self) -> tuple:
        return (self.train_whitening_bias, self.scale, self.label_smoothing, self.loss_reduction)

    def loss(self, X, y=None):
        """Class scores (N, C_out) when ``y`` is None (batchnorm on its running averages),
        else ``(loss, grads)`` in training mode.

        Args:
            X: (N, C, H, W) inputs; y: (N,) integer labels or None.
        """
        X = self.prepare_inputs(X)
        check_image_batch("FastConvNet", X, self.input_dim)
        xp, act = self.xp, self.activation_dtype
        # The layers' copies of the parameters (the parameters themselves when act is dtype).
        p = {name: narrowed(xp, value, act) for name, value in self.params.items()}
        mode = "test" if y is None else "train"
        for bn_param in self.bn_params:
            bn_param["mode"] = mode

        whiten_W = narrowed(xp, self.frozen["whiten_W"], act)
        whitened = conv_forward_fast(narrowed(xp, X, act), whiten_W, p["whiten_b"], {"stride": 1, "pad": 0})[0]
        h, gelu_cache = gelu_forward(whitened)
        caches = []
        for i in range(1, 7):
            pool = i % 2 == 1
            h, cache = _conv_bn_gelu_forward(h, p[f"W{i}"], p[f"beta{i}"], self.bn_params[i - 1], pool)
            caches.append(cache)
        fh, fw = h.shape[2], h.shape[3]
        pooled, pool_cache = max_pool_forward_fast(h, {"pool_height": fh, "pool_width": fw, "stride": fh})
        features = xp.reshape(pooled, (pooled.shape[0], -1))  # (N, F_3)
        scores = narrowed(xp, matmul(features, p["W_out"]), self.dtype) * self.scale
        if y is None:
            return scores

        loss, dscores = softmax_loss(scores, self.prepare_labels(y), self.label_smoothing, self.loss_reduction)
        grads = {}
        dscores = narrowed(xp, dscores * self.scale, act)
        grads["W_out"] = matmul(features.T, dscores)
        dh = max_pool_backward_fast(xp.reshape(matmul(dscores, p["W_out"].T), pooled.shape), pool_cache)
        for i in range(6, 0, -1):
            input_grad = i > 1 or self.train_whitening_bias
            dh, grads[f"W{i}"], grads[f"beta{i}"] = _conv_bn_gelu_backward(dh, caches[i - 1], input_grad)
        grads["whiten_b"] = None
        if self.train_whitening_bias:
            dwhitened = gelu_backward(dh, gelu_cache)
            # The filters are fixed: no other gradient. Summed in dtype: float16 sums could overflow.
            grads["whiten_b"] = channel_sum(xp, dwhitened, dtype=self.dtype)
        return loss, {name: None if grad is None else narrowed(xp, grad, self.dtype) for name, grad in grads.items()}
