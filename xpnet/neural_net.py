"""The monolithic two-layer network of the course's first neural-net notebook."""

from __future__ import annotations

from .batching import accuracy, sample_minibatch
from .data_checks import checked_labelled_set
from .input_checks import as_int, check_flag
from .layers import affine_backward, affine_forward, relu_backward, relu_forward, softmax_loss
from .model import Model, check_finite, check_flat_input_dim, check_num_classes, check_positive_int

__all__ = ["TwoLayerNet"]


class TwoLayerNet(Model):
    """Two-layer fully connected net: scores = relu(X W1ᵀ + b1) W2ᵀ + b2, softmax loss.

    Parameters (in ``self.params``): W1 (H, D), b1 (H,), W2 (C, H), b2 (C,);
    weights drawn from N(0, std²), biases zero.

    Args:
        input_size: D; hidden_size: H; output_size: C.
        std: std of the weights' initialisation.
        dtype: "float64" by default, as in the course code.
        seed: seeds the initialisation; backend: spec or Backend.
    """

    def __init__(self, input_size, hidden_size, output_size, std=1e-4, dtype="float64", seed=None, backend=None):
        super().__init__(backend, dtype)
        input_size = check_flat_input_dim("input_size", input_size)
        hidden_size = check_positive_int("hidden_size", hidden_size)
        output_size = check_num_classes(check_positive_int("output_size", output_size))
        self.std = check_finite("std", std, minimum=0)
        self.num_classes = output_size
        self.input_dim = input_size
        rng = self._init_rng(seed)
        self.params["W1"] = self._weight(rng, (hidden_size, input_size), std)
        self.params["b1"] = self._zeros(hidden_size)
        self.params["W2"] = self._weight(rng, (output_size, hidden_size), std)
        self.params["b2"] = self._zeros(output_size)

    def loss(self, X, y=None, reg=0.0):
        """Scores (N, C) when y is None; else (loss, grads) with the L2 term
        0.5 * reg * (||W1||² + ||W2||²) in the loss and reg * W in the gradients.

        Args:
            X: (N, D) inputs; y: (N,) integer labels or None; reg: L2 strength.
        """
        check_finite("reg", reg, minimum=0)  # a negative one would reward large weights in silence
        X = self.prepare_inputs(X)
        W1, b1, W2, b2 = (self.params[k] for k in ("W1", "b1", "W2", "b2"))
        # The layers take weights as (D_in, D_out): pass the transposes.
        hidden_pre, fc1_cache = affine_forward(X, W1.T, b1)
        hidden, relu_cache = relu_forward(hidden_pre)
        scores, fc2_cache = affine_forward(hidden, W2.T, b2)
        if y is None:
            return scores

        loss, dscores = softmax_loss(scores, self.prepare_labels(y))
        dhidden, dW2t, db2 = affine_backward(dscores, fc2_cache)
        _, dW1t, db1 = affine_backward(relu_backward(dhidden, relu_cache), fc1_cache, input_grad=False)
        grads = {"W1": dW1t.T, "b1": db1, "W2": dW2t.T, "b2": db2}
        return self._add_l2(loss, grads, ("W1", "W2"), reg)

    def train(
        self,
        X,
        y,
        X_val,
        y_val,
        learning_rate=1e-3,
        learning_rate_decay=0.95,
        reg=1e-5,
        num_iters=100,
        batch_size=200,
        verbose=False,
        seed=None,
    ):
        """Minibatch SGD, with minibatches drawn on the device.

        The learning rate is multiplied by ``learning_rate_decay`` after each
        epoch, where the training and validation accuracies are recorded.
        Losses and accuracies stay on the device until the end (or until a
        verbose print every 100 iterations). ``seed`` fixes the minibatches; without
        one they come from the backend's shared generator (NumPy's global one on NumPy,
        so ``np.random.seed`` repeats a run, as in the course).

        Returns:
            dict with 'loss_history', 'train_acc_history', 'val_acc_history',
            each a list of Python floats.
        """
        check_finite("learning_rate", learning_rate, minimum=0)
        check_finite("learning_rate_decay", learning_rate_decay, minimum=0)
        check_finite("reg", reg, minimum=0)
        batch_size = check_positive_int("batch_size", batch_size)
        verbose = check_flag("verbose", verbose)
        iterations = as_int(num_iters)
        if iterations is None or iterations < 0:
            raise ValueError(f"num_iters must be a non-negative integer, got {num_iters!r}")
        # labels one per row, in range; finite rows of input_dim values
        X, y = checked_labelled_set(X, y, self, self.prepare_inputs, self.prepare_labels, "TwoLayerNet.train")
        X_val, y_val = checked_labelled_set(
            X_val, y_val, self, self.prepare_inputs, self.prepare_labels, "TwoLayerNet.train", ("X_val", "y_val")
        )
        # Without a seed, the backend's shared generator: on NumPy np.random's, where the course draws.
        rng = self.backend.default_rng() if seed is None else self.backend.rng(seed)
        iterations_per_epoch = max(X.shape[0] // batch_size, 1)
        losses, train_accs, val_accs = [], [], []
        for it in range(iterations):
            X_batch, y_batch = sample_minibatch(X, y, rng, batch_size)
            loss, grads = self.loss(X_batch, y=y_batch, reg=reg)
            losses.append(loss)
            for name, grad in grads.items():
                self.params[name] = self.params[name] - learning_rate * grad
            if verbose and it % 100 == 0:
                print(f"iteration {it} / {num_iters}: loss {float(loss):f}")
            if (it + 1) % iterations_per_epoch == 0:
                train_accs.append(accuracy(self.predict(X_batch), y_batch))
                val_accs.append(accuracy(self.predict(X_val), y_val))
                learning_rate *= learning_rate_decay
        return {
            "loss_history": self.backend.to_floats(losses),
            "train_acc_history": self.backend.to_floats(train_accs),
            "val_acc_history": self.backend.to_floats(val_accs),
        }
