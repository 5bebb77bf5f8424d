"""Search hyper-parameters with Optuna, trials in this process or on Dask workers
(the ``xpnet-sweep`` command, or ``python scripts/sweep.py``).

xpnet-sweep --dataset digits --trials 20 --space "lr=loguniform(1e-4,1e-2)" --space "hidden_dims=choice(50,100,200)"
xpnet-sweep --dataset cifar10 --data-dir ~/data --model twolayer --trials 24 --workers 2 \\
    --space "lr=loguniform(1e-4,3e-3)" --space "hidden_dims=choice(200,500,1000)" --space "reg=loguniform(1e-5,1e-1)"

Search space grammar (one --space each, or a JSON/YAML file with --space-file):
  name=loguniform(a,b) | uniform(a,b) | int(a,b) | intlog(a,b) | choice(v1,v2,...) | name=value
  names: lr, lr_decay, reg, weight_scale, dropout, batch_size, epochs, hidden_dims (100 or 512x256),
         model, normalization (none|batchnorm|layernorm), update_rule, num_filters, filter_size
Run the same command again to continue a sweep that was stopped: --trials is the study's total.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys

from xpnet.cli.common import (
    HelpFormatter,
    UsageError,
    check_output_folder,
    non_negative_int,
    positive_int,
    user_path,
)
from xpnet.experiment import DATASETS, MODELS, Experiment

INSTALL_HINT = 'xpnet-sweep needs Optuna and Dask: pip install "xpnet[tune]"'


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="digits", help="data set to train on")
    p.add_argument(
        "--data-dir", type=user_path, help="folder holding cifar-10-batches-py (else $XPNET_DATA_DIR, ~/.cache/xpnet)"
    )
    p.add_argument("--num-train", type=positive_int, help="training rows of CIFAR-10 (default 49000)")
    p.add_argument("--model", choices=MODELS, default="fc", help="network, unless the space searches it")
    p.add_argument("--backend", help="backend of every trial (default: $XPNET_BACKEND, else numpy)")
    p.add_argument("--space", action="append", default=[], metavar="NAME=DIST", help="one searched setting")
    p.add_argument("--space-file", type=user_path, help="the search space as a JSON or YAML file")
    p.add_argument("--trials", type=positive_int, default=20, help="finished trials the study should hold")
    p.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe", help="Optuna's search")
    p.add_argument(
        "--pruner", choices=["median", "halving", "none"], default="median", help="stopping poor trials at epoch ends"
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="seeds the sampler and every trial's training")
    p.add_argument(
        "--workers", type=non_negative_int, default=0, help="run trials on a local Dask cluster of N processes"
    )
    p.add_argument("--scheduler", metavar="ADDRESS", help="run trials on an existing Dask cluster (tcp://host:8786)")
    p.add_argument("--trials-per-gpu", type=non_negative_int, default=0, help="K concurrent trials on each GPU (cupy)")
    p.add_argument(
        "--storage",
        type=user_path,
        help="Optuna storage: a journal file path, or an RDB URL (sqlite:///..., postgresql://...) "
        "(default: OUT/study.journal)",
    )
    p.add_argument("--study-name", default="xpnet-sweep", help="the study's name in the storage")
    p.add_argument("--out", type=user_path, default="runs/sweep", help="run folder: trials.csv, plots, the best model")
    p.add_argument("--no-plots", action="store_true", help="skip Optuna's plots")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    from xpnet.tune.space import SearchSpace, SpaceError, load_space_file, parse_space
    from xpnet.tune.sweep import SweepConfig

    # The final test accuracy is measured on all 10,000 CIFAR-10 test images.
    experiment = Experiment(dataset=args.dataset, data_dir=args.data_dir, num_train=args.num_train, num_test=10000,
                            model=args.model, seed=args.seed)  # fmt: skip
    config = SweepConfig(
        space=SearchSpace([]), experiment=experiment, trials=args.trials, sampler=args.sampler, pruner=args.pruner,
        seed=args.seed, out=args.out, storage=args.storage, study_name=args.study_name, workers=args.workers,
        scheduler=args.scheduler, trials_per_gpu=args.trials_per_gpu, backend=args.backend,
        plots=not args.no_plots, verbose=not args.quiet,
    )  # fmt: skip
    try:  # settings that cannot run, a backend that is not installed: before the space is even read
        config.check()
    except (ValueError, TypeError, ImportError, RuntimeError) as exc:
        parser.error(str(exc))

    try:
        space = parse_space(args.space)
        if args.space_file:
            from_file = load_space_file(args.space_file)
            clash = sorted(set(from_file.dimensions) & set(space.dimensions))
            if clash:
                raise SpaceError(f"{clash} are given both in --space-file and as --space")
            space = SearchSpace([*from_file.dimensions.values(), *space.dimensions.values()])
        if not space.dimensions:
            raise SpaceError("the search space is empty: give --space NAME=DIST or --space-file")
        if args.sampler == "grid":
            space.grid()
    except SpaceError as exc:
        parser.error(str(exc))
    try:
        import distributed  # noqa: F401
        import optuna  # noqa: F401
    except ImportError:
        parser.exit(2, f"{parser.prog}: error: {INSTALL_HINT}\n")
    from xpnet.tune import run_sweep

    try:  # the study and the reports go there: a folder that cannot take them fails before any trial
        check_output_folder("--out", args.out)
    except UsageError as exc:
        parser.error(str(exc))

    try:
        summary = run_sweep(dataclasses.replace(config, space=space))
    except KeyboardInterrupt:
        sys.stderr.write(f"{parser.prog}: interrupted; run the same command again to continue the study\n")
        return 128 + signal.SIGINT
    except (ValueError, ImportError, RuntimeError, OSError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    if args.quiet and "best_val_acc" in summary:
        print(f"test acc of the best model: {summary['test_acc']:.4f}")
        print(f"best val acc: {summary['best_val_acc']:.4f}")
    if not summary.get("complete"):
        if args.quiet:  # the report said so; a quiet run ended with status 1 and not a word
            trials_csv = os.path.join(summary["out"], "trials.csv")
            sys.stderr.write(f"{parser.prog}: no trial completed; see {trials_csv} for the errors\n")
        return 1
    return 0
