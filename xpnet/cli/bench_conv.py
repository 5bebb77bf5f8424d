"""The benchmark's convolution rows (``xpnet-bench --suite conv``).

On a GPU: conv2d forward + backward (dx, dw; no dx for the first shape, whose
input is the data) at batch 1024 on six shapes, xpnet's fast conv (im2col +
cuBLAS, through cuDNN's C API when cuDNN is installed, through the direct kernels
for the first shape's 12 taps, and along whichever of those set_conv_autotune finds
fastest) against PyTorch's
cuDNN (``cudnn.benchmark=True``), in fp32 (TF32 off on both sides) and in TF32
(on on both sides); and a ThreeLayerConvNet training step (batch 128), eager and
replayed from CUDA graphs on both sides.

On the CPU: the course's timing shapes, ``conv_forward_fast`` and
``conv_backward_fast`` against the naive layers (and PyTorch's CPU conv2d when
installed), and the same for max pooling; and the ThreeLayerConvNet step against
PyTorch's eager one on the CPU.
"""

from __future__ import annotations

import numpy as np

from xpnet import fast_layers, layers
from xpnet.backend import accelerated
from xpnet.backend.kernel_sources import DIRECT_CONV_MAX_TAPS
from xpnet.cnn import ThreeLayerConvNet
from xpnet.solver import Solver

__all__ = [
    "GPU_SHAPES",
    "cpu_rows",
    "cudnn_available",
    "gpu_rows",
    "convnet_step_rows",
    "format_conv_table",
    "measure_row",
    "with_kernel_switch",
]

# (C_in, C_out, H = W, kernel, pad): the shapes of the fast CIFAR-10 recipe's convolutions.
GPU_SHAPES = [(3, 24, 32, 2, 0), (24, 64, 31, 3, 1), (64, 64, 15, 3, 1), (64, 256, 15, 3, 1),
              (256, 256, 7, 3, 1), (256, 256, 3, 3, 1)]  # fmt: skip


def _torch_or_none():
    try:
        import torch

        return torch
    except ImportError:
        return None


def _conv_flops(batch, c_in, c_out, size, kernel, pad, input_grad=True):
    out = size + 2 * pad - kernel + 1
    one_pass = 2 * batch * c_out * out * out * c_in * kernel * kernel
    return one_pass * (3 if input_grad else 2)


def _xpnet_conv_step(backend, batch, c_in, c_out, size, kernel, pad, input_grad):
    rng = backend.rng(0)
    x = rng.normal((batch, c_in, size, size), dtype=backend.xp.float32)
    w = rng.normal((c_out, c_in, kernel, kernel), std=0.05, dtype=backend.xp.float32)
    param = {"stride": 1, "pad": pad}

    def step():  # without a bias, as PyTorch's side
        out, cache = fast_layers.conv_forward_fast(x, w, None, param)
        return fast_layers.conv_backward_fast(out, cache, input_grad)

    return step


def _torch_conv_step(torch, device, batch, c_in, c_out, size, kernel, pad, input_grad):
    x = torch.randn(batch, c_in, size, size, device=device, requires_grad=input_grad)
    w = torch.randn(c_out, c_in, kernel, kernel, device=device, requires_grad=True) * 0.05
    w = w.detach().requires_grad_(True)

    def step():
        out = torch.nn.functional.conv2d(x, w, padding=pad)
        out.backward(out)
        return w.grad

    return step


def cudnn_available(backend) -> bool:
    """Whether ``backend.set_cudnn(True)`` works here (a CUDA backend with cuDNN loadable);
    says why not when it does not."""
    if not backend.is_gpu:
        return False
    try:
        backend.set_cudnn(True)
    except (RuntimeError, ValueError) as exc:
        print(f"no xpnet-cudnn rows: {exc}", flush=True)
        return False
    backend.set_cudnn(False)
    return True


