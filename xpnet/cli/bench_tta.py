"""Time to accuracy: seconds until the modular TwoLayerNet (200 hidden, Adam 1e-4, batch
200) passes a validation accuracy on CIFAR-10, xpnet against the same recipe in PyTorch,
in one process, and (``--breakdown``) where the seconds go on each side.

The phases: data checks (validation of the data set), transfer (moving it to the
device), first step (kernel compilation, cuBLAS and allocator warm-up, graph capture),
steps, accuracy checks, and the rest (model construction, the loop itself, host
bookkeeping). A breakdown run synchronises the device around each phase so that
device work is counted where it was queued; its total is therefore a little above the
plain run's, which is measured separately without those synchronisations. Before the
timed runs, each side runs once untimed (``--no-warmup`` skips it), as the recipe's
benchmark does: what a user's second run in a fresh process no longer pays (CuPy
compiles a kernel once and keeps it on disk) stays out of the comparison on both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import defaultdict

import numpy as np

import xpnet
import xpnet.training.data as data_module
from xpnet import data_utils
from xpnet.cli.common import load_npz_arrays
from xpnet.solver import Solver

__all__ = ["time_to_accuracy", "PhaseClock", "PHASES"]

PHASES = ("data checks", "transfer", "first step", "steps", "accuracy checks", "rest")
RECIPE = {"hidden": 200, "batch_size": 200, "lr": 1e-4, "weight_scale": 1e-3}


class PhaseClock:
    """Seconds per named phase; ``sync`` runs before each clock read (None: no synchronisation).

    A phase entered inside another one (a training step's per-batch input preparation)
    belongs to the outer one: it is neither counted twice nor synchronised, since a
    synchronisation inside a step that is being captured as a CUDA graph is an error."""

    def __init__(self, sync=None):
        self.sync = sync or (lambda: None)
        self.seconds = defaultdict(float)
        self._depth = 0

    @contextlib.contextmanager
    def phase(self, name):
        if self._depth:
            yield
            return
        self.sync()
        start = time.perf_counter()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            self.sync()
            self.seconds[name] += time.perf_counter() - start

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)

        return timed

    def wrap_steps(self, step):
        """The first call counts as "first step", the others as "steps"."""
        calls = [0]

        def timed(*args, **kwargs):
            calls[0] += 1
            with self.phase("first step" if calls[0] == 1 else "steps"):
                return step(*args, **kwargs)

        return timed

    def report(self, total) -> dict:
        phases = {name: self.seconds.get(name, 0.0) for name in PHASES if name != "rest"}
        phases["rest"] = max(total - sum(phases.values()), 0.0)
        return {name: round(value, 4) for name, value in phases.items()}


NPZ_KEYS = ("X_train", "y_train", "X_val", "y_val")  # what --cifar-npz must hold for the time to accuracy


def load_cifar(args):
    """The training and validation sets (NumPy, mean subtracted): an .npz subset or the full files."""
    if args.cifar_npz:
        arrays = load_npz_arrays(args.cifar_npz, NPZ_KEYS, "--time-to-accuracy")
        X_train, y_train = arrays["X_train"].astype(np.float32), arrays["y_train"].astype(np.int64)
        X_val, y_val = arrays["X_val"].astype(np.float32), arrays["y_val"].astype(np.int64)
        mean = X_train.mean(axis=0)
        return {"X_train": X_train - mean, "y_train": y_train, "X_val": X_val - mean, "y_val": y_val}
    return data_utils.get_CIFAR10_data(args.data_dir)


def _xpnet_run(backend, data, args, cuda_graph, clock=None):
    """One xpnet run to the target; with ``clock``, each phase is timed."""
    reached = {}

    def stop_when_reached(record):
        if "val_acc" in record and record["val_acc"] >= args.target:
            reached.update(epoch=record["epoch"], val_acc=record["val_acc"])
            return False  # stops training here
        return None

    backend.sync()
    start = time.perf_counter()
    model = xpnet.TwoLayerNet(hidden_dims=RECIPE["hidden"], weight_scale=RECIPE["weight_scale"], dtype="float32",
                              backend=backend, seed=0)  # fmt: skip
    patched = contextlib.ExitStack()
    if clock is not None:
        model.prepare_inputs = clock.wrap("transfer", model.prepare_inputs)
        model.prepare_labels = clock.wrap("transfer", model.prepare_labels)
        for name in ("validate_split", "check_finite_values"):  # the Solver's data checks
            original = getattr(data_module, name)
            setattr(data_module, name, clock.wrap("data checks", original))
            patched.callback(setattr, data_module, name, original)
    with patched:
        solver = Solver(model, data, update_rule="adam", optim_config={"learning_rate": RECIPE["lr"]},
                        batch_size=RECIPE["batch_size"], num_epochs=args.max_epochs, num_val_samples=None,
                        verbose=False, seed=0, on_log=stop_when_reached, cuda_graph=cuda_graph)  # fmt: skip
    if clock is not None:
        solver.step = clock.wrap_steps(solver.step)
        solver._record_accuracies = clock.wrap("accuracy checks", solver._record_accuracies)
    solver.train()
    backend.sync()
    seconds = time.perf_counter() - start
    result = {"seconds": round(seconds, 4), **(reached or {"val_acc": solver.best_val_acc, "reached": False})}
    if clock is not None:
        result["breakdown"] = clock.report(seconds)
    return result


def _torch_run(backend, data, args, breakdown=False):
    """The same recipe in PyTorch: nn.Linear/ReLU, CrossEntropyLoss, Adam, indices drawn on
    the device. Returns the result and the phase clock (which synchronises only for a breakdown)."""
    from xpnet.cli.bench import torch_model, torch_setup

    torch, device = torch_setup(backend, args.tf32)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    clock = PhaseClock(sync if breakdown else None)
    torch.manual_seed(0)
    if sync:
        sync()
    start = time.perf_counter()
    with clock.phase("transfer"):
        X = torch.as_tensor(data["X_train"], device=device).reshape(data["X_train"].shape[0], -1)
        y = torch.as_tensor(data["y_train"], device=device)
        X_val = torch.as_tensor(data["X_val"], device=device).reshape(data["X_val"].shape[0], -1)
        y_val = torch.as_tensor(data["y_val"], device=device)
    net = torch_model(torch, device, [RECIPE["hidden"]], init_std=RECIPE["weight_scale"])
    optimizer = torch.optim.Adam(net.parameters(), lr=RECIPE["lr"])
    loss_fn = torch.nn.CrossEntropyLoss()
    n, per_epoch = X.shape[0], max(X.shape[0] // RECIPE["batch_size"], 1)

    def step():
        idx = torch.randint(0, n, (RECIPE["batch_size"],), device=device)
        loss = loss_fn(net(X[idx]), y[idx])
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()

    timed_step = clock.wrap_steps(step)
    result = {}
    for epoch in range(1, args.max_epochs + 1):
        for _ in range(per_epoch):
            timed_step()
        with clock.phase("accuracy checks"), torch.no_grad():
            val_acc = (net(X_val).argmax(1) == y_val).float().mean().item()
        result = {"epoch": epoch, "val_acc": val_acc}
        if val_acc >= args.target:
            break
    if sync:
        sync()
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 4), **result}, clock


def _warm_up(backend, data, args, variants, use_torch) -> None:
    """One untimed short run per side, the same for both: xpnet to its first accuracy check,
    PyTorch through its first epoch. Kernels are compiled (CuPy's on a cold cache) or loaded,
    and library handles and memory pools created, before any clock starts."""
    short = argparse.Namespace(**{**vars(args), "target": 0.0, "max_epochs": 1})
    for _, graph in variants:
        _or_error(lambda graph=graph: _xpnet_run(backend, data, short, graph))  # a failure shows in the timed run
    if use_torch:
        _or_error(lambda: _torch_run(backend, data, short))


def _or_error(run):
    """``run()``, or {"error": ...} when it raises: one side failing (a graph capture refused
    on a GPU not tried before, say) must not cost the other sides their figures."""
    try:
        return run()
    except Exception as exc:  # reported in the JSON beside the figures that were measured
        return {"error": f"{type(exc).__name__}: {exc}"}


def time_to_accuracy(backend, args) -> dict:
    """Plain runs (no extra synchronisation) of xpnet, xpnet with CUDA graphs (when the
    backend captures) and PyTorch; with ``args.breakdown``, a timed-phase run of each."""
    data = load_cifar(args)
    out = {
        "target": args.target,
        "train_rows": int(data["X_train"].shape[0]),
        "recipe": "TwoLayerNet 200 hidden, adam lr 1e-4, batch 200, weight_scale 1e-3, "
        "validation accuracy after each epoch (xpnet also checks 1000 training rows)",
    }
    variants = [("xpnet", False)] + ([("xpnet-graph", True)] if backend.can_capture else [])
    use_torch = not args.no_torch and _torch_available()
    out["warmup"] = not args.no_warmup
    if out["warmup"]:
        _warm_up(backend, data, args, variants, use_torch)
    for name, graph in variants:
        out[name] = _or_error(lambda graph=graph: _xpnet_run(backend, data, args, graph))
    if use_torch:
        out["torch"] = _or_error(lambda: _torch_run(backend, data, args)[0])
    if args.breakdown:  # separate runs: their clock reads synchronise, so their totals differ from the plain ones
        for name, graph in variants:
            if "error" in out[name]:
                continue
            timed = _or_error(lambda graph=graph: _xpnet_run(backend, data, args, graph, PhaseClock(backend.sync)))
            if "error" in timed:
                out[name]["breakdown_error"] = timed["error"]
            else:
                out[name]["breakdown"], out[name]["breakdown_seconds"] = timed["breakdown"], timed["seconds"]
        if use_torch and "error" not in out["torch"]:
            timed = _or_error(lambda: _torch_run(backend, data, args, breakdown=True))
            if isinstance(timed, dict):  # the error
                out["torch"]["breakdown_error"] = timed["error"]
            else:
                result, clock = timed
                out["torch"]["breakdown"] = clock.report(result["seconds"])
                out["torch"]["breakdown_seconds"] = result["seconds"]
    return out


def format_breakdown(result: dict) -> str:
    """A markdown table: one row per phase, one column per side (seconds)."""
    sides = [name for name in ("xpnet", "xpnet-graph", "torch") if "breakdown" in result.get(name, {})]
    lines = ["| phase | " + " | ".join(f"{s} s" for s in sides) + " |", "|---|" + "---|" * len(sides)]
    for phase in PHASES:
        lines.append(f"| {phase} | " + " | ".join(f"{result[s]['breakdown'][phase]:.3f}" for s in sides) + " |")
    lines.append("| total (plain run) | " + " | ".join(f"{result[s]['seconds']:.3f}" for s in sides) + " |")
    return "\n".join(lines)


def _torch_available():
    try:
        import torch  # noqa: F401

        return True
    except ImportError:
        return False
