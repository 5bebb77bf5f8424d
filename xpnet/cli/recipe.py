"""``xpnet-train --recipe fast94``: the fast CIFAR-10 recipe from the command line."""

from __future__ import annotations

import os
import sys
from typing import Any

from xpnet import data_utils
from xpnet.cli.common import conv_paths_chosen, format_conv_paths
from xpnet.recipes import Fast94Settings, fast94, save_fast94_model
from xpnet.training.guard import divergence_said_once

RECIPES = ("fast94",)

# The recipe fixes its own network, optimiser and schedule: these flags have no meaning with it.
NOT_FOR_RECIPES = {
    "model": "--model",
    "hidden_dims": "--hidden-dims",
    "normalization": "--normalization",
    "dropout": "--dropout",
    "weight_scale": "--weight-scale",
    "update_rule": "--update-rule",
    "lr": "--lr",
    "lr_decay": "--lr-decay",
    "reg": "--reg",
    "num_filters": "--num-filters",
    "filter_size": "--filter-size",
    "resume": "--resume",
    "plot": "--plot",
}


def parse_setting(text: str) -> tuple:
    """'widths=8,16,16' -> ('widths', (8, 16, 16)); numbers become int or float."""
    if "=" not in text:
        raise ValueError(f"--recipe-set takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)

    def number(v):
        try:
            return int(v)
        except ValueError:
            return float(v)

    try:
        parsed = tuple(number(v) for v in value.split(",")) if "," in value else number(value)
    except ValueError:
        parsed = {"true": True, "false": False}.get(value.lower(), value)
    return key, parsed


# Settings with a flag of their own: --recipe-set does not take them, so that one value is given once.
SETTINGS_WITH_FLAGS = {"epochs": "--epochs", "batch_size": "--batch-size", "tf32": "--tf32", "cudnn": "--cudnn",
                       "conv_autotune": "--conv-autotune", "activation_dtype": "--fp16",
                       "cuda_graph": "--cuda-graph"}  # fmt: skip


def recipe_settings(texts, flags: dict = SETTINGS_WITH_FLAGS) -> dict:
    """--recipe-set's KEY=VALUE texts as checked overrides of the recipe's settings; a
    malformed text, an unknown name, a value of the wrong kind or a setting that the command
    sets with one of its ``flags`` is refused with a ValueError that names it."""
    overrides = dict(parse_setting(text) for text in texts)
    flagged = [f"{key} (use {flags[key]})" for key in overrides if key in flags]
    if flagged:
        has = "has a flag of its own" if len(flagged) == 1 else "have flags of their own"
        raise ValueError(f"--recipe-set: {', '.join(flagged)} {has}")
    Fast94Settings().with_overrides(overrides)
    return overrides


def refused_flags(parser, args) -> list:
    """The flags given that a recipe does not take."""
    return [flag for key, flag in NOT_FOR_RECIPES.items() if getattr(args, key) != parser.get_default(key)]


def load_cifar10(args) -> dict:
    """All 50,000 training images and all 10,000 test images (or the first --num-train and
    --num-test of them), pixels 0..255."""
    try:
        root = data_utils.find_CIFAR10(args.data_dir)
    except FileNotFoundError:
        if not args.download:
            raise
        root = data_utils.download_CIFAR10(args.data_dir)
    X_train, y_train, X_test, y_test = data_utils.load_CIFAR10(root, dtype="float32")
    X_train, y_train = _first_rows("--num-train", args.num_train, X_train, y_train, "training")
    X_test, y_test = _first_rows("--num-test", args.num_test, X_test, y_test, "test")
    return {"X_train": X_train, "y_train": y_train, "X_test": X_test, "y_test": y_test}


def _first_rows(flag, count, X, y, split):
    """The first ``count`` rows of (X, y) (all of them for None); ValueError beyond the split's size."""
    if count is None:
        return X, y
    if count > X.shape[0]:
        raise ValueError(f"{flag} {count} exceeds the {X.shape[0]} {split} images of CIFAR-10")
    return X[:count], y[:count]


def model_path(args) -> str:
    """Where ``--checkpoint-dir`` puts the trained network: ``<dir>/<recipe>.npz``."""
    return os.path.join(args.checkpoint_dir, f"{args.recipe}.npz")


def run_recipe(args, backend, data, log=None, progress=print) -> int:
    """Run ``args.recipe`` on ``data`` and print (and log) its result; off a GPU, where a run
    takes minutes to hours, ``progress`` hears of each epoch and of the evaluation."""
    overrides: dict[str, Any] = {
        "tf32": bool(args.tf32),
        "cudnn": bool(args.cudnn),
        "conv_autotune": bool(args.conv_autotune),
    }
    if args.cuda_graph:
        overrides["cuda_graph"] = True
    if args.fp16:
        overrides["activation_dtype"] = "float16"
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    overrides.update(recipe_settings(args.recipe_set))
    progress = None if backend.is_gpu else progress
    with divergence_said_once():  # said below, once, without the array library's overflow warnings
        result = fast94(data, backend=backend, seed=args.seed, progress=progress, **overrides)
    print(f"{args.recipe}: test accuracy {result.test_accuracy:.4f} (TTA, {data['X_test'].shape[0]} images)")
    print(
        f"timed: {result.seconds:.2f} s = whitening {result.whiten_seconds:.2f} + training "
        f"{result.train_seconds:.2f} ({result.steps} steps, {result.epochs:.2f} epochs) + evaluation "
        f"{result.eval_seconds:.2f}"
    )
    if args.conv_autotune:
        print(format_conv_paths(conv_paths_chosen(backend)))
    if log is not None:
        precision = "float16" if args.fp16 else "float32"
        log(dict(recipe=args.recipe, backend=backend.name, device=backend.device_name, activations=precision,
                 **result.figures()))  # fmt: skip
    if result.diverged:  # nothing worth keeping: no model file either
        print(result.diverged, file=sys.stderr)
        return 1
    if args.checkpoint_dir:
        print(f"model: {save_fast94_model(model_path(args), result)}")
    return 0
