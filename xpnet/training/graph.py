"""Replaying a training step from a CUDA graph (through :meth:`Backend.capture`).

What a captured step may read: device arrays only. Python numbers (a learning
rate as a float, a step count as an int) are frozen into the graph at capture;
anything that changes between steps must live on the device and be updated in
place. The graph is captured again whenever its ``key`` changes (the epoch's
generators, the update's learning-rate table and step counter, the model's
``graph_key``: its Python values that decide what a step computes), and never inside
the first call, which runs eagerly to create the optimizer state and compile kernels.
"""

from __future__ import annotations

__all__ = ["GraphReplay"]


class GraphReplay:
    """Runs ``step()`` eagerly once, then captures it and replays the capture."""

    def __init__(self, backend):
        if not backend.can_capture:
            raise ValueError(
                f"cuda_graph=True needs the cupy backend; backend {backend.name!r} cannot capture CUDA graphs"
            )
        self.backend = backend
        self.captures = 0  # steps captured so far: a check that capturing stays rare
        self.reset()

    def reset(self) -> None:
        """Forget the capture (and warm up again): the arrays it wrote to were replaced."""
        self._graph = self._key = None
        self._warmed_up = False

    def run(self, step, key):
        """What ``step`` returns (the loss: a 0-d device array the caller may keep), or None
        for a step that returns nothing."""
        if not self._warmed_up:
            self._warmed_up = True
            return step()
        if self._graph is None or not _same_key(key, self._key):
            self._graph = None  # its memory goes back before the new capture takes its own
            self._graph = self.backend.capture(step)
            self._key = key
            self.captures += 1
        loss = self._graph.replay()
        if loss is None:
            return None
        return self.backend.xp.asarray(loss, copy=True)  # the graph overwrites its output on the next replay


def _same_key(a, b) -> bool:
    return b is not None and len(a) == len(b) and all(x is y for x, y in zip(a, b))
