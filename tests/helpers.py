"""Data, models and payloads that several test modules use."""

from __future__ import annotations

import os
import pickle

import numpy as np

import xpnet


def blobs(n, d=6, c=3, seed=0, noise=0.6):
    """``n`` points around ``c`` random centres in ``d`` dimensions: (X float32 (n, d), y int64 (n,))."""
    rng = np.random.default_rng(seed)
    centres = 2.0 * rng.standard_normal((c, d))
    y = rng.integers(0, c, n)
    return (centres[y] + noise * rng.standard_normal((n, d))).astype(np.float32), y


def small_data(n_train=200, n_val=60):
    X, y = blobs(n_train + n_val)
    return {"X_train": X[:n_train], "y_train": y[:n_train], "X_val": X[n_train:], "y_val": y[n_train:]}


def small_model(backend, **kwargs):
    options = dict(input_dim=6, num_classes=3, weight_scale=0.1, seed=0, backend=backend)
    options.update(kwargs)
    return xpnet.FullyConnectedNet([16, 16], **options)


class MakeFolderWhenUnpickled:
    """A harmless stand-in for a malicious pickle: unpickling it creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def write_pickle_payload(path, marker, protocol=2):
    """A pickle file at ``path`` that would create the folder ``marker`` if it were unpickled."""
    with open(path, "wb") as f:
        pickle.dump({b"data": MakeFolderWhenUnpickled(marker), b"labels": [0]}, f, protocol=protocol)
