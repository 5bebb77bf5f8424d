"""A sweep: trials run until the study holds ``trials`` finished ones, in this
process, on a local Dask cluster of worker processes, or on an existing cluster.

The study lives in storage (a journal file in the run folder by default), so a
command killed at any moment continues when it runs again: finished trials are
kept, trials it left running are marked failed and run again. The best model's
parameters come back to the command, which writes every output.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from ..backend import check_backend_spec, get_backend
from ..checkpoint import save_checkpoint, unwritable_reason
from ..experiment import Experiment
from ..input_checks import as_int, check_flag, file_path
from .report import BEST_KEYS, OUTPUT_FILES, read_best_model, write_outputs
from .space import SearchSpace, check_experiment, check_model_combinations
from .study import PRUNERS, SAMPLERS, counts, open_study, recover_stale_trials
from .trial import run_trial

__all__ = ["SweepConfig", "run_sweep", "InProcess", "DaskExecutor"]


@dataclass
class SweepConfig:
    """Everything a sweep needs; see ``xpnet-sweep --help`` for each."""

    space: SearchSpace
    experiment: Experiment = field(default_factory=Experiment)
    trials: int = 20
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0
    out: str = "runs/sweep"
    storage: str | None = None
    study_name: str = "xpnet-sweep"
    workers: int = 0
    scheduler: str | None = None
    trials_per_gpu: int = 0
    backend: str | None = None
    plots: bool = True
    verbose: bool = True

    def check(self) -> None:
        """ValueError naming the first setting that cannot run, before the study is opened or
        any trial runs (a bad backend or data set would otherwise fail every trial, one by one)."""
        self._check_kinds()
        for name, least in (("trials", 1), ("seed", 0), ("workers", 0), ("trials_per_gpu", 0)):
            value = as_int(getattr(self, name))
            if value is None or value < least:
                kind = "a positive integer" if least else "an integer >= 0"
                raise ValueError(f"{name} must be {kind}, got {getattr(self, name)!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; use one of {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"unknown pruner {self.pruner!r}; use one of {', '.join(PRUNERS)}")
        if sum(bool(x) for x in (self.workers, self.scheduler, self.trials_per_gpu)) > 1:
            raise ValueError("choose one of workers, scheduler and trials_per_gpu")
        experiment = self.experiment
        check_experiment(experiment, searched=set(self.space.dimensions))
        check_model_combinations(self.space, experiment)
        if self.trials_per_gpu and not (self.backend or "").startswith("cupy"):
            raise ValueError("trials_per_gpu runs trials on GPUs: it needs the cupy backend")
        if self.scheduler:
            if self.storage is None or "://" not in self.storage:
                raise ValueError(
                    "--scheduler needs --storage to be a database every worker reaches (sqlite:///path or "
                    "postgresql://...)"
                )
            check_backend_spec(self.backend)  # the cluster's workers make it, on their own machines
        else:
            backend = get_backend(self.backend)  # trials run on this machine: a library not installed is named now
            if experiment.cuda_graph and not backend.can_capture:
                raise ValueError(
                    f"experiment.cuda_graph needs the cupy backend; backend {backend.name!r} cannot capture"
                )

    def _check_kinds(self) -> None:
        """TypeError naming a setting of the wrong kind: each failed later inside the sweep
        ("'str' object has no attribute 'describe'", os.fspath's "expected str", Optuna's "Should
        not reach")."""
        if not isinstance(self.space, SearchSpace):
            hint = ""
            if isinstance(self.space, (str, list, tuple)):
                hint = ': parse_space(["lr=loguniform(1e-4,1e-2)", ...]) makes one from the command line\'s expressions'
            elif isinstance(self.space, Mapping):
                hint = ": SearchSpace.from_description(space) makes one from a space file's dict"
            raise TypeError(f"SweepConfig: space must be a SearchSpace, got {type(self.space).__name__}{hint}")
        if not isinstance(self.experiment, Experiment):
            hint = ": Experiment(**experiment) makes one" if isinstance(self.experiment, Mapping) else ""
            raise TypeError(
                f"SweepConfig: experiment must be an xpnet.experiment.Experiment, got {type(self.experiment).__name__}"
                + hint
            )
        # as strings from here on: a Path would fail the storage's "://" test and the task's JSON
        self.out = file_path("SweepConfig", "out", self.out, "a folder path")
        if self.storage is not None:
            self.storage = file_path("SweepConfig", "storage", self.storage, "a journal file path or a database URL")
        for name in ("study_name", "sampler", "pruner"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"SweepConfig: {name} must be a string, got {type(getattr(self, name)).__name__}")
        if self.scheduler is not None and not isinstance(self.scheduler, str):
            raise TypeError(
                f"SweepConfig: scheduler must be an address (tcp://host:8786), got {type(self.scheduler).__name__}"
            )
        # A string is truthy: plots="no" drew them (the experiment's switches: check_experiment).
        for name in ("plots", "verbose"):
            setattr(self, name, check_flag(f"SweepConfig: {name}", getattr(self, name)))

    def task(self, gpus: int = 0) -> dict:
        """What a worker needs to run one trial (plain data: it travels to other processes)."""
        return {
            "study_name": self.study_name,
            "storage": self.storage or os.path.join(self.out, "study.journal"),
            "sampler": self.sampler,
            "pruner": self.pruner,
            "seed": self.seed,
            "space": self.space.describe(),
            "experiment": asdict(self.experiment),
            "backend": None if gpus else self.backend,
            "gpus": gpus,
        }


class InProcess:
    """Runs each trial here, one after another: the default, no services."""

    capacity = 1

    def submit(self, task):
        return run_trial(task)

    def wait_any(self, pending):
        return pending[0], pending[0]

    def close(self):
        pass


class DaskExecutor:
    """Trials on Dask workers: a LocalCluster of ``workers`` processes (one BLAS thread
    each, Dask's default), or the cluster at ``scheduler``."""

    def __init__(self, workers: int = 0, scheduler: str | None = None):
        try:
            from distributed import Client, LocalCluster
        except ImportError as exc:
            raise ImportError('running trials on Dask needs the tune extra: pip install "xpnet[tune]"') from exc
        self.cluster = None
        if scheduler:
            self.client = Client(scheduler)
        else:
            import logging

            try:
                self.cluster = LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                    silence_logs=logging.ERROR,
                )  # fmt: skip
            except RuntimeError as exc:  # "Nanny failed to start", below each worker's own traceback
                raise RuntimeError(
                    f"the {workers} Dask worker processes did not start ({str(exc).rstrip('.')}); from a script, "
                    "call run_sweep under `if __name__ == '__main__':`: each worker process imports the script again"
                ) from exc
            self.client = Client(self.cluster)
        self.capacity = max(1, len(self.client.scheduler_info()["workers"]))

    def submit(self, task):
        return self.client.submit(run_trial, task, pure=False)

    def wait_any(self, pending):
        from distributed import wait

        done = wait(pending, return_when="FIRST_COMPLETED").done
        future = next(iter(done))
        return future, future.result()

    def close(self):
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _executor(config: SweepConfig):
    if config.scheduler or config.workers > 1 or config.trials_per_gpu:
        workers = config.workers
        if config.trials_per_gpu:
            workers = config.trials_per_gpu * _gpu_count()
        return DaskExecutor(workers=workers, scheduler=config.scheduler)
    return InProcess()


