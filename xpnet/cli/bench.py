"""Benchmark one SGD training step: xpnet's Solver against a plain loop and PyTorch.

For each configuration (hidden dims, batch) on 3072 inputs and 10 classes, fp32,
with 49,000 training rows resident on the device and minibatch indices drawn
there, it times in one process:

  xpnet        Solver.step: device sampling, forward, backward, update
  xpnet-graph  the same step replayed as a CUDA graph (cuda_graph=True; cupy only)
  plain        the smallest correct loop written directly in the backend's namespace
  torch        torch.nn.Linear/ReLU/CrossEntropyLoss/SGD, TF32 off (when torch is installed)
  torch-graph  that PyTorch step replayed from a captured CUDA graph (GPU only)

and prints µs/step, samples/s, TFLOP/s and the ratios xpnet/plain and
xpnet/torch, medians of several repeats after a warm-up, synchronising before
each clock read. Optionally (--time-to-accuracy) it measures the seconds the
modular TwoLayerNet (200 hidden) needs to pass a validation accuracy on
CIFAR-10, against the same recipe in PyTorch. Other suites time convolutions
(--suite conv) and the fast CIFAR-10 recipe's other layers one at a time against
the bytes they must move (--suite ops).

    xpnet-bench                                  # numpy on the CPU (or: python scripts/bench.py)
    xpnet-bench --backend cupy --json benchmarks/h100.json
    xpnet-bench --backend cupy --recipe fast94 --runs 5   # the fast CIFAR-10 recipe against PyTorch's
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from typing import NamedTuple

import numpy as np

import xpnet
from xpnet import data_utils
from xpnet.atomic_files import atomic_write
from xpnet.backend import accelerated
from xpnet.backend.host_allocator import host_allocator
from xpnet.cli import bench_conv, bench_ops, bench_profile, bench_recipe, bench_tta
from xpnet.cli.common import (
    HelpFormatter,
    UsageError,
    check_output_file,
    conv_paths_chosen,
    format_conv_paths,
    load_npz_arrays,
    positive_float,
    positive_int,
    user_path,
)
from xpnet.cli.recipe import recipe_settings
from xpnet.solver import Solver

DEFAULT_CONFIGS = ["200:200", "100,100:200", "100,100:1024", "1024,1024,1024:1024", "4096,4096:4096"]
INPUT_DIM, NUM_CLASSES, LEARNING_RATE = 3072, 10, 1e-3


def parse_config(text):
    """'100,100:1024' -> ([100, 100], 1024); every size at least 1."""
    try:
        dims, batch = text.split(":")
        hidden, rows = [int(d) for d in dims.split(",")], int(batch)
        if min(*hidden, rows) < 1:
            raise ValueError(text)
        return hidden, rows
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"config must look like 100,100:1024 (hidden dims:batch, each >= 1), got {text!r}"
        ) from exc


def flops_per_step(hidden, batch):
    """Multiply-adds x 2 of forward and backward; the first layer computes no input gradient."""
    dims = [INPUT_DIM, *hidden, NUM_CLASSES]
    layer = [2 * batch * a * b for a, b in zip(dims[:-1], dims[1:])]
    return 3 * sum(layer) - layer[0]


# ----------------------------------------------------------------------------- steps
def xpnet_step(backend, X, y, hidden, batch, cuda_graph):
    model = xpnet.FullyConnectedNet(
        hidden,
        input_dim=INPUT_DIM,
        num_classes=NUM_CLASSES,
        weight_scale=1e-2,
        dtype="float32",
        seed=0,
        backend=backend,
    )
    data = {"X_train": X, "y_train": y, "X_val": X[:1000, ...], "y_val": y[:1000]}
    solver = Solver(
        model,
        data,
        update_rule="sgd",
        optim_config={"learning_rate": LEARNING_RATE},
        batch_size=batch,
        verbose=False,
        cuda_graph=cuda_graph,
    )
    rng = backend.rng(1)
    return lambda: solver.step(rng)


def plain_step(backend, X, y, hidden, batch):
    """The smallest correct training step in the backend's namespace: no xpnet code."""
    xp = backend.xp
    rng = backend.rng(2)
    dims = [INPUT_DIM, *hidden, NUM_CLASSES]
    Ws = [rng.normal((a, b), std=1e-2, dtype=xp.float32) for a, b in zip(dims[:-1], dims[1:])]
    bs = [xp.zeros((b,), dtype=xp.float32, device=backend.device) for b in dims[1:]]
    classes = xp.arange(NUM_CLASSES, device=backend.device)
    n = X.shape[0]

    def step():
        idx = rng.integers(0, n, batch)
        h = xp.take(X, idx, axis=0)
        labels = xp.take(y, idx, axis=0)
        acts = [h]
        for W, b in zip(Ws[:-1], bs[:-1]):
            h = xp.maximum(h @ W + b, 0)
            acts.append(h)
        scores = h @ Ws[-1] + bs[-1]
        shifted = scores - xp.max(scores, axis=1, keepdims=True)
        e = xp.exp(shifted)
        s = xp.sum(e, axis=1, keepdims=True)
        one_hot = xp.astype(labels[:, None] == classes, xp.float32)
        loss = -xp.sum((shifted - xp.log(s)) * one_hot) / batch
        d = (e / s - one_hot) / batch
        for i in range(len(Ws) - 1, -1, -1):
            dW = acts[i].T @ d
            db = xp.sum(d, axis=0)
            if i > 0:
                d = (d @ Ws[i].T) * xp.astype(acts[i] > 0, xp.float32)
            Ws[i] -= LEARNING_RATE * dW
            bs[i] -= LEARNING_RATE * db
        return loss

    return step