def _switched_on(setter, step):
    """``step`` with ``setter(True)`` during each call (a backend's set_cudnn or
    set_conv_autotune), ``setter(False)`` after."""

    def run():
        setter(True)
        try:
            return step()
        finally:
            setter(False)

    return run


def with_kernel_switch(backend, switch: str, step):
    """``step`` with the backend's fused kernels' boolean attribute ``switch`` (CuPy's
    "warp_plane_sums", "direct_small_convs", "conv_paths.autotune") on during each call, as it
    was after; None where the backend's kernels have no such switch."""
    owner = accelerated(backend.xp.empty(0))
    *parents, name = switch.split(".")
    for parent in parents:
        owner = getattr(owner, parent, None)
    if owner is None or not hasattr(owner, name):
        return None

    def switched():
        before = getattr(owner, name)
        setattr(owner, name, True)
        try:
            return step()
        finally:
            setattr(owner, name, before)

    return switched


def gpu_rows(backend, time_variants, repeats, budget, tf32: bool, use_torch=True, batch=1024) -> list:
    """One row per GPU shape: µs per forward+backward of xpnet (im2col + cuBLAS, cuDNN when it
    is installed, the direct kernels where the filters have few enough taps, and the fastest of
    those by set_conv_autotune) and PyTorch, in one precision (``batch`` images; 1024 as #9 asks)."""
    torch = _torch_or_none() if use_torch else None
    rows = []
    cudnn = cudnn_available(backend)
    backend.set_tf32(tf32)
    if torch is not None:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        device = torch.device("cuda", backend.device.id)
    try:
        for index, shape in enumerate(GPU_SHAPES):
            input_grad = index > 0
            variants = {"xpnet": (_xpnet_conv_step(backend, batch, *shape, input_grad), backend.sync)}
            if cudnn:
                step = _switched_on(backend.set_cudnn, _xpnet_conv_step(backend, batch, *shape, input_grad))
                variants["xpnet-cudnn"] = (step, backend.sync)
            c_in, _, _, kernel, _ = shape
            if c_in * kernel * kernel <= DIRECT_CONV_MAX_TAPS:
                step = with_kernel_switch(
                    backend, "direct_small_convs", _xpnet_conv_step(backend, batch, *shape, input_grad)
                )
                if step is not None:
                    variants["xpnet-direct"] = (step, backend.sync)
            # the fastest of the paths above, as set_conv_autotune picks it (in the warm-up)
            step = with_kernel_switch(
                backend, "conv_paths.autotune", _xpnet_conv_step(backend, batch, *shape, input_grad)
            )
            if step is not None:
                variants["xpnet-auto"] = (step, backend.sync)
            if torch is not None:
                step = _torch_conv_step(torch, device, batch, *shape, input_grad)
                variants["torch"] = (step, torch.cuda.synchronize)
            rows.append(measure_row(f"{shape} batch {batch}", variants, time_variants, repeats, budget,
                                 _conv_flops(batch, *shape, input_grad)))  # fmt: skip
    finally:
        backend.set_tf32(False)
    return rows


