"""What a sweep leaves in its run folder: trials.csv, the ten best trials printed,
Optuna's plots as PNGs, the best model's checkpoint and its test accuracy, and its
first layer's weights (a fully connected net) or filters (a conv net) as a picture."""

from __future__ import annotations

import csv
import json
import os
import warnings

import numpy as np

from ..atomic_files import atomic_write
from ..backend import get_backend
from ..checkpoint import CheckpointError, load_checkpoint
from ..experiment import Experiment, build_model, load_data
from ..input_checks import as_int, file_path, is_number, short_repr
from ..model import load_model_state, values_at_most
from ..vis_utils import plotting_unavailable, save_figure
from .space import check_experiment

__all__ = [
    "write_outputs",
    "write_trials_csv",
    "top_trials",
    "first_layer_images",
    "read_best_model",
    "BEST_KEYS",
    "OUTPUT_FILES",
]


PLOTS = ("optimization_history", "param_importances", "parallel_coordinate")  # Optuna's plot_<name>, as <name>.png
# Every file a sweep writes into its folder, beside its study: checked before the first trial.
OUTPUT_FILES = ("trials.csv", "summary.json", "best_model.npz", "first_layer_weights.png", *(f"{p}.png" for p in PLOTS))


def write_trials_csv(study, path) -> list:
    """One row per finished, pruned or failed trial; returns the rows."""
    import optuna

    terminal = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    trials = [t for t in study.get_trials(deepcopy=False) if t.state in terminal]
    names = sorted({name for t in trials for name in t.params})
    rows = []
    for t in trials:
        seconds = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        rows.append({
            "number": t.number,
            "state": t.state.name.lower() + (" (stale, retried)" if t.user_attrs.get("stale") else ""),
            "value": "" if t.value is None else t.value,
            "seconds": "" if seconds is None else round(seconds, 2),
            **{name: t.params.get(name, "") for name in names},
            "error": t.user_attrs.get("error", ""),
        })  # fmt: skip
    with atomic_write(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["number", "state", "value", "seconds", *names, "error"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def top_trials(rows, count=10) -> list:
    complete = [r for r in rows if r["state"] == "complete"]
    return sorted(complete, key=lambda r: -r["value"])[:count]


def _plots(study, out, say):
    """Optuna's optimisation history, parameter importances and parallel coordinates as PNGs."""
    import matplotlib

    matplotlib.use("Agg")  # a command writing files: no display is needed
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    written = []
    for name in PLOTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = getattr(vis, f"plot_{name}")(study)
            figure = (axes.flat[0] if isinstance(axes, np.ndarray) else axes).figure
            path = save_figure(figure, os.path.join(out, f"{name}.png"), dpi=90, bbox_inches="tight")
            plt.close(figure)
            written.append(path)
        except Exception as exc:  # e.g. importances need two completed trials with varied parameters
            say(f"plot {name} skipped: {exc}")
    return written


def first_layer_images(model, settings):
    """The first layer's weights as (K, H, W, C) images on the host: a conv net's K filters
    (F, C, HH, WW), or a fully connected net's K hidden units, each an input image's shape."""
    w1 = model.backend.to_numpy(model.params["W1"])
    if w1.ndim == 4:
        return w1.transpose(0, 2, 3, 1)
    shape = (3, 32, 32) if settings.dataset == "cifar10" else (1, 8, 8)
    return w1.T.reshape(-1, *shape).transpose(0, 2, 3, 1)  # W1 is (D, hidden)


def _first_layer_picture(model, settings, out):
    """The first layer's weights or filters, one tile each."""
    from ..vis_utils import new_figure, visualize_grid

    images = first_layer_images(model, settings)
    shape = images.shape[1:]
    fig = new_figure(figsize=(6, 6))
    ax = fig.subplots()
    grid = visualize_grid(images, padding=1)
    ax.imshow(grid.astype("uint8").squeeze(), cmap="gray" if shape[-1] == 1 else None)
    ax.axis("off")
    return save_figure(fig, os.path.join(out, "first_layer_weights.png"), dpi=90, bbox_inches="tight")


BEST_KEYS = ("value", "number", "settings", "params", "model_state")  # what run_sweep keeps of the best trial


def read_best_model(path) -> dict | None:
    """The best trial that :func:`~xpnet.tune.run_sweep` keeps at ``path`` (its keys are
    :data:`BEST_KEYS`), or None where there is no file yet. A file that is not one raises
    :class:`~xpnet.checkpoint.CheckpointError` naming it and what is wrong, before any trial
    runs (it failed after all of them, in a KeyError or TypeError)."""
    path = file_path("read_best_model", "path", path)
    if not os.path.exists(path):
        return None
    best = load_checkpoint(path)
    missing = [key for key in BEST_KEYS if key not in best]
    if missing:
        problem = f"it has no {', '.join(missing)}"
    elif not is_number(best["value"]) or not 0 <= best["value"] <= 1:
        problem = f"its value {short_repr(best['value'])} is not a validation accuracy"
    elif as_int(best["number"]) is None or best["number"] < 0:
        problem = f"its trial number {short_repr(best['number'])} is not one"
    elif not all(isinstance(best[key], dict) for key in ("settings", "params", "model_state")):
        problem = "its settings, params and model_state are not all dicts"
    else:
        try:
            check_experiment(Experiment(**best["settings"]))
            problem = ""
        except TypeError as exc:  # a setting Experiment does not have
            problem = f"its settings are not a run's ({exc})"
        except ValueError as exc:  # a seed of "batchnorm" failed inside NumPy, a dataset of [1] looked for CIFAR-10
            problem = f"its settings are not a run's: {exc}"
    if problem:
        raise CheckpointError(
            f"{path} is not the best model a sweep keeps: {problem}; move it out of the sweep's folder to go on"
        )
    return best


# Where this command finds the data set, which may have moved since the best trial ran: a
# sweep continues with another --data-dir (such settings do not define it).
_WHERE_DATA_IS = ("data_dir", "download")


def _test_accuracy(best, backend_spec, path, experiment=None):
    """The best model, read from ``path``, rebuilt and loaded, on the test set: the one time
    the sweep touches it. The data set is found where ``experiment`` (this command's settings)
    says, or where the best trial found it."""
    where = {} if experiment is None else {key: getattr(experiment, key) for key in _WHERE_DATA_IS}
    settings = Experiment(**{**best["settings"], **where})
    backend = get_backend(backend_spec)
    data = load_data(settings)
    try:
        # The sizes come from the file, whose float32 weights (every trial's) must fit in it.
        with values_at_most(os.path.getsize(path) // 4):
            model = build_model(settings, data, backend)
        load_model_state(model, best["model_state"], backend)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    predictions = backend.to_numpy(model.predict(data["X_test"]))  # in batches: a conv net's would not fit at once
    return float(np.mean(predictions == data["y_test"])), model, settings


def write_outputs(study, config, best_path, say) -> dict:
    rows = write_trials_csv(study, os.path.join(config.out, "trials.csv"))
    top = top_trials(rows)
    summary = {"trials": len(rows), "complete": sum(r["state"] == "complete" for r in rows), "out": config.out}
    if top:
        say("\nbest trials:")
        names = [k for k in top[0] if k not in ("state", "error")]
        say("  " + "  ".join(f"{n:>14}" for n in names))
        for row in top:
            say("  " + "  ".join(f"{_cell(row[n]):>14}" for n in names))
    no_matplotlib = plotting_unavailable()
    if no_matplotlib:
        say(f"plots skipped: {no_matplotlib}")
    elif config.plots and summary["complete"]:
        summary["plots"] = _plots(study, config.out, say)
    best = read_best_model(best_path)
    if best is not None:
        test_acc, model, settings = _test_accuracy(best, config.backend, best_path, config.experiment)
        summary.update(best_val_acc=best["value"], best_trial=best["number"], test_acc=test_acc)
        summary["best_settings"] = best["settings"]
        summary["weights"] = None if no_matplotlib else _first_layer_picture(model, settings, config.out)
        with atomic_write(os.path.join(config.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        say(f"best trial {best['number']}: {json.dumps(best['params'])}")
        say(f"test acc of the best model: {test_acc:.4f}")
        say(f"best val acc: {best['value']:.4f}")
    else:
        say("no trial completed; see trials.csv for the errors")
    return summary


def _cell(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)
