"""Solver: minibatch training of a model with an update rule from xpnet.optim,
with the whole loop on the model's device.

The data set is moved to the device once; minibatch indices are drawn there by
the backend's generator; the loss stays on the device. Values cross to the
host only at logging points (every ``print_every`` iterations, each accuracy
check) and when ``train`` returns its histories as Python floats.
"""

from __future__ import annotations

import math
import sys
import warnings

from . import optim
from .batching import accuracy, sample_minibatch
from .checkpoint import load_checkpoint, save_checkpoint, tree_to_device, tree_to_host
from .data_checks import validate_split

__all__ = ["Solver"]

_DEFAULTS = {
    "update_rule": "sgd",
    "optim_config": None,
    "lr_decay": 1.0,
    "batch_size": 100,
    "num_epochs": 10,
    "num_train_samples": 1000,
    "num_val_samples": None,
    "checkpoint_name": None,
    "print_every": 10,
    "verbose": True,
    "seed": None,
    "progress": None,
    "on_log": None,
    "cuda_graph": False,
}


class Solver:
    """Trains ``model`` on ``data`` (the course's Solver API).

    Args:
        model: an xpnet model with ``params``, ``loss(X, y=None)`` and ``backend``.
        data: dict with 'X_train' (N, ...), 'y_train' (N,), 'X_val', 'y_val':
            NumPy arrays or arrays of the model's backend. Validated once
            (matching lengths, integer labels in [0, num_classes), finite
            values) and moved to the model's device once.
    Keyword args (course names and defaults):
        update_rule: a name in xpnet.optim ('sgd', 'sgd_momentum',
            'sgd_nesterov_momentum', 'rmsprop', 'adam') or a callable.
        optim_config: hyperparameters for the update rule (copied per parameter).
        lr_decay (1.0): learning-rate factor applied after each epoch.
        batch_size (100), num_epochs (10).
        num_train_samples (1000): training rows used for each accuracy check.
        num_val_samples (None): validation rows used (None: all).
        checkpoint_name (None): write ``<name>_epoch_<n>.pkl`` after each epoch.
        print_every (10): iterations between loss log lines (logging points).
        verbose (True): print progress.
        seed (None): makes minibatches, accuracy subsamples and dropout
            masks reproducible (and a resumed run equal to an uninterrupted one).
        progress (None): show a progress bar; None means when verbose and on a terminal.
        on_log (None): called with a dict at each logging point: {'iteration',
            'epoch', 'loss'} every print_every iterations and {'iteration', 'epoch',
            'train_acc', 'val_acc'} at each accuracy check (all Python numbers).
        cuda_graph (False): capture one whole training step (sampling, forward,
            backward, update) as a CUDA graph and replay it, removing the launch
            overhead (cupy backend only). The graph is recaptured at each epoch
            start, when the learning rate and generators change; the first step
            runs eagerly to create the optimizer state.
    """

    def __init__(self, model, data, **kwargs):
        unknown = sorted(set(kwargs) - set(_DEFAULTS))
        if unknown:
            raise ValueError(f"Unrecognized arguments {', '.join(unknown)}; valid ones: {', '.join(_DEFAULTS)}")
        settings = {**_DEFAULTS, **kwargs}
        self.model = model
        self.backend = model.backend
        self.update_rule = _resolve_update_rule(settings.pop("update_rule"))
        self.optim_config = dict(settings.pop("optim_config") or {})
        for name, value in settings.items():
            setattr(self, name, value)
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.num_epochs, int) or self.num_epochs < 0:
            raise ValueError(f"num_epochs must be a non-negative integer, got {self.num_epochs!r}")
        if not isinstance(self.print_every, int) or self.print_every <= 0:
            raise ValueError(f"print_every must be a positive integer, got {self.print_every!r}")

        if self.cuda_graph:
            if not self.backend.can_capture:
                raise ValueError(
                    f"cuda_graph=True needs the cupy backend; backend {self.backend.name!r} cannot capture CUDA graphs"
                )
        num_classes = getattr(model, "num_classes", None)
        input_dim = getattr(model, "input_dim", None)
        for split in ("train", "val"):
            validate_split(data, split, num_classes, input_dim)
        # The one move of the data set to the device.
        self.X_train = model.prepare_inputs(data["X_train"])
        self.y_train = model.prepare_labels(data["y_train"])
        self.X_val = model.prepare_inputs(data["X_val"])
        self.y_val = model.prepare_labels(data["y_val"])
        self._reset()

    # ------------------------------------------------------------------ state
    def _reset(self):
        self.epoch = 0
        self.iteration = 0
        self.best_val_acc = 0.0
        self.best_params = {}
        self.loss_history = []
        self.train_acc_history = []
        self.val_acc_history = []
        self.diverged = None
        self.optim_configs = {name: dict(self.optim_config) for name in self.model.params}
        self._graph = self._graph_rng = None
        self._warmed_up = False

    @property
    def iterations_per_epoch(self) -> int:
        return max(self.X_train.shape[0] // self.batch_size, 1)

    def _epoch_rngs(self, epoch: int):
        """Generators for one epoch, derived from (seed, epoch) so a resumed run
        draws exactly what an uninterrupted one would."""
        if self.seed is None:
            return self.backend.rng(), self.backend.rng()
        self.backend.seed((self.seed, epoch, 1))  # dropout masks and other draws of the model
        return self.backend.rng((self.seed, epoch, 0)), self.backend.rng((self.seed, epoch, 2))

    # ------------------------------------------------------------------ training
    def step(self, rng):
        """One training step: a minibatch drawn by ``rng`` on the device, forward,
        backward, update. Returns the loss as a 0-d device array."""
        if not self.cuda_graph:
            return self._step(rng)
        if not self._warmed_up:  # creates the optimizer state and compiles the kernels
            self._warmed_up = True
            return self._step(rng)
        if self._graph is None or rng is not self._graph_rng:  # the graph draws from the rng it captured
            self._graph = self.backend.capture(lambda: self._step(rng))
            self._graph_rng = rng
        loss = self._graph.replay()
        return self.backend.xp.asarray(loss, copy=True)  # the graph overwrites its output

    def _step(self, rng):
        """One update on a minibatch drawn on the device; returns the loss (0-d, on the device)."""
        X_batch, y_batch = sample_minibatch(self.X_train, self.y_train, rng, self.batch_size)
        loss, grads = self.model.loss(X_batch, y_batch)
        params = self.model.params
        for name, w in params.items():
            params[name], self.optim_configs[name] = self.update_rule(w, grads[name], self.optim_configs[name])
        return loss

    def check_accuracy(self, X, y, num_samples=None, batch_size=100, rng=None) -> float:
        """Accuracy of the model on (X, y), on at most ``num_samples`` rows drawn at random.

        Predictions are made in batches of ``batch_size`` on the device; the
        returned Python float is the one value that crosses to the host.
        """
        model, xp = self.model, self.backend.xp
        X, y = model.prepare_inputs(X), model.prepare_labels(y)
        n = X.shape[0]
        if num_samples is not None and n > num_samples:
            rng = rng or self.backend.default_rng()
            X, y = sample_minibatch(X, y, rng, num_samples)
            n = num_samples
        predictions = [
            xp.argmax(model.loss(X[start : min(start + batch_size, n), ...]), axis=1)
            for start in range(0, n, batch_size)
        ]
        return float(accuracy(xp.concat(predictions), y))

    def train(self):
        """Run the optimisation for ``num_epochs`` (continuing after :meth:`resume`).

        At the end the best parameters (by validation accuracy) are swapped into
        the model and ``loss_history``, ``train_acc_history`` and
        ``val_acc_history`` are lists of Python floats.
        """
        per_epoch = self.iterations_per_epoch
        num_iterations = self.num_epochs * per_epoch
        bar = self._progress_bar(num_iterations)
        say = bar.write if bar is not None else print
        rng = sample_rng = None
        for t in range(self.iteration, num_iterations):
            if rng is None or t % per_epoch == 0:
                rng, sample_rng = self._epoch_rngs(t // per_epoch)
                self._graph = None  # new generators and learning rate: capture again
            loss = self.step(rng)
            self.loss_history.append(loss)
            self.iteration = t + 1
            if bar is not None:
                bar.update(1)

            if t % self.print_every == 0:  # logging point: the loss crosses to the host
                value = float(loss)
                if not math.isfinite(value):
                    self._stop_diverged(t, value, num_iterations, say)
                    break
                if self.verbose:
                    say(f"(Iteration {t + 1} / {num_iterations}) loss: {value:f}")
                self._log(loss=value)

            epoch_end = (t + 1) % per_epoch == 0
            if epoch_end:
                self.epoch += 1
                for config in self.optim_configs.values():
                    if "learning_rate" in config:  # set by every rule on its first call
                        config["learning_rate"] *= self.lr_decay
            if t == 0 or t == num_iterations - 1 or epoch_end:
                self._record_accuracies(sample_rng, say)
                if epoch_end:
                    self._save_checkpoint()
        if bar is not None:
            bar.close()
        self._losses_to_floats()
        if self.best_params:
            self.model.params = self.best_params
        return self

    def _record_accuracies(self, rng, say):
        train_acc = self.check_accuracy(self.X_train, self.y_train, num_samples=self.num_train_samples, rng=rng)
        val_acc = self.check_accuracy(self.X_val, self.y_val, num_samples=self.num_val_samples, rng=rng)
        self.train_acc_history.append(train_acc)
        self.val_acc_history.append(val_acc)
        if self.verbose:
            say(f"(Epoch {self.epoch} / {self.num_epochs}) train acc: {train_acc:f}; val_acc: {val_acc:f}")
        self._log(train_acc=train_acc, val_acc=val_acc)
        if val_acc > self.best_val_acc:
            self.best_val_acc = val_acc
            xp = self.backend.xp
            self.best_params = {k: xp.asarray(v, copy=True) for k, v in self.model.params.items()}

    def _log(self, **values):
        if self.on_log is not None:
            self.on_log({"iteration": self.iteration, "epoch": self.epoch, **values})

    def _stop_diverged(self, t, value, num_iterations, say):
        lr = next(iter(self.optim_configs.values()), {}).get("learning_rate")
        self.diverged = (
            f"training diverged at iteration {t + 1} / {num_iterations} (epoch {self.epoch + 1}): "
            f"loss is {value}; learning rate {lr}. Try a smaller learning rate."
        )
        if self.verbose:
            say(self.diverged)
        warnings.warn(self.diverged, RuntimeWarning, stacklevel=3)

    def _losses_to_floats(self):
        """Turn the losses still on the device into Python floats, in one transfer."""
        pending = [i for i, v in enumerate(self.loss_history) if not isinstance(v, float)]
        values = self.backend.to_floats([self.loss_history[i] for i in pending])
        for i, v in zip(pending, values):
            self.loss_history[i] = v

    def _progress_bar(self, total):
        show = self.progress if self.progress is not None else (self.verbose and sys.stderr.isatty())
        if not show or self.iteration >= total:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=self.iteration, unit="it", leave=False, dynamic_ncols=True)

    # ------------------------------------------------------------------ checkpoints
    def _settings(self) -> dict:
        return {
            "update_rule": getattr(self.update_rule, "__name__", repr(self.update_rule)),
            "optim_config": self.optim_config,
            "lr_decay": self.lr_decay,
            "batch_size": self.batch_size,
            "num_epochs": self.num_epochs,
            "num_train_samples": self.num_train_samples,
            "num_val_samples": self.num_val_samples,
            "print_every": self.print_every,
            "seed": self.seed,
        }

    def checkpoint(self) -> dict:
        """Everything needed to continue training, as host data (NumPy arrays, floats)."""
        self._losses_to_floats()
        return {
            "model": self.model.state_dict(),
            "optim_configs": tree_to_host(self.optim_configs, self.backend),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "loss_history": list(self.loss_history),
            "train_acc_history": list(self.train_acc_history),
            "val_acc_history": list(self.val_acc_history),
            "best_val_acc": self.best_val_acc,
            "best_params": tree_to_host(self.best_params, self.backend),
            # The generators are re-derived from (seed, epoch): this is their whole state.
            "rng": {"seed": self.seed, "epoch": self.epoch},
            "settings": self._settings(),
        }

    def _save_checkpoint(self):
        if self.checkpoint_name is None:
            return None
        path = f"{self.checkpoint_name}_epoch_{self.epoch}.pkl"
        save_checkpoint(path, self.checkpoint())
        return path

    def resume(self, path):
        """Load a checkpoint written by this Solver (on any backend) and continue from it.

        The model's parameters and buffers, the optimizer state, histories,
        epoch and seed are restored; ``train()`` then runs the remaining epochs
        up to ``num_epochs``.
        """
        state = load_checkpoint(path)
        saved = state["settings"]
        if saved["batch_size"] != self.batch_size:
            raise ValueError(
                f"checkpoint {path!r} was trained with batch_size={saved['batch_size']}, "
                f"this Solver has batch_size={self.batch_size}"
            )
        self.model.load_state_dict(state["model"])
        dtype = self.model.dtype
        self.optim_configs = tree_to_device(state["optim_configs"], self.backend, dtype)
        self.best_params = tree_to_device(state["best_params"], self.backend, dtype)
        for key in ("epoch", "iteration", "best_val_acc"):
            setattr(self, key, state[key])
        for key in ("loss_history", "train_acc_history", "val_acc_history"):
            setattr(self, key, list(state[key]))
        self.seed = state["rng"]["seed"]
        self.diverged = None
        self._graph, self._warmed_up = None, False  # a captured graph would update the old arrays
        return self


def _resolve_update_rule(rule):
    if callable(rule):
        return rule
    if isinstance(rule, str) and rule in optim.UPDATE_RULES:
        return optim.UPDATE_RULES[rule]
    raise ValueError(f"unknown update_rule {rule!r}; use one of {', '.join(optim.UPDATE_RULES)} or a callable")