def cpu_rows(backend, time_variants, repeats, budget, use_torch=True) -> list:
    """The course's timing shapes: naive against fast (and PyTorch's CPU layers when installed)."""
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.standard_normal((100, 3, 31, 31)), dtype="float32")
    w = backend.asarray(rng.standard_normal((25, 3, 3, 3)), dtype="float32")
    b = backend.asarray(rng.standard_normal(25), dtype="float32")
    conv = {"stride": 2, "pad": 1}
    pool_x = backend.asarray(rng.standard_normal((100, 3, 32, 32)), dtype="float32")
    pool = {"pool_height": 2, "pool_width": 2, "stride": 2}
    out, naive_cache = layers.conv_forward_naive(x, w, b, conv)
    _, fast_cache = fast_layers.conv_forward_fast(x, w, b, conv)
    pooled, naive_pool_cache = layers.max_pool_forward_naive(pool_x, pool)
    _, fast_pool_cache = fast_layers.max_pool_forward_fast(pool_x, pool)
    naive_forward = lambda: layers.conv_forward_naive(x, w, b, conv)  # noqa: E731
    cols = fast_layers.columns(x, 3, 3, 2, 1, 16, 16)
    w_rows = backend.xp.reshape(w, (25, -1))
    cases = {
        "conv forward": {"naive": naive_forward, "fast": lambda: fast_layers.conv_forward_fast(x, w, b, conv)},
        # The fast forward's two parts, each beside the naive forward: naive/GEMM bounds what any im2col can reach.
        "conv forward: its im2col alone": {
            "naive": naive_forward,
            "fast": lambda: fast_layers.columns(x, 3, 3, 2, 1, 16, 16),
        },
        "conv forward: its GEMM alone": {"naive": naive_forward, "fast": lambda: layers.matmul(w_rows, cols)},
        "conv backward": {
            "naive": lambda: layers.conv_backward_naive(out, naive_cache),
            "fast": lambda: fast_layers.conv_backward_fast(out, fast_cache),
        },
        "max pool forward": {
            "naive": lambda: layers.max_pool_forward_naive(pool_x, pool),
            "fast": lambda: fast_layers.max_pool_forward_fast(pool_x, pool),
        },
        "max pool backward": {
            "naive": lambda: layers.max_pool_backward_naive(pooled, naive_pool_cache),
            "fast": lambda: fast_layers.max_pool_backward_fast(pooled, fast_pool_cache),
        },
    }
    torch = _torch_or_none() if use_torch else None
    if torch is not None and backend.name == "numpy":
        tx, tw, tb = (torch.from_numpy(np.asarray(a)) for a in (x, w, b))
        tx.requires_grad_(True)
        tw.requires_grad_(True)
        tout = torch.nn.functional.conv2d(tx, tw, tb, stride=2, padding=1)
        tpx = torch.from_numpy(np.asarray(pool_x)).requires_grad_(True)
        tpool = torch.nn.functional.max_pool2d(tpx, 2, 2)
        cases["conv forward"]["torch"] = lambda: torch.nn.functional.conv2d(tx, tw, tb, stride=2, padding=1)
        cases["conv backward"]["torch"] = lambda: torch.autograd.grad(tout, (tx, tw), tout, retain_graph=True)
        cases["max pool forward"]["torch"] = lambda: torch.nn.functional.max_pool2d(tpx, 2, 2)
        cases["max pool backward"]["torch"] = lambda: torch.autograd.grad(tpool, tpx, tpool, retain_graph=True)
    return [
        measure_row(name, {k: (fn, backend.sync) for k, fn in fns.items()}, time_variants, repeats, budget, None)
        for name, fns in cases.items()
    ]


def convnet_step_rows(backend, time_variants, repeats, budget, use_torch=True, batch=128) -> list:
    """A ThreeLayerConvNet SGD step at ``batch`` (the benchmark's: 128) on CIFAR-sized inputs,
    xpnet against PyTorch, drawn from 32 batches' worth of rows."""
    rng = backend.rng(0)
    X = rng.normal((32 * batch, 3, 32, 32), dtype=backend.xp.float32)
    y = rng.integers(0, 10, 32 * batch)
    variants = {}
    cudnn = cudnn_available(backend)
    for name, graph, path in (
        ("xpnet", False, None),
        ("xpnet-graph", True, None),
        ("xpnet-cudnn", False, "cudnn"),
        ("xpnet-cudnn-graph", True, "cudnn"),
        ("xpnet-auto-graph", True, "auto"),  # the paths kept by autotuning (timed in the eager first step)
    ):
        if (graph and not backend.can_capture) or (path == "cudnn" and not cudnn):
            continue
        model = ThreeLayerConvNet(weight_scale=1e-2, seed=0, backend=backend)
        data = {"X_train": X, "y_train": y, "X_val": X[: 2 * batch, ...], "y_val": y[: 2 * batch]}
        solver = Solver(model, data, update_rule="sgd", optim_config={"learning_rate": 1e-3}, batch_size=batch,
                        verbose=False, cuda_graph=graph)  # fmt: skip
        step_rng = backend.rng(1)
        step = lambda s=solver, r=step_rng: s.step(r)  # noqa: E731
        if path == "cudnn":
            step = _switched_on(backend.set_cudnn, step)
        elif path == "auto":
            step = with_kernel_switch(backend, "conv_paths.autotune", step)
            if step is None:
                continue
        variants[name] = (step, backend.sync)
    torch = _torch_or_none() if use_torch else None
    if torch is not None:
        variants.update(_torch_convnet_steps(torch, backend, X, y, batch))
    return [measure_row(f"ThreeLayerConvNet step, batch {batch}", variants, time_variants, repeats, budget, None)]


