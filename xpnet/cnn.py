"""Convolutional networks in the course's style: a params dict and ``loss(X, y)``
with an explicit forward and backward pass."""

from __future__ import annotations

from .layer_utils import affine_relu_backward, affine_relu_forward, conv_relu_pool_backward, conv_relu_pool_forward
from .layers import affine_backward, affine_forward, softmax_loss
from .model import Model, check_finite, check_num_classes, check_positive_int

__all__ = ["ThreeLayerConvNet"]


class ThreeLayerConvNet(Model):
    """conv - relu - 2x2 max pool - affine - relu - affine - softmax.

    The convolution keeps the spatial size (stride 1, pad (filter_size - 1) // 2, so
    an odd filter size), and the pool halves it. Parameters: W1 (F, C, HH, WW), b1 (F,),
    W2 (F·H/2·W/2, hidden_dim), b2 (hidden_dim,), W3 (hidden_dim, num_classes), b3.

    Args:
        input_dim: (C, H, W) of one input; H and W even.
        num_filters: F; filter_size: HH = WW (odd); hidden_dim: the affine layer's size.
        num_classes: C_out; weight_scale: std of the normal initial weights (biases 0).
        reg: L2 strength; the loss adds 0.5 * reg * sum of squared weights.
        dtype: "float32" (default, as in the course) or "float64".
        seed / rng: seed or generator for the initial weights; backend: spec or Backend.
    """

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
        seed=None,
        backend=None,
        rng=None,
    ):
        super().__init__(backend, dtype)
        if len(tuple(input_dim)) != 3:
            raise ValueError(f"input_dim must be (C, H, W), got {input_dim!r}")
        channels, height, width = (check_positive_int("each of input_dim", d) for d in input_dim)
        if height % 2 or width % 2:
            raise ValueError(
                f"ThreeLayerConvNet: the 2x2 pool needs an even height and width, got input_dim {input_dim!r}"
            )
        check_positive_int("num_filters", num_filters)
        check_positive_int("hidden_dim", hidden_dim)
        if check_positive_int("filter_size", filter_size) % 2 == 0:
            raise ValueError(f"filter_size must be odd so the convolution keeps the size, got {filter_size}")
        check_num_classes(num_classes)
        self.weight_scale = check_finite("weight_scale", weight_scale, minimum=0)
        self.reg = check_finite("reg", reg, minimum=0)
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

    def loss(self, X, y=None):
        """Class scores (N, C_out) when ``y`` is None, else ``(loss, grads)``.

        Args:
            X: (N, C, H, W) inputs; y: (N,) integer labels or None.
        """
        X = self.prepare_inputs(X)
        if tuple(X.shape[1:]) != self.input_dim:
            raise ValueError(f"ThreeLayerConvNet: inputs must be (N, *{self.input_dim}), got {tuple(X.shape)}")
        p = self.params
        pooled, cache1 = conv_relu_pool_forward(X, p["W1"], p["b1"], self.conv_param, self.pool_param)
        hidden, cache2 = affine_relu_forward(pooled, p["W2"], p["b2"])
        scores, cache3 = affine_forward(hidden, p["W3"], p["b3"])
        if y is None:
            return scores

        loss, dscores = softmax_loss(scores, self.prepare_labels(y))
        grads = {}
        dhidden, grads["W3"], grads["b3"] = affine_backward(dscores, cache3)
        dpooled, grads["W2"], grads["b2"] = affine_relu_backward(dhidden, cache2)
        _, grads["W1"], grads["b1"] = conv_relu_pool_backward(dpooled, cache1, input_grad=False)
        return self._add_l2(loss, grads, ("W1", "W2", "W3"), self.reg)
