"""The update: an update rule applied to every parameter, with hyper-parameters per
parameter group and a learning rate that can follow a schedule held on the device.

Without a schedule (and without CUDA graphs) each parameter's config holds its
learning rate as a Python float, decayed by ``lr_decay`` after each epoch, as in
the course. With ``lr_schedule`` (or ``cuda_graph=True``) the learning rate of
every step comes from a table of per-iteration factors on the device, indexed by
a step counter that is also on the device: a captured graph then follows the
schedule, and the per-epoch decay, on replay without being captured again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from .. import optim
from ..backend import namespace
from ..input_checks import is_array, is_number
from .settings import resolve_update_rule, rule_name

__all__ = ["Update", "learning_rate_factor"]

DEFAULT_LEARNING_RATES = {
    "sgd": 1e-2,
    "sgd_momentum": 1e-2,
    "sgd_nesterov_momentum": 1e-2,
    "nesterov_sgd": 1e-2,
    "rmsprop": 1e-2,
    "adam": 1e-3,
}


def learning_rate_factor(iteration: int, per_epoch: int, lr_decay: float, schedule=None) -> float:
    """The factor on a group's learning rate at ``iteration``: ``lr_decay`` to the
    number of finished epochs, times ``schedule(iteration)`` when given."""
    factor = lr_decay ** (iteration // per_epoch)
    if schedule is None:
        return factor
    value = schedule(iteration)
    if not is_number(value) or not math.isfinite(value) or value < 0:
        # A negative factor would climb the loss; NaN would end training as a divergence.
        raise ValueError(f"lr_schedule({iteration}) returned {value!r}; it must give a finite number >= 0")
    return factor * float(value)


def _group_of(name: str, groups: list) -> int | None:
    """The index of the one group that takes parameter ``name`` (None: no group), or ValueError
    when two do: which hyper-parameters it trains with would depend on the groups' order."""
    found = [index for index, group in enumerate(groups) if _member(name, group["params"])]
    if len(found) > 1:
        raise ValueError(
            f"parameter {name!r} is in param_groups {found[0]} and {found[1]}; each parameter may be in one "
            "group (those in none train with optim_config)"
        )
    return found[0] if found else None


def _member(name: str, members) -> bool:
    return bool(members(name)) if callable(members) else name in members


class Update:
    """Applies ``rule`` to each parameter in place.

    Args:
        rule: an update rule (name or callable) of :mod:`xpnet.optim`'s form.
        optim_config: hyper-parameters for every parameter.
        param_names: the model's parameter names.
        per_epoch: iterations per epoch (for ``lr_decay``).
        param_groups: optional list of dicts, each with "params" (a list of names,
            or a callable of the name), hyper-parameters that override
            ``optim_config`` for those parameters (e.g. a larger "learning_rate"),
            and optionally its own "lr_schedule", which replaces ``lr_schedule``
            for those parameters. With the rules whose step is the learning rate
            times a direction ('sgd', 'nesterov_sgd'), a factor of 0 holds them fixed.
            A parameter belongs to the first group that names it.
        lr_decay: factor on the learning rate after each epoch.
        lr_schedule: optional callable ``iteration -> factor``, applied on the device.
        on_device: hold the learning rate on the device even without a schedule
            (for CUDA graphs).
    """

    def __init__(self, rule, optim_config, param_names, per_epoch=1, param_groups=None, lr_decay=1.0,
                 lr_schedule=None, on_device=False):  # fmt: skip
        self.rule = resolve_update_rule(rule)
        self.rule_name = rule_name(rule)
        if self.rule not in optim.UPDATE_RULES.values():  # a rule of the user's own: its results are checked
            self.rule = _checked_rule(self.rule, self.rule_name)
        self.per_epoch, self.lr_decay = per_epoch, lr_decay
        if isinstance(param_groups, dict):  # one group, not the keys of one
            param_groups = [param_groups]
        if isinstance(param_groups, (str, bytes)) or not (param_groups is None or isinstance(param_groups, Iterable)):
            raise ValueError(f"param_groups must be a list of dicts, each with a 'params' entry; got {param_groups!r}")
        groups = list(param_groups or [])
        for i, group in enumerate(groups):
            if not isinstance(group, dict):
                raise ValueError(
                    f"param_groups must be a list of dicts, each with a 'params' entry; got {group!r} in it"
                )
            if "params" not in group:
                raise ValueError(f"each param_group needs a 'params' entry, got {sorted(group)}")
            if isinstance(group["params"], str):  # one name, not the characters of one
                groups[i] = group = {**group, "params": [group["params"]]}
            schedule = group.get("lr_schedule")
            if schedule is not None and not callable(schedule):
                raise ValueError(f"a param_group's lr_schedule must be a callable of the iteration, got {schedule!r}")
            optim.check_config(self.rule_name, _hyper_parameters(group))
            if not callable(group["params"]):
                unknown = sorted(set(group["params"]) - set(param_names))
                if unknown:
                    raise ValueError(
                        f"param_groups name unknown parameters {unknown}; the model has {sorted(param_names)}"
                    )
        self.configs, self.base_lr, self.schedules = {}, {}, {}
        for name in param_names:
            index = _group_of(name, groups)
            group = {} if index is None else groups[index]
            self.configs[name] = config = {**optim_config, **_hyper_parameters(group)}
            self.base_lr[name] = config.get("learning_rate", DEFAULT_LEARNING_RATES.get(self.rule_name))
            self.schedules[name] = group.get("lr_schedule", lr_schedule)
        self.on_device = on_device or any(s is not None for s in self.schedules.values())
        self._tables, self._step = {}, None
        self._gradients_checked = False

    # -- the learning rate ------------------------------------------------------------
    def start(self, backend, dtype, iteration: int, num_iterations: int) -> None:
        """Set the host learning rates for ``iteration`` and, when on the device, build
        a table of per-iteration factors (``num_iterations`` of them) for each schedule
        and the step counter."""
        self.set_host_learning_rates(iteration)
        if not self.on_device:
            return
        xp = backend.xp
        self._tables = {}
        for schedule in self.schedules.values():
            if id(schedule) not in self._tables:
                factors = [
                    learning_rate_factor(i, self.per_epoch, self.lr_decay, schedule) for i in range(num_iterations)
                ]
                self._tables[id(schedule)] = backend.asarray(factors or [1.0], dtype=dtype)
        # the last table index as a device array: xp.minimum, unlike array-api-compat's clip, never
        # reads a value back to the host (which a captured graph forbids)
        self._last = xp.asarray(max(num_iterations - 1, 0), dtype=xp.int64, device=backend.device)
        self._step = xp.asarray(iteration, dtype=xp.int64, device=backend.device)

    def set_host_learning_rates(self, iteration: int) -> None:
        """Each config's "learning_rate" as the Python float in force at ``iteration``."""
        for name, config in self.configs.items():
            if self.base_lr[name] is not None:
                factor = learning_rate_factor(iteration, self.per_epoch, self.lr_decay, self.schedules[name])
                config["learning_rate"] = self.base_lr[name] * factor

    @property
    def step_counter(self):
        """The device step counter (None until :meth:`start` runs on the device)."""
        return self._step

    @property
    def arrays(self) -> tuple:
        """The device arrays a captured step reads (a new set means: capture again)."""
        return (self._step, *self._tables.values())

    # -- the step ----------------------------------------------------------------------
    def apply(self, params: dict, grads: dict) -> None:
        """Update every parameter in place (device work only when on the device). A gradient
        of None leaves its parameter and the rule's state for it as they are, as PyTorch's
        optimizers skip a parameter without a gradient; a missing one, or one of another
        shape, is a ValueError at the first step."""
        if not self._gradients_checked:
            check_gradients(params, grads)
            self._gradients_checked = True
        params_with_grads = {name: w for name, w in params.items() if grads[name] is not None}
        if self._step is None:
            for name, w in params_with_grads.items():
                params[name], self.configs[name] = self.rule(w, grads[name], self.configs[name])
            return
        xp = namespace(self._step)
        position = xp.reshape(xp.minimum(self._step, self._last), (1,))  # the counter never goes below 0
        factors = {key: xp.reshape(xp.take(table, position), ()) for key, table in self._tables.items()}
        self._step += 1  # in place: a replayed graph counts too
        rates = {}
        for name, w in params_with_grads.items():
            config, base = self.configs[name], self.base_lr[name]
            if base is None:
                params[name], self.configs[name] = self.rule(w, grads[name], config)
                continue
            key = (base, id(self.schedules[name]))
            if key not in rates:
                rates[key] = factors[key[1]] * base
            host_rate, config["learning_rate"] = config["learning_rate"], rates[key]
            try:
                params[name], self.configs[name] = self.rule(w, grads[name], config)
            finally:
                config["learning_rate"] = host_rate