def _torch_convnet_steps(torch, backend, X, y, batch):
    """The same step in PyTorch on the backend's device: eager, and on a GPU replayed from a graph too."""
    if backend.is_gpu:
        device, sync, names = torch.device("cuda", backend.device.id), torch.cuda.synchronize, ("torch", "torch-graph")
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    else:
        device, sync, names = torch.device("cpu"), backend.sync, ("torch",)
    X_t = torch.as_tensor(backend.to_numpy(X), device=device)
    y_t = torch.as_tensor(backend.to_numpy(y), device=device)
    steps = {}
    for name in names:
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 7, padding=3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
            torch.nn.Linear(32 * 16 * 16, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10),
        ).to(device)  # fmt: skip
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-3)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step(net=net, optimizer=optimizer, loss_fn=loss_fn):
            idx = torch.randint(0, X_t.shape[0], (batch,), device=device)
            loss = loss_fn(net(X_t[idx]), y_t[idx])
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            optimizer.step()
            return loss

        if name == "torch-graph":
            from xpnet.cli.bench import torch_graph_step

            step = torch_graph_step(torch, step)
        steps[name] = (step, sync)
    return steps


def measure_row(label, variants, time_variants, repeats, budget, flops):
    results, ready = {}, {}
    for name, (step, sync) in variants.items():
        try:
            step()
            step()  # a graph variant captures on its second step
            sync()
            ready[name] = (step, sync)
        except Exception as exc:  # a variant that cannot run is reported; the others are still measured
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    for name, timing in time_variants(ready, repeats, budget).items():
        results[name] = {**timing.us(), "steps_per_repeat": timing.steps}
        if flops:
            results[name]["tflops"] = flops / timing.seconds / 1e12
    # A variant that failed says so here too: a log read alone would otherwise show it as missing.
    cells = [_cell(name, result) for name, result in results.items()]
    print(f"{label}: " + ", ".join(cells), flush=True)
    return {"case": label, "results": results}


def _cell(name, result) -> str:
    """A variant's result in the progress line: µs per step and, over several repeats, their range."""
    if "us" not in result:
        return f"{name} failed: {result['error']}"
    fastest, slowest = result.get("us_range", (result["us"], result["us"]))
    spread = f" ({fastest:.0f}–{slowest:.0f})" if slowest > fastest else ""
    return f"{name} {result['us']:.0f} µs{spread}"


def format_conv_table(title, rows, names, ratios):
    """A markdown table of µs per variant and the requested ratios (a/b)."""
    header = (
        f"| {title} | "
        + " | ".join(f"{n} µs" for n in names)
        + " | "
        + " | ".join(f"{a}/{b}" for a, b in ratios)
        + " |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        r = row["results"]
        cells = [row["case"]]
        cells += [f"{r[n]['us']:.0f}" if "us" in r.get(n, {}) else ("failed" if n in r else "–") for n in names]
        cells += [
            f"{r[a]['us'] / r[b]['us']:.2f}" if "us" in r.get(a, {}) and "us" in r.get(b, {}) else "–"
            for a, b in ratios
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
