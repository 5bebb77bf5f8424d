"""The fast CIFAR-10 recipe's layers one at a time (``xpnet-bench --suite ops``).

Each row times one layer's forward and backward pass at the recipe's shapes (batch
``--ops-batch``, 1024 by default) on the backend, beside PyTorch's same layer (autograd on
the same device) when it is installed, and gives the least time that moving the layer's
bytes once takes at the copy bandwidth measured in the same run ("floor"). ``count`` is how
often the row's layer runs in one training step, so ``count × µs`` summed over the rows says
how much of a step the layers outside the convolutions take on each side. The last rows
time the whole network's loss and gradients (no update), eagerly. The conv-phase rows
split the im2col path of the recipe's two largest convolutions into its passes (columns,
the three GEMMs, the transposes, col2im), each against its bytes and, for the GEMMs, with
the TFLOP/s reached; on CuPy the whitening conv's rows end with the direct kernels that do
without columns (``CupyKernels.direct_small_convs``).

Bytes per row (float32): max pool reads x and writes out and a 4-byte argmax, then reads
dout and the argmax and writes dx; GELU, and batchnorm with the GELU after it (as the
network runs them: :func:`~xpnet.spatial_norm.spatial_batchnorm_gelu_forward`), read x and
write out, then read dout and x and write dx; a per-channel sum reads x once.
"""

from __future__ import annotations

import time

import numpy as np

from xpnet import fast_layers, layers
from xpnet.backend import accelerated
from xpnet.backend.kernel_sources import DIRECT_CONV_MAX_TAPS
from xpnet.cli.bench_conv import measure_row, with_kernel_switch
from xpnet.cnn import FastConvNet
from xpnet.conv_common import channel_sum
from xpnet.recipes.fast94 import Fast94Settings
from xpnet.spatial_norm import spatial_batchnorm_gelu_backward, spatial_batchnorm_gelu_forward

__all__ = ["CONV_PHASE_SHAPES", "OPS", "conv_phase_rows", "copy_bandwidth", "format_ops_table", "ops_rows"]

# (kind, (C, H, W) of the layer's input, runs per training step) at widths 64, 256, 256. A
# kind ending in ", conv output" takes its input as the network hands it over: a convolution's
# output, which im2col + GEMM leaves as a view of (C, N, H, W) or on the reference path of
# (C, H, W, N) (fast_layers.column_layout; each group's first pool, after conv1, and its second
# batchnorm, after conv2); PyTorch's convolutions give NCHW.
CONV_OUTPUT = ", conv output"
OPS = [
    ("max pool 2" + CONV_OUTPUT, (64, 31, 31), 1),
    ("max pool 2" + CONV_OUTPUT, (256, 15, 15), 1),
    ("max pool 2" + CONV_OUTPUT, (256, 7, 7), 1),
    ("max pool 3 (global)", (256, 3, 3), 1),
    ("batchnorm + gelu", (64, 15, 15), 1),
    ("batchnorm + gelu" + CONV_OUTPUT, (64, 15, 15), 1),
    ("batchnorm + gelu", (256, 7, 7), 1),
    ("batchnorm + gelu" + CONV_OUTPUT, (256, 7, 7), 1),
    ("batchnorm + gelu", (256, 3, 3), 1),
    ("batchnorm + gelu" + CONV_OUTPUT, (256, 3, 3), 1),
    ("gelu", (24, 31, 31), 1),
    ("channel sum", (24, 31, 31), 1),
    ("channel sum", (64, 15, 15), 0),
]


def _pool_size(kind):
    return 3 if "3" in kind else 2


