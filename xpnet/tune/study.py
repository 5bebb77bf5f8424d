"""The Optuna study of a sweep: its storage, sampler and pruner, made the same way
in the command and in every worker, and the recovery of trials that a killed
command left running."""

from __future__ import annotations

import os
import warnings

import numpy as np

__all__ = [
    "storage_for",
    "make_sampler",
    "make_pruner",
    "load_study",
    "open_study",
    "recover_stale_trials",
    "counts",
    "tell",
]

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "halving", "none")


def storage_for(spec: str):
    """An RDB URL (sqlite:///, postgresql://, ...) as it is, or a journal file at a path."""

    if "://" in spec:
        return spec
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    os.makedirs(os.path.dirname(os.path.abspath(spec)), exist_ok=True)
    return JournalStorage(JournalFileBackend(spec))


def make_sampler(kind: str, seed: int, n_trials_so_far: int, space_grid=None):
    """A sampler whose seed depends on how far the study is, so parallel workers and
    restarted commands do not repeat each other's random proposals; except the grid
    sampler's: it names a grid point by its place in the grid, which it shuffles by its
    seed, so every sampler of a sweep must shuffle alike (the sweep's seed)."""
    import optuna

    if kind == "grid":
        return optuna.samplers.GridSampler(space_grid, seed=seed)
    seed = int(np.random.SeedSequence([seed, n_trials_so_far, os.getpid()]).generate_state(1)[0])
    if kind == "tpe":
        # Trials still running count as poor ones, so concurrent workers do not all propose the
        # same point (the default from Optuna 5, set here for Optuna 4 too).
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {kind!r}; use one of {', '.join(SAMPLERS)}")


def make_pruner(kind: str):
    """Pruning of poor trials at epoch ends: the median rule, successive halving, or none."""
    import optuna

    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {kind!r}; use one of {', '.join(PRUNERS)}")


def _quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


# Settings that say where or how verbosely a trial runs, not what it measures: a sweep
# continued with other values of these is the same sweep.
_NOT_DEFINING = ("data_dir", "download", "quiet", "print_every", "seed")


def sweep_definition(task: dict) -> dict:
    """What a trial's value measures: the search space and the fixed settings of each run."""
    fixed = {key: value for key, value in task["experiment"].items() if key not in _NOT_DEFINING}
    return {"space": task["space"], "experiment": fixed}


def _sqlite_hint(spec: str) -> str:
    """Why SQLite could not open the file ``spec`` names, when its folder is missing: a path
    after three slashes is relative to the working folder, and four make it absolute."""
    if not spec.startswith("sqlite:///"):
        return ""
    path = spec[len("sqlite:///") :].split("?", 1)[0]
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(folder):
        return ""
    where = (
        ""
        if path.startswith("/")
        else f" (sqlite:///{path} is relative to the working folder; sqlite:////{path} is absolute)"
    )
    return f"; the folder {folder} does not exist{where}"


def open_study(task: dict):
    """Create the study, or load it when the same command runs again. A study that holds a
    sweep of another definition (another space, data set or model) is refused: continuing it
    would report its old trials as this sweep's results."""
    import optuna

    _quiet_optuna()
    try:
        study = optuna.create_study(
            study_name=task["study_name"],
            storage=storage_for(task["storage"]),
            direction="maximize",
            load_if_exists=True,
        )
    except Exception as exc:  # SQLAlchemy's errors (an optional library's) reached the user as a traceback
        if not type(exc).__module__.startswith("sqlalchemy"):
            raise
        reason = str(exc).splitlines()[0]
        raise ValueError(
            f"cannot open the study's storage {task['storage']}: {reason}{_sqlite_hint(task['storage'])}"
        ) from None
    definition = sweep_definition(task)
    recorded = study.user_attrs.get("xpnet_sweep")
    if recorded is None:
        study.set_user_attr("xpnet_sweep", definition)
    elif recorded != definition:

        def shown(settings, key):
            return repr(settings[key]) if key in settings else "not searched"

        changed = [
            f"{key} {shown(recorded[part], key)} there, {shown(definition[part], key)} here"
            for part in ("space", "experiment")
            for key in sorted(set(recorded[part]) | set(definition[part]))
            if recorded[part].get(key) != definition[part].get(key)
        ]
        raise ValueError(
            f"the study {task['study_name']!r} in {task['storage']} holds a sweep of other settings "
            f"({'; '.join(changed)}): run the same settings to continue it, or give another --out "
            "(or --study-name) to start a new one"
        )
    return study


def load_study(task: dict):
    """The study as a worker sees it, with this worker's sampler and the sweep's pruner."""
    import optuna

    from .space import SearchSpace

    _quiet_optuna()
    storage = storage_for(task["storage"])
    existing = optuna.load_study(study_name=task["study_name"], storage=storage)
    grid = SearchSpace.from_description(task["space"]).grid() if task["sampler"] == "grid" else None
    sampler = make_sampler(task["sampler"], task["seed"], len(existing.trials), grid)
    return optuna.load_study(
        study_name=task["study_name"], storage=storage, sampler=sampler, pruner=make_pruner(task["pruner"])
    )


def tell(study, trial, value=None, state=None) -> None:
    """``study.tell``, for which the end of a grid is no error. Optuna's GridSampler asks the
    study to stop once every grid point has been asked for, and outside ``study.optimize`` (the
    ask-and-tell use here) that raises a RuntimeError, after the trial's result is stored. The
    sweep counts its trials itself and never asks for more than the grid holds."""
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise


def recover_stale_trials(study) -> list:
    """Trials left RUNNING by a command that was killed: marked failed (and "stale", so they
    do not count towards the total) and queued to run again with the same settings."""
    import optuna

    stale = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]
    for trial in stale:
        study._storage.set_trial_user_attr(trial._trial_id, "stale", True)
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        if trial.params:
            study.enqueue_trial(trial.params, skip_if_exists=False)
    return [t.number for t in stale]


def counts(study) -> dict:
    """How many trials are complete, pruned, failed (stale ones aside), running and waiting."""
    import optuna

    states = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0, "RUNNING": 0, "WAITING": 0}
    for trial in study.get_trials(deepcopy=False):
        if trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs.get("stale"):
            continue
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    states["finished"] = states["COMPLETE"] + states["PRUNED"] + states["FAIL"]
    return states
