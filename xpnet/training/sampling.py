"""Samplers: which training rows make each minibatch, drawn on the device.

A sampler's :meth:`~Sampler.indices` does device work only, so it can run
inside a captured CUDA graph; :meth:`~Sampler.start_epoch` runs on the host
before an epoch's first step.
"""

from __future__ import annotations

__all__ = ["Sampler", "WithReplacement", "EpochPermutation", "make_sampler"]


class Sampler:
    """Draws the row indices of each minibatch.

    Args:
        num_rows: N, the training set's size; batch_size: B.
    """

    def __init__(self, num_rows: int, batch_size: int):
        self.num_rows = num_rows
        self.batch_size = batch_size

    @property
    def batches_per_epoch(self) -> int:
        raise NotImplementedError

    def start_epoch(self, rng) -> None:
        """Called on the host before an epoch's first step, with that epoch's generator."""

    def indices(self, rng):
        """(B,) int64 row indices on the device."""
        raise NotImplementedError


class WithReplacement(Sampler):
    """The course's sampling: B rows drawn uniformly with replacement at every step;
    an epoch is N // B steps, and one where B exceeds N, as in the course."""

    @property
    def batches_per_epoch(self) -> int:
        return max(self.num_rows // self.batch_size, 1)

    def indices(self, rng):
        return rng.integers(0, self.num_rows, self.batch_size)


class EpochPermutation(Sampler):
    """A fresh random permutation of the rows each epoch, cut into batches without
    replacement; the last partial batch is dropped (N // B steps per epoch).

    The position within the epoch is a counter on the device, so a captured step
    walks through the permutation on replay; each epoch's permutation and the reset
    counter are written into the same arrays, so one capture serves every epoch.
    """

    def __init__(self, num_rows: int, batch_size: int):
        if batch_size > num_rows:  # no batch without replacement: an epoch would have no step
            raise ValueError(
                f"batch_size={batch_size} is larger than the training set ({num_rows} rows), and the 'epoch' "
                "sampler draws each batch without replacement; use a smaller batch_size, or sampler='replacement'"
            )
        super().__init__(num_rows, batch_size)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // self.batch_size

    def start_epoch(self, rng) -> None:
        xp = rng.backend.xp
        order = rng.permutation(self.num_rows)
        if getattr(self, "_order", None) is None:
            self._order = order
            self._offsets = xp.arange(self.batch_size, dtype=xp.int64, device=rng.backend.device)
            self._start = xp.zeros((), dtype=xp.int64, device=rng.backend.device)
            return
        self._order[...] = order
        self._start[...] = 0

    def indices(self, rng):
        xp = rng.backend.xp
        rows = xp.take(self._order, self._start + self._offsets)
        self._start += self.batch_size  # in place: a replayed graph advances it too
        return rows


SAMPLERS = {"replacement": WithReplacement, "epoch": EpochPermutation}


def make_sampler(kind, num_rows: int, batch_size: int) -> Sampler:
    """A Sampler from its name ("replacement", "epoch"), a Sampler class, or an instance."""
    if isinstance(kind, Sampler):
        return kind
    if isinstance(kind, type) and issubclass(kind, Sampler):
        return kind(num_rows, batch_size)
    if isinstance(kind, str) and kind in SAMPLERS:  # a str only: a list here failed as "unhashable type"
        return SAMPLERS[kind](num_rows, batch_size)
    raise ValueError(f"unknown sampler {kind!r}; use one of {', '.join(SAMPLERS)} or a Sampler")
