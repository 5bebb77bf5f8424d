"""``xpnet-bench --recipe fast94``: the fast CIFAR-10 recipe in xpnet and in PyTorch, in
one process, interleaved run by run on the same data, in the same precision (TF32 on
both sides or off on both), with PyTorch's published setting (fp16, channels-last) beside
them on a GPU, and there xpnet with float16 activations and xpnet with cuDNN's
convolutions (when cuDNN loads) too. Each run
counts what the published recipe counts (whitening, training, evaluation with TTA) after
one untimed warm-up run per side on the same shapes (``--warmup-epochs`` shortens it: the
shapes, compiled kernels and captured graphs are the same after two epochs as after all).
``--recipe-sides`` picks the sides. A side that fails is reported (``failures``) and left
out of the later runs; the others go on.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

from xpnet import data_utils
from xpnet.cli.bench_conv import cudnn_available
from xpnet.cli.common import load_npz_arrays
from xpnet.recipes.fast94 import Fast94Settings, device_data, timed_run
from xpnet.training.guard import divergence_said_once

__all__ = ["recipe_runs", "format_recipe_table", "mean_difference"]

# Each side beside the PyTorch side in the same precision, for the accuracy differences.
COMPARED = (("xpnet", "torch"), ("xpnet-cudnn", "torch"), ("xpnet-fp16", "torch-fp16"))


NPZ_KEYS = ("X_train", "y_train", "X_test", "y_test")  # what --cifar-npz must hold for the recipe


def _load(args) -> dict:
    if args.cifar_npz:
        return load_npz_arrays(args.cifar_npz, NPZ_KEYS, "--recipe")
    X_train, y_train, X_test, y_test = data_utils.load_CIFAR10(data_utils.find_CIFAR10(args.data_dir), "float32")
    return {"X_train": X_train, "y_train": y_train, "X_test": X_test, "y_test": y_test}


def _torch_side(backend, data, tf32):
    import torch

    from xpnet.recipes import fast94_torch

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    device = torch.device("cuda", backend.device.id) if backend.is_gpu else torch.device("cpu")

    def moved(images):
        return fast94_torch.normalize(torch.as_tensor(np.asarray(images, dtype=np.float32), device=device))

    arrays = (
        moved(data["X_train"]),
        torch.as_tensor(np.asarray(data["y_train"], dtype=np.int64), device=device),
        moved(data["X_test"]),
        torch.as_tensor(np.asarray(data["y_test"], dtype=np.int64), device=device),
    )
    return torch, fast94_torch, arrays


def _epochs(settings, epochs):
    """``settings`` with ``epochs`` (None: as they are)."""
    return settings if epochs is None else settings.with_overrides({"epochs": epochs})


def recipe_runs(backend, args, on_progress=None) -> dict:
    """Warm up each side once, then ``args.runs`` interleaved runs; returns the report, and
    passes the report so far to ``on_progress`` after each run (so that a run cut short by a
    time limit keeps what it measured)."""
    flags = [("tf32", bool(args.tf32)), ("conv_autotune", bool(args.conv_autotune))]
    settings = Fast94Settings().with_overrides(dict([*args.recipe_set, *flags]))
    data = _load(args)
    ours = device_data(backend, data, settings.dtype)

    def xpnet_side(side_settings):
        """A side's run: ``(seed, epochs)``, epochs None for the recipe's own."""
        return lambda seed, epochs=None: timed_run(backend, _epochs(side_settings, epochs), seed, *ours)

    sides = {"xpnet": xpnet_side(settings)}
    if backend.is_gpu and not (settings.cudnn or settings.conv_autotune) and cudnn_available(backend):
        # The same recipe with cuDNN's convolutions: which of xpnet's two paths to keep is measured here too
        # (autotuning chooses between them convolution by convolution).
        sides["xpnet-cudnn"] = xpnet_side(settings.with_overrides({"cudnn": True}))
    if backend.is_gpu and settings.activation_dtype is None:
        # Beside PyTorch's fp16 row: float16 activations, float32 weights (the "if it pays").
        sides["xpnet-fp16"] = xpnet_side(settings.with_overrides({"activation_dtype": "float16"}))
    if not args.no_torch:
        torch, fast94_torch, theirs = _torch_side(backend, data, bool(args.tf32))
        sides["torch"] = lambda seed, epochs=None: fast94_torch.fast94_torch(*theirs, _epochs(settings, epochs), seed)
        if backend.is_gpu:
            sides["torch-fp16"] = lambda seed, epochs=None: fast94_torch.fast94_torch(
                *theirs, _epochs(settings, epochs), seed, dtype=torch.float16, channels_last=True
            )
    if args.recipe_sides:
        unknown = sorted(set(args.recipe_sides) - set(sides))
        if unknown:
            raise ValueError(f"--recipe-sides: no side {', '.join(unknown)} here (there are: {', '.join(sides)})")
        sides = {name: run for name, run in sides.items() if name in args.recipe_sides}
    failures: dict = {}
    graphs = settings.cuda_graph is not False and backend.can_capture

    def attempt(name, seed, epochs=None):
        """One run of a side, or None once the side has failed: its error goes in the report
        and the other sides go on. xpnet failing with CUDA graphs (a capture refused, say) is
        tried once more without them, so that it is measured eagerly rather than not at all."""
        try:
            with divergence_said_once():  # a diverged run is said on its line and in the table
                return sides[name](seed, epochs)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if name == "xpnet" and graphs and "xpnet with CUDA graphs" not in failures:
                failures["xpnet with CUDA graphs"] = error
                print(f"xpnet with CUDA graphs failed ({error}); xpnet runs eagerly", flush=True)
                sides[name] = xpnet_side(settings.with_overrides({"cuda_graph": False}))
                return attempt(name, seed, epochs)
            failures[name] = error
            print(f"{name} failed: {error}", flush=True)
            del sides[name]
            return None

    for name in list(sides) if not args.no_warmup else ():
        print(f"warm-up: {name}", flush=True)
        attempt(name, 10_000, args.warmup_epochs)
    runs: dict[str, list] = {name: [] for name in sides}

    def report() -> dict:
        measured = {name: rows for name, rows in runs.items() if rows}
        summary = {
            name: {
                "mean_accuracy": statistics.fmean(x["test_accuracy"] for x in rows),
                "mean_seconds": statistics.fmean(x["seconds"] for x in rows),
            }
            for name, rows in measured.items()
        }
        return {"settings": {k: v for k, v in vars(settings).items()}, "runs": measured, "summary": summary,
                "warmup": not args.no_warmup, "warmup_epochs": args.warmup_epochs, "failures": dict(failures),
                "train_images": int(ours[0].shape[0]), "test_images": int(ours[2].shape[0])}  # fmt: skip

    for r in range(args.runs):
        for name in list(sides):
            result = attempt(name, r)
            if result is None:
                continue
            runs[name].append(result.figures())  # with "diverged" where it did: the table marks it
            print(f"run {r} {name}: {result.test_accuracy:.4f} in {result.seconds:.3f} s"
                  + (f" ({result.diverged})" if result.diverged else ""), flush=True)  # fmt: skip
            if on_progress is not None:
                on_progress(report())
    return report()


def format_recipe_table(report: dict) -> str:
    """Per run and on average: accuracy and seconds of each side, and xpnet's time over
    PyTorch's; then what failed, if anything."""
    names = list(report["runs"])
    failed = [f"failed: {name}: {error}" for name, error in report.get("failures", {}).items()]
    if not names:
        return "\n".join(["no side completed a run", *failed])
    head = "| run | " + " | ".join(f"{n} acc | {n} s" for n in names)
    has_torch = "torch" in names and "xpnet" in names
    head += " | xpnet/torch s |" if has_torch else " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(names) + has_torch)]
    count = min((len(rows) for rows in report["runs"].values()), default=0)

    def row(label, accuracies, seconds, diverged=()):
        cells = [f"{a:.2%}{' diverged' if d else ''} | {s:.3f}"
                 for a, s, d in zip(accuracies, seconds, diverged or [False] * len(names))]  # fmt: skip
        ratio = f" | {seconds[names.index('xpnet')] / seconds[names.index('torch')]:.2f} |" if has_torch else " |"
        return f"| {label} | " + " | ".join(cells) + ratio

    for r in range(count):
        rows = [report["runs"][n][r] for n in names]
        lines.append(row(str(r), [x["test_accuracy"] for x in rows], [x["seconds"] for x in rows],
                         ["diverged" in x for x in rows]))  # fmt: skip
    summary = report["summary"]
    lines.append(row("mean", [summary[n]["mean_accuracy"] for n in names], [summary[n]["mean_seconds"] for n in names]))
    return "\n".join(lines + _accuracy_differences(report["runs"]) + failed)


def mean_difference(a: list, b: list) -> tuple[float, float | None]:
    """mean(a) - mean(b) and its standard error (each side's sample variance over its
    number of runs, as Welch's test takes it); None with fewer than two runs a side."""
    difference = statistics.fmean(a) - statistics.fmean(b)
    if min(len(a), len(b)) < 2:
        return difference, None
    return difference, math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))


def _accuracy_differences(runs: dict) -> list[str]:
    """A line for each side beside PyTorch's in the same precision: the difference of the mean
    accuracies with its standard error, so that a reader sees whether the runs settle it."""
    lines = []
    for ours, theirs in COMPARED:
        if runs.get(ours) and runs.get(theirs):
            a, b = ([100 * x["test_accuracy"] for x in runs[name]] for name in (ours, theirs))
            difference, error = mean_difference(a, b)
            spread = "" if error is None else f" ± {error:.2f}"
            lines.append(f"accuracy {ours} - {theirs}: {difference:+.2f}{spread} points "
                         f"(difference of the means{', ± its standard error' if spread else ''}; "
                         f"{len(a)} and {len(b)} runs)")  # fmt: skip
    return lines
