"""What a checkpoint holds, and how a Solver resumes from one."""

from __future__ import annotations

from .. import optim
from ..backend import namespace, to_numpy
from ..checkpoint import load_checkpoint, non_finite_path, not_float_array, tree_to_device, tree_to_host
from ..input_checks import as_int, is_number, short_repr
from ..model import check_saved_buffers, load_model_state, model_state

__all__ = ["solver_state", "restore_solver", "settings_changes"]

# Settings a resuming Solver may change; each change is reported.
CHANGEABLE = ("lr_decay", "num_epochs", "seed", "num_train_samples", "num_val_samples", "print_every")
# Settings that must match: the optimizer state and the step count depend on them.
FIXED = ("update_rule", "batch_size")
# What every Solver checkpoint holds (older ones lack "rng" and "best_buffers", which are optional).
_SOLVER_KEYS = ("model", "optim_configs", "epoch", "iteration", "loss_history", "train_acc_history",
                "val_acc_history", "best_val_acc", "best_params", "settings")  # fmt: skip


def solver_state(solver) -> dict:
    """Everything needed to continue training, as host data (NumPy arrays, numbers, strings)."""
    return {
        "model": model_state(solver.model, solver.backend),
        "optim_configs": tree_to_host(solver.optim_configs, solver.backend),
        "epoch": solver.epoch,
        "iteration": solver.iteration,
        "loss_history": list(solver.loss_history),
        "train_acc_history": list(solver.train_acc_history),
        "val_acc_history": list(solver.val_acc_history),
        "best_val_acc": solver.best_val_acc,
        "best_params": tree_to_host(solver.best_params, solver.backend),
        # the running averages the best validation accuracy was scored with
        "best_buffers": tree_to_host(solver.best_buffers, solver.backend),
        # The generators are re-derived from (seed, epoch) by the named generator: this is their whole state.
        "rng": {"seed": solver.seed, "epoch": solver.epoch, "stream": solver.backend.random_stream},
        "settings": solver.settings.describe(),
    }


def settings_changes(saved: dict, mine: dict) -> list:
    """Each way this Solver's settings differ from the checkpoint's, as text.

    Raises ValueError for a difference in a setting that must match.
    """
    for key in FIXED:
        if saved[key] != mine[key]:
            raise ValueError(
                f"was trained with {key}={saved[key]!r}; this Solver has {key}={mine[key]!r}: "
                f"resume with the same {key}"
            )
    changes = [
        f"{key} = {mine[key]!r} (the checkpoint has {saved.get(key)!r})"
        for key in CHANGEABLE
        if saved.get(key) != mine[key]
    ]
    saved_config, my_config = saved.get("optim_config") or {}, mine["optim_config"]
    for key in [*my_config, *(k for k in saved_config if k not in my_config)]:
        if saved_config.get(key) != my_config.get(key):
            value = repr(my_config[key]) if key in my_config else "the rule's default"
            changes.append(f"optim_config[{key!r}] = {value} (the checkpoint has {saved_config.get(key)!r})")
    return changes


def random_stream_change(saved, mine) -> list:
    """A note when the checkpoint's random draws came from another generator (none for old checkpoints)."""
    if saved is None or saved == mine:
        return []
    return [
        f"random draws by the {mine} generator (the checkpoint's run used {saved}'s): minibatches, dropout "
        "masks and accuracy subsamples differ from an uninterrupted run from here on"
    ]