def _checked_rule(rule, name: str):
    """``rule`` with its result checked: (next_w of w's shape, a config dict), as the course's
    rules return. A rule written by hand gets its slip named, not an unpacking error."""

    def checked(w, dw, config):
        result = rule(w, dw, config)
        if not (isinstance(result, tuple) and len(result) == 2):
            got = f"a tuple of {len(result)}" if isinstance(result, tuple) else type(result).__name__
            raise TypeError(f"update_rule {name} must return (next_w, config), as xpnet.optim's rules do; got {got}")
        next_w, next_config = result
        if not is_array(next_w) or tuple(next_w.shape) != tuple(w.shape):
            got = tuple(next_w.shape) if is_array(next_w) else type(next_w).__name__
            raise ValueError(f"update_rule {name} returned next_w {got} for a parameter of shape {tuple(w.shape)}")
        if not isinstance(next_config, dict):
            raise TypeError(f"update_rule {name} must return its config dict second, got {type(next_config).__name__}")
        return result

    return checked


def check_gradients(params: dict, grads: dict) -> None:
    """ValueError unless ``grads`` (what a model's loss returned) has a gradient, or None, for
    every parameter, each of its parameter's shape: a model written by hand gets its mistake
    named, not a KeyError or a broadcasting error from inside an update rule."""
    missing = [name for name in params if name not in grads]
    if missing:
        others = sorted(set(grads) - set(params))
        raise ValueError(
            f"the model's loss returned no gradient for {missing} (None leaves a parameter as it is)"
            + (f"; it returned gradients for {others}, which are not in model.params" if others else "")
        )
    for name, w in params.items():
        g = grads[name]
        if g is not None and not is_array(g):
            raise TypeError(
                f"the model's loss returned a {type(g).__name__} as the gradient of {name!r}; "
                "gradients are arrays of the parameter's shape (or None)"
            )
        if g is not None and tuple(g.shape) != tuple(w.shape):
            raise ValueError(
                f"the model's loss returned a gradient of shape {tuple(g.shape)} for {name!r}, "
                f"whose shape is {tuple(w.shape)}"
            )


def _hyper_parameters(group: dict) -> dict:
    """A param group's overrides of the update rule's config."""
    return {k: v for k, v in group.items() if k not in ("params", "lr_schedule")}
