"""The parts a :class:`xpnet.solver.Solver` is built from; each has one job.

- :mod:`.settings`: the Solver's settings as a dataclass, validated once.
- :mod:`.sampling`: which rows make each minibatch (drawn on the device).
- :mod:`.update`: the update rule over parameter groups, with the learning-rate
  schedule and the step counter held on the device.
- :mod:`.graph`: capturing a whole step as a CUDA graph and replaying it.
- :mod:`.guard`: the device-side "all finite so far" flag and what a divergence means.
- :mod:`.callbacks`: what happens at logging points and epoch ends (printing,
  the user's ``on_log``, checkpoints, early stopping).
- :mod:`.state`: what a checkpoint holds, and resuming from one.
"""

from .callbacks import Callback, Checkpointer, ConsoleReport, EarlyStopping, LogFunction
from .guard import DivergenceWarning
from .sampling import EpochPermutation, Sampler, WithReplacement
from .settings import SolverSettings
from .update import Update

__all__ = [
    "Callback",
    "Checkpointer",
    "ConsoleReport",
    "EarlyStopping",
    "LogFunction",
    "DivergenceWarning",
    "EpochPermutation",
    "Sampler",
    "WithReplacement",
    "SolverSettings",
    "Update",
]
