"""``bench.py --profile-recipe``: the fast recipe's training steps, kernel by kernel, in
xpnet and in PyTorch.

PyTorch's profiler reads CUPTI, which records every kernel the process runs on the GPU:
CuPy's, cuBLAS's and cuDNN's as well as PyTorch's own. So one profiled epoch of each side
says where each step's device time goes, kernel by kernel, where the ops suite times
layers one at a time. Both sides train the recipe's network (the widths and batch of
``--recipe-set``, TF32 with ``--tf32``) for one epoch of ``--profile-steps`` steps on
random images, eagerly (no CUDA graph, so that each launch is its own record), after an
unprofiled warm-up epoch and a timed one. On a CPU the profiler sees only PyTorch's
operations: xpnet on the torch backend shows its own, on NumPy it shows none.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np

from xpnet.recipes.fast94 import Fast94Settings, Fast94Trainer, recipe_model
from xpnet.whitening import whitening_filters

__all__ = ["kernel_rows", "profile_recipe", "format_profile"]

_NAME_WIDTH = 90  # PyTorch's templated kernel names run to hundreds of characters


def kernel_rows(durations, steps: int) -> list[dict]:
    """``(name, µs)`` records summed by name, per step, the longest first: rows of
    ``{"name", "calls", "us"}`` with calls and µs per step."""
    calls: defaultdict[str, int] = defaultdict(int)
    total: defaultdict[str, float] = defaultdict(float)
    for name, us in durations:
        calls[name] += 1
        total[name] += us
    rows = [{"name": name, "calls": calls[name] / steps, "us": total[name] / steps} for name in total]
    return sorted(rows, key=lambda row: -row["us"])


def _durations(prof, on_gpu: bool):
    """(name, µs) of each kernel the profiler saw (GPU), or of each operator's own time (CPU)."""
    from torch.autograd import DeviceType

    for event in prof.events():
        if on_gpu and event.device_type == DeviceType.CUDA:
            yield event.name, event.time_range.elapsed_us()
        elif not on_gpu and event.device_type == DeviceType.CPU:
            yield event.name, event.self_cpu_time_total


def _sides(backend, settings, steps, seed=0):
    """``{side: run}``: each ``run()`` trains one epoch of ``steps`` steps from the start."""
    import torch

    from xpnet.recipes import fast94_torch

    n = settings.batch_size * steps
    rng = backend.rng(seed)
    images = rng.normal((n, 3, 32, 32), dtype=backend.dtype(settings.dtype))
    labels = backend.asarray(np.random.default_rng(seed).integers(0, 10, n), dtype="int64")
    filters = whitening_filters(images[: min(settings.whiten_images, images.shape[0]), ...], 2, settings.whiten_eps)
    device = torch.device("cuda", backend.device.id) if backend.is_gpu else torch.device("cpu")
    dtype = getattr(torch, settings.dtype)
    torch_images = torch.as_tensor(backend.to_numpy(images), device=device)
    torch_labels = torch.as_tensor(backend.to_numpy(labels), device=device)

    def xpnet_epoch():
        model = recipe_model(backend, settings, seed, (3, 32, 32))
        model.frozen["whiten_W"][...] = filters
        Fast94Trainer(model, images, labels, settings, seed).train()

    def torch_epoch():
        net = fast94_torch.make_net(settings, dtype, device)
        fast94_torch.init_whitening(net[0], torch_images[: settings.whiten_images], settings.whiten_eps)
        fast94_torch.train(net, torch_images, torch_labels, settings, fast94_torch.TorchDraws(seed, device))

    return {"xpnet": xpnet_epoch, "torch": torch_epoch}


def _profiled(epoch, backend, sync, activity, steps, profile) -> dict:
    """One side: an epoch to warm up (kernels compiled, cuDNN's algorithms chosen), one timed,
    one profiled."""
    epoch()
    backend.sync()
    sync()
    start = time.perf_counter()
    epoch()
    backend.sync()
    sync()
    wall = time.perf_counter() - start
    with profile(activities=[activity]) as prof:
        epoch()
        backend.sync()
        sync()
    rows = kernel_rows(_durations(prof, backend.is_gpu), steps)
    return {"wall_ms_per_step": 1e3 * wall / steps, "us_per_step": sum(r["us"] for r in rows), "kernels": rows}


def profile_recipe(backend, recipe_set, steps: int, tf32: bool) -> dict:
    """Each side's wall ms per step (unprofiled) and its kernels' µs per step (profiled)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    settings = Fast94Settings().with_overrides({**dict(recipe_set), "epochs": 1, "cuda_graph": False, "tf32": tf32})
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    activity = ProfilerActivity.CUDA if backend.is_gpu else ProfilerActivity.CPU
    sync = torch.cuda.synchronize if backend.is_gpu else (lambda: None)
    report: dict[str, Any] = {
        "steps": steps,
        "batch_size": settings.batch_size,
        "widths": list(settings.widths),
        "tf32": tf32,
        "measured": "kernels on the GPU" if backend.is_gpu else "PyTorch operators on the CPU",
    }
    if tf32:
        backend.set_tf32(True)
    try:
        for name, epoch in _sides(backend, settings, steps).items():
            try:
                report[name] = _profiled(epoch, backend, sync, activity, steps, profile)
            except Exception as exc:  # one side failing leaves the other's profile
                report[name] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"profile of {name} failed: {report[name]['error']}", flush=True)
                continue
            print(f"profiled {name}: {report[name]['wall_ms_per_step']:.2f} ms per step", flush=True)
    finally:
        if tf32:
            backend.set_tf32(False)
    return report


def format_profile(report: dict, top: int = 25) -> str:
    """Each side's longest kernels (per step), then their totals beside the wall time."""
    lines = [
        f"recipe steps, {report['measured']}: batch {report['batch_size']}, widths {report['widths']}, "
        f"TF32 {'on' if report['tf32'] else 'off'}, one epoch of {report['steps']} steps (its augmentation "
        "and lookahead included), per step"
    ]
    for side in ("xpnet", "torch"):
        if side not in report:
            continue
        result = report[side]
        if "error" in result:
            lines += ["", f"{side}: failed: {result['error']}"]
            continue
        total = result["us_per_step"] or 1.0
        lines += ["", f"| {side}: kernel | calls | µs | share |", "|---|---|---|---|"]
        if not result["kernels"]:
            lines.append("| none recorded (on a CPU the profiler sees PyTorch's operators only) | – | – | – |")
        for row in result["kernels"][:top]:
            name = row["name"] if len(row["name"]) <= _NAME_WIDTH else row["name"][: _NAME_WIDTH - 1] + "…"
            name = name.replace("|", "/")  # a table cell
            lines.append(f"| {name} | {row['calls']:.1f} | {row['us']:.0f} | {row['us'] / total:.1%} |")
        rest = result["kernels"][top:]
        if rest:
            rest_us = sum(r["us"] for r in rest)
            lines.append(f"| {len(rest)} others | {sum(r['calls'] for r in rest):.1f} | {rest_us:.0f} | "
                         f"{rest_us / total:.1%} |")  # fmt: skip
        lines.append(f"| all recorded | {sum(r['calls'] for r in result['kernels']):.1f} | "
                     f"{result['us_per_step']:.0f} | wall {1e3 * result['wall_ms_per_step']:.0f} µs |")  # fmt: skip
    return "\n".join(lines)
