"""Train a network with xpnet's Solver (the ``xpnet-train`` command, or ``python scripts/train.py``).

xpnet-train                                              # bundled digits, numpy, < 10 s
xpnet-train --backend cupy --dataset cifar10 --data-dir ~/data
xpnet-train --backend cupy --dataset cifar10 --recipe fast94   # the fast CIFAR-10 recipe
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import warnings

import xpnet
from xpnet import data_utils
from xpnet.checkpoint import check_checkpoint_file
from xpnet.cli.common import (
    HelpFormatter,
    UsageError,
    check_output_file,
    check_output_folder,
    conv_paths_chosen,
    format_conv_paths,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    user_path,
)
from xpnet.cli.metrics_log import MetricsLog
from xpnet.cli.recipe import RECIPES, load_cifar10, model_path, recipe_settings, refused_flags, run_recipe
from xpnet.experiment import (
    MODELS,
    UPDATE_RULES,
    apply_defaults,
    build_model,
    check_model_settings,
    load_data,
    make_solver,
)
from xpnet.training.guard import divergence_said_once
from xpnet.vis_utils import plotting_unavailable

# Defaults that work well for each data set (a flag on the command line wins).
CNN_ONLY_FLAGS = {"num_filters": "--num-filters", "filter_size": "--filter-size"}
FC_ONLY_FLAGS = {"dropout": "--dropout"}


def odd_filter_size(text):
    """An argparse type: a positive odd integer, so that ThreeLayerConvNet's convolution keeps the size."""
    value = positive_int(text)
    if value % 2 == 0:
        raise argparse.ArgumentTypeError(f"must be odd so the convolution keeps the image size, got {text}")
    return value


def dropout_probability(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"is the probability of dropping a unit, in [0, 1); got {text}")
    return value


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--backend",
        default=None,
        help="numpy | cupy | cupy:N | torch | torch:cuda | ... (default: $XPNET_BACKEND, else numpy)",
    )
    p.add_argument("--dataset", choices=["digits", "cifar10"], default="digits", help="data set to train on")
    p.add_argument(
        "--recipe",
        choices=RECIPES,
        help="a complete recipe instead of a model and Solver settings: fast94 is the fast CIFAR-10 recipe "
        "(all 50,000 training images, TTA on the 10,000 test images; --epochs, --batch-size, --seed, "
        "--num-train, --num-test, --tf32, --cudnn, --conv-autotune, --fp16, --cuda-graph and --recipe-set adjust it)",
    )
    p.add_argument(
        "--recipe-set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override another setting of --recipe, e.g. widths=16,32,32 or tta_level=1 (repeatable)",
    )
    p.add_argument(
        "--data-dir", type=user_path, help="folder holding cifar-10-batches-py (else $XPNET_DATA_DIR, ~/.cache/xpnet)"
    )
    p.add_argument("--download", action="store_true", help="download CIFAR-10 if it is not found")
    p.add_argument("--num-train", type=positive_int, default=None, help="training rows (CIFAR-10 default 49000)")
    p.add_argument(
        "--num-test",
        type=positive_int,
        default=None,
        help="test rows, the first of the 10,000 (CIFAR-10 default 1000, all 10,000 for --recipe)",
    )
    p.add_argument(
        "--model",
        choices=MODELS,
        default="fc",
        help="network: TwoLayerNet, FullyConnectedNet or ThreeLayerConvNet",
    )
    p.add_argument(
        "--num-filters", type=positive_int, help="convolution filters of --model cnn (default: 16 digits, 32 CIFAR-10)"
    )
    p.add_argument(
        "--filter-size", type=odd_filter_size, help="odd filter size of --model cnn (default: 5 digits, 7 CIFAR-10)"
    )
    p.add_argument(
        "--hidden-dims",
        type=positive_int,
        nargs="+",
        help="hidden layer sizes; one for twolayer and cnn (default: 100 digits, 200 CIFAR-10, 500 cnn CIFAR-10)",
    )
    p.add_argument(
        "--normalization",
        choices=["batchnorm", "layernorm"],
        help="normalisation of the hidden layers; --model cnn: batchnorm, after its convolution too (default: none)",
    )
    p.add_argument("--dropout", type=dropout_probability, help="probability of dropping a unit (default: 0)")
    p.add_argument(
        "--weight-scale",
        type=positive_float,
        help="std of the initial weights (default: 1e-2 for digits, 1e-3 for CIFAR-10)",
    )
    p.add_argument("--update-rule", choices=UPDATE_RULES, default="adam", help="update rule from xpnet.optim")
    p.add_argument("--lr", type=positive_float, help="learning rate (default: 3e-3 digits, 1e-4 CIFAR-10)")
    p.add_argument("--lr-decay", type=positive_float, default=0.95, help="learning-rate factor after each epoch")
    p.add_argument("--reg", type=non_negative_float, default=0.0, help="L2 regularisation strength")
    p.add_argument("--batch-size", type=positive_int, help="minibatch size (default: 100 digits, 200 CIFAR-10)")
    p.add_argument("--epochs", type=positive_int, help="passes over the training set (default: 20 digits, 10 CIFAR-10)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seeds initialisation, minibatches and dropout")
    p.add_argument("--print-every", type=positive_int, default=100, help="iterations between loss log lines")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each training step as a CUDA graph (cupy backend)",
    )
    p.add_argument(
        "--tf32",
        action="store_true",
        help="let float32 matrix products and convolutions use TF32 tensor cores (CUDA; off: exact float32)",
    )
    p.add_argument(
        "--cudnn",
        action="store_true",
        help='run convolutions through cuDNN instead of im2col + cuBLAS (cupy; pip install "xpnet[cudnn12]")',
    )
    p.add_argument(
        "--conv-autotune",
        action="store_true",
        help="run each convolution along the fastest of its paths (direct kernels, cuDNN, im2col), timed the first "
        "time its shape runs (cupy; results may then differ in their last bits from run to run)",
    )
    p.add_argument(
        "--fp16",
        action="store_true",
        help="--recipe fast94 with float16 activations; weights, loss and optimizer stay float32 "
        "(pays on GPUs; numpy and torch run it too)",
    )
    p.add_argument(
        "--checkpoint-dir",
        type=user_path,
        help="write a checkpoint here after each epoch (with --recipe: the trained network, as <recipe>.npz)",
    )
    p.add_argument("--resume", type=user_path, metavar="PATH", help="continue from a checkpoint file")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow --resume to read a checkpoint of the old pickle format: reading a pickle can run any "
        "code the file carries, so only for files you made",
    )
    p.add_argument("--plot", type=user_path, metavar="PNG", help="save loss and accuracy curves")
    p.add_argument("--log", type=user_path, metavar="JSONL", help="write one JSON line per logging point")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    return p