def torch_setup(backend, tf32=None):
    """PyTorch and the device matching ``backend``; ``tf32`` (when given) sets PyTorch's TF32 switches."""
    import torch

    if tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    device = torch.device("cuda", backend.device.id) if backend.is_gpu else torch.device("cpu")
    return torch, device


def torch_model(torch, device, hidden, init_std=None):
    dims = [INPUT_DIM, *hidden, NUM_CLASSES]
    modules = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        linear = torch.nn.Linear(a, b)
        if init_std is not None:
            torch.nn.init.normal_(linear.weight, std=init_std)
            torch.nn.init.zeros_(linear.bias)
        modules.append(linear)
        if i < len(dims) - 2:
            modules.append(torch.nn.ReLU())
    return torch.nn.Sequential(*modules).to(device)


def torch_step(backend, X_t, y_t, hidden, batch, graph):
    torch, device = torch_setup(backend)
    model = torch_model(torch, device, hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    loss_fn = torch.nn.CrossEntropyLoss()
    n = X_t.shape[0]

    def step():
        idx = torch.randint(0, n, (batch,), device=device)
        loss = loss_fn(model(X_t[idx]), y_t[idx])
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
        return loss

    return torch_graph_step(torch, step) if graph else step


def torch_graph_step(torch, step):
    """``step`` captured as a CUDA graph the way PyTorch documents it (warm-up on a side
    stream, then capture); returns a function that replays it and returns its output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        static_output = step()
    return lambda: (cuda_graph.replay(), static_output)[1]


# ----------------------------------------------------------------------------- timing
def calibrate(step, sync, budget_s):
    """Warm up, then the number of steps that takes about ``budget_s`` (3 to 300)."""
    for _ in range(3):
        step()
    sync()
    start = time.perf_counter()
    step()
    sync()
    single = time.perf_counter() - start
    return max(3, min(300, int(budget_s / max(single, 1e-6))))


class Timing(NamedTuple):
    """A variant's timed repeats: the median seconds per step, the steps in each repeat, and
    the fastest and the slowest repeat's seconds per step (how much the machine's noise moved it)."""

    seconds: float
    steps: int
    fastest: float
    slowest: float

    def us(self) -> dict:
        """The report's fields: µs per step (the median) and the range over the repeats."""
        return {"us": self.seconds * 1e6, "us_range": [self.fastest * 1e6, self.slowest * 1e6]}


def time_variants(variants, repeats, budget_s, settle_s=0.0) -> dict[str, Timing]:
    """Each variant's :class:`Timing`. The repeats are interleaved (a, b, c, a, b, c, ...)
    so that drift in the machine's speed does not favour whichever variant happens to run
    first; ``settle_s`` of idle time after each lets worker threads that spin after their
    work (PyTorch's on the CPU) park before the next variant runs."""
    steps = {name: calibrate(step, sync, budget_s) for name, (step, sync) in variants.items()}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (step, sync) in variants.items():
            start = time.perf_counter()
            for _ in range(steps[name]):
                step()
            sync()
            samples[name].append((time.perf_counter() - start) / steps[name])
            time.sleep(settle_s)
    return {
        name: Timing(statistics.median(times), steps[name], min(times), max(times)) for name, times in samples.items()
    }


