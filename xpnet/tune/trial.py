"""One trial, where it runs (this process or a Dask worker): ask the study for
settings, train as ``xpnet-train`` would, report each epoch's validation accuracy
for pruning, and tell the study the result.

A process keeps its data set on its device between trials: it is loaded and moved
once per process, not once per trial.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, replace

from .. import get_backend
from ..experiment import Experiment, apply_defaults, build_model, load_data, make_solver
from ..model import model_state
from ..training import Callback
from ..training.guard import divergence_said_once
from .space import SearchSpace
from .study import load_study, tell

__all__ = ["run_trial"]

_DATA: dict = {}  # (data settings, backend) -> the data set, on the device


def _device_data(settings: Experiment, backend) -> dict:
    key = (
        settings.dataset,
        settings.data_dir,
        settings.num_train,
        settings.model == "cnn",
        settings.seed,
        backend.name,
    )
    if key not in _DATA:
        host = load_data(settings)
        _DATA[key] = {
            name: backend.asarray(value, dtype="float32" if name.startswith("X") else None)
            for name, value in host.items()
            if not name.endswith("_test")  # the test set is for the final best model only
        }
    return _DATA[key]


class _ReportToStudy(Callback):
    """Reports each epoch's validation accuracy to the trial; stops training when the pruner says so."""

    def __init__(self, trial):
        self.trial = trial
        self.pruned = False

    def on_log(self, solver, record):
        if "val_acc" not in record or record["epoch"] == 0:
            return None
        self.trial.report(record["val_acc"], step=record["epoch"])
        if self.trial.should_prune():
            self.pruned = True
            return False
        return None


def _backend_spec(task: dict):
    """The backend of this worker: with K trials per GPU, worker i takes GPU i mod (number of GPUs)."""
    if not task.get("gpus"):
        return task.get("backend")
    try:
        from distributed import get_worker

        index = int(get_worker().name)
    except (ImportError, ValueError):
        index = os.getpid()
    return f"cupy:{index % task['gpus']}"


def run_trial(task: dict) -> dict:
    """Run one trial of the study ``task`` describes; returns what the driver needs.

    ``task``: study_name, storage, sampler, pruner, seed, space (description),
    experiment (Experiment fields), backend, gpus. The result: number, state
    ("COMPLETE", "PRUNED" or "FAIL"), value, params, error, and for a completed
    trial the settings and the model's parameters (host arrays).
    """
    import optuna

    study = load_study(task)
    trial = study.ask()
    space = SearchSpace.from_description(task["space"])
    result = {"number": trial.number, "params": {}, "value": None, "error": None}
    try:
        settings = replace(Experiment(**task["experiment"]), **space.suggest(trial))
        result["params"] = dict(trial.params)
        apply_defaults(settings)
        backend = get_backend(_backend_spec(task))
        data = _device_data(settings, backend)
        model = build_model(settings, data, backend)
        reporter = _ReportToStudy(trial)
        solver = make_solver(settings, model, data, callbacks=[reporter])
        with divergence_said_once():  # the trial's failure names it, in the table and trials.csv
            solver.train()
        if solver.diverged:
            raise FloatingPointError(solver.diverged)
        if reporter.pruned:
            tell(study, trial, state=optuna.trial.TrialState.PRUNED)
            return {**result, "state": "PRUNED", "value": solver.best_val_acc}
        value = float(solver.best_val_acc)
        if not math.isfinite(value):
            raise FloatingPointError(f"validation accuracy is {value}")
    except Exception as exc:  # a failed trial is recorded, and the sweep goes on
        message = f"{type(exc).__name__}: {exc}"
        trial.set_user_attr("error", message[:2000])
        tell(study, trial, state=optuna.trial.TrialState.FAIL)
        return {**result, "state": "FAIL", "error": message}
    tell(study, trial, value)
    state = model_state(model, backend)
    return {
        **result,
        "state": "COMPLETE",
        "value": value,
        "settings": asdict(settings),
        "model_state": state,
        "val_acc_history": list(solver.val_acc_history),
    }
