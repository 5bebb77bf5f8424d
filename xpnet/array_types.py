"""Names for the types in xpnet's signatures.

``Array`` is an array of any supported library (NumPy, CuPy, PyTorch,
array-api-strict): the array API standard has no runtime type to name, so it is
``Any`` to a type checker, and the docstrings state each array's shape.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Array", "Cache", "Config"]

Array = Any
# What a forward pass hands its backward pass: opaque to the caller.
Cache = Any
# An update rule's hyper-parameters and state (learning_rate, velocity, m, v, t, ...).
Config = dict