def run_config(backend, X, y, torch_data, hidden, batch, args):
    builders = {"xpnet": lambda: (xpnet_step(backend, X, y, hidden, batch, False), backend.sync)}
    if backend.can_capture and not args.no_graph:
        builders["xpnet-graph"] = lambda: (xpnet_step(backend, X, y, hidden, batch, True), backend.sync)
    builders["plain"] = lambda: (plain_step(backend, X, y, hidden, batch), backend.sync)
    if torch_data is not None:
        torch, _ = torch_setup(backend)
        torch_sync = torch.cuda.synchronize if backend.is_gpu else (lambda: None)
        builders["torch"] = lambda: (torch_step(backend, *torch_data, hidden, batch, False), torch_sync)
        if backend.is_gpu and not args.no_graph:
            builders["torch-graph"] = lambda: (torch_step(backend, *torch_data, hidden, batch, True), torch_sync)
    results, variants = {}, {}
    for name, build in builders.items():
        try:
            step, sync = build()
            step()  # a variant that cannot run is reported, and the others still measured
            variants[name] = (step, sync)
        except Exception as exc:
            print(f"  {name} failed: {type(exc).__name__}: {exc}", flush=True)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    settle = 0.0 if backend.is_gpu else 0.3
    for name, timing in time_variants(variants, args.repeats, args.budget, settle).items():
        seconds = timing.seconds
        results[name] = {
            "us_per_step": seconds * 1e6,
            "us_range": timing.us()["us_range"],
            "steps_per_repeat": timing.steps,
            "samples_per_s": batch / seconds,
            "tflops": flops_per_step(hidden, batch) / seconds / 1e12,
        }
    return results


# ----------------------------------------------------------------------------- time to accuracy
# ----------------------------------------------------------------------------- report
def _torch_available():
    try:
        import torch  # noqa: F401

        return True
    except ImportError:
        return False


def versions(backend):
    import array_api_compat

    found = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "array_api_compat": array_api_compat.__version__,
        "xpnet": xpnet.__version__,
    }
    if backend.name.startswith("cupy"):
        found["cupy"] = backend.lib.__version__
        found["cuda_runtime"] = backend.lib.cuda.runtime.runtimeGetVersion()
    if _torch_available():
        import torch

        found["torch"] = torch.__version__
    return found


def _cell(results, name, key="us_per_step", fmt="{:.0f}"):
    if name not in results:
        return "–"
    return fmt.format(results[name][key]) if key in results[name] else "failed"


def _ratio(results, a, b):
    if "us_per_step" in results.get(a, {}) and "us_per_step" in results.get(b, {}):
        return f"{results[a]['us_per_step'] / results[b]['us_per_step']:.2f}"
    return "–"


