"""Minibatch sampling and accuracy, computed on the arrays' device."""

from __future__ import annotations

from .backend import namespace

__all__ = ["sample_minibatch", "accuracy"]


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
