"""Solver: minibatch training of a model (the course's API), with the whole loop on
the model's device. The loop lives here; everything else is a part from
:mod:`xpnet.training` (settings, sampler, update, graph replay, finite guard,
callbacks, checkpoint state).

The data set is moved to the device once; minibatch indices are drawn there; the
loss stays there. Values cross to the host only at logging points (every
``print_every`` iterations, each accuracy check) and when ``train`` returns its
histories as Python floats.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

from .backend import check_generator
from .batching import model_accuracy
from .data_checks import checked_labelled_set
from .input_checks import as_int, file_path
from .model import (
    backend_for,
    buffer_arrays,
    copied_arrays,
    input_preparers,
    loss_and_grads,
    param_dtype,
    restore_buffer_arrays,
)
from .training import callbacks as cb
from .training.data import checked_rows, device_data
from .training.graph import GraphReplay
from .training.guard import FiniteGuard
from .training.sampling import make_sampler
from .training.settings import SolverSettings
from .training.state import restore_solver, solver_state
from .training.update import Update

__all__ = ["Solver"]

_SETTINGS = frozenset(SolverSettings.__dataclass_fields__)
# Settings read as training goes, which may change between train() calls; the others made the
# Solver's parts when it was made (its sampler, update, callbacks, graph), so a new value would not reach them.
_LIVE_SETTINGS = frozenset({"num_epochs", "print_every", "num_train_samples", "num_val_samples", "seed", "verbose",
                            "progress"})  # fmt: skip
_DATA = ("X_train", "y_train", "X_val", "y_val")  # the data on the device, in device_data's order


class Solver:
    """Trains ``model`` on ``data`` (the course's Solver API).

    Args:
        model: anything with ``params`` (dict of arrays) and ``loss(X, y=None)``;
            its backend and input conversion are inferred when it has none.
        data: dict with 'X_train' (N, ...), 'y_train' (N,), 'X_val', 'y_val': NumPy
            arrays or arrays of the model's backend; validated once (lengths,
            integer labels in [0, num_classes), finite values) and moved once.
        **kwargs: the course's settings (update_rule, optim_config, lr_decay,
            batch_size, num_epochs, num_train_samples, num_val_samples,
            checkpoint_name, print_every, verbose) and xpnet's (lr_schedule,
            param_groups, sampler, seed, progress, on_log, callbacks, cuda_graph):
            see :class:`~xpnet.training.SolverSettings` for each. They read as
            attributes, ``solver.num_epochs``; those read as training goes
            (num_epochs, print_every, the sample counts, seed, verbose, progress) may be
            set between train() calls, checked as here, and the others are fixed.
    """

    def __init__(self, model, data, **kwargs):
        object.__setattr__(self, "settings", SolverSettings.from_kwargs(kwargs))
        self.model, self.backend = model, backend_for(model)
        self.graph = GraphReplay(self.backend) if self.cuda_graph else None
        self.prepare_inputs, self.prepare_labels = input_preparers(model, self.backend)
        # The sampler before the move: one that cannot draw such batches from these rows says so first.
        # (the setting becomes the Sampler it names: solver.sampler)
        self.settings.sampler = make_sampler(self.settings.sampler, checked_rows(data, model), self.batch_size)
        for name, array in zip(_DATA, device_data(data, self.prepare_inputs, self.prepare_labels)):
            object.__setattr__(self, name, array)  # fixed from here on: see __setattr__
        # What runs at logging points and epoch ends: built from the settings, then the user's.
        # The Checkpointer first: its check of the files to come ends train() before a progress bar is drawn.
        self._console = cb.ConsoleReport(self.verbose, self.progress)
        self._callbacks = [cb.Checkpointer(self.checkpoint_name)] if self.checkpoint_name else []
        self._callbacks += [self._console]
        self._callbacks += [cb.LogFunction(self.on_log)] if self.on_log is not None else []
        self._callbacks += self.settings.callbacks
        self._reset()

    def __getattr__(self, name):  # the settings read as attributes, as in the course
        if name in _SETTINGS:
            return getattr(self.settings, name)
        raise AttributeError(f"'Solver' object has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in _DATA:  # the sampler was built for these rows, and they were checked and moved once
            raise AttributeError(
                f"Solver.{name} is fixed once the Solver is made (the data were checked, moved to the device "
                "and sampled from as they were then); give new data to a new Solver, Solver(model, data, ...)"
            )
        if name not in _SETTINGS:
            object.__setattr__(self, name, value)
            return
        if name not in _LIVE_SETTINGS:
            raise AttributeError(
                f"Solver.{name} is fixed once the Solver is made (its sampler, update rule and callbacks "
                f"were built from it); give {name}={value!r} to a new Solver. These may change between "
                f"train() calls: {', '.join(sorted(_LIVE_SETTINGS))}"
            )
        # checked as the constructor checks it (print_every=0 would fail at the first step)
        object.__setattr__(self, "settings", dataclasses.replace(self.settings, **{name: value}))
        if name in ("verbose", "progress"):
            setattr(self._console, name, value)

    def _reset(self):
        self.epoch = self.iteration = 0
        self.best_val_acc, self.best_params, self.best_buffers = 0.0, {}, []
        self.loss_history, self.train_acc_history, self.val_acc_history = [], [], []
        self.diverged = self.last_checkpoint = self._rngs = None
        self.resume_changes, self._stop_requested = [], False
        s = self.settings
        self.update = Update(s.update_rule, s.optim_config, list(self.model.params), self.iterations_per_epoch,
                             s.param_groups, s.lr_decay, s.lr_schedule, on_device=s.cuda_graph)  # fmt: skip
        self.optim_configs = self.update.configs
        self.guard = FiniteGuard(self.backend)

    @property
    def iterations_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    @property
    def num_iterations(self) -> int:
        return self.num_epochs * self.iterations_per_epoch

    # ------------------------------------------------------------------ training
    def _start_epoch(self, epoch: int):
        """Generators for one epoch from (seed, epoch): a resumed run draws what an uninterrupted one would.
        Without a seed, the backend's shared generator (on NumPy, np.random's: the course's Solver draws there)."""
        if self.seed is None:
            self._rngs = [self.backend.default_rng()] * 3
        else:  # sampling, the model's draws, accuracy subsamples
            self._rngs = [self.backend.rng((self.seed, epoch, k)) for k in range(3)]
        self.sampler.start_epoch(self._rngs[0])
        if hasattr(self.model, "rng"):
            self.model.rng = self._rngs[1]

    def step(self, rng=None):
        """One training step on a minibatch drawn by ``rng`` (default: this epoch's); the loss, 0-d on the device."""
        if rng is None:
            if self._rngs is None:
                self._start_epoch(self.epoch)
            rng = self._rngs[0]
        else:
            check_generator("Solver.step: rng", rng, self.backend, "the model", "")
        if self.update.on_device and self.update.step_counter is None:
            self.update.start(self.backend, param_dtype(self.model), self.iteration, self.num_iterations)
        if self.graph is None:
            return self._step(rng)
        key = (rng, *self.update.arrays, self.guard.flag, *getattr(self.model, "graph_key", ()))
        return self.graph.run(lambda: self._step(rng), key=key)

    def _step(self, rng):
        rows, xp = self.sampler.indices(rng), self.backend.xp
        result = self.model.loss(xp.take(self.X_train, rows, axis=0), xp.take(self.y_train, rows, axis=0))
        loss, grads = loss_and_grads(result, self.backend)
        self.guard.observe(loss)
        self.update.apply(self.model.params, grads)
        return loss

    def check_accuracy(self, X, y, num_samples=None, batch_size=100, rng=None) -> float:
        """Accuracy on at most ``num_samples`` rows of (X, y) drawn at random, predicted in batches on the device.
        X and y are checked as the training data are (labels in [0, num_classes), finite X of the model's shape).
        ``rng`` draws the rows: a seed, a generator of the backend (``backend.rng(seed)``), or None for
        the backend's shared one."""
        X, y = checked_labelled_set(X, y, self.model, self.prepare_inputs, self.prepare_labels, "check_accuracy")
        if rng is not None and not hasattr(rng, "integers"):  # a seed, or a slip named here, not in the draw
            seed = as_int(rng)
            if seed is None or seed < 0:
                raise ValueError(
                    f"check_accuracy: rng must be a seed (an integer >= 0), a generator (backend.rng(seed)) "
                    f"or None, got {rng!r}"
                )
            rng = self.backend.rng(seed)
        return float(self._accuracy(X, y, num_samples, batch_size, rng))

    def _accuracy(self, X, y, num_samples=None, batch_size=100, rng=None):
        X, y, rng = self.prepare_inputs(X), self.prepare_labels(y), rng or self.backend.default_rng()
        return model_accuracy(self.model.loss, X, y, num_samples, batch_size, rng)

    def stop(self) -> None:
        """End training at the next logging point (the best parameters are then restored)."""
        self._stop_requested = True

    def train(self):
        """Run the optimisation for ``num_epochs`` (continuing after :meth:`resume`); at
        the end the best parameters (by validation accuracy) are swapped into the model."""
        per_epoch, total = self.iterations_per_epoch, self.num_iterations
        if self.iteration >= total and total > 0:  # a finished run, or one resumed at or past num_epochs
            warnings.warn(
                f"train(): nothing to train: this Solver has run {self.epoch} epochs of num_epochs={self.num_epochs}; "
                "raise num_epochs to train on",
                UserWarning,
                stacklevel=2,
            )
        self._stop_requested = False
        self.update.start(self.backend, param_dtype(self.model), self.iteration, total)
        step_hooks = [c for c in self._callbacks if type(c).on_step is not cb.Callback.on_step]
        self._emit("on_train_begin")
        try:
            for t in range(self.iteration, total):
                if self._rngs is None or t % per_epoch == 0:
                    self._start_epoch(t // per_epoch)
                loss = self.step()
                self.loss_history.append(loss)
                self.iteration = t + 1
                for hook in step_hooks:
                    hook.on_step(self)
                finite = self._log_loss(loss) if t % self.print_every == 0 else True
                epoch_end = self.iteration % per_epoch == 0
                self.epoch += 1 if epoch_end else 0
                if finite and (t == 0 or t == total - 1 or epoch_end):
                    finite = self._record_accuracies()
                if not finite:
                    self.diverged = self.guard.diverged(self)
                    break
                if epoch_end:
                    self.update.set_host_learning_rates(self.iteration)
                    self._emit("on_epoch_end")
                if self._stop_requested:
                    break
        except BaseException:
            self._leave_interrupted()
            raise
        self._emit("on_train_end")
        self._losses_to_floats()
        if self.best_params:
            # Copies: the update rules change the model's arrays in place, and a later train()
            # (more epochs) would otherwise overwrite the best parameters it kept.
            self.model.params = copied_arrays(self.best_params)
            # with the running averages the best validation accuracy was scored with
            restore_buffer_arrays(self.model, self.best_buffers)
        return self

    def _leave_interrupted(self):
        """After Ctrl-C (or an error) mid-training: the progress bar closed and the losses so far
        as floats, for plotting; the model keeps its current parameters, and ``train()`` goes on
        from the last finished step."""
        self._console.on_train_end(self)
        try:
            self._losses_to_floats()
        except Exception:  # a failing device cannot give them; the exception that stopped training says why
            pass

    def _log_loss(self, loss) -> bool:
        """Logging point: the loss and the finite flag cross to the host together; False if not finite."""
        value, finite = self.backend.to_floats([loss, self.guard.flag])
        if not (finite and math.isfinite(value)):
            return False
        self.guard.confirm(self.iteration)
        self._log(loss=value)
        return True

    def _record_accuracies(self) -> bool:
        """Accuracies, and that losses and parameters are finite, in one transfer; False if not finite."""
        # Batches of 500 rows: a check is a few launches, not one per 100 rows.
        train_acc = self._accuracy(self.X_train, self.y_train, self.num_train_samples, 500, self._rngs[2])
        val_acc = self._accuracy(self.X_val, self.y_val, self.num_val_samples, 500, self._rngs[2])
        finite = self.guard.flag_with(self.model.params)
        train_acc, val_acc, finite = self.backend.to_floats([train_acc, val_acc, finite])
        if not finite:
            return False
        self.guard.confirm(self.iteration)
        self.train_acc_history.append(train_acc)
        self.val_acc_history.append(val_acc)
        if val_acc > self.best_val_acc:
            self.best_val_acc = val_acc
            self.best_params = copied_arrays(self.model.params)
            self.best_buffers = buffer_arrays(self.model)
        self._log(train_acc=train_acc, val_acc=val_acc)
        return True

    def _log(self, **values):
        record = {"iteration": self.iteration, "epoch": self.epoch, **values}
        for callback in self._callbacks:
            if cb.asks_to_stop(callback, callback.on_log(self, record)):
                self._stop_requested = True

    def _emit(self, hook: str):
        for callback in self._callbacks:
            getattr(callback, hook)(self)

    def _losses_to_floats(self):
        """Turn the losses still on the device into Python floats, in one transfer."""
        pending = [i for i, v in enumerate(self.loss_history) if not isinstance(v, float)]
        for i, v in zip(pending, self.backend.to_floats([self.loss_history[i] for i in pending])):
            self.loss_history[i] = v

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> dict:
        """Everything needed to continue training, as host data (NumPy arrays, floats)."""
        self._losses_to_floats()
        return solver_state(self)

    def resume(self, path, trust_pickle: bool = False):
        """Continue from a checkpoint of this Solver (any backend's); another update rule or batch
        size is refused. This Solver's settings win: each difference from the checkpoint is in
        ``resume_changes`` (printed when verbose). ``trust_pickle``: read the old pickle format."""
        path = file_path("Solver.resume", "path", path)  # ~ expanded, for the messages and last_checkpoint
        self.resume_changes = restore_solver(self, path, trust_pickle)
        for change in self.resume_changes if self.verbose else ():
            print(f"resume: {change}")
        self.diverged, self.last_checkpoint, self._rngs = None, path, None
        self.guard = FiniteGuard(self.backend, self.iteration)
        if self.graph is not None:
            self.graph.reset()  # a captured graph would update the old arrays
        return self