def _gpu_count() -> int:
    from ..backend import get_backend

    backend = get_backend("cupy")  # raises with a clear message without CuPy or a GPU
    return backend.lib.cuda.runtime.getDeviceCount()


def run_sweep(config: SweepConfig) -> dict:
    """Run the sweep to ``config.trials`` finished trials and write the outputs; returns a summary.
    Settings that cannot run are refused first (:meth:`SweepConfig.check`)."""
    config.check()
    for name in OUTPUT_FILES:  # one kept read-only would fail the sweep at its end, after every trial
        reason = unwritable_reason(os.path.join(config.out, name))
        if reason is not None:
            raise ValueError(f"out {config.out!r}: the sweep's results cannot be written there ({reason})")
    os.makedirs(config.out, exist_ok=True)
    gpus = _gpu_count() if config.trials_per_gpu else 0
    task = config.task(gpus)
    study = open_study(task)
    stale = recover_stale_trials(study)
    say = print if config.verbose else (lambda *a, **k: None)
    if stale:
        say(f"trials {stale} were left running by an earlier command: marked failed, and run again")
    trials = config.trials
    if config.sampler == "grid":
        points = math.prod(len(values) for values in config.space.grid().values())
        if trials > points:  # more would run grid points again
            say(f"the grid has {points} points: {points} trials, not {trials}")
            trials = points
    best_path = os.path.join(config.out, "best_model.npz")
    best_trial = read_best_model(best_path)
    best = None if best_trial is None else best_trial["value"]
    executor = _executor(config)
    pending: list = []
    try:
        while True:
            finished = counts(study)["finished"]
            while finished + len(pending) < trials and len(pending) < executor.capacity:
                pending.append(executor.submit(task))
            if not pending:
                break
            handle, result = executor.wait_any(pending)
            pending.remove(handle)
            value = result["value"]
            note = f" ({result['error']})" if result["error"] else ""
            say(f"trial {result['number']}: {result['state'].lower()} {'' if value is None else f'{value:.4f}'}{note}")
            if result["state"] == "COMPLETE" and (best is None or value > best):
                best = value
                save_checkpoint(best_path, {key: result[key] for key in BEST_KEYS})
    finally:
        executor.close()
    return write_outputs(study, config, best_path, say)
