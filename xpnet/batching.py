"""Minibatch sampling and accuracy, computed on the arrays' device."""

from __future__ import annotations

from .backend import namespace
from .input_checks import as_int, is_array

__all__ = ["sample_minibatch", "accuracy", "model_accuracy", "predicted_classes", "checked_scores"]


def sample_minibatch(X, y, rng, batch_size: int):
    """Draw ``batch_size`` rows of (X, y) uniformly with replacement, on the device.

    Args:
        X: (N, ...) data; y: (N,) labels; rng: a DeviceRNG of the same backend.
    Returns:
        (X_batch (batch_size, ...), y_batch (batch_size,)).
    """
    xp = namespace(X, y)
    indices = rng.integers(0, X.shape[0], batch_size)
    return xp.take(X, indices, axis=0), xp.take(y, indices, axis=0)


def accuracy(predictions, y):
    """Fraction of ``predictions == y`` as a 0-d float array (no host transfer)."""
    xp = namespace(predictions, y)
    return xp.mean(xp.astype(predictions == y, xp.float64))


def _positive_count(name, value, caller="check_accuracy") -> int:
    number = as_int(value)
    if number is None or number < 1:
        raise ValueError(f"{caller}: {name} must be a positive integer, got {value!r}")
    return number


def model_accuracy(scores_of, X, y, num_samples=None, batch_size=100, rng=None):
    """Accuracy of ``scores_of(X_batch) -> (B, C) scores`` on (X, y), as a 0-d device array.

    At most ``num_samples`` rows are used, drawn by ``rng`` (with replacement);
    predictions are made ``batch_size`` rows at a time on the device.
    """
    namespace(X, y)  # X and y of one library, or an error that says so
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(
            f"check_accuracy: y must hold one label per row of X {tuple(X.shape)}, got shape {tuple(y.shape)}"
        )
    batch_size = _positive_count("batch_size", batch_size)
    if num_samples is not None:
        num_samples = _positive_count("num_samples", num_samples)
        if X.shape[0] > num_samples:
            X, y = sample_minibatch(X, y, rng, num_samples)
    return accuracy(predicted_classes(scores_of, X, batch_size), y)


def predicted_classes(scores_of, X, batch_size=500, caller="check_accuracy", called="the model's loss(X)"):
    """(N,) indices of the highest of ``scores_of(X_batch) -> (B, C)`` scores for each row of X,
    scored ``batch_size`` rows at a time on the device: a conv net's activations for a whole
    test set at once take gigabytes. ``caller`` and ``called`` name the two in messages."""
    xp = namespace(X)
    batch_size = _positive_count("batch_size", batch_size, caller)
    n = X.shape[0]
    if n == 0:
        raise ValueError(f"{caller}: no rows to score: X is empty")
    predictions = [
        xp.argmax(checked_scores(scores_of, X[i : min(i + batch_size, n), ...], caller, called), axis=1)
        for i in range(0, n, batch_size)
    ]
    return predictions[0] if len(predictions) == 1 else xp.concat(predictions)


def checked_scores(scores_of, X_batch, caller="check_accuracy", called="the model's loss(X)"):
    """``scores_of(X_batch)``, checked to be (B, C) scores, one row per row of the batch (on the
    host: shapes only): a model written by hand gets its slip named, not an error from inside
    argmax or a mean. ``caller`` and ``called`` name the two in the message."""
    scores = scores_of(X_batch)
    rows = X_batch.shape[0]
    if not is_array(scores) or scores.ndim != 2 or scores.shape[0] != rows:
        got = f"shape {tuple(scores.shape)}" if is_array(scores) else f"a {type(scores).__name__}"
        if isinstance(scores, tuple):  # (loss, grads): the model ignored that y is None
            got += " (without y, loss(X) must return the scores alone, not (loss, grads))"
        raise ValueError(
            f"{caller}: {called} must return class scores of shape (N, C), one row "
            f"for each of the {rows} inputs; got {got}"
        )
    return scores
