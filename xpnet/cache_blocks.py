"""Chains of elementwise operations run a cache-sized block at a time on NumPy.

Each array API operation is one pass over memory, and a pass over an array larger than
the CPU's caches goes out to main memory and back. Running the whole chain on one block
of rows after another keeps each block's temporaries in the cache: the same operations on
the same values, so the same results bit for bit, in less time. Only where the backend
says so (``Backend.cache_blocks``: NumPy's operations cost about a microsecond to call);
on a GPU each pass is a kernel launch, and a block loop would multiply the launches, and
PyTorch's CPU tensors and array-api-strict cost more per call than the cache saves, so
there the arrays are taken whole.
"""

from __future__ import annotations

import math

from .array_types import Array
from .backend import backend_of, namespace

__all__ = ["BLOCK", "UPDATE_WHOLE_UP_TO", "map_blocks", "update_in_blocks"]

BLOCK = 1 << 15  # elements: a block's few live temporaries fit in a core's L2 cache
# An update rule's dozen passes over w, dw and the state stay in the caches up to about this
# many elements (2 MiB of float32 an array); beyond it, blocks take 2048x512 float32 from 3.4 to
# 2.9 ms with Adam and 8192x500 from 15 to 10 ms on a 2-core AMD EPYC, and below it they gain nothing.
UPDATE_WHOLE_UP_TO = 1 << 19


def _row_blocks(shape) -> list:
    """Slices along the first axis of ``shape``, each of about :data:`BLOCK` elements (at least a row)."""
    n = shape[0]
    rows = max(1, BLOCK * n // math.prod(shape))
    # the standard leaves a slice's stop past the end unspecified: clip it
    return [slice(start, min(start + rows, n)) for start in range(0, n, rows)]


def map_blocks(function, x: Array) -> Array:
    """``function(xp, x, on_host)``, an elementwise function, a block of about :data:`BLOCK`
    elements (whole slices along the first axis) after another where the backend runs in
    cache blocks, else on all of ``x`` at once. ``on_host`` says whether the function may
    look at the values to choose what to compute (free on the CPU, a synchronisation on a
    GPU). The result has x's memory layout either way."""
    xp, backend = namespace(x), backend_of(x)
    on_host = not backend.is_gpu
    if math.prod(x.shape) <= BLOCK or not backend.cache_blocks:
        return function(xp, x, on_host)
    out = xp.empty_like(x)
    for block in _row_blocks(x.shape):
        out[block, ...] = function(xp, x[block, ...], on_host)
    return out


def update_in_blocks(update, *arrays: Array) -> None:
    """``update(*arrays)``, which changes some of ``arrays`` (all of one shape) in place with
    the array API's in-place operators, a block of rows after another where the backend runs
    in cache blocks and the arrays hold more than :data:`UPDATE_WHOLE_UP_TO` elements, else
    whole. ``update`` sees row slices of the arrays, which write through to them."""
    first = arrays[0]
    if math.prod(first.shape) <= UPDATE_WHOLE_UP_TO or not backend_of(first).cache_blocks:
        update(*arrays)
        return
    for block in _row_blocks(first.shape):
        update(*(a[block, ...] for a in arrays))