def check_solver_state(state, model) -> None:
    """ValueError saying what in a Solver checkpoint is not what a Solver over ``model`` writes,
    before anything is restored: a refused checkpoint leaves the Solver as it was."""
    if not isinstance(state, dict) or any(key not in state for key in _SOLVER_KEYS):
        held = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"is not a Solver checkpoint (it holds {held}; a Solver's has {', '.join(_SOLVER_KEYS)})")
    for key in ("epoch", "iteration"):
        if as_int(state[key]) is None or state[key] < 0:
            raise ValueError(f"has {key} = {short_repr(state[key])}, not a count")
    if state["epoch"] > state["iteration"]:
        raise ValueError(
            f"has epoch = {state['epoch']} after {state['iteration']} iterations (an epoch takes one at least)"
        )
    for key in ("loss_history", "train_acc_history", "val_acc_history"):
        if not isinstance(state[key], list) or not all(is_number(v) for v in state[key]):
            raise ValueError(f"has a {key} that is not a list of numbers")
    if not is_number(state["best_val_acc"]) or not 0 <= state["best_val_acc"] <= 1:
        raise ValueError(f"has best_val_acc = {short_repr(state['best_val_acc'])}, not an accuracy")
    if not isinstance(state["settings"], dict) or any(key not in state["settings"] for key in FIXED):
        raise ValueError(f"has no settings naming its {' and '.join(FIXED)}")
    shapes = {name: tuple(value.shape) for name, value in model.params.items()}
    best, configs = state["best_params"], state["optim_configs"]
    rule = state["settings"]["update_rule"]
    rule = rule if isinstance(rule, str) else ""  # another Solver's rule is named by settings_changes
    moments = [key for key in optim.CONFIG_KEYS.get(rule, ((), ()))[1] if key != "t"]
    if not isinstance(best, dict) or (best and set(best) != set(shapes)):
        raise ValueError(f"has best parameters {_names(best)}; the model's are {sorted(shapes)}")
    if not isinstance(configs, dict) or set(configs) != set(shapes):
        raise ValueError(f"has optimizer state for {_names(configs)}; the model's parameters are {sorted(shapes)}")
    for name, shape in shapes.items():
        if name in best and (not_float_array(best[name]) or tuple(best[name].shape) != shape):
            value = best[name]
            what = not_float_array(value) or f"of shape {tuple(value.shape)}"
            raise ValueError(
                f"has a best {name} {what}; the model's {name} is an array of floats of shape {shape} "
                "(a checkpoint resumes only the network it was written for)"
            )
        if not isinstance(configs[name], dict):
            raise ValueError(f"has optimizer state for {name} that is not a dict")
        for key, value in configs[name].items():
            if key == "t" and not _is_step_count(value):
                raise ValueError(f"has optimizer state {name}.t = {short_repr(value)}, not a step count")
            if not hasattr(value, "shape"):
                if not is_number(value) or key in moments:  # a number where the rule keeps an array failed at a step
                    kind = f"an array of shape {shape}" if key in moments else "a number or an array"
                    raise ValueError(f"has optimizer state {name}.{key} = {short_repr(value)}, not {kind}")
            # Moments are arrays of floats of the parameter's shape; a step count kept on a GPU is 0-d.
            elif (value.shape != () or key in moments) and (value.shape != shape or not_float_array(value)):
                what = not_float_array(value) or "an array of floats"
                raise ValueError(
                    f"has optimizer state {name}.{key}, {what} of shape {value.shape}; the parameter is {shape}"
                )
            elif key in optim.SQUARED_STATE.get(rule, ()) and to_numpy(namespace(value).any(value < 0)):
                raise ValueError(  # its square root at the next step: NaN, and training diverged at once
                    f"has optimizer state {name}.{key} below 0, where {rule} averages squared gradients"
                )
    best_buffers = state.get("best_buffers", [])
    if not isinstance(best_buffers, list):
        raise ValueError(f"has best_buffers that are a {type(best_buffers).__name__}, not a list of layer state")
    if best_buffers:  # none before the first accuracy check
        try:
            check_saved_buffers(model, best_buffers)
        except ValueError as exc:
            raise ValueError(f"has best_buffers that do not fit the model: {exc}") from None
        _check_best_buffers_match(best_buffers, state["model"])
    # A Solver writes no checkpoint once training has diverged: from NaN weights or moments,
    # training would diverge at once, and the message would blame the training.
    for part in ("model", "best_params", "best_buffers", "optim_configs"):
        where = non_finite_path(state.get(part), part)
        if where is not None:
            raise ValueError(f"holds NaN or infinite values in {where}, which no training can go on from")


