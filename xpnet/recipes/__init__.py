"""Complete training recipes: a network, its data pipeline, its optimiser and schedule,
and its evaluation, run with one call.

- :func:`fast94`: the fast CIFAR-10 recipe (94% test accuracy in a few seconds on one GPU);
  :func:`save_fast94_model` and :func:`load_fast94_model` keep the network it trained.
"""

from .fast94 import (
    Fast94Result,
    Fast94Settings,
    Fast94Trainer,
    fast94,
    load_fast94_model,
    normalized_images,
    save_fast94_model,
)

__all__ = [
    "fast94",
    "Fast94Result",
    "Fast94Settings",
    "Fast94Trainer",
    "save_fast94_model",
    "load_fast94_model",
    "normalized_images",
]
