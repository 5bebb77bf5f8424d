"""Modular fully connected networks: TwoLayerNet and FullyConnectedNet."""

from __future__ import annotations

from .input_checks import check_flag
from .layer_utils import (
    NORMALIZATIONS,
    affine_norm_relu_dropout_backward,
    affine_norm_relu_dropout_forward,
)
from .layers import affine_backward, affine_forward, softmax_loss
from .model import (
    L2Strength,
    Model,
    check_dropout,
    check_finite,
    check_flat_input_dim,
    check_hidden_dims,
    check_keep_ratio,
    check_num_classes,
)

__all__ = ["FullyConnectedNet", "TwoLayerNet"]


class FullyConnectedNet(Model):
    """{affine - [batchnorm | layernorm] - relu - [dropout]} x (L - 1) - affine - softmax.

    Parameters live in ``self.params``: W1..WL (D_in, D_out), b1..bL (D_out,) and,
    with normalisation, gamma1..gamma(L-1) and beta1..beta(L-1).

    Args:
        hidden_dims: sizes of the L - 1 hidden layers (an int means one layer).
        input_dim: D, the size of one flattened input.
        num_classes: C.
        dropout: probability of dropping a hidden unit, in [0, 1); 0 disables dropout.
        dropout_keep_ratio: the probability of keeping a unit instead, in (0, 1] (1 disables
            dropout), as recent versions of the course name it; give this or ``dropout``.
        use_batchnorm: shorthand for ``normalization="batchnorm"``.
        normalization: None, "batchnorm" or "layernorm".
        reg: L2 strength; the loss adds 0.5 * reg * sum of squared weights
            (read at each call, so it may be changed after construction).
        weight_scale: std of the normal initialisation of the weights (biases start at 0).
        dtype: "float32" or "float64" (or the numpy dtype objects).
        seed: seeds the weight initialisation and fixes the dropout mask
            (every forward pass then drops the same units, as needed for gradient checks).
        backend: a backend spec or Backend (None: the current default).
        rng: a generator of the backend (``backend.rng(s)``) to draw the initial
            weights from, instead of ``seed`` (not beside it); dropout masks then stay random
            (drawn from ``self.rng``, which the Solver sets for each epoch).
    """

    reg = L2Strength()

    def __init__(
        self,
        hidden_dims,
        input_dim=3 * 32 * 32,
        num_classes=10,
        dropout=0,
        use_batchnorm=False,
        normalization=None,
        reg=0.0,
        weight_scale=1e-2,
        dtype="float32",
        seed=None,
        backend=None,
        rng=None,
        dropout_keep_ratio=None,
    ):
        super().__init__(backend, dtype)
        hidden_dims = check_hidden_dims(hidden_dims)
        if dropout_keep_ratio is not None:
            if dropout:
                raise ValueError(
                    "give dropout (the probability of dropping a unit) or dropout_keep_ratio (of keeping it), not both"
                )
            dropout = 1.0 - check_keep_ratio(dropout_keep_ratio)
        input_dim = check_flat_input_dim("input_dim", input_dim)
        num_classes = check_num_classes(num_classes)
        check_finite("weight_scale", weight_scale, minimum=0)
        if check_flag("use_batchnorm", use_batchnorm):
            if normalization not in (None, "batchnorm"):
                raise ValueError(f"use_batchnorm=True conflicts with normalization={normalization!r}")
            normalization = "batchnorm"
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {normalization!r}; use one of {NORMALIZATIONS}")
        self.normalization = normalization
        self.use_batchnorm = normalization == "batchnorm"
        self.use_dropout = check_dropout(dropout) > 0
        self.reg = reg
        self.weight_scale = weight_scale
        self.num_layers = len(hidden_dims) + 1
        self.num_classes = num_classes
        self.input_dim = input_dim

        rng = self._init_rng(seed, rng)
        dims = [input_dim, *hidden_dims, num_classes]
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:]), start=1):
            self.params[f"W{i}"] = self._weight(rng, (d_in, d_out), weight_scale)
            self.params[f"b{i}"] = self._zeros(d_out)
            if normalization is not None and i < self.num_layers:
                self.params[f"gamma{i}"] = self._ones(d_out)
                self.params[f"beta{i}"] = self._zeros(d_out)

        # Per-layer state of the normalisation layers (running averages for batchnorm).
        self.norm_params = [{"mode": "train"} for _ in range(self.num_layers - 1)]
        self.bn_params = self.norm_params if self.use_batchnorm else []
        self.dropout_param = {"mode": "train", "p": float(dropout)} if self.use_dropout else {}
        if self.use_dropout and seed is not None:
            self.dropout_param["seed"] = seed

    def buffers(self):
        return self.norm_params

    @property
    def graph_key(self) -> tuple:
        return (self.reg, self.dropout_param.get("p"))

    def loss(self, X, y=None):
        """Class scores, or the loss and its gradients.

        Args:
            X: (N, d_1, ..., d_k) inputs; y: (N,) integer labels, or None.
        Returns:
            scores (N, C) when y is None (test mode); otherwise (loss, grads)
            with loss a 0-d array and grads a dict shaped like ``self.params``.
        """
        X = self.prepare_inputs(X)
        mode = "test" if y is None else "train"
        for norm_param in self.norm_params:
            norm_param["mode"] = mode
        if self.use_dropout:
            self.dropout_param["mode"] = mode
            self.dropout_param["rng"] = self.rng
        p = self.params
        L = self.num_layers

        out = X
        caches = []
        for i in range(1, L):
            norm = self.normalization
            out, cache = affine_norm_relu_dropout_forward(
                out,
                p[f"W{i}"],
                p[f"b{i}"],
                p.get(f"gamma{i}"),
                p.get(f"beta{i}"),
                self.norm_params[i - 1],
                norm,
                self.dropout_param if self.use_dropout else None,
            )
            caches.append(cache)
        scores, last_cache = affine_forward(out, p[f"W{L}"], p[f"b{L}"])
        if y is None:
            return scores

        loss, dscores = softmax_loss(scores, self.prepare_labels(y))
        grads = {}
        dout, grads[f"W{L}"], grads[f"b{L}"] = affine_backward(dscores, last_cache)
        for i in range(L - 1, 0, -1):
            dout, dw, db, dgamma, dbeta = affine_norm_relu_dropout_backward(dout, caches[i - 1], input_grad=i > 1)
            grads[f"W{i}"], grads[f"b{i}"] = dw, db
            if dgamma is not None:
                grads[f"gamma{i}"], grads[f"beta{i}"] = dgamma, dbeta
        return self._add_l2(loss, grads, [f"W{i}" for i in range(1, self.num_layers + 1)], self.reg)


