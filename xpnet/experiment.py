"""One training run described by its settings: the data set, the model and the
Solver that ``xpnet-train`` builds from its flags, and a sweep's trial from its
hyper-parameters. Both go through these functions, so a trial trains exactly as
the command would with the same flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import data_utils
from .cnn import ThreeLayerConvNet
from .fc_net import FullyConnectedNet, TwoLayerNet
from .solver import Solver

__all__ = [
    "Experiment",
    "DATASETS",
    "MODELS",
    "NORMALIZATIONS",
    "UPDATE_RULES",
    "DATASET_DEFAULTS",
    "CNN_DEFAULTS",
    "apply_defaults",
    "load_data",
    "check_model_settings",
    "build_model",
    "make_solver",
]

DATASETS = ("digits", "cifar10")
MODELS = ("twolayer", "fc", "cnn")
NORMALIZATIONS = ("batchnorm", "layernorm")
UPDATE_RULES = ("sgd", "sgd_momentum", "sgd_nesterov_momentum", "nesterov_sgd", "rmsprop", "adam")

# Defaults that work well for each data set (a flag on the command line wins).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"hidden_dims": [100], "lr": 3e-3, "batch_size": 100, "epochs": 20, "weight_scale": 1e-2},
    "cifar10": {"hidden_dims": [200], "lr": 1e-4, "batch_size": 200, "epochs": 10, "weight_scale": 1e-3},
}
# ThreeLayerConvNet: on CIFAR-10 the course's settings (one epoch reaches about 40% or more).
CNN_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"num_filters": 16, "filter_size": 5, "weight_scale": 1e-1},
    "cifar10": {"num_filters": 32, "filter_size": 7, "hidden_dims": [500], "lr": 1e-3, "batch_size": 50, "epochs": 1},
}


@dataclass
class Experiment:
    """The settings of one run; None means "the data set's (and model's) default"."""

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    num_train: int | None = None
    num_test: int | None = None  # CIFAR-10 test rows (None: get_CIFAR10_data's 1000)
    model: str = "fc"
    hidden_dims: list | None = None
    num_filters: int | None = None
    filter_size: int | None = None
    normalization: str | None = None
    dropout: float | None = None
    weight_scale: float | None = None
    update_rule: str = "adam"
    lr: float | None = None
    lr_decay: float = 0.95
    reg: float = 0.0
    batch_size: int | None = None
    epochs: int | None = None
    seed: int = 0
    print_every: int = 100
    quiet: bool = True
    cuda_graph: bool = False


def apply_defaults(args) -> None:
    """Fill the settings not given with the defaults of the data set and the model."""
    defaults = dict(DATASET_DEFAULTS[args.dataset])
    if args.model == "cnn":
        defaults.update(CNN_DEFAULTS[args.dataset])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def load_data(args) -> dict:
    """The data set as the Solver takes it (NumPy arrays): images (N, C, H, W) for the conv net."""
    if args.dataset == "digits":
        return data_utils.load_digits_data(seed=args.seed, images=args.model == "cnn")
    kwargs = {} if args.num_train is None else {"num_training": args.num_train}
    if getattr(args, "num_test", None) is not None:
        kwargs["num_test"] = args.num_test
    return data_utils.get_CIFAR10_data(args.data_dir, download=args.download, **kwargs)


def check_model_settings(args) -> None:
    """ValueError, naming the setting, where ``args.model`` cannot be built as the settings
    ask: xpnet-train refuses such a command before it loads data, and a sweep trial fails
    with it. (Settings a model does not have at all, such as num_filters for fc, are the
    command's to refuse: a sweep over several models gives every trial all of them.)"""
    model, hidden_dims, normalization = args.model, args.hidden_dims, args.normalization
    if model in ("twolayer", "cnn") and hidden_dims is not None and len(hidden_dims) != 1:
        raise ValueError(f"--model {model} takes one hidden size, got --hidden-dims {list(hidden_dims)}")
    if model == "twolayer" and normalization:
        raise ValueError("--model twolayer takes no --normalization; use --model fc")
    if model == "cnn" and normalization not in (None, "batchnorm"):
        raise ValueError(f"--model cnn normalises with batchnorm only, not --normalization {normalization}")


def build_model(args, data, backend):
    """The network ``args.model`` describes, for the samples in ``data``, on ``backend``."""
    check_model_settings(args)
    rng = backend.rng(args.seed)  # the initial weights; the Solver seeds its own generators
    if args.model == "cnn":
        return ThreeLayerConvNet(
            input_dim=tuple(data["X_train"].shape[1:]),
            num_filters=args.num_filters,
            filter_size=args.filter_size,
            hidden_dim=args.hidden_dims[0],
            weight_scale=args.weight_scale,
            reg=args.reg,
            use_batchnorm=args.normalization == "batchnorm",
            backend=backend,
            rng=rng,
        )
    input_dim = 1
    for d in data["X_train"].shape[1:]:
        input_dim *= d
    common = dict(
        input_dim=input_dim,
        num_classes=10,
        dropout=args.dropout or 0.0,
        reg=args.reg,
        weight_scale=args.weight_scale,
        dtype="float32",
        backend=backend,
        rng=rng,
    )
    if args.model == "twolayer":
        return TwoLayerNet(hidden_dims=args.hidden_dims[0], **common)
    return FullyConnectedNet(args.hidden_dims, normalization=args.normalization, **common)


def make_solver(args, model, data, checkpoint_name=None, on_log=None, callbacks=()) -> Solver:
    return Solver(
        model,
        data,
        update_rule=args.update_rule,
        optim_config={"learning_rate": args.lr},
        lr_decay=args.lr_decay,
        batch_size=args.batch_size,
        num_epochs=args.epochs,
        print_every=args.print_every,
        seed=args.seed,
        checkpoint_name=checkpoint_name,
        verbose=not args.quiet,
        on_log=on_log,
        callbacks=list(callbacks),
        cuda_graph=args.cuda_graph,
    )
