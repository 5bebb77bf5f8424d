"""Lookahead: a slow copy of the weights that every ``every`` steps moves part of the
way towards the fast (trained) weights, which then restart from it.

The host counts the steps, so the steps between two lookahead points do no work
at all; at a lookahead point, :meth:`Lookahead.move` does device work only (a device
counter indexes a table of factors), so it can be captured in a CUDA graph once and
replayed at every point.
"""

from __future__ import annotations

from array_api_compat import device

from ..backend import accelerated, namespace
from ..input_checks import as_int

__all__ = ["Lookahead", "cubic_lookahead_decay"]


def cubic_lookahead_decay(step: int, total: int, base: float = 0.95**5) -> float:
    """The fast CIFAR-10 recipe's decay: ``base · (step / total)³``, so the slow weights
    follow the fast ones closely early on and average over more steps near the end."""
    return base * (step / total) ** 3


class Lookahead:
    """At steps ``every``, ``2·every``, ... (counted from 1):
    ``slow ← slow + (1 − decay(step, total)) · (fast − slow)``, then ``fast ← slow``.

    Args:
        arrays: the fast arrays, updated in place (parameters, and running averages
            such as batchnorm's, which are averaged the same way).
        total: the number of training steps (the decay's denominator).
        every: steps between lookahead points (5 in the recipe).
        decay: ``(step, total) -> factor`` in [0, 1]; :func:`cubic_lookahead_decay`
            by default.

    A training loop calls :meth:`step` after each training step, or :meth:`count` and,
    when it returns True, :meth:`move` (which a CUDA graph can replay).
    """

    def __init__(self, arrays: list, total: int, every: int = 5, decay=cubic_lookahead_decay):
        if not arrays:
            raise ValueError("Lookahead needs at least one array to average")
        period = as_int(every)
        if period is None or period < 1:
            raise ValueError(f"Lookahead: every must be a positive integer, got {every!r}")
        xp = namespace(*arrays)
        self.fast = list(arrays)
        self.slow = [xp.asarray(a, copy=True) for a in arrays]
        self.every, self.total = period, total
        self.steps = 0  # training steps counted so far, on the host
        where, dtype = device(arrays[0]), arrays[0].dtype
        self._decay = xp.asarray([decay(k, total) for k in range(total + 1)], dtype=dtype, device=where)
        # the step of the last lookahead point, on the device, where a captured move reads it
        self._count = xp.zeros((), dtype=xp.int64, device=where)
        # a device array, so that xp.minimum bounds the counter without reading it back to the host
        # (array-api-compat's clip does, on CuPy, and a captured graph forbids that)
        self._last = xp.asarray(total, dtype=xp.int64, device=where)

    @property
    def arrays(self) -> tuple:
        """The device arrays a captured :meth:`move` reads."""
        return (self._count, self._decay)

    def count(self) -> bool:
        """Count one training step (host work only); True when it ends at a lookahead
        point, where :meth:`move` is due."""
        self.steps += 1
        return self.steps % self.every == 0

    def move(self) -> None:
        """The work of a lookahead point, on the device only: advance the device counter to
        it, then move the slow copies towards the fast arrays and the fast arrays onto them."""
        xp = namespace(self._count)
        self._count += self.every  # in place: a replayed graph advances it too
        position = xp.reshape(xp.minimum(self._count, self._last), (1,))
        step = 1 - xp.reshape(xp.take(self._decay, position), ())
        fused = accelerated(self._count)
        for fast, slow in zip(self.fast, self.slow):
            if fused is not None and fast.dtype == step.dtype:
                fused.lookahead(fast, slow, step)  # one pass where the reference takes four
            else:
                slow += step * (fast - slow)
                fast[...] = slow

    def step(self) -> None:
        """Count one training step and, at a lookahead point, :meth:`move`."""
        if self.count():
            self.move()

    def finish(self) -> None:
        """The end of training: the fast arrays take the slow ones."""
        for fast, slow in zip(self.fast, self.slow):
            fast[...] = slow
