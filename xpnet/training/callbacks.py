"""Callbacks: what happens at the Solver's logging points and epoch ends.

A callback gets the Solver and, at a logging point, a record of Python numbers:
``{'iteration', 'epoch', 'loss'}`` every ``print_every`` iterations and
``{'iteration', 'epoch', 'train_acc', 'val_acc'}`` at each accuracy check.
``on_log`` returning ``False`` ends training at that point (the best parameters
are restored, as at any end). Callbacks must not read device arrays: a value
that crosses to the host between logging points costs a synchronisation.
"""

from __future__ import annotations

import math
import sys

from ..checkpoint import save_checkpoint, unwritable_reason
from ..input_checks import as_int, file_path, is_array, is_number
from .interrupts import interrupts_held

__all__ = ["Callback", "ConsoleReport", "LogFunction", "Checkpointer", "EarlyStopping", "asks_to_stop"]


class Callback:
    """Base class: override the hooks you need."""

    def on_train_begin(self, solver) -> None:
        """When ``train()`` starts, before its first step; ``solver.epoch`` and ``solver.iteration``
        say where (not at 0 after a resume, or in a second ``train()``)."""

    def on_step(self, solver) -> None:
        """After every step (host only; keep it cheap). Only overridden hooks are called."""

    def on_log(self, solver, record: dict) -> bool | None:
        """At a logging point; return False to stop training."""

    def on_epoch_end(self, solver) -> None:
        """After each whole epoch, once its accuracies are in ``solver.val_acc_history`` and the
        learning rate is decayed; not after an epoch that diverged."""

    def on_train_end(self, solver) -> None:
        """When training ends: every epoch done, stopped by ``on_log`` or diverged; before the best
        parameters go into the model. Not after an exception (Ctrl-C), which ``train()`` raises."""


def asks_to_stop(callback: Callback, answer) -> bool:
    """Whether ``callback.on_log``'s ``answer`` stops training: False does, as NumPy's False
    (``np.isfinite(record['loss'])`` returns one) and 0 do; None and True go on. Anything else
    is a TypeError naming the callback: a test of ``is False`` let NumPy's False go on in silence."""
    if answer is None or isinstance(answer, bool):
        return answer is False
    if is_number(answer) or (is_array(answer) and answer.ndim == 0):
        return not bool(answer)  # a 0-d array or NumPy scalar: a logging point, so the read is paid for
    function = callback.function if isinstance(callback, LogFunction) else type(callback).__name__
    raise TypeError(
        f"on_log of {getattr(function, '__name__', function)!s} must return None, True or False "
        f"(False stops training), got {type(answer).__name__}"
    )


class ConsoleReport(Callback):
    """The course's printed lines, a progress bar (tqdm) and the divergence message.

    Args:
        verbose: print the loss and accuracy lines.
        progress: draw a progress bar; None means when verbose and on a terminal.
    """

    def __init__(self, verbose=True, progress=None):
        self.verbose = verbose
        self.progress = progress
        self._bar = None

    def say(self, text: str) -> None:
        (self._bar.write if self._bar is not None else print)(text)

    def on_train_begin(self, solver):
        total = solver.num_iterations
        show = self.progress if self.progress is not None else (self.verbose and sys.stderr.isatty())
        if show and solver.iteration < total:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=solver.iteration, unit="it", leave=False, dynamic_ncols=True)

    def on_step(self, solver):
        if self._bar is not None:
            self._bar.update(1)

    def on_log(self, solver, record):
        if not self.verbose:
            return
        if "loss" in record:
            self.say(f"(Iteration {record['iteration']} / {solver.num_iterations}) loss: {record['loss']:f}")
        if "val_acc" in record:
            self.say(
                f"(Epoch {record['epoch']} / {solver.num_epochs}) "
                f"train acc: {record['train_acc']:f}; val_acc: {record['val_acc']:f}"
            )

    def on_train_end(self, solver):
        if self.verbose and solver.diverged:
            self.say(solver.diverged)
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class LogFunction(Callback):
    """The Solver's ``on_log`` argument: a function of the record (False stops training)."""

    def __init__(self, function):
        self.function = function

    def on_log(self, solver, record):
        return self.function(record)


class Checkpointer(Callback):
    """Writes ``<name>_epoch_<n>.npz`` after each epoch, atomically (the Solver stops
    before an epoch end whose parameters are not finite, so none is ever written)."""

    def __init__(self, name: str):
        self.name = file_path("Solver", "checkpoint_name", name)  # "~/runs/net" means the home folder's
        # Checked now: a name that can never be written would fail only after the first epoch.
        self._check_writable(0)

    def on_train_begin(self, solver):
        # A file this run will write that was made read-only (kept from an earlier run) would end it
        # at that epoch; checked now, after resume() or a change of num_epochs has set the range.
        for epoch in range(solver.epoch + 1, solver.num_epochs + 1):
            self._check_writable(epoch)

    def _path(self, epoch: int) -> str:
        return f"{self.name}_epoch_{epoch}.npz"

    def _check_writable(self, epoch: int) -> None:
        reason = unwritable_reason(self._path(epoch))
        if reason is not None:
            raise ValueError(f"checkpoint_name {self.name!r}: checkpoints cannot be written there ({reason})")

    def on_epoch_end(self, solver):
        path = self._path(solver.epoch)
        payload = solver.checkpoint()
        # Ctrl-C waits for the file and the record of it, so the run reports the newest file.
        with interrupts_held():
            save_checkpoint(path, payload)
            solver.last_checkpoint = path


class EarlyStopping(Callback):
    """Stops when the validation accuracy has not improved by more than ``min_delta``
    for ``patience`` accuracy checks in a row (the best parameters are then restored).
    Each ``train()`` counts afresh, so one instance may serve several Solvers (a search loop)."""

    def __init__(self, patience: int = 3, min_delta: float = 0.0):
        checks = as_int(patience)
        if checks is None or checks < 1:
            raise ValueError(f"patience must be an integer of at least 1, got {patience!r}")
        if not is_number(min_delta) or not math.isfinite(min_delta) or min_delta < 0:
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        self.patience, self.min_delta = checks, float(min_delta)
        self.best, self.waited = None, 0

    def on_train_begin(self, solver):
        # Another Solver's best would stop this one at its first check.
        self.best, self.waited = None, 0

    def on_log(self, solver, record):
        if "val_acc" not in record:
            return None
        if self.best is None or record["val_acc"] > self.best + self.min_delta:
            self.best, self.waited = record["val_acc"], 0
            return None
        self.waited += 1
        return self.waited < self.patience