class TwoLayerNet(FullyConnectedNet):
    """affine - relu - [dropout] - affine - softmax, with W1 (D, H), b1 (H,), W2 (H, C), b2 (C,).

    Args:
        input_dim: D; hidden_dims: H (ECE C147/C247's name for the hidden size; 100 if
            neither it nor ``hidden_dim`` is given);
        num_classes: C; dropout: probability of dropping a hidden unit;
        weight_scale: std of the weights' normal initialisation;
        reg: L2 strength; dtype: "float64" by default, as in the course code;
        seed: seeds the initialisation; backend: spec or Backend.
        hidden_dim: H under cs231n's name, so that ``TwoLayerNet(input_dim=D, hidden_dim=H, ...)``
            ports as it stands; give this or ``hidden_dims``.
    """

    def __init__(
        self,
        input_dim=3 * 32 * 32,
        hidden_dims=None,
        num_classes=10,
        dropout=0,
        weight_scale=1e-3,
        reg=0.0,
        dtype="float64",
        seed=None,
        backend=None,
        rng=None,
        hidden_dim=None,
    ):
        if hidden_dim is not None:
            if hidden_dims is not None:
                raise ValueError(
                    f"give hidden_dims or hidden_dim (the same setting), not both: "
                    f"hidden_dims={hidden_dims!r}, hidden_dim={hidden_dim!r}"
                )
            hidden_dims = hidden_dim
        elif hidden_dims is None:
            hidden_dims = 100
        dims = check_hidden_dims(hidden_dims)
        if len(dims) != 1:
            raise ValueError(f"TwoLayerNet has one hidden layer; got hidden_dims={hidden_dims!r}")
        super().__init__(
            dims,
            input_dim=input_dim,
            num_classes=num_classes,
            dropout=dropout,
            reg=reg,
            weight_scale=weight_scale,
            dtype=dtype,
            seed=seed,
            backend=backend,
            rng=rng,
        )
