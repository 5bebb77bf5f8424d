#!/usr/bin/env python3
"""Train a network with xpnet's Solver.

python scripts/train.py                                  # bundled digits, numpy, < 10 s
python scripts/train.py --backend cupy --dataset cifar10 --data-dir ~/data
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

try:
    import xpnet
except ImportError:  # run from a checkout without `pip install -e .`: use the package beside this script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import xpnet
from xpnet import data_utils
from xpnet.solver import Solver

# Defaults that work well for each data set (a flag on the command line wins).
DATASET_DEFAULTS = {
    "digits": {"hidden_dims": [100], "lr": 3e-3, "batch_size": 100, "epochs": 20, "weight_scale": 1e-2},
    "cifar10": {"hidden_dims": [200], "lr": 1e-4, "batch_size": 200, "epochs": 10, "weight_scale": 1e-3},
}
UPDATE_RULES = ["sgd", "sgd_momentum", "sgd_nesterov_momentum", "rmsprop", "adam"]


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def dropout_probability(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"is the probability of dropping a unit, in [0, 1); got {text}")
    return value


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--backend",
        default=None,
        help="numpy | cupy | cupy:N | torch | torch:cuda | ... (default: $XPNET_BACKEND, else numpy)",
    )
    p.add_argument("--dataset", choices=["digits", "cifar10"], default="digits")
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-py (else $XPNET_DATA_DIR, ~/.cache/xpnet)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 if it is not found")
    p.add_argument("--num-train", type=positive_int, default=None, help="training rows (CIFAR-10 default 49000)")
    p.add_argument("--model", choices=["twolayer", "fc"], default="fc")
    p.add_argument(
        "--hidden-dims",
        type=positive_int,
        nargs="+",
        help="hidden layer sizes (default: 100 for digits, 200 for CIFAR-10)",
    )
    p.add_argument("--normalization", choices=["batchnorm", "layernorm"], default=None)
    p.add_argument("--dropout", type=dropout_probability, default=0.0, help="probability of dropping a unit")
    p.add_argument(
        "--weight-scale",
        type=positive_float,
        help="std of the initial weights (default: 1e-2 for digits, 1e-3 for CIFAR-10)",
    )
    p.add_argument("--update-rule", choices=UPDATE_RULES, default="adam")
    p.add_argument("--lr", type=positive_float, help="learning rate (default: 3e-3 digits, 1e-4 CIFAR-10)")
    p.add_argument("--lr-decay", type=positive_float, default=0.95)
    p.add_argument("--reg", type=non_negative_float, default=0.0, help="L2 regularisation strength")
    p.add_argument("--batch-size", type=positive_int, help="(default: 100 digits, 200 CIFAR-10)")
    p.add_argument("--epochs", type=positive_int, help="(default: 20 digits, 10 CIFAR-10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--print-every", type=positive_int, default=100)
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each training step as a CUDA graph (cupy backend)",
    )
    p.add_argument("--checkpoint-dir", help="write a checkpoint here after each epoch")
    p.add_argument("--resume", metavar="PATH", help="continue from a checkpoint file")
    p.add_argument("--plot", metavar="PNG", help="save loss and accuracy curves")
    p.add_argument("--log", metavar="JSONL", help="write one JSON line per logging point")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    return p


def load_data(args):
    if args.dataset == "digits":
        return data_utils.load_digits_data(seed=args.seed)
    kwargs = {} if args.num_train is None else {"num_training": args.num_train}
    return data_utils.get_CIFAR10_data(args.data_dir, download=args.download, **kwargs)


def build_model(args, data, backend):
    input_dim = 1
    for d in data["X_train"].shape[1:]:
        input_dim *= d
    num_classes = 10
    hidden = args.hidden_dims
    weight_scale = args.weight_scale
    backend.seed(args.seed)  # reproducible initialisation (the nets draw from the shared generator)
    common = dict(
        input_dim=input_dim,
        num_classes=num_classes,
        dropout=args.dropout,
        reg=args.reg,
        weight_scale=weight_scale,
        dtype="float32",
        backend=backend,
    )
    if args.model == "twolayer":
        if len(hidden) != 1 or args.normalization:
            raise ValueError("--model twolayer takes one hidden size and no --normalization; use --model fc")
        return xpnet.TwoLayerNet(hidden_dims=hidden[0], **common)
    return xpnet.FullyConnectedNet(hidden, normalization=args.normalization, **common)


def make_solver(args, model, data, checkpoint_name, on_log):
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
        cuda_graph=args.cuda_graph,
    )


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        backend = xpnet.get_backend(args.backend)
    except (ValueError, ImportError, RuntimeError) as exc:
        parser.error(str(exc))
    print(f"backend: {backend.name} ({backend.device_name})", flush=True)

    try:
        data = load_data(args)
        model = build_model(args, data, backend)
    except (OSError, ValueError, ImportError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(
        f"data: {args.dataset}, {data['X_train'].shape[0]} train / {data['X_val'].shape[0]} val / "
        f"{data['X_test'].shape[0]} test; model: {args.model} {args.hidden_dims}",
        flush=True,
    )

    log_file = open(args.log, "w") if args.log else None  # noqa: SIM115 (closed below)

    def on_log(record):
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    checkpoint_name = None
    if args.checkpoint_dir:
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        checkpoint_name = os.path.join(args.checkpoint_dir, f"{args.dataset}_{args.model}")
    try:
        solver = make_solver(args, model, data, checkpoint_name, on_log)
    except ValueError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    if args.resume:
        try:
            solver.resume(args.resume)
        except (OSError, ValueError) as exc:
            parser.exit(2, f"{parser.prog}: error: {exc}\n")
        print(f"resumed from {args.resume} at epoch {solver.epoch}")

    start = time.perf_counter()
    solver.train()
    backend.sync()
    wall = time.perf_counter() - start
    test_acc = solver.check_accuracy(data["X_test"], data["y_test"])
    if log_file is not None:
        on_log({"iteration": solver.iteration, "epoch": solver.epoch, "test_acc": test_acc, "wall_s": wall})
        log_file.close()
    if solver.diverged:
        print(solver.diverged, file=sys.stderr)
    print(f"best val acc: {solver.best_val_acc:.4f}")
    print(f"test acc: {test_acc:.4f}")
    print(f"wall time: {wall:.2f} s for {solver.epoch} epochs ({solver.iteration} iterations)")
    if args.plot:
        from xpnet.vis_utils import plot_history

        plot_history(solver, args.plot, title=f"{args.dataset} {args.model} on {backend.name}")
        print(f"plot: {args.plot}")
    return 0 if not solver.diverged else 1


if __name__ == "__main__":
    sys.exit(main())