def format_table(rows):
    names = ["xpnet", "xpnet-graph", "plain", "torch", "torch-graph"]
    header = (
        "| hidden, batch | "
        + " | ".join(f"{n} µs" for n in names)
        + " | xpnet/plain | xpnet/torch | graph/torch-graph | xpnet TFLOP/s | torch TFLOP/s |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        r = row["results"]
        cells = [f"{row['hidden']}, {row['batch']}", *(_cell(r, n) for n in names)]
        cells += [_ratio(r, "xpnet", "plain"), _ratio(r, "xpnet", "torch"), _ratio(r, "xpnet-graph", "torch-graph")]
        cells += [_cell(r, "xpnet", "tflops", "{:.2f}"), _cell(r, "torch", "tflops", "{:.2f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_fc_suite(backend, configs, use_torch, args, report):
    """The fully connected training-step rows."""
    rng = backend.rng(0)
    X = rng.normal((args.rows, INPUT_DIM), dtype=backend.xp.float32)
    y = rng.integers(0, NUM_CLASSES, args.rows)
    torch_data = None
    if use_torch:
        torch, device = torch_setup(backend, args.tf32)
        torch_data = (
            torch.as_tensor(backend.to_numpy(X), device=device),
            torch.as_tensor(backend.to_numpy(y), device=device),
        )
    for hidden, batch in configs:
        results = run_config(backend, X, y, torch_data, hidden, batch, args)
        row = {"hidden": hidden, "batch": batch, "flops_per_step": flops_per_step(hidden, batch), "results": results}
        report["configs"].append(row)
        summary = ", ".join(f"{k} {v['us_per_step']:.0f} µs" for k, v in results.items() if "us_per_step" in v)
        print(f"{hidden}, {batch}: {summary}", flush=True)


def run_conv_suite(backend, args, on_progress=None) -> dict:
    """The convolution rows: title -> (rows, variant names, ratios), for the report and the
    tables; ``on_progress(tables)`` gets the tables so far after each one."""
    settle = 0.0 if backend.is_gpu else 0.3

    def timer(variants, repeats, budget):
        return time_variants(variants, repeats, budget, settle)

    progress = on_progress if on_progress is not None else (lambda tables: None)
    tables = {}
    if backend.is_gpu:
        for tf32 in (False, True):
            rows = bench_conv.gpu_rows(backend, timer, args.repeats, args.budget, tf32, not args.no_torch)
            names = ["xpnet", "xpnet-cudnn", "xpnet-direct", "xpnet-auto", "torch"]
            ratios = [("xpnet", "torch"), ("xpnet-cudnn", "torch"), ("xpnet-direct", "torch"), ("xpnet-auto", "torch")]
            tables[f"conv2d fwd+bwd, {'TF32' if tf32 else 'fp32'}"] = (rows, names, ratios)
            progress(tables)
    else:
        rows = bench_conv.cpu_rows(backend, timer, args.repeats, args.budget, not args.no_torch)
        tables["course shapes (CPU)"] = (rows, ["naive", "fast", "torch"], [("naive", "fast"), ("fast", "torch")])
        progress(tables)
    if not args.no_convnet:
        rows = bench_conv.convnet_step_rows(backend, timer, args.repeats, args.budget, not args.no_torch)
        names = ["xpnet", "xpnet-graph", "xpnet-cudnn", "xpnet-cudnn-graph", "xpnet-auto-graph", "torch", "torch-graph"]
        ratios = [("xpnet", "torch"), ("xpnet-graph", "torch-graph"), ("xpnet-cudnn-graph", "torch-graph"),
                  ("xpnet-auto-graph", "torch-graph")]  # fmt: skip
        tables["ThreeLayerConvNet"] = (rows, names, ratios)
        progress(tables)
    return tables


# The flags that only some parts of the benchmark read, and those parts: a flag that none of the
# parts a command runs reads is refused, not ignored (--cifar-npz alone ran the FC rows on random data).
PART_FLAGS = {
    "configs": ("--config", {"fc"}),
    "rows": ("--rows", {"fc"}),
    "no_graph": ("--no-graph", {"fc"}),
    "no_convnet": ("--no-convnet", {"conv"}),
    "ops_batch": ("--ops-batch", {"ops"}),
    "profile_steps": ("--profile-steps", {"profile"}),
    "recipe_set": ("--recipe-set", {"recipe", "profile"}),
    "data_dir": ("--data-dir", {"tta", "recipe"}),
    "cifar_npz": ("--cifar-npz", {"tta", "recipe"}),
    "no_warmup": ("--no-warmup", {"tta", "recipe"}),
    "target": ("--target", {"tta"}),
    "max_epochs": ("--max-epochs", {"tta"}),
    "breakdown": ("--breakdown", {"tta"}),
    "runs": ("--runs", {"recipe"}),
    "recipe_sides": ("--recipe-sides", {"recipe"}),
    "warmup_epochs": ("--warmup-epochs", {"recipe"}),
}
PART_OPTIONS = {
    "fc": "--suite fc",
    "conv": "--suite conv",
    "ops": "--suite ops",
    "profile": "--profile-recipe",
    "tta": "--time-to-accuracy",
    "recipe": "--recipe",
}


def parts_run(args) -> set:
    """The parts of the benchmark that ``args`` asks for (``args.suite`` already defaulted)."""
    parts = {"fc", "conv", "ops"} if args.suite == "all" else {args.suite} - {"none"}
    for part, wanted in (("profile", args.profile_recipe), ("tta", args.time_to_accuracy), ("recipe", args.recipe)):
        if wanted:
            parts.add(part)
    return parts


def unread_flag(parser, args) -> str | None:
    """Why a flag given is read by none of the parts ``args`` runs, or None when each is read."""
    parts = parts_run(args)
    for dest, (flag, readers) in PART_FLAGS.items():
        if getattr(args, dest) != parser.get_default(dest) and not readers & parts:
            options = " or ".join(PART_OPTIONS[part] for part in PART_OPTIONS if part in readers)
            if readers & {"fc", "conv", "ops"}:
                options += " (or --suite all)"
            runs = "runs neither" if len(readers) > 1 else "does not run it"
            return f"{flag} applies to {options} only, and this command {runs}"
    return None


def side_names(text):
    """An argparse type: the comma-separated names of --recipe-sides, at least one (an empty
    list ran every side, as if the flag had not been given)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"names no side, got {text!r}; e.g. xpnet,torch")
    return names


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--backend", default="numpy", help="backend spec: numpy, cupy, cupy:N, torch, ...")
    p.add_argument(
        "--config",
        dest="configs",
        action="append",
        type=parse_config,
        help="hidden dims and batch, e.g. 100,100:1024 (repeatable; default: the five standard ones)",
    )
    p.add_argument("--rows", type=positive_int, default=49000, help="training rows resident on the device")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed repeats per variant (the median is reported)")
    p.add_argument("--budget", type=positive_float, default=0.5, help="seconds per timed repeat (sets the step count)")
    p.add_argument("--no-torch", action="store_true", help="leave out the PyTorch variants")
    p.add_argument("--no-graph", action="store_true", help="leave out the CUDA-graph variants of --suite fc")
    p.add_argument("--json", type=user_path, help="write the results here")
    p.add_argument(
        "--time-to-accuracy", action="store_true", help="also time the TwoLayerNet recipe to --target on CIFAR-10"
    )
    p.add_argument("--data-dir", type=user_path, help="CIFAR-10 folder for --time-to-accuracy")
    p.add_argument(
        "--cifar-npz",
        type=user_path,
        help="a CIFAR-10 subset instead: an .npz with X_train, y_train and X_val, y_val (--time-to-accuracy) "
        "or X_test, y_test (--recipe)",
    )
    p.add_argument(
        "--target",
        type=positive_float,  # 0 or less is reached before training; NaN never is
        default=0.5,
        help="validation accuracy for --time-to-accuracy (above 1: never reached, every --max-epochs epoch runs)",
    )
    p.add_argument(
        "--recipe",
        choices=["fast94"],
        help="train a complete recipe in xpnet and in PyTorch, interleaved (CIFAR-10 from --data-dir or --cifar-npz)",
    )
    p.add_argument("--runs", type=positive_int, default=5, help="timed runs per side for --recipe")
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the untimed warm-up run per side of --recipe and --time-to-accuracy (the published recipe "
        "timing has one; on a CPU it only costs time)",
    )
    p.add_argument(
        "--recipe-sides",
        type=side_names,
        help="the sides of --recipe to run, e.g. xpnet,torch (default: all that run here: xpnet, "
        "xpnet-cudnn, xpnet-fp16, torch, torch-fp16)",
    )
    p.add_argument(
        "--warmup-epochs",
        type=positive_float,
        help="epochs of --recipe's untimed warm-up run per side (default: the recipe's own; 2 compiles and "
        "captures the same as a whole run)",
    )
    p.add_argument(
        "--recipe-set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override a setting of the recipe, e.g. widths=8,16,16 or epochs=2 (repeatable)",
    )
    p.add_argument(
        "--suite",
        choices=["fc", "conv", "ops", "all", "none"],
        default=None,
        help="fc: training steps of fully connected nets; conv: convolutions and a ThreeLayerConvNet step; "
        "ops: the fast CIFAR-10 recipe's pooling, batchnorm, GELU and per-channel sums one at a time, and its "
        "network's loss and gradients; all: the three; none: only --time-to-accuracy or --recipe "
        "(default: fc, or none with --recipe)",
    )
    p.add_argument(
        "--tf32", action="store_true", help="TF32 tensor cores for float32 GEMMs on both sides (CUDA backends)"
    )
    p.add_argument(
        "--ops-batch", type=positive_int, default=1024, help="batch size of --suite ops (the recipe's: 1024)"
    )
    p.add_argument(
        "--warp-plane-sums",
        action="store_true",
        help="xpnet's batchnorm sums its planes through the PLANE_SUMS kernel, a warp per plane, in every part "
        "(CuPy; off by default until measured: --suite ops times both)",
    )
    p.add_argument(
        "--direct-convs",
        dest="direct_small_convs",
        action="store_true",
        help="xpnet runs convolutions of at most 32 taps (C·k·k: the recipe's whitening conv) through its direct "
        "kernels, without columns, in every part (CuPy; off by default until measured: --suite conv and ops time both)",
    )
    p.add_argument(
        "--conv-autotune",
        action="store_true",
        help="xpnet runs each convolution along the fastest of its paths (direct kernels, cuDNN, im2col), timed the "
        "first time its shape runs, in every part; the recipe then has no xpnet-cudnn side, which this covers "
        "(CuPy; --suite conv's xpnet-auto rows time it without the flag)",
    )
    p.add_argument(
        "--profile-recipe",
        action="store_true",
        help="profile the fast recipe's training steps kernel by kernel in xpnet and in PyTorch (PyTorch's "
        "profiler, which on a GPU records CuPy's kernels too); --recipe-set and --tf32 apply",
    )
    p.add_argument("--profile-steps", type=positive_int, default=5, help="steps of --profile-recipe's profiled epoch")
    p.add_argument("--no-convnet", action="store_true", help="leave out the ThreeLayerConvNet step of --suite conv")
    p.add_argument("--max-epochs", type=positive_int, default=20, help="give up on --time-to-accuracy after this")
    p.add_argument(
        "--breakdown", action="store_true", help="with --time-to-accuracy: where the seconds go, phase by phase"
    )
    return p


def _checked_backend(p, args):
    """Every check of the command line that needs no measurement, before anything runs; the backend."""
    if args.suite is None:
        args.suite = "none" if args.recipe else "fc"
    unread = unread_flag(p, args)
    if unread:
        p.error(unread)
    try:
        # Checked before anything runs; the benchmark takes every setting here (its --tf32 applies to all parts).
        args.recipe_set = list(recipe_settings(args.recipe_set, flags={}).items())
        backend = xpnet.get_backend(args.backend)
    except (ValueError, ImportError, RuntimeError) as exc:
        p.error(str(exc))
    if args.profile_recipe and not _torch_available():
        p.error("--profile-recipe needs PyTorch: its profiler records the kernels, and its side is the baseline")
    if args.json:
        try:
            check_output_file("--json", args.json)
        except UsageError as exc:
            p.error(str(exc))
    # A subset that lacks what a part reads, or no data set at all, is refused now, not after the
    # suites before that part have run.
    if args.time_to_accuracy and not args.cifar_npz:
        try:
            data_utils.find_CIFAR10(args.data_dir)
        except (FileNotFoundError, TypeError) as exc:
            p.error(f"--time-to-accuracy: {exc}")
    for wanted, keys, purpose in ((args.time_to_accuracy, bench_tta.NPZ_KEYS, "--time-to-accuracy"),
                                  (args.recipe, bench_recipe.NPZ_KEYS, "--recipe")):  # fmt: skip
        if wanted and args.cifar_npz:
            try:
                load_npz_arrays(args.cifar_npz, keys, purpose, read=False)
            except ValueError as exc:
                p.error(str(exc))
    return backend


def _switch_on(p, args, backend, report):
    """The backend switches the command asks for, in every part (recorded in the report)."""
    if args.tf32:
        try:
            backend.set_tf32(True)
        except ValueError as exc:
            p.error(f"--tf32: {exc}")
    if args.conv_autotune:
        try:
            backend.set_conv_autotune(True)
        except ValueError as exc:
            p.error(f"--conv-autotune: {exc}")
        report["conv_autotune"] = True
    for flag, switch, what in (("--warp-plane-sums", "warp_plane_sums", "fused batchnorm kernels"),
                               ("--direct-convs", "direct_small_convs", "direct convolution kernels")):  # fmt: skip
        if getattr(args, switch):
            kernels = accelerated(backend.xp.empty(0))
            if not hasattr(kernels, switch):
                p.error(f"{flag}: backend {backend.name!r} has no {what} (CuPy has)")
            setattr(kernels, switch, True)
            report[switch] = True


class _ReportFile:
    """The report, saved to --json after each part (and each row or run within one), so that a
    run stopped by a time limit keeps what it measured; written whole or not at all."""

    def __init__(self, report: dict, path, backend):
        self.report, self.path, self.backend = report, path, backend

    def save(self) -> None:
        chosen = conv_paths_chosen(self.backend)
        if chosen:
            self.report["conv_paths"] = chosen
        if self.path:
            with atomic_write(self.path, "w") as f:
                json.dump(self.report, f, indent=1)

    def saving(self, part: str):
        """A progress callback that puts ``part`` as measured so far in the report and saves it."""

        def save_part(so_far):
            self.report[part] = so_far
            self.save()

        return save_part


def _measure(p, args, backend, use_torch, out: _ReportFile) -> None:
    """Each part the command asks for, in turn, into the report."""
    report = out.report
    if args.suite in ("fc", "all"):
        configs = args.configs or [parse_config(c) for c in DEFAULT_CONFIGS]
        run_fc_suite(backend, configs, use_torch, args, report)
        out.save()
    if args.suite in ("conv", "all"):
        report["conv"] = run_conv_suite(backend, args, out.saving("conv"))
        out.save()
    if args.suite in ("ops", "all"):
        report["ops"] = bench_ops.ops_rows(backend, time_variants, args.repeats, args.budget, args.ops_batch,
                                           use_torch, args.tf32, out.saving("ops"))  # fmt: skip
        out.save()
    if args.profile_recipe:
        report["profile"] = bench_profile.profile_recipe(backend, args.recipe_set, args.profile_steps, args.tf32)
        out.save()
    if args.time_to_accuracy:
        try:
            report["time_to_accuracy"] = bench_tta.time_to_accuracy(backend, args)
        except Exception as exc:
            report["time_to_accuracy"] = {"error": f"{type(exc).__name__}: {exc}"}
        print("time to accuracy:", json.dumps(report["time_to_accuracy"]), flush=True)
        if args.breakdown and "error" not in report["time_to_accuracy"]:
            print(bench_tta.format_breakdown(report["time_to_accuracy"]), flush=True)
        out.save()
    if args.recipe:
        if not use_torch:
            args.no_torch = True
        try:
            report["recipe"] = bench_recipe.recipe_runs(backend, args, on_progress=out.saving("recipe"))
        except (OSError, ValueError) as exc:
            p.error(f"--recipe {args.recipe}: {exc}")


def _print_tables(report: dict, recipe) -> None:
    """Every part's table, after all of them ran."""
    print()
    if "recipe" in report:
        print(f"{recipe}: {report['recipe']['train_images']} training images, "
              f"{report['recipe']['test_images']} test images, TTA")  # fmt: skip
        print(bench_recipe.format_recipe_table(report["recipe"]))
        print()
    if report["configs"]:
        print(format_table(report["configs"]))
    for title, (rows, names, ratios) in report.get("conv", {}).items():
        print()
        print(bench_conv.format_conv_table(title, rows, names, ratios))
    if "ops" in report:
        print()
        print(bench_ops.format_ops_table(report["ops"]))
    if "profile" in report:
        print()
        print(bench_profile.format_profile(report["profile"]))


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    backend = _checked_backend(p, args)
    use_torch = not args.no_torch and _torch_available()
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "backend": backend.name,
        "device": backend.device_name,
        "versions": versions(backend),
        "host_allocator": host_allocator(),
        "rows": args.rows,
        "configs": [],
    }
    print(f"# {backend.name} on {backend.device_name}; {report['versions']}", flush=True)
    print(f"# host memory: {report['host_allocator']}", flush=True)
    _switch_on(p, args, backend, report)
    out = _ReportFile(report, args.json, backend)
    _measure(p, args, backend, use_torch, out)
    _print_tables(report, args.recipe)
    out.save()
    if "conv_paths" in report:
        print()
        print(format_conv_paths(report["conv_paths"]))
    return 1 if "recipe" in report and not report["recipe"]["runs"] else 0  # a recipe asked for and none measured


if __name__ == "__main__":
    sys.exit(main())