# Flags that only mean something for CIFAR-10 (the digits ship with scikit-learn).
CIFAR10_ONLY_FLAGS = {
    "num_train": "--num-train",
    "num_test": "--num-test",
    "data_dir": "--data-dir",
    "download": "--download",
}


def check_flags_apply(args):
    if args.fp16:
        raise UsageError("--fp16 applies to --recipe fast94 only (its network takes float16 activations)")
    if args.recipe_set:
        raise UsageError("--recipe-set applies to --recipe only")
    if args.dataset != "cifar10":
        for key, flag in CIFAR10_ONLY_FLAGS.items():
            if getattr(args, key):
                raise UsageError(f"{flag} applies to --dataset cifar10 only, not to {args.dataset}")
    only = FC_ONLY_FLAGS if args.model == "cnn" else CNN_ONLY_FLAGS
    for key, flag in only.items():
        if getattr(args, key):
            raise UsageError(f"{flag} does not apply to --model {args.model}")
    try:
        check_model_settings(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def check_row_counts(args, validation_rows):
    """UsageError, before the data is read, for --num-train or --num-test beyond CIFAR-10's
    training images (less ``validation_rows`` kept for validation) or its test images."""
    if args.dataset != "cifar10":
        return
    sizes = data_utils.CIFAR10_SIZES
    beside = f" beside the {validation_rows} that validate" if validation_rows else ""
    limits = (("--num-train", args.num_train, sizes["train"] - validation_rows, f"training images{beside}"),
              ("--num-test", args.num_test, sizes["test"], "test images"))  # fmt: skip
    for flag, count, limit, what in limits:
        if count is not None and count > limit:
            raise UsageError(f"{flag} {count}: CIFAR-10 has {limit} {what}")


def switched_backend(args, keep: bool):
    """The backend of --backend with what --tf32, --cudnn and --conv-autotune ask switched on, or with
    ``keep`` False only tried (on, then off again): a backend without one is refused now, by a
    UsageError, not after minutes of loading data."""
    try:
        backend = xpnet.get_backend(args.backend)
        for asked, switch in (
            (args.tf32, backend.set_tf32),
            (args.cudnn, backend.set_cudnn),
            (args.conv_autotune, backend.set_conv_autotune),
        ):
            if asked:
                switch(True)
                if not keep:
                    switch(False)
    except (ValueError, ImportError, RuntimeError) as exc:
        raise UsageError(str(exc)) from exc
    return backend


def check_cuda_graph(args, backend):
    """UsageError for --cuda-graph on a backend that cannot capture, before any data is loaded."""
    if args.cuda_graph and not backend.can_capture:
        raise UsageError(f"--cuda-graph needs the cupy backend; backend {backend.name!r} cannot capture CUDA graphs")


def _trained(solver, first_epoch: int, first_iteration: int) -> str:
    """What this process trained, for the closing line: after --resume, only the epochs since the checkpoint."""
    epochs, iterations = solver.epoch - first_epoch, solver.iteration - first_iteration
    text = f"{epochs} epoch{'s' * (epochs != 1)} ({iterations} iteration{'s' * (iterations != 1)})"
    return text + (f" after resuming at epoch {first_epoch}" if first_epoch else "")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    run = Run()
    try:
        return run.main(parser, args)
    except UsageError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    except KeyboardInterrupt:
        # Checkpoints are written atomically: the last one on disk is whole.
        sys.stderr.write(f"{parser.prog}: {run.where()}; {run.last_checkpoint()}\n")
        return 128 + signal.SIGINT
    except OSError as exc:  # disk full, folder removed during training
        sys.stderr.write(f"{parser.prog}: error: {exc}; {run.last_checkpoint()}\n")
        return 1
    finally:
        run.close()


class Run:
    """One training run of the command, with what an interruption needs to report."""

    def __init__(self):
        self.solver = None
        self.log = MetricsLog(None)
        self.recipe_progress = None  # a recipe's last progress line, once it has one

    def where(self) -> str:
        if self.recipe_progress is not None:
            return f"interrupted in the recipe after '{self.recipe_progress}'"
        if self.solver is None:
            return "interrupted before training started"
        return f"interrupted at epoch {self.solver.epoch}, iteration {self.solver.iteration}"

    def last_checkpoint(self) -> str:
        path = self.solver.last_checkpoint if self.solver is not None else None
        return f"last good checkpoint: {path}" if path else "no checkpoint was written"

    def on_recipe_progress(self, text):
        self.recipe_progress = text
        print(text, flush=True)

    def close(self):
        self.log.close()

    def on_log(self, record):
        self.log.write(record)

    def main(self, parser, args):
        if args.recipe:
            return self.main_recipe(parser, args)
        check_flags_apply(args)
        check_row_counts(args, validation_rows=data_utils.CIFAR10_VALIDATION_ROWS)
        apply_defaults(args)
        backend = switched_backend(args, keep=True)
        # Everything the run will write is checked before minutes go into loading and training.
        if args.plot:
            check_output_file("--plot", args.plot)
        if args.log:
            check_output_file("--log", args.log, stream=True)
        if args.plot and plotting_unavailable(args.plot):
            raise UsageError(f"--plot: {plotting_unavailable(args.plot)}")
        if args.checkpoint_dir:
            check_output_folder("--checkpoint-dir", args.checkpoint_dir)
        check_cuda_graph(args, backend)
        if args.resume:  # what can be checked of it without the model
            try:
                check_checkpoint_file(args.resume, args.trust_pickle)
            except (OSError, ValueError) as exc:
                raise UsageError(str(exc)) from exc
        self.log = MetricsLog(args.log)
        print(f"backend: {backend.name} ({backend.device_name})", flush=True)

        try:
            data = load_data(args)
            model = build_model(args, data, backend)
        except (OSError, ValueError, ImportError) as exc:
            raise UsageError(str(exc)) from exc
        print(
            f"data: {args.dataset}, {data['X_train'].shape[0]} train / {data['X_val'].shape[0]} val / "
            f"{data['X_test'].shape[0]} test; model: {args.model} {args.hidden_dims}"
            + (f", {args.normalization}" if args.normalization else ""),
            flush=True,
        )
        checkpoint_name = None
        if args.checkpoint_dir:
            checkpoint_name = os.path.join(args.checkpoint_dir, f"{args.dataset}_{args.model}")
        try:
            self.solver = solver = make_solver(args, model, data, checkpoint_name, self.on_log)
            if args.resume:
                solver.resume(args.resume, trust_pickle=args.trust_pickle)
                self.log.continue_after(solver.iteration)
        except (OSError, ValueError) as exc:
            raise UsageError(str(exc)) from exc
        finished = bool(args.resume) and solver.epoch >= args.epochs
        if args.resume:
            print(f"resumed from {args.resume} at epoch {solver.epoch}")
            if args.quiet:  # the Solver prints them itself when verbose
                for change in solver.resume_changes:
                    print(f"resume: {change}")
            if finished:  # said here in the command's terms, not as the Solver's warning
                print(f"nothing to train: the checkpoint has run {solver.epoch} epochs of --epochs {args.epochs}")

        start, first_epoch, first_iteration = time.perf_counter(), solver.epoch, solver.iteration
        with divergence_said_once(), warnings.catch_warnings():  # below, or through the Solver's report
            if finished:
                warnings.filterwarnings("ignore", r"train\(\): nothing to train", UserWarning)
            solver.train()
        backend.sync()
        wall = time.perf_counter() - start
        test_acc = solver.check_accuracy(data["X_test"], data["y_test"])
        final = {"iteration": solver.iteration, "epoch": solver.epoch, "test_acc": test_acc, "wall_s": wall}
        self.on_log(final | ({"diverged": solver.diverged} if solver.diverged else {}))  # as --recipe's record says
        if solver.diverged and args.quiet:  # a verbose Solver has printed it already
            print(solver.diverged, file=sys.stderr)
        print(f"best val acc: {solver.best_val_acc:.4f}")
        print(f"test acc: {test_acc:.4f}")
        print(f"wall time: {wall:.2f} s for {_trained(solver, first_epoch, first_iteration)}")
        if args.conv_autotune:
            print(format_conv_paths(conv_paths_chosen(backend)))
        if args.plot:
            from xpnet.vis_utils import plot_history

            plot_history(solver, args.plot, title=f"{args.dataset} {args.model} on {backend.name}")
            print(f"plot: {args.plot}")
        return 0 if not solver.diverged else 1

    def main_recipe(self, parser, args):
        if args.dataset != "cifar10":
            raise UsageError(f"--recipe {args.recipe} trains on CIFAR-10: add --dataset cifar10")
        refused = refused_flags(parser, args)
        if refused:
            verb = "does" if len(refused) == 1 else "do"
            raise UsageError(
                f"{', '.join(refused)} {verb} not apply to --recipe {args.recipe}: its network and hyper-parameters "
                "are its own settings (--recipe-set KEY=VALUE changes one), and it trains in one run, with no "
                "--resume or --plot"
            )
        check_row_counts(args, validation_rows=0)
        try:
            recipe_settings(args.recipe_set)  # refused now, not after loading the data
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        backend = switched_backend(args, keep=False)  # the recipe switches them itself
        check_cuda_graph(args, backend)
        if args.fp16 and not hasattr(backend.xp, "float16"):
            raise UsageError(f"--fp16: backend {backend.name!r} has no float16 type (numpy, cupy and torch have one)")
        if args.checkpoint_dir:
            check_output_folder("--checkpoint-dir", args.checkpoint_dir)
            check_output_file("--checkpoint-dir", model_path(args))  # one kept read-only would fail the run at its end
        if args.log:
            check_output_file("--log", args.log, stream=True)
        self.log = MetricsLog(args.log)
        print(f"backend: {backend.name} ({backend.device_name})", flush=True)
        try:
            data = load_cifar10(args)
        except (OSError, ValueError) as exc:
            raise UsageError(str(exc)) from exc
        print(f"data: cifar10, {data['X_train'].shape[0]} train / {data['X_test'].shape[0]} test", flush=True)
        try:
            return run_recipe(args, backend, data, self.on_log, self.on_recipe_progress)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc


if __name__ == "__main__":
    sys.exit(main())