def _bytes(kind, batch, shape):
    """The bytes a layer must move once (forward + backward), float32."""
    c, h, w = shape
    size = batch * c * h * w * 4
    if kind.startswith("max pool"):
        k = _pool_size(kind)
        pooled = batch * c * (h // k) * (w // k) * 4
        return size + 2 * pooled + (2 * pooled + pooled + size)  # x, out, argmax; dout, argmax, dx
    if kind == "channel sum":
        return size
    return 2 * size + 3 * size  # x, out; dout, x, dx


def copy_bandwidth(backend, timer, repeats, budget) -> float:
    """Bytes per second of a copy within the device's memory (read + written): 1 GiB on a
    GPU, far larger than its cache; 64 MiB on the CPU."""
    xp = backend.xp
    nbytes = 1 << 30 if backend.is_gpu else 1 << 26
    n = nbytes // 4
    src = backend.rng(0).uniform((n,), dtype=xp.float32)
    dst = xp.empty_like(src)

    def copy():
        dst[...] = src

    return 2 * n * 4 / timer({"copy": (copy, backend.sync)}, repeats, budget)["copy"].seconds


def _xpnet_step(backend, kind, batch, shape):
    """One forward + backward pass of the layer on random inputs (never zeros), laid out as
    the network hands them to it."""
    xp = backend.xp
    rng = backend.rng(1)
    x = rng.normal((batch, *shape), dtype=xp.float32)
    if kind.endswith(CONV_OUTPUT):
        kind = kind[: -len(CONV_OUTPUT)]
        layout = fast_layers.column_layout(x)
        x = fast_layers.back_from(xp, fast_layers._contiguous(xp, xp.permute_dims(x, layout)), layout)
    k = _pool_size(kind)
    out_shape = (batch, shape[0], shape[1] // k, shape[2] // k) if kind.startswith("max pool") else (batch, *shape)
    dout = rng.normal(out_shape, dtype=xp.float32)
    if kind.startswith("max pool"):
        param = {"pool_height": k, "pool_width": k, "stride": k, "drop_remainder": True}  # as FastConvNet pools

        def step():
            out, cache = fast_layers.max_pool_forward_fast(x, param)
            return fast_layers.max_pool_backward_fast(dout, cache)

    elif kind == "batchnorm + gelu":
        beta = xp.zeros((shape[0],), dtype=xp.float32, device=backend.device)
        bn_param = {"mode": "train", "momentum": 0.6, "eps": 1e-12}

        def step():
            out, cache = spatial_batchnorm_gelu_forward(x, None, beta, bn_param)
            return spatial_batchnorm_gelu_backward(dout, cache)

    elif kind == "gelu":

        def step():
            out, cache = layers.gelu_forward(x)
            return layers.gelu_backward(dout, cache)

    else:

        def step():
            return channel_sum(xp, x)

    return step


def _one_pass_channel_sum(backend, batch, shape):
    """The per-channel sum as a single reduction over axes (0, 2, 3), for comparison."""
    xp = backend.xp
    x = backend.rng(1).normal((batch, *shape), dtype=xp.float32)
    return lambda: xp.sum(x, axis=(0, 2, 3))


def _torch_step(torch, device, kind, batch, shape):
    functional = torch.nn.functional
    kind = kind.removesuffix(CONV_OUTPUT)  # PyTorch's convolutions hand over NCHW
    x = torch.randn(batch, *shape, device=device, requires_grad=kind != "channel sum")
    if kind == "channel sum":
        return lambda: x.sum(dim=(0, 2, 3))
    k = _pool_size(kind)
    if kind.startswith("max pool"):
        forward = lambda: functional.max_pool2d(x, k)  # noqa: E731
    elif kind == "batchnorm + gelu":
        beta = torch.zeros(shape[0], device=device, requires_grad=True)
        mean, var = torch.zeros(shape[0], device=device), torch.ones(shape[0], device=device)
        forward = lambda: functional.gelu(functional.batch_norm(x, mean, var, None, beta, True, 0.4, 1e-12))  # noqa: E731
    else:
        forward = lambda: functional.gelu(x)  # noqa: E731
    dout = torch.randn_like(forward())

    def step():
        return torch.autograd.grad(forward(), x, dout)

    return step


def _net_steps(backend, torch, device, batch):
    """The whole network's loss and gradients at widths 64, 256, 256 (no update), both sides."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    settings = Fast94Settings()
    model = FastConvNet(widths=settings.widths, backend=backend, seed=0)
    X_x, y_x = backend.asarray(X), backend.asarray(y)
    steps = {"xpnet": (lambda: model.loss(X_x, y_x), backend.sync)}
    for name, switch in (("xpnet warp sums", "warp_plane_sums"), ("xpnet direct conv", "direct_small_convs"),
                         ("xpnet autotuned convs", "conv_paths.autotune")):  # fmt: skip
        switched = with_kernel_switch(backend, switch, lambda: model.loss(X_x, y_x))
        if switched is not None:
            steps[name] = (switched, backend.sync)
    if torch is not None:
        from xpnet.recipes.fast94_torch import make_net

        net = make_net(settings, device=device)
        X_t, y_t = torch.as_tensor(X, device=device), torch.as_tensor(y, device=device)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing, reduction="sum")

        def torch_step():
            net.zero_grad(set_to_none=False)
            loss = loss_fn(net(X_t), y_t)
            loss.backward()
            return loss

        steps["torch"] = (torch_step, _torch_sync(torch, backend))
    return steps


# (C_in, C_out, H, kernel, pad, input_grad): the whitening layer (no dx: its input is the
# data), and the two convolutions that cost a recipe step the most.
CONV_PHASE_SHAPES = [(3, 24, 32, 2, 0, False), (24, 64, 31, 3, 1, True), (64, 256, 15, 3, 1, True)]


def _conv_phases(backend, rng, batch, c_in, c_out, size, k, pad, input_grad) -> list:
    """[(name, step, bytes, flops)] for the passes of one im2col convolution (without the
    two that make dx where ``input_grad`` is False), and, where the backend's kernels have
    them and the filters few enough taps, the direct kernels' two passes that replace im2col
    and the GEMMs for out and dw."""
    xp = backend.xp
    x = rng.normal((batch, c_in, size, size), dtype=xp.float32)
    w = rng.normal((c_out, c_in * k * k), std=0.05, dtype=xp.float32)
    out_size = size + 2 * pad - k + 1
    geometry = (k, k, 1, pad, out_size, out_size)
    fast = accelerated(x)
    layout = fast_layers.column_layout(x)  # the order of the columns' positions, as the convolution lays them out

    def im2col():
        return fast_layers.columns(x, *geometry)

    cols = im2col()
    dout = rng.normal((batch, c_out, out_size, out_size), dtype=xp.float32)

    def to_rows():
        return fast_layers._filter_rows(xp, dout, layout)

    dout_rows = to_rows()
    dcols = layers.matmul(xp.matrix_transpose(w), dout_rows)

    def col2im():
        if fast is not None:
            return fast.col2im(dcols, x, *geometry)
        return fast_layers._col2im(xp, dcols, (batch, c_in, size, size), *geometry, layout)

    positions = batch * out_size * out_size
    col_bytes, x_bytes, y_bytes = 4 * c_in * k * k * positions, 4 * x.size, 4 * c_out * positions
    flops = 2 * c_out * c_in * k * k * positions
    phases = [
        ("im2col", im2col, x_bytes + col_bytes, None),
        ("GEMM out = w @ cols", lambda: layers.matmul(w, cols), col_bytes + y_bytes, flops),
        ("dout to rows (transpose)", to_rows, 2 * y_bytes, None),
        ("GEMM dw = dout @ cols.T", lambda: layers.matmul(dout_rows, xp.matrix_transpose(cols)), y_bytes + col_bytes,
         flops),
        ("GEMM dcols = w.T @ dout", lambda: layers.matmul(xp.matrix_transpose(w), dout_rows), y_bytes + col_bytes,
         flops),
        ("col2im", col2im, col_bytes + x_bytes, None),
    ]  # fmt: skip
    phases = phases if input_grad else phases[:4]
    if fast is not None and hasattr(fast, "direct_small_convs") and c_in * k * k <= DIRECT_CONV_MAX_TAPS:
        # the direct kernels in place of the column passes: x read (once, if the cache holds it), y written or read
        w4 = xp.reshape(w, (c_out, c_in, k, k))
        forward = with_kernel_switch(
            backend, "direct_small_convs", lambda: fast.direct_conv_forward(x, w4, None, 1, pad, out_size, out_size)
        )
        phases += [
            ("direct forward (no columns)", forward, x_bytes + y_bytes, flops),
            ("direct dw (no columns)", lambda: fast.direct_conv_filter_grad(x, dout, k, k, 1, pad), x_bytes + y_bytes,
             flops),
        ]  # fmt: skip
    return phases


def conv_phase_rows(backend, time_variants, repeats, budget, bandwidth, batch=1024, on_row=None) -> list:
    """One row per pass of the im2col path (xpnet only), for each of CONV_PHASE_SHAPES:
    µs, the floor of its bytes at ``bandwidth`` and, for the GEMMs, TFLOP/s. ``on_row(rows)``
    is called after each row."""
    rng = backend.rng(3)
    rows = []
    for shape in CONV_PHASE_SHAPES:
        c_in, c_out, size = shape[:3]
        for name, step, nbytes, flops in _conv_phases(backend, rng, batch, *shape):
            label = f"conv {c_in}→{c_out} {size}×{size}: {name}"
            row = measure_row(label, {"xpnet": (step, backend.sync)}, time_variants, repeats, budget, flops)
            row["floor_us"] = nbytes / bandwidth * 1e6
            rows.append(row)
            if on_row is not None:
                on_row(rows)
    return rows


def _torch_sync(torch, backend):
    return torch.cuda.synchronize if backend.is_gpu else (lambda: None)


def ops_rows(backend, time_variants, repeats, budget, batch=1024, use_torch=True, tf32=False, on_progress=None) -> dict:
    """{"batch", "bandwidth_gbs", "rows": [...], "conv_phases": [...], "net": row}: each row's µs
    per variant, its floor and its count per training step; ``tf32`` sets PyTorch's switches to
    match xpnet's. ``on_progress(report)`` gets the report so far after each row, so that a run
    stopped by a time limit can keep what it measured."""
    torch, device = None, None
    if use_torch:
        try:
            from xpnet.cli.bench import torch_setup

            torch, device = torch_setup(backend, tf32 if backend.is_gpu else None)
        except ImportError:
            torch = None
    if torch is not None and backend.is_gpu:
        torch.backends.cudnn.benchmark = True
    if backend.is_gpu:
        backend.set_tf32(tf32)  # the conv suite, run before, leaves it off
    started = time.perf_counter()
    bandwidth = copy_bandwidth(backend, time_variants, repeats, budget)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)", flush=True)
    report = {"batch": batch, "bandwidth_gbs": bandwidth / 1e9, "rows": [], "conv_phases": []}
    progress = on_progress if on_progress is not None else (lambda report: None)
    for kind, shape, count in OPS:
        variants = {"xpnet": (_xpnet_step(backend, kind, batch, shape), backend.sync)}
        if kind == "channel sum":
            variants["xpnet one-pass"] = (_one_pass_channel_sum(backend, batch, shape), backend.sync)
        warp_step = with_kernel_switch(backend, "warp_plane_sums", _xpnet_step(backend, kind, batch, shape))
        if warp_step is not None and ("batchnorm" in kind or kind == "channel sum"):
            variants["xpnet warp sums"] = (warp_step, backend.sync)
        if torch is not None:
            variants["torch"] = (_torch_step(torch, device, kind, batch, shape), _torch_sync(torch, backend))
        row = measure_row(f"{kind} {(batch, *shape)}", variants, time_variants, repeats, budget, None)
        row["count"] = count
        row["floor_us"] = _bytes(kind, batch, shape) / bandwidth * 1e6
        report["rows"].append(row)
        progress(report)

    def phases_so_far(rows):
        report["conv_phases"] = rows
        progress(report)

    conv_phase_rows(backend, time_variants, repeats, budget, bandwidth, batch, phases_so_far)
    net_steps = _net_steps(backend, torch, device, batch)
    label = f"FastConvNet loss and gradients, batch {batch}"
    report["net"] = measure_row(label, net_steps, time_variants, repeats, budget, None)
    progress(report)
    print(f"ops suite: {time.perf_counter() - started:.0f} s", flush=True)
    return report


def format_ops_table(report: dict) -> str:
    """A markdown table: µs per side, the floor, the count per step, and each side's ms per step."""
    names = ["xpnet", "xpnet one-pass", "xpnet warp sums", "torch"]
    lines = [
        f"| layer (batch {report['batch']}) | count | floor µs | " + " | ".join(f"{n} µs" for n in names)
        + " | xpnet/floor | xpnet/torch |",
        "|---" * (len(names) + 5) + "|",
    ]  # fmt: skip
    totals = {name: 0.0 for name in names}
    for row in report["rows"]:
        r = row["results"]
        cells = [row["case"], str(row["count"]), f"{row['floor_us']:.0f}"]
        cells += [f"{r[n]['us']:.0f}" if "us" in r.get(n, {}) else ("failed" if n in r else "–") for n in names]
        xpnet = r.get("xpnet", {}).get("us")
        cells.append(f"{xpnet / row['floor_us']:.1f}" if xpnet and row["floor_us"] else "–")
        cells.append(f"{xpnet / r['torch']['us']:.2f}" if xpnet and "us" in r.get("torch", {}) else "–")
        lines.append("| " + " | ".join(cells) + " |")
        for n in names:
            if "us" in r.get(n, {}):
                totals[n] += row["count"] * r[n]["us"]
    per_step = ", ".join(f"{n} {totals[n] / 1000:.2f} ms" for n in ("xpnet", "torch") if totals[n])
    # the warp-per-plane sums: the same total with each of their rows in place of xpnet's own
    if any("us" in row["results"].get("xpnet warp sums", {}) for row in report["rows"]):
        warp = sum(row["count"] * row["results"].get("xpnet warp sums", row["results"].get("xpnet", {})).get("us", 0)
                   for row in report["rows"])  # fmt: skip
        per_step += f"; xpnet with the warp sums {warp / 1000:.2f} ms"
    lines.append(f"\nThese layers per training step (count × µs): {per_step}.")
    lines += ["", "| conv pass | floor µs | xpnet µs | xpnet/floor | TFLOP/s |", "|---|---|---|---|---|"]
    for row in report["conv_phases"]:
        r = row["results"].get("xpnet", {})
        if "us" not in r:
            lines.append(f"| {row['case']} | {row['floor_us']:.0f} | failed | – | – |")
            continue
        tflops = f"{r['tflops']:.1f}" if "tflops" in r else "–"
        lines.append(
            f"| {row['case']} | {row['floor_us']:.0f} | {r['us']:.0f} | {r['us'] / row['floor_us']:.1f} | {tflops} |"
        )
    net = report["net"]["results"]
    whole = ", ".join(f"{n} {v['us'] / 1000:.2f} ms" for n, v in net.items() if "us" in v)
    lines.append(f"The whole network's loss and gradients: {whole}.")
    return "\n".join(lines)
