"""Solver: minibatch training of a model with an update rule from xpnet.optim,
with the whole loop on the model's device.

The data set is moved to the device once; minibatch indices are drawn there by
the backend's generator; the loss stays on the device. Values cross to the
host only at logging points (every ``print_every`` iterations, each accuracy
check) and when ``train`` returns its histories as Python floats.
"""

from __future__ import annotations

import math
import numbers
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
        checkpoint_name (None): write ``<name>_epoch_<n>.npz`` after each epoch
            (atomically; never with non-finite parameters). ``last_checkpoint``
            holds the path of the newest one.
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
        optim.check_config(_rule_name(self.update_rule), self.optim_config)
        for name, value in settings.items():
            setattr(self, name, value)
        _check_settings(self)

        if self.cuda_graph:
            if not self.backend.can_capture:
                raise ValueError(
                    f"cuda_graph=True needs the cupy backend; backend {self.backend.name!r} cannot capture CUDA graphs"
                )
        num_classes = getattr(model, "num_classes", None)
        input_dim = getattr(model, "input_dim", None)
        for split in ("train", "val"):
            validate_split(data, split, num_classes, input_dim)
        if self.batch_size > data["X_train"].shape[0]:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the training set ({data['X_train'].shape[0]} rows)"
            )
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
        self.last_checkpoint = None
        self.resume_changes = []
        self.optim_configs = {name: dict(self.optim_config) for name in self.model.params}
        self._reset_finite_flag()
        self._graph = self._graph_rng = None
        self._warmed_up = False

    def _reset_finite_flag(self):
        """A device-side flag, ANDed with isfinite(loss) at every step and read only at
        logging points, so a loss that turns NaN or infinite between them is still caught."""
        xp = self.backend.xp
        self._all_finite = xp.ones((), dtype=xp.bool, device=self.backend.device)
        self._known_finite_until = self.iteration  # the last iteration the flag was seen true

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
        self._all_finite &= self.backend.xp.isfinite(loss)  # in place: a captured graph updates it too
        params = self.model.params
        for name, w in params.items():
            params[name], self.optim_configs[name] = self.update_rule(w, grads[name], self.optim_configs[name])
        return loss

    def check_accuracy(self, X, y, num_samples=None, batch_size=100, rng=None) -> float:
        """Accuracy of the model on (X, y), on at most ``num_samples`` rows drawn at random.

        Predictions are made in batches of ``batch_size`` on the device; the
        returned Python float is the one value that crosses to the host.
        """
        return float(self._accuracy(X, y, num_samples, batch_size, rng))

    def _accuracy(self, X, y, num_samples=None, batch_size=100, rng=None):
        """:meth:`check_accuracy` as a 0-d array on the device."""
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
        return accuracy(xp.concat(predictions), y)

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

            if t % self.print_every == 0:  # logging point: the loss and the finite flag cross to the host
                value, finite = self.backend.to_floats([loss, self._all_finite])
                if not (finite and math.isfinite(value)):
                    self._stop_diverged(num_iterations, say)
                    break
                self._known_finite_until = self.iteration
                if self.verbose:
                    say(f"(Iteration {t + 1} / {num_iterations}) loss: {value:f}")
                self._log(loss=value)

            epoch_end = (t + 1) % per_epoch == 0
            if epoch_end:
                self.epoch += 1
            if t == 0 or t == num_iterations - 1 or epoch_end:
                if not self._record_accuracies(sample_rng, say):
                    self._stop_diverged(num_iterations, say)
                    break
            if epoch_end:
                for config in self.optim_configs.values():
                    if "learning_rate" in config:  # set by every rule on its first call
                        config["learning_rate"] *= self.lr_decay
                self._save_checkpoint()
        if bar is not None:
            bar.close()
        self._losses_to_floats()
        if self.best_params:
            self.model.params = self.best_params
        return self

    def _record_accuracies(self, rng, say) -> bool:
        """Check accuracies and that the losses and parameters are finite, in one transfer.

        Returns False (recording nothing) when something is no longer finite.
        """
        xp = self.backend.xp
        train_acc = self._accuracy(self.X_train, self.y_train, num_samples=self.num_train_samples, rng=rng)
        val_acc = self._accuracy(self.X_val, self.y_val, num_samples=self.num_val_samples, rng=rng)
        finite = self._all_finite
        for w in self.model.params.values():
            finite = finite & xp.all(xp.isfinite(w))
        train_acc, val_acc, finite = self.backend.to_floats([train_acc, val_acc, finite])
        if not finite:
            return False
        self._known_finite_until = self.iteration
        self.train_acc_history.append(train_acc)
        self.val_acc_history.append(val_acc)
        if self.verbose:
            say(f"(Epoch {self.epoch} / {self.num_epochs}) train acc: {train_acc:f}; val_acc: {val_acc:f}")
        self._log(train_acc=train_acc, val_acc=val_acc)
        if val_acc > self.best_val_acc:
            self.best_val_acc = val_acc
            self.best_params = {k: xp.asarray(v, copy=True) for k, v in self.model.params.items()}
        return True

    def _log(self, **values):
        if self.on_log is not None:
            self.on_log({"iteration": self.iteration, "epoch": self.epoch, **values})

    def _stop_diverged(self, num_iterations, say):
        """Stop training: set ``diverged`` to what happened, where, and the likely cause; warn."""
        lr = next(iter(self.optim_configs.values()), {}).get("learning_rate")
        first, last = self._known_finite_until + 1, self.iteration
        where = f"at iteration {last}" if first >= last else f"between iterations {first} and {last}"
        epoch = (last - 1) // self.iterations_per_epoch + 1
        self.diverged = (
            f"training diverged {where} of {num_iterations} (epoch {epoch}): the loss or the "
            f"parameters became NaN or infinite; learning rate {lr}. Likely cause: {self._likely_cause(lr)}"
        )
        if self.verbose:
            say(self.diverged)
        warnings.warn(self.diverged, RuntimeWarning, stacklevel=3)

    def _likely_cause(self, lr) -> str:
        hyper = {f"model.{k}": getattr(self.model, k, None) for k in ("reg", "weight_scale", "std")}
        hyper.update({f"optim_config[{k!r}]": v for k, v in self.optim_config.items()})
        for name, value in hyper.items():
            if isinstance(value, numbers.Real) and not math.isfinite(value):
                return f"a non-finite hyper-parameter, {name} = {value}."
        if self._known_finite_until == 0:
            return (
                "the very first steps are non-finite: check the hyper-parameters (weight scale, reg) "
                f"and the input scale, then try a smaller learning rate than {lr}."
            )
        return f"the learning rate {lr} is too large; try a smaller one."

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
            "update_rule": _rule_name(self.update_rule),
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
        path = f"{self.checkpoint_name}_epoch_{self.epoch}.npz"
        save_checkpoint(path, self.checkpoint())
        self.last_checkpoint = path
        return path

    def resume(self, path, trust_pickle: bool = False):
        """Load a checkpoint written by this Solver (on any backend) and continue from it.

        The model's parameters and buffers, the optimizer state, histories and
        epoch are restored; ``train()`` then runs the remaining epochs up to
        ``num_epochs``. A checkpoint of another update rule or batch size is
        refused. This Solver's own settings (learning rate and the other
        optim_config values it was given, lr_decay, seed, num_epochs, ...) win
        over the checkpoint's: each difference is listed in ``resume_changes``
        (and printed when verbose). With the same settings the run continues
        exactly as an uninterrupted one would. ``trust_pickle`` allows reading a
        checkpoint of the old pickle format (which can run code: see
        :func:`xpnet.checkpoint.load_checkpoint`).
        """
        state = load_checkpoint(path, trust_pickle=trust_pickle)
        saved = state["settings"]
        mine = self._settings()
        for key in ("update_rule", "batch_size"):
            if saved[key] != mine[key]:
                raise ValueError(
                    f"checkpoint {str(path)!r} was trained with {key}={saved[key]!r}; "
                    f"this Solver has {key}={mine[key]!r}: resume with the same {key}"
                )
        self.model.load_state_dict(state["model"])
        dtype = self.model.dtype
        self.optim_configs = tree_to_device(state["optim_configs"], self.backend, dtype)
        self.best_params = tree_to_device(state["best_params"], self.backend, dtype)
        for key in ("epoch", "iteration", "best_val_acc"):
            setattr(self, key, state[key])
        for key in ("loss_history", "train_acc_history", "val_acc_history"):
            setattr(self, key, list(state[key]))
        self.resume_changes = self._apply_resume_settings(saved)
        if self.verbose:
            for change in self.resume_changes:
                print(f"resume: {change}")
        self.diverged = None
        self.last_checkpoint = str(path)
        self._reset_finite_flag()
        self._graph, self._warmed_up = None, False  # a captured graph would update the old arrays
        return self

    def _apply_resume_settings(self, saved) -> list:
        """Make this Solver's settings override the checkpoint's; describe each difference."""
        changes = []
        mine = self._settings()
        for key in ("lr_decay", "num_epochs", "seed", "num_train_samples", "num_val_samples", "print_every"):
            if saved.get(key) != mine[key]:
                changes.append(f"{key} = {mine[key]!r} (the checkpoint has {saved.get(key)!r})")
        saved_config = saved.get("optim_config") or {}
        passed = {k: v for k, v in self.optim_config.items() if saved_config.get(k) != v}
        for key, value in passed.items():
            changes.append(f"optim_config[{key!r}] = {value!r} (the checkpoint has {saved_config.get(key)!r})")
            if key != "learning_rate":
                for config in self.optim_configs.values():
                    config[key] = value
        if "learning_rate" in passed or saved.get("lr_decay") != self.lr_decay:
            # The learning rate this Solver's settings give at this epoch.
            for config in self.optim_configs.values():
                if "learning_rate" not in config:
                    continue
                base = self.optim_config.get("learning_rate")
                if base is None:  # the rule's default: undo the checkpoint's decay
                    base = config["learning_rate"] / saved["lr_decay"] ** self.epoch
                config["learning_rate"] = base * self.lr_decay**self.epoch
            current = next((c["learning_rate"] for c in self.optim_configs.values() if "learning_rate" in c), None)
            if current is not None:
                changes.append(f"learning rate at epoch {self.epoch}: {current:g}")
        return changes


def _rule_name(rule) -> str:
    return getattr(rule, "__name__", repr(rule))


def _check_settings(solver) -> None:
    """ValueError naming the setting for values that cannot be right."""
    for name, minimum in (("batch_size", 1), ("num_epochs", 0), ("print_every", 1)):
        value = getattr(solver, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            kind = "a positive integer" if minimum else "a non-negative integer"
            raise ValueError(f"{name} must be {kind}, got {value!r}")
    decay = solver.lr_decay
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not math.isfinite(decay) or decay <= 0:
        raise ValueError(f"lr_decay must be a finite number > 0, got {decay!r}")


def _resolve_update_rule(rule):
    if callable(rule):
        return rule
    if isinstance(rule, str) and rule in optim.UPDATE_RULES:
        return optim.UPDATE_RULES[rule]
    raise ValueError(f"unknown update_rule {rule!r}; use one of {', '.join(optim.UPDATE_RULES)} or a callable")