def _check_best_buffers_match(best_buffers: list, model_state: dict) -> None:
    """ValueError unless each array of ``best_buffers`` has the shape of the same array in the
    checkpoint's model state: a fresh model makes its running averages at its first call, so
    only the file itself can say what size they are."""
    saved = model_state.get("buffers") if isinstance(model_state, dict) else None
    if not isinstance(saved, list) or len(saved) != len(best_buffers):
        return  # the model state's own check names it
    for i, (best, current) in enumerate(zip(best_buffers, saved)):
        for key, value in best.items():
            other = current.get(key) if isinstance(current, dict) else None
            shape = getattr(other, "shape", None)
            if shape is not None and tuple(shape) != tuple(value.shape):
                raise ValueError(
                    f"has best_buffers.{i}.{key} of shape {tuple(value.shape)}, but model.buffers.{i}.{key} "
                    f"has {tuple(shape)}"
                )


def _is_step_count(value) -> bool:
    """Adam's step count as a checkpoint holds it: an integer >= 0, or a 0-d integer array
    (the count the fused update keeps on the device, moved to the host)."""
    if getattr(value, "shape", None) == ():
        value = value.item()
    count = as_int(value)
    return count is not None and 0 <= count <= optim.MAX_STEP_COUNT


def _names(tree) -> str:
    return repr(sorted(tree)) if isinstance(tree, dict) else f"a {type(tree).__name__}"


def restore_solver(solver, path, trust_pickle=False) -> list:
    """Load ``path`` into ``solver``; returns the list of setting changes (this Solver's win)."""
    state = load_checkpoint(path, trust_pickle=trust_pickle)
    mine = solver.settings.describe()
    try:
        check_solver_state(state, solver.model)
        changes = settings_changes(state["settings"], mine)
    except ValueError as exc:
        raise ValueError(f"checkpoint {str(path)!r} {exc}") from None
    try:
        load_model_state(solver.model, state["model"], solver.backend)
    except ValueError as exc:
        raise ValueError(f"checkpoint {str(path)!r}: {exc}") from None
    dtype = getattr(solver.model, "dtype", None)
    configs = tree_to_device(state["optim_configs"], solver.backend, dtype)
    state_keys = optim.CONFIG_KEYS.get(mine["update_rule"], (None, None))[1]
    for name, config in configs.items():
        # The optimizer state (moments, step count) is restored; the hyper-parameters are this Solver's.
        mine_now = solver.optim_configs[name]
        keep = state_keys if state_keys is not None else [k for k in config if k not in mine_now]
        mine_now.update({k: config[k] for k in keep if k in config})
    solver.best_params = tree_to_device(state["best_params"], solver.backend, dtype)
    solver.best_buffers = tree_to_device(state.get("best_buffers", []), solver.backend, dtype)
    for key in ("epoch", "iteration", "best_val_acc"):
        setattr(solver, key, state[key])
    for key in ("loss_history", "train_acc_history", "val_acc_history"):
        setattr(solver, key, list(state[key]))
    solver.update.set_host_learning_rates(solver.iteration)
    if solver.seed is not None:  # unseeded draws never repeat, on any generator
        saved_rng = state.get("rng")
        saved_stream = saved_rng.get("stream") if isinstance(saved_rng, dict) else None
        changes += random_stream_change(saved_stream, solver.backend.random_stream)
    if any(c.startswith(("lr_decay", "optim_config['learning_rate']")) for c in changes):
        lr = next((c["learning_rate"] for c in solver.optim_configs.values() if "learning_rate" in c), None)
        changes.append(f"learning rate at epoch {solver.epoch}: {lr:g}")
    return changes
