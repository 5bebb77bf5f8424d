"""The Solver's settings: the course's keyword arguments and xpnet's, validated once."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .. import optim
from ..input_checks import as_int, check_flag, check_seed, is_number
from .callbacks import Callback

__all__ = ["SolverSettings", "rule_name", "resolve_update_rule"]


def rule_name(rule) -> str:
    return rule if isinstance(rule, str) else getattr(rule, "__name__", repr(rule))


def resolve_update_rule(rule) -> Callable:
    if callable(rule):
        return rule
    if isinstance(rule, str) and rule in optim.UPDATE_RULES:
        return optim.UPDATE_RULES[rule]
    raise ValueError(f"unknown update_rule {rule!r}; use one of {', '.join(optim.UPDATE_RULES)} or a callable")


@dataclass
class SolverSettings:
    """Everything a :class:`~xpnet.solver.Solver` is told, with the course's defaults.

    Attributes:
        update_rule: a name in xpnet.optim ('sgd', 'sgd_momentum',
            'sgd_nesterov_momentum', 'rmsprop', 'adam') or a callable
            ``rule(w, dw, config) -> (w, config)``.
        optim_config: hyper-parameters of the rule (copied per parameter); unknown
            keys and a learning rate that is not a finite number > 0 are refused.
        lr_decay: factor on the learning rate after each epoch.
        lr_schedule: ``iteration -> factor`` on the learning rate, on top of
            lr_decay, evaluated on the device at every step (a captured CUDA graph
            follows it without being captured again).
        param_groups: list of ``{"params": names or callable(name), **hyper-parameters}``
            overriding optim_config for those parameters (e.g. a larger learning rate);
            a parameter may be in one group at most.
        batch_size, num_epochs: minibatch size and passes over the training set.
        num_train_samples, num_val_samples: rows used per accuracy check (None: all).
        sampler: 'replacement' (the course's: rows drawn with replacement, so a batch may
            be larger than the training set), 'epoch' (a permutation per epoch, last partial
            batch dropped; a batch at most the training set) or a Sampler.
        checkpoint_name: write ``<name>_epoch_<n>.npz`` after each epoch (atomically;
            never with non-finite parameters; one of them kept read-only is refused when
            ``train()`` starts).
        print_every: iterations between loss logging points.
        verbose: print the course's progress lines; progress: a progress bar (None:
            when verbose and on a terminal).
        seed: makes minibatches, accuracy subsamples and dropout masks reproducible
            (and a resumed run equal to an uninterrupted one). None: they come from the
            backend's shared generator, on NumPy np.random's (``np.random.seed`` repeats a run).
        on_log: called with a dict of Python numbers at each logging point; returning
            False ends training there (the best parameters are restored).
        callbacks: more :class:`~xpnet.training.Callback` objects.
        cuda_graph: capture a whole training step as a CUDA graph and replay it (cupy).
            The graph freezes the Python numbers the step reads; a model names those it
            may change during training in a ``graph_key`` property (see
            :attr:`xpnet.model.Model.graph_key`), and a change captures the step again.
    """

    update_rule: Any = "sgd"
    optim_config: dict | None = None
    lr_decay: float = 1.0
    lr_schedule: Callable[[int], float] | None = None
    param_groups: list | None = None
    batch_size: int = 100
    num_epochs: int = 10
    num_train_samples: int | None = 1000
    num_val_samples: int | None = None
    sampler: Any = "replacement"
    checkpoint_name: str | None = None
    print_every: int = 10
    verbose: bool = True
    seed: Any = None
    progress: bool | None = None
    on_log: Callable | None = None
    callbacks: list = field(default_factory=list)
    cuda_graph: bool = False

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> SolverSettings:
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(f"Unrecognized arguments {', '.join(unknown)}; valid ones: {', '.join(names)}")
        return cls(**kwargs)

    def __post_init__(self):
        if self.optim_config is not None and not isinstance(self.optim_config, Mapping):  # dict() failed deep
            raise ValueError(
                f"optim_config must be a dict of hyper-parameters, e.g. {{'learning_rate': 1e-3}}, "
                f"got {type(self.optim_config).__name__}"
                + ("; the rule itself goes in update_rule" if callable(self.optim_config) else "")
            )
        self.optim_config = dict(self.optim_config or {})
        resolve_update_rule(self.update_rule)
        optim.check_config(rule_name(self.update_rule), self.optim_config)
        counts = (("batch_size", 1), ("num_epochs", 0), ("print_every", 1), ("num_train_samples", 1),
                  ("num_val_samples", 1))  # fmt: skip
        for name, minimum in counts:
            value = getattr(self, name)
            optional = name.endswith("_samples")  # None: every row
            if value is None and optional:
                continue
            number = as_int(value)
            if number is None or number < minimum:
                kind = ("None or " if optional else "") + (
                    "a positive integer" if minimum else "a non-negative integer"
                )
                raise ValueError(f"{name} must be {kind}, got {value!r}")
            setattr(self, name, number)  # a Python int: checkpoints record it as JSON
        decay = self.lr_decay
        if not is_number(decay) or not math.isfinite(decay) or decay <= 0:
            raise ValueError(f"lr_decay must be a finite number > 0, got {decay!r}")
        if self.lr_schedule is not None and not callable(self.lr_schedule):
            raise ValueError(f"lr_schedule must be a callable of the iteration, got {self.lr_schedule!r}")
        # A string is truthy: verbose='False' printed, progress='no' drew a bar, and cuda_graph='False'
        # was refused as "cuda_graph=True needs the cupy backend".
        for name, nullable in (("verbose", True), ("progress", True), ("cuda_graph", False)):
            check_flag(name, getattr(self, name), nullable)
        self.seed = check_seed(self.seed)
        if self.checkpoint_name is not None and not isinstance(self.checkpoint_name, (str, os.PathLike)):
            raise ValueError(f"checkpoint_name must be a path (a string), got {self.checkpoint_name!r}")
        if self.checkpoint_name is not None and not os.fspath(self.checkpoint_name):  # "" wrote no checkpoint
            raise ValueError("checkpoint_name is empty: give a path such as 'runs/net', or None for no checkpoints")
        if self.on_log is not None and not callable(self.on_log):
            raise ValueError(f"on_log must be a function of the logged record, got {self.on_log!r}")
        # None is no callbacks, and one callback is taken as a list of one.
        if isinstance(self.callbacks, (str, bytes)):  # iterable, but its characters are not callbacks
            raise ValueError(f"callbacks must be a list of xpnet.training.Callback objects, got {self.callbacks!r}")
        if isinstance(self.callbacks, type):  # the class, not an object made from it: "not iterable"
            name = self.callbacks.__name__
            raise ValueError(f"callbacks must be Callback objects; {name} is a class: give {name}(...)")
        # a number failed as "'int' object is not iterable"
        if not (self.callbacks is None or isinstance(self.callbacks, (Callback, Iterable))):
            raise ValueError(f"callbacks must be a list of xpnet.training.Callback objects, got {self.callbacks!r}")
        self.callbacks = [self.callbacks] if isinstance(self.callbacks, Callback) else list(self.callbacks or ())
        for callback in self.callbacks:
            if not isinstance(callback, Callback):  # the Solver calls each hook the base class defines
                raise ValueError(
                    f"callbacks must be xpnet.training.Callback objects (subclass it and override the "
                    f"hooks you need), got {callback!r}"
                )

    def describe(self) -> dict:
        """The settings a checkpoint records (JSON-ready)."""
        return {
            "update_rule": rule_name(self.update_rule),
            "optim_config": self.optim_config,
            "lr_decay": self.lr_decay,
            "batch_size": self.batch_size,
            "num_epochs": self.num_epochs,
            "num_train_samples": self.num_train_samples,
            "num_val_samples": self.num_val_samples,
            "print_every": self.print_every,
            "seed": self.seed,
        }
