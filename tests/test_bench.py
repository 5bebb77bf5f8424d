"""The benchmark command runs and reports what it measured (timings themselves are never asserted)."""

import itertools
import json
import os
import re
import shlex
import time
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from xpnet.cli import bench


def small_suite_args(suite, out, *extra):
    """bench.py's arguments for ``suite`` at batch 2 (ops), one short repeat, no PyTorch, JSON to ``out``."""
    batch = ["--ops-batch", "2"] if suite in ("ops", "all") else []
    return ["--suite", suite, *batch, "--repeats", "1", "--budget", "0.01", "--no-torch", "--json", str(out), *extra]


def test_conv_suite_on_the_cpu_reports_naive_fast_and_the_convnet_step(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench.main(["--suite", "conv", "--repeats", "1", "--budget", "0.01", "--no-torch", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    rows, names, ratios = report["conv"]["course shapes (CPU)"]
    parts = ["conv forward: its im2col alone", "conv forward: its GEMM alone"]
    assert [row["case"] for row in rows] == ["conv forward", *parts, "conv backward", "max pool forward",
                                             "max pool backward"]  # fmt: skip
    for row in rows:
        assert row["results"]["naive"]["us"] > 0 and row["results"]["fast"]["us"] > 0
    step_rows = report["conv"]["ThreeLayerConvNet"][0]
    assert step_rows[0]["results"]["xpnet"]["us"] > 0
    printed = capsys.readouterr().out
    assert "| course shapes (CPU) | naive µs | fast µs | torch µs | naive/fast | fast/torch |" in printed


def test_ops_suite_times_each_recipe_layer_with_its_floor_and_count(tmp_path, capsys):
    from xpnet.cli.bench_ops import CONV_PHASE_SHAPES, OPS

    out = tmp_path / "ops.json"
    args = small_suite_args("ops", out)
    assert bench.main(args) == 0
    report = json.loads(out.read_text())["ops"]
    assert report["batch"] == 2 and report["bandwidth_gbs"] > 0
    assert [row["case"] for row in report["rows"]] == [f"{kind} {(2, *shape)}" for kind, shape, _ in OPS]
    # Each count per training step as FastConvNet runs them: 3 pools of conv outputs, 6 batchnorms each
    # with its GELU (half of them on conv outputs), and the whitening layer's GELU.
    counts = {kind: sum(c for k, _, c in OPS if k == kind) for kind, _, _ in OPS}
    assert counts["max pool 2, conv output"] == 3
    assert counts["batchnorm + gelu"] == counts["batchnorm + gelu, conv output"] == 3 and counts["gelu"] == 1
    for row, (kind, _, count) in zip(report["rows"], OPS):
        assert row["results"]["xpnet"]["us"] > 0 and row["floor_us"] > 0 and row["count"] == count
        assert ("xpnet one-pass" in row["results"]) == (kind == "channel sum")
    assert report["net"]["results"]["xpnet"]["us"] > 0
    phases = report["conv_phases"]
    # six passes a convolution, four where it makes no dx (im2col, its GEMM, dout to rows, the dw GEMM)
    with_dx = sum(shape[-1] for shape in CONV_PHASE_SHAPES)
    assert len(phases) == 6 * with_dx + 4 * (len(CONV_PHASE_SHAPES) - with_dx)
    assert (
        all(row["floor_us"] > 0 for row in phases) and "conv 3→24 32×32: GEMM dw = dout @ cols.T" in phases[3]["case"]
    )
    gemms = [row for row in phases if "GEMM" in row["case"]]
    assert len(gemms) == 3 * with_dx + 2 * (len(CONV_PHASE_SHAPES) - with_dx)
    assert all(row["results"]["xpnet"]["tflops"] > 0 for row in gemms)
    printed = capsys.readouterr().out
    assert "| max pool 2, conv output (2, 64, 31, 31) | 1 |" in printed and "These layers per training step" in printed


def test_ops_suite_times_the_warp_per_plane_sums_beside_the_reductions_where_the_kernels_have_them(
    tmp_path, monkeypatch, capsys
):
    """On CuPy the batchnorm rows, the channel sums and the whole network are timed a second
    time with the PLANE_SUMS kernel; here CuPy's kernels run on the CPU (tests/cpu_kernels.py)."""
    import cpu_kernels

    from xpnet.backend import dispatch

    if cpu_kernels.COMPILER is None:
        pytest.skip("no C++ compiler to run the kernels on the CPU")
    kernels = cpu_kernels.cupy_kernels_on_cpu()
    monkeypatch.setitem(dispatch._ACCELERATORS, np.ndarray, kernels)
    out = tmp_path / "ops.json"
    args = small_suite_args("ops", out)
    assert bench.main(args) == 0
    report = json.loads(out.read_text())["ops"]
    for row in report["rows"]:
        timed = "us" in row["results"].get("xpnet warp sums", {})
        assert timed == ("batchnorm" in row["case"] or row["case"].startswith("channel sum")), row["case"]
    assert report["net"]["results"]["xpnet warp sums"]["us"] > 0
    # the direct small-filter kernels: the whole network, and the whitening conv's two passes beside its im2col path
    assert report["net"]["results"]["xpnet direct conv"]["us"] > 0
    assert report["net"]["results"]["xpnet autotuned convs"]["us"] > 0  # the whitening conv timed both ways first
    assert not kernels.conv_paths.autotune and [c["w_shape"] for c in kernels.conv_paths.report()] == [(24, 3, 2, 2)]
    direct = [row["case"] for row in report["conv_phases"] if "direct" in row["case"]]
    assert direct == ["conv 3→24 32×32: direct forward (no columns)", "conv 3→24 32×32: direct dw (no columns)"]
    assert not kernels.warp_plane_sums and not kernels.direct_small_convs  # switched back after each step
    assert "xpnet with the warp sums" in capsys.readouterr().out
    # --warp-plane-sums and --direct-convs switch them on for the whole run, and the ops suite's variants leave them on
    assert bench.main(["--warp-plane-sums", "--direct-convs", *args]) == 0
    assert kernels.warp_plane_sums and kernels.direct_small_convs
    saved = json.loads(out.read_text())
    assert saved["warp_plane_sums"] is True and saved["direct_small_convs"] is True


def test_gpu_conv_rows_time_the_direct_kernels_where_the_filters_have_few_taps(monkeypatch):
    """The GPU rows' variants, run here through CuPy's kernels on the CPU (tests/cpu_kernels.py)
    at a small batch on small shapes: "xpnet-direct" beside im2col only where C·k·k ≤ 32, and
    "xpnet-auto", the faster of the two as autotuning finds it."""
    import cpu_kernels

    import xpnet
    from xpnet.backend import dispatch
    from xpnet.cli import bench_conv, common

    if cpu_kernels.COMPILER is None:
        pytest.skip("no C++ compiler to run the kernels on the CPU")
    kernels = cpu_kernels.cupy_kernels_on_cpu()
    monkeypatch.setitem(dispatch._ACCELERATORS, np.ndarray, kernels)
    monkeypatch.setattr(bench_conv, "GPU_SHAPES", [(3, 4, 8, 2, 0), (4, 4, 6, 3, 1)])  # 12 taps, then 36
    direct_runs = []
    forward = kernels.direct_conv_forward
    monkeypatch.setattr(kernels, "direct_conv_forward", lambda *a: direct_runs.append(forward(*a)) or direct_runs[-1])
    backend = xpnet.get_backend("numpy")
    rows = bench_conv.gpu_rows(backend, bench.time_variants, 1, 0.01, tf32=False, use_torch=False, batch=2)
    assert any(out is not None for out in direct_runs)  # the variant ran the direct kernels
    assert [row["case"] for row in rows] == ["(3, 4, 8, 2, 0) batch 2", "(4, 4, 6, 3, 1) batch 2"]
    assert sorted(rows[0]["results"]) == ["xpnet", "xpnet-auto", "xpnet-direct"]
    assert rows[0]["results"]["xpnet-direct"]["us"] > 0 and rows[0]["results"]["xpnet-auto"]["us"] > 0
    assert sorted(rows[1]["results"]) == ["xpnet", "xpnet-auto"]
    assert not kernels.direct_small_convs and not kernels.conv_paths.autotune
    # xpnet-auto timed the first shape's two paths once and kept one; the second has one path, nothing to time
    chosen = common.conv_paths_chosen(backend)
    assert [(c["x_shape"], sorted(c["ms"])) for c in chosen] == [((2, 3, 8, 8), ["direct", "im2col"])]
    assert chosen[0]["chosen"] in ("direct", "im2col")
    table = common.format_conv_paths(chosen).splitlines()
    assert table[2].startswith("| (2, 3, 8, 8) → (4, 3, 2, 2), 1, 0 | float32/float32/no bias | off | direct ")
    assert common.format_conv_paths([]).startswith("autotuning timed no convolution")


def test_convnet_rows_time_the_captured_step_with_autotuned_paths_where_convolutions_have_paths(monkeypatch):
    """Through CuPy's kernels on the CPU, with a stand-in capture that replays by running the
    step: "xpnet-auto-graph" beside the eager and captured steps, autotuning off again after."""
    import cpu_kernels

    import xpnet
    from xpnet.backend import dispatch
    from xpnet.backend.numpy_backend import NumpyBackend
    from xpnet.cli import bench_conv

    if cpu_kernels.COMPILER is None:
        pytest.skip("no C++ compiler to run the kernels on the CPU")
    kernels = cpu_kernels.cupy_kernels_on_cpu()
    monkeypatch.setitem(dispatch._ACCELERATORS, np.ndarray, kernels)
    monkeypatch.setattr(NumpyBackend, "can_capture", True)
    monkeypatch.setattr(NumpyBackend, "capture", lambda self, step: types.SimpleNamespace(replay=step))
    autotuned = []
    conv_path = kernels.conv_path
    monkeypatch.setattr(kernels, "conv_path", lambda *a: autotuned.append(kernels.conv_paths.autotune) or conv_path(*a))
    backend = xpnet.get_backend("numpy")
    rows = bench_conv.convnet_step_rows(backend, bench.time_variants, 1, 0.01, use_torch=False, batch=8)
    assert rows[0]["case"] == "ThreeLayerConvNet step, batch 8"
    results = rows[0]["results"]
    assert sorted(results) == ["xpnet", "xpnet-auto-graph", "xpnet-graph"]
    assert all(results[name]["us"] > 0 for name in results)
    assert True in autotuned and False in autotuned  # on for its variant's steps only
    assert not kernels.conv_paths.autotune


@pytest.mark.parametrize(
    "flag, what", [("--warp-plane-sums", "fused batchnorm kernels"), ("--direct-convs", "direct convolution kernels")]
)
def test_kernel_switches_are_refused_where_the_backend_has_no_such_kernels(capsys, flag, what):
    with pytest.raises(SystemExit):
        bench.main(["--suite", "none", flag])
    assert f"{flag}: backend 'numpy' has no {what} (CuPy has)" in capsys.readouterr().err


def test_conv_autotune_is_refused_where_convolutions_have_one_path(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--suite", "none", "--conv-autotune"])
    assert "--conv-autotune: convolution autotuning applies to CUDA GPUs; backend 'numpy'" in capsys.readouterr().err


@pytest.mark.parametrize("suite", ["ops", "conv"])
def test_the_json_report_grows_as_a_suite_measures(tmp_path, monkeypatch, suite):
    """A GPU step killed by its time limit keeps what its suite measured so far."""
    from xpnet.cli.bench_ops import OPS

    snapshots = []
    replace = os.replace

    def recording(source, target):
        replace(source, target)
        part = json.loads(Path(target).read_text()).get(suite, {})
        if suite == "ops":
            snapshots.append(len(part.get("rows", [])) + len(part.get("conv_phases", [])) + ("net" in part))
        else:
            snapshots.append(sum(len(rows) for rows, _, _ in part.values()))

    monkeypatch.setattr(os, "replace", recording)
    out = tmp_path / "bench.json"
    assert bench.main(small_suite_args(suite, out)) == 0
    assert snapshots == sorted(snapshots) and snapshots[-2] == snapshots[-1]
    if suite == "ops":  # after each row, then once at the suite's end and once at the run's
        assert snapshots[0] == 1 and len(snapshots) == snapshots[-1] + 2 and snapshots[-1] > len(OPS)
    else:  # after the CPU table (6 rows), the ThreeLayerConvNet step's, at the suite's end and the run's
        assert snapshots == [6, 7, 7, 7]


def test_ops_batch_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--suite", "ops", "--ops-batch", "0"])
    assert "argument --ops-batch: must be a positive integer, got 0" in capsys.readouterr().err


def test_fc_suite_with_one_small_config(capsys):
    assert bench.main(["--config", "16:8", "--rows", "64", "--repeats", "1", "--budget", "0.01", "--no-torch"]) == 0
    assert "| [16], 8 |" in capsys.readouterr().out


def test_tf32_is_refused_on_the_cpu(capsys):
    import pytest

    with pytest.raises(SystemExit) as info:
        bench.main(["--tf32", "--config", "16:8"])
    assert info.value.code == 2
    assert "--tf32: TF32 applies to CUDA GPUs" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--repeats", "0", "--repeats: must be a positive integer, got 0"),  # statistics.median of nothing before
        ("--rows", "0", "--rows: must be a positive integer, got 0"),
        ("--budget", "0", "--budget: must be > 0, got 0"),
        ("--budget", "inf", "--budget: must be a finite number > 0, got inf"),  # OverflowError traceback
        ("--warmup-epochs", "inf", "--warmup-epochs: must be a finite number > 0, got inf"),
        ("--runs", "-1", "--runs: must be a positive integer, got -1"),
        ("--recipe-sides", ",", "--recipe-sides: names no side, got ','"),  # ran every side, as if not given
    ],
)
def test_counts_and_budgets_that_cannot_be_right_are_refused(capsys, flag, value, message):
    with pytest.raises(SystemExit) as info:
        bench.main([flag, value, "--config", "16:8"])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("config", ["200:0", "0:8", "16,-4:8", "16:"])
def test_configs_with_a_size_below_one_are_refused(capsys, config):
    """A batch of 0 ran: its row said 'failed' and PyTorch's side divided by zero."""
    with pytest.raises(SystemExit) as info:
        bench.main(["--config", config, "--no-torch"])
    assert info.value.code == 2
    assert (
        f"config must look like 100,100:1024 (hidden dims:batch, each >= 1), got {config!r}" in capsys.readouterr().err
    )


def _separable_subset(path):
    """CIFAR-shaped rows around ten centres, which the TwoLayerNet needs a few epochs to separate."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((10, 3072)).astype(np.float32)
    y = rng.integers(0, 10, 1200)
    X = 0.2 * centres[y] + rng.standard_normal((1200, 3072)).astype(np.float32)
    np.savez(path, X_train=X[:1000], y_train=y[:1000], X_val=X[1000:], y_val=y[1000:])
    return str(path)


def test_time_to_accuracy_breakdown_accounts_for_the_whole_run(tmp_path, capsys):
    out = tmp_path / "tta.json"
    args = ["--suite", "none", "--time-to-accuracy", "--breakdown", "--cifar-npz", _separable_subset(tmp_path / "s.npz"),
            "--target", "1.01", "--max-epochs", "3", "--no-torch", "--json", str(out)]  # fmt: skip
    assert bench.main(args) == 0
    result = json.loads(out.read_text())["time_to_accuracy"]
    assert result["xpnet"]["reached"] is False  # an unreachable target: all three epochs run
    phases = result["xpnet"]["breakdown"]
    assert set(phases) == {"data checks", "transfer", "first step", "steps", "accuracy checks", "rest"}
    assert phases["steps"] > 0 and phases["first step"] > 0 and phases["accuracy checks"] > 0
    # The phases partition the breakdown run's own seconds (a separate run from the plain one,
    # whose total differs), and the timed phases, not the remainder, hold most of it.
    total = result["xpnet"]["breakdown_seconds"]
    assert sum(phases.values()) == pytest.approx(total, abs=1e-3)
    assert phases["rest"] < 0.5 * total
    assert "| first step |" in capsys.readouterr().out


def test_a_phase_inside_another_is_neither_counted_twice_nor_synchronised():
    """A step that prepares its batch (a "transfer" call) counts as step time only, and the
    clock does not synchronise inside it: on CuPy that step may be capturing a CUDA graph."""
    from xpnet.cli.bench_tta import PhaseClock

    events = []
    clock = PhaseClock(sync=lambda: events.append("sync"))
    prepare = clock.wrap("transfer", lambda: events.append("prepare"))
    step = clock.wrap_steps(lambda: (events.append("step"), prepare()))
    step()
    step()
    assert events == ["sync", "step", "prepare", "sync"] * 2
    assert set(clock.seconds) == {"first step", "steps"}
    with clock.phase("transfer"):  # on its own it is timed, and synchronised
        pass
    assert set(clock.seconds) == {"first step", "steps", "transfer"} and events[-2:] == ["sync", "sync"]


@pytest.mark.parametrize("warmup", [True, False])
def test_time_to_accuracy_warms_up_each_side_once_before_the_clocks_unless_told_not_to(tmp_path, monkeypatch, warmup):
    from xpnet.cli import bench_tta

    calls = []
    xpnet_run = bench_tta._xpnet_run

    def recorded_xpnet_run(backend, data, args, *rest, **options):
        calls.append(("xpnet", args.target))
        return xpnet_run(backend, data, args, *rest, **options)

    def torch_stand_in(backend, data, args, breakdown=False):  # what is asserted is when it runs
        calls.append(("torch", args.target))
        return {"seconds": 0.0, "epoch": 1, "val_acc": 0.0}, None

    monkeypatch.setattr(bench_tta, "_xpnet_run", recorded_xpnet_run)
    monkeypatch.setattr(bench_tta, "_torch_run", torch_stand_in)
    monkeypatch.setattr(bench_tta, "_torch_available", lambda: True)
    out = tmp_path / "tta.json"
    args = ["--suite", "none", "--time-to-accuracy", "--cifar-npz", _separable_subset(tmp_path / "s.npz"),
            "--target", "0.3", "--max-epochs", "2", "--json", str(out)] + ([] if warmup else ["--no-warmup"])  # fmt: skip
    assert bench.main(args) == 0
    assert json.loads(out.read_text())["time_to_accuracy"]["warmup"] is warmup
    # The warm-up stops at the first accuracy check (target 0), on each side, before any timed run.
    warm_up = [("xpnet", 0.0), ("torch", 0.0)] if warmup else []
    assert calls == warm_up + [("xpnet", 0.3), ("torch", 0.3)]


def test_time_to_accuracy_reports_a_failing_side_and_still_measures_the_others(tmp_path, monkeypatch):
    from xpnet.cli import bench_tta

    def refused(*args, **kwargs):
        raise RuntimeError("capturing a CUDA graph failed: operation not permitted when stream is capturing")

    monkeypatch.setattr(bench_tta, "_xpnet_run", refused)
    monkeypatch.setattr(bench_tta, "_torch_available", lambda: True)
    monkeypatch.setattr(bench_tta, "_torch_run", lambda backend, data, args, breakdown=False: (
        {"seconds": 0.5, "epoch": 1, "val_acc": 0.6}, bench_tta.PhaseClock()))  # fmt: skip
    out = tmp_path / "tta.json"
    args = ["--suite", "none", "--time-to-accuracy", "--breakdown", "--cifar-npz", _separable_subset(tmp_path / "s.npz"),
            "--target", "0.3", "--json", str(out)]  # fmt: skip
    assert bench.main(args) == 0
    result = json.loads(out.read_text())["time_to_accuracy"]
    assert result["xpnet"] == {"error": "RuntimeError: capturing a CUDA graph failed: operation not permitted "
                                        "when stream is capturing"}  # fmt: skip
    assert result["torch"]["seconds"] == 0.5 and "breakdown" in result["torch"]


def _tiny_recipe_report(tmp_path) -> dict:
    """bench --recipe fast94 on 64 random images at widths 4, 8, 8, two runs, xpnet alone: its report."""
    rng = np.random.default_rng(0)
    subset = tmp_path / "cifar.npz"
    np.savez(subset, X_train=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), y_train=rng.integers(0, 10, 64),
             X_test=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), y_test=rng.integers(0, 10, 10))  # fmt: skip
    out = tmp_path / "recipe.json"
    settings = ["--recipe-set", "widths=4,8,8", "--recipe-set", "batch_size=32", "--recipe-set", "epochs=1"]
    args = ["--recipe", "fast94", "--cifar-npz", str(subset), "--runs", "2", "--no-torch", "--json", str(out)]
    assert bench.main(args + settings) == 0
    return json.loads(out.read_text())["recipe"]


def test_recipe_runs_interleaved_and_reports_each_run(tmp_path, capsys):
    report = _tiny_recipe_report(tmp_path)
    assert report["settings"]["widths"] == [4, 8, 8] and report["train_images"] == 64
    runs = report["runs"]["xpnet"]
    assert len(runs) == 2 and all(run["steps"] == 2 and run["seconds"] > 0 for run in runs)
    printed = capsys.readouterr().out
    assert "| run | xpnet acc | xpnet s |" in printed and "| mean |" in printed


def test_the_recipe_table_gives_each_accuracy_difference_with_its_standard_error():
    from xpnet.cli.bench_recipe import format_recipe_table

    def rows(*accuracies):
        return [{"test_accuracy": a, "seconds": 1.0} for a in accuracies]

    runs = {"xpnet": rows(0.9019, 0.9078, 0.9039, 0.9046), "torch": rows(0.9077, 0.9080, 0.9095),
            "xpnet-fp16": rows(0.9061), "torch-fp16": rows(0.9043, 0.9071)}  # fmt: skip
    summary = {name: {"mean_accuracy": np.mean([r["test_accuracy"] for r in v]), "mean_seconds": 1.0}
               for name, v in runs.items()}  # fmt: skip
    table = format_recipe_table({"runs": runs, "summary": summary})
    ours, theirs = np.array([90.19, 90.78, 90.39, 90.46]), np.array([90.77, 90.80, 90.95])
    error = np.sqrt(ours.var(ddof=1) / 4 + theirs.var(ddof=1) / 3)
    assert f"accuracy xpnet - torch: -0.38 ± {error:.2f} points" in table and f"{error:.2f}" == "0.13"
    assert "(difference of the means, ± its standard error; 4 and 3 runs)" in table
    # one run on a side: no spread to give
    assert "accuracy xpnet-fp16 - torch-fp16: +0.04 points (difference of the means; 1 and 2 runs)" in table


def test_recipe_warm_up_can_be_shorter_and_the_sides_chosen(tmp_path, monkeypatch, capsys):
    from xpnet.cli import bench_recipe

    epochs, real = [], bench_recipe.timed_run

    def recorded(backend, settings, *rest):
        epochs.append(settings.epochs)
        return real(backend, settings, *rest)

    monkeypatch.setattr(bench_recipe, "timed_run", recorded)
    rng = np.random.default_rng(0)
    subset = tmp_path / "cifar.npz"
    np.savez(subset, X_train=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), y_train=rng.integers(0, 10, 64),
             X_test=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), y_test=rng.integers(0, 10, 10))  # fmt: skip
    common = ["--recipe", "fast94", "--cifar-npz", str(subset), "--runs", "1", "--no-torch",
              "--recipe-set", "widths=4,8,8", "--recipe-set", "batch_size=32", "--recipe-set", "epochs=2"]  # fmt: skip
    out = tmp_path / "recipe.json"
    assert bench.main([*common, "--warmup-epochs", "1", "--recipe-sides", "xpnet", "--json", str(out)]) == 0
    assert epochs == [1, 2]  # the warm-up's one epoch, then the recipe's two
    report = json.loads(out.read_text())["recipe"]
    assert report["warmup_epochs"] == 1 and list(report["runs"]) == ["xpnet"]
    with pytest.raises(SystemExit):
        bench.main([*common, "--recipe-sides", "xpnet,torch"])
    assert "--recipe-sides: no side torch here (there are: xpnet)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main([*common, "--warmup-epochs", "0"])
    assert "argument --warmup-epochs: must be > 0, got 0" in capsys.readouterr().err


def test_the_json_report_is_written_after_each_recipe_run(tmp_path, monkeypatch):
    # A GPU step killed by its time limit keeps the runs it finished: the file on disk grows run by run.
    snapshots = []
    replace = os.replace

    def recording(source, target):
        replace(source, target)
        snapshots.append(json.loads(Path(target).read_text()).get("recipe", {}).get("runs", {}).get("xpnet", []))

    monkeypatch.setattr(os, "replace", recording)
    final = _tiny_recipe_report(tmp_path)["runs"]["xpnet"]
    assert [len(runs) for runs in snapshots] == [1, 2, 2]  # after each run, then once at the end
    assert snapshots[0][0] == final[0] and not list(tmp_path.glob(".*.tmp-*"))


def test_recipe_measures_xpnet_eagerly_when_its_graph_capture_fails(tmp_path, monkeypatch, capsys):
    # A backend that claims to capture but cannot: the recipe's step capture raises, as a
    # refused capture would on a GPU not tried before; the benchmark still measures xpnet.
    from xpnet.backend.numpy_backend import NumpyBackend

    monkeypatch.setattr(NumpyBackend, "can_capture", True)
    report = _tiny_recipe_report(tmp_path)
    assert "cannot capture CUDA graphs" in report["failures"]["xpnet with CUDA graphs"]
    assert len(report["runs"]["xpnet"]) == 2 and "xpnet" not in report["failures"]
    assert "failed: xpnet with CUDA graphs: NotImplementedError" in capsys.readouterr().out


def test_recipe_settings_are_checked_by_name(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        bench.main(["--recipe", "fast94", "--cifar-npz", str(tmp_path / "x.npz"), "--recipe-set", "lr=1"])
    assert info.value.code == 2
    assert "unknown settings lr" in capsys.readouterr().err
    for setting, message in (("epochs=abc", "epochs must be a finite number, got 'abc'"),
                             ("widths=8,16", "widths must be three positive integers, got (8, 16)")):  # fmt: skip
        with pytest.raises(SystemExit) as info:
            bench.main(["--recipe", "fast94", "--cifar-npz", str(tmp_path / "x.npz"), "--recipe-set", setting])
        assert info.value.code == 2
        assert message in capsys.readouterr().err


def test_a_recipe_that_no_side_completes_exits_1_and_says_why(tmp_path, capsys):
    rng = np.random.default_rng(0)
    subset = tmp_path / "cifar.npz"
    np.savez(subset, X_train=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), y_train=rng.integers(0, 10, 16),
             X_test=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), y_test=rng.integers(0, 10, 4))  # fmt: skip
    args = ["--recipe", "fast94", "--cifar-npz", str(subset), "--runs", "1", "--no-torch", "--no-warmup",
            "--recipe-set", "widths=4,8,8", "--recipe-set", "batch_size=64"]  # fmt: skip
    assert bench.main(args) == 1
    printed = capsys.readouterr().out
    assert "no side completed a run" in printed
    assert "failed: xpnet: ValueError: fast94: batch_size 64 is larger than the 16 training images" in printed


def test_a_diverged_recipe_run_is_marked_in_its_line_the_table_and_the_json(tmp_path, capsys):
    """Its accuracy (chance, or worse) went into the table and the means unmarked, under NumPy's
    overflow warnings."""
    rng = np.random.default_rng(0)
    subset, out = tmp_path / "cifar.npz", tmp_path / "report.json"
    np.savez(subset, X_train=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), y_train=rng.integers(0, 10, 64),
             X_test=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), y_test=rng.integers(0, 10, 8))  # fmt: skip
    args = ["--recipe", "fast94", "--cifar-npz", str(subset), "--runs", "1", "--no-torch", "--no-warmup", "--json",
            str(out), "--recipe-set", "widths=4,4,4", "--recipe-set", "batch_size=32", "--recipe-set", "epochs=1",
            "--recipe-set", "learning_rate=1e30"]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bench.main(args)
    printed = capsys.readouterr().out
    assert re.search(r"run 0 xpnet: [0-9.]+ in [0-9.]+ s \(fast94: the training loss became nan at step", printed)
    assert re.search(r"\| 0 \| [0-9.]+% diverged \|", printed)
    run = json.loads(out.read_text())["recipe"]["runs"]["xpnet"][0]
    assert "training diverged" in run["diverged"]
    assert not [w for w in caught if "diverged" in str(w.message) or "encountered" in str(w.message)]


def test_a_cifar_npz_without_the_arrays_a_part_reads_is_refused_by_name(capsys, tmp_path):
    # An .npz made for --time-to-accuracy (X_val, y_val) handed to --recipe, which tests on X_test, y_test.
    subset = tmp_path / "val.npz"
    np.savez(subset, X_train=np.zeros((4, 32, 32, 3), np.uint8), y_train=np.zeros(4, np.int64),
             X_val=np.zeros((2, 32, 32, 3), np.uint8), y_val=np.zeros(2, np.int64))  # fmt: skip
    with pytest.raises(SystemExit) as info:
        bench.main(["--recipe", "fast94", "--cifar-npz", str(subset), "--no-torch"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{subset}: no X_test, y_test in it (--recipe reads X_train, y_train, X_test, y_test; it holds " in err
    assert "X_val, y_val" in err
    # Refused before any suite runs, not after them: the FC suite is the default one.
    with pytest.raises(SystemExit), pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "run_fc_suite", lambda *a: pytest.fail("a suite ran before the subset was checked"))
        bench.main(["--suite", "fc", "--time-to-accuracy", "--cifar-npz", str(tmp_path / "none.npz"), "--no-torch"])
    assert "none.npz: not a readable .npz file" in capsys.readouterr().err


def test_an_unwritable_json_path_or_missing_data_set_is_refused_before_any_suite_runs(capsys, tmp_path, monkeypatch):
    """--json into a missing folder failed after the first suite had run; --time-to-accuracy
    without CIFAR-10 after the FC suite had."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XPNET_DATA_DIR", raising=False)
    monkeypatch.setattr(bench, "run_fc_suite", lambda *a: pytest.fail("a suite ran before the flags were checked"))
    os.mkfifo(tmp_path / "pipe")  # as root, a report was renamed over it (or over /dev/stdout)
    for args, message in (
        (["--json", str(tmp_path / "missing" / "out.json")], "--json .*out.json: folder .*missing does not exist"),
        (["--json", str(tmp_path)], "--json .*: is a folder, not a file"),
        (["--json", str(tmp_path / "pipe")], "--json .*pipe: is not a regular file \\(a pipe or a device\\)"),
        (["--json", ""], "argument --json: an empty path \\(an unset shell variable\\?\\)"),  # wrote no report
        (["--time-to-accuracy", "--data-dir", str(tmp_path / "nowhere")], "--time-to-accuracy: CIFAR-10 not found"),
        # reached before any training (0 or less), or never (NaN), each after the data set was loaded
        (["--time-to-accuracy", "--target", "0"], "argument --target: must be > 0, got 0"),
        (["--time-to-accuracy", "--target=-0.5"], "argument --target: must be > 0, got -0.5"),
        (["--time-to-accuracy", "--target", "nan"], "argument --target: must be > 0, got nan"),
    ):
        with pytest.raises(SystemExit) as info:
            bench.main(["--suite", "fc", "--no-torch", *args])
        assert info.value.code == 2
        assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--cifar-npz", "x.npz"],
            "--cifar-npz applies to --time-to-accuracy or --recipe only, and this command runs neither",
        ),
        (["--data-dir", "data"], "--data-dir applies to --time-to-accuracy or --recipe only"),
        (["--runs", "3"], "--runs applies to --recipe only, and this command does not run it"),
        (["--target", "0.4"], "--target applies to --time-to-accuracy only"),
        (["--recipe-set", "epochs=1"], "--recipe-set applies to --profile-recipe or --recipe only"),
        (["--suite", "conv", "--rows", "64"], "--rows applies to --suite fc (or --suite all) only"),
        (["--suite", "conv", "--no-graph"], "--no-graph applies to --suite fc (or --suite all) only"),
        (["--suite", "fc", "--ops-batch", "64"], "--ops-batch applies to --suite ops (or --suite all) only"),
        (["--suite", "none", "--recipe", "fast94", "--breakdown"], "--breakdown applies to --time-to-accuracy only"),
    ],
)
def test_a_flag_that_no_part_of_the_command_reads_is_refused(capsys, monkeypatch, args, message):
    """--cifar-npz without --time-to-accuracy or --recipe ran the FC rows on random data without a word."""
    monkeypatch.setattr(bench, "run_fc_suite", lambda *a: pytest.fail("a suite ran before the flags were checked"))
    with pytest.raises(SystemExit) as info:
        bench.main(["--no-torch", *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_flags_of_the_parts_a_command_runs_are_taken():
    parser = bench.build_parser()
    for args in (
        ["--suite", "all", "--rows", "64", "--no-convnet", "--ops-batch", "64"],
        ["--suite", "none", "--profile-recipe", "--recipe-set", "epochs=1"],
        ["--suite", "none", "--time-to-accuracy", "--cifar-npz", "x.npz", "--target", "0.3", "--no-warmup"],
        ["--recipe", "fast94", "--runs", "2", "--data-dir", "d", "--recipe-sides", "xpnet", "--warmup-epochs", "1"],
    ):
        parsed = parser.parse_args(args)
        parsed.suite = parsed.suite or "none"
        assert bench.unread_flag(parser, parsed) is None, args


def _gpu_check_bench_commands() -> list:
    """The arguments of each ``scripts/bench.py`` call in benchmarks/gpu_check.sh, its shell
    expansions replaced by what a GPU run gives them (the richest RECIPE_FLAGS included)."""
    text = (Path(__file__).parent.parent / "benchmarks" / "gpu_check.sh").read_text().replace("\\\n", " ")
    expansions = {
        "${BENCH_FLAGS:-}": "--tf32",
        "${RECIPE_FLAGS---tf32}": "--tf32 --warp-plane-sums --direct-convs --conv-autotune",
        '${RECIPE_SIDES:+--recipe-sides "$RECIPE_SIDES"}': "--recipe-sides xpnet,torch",
        '"${data[@]}"': "--data-dir /tmp/cifar --target 0.5",
    }
    commands = []
    for line in text.splitlines():
        if "scripts/bench.py" not in line or line.lstrip().startswith("#"):
            continue
        args = line.split("scripts/bench.py", 1)[1].split("2>&1")[0]
        for shell, value in expansions.items():
            args = args.replace(shell, value)
        args = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", args).replace("$OUT", "out").replace("$suite", "conv")
        commands.append(shlex.split(args))
    return commands


def test_the_gpu_runs_benchmark_calls_pass_the_flag_checks():
    """A GPU run is short and rare: none of gpu_check.sh's calls may be refused for a flag."""
    commands = _gpu_check_bench_commands()
    assert len(commands) == 5 and all("--backend" in c for c in commands)
    parser = bench.build_parser()
    suites = [[suite if arg == "conv" else arg for arg in commands[0]] for suite in ("fc", "conv", "ops", "all")]
    for args in [*suites, *commands[1:]]:  # BENCH_SUITE may name any suite
        parsed = parser.parse_args(args)
        parsed.suite = parsed.suite or ("none" if parsed.recipe else "fc")
        assert bench.unread_flag(parser, parsed) is None, args


@pytest.mark.parametrize("content", ["text", "npy", "object array", "missing", "header lies"])
def test_a_cifar_npz_that_is_not_an_archive_of_plain_arrays_is_refused_without_unpickling(capsys, tmp_path, content):
    path = tmp_path / "subset.npz"
    if content == "header lies":  # X_train's .npy header declares 4 TB: np.load raised MemoryError
        import io

        from numpy.lib import format as npy_format

        header = io.BytesIO()
        npy_format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
        np.savez(path, **{k: np.zeros(2) for k in ("y_train", "X_test", "y_test")})
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr("X_train.npy", header.getvalue())
    elif content == "text":
        path.write_text("X_train,y_train\n")
    elif content == "npy":
        np.save(tmp_path / "subset.npy", np.zeros(3))
        (tmp_path / "subset.npy").rename(path)
    elif content == "object array":
        arrays = {k: np.zeros(2) for k in ("X_train", "y_train", "X_test")}
        np.savez(path, y_test=np.array([{"a": 1}, None], dtype=object), **arrays)
    with pytest.raises(SystemExit) as info:
        bench.main(["--recipe", "fast94", "--cifar-npz", str(path), "--no-torch"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    expected = {"object array": f"{path}: .*pickle", "header lies": f"{path} is corrupt: member 'X_train.npy' declares"}
    assert re.search(expected.get(content, f"{path}: not a readable .npz file"), err)
    assert "Traceback" not in err


def _benchmark_script(name):
    """benchmarks/<name>.py loaded as a module (the folder is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _done_when():
    return _benchmark_script("done_when")


def test_done_when_checks_each_gpu_target_on_the_reports(tmp_path, capsys):
    def row(case, **us):
        return {"case": case, "results": {name.replace("_", "-"): {"us": value} for name, value in us.items()}}

    conv = {
        # im2col 2.0x slower but cuDNN 1.1x: the better path counts
        "conv2d fwd+bwd, fp32": [
            [
                row("(24, 64, 31, 3, 1) batch 1024", xpnet=2000, xpnet_cudnn=1100, torch=1000),
                # the whitening conv: im2col and cuDNN over 1.5x, the direct kernels under
                row("(3, 24, 32, 2, 0) batch 1024", xpnet=700, xpnet_cudnn=1400, xpnet_direct=200, torch=300),
            ]
        ],  # fmt: skip
        "conv2d fwd+bwd, TF32": [
            [
                row("(24, 64, 31, 3, 1) batch 1024", xpnet=800, torch=400),
                row("(64, 64, 15, 3, 1) batch 1024", xpnet=900, xpnet_auto=500, torch=400),  # the autotuned path counts
            ]
        ],
        "ThreeLayerConvNet": [[row("step", xpnet_graph=120, xpnet_auto_graph=90, torch_graph=100)]],
    }
    tta = {"train_rows": 49000, "xpnet": {"seconds": 1.0}, "xpnet-graph": {"seconds": 0.7}, "torch": {"seconds": 1.5}}
    runs = {  # im2col 2.0x slower, cuDNN 1.2x: the faster path counts, its accuracy too
        "xpnet": [{"test_accuracy": 0.930, "seconds": 10.0}] * 5,
        "xpnet-cudnn": [{"test_accuracy": 0.940, "seconds": 6.0}] * 5,
        "torch": [{"test_accuracy": 0.941, "seconds": 5.0}] * 5,
        "xpnet-fp16": [{"test_accuracy": 0.939, "seconds": 3.0}] * 5,  # not a target: a line of its own
        "torch-fp16": [{"test_accuracy": 0.940, "seconds": 4.0}] * 5,
    }
    recipe = {"runs": runs, "train_images": 50000, "test_images": 10000, "settings": {"conv_autotune": True}}
    paths = []
    for name, report in (("bench", {"conv": conv}), ("tta", {"time_to_accuracy": tta}), ("fast94", {"recipe": recipe})):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps({"device": "NVIDIA H200", **report}))
    assert _done_when().main([str(p) for p in paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    verdicts = {
        line.split("  ", 1)[1].split(":")[0].strip(): line.split()[0]
        for line in lines
        if "#" in line and "info" not in line
    }
    assert verdicts == {
        "#9 fp32 (24, 64, 31, 3, 1) batch 1024 xpnet/torch": "PASS",
        "#9 fp32 (3, 24, 32, 2, 0) batch 1024 xpnet/torch": "PASS",
        "#9 TF32 (24, 64, 31, 3, 1) batch 1024 xpnet/torch": "FAIL",
        "#9 TF32 (64, 64, 15, 3, 1) batch 1024 xpnet/torch": "PASS",
        "#9 captured ThreeLayerConvNet step xpnet/torch": "PASS",
        "#12 time to accuracy xpnet/torch, eager": "PASS",
        "#12 time to accuracy xpnet-graph/torch": "PASS",
        "#11 fast94 accuracy, points below PyTorch": "PASS",
        "#11 fast94 mean seconds xpnet/torch": "PASS",
        "#9 CPU conv forward naive/fast": "unmeasured",  # a CPU target: no CPU report here
    }
    assert "NVIDIA H200" in lines[0]
    assert any("(3, 24, 32, 2, 0) batch 1024 xpnet/torch: 0.67 (bound <= 1.5) xpnet 2.33, xpnet-cudnn 4.67, "
               "xpnet-direct 0.67" in line for line in lines)  # fmt: skip
    assert any("#11 fast94 mean seconds xpnet/torch: 1.20 (bound <= 1.5) xpnet-cudnn, convolutions autotuned, 5 runs"
               in line for line in lines)  # fmt: skip
    # the gap's standard error, from runs that all agree: none
    assert any("points below PyTorch: 0.10" in line and "; ± 0.00, the standard error" in line for line in lines)
    assert (
        "info        #11 fp16 on both sides, xpnet-fp16/torch-fp16 seconds: 0.75; accuracy 93.90% against 94.00%"
        in ("\n".join(lines))
    )


def test_done_when_says_how_many_recipe_runs_diverged(tmp_path, capsys):
    ours = [{"test_accuracy": 0.94, "seconds": 6.0}] * 4 + [{"test_accuracy": 0.1, "seconds": 6.0, "diverged": "nan"}]
    runs = {"xpnet": ours, "torch": [{"test_accuracy": 0.94, "seconds": 5.0}] * 5}
    path = tmp_path / "fast94.json"
    path.write_text(json.dumps({"device": "NVIDIA H100", "recipe": {"runs": runs, "train_images": 50000,
                                                                    "test_images": 10000}}))  # fmt: skip
    _done_when().main([str(path)])
    lines = capsys.readouterr().out.splitlines()
    accuracy = next(line for line in lines if "points below PyTorch" in line)
    assert accuracy.startswith("FAIL") and "xpnet, 5 runs on 50000/10000 images; 1 of 5 xpnet runs diverged" in accuracy
    assert "torch runs diverged" not in accuracy


def test_done_when_says_what_no_report_measured(capsys):
    _done_when().main([])
    out = capsys.readouterr().out
    assert out.count("unmeasured") == 7 and "PASS" not in out and "FAIL" not in out


def test_done_when_judges_the_cpu_target_on_a_cpu_report_and_no_gpu_target(tmp_path, capsys):
    def conv_row(case, naive, fast):
        return {"case": case, "results": {"naive": {"us": naive}, "fast": {"us": fast}}}

    rows = [conv_row("conv forward", 12000, 1000), conv_row("conv backward", 20000, 4000)]
    report = {
        "backend": "numpy",
        "device": "Intel(R) Xeon(R) Processor",
        "conv": {"course shapes (CPU)": [rows]},
        "time_to_accuracy": {"train_rows": 49000, "xpnet": {"seconds": 1.0}, "torch": {"seconds": 2.0}},
    }
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(report))
    _done_when().main([str(path)])
    lines = capsys.readouterr().out.splitlines()
    assert "PASS        #9 CPU conv forward naive/fast: 12.00 (bound >= 10)" in lines
    # 0.5 would pass on a GPU; from a CPU it is shown, not judged, and the target stays open.
    assert any(line.startswith("CPU         #12 time to accuracy xpnet/torch, eager: 0.50") for line in lines)
    assert "unmeasured  #12 time to accuracy xpnet/torch, eager" in lines
    assert not any(line.startswith(("PASS", "FAIL")) and "#12" in line for line in lines)


def test_convnet_step_on_the_cpu_has_a_pytorch_row_when_pytorch_is_installed(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    assert bench.main(["--suite", "conv", "--repeats", "1", "--budget", "0.01", "--json", str(out)]) == 0
    step_row = json.loads(out.read_text())["conv"]["ThreeLayerConvNet"][0][0]
    assert step_row["results"]["torch"]["us"] > 0 and step_row["results"]["xpnet"]["us"] > 0
    assert "torch-graph" not in step_row["results"]  # graphs are for GPUs


def test_kernel_rows_sum_each_name_per_step_the_longest_first():
    from xpnet.cli.bench_profile import kernel_rows

    rows = kernel_rows([("gemm", 10.0), ("copy", 3.0), ("gemm", 20.0), ("relu", 1.0), ("copy", 3.0)], steps=2)
    assert [r["name"] for r in rows] == ["gemm", "copy", "relu"]
    assert rows[0] == {"name": "gemm", "calls": 1.0, "us": 15.0} and rows[1]["us"] == 3.0 and rows[2]["calls"] == 0.5


def test_profile_recipe_records_each_sides_operators_per_step(tmp_path, capsys):
    """On the CPU the profiler sees PyTorch's operators: xpnet on the torch backend shows its
    GEMMs (its convolutions are im2col + GEMM), PyTorch its convolutions."""
    pytest.importorskip("torch")
    out = tmp_path / "profile.json"
    args = ["--backend", "torch", "--suite", "none", "--profile-recipe", "--profile-steps", "2",
            "--recipe-set", "widths=4,8,8", "--recipe-set", "batch_size=16", "--json", str(out)]  # fmt: skip
    assert bench.main(args) == 0
    report = json.loads(out.read_text())["profile"]
    assert report["steps"] == 2 and report["batch_size"] == 16 and report["widths"] == [4, 8, 8]
    ours, theirs = ({r["name"]: r for r in report[side]["kernels"]} for side in ("xpnet", "torch"))
    assert ours["aten::mm"]["calls"] >= 7 and "aten::convolution_backward" not in ours  # 7 convolutions a step
    assert theirs["aten::convolution_backward"]["calls"] == 7  # the whitening bias still trains: 7 a step
    for side in ("xpnet", "torch"):
        assert report[side]["us_per_step"] == pytest.approx(sum(r["us"] for r in report[side]["kernels"]))
        assert report[side]["wall_ms_per_step"] > 0
    printed = capsys.readouterr().out
    assert "| xpnet: kernel | calls | µs | share |" in printed and "| aten::mm |" in printed


def test_profile_steps_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--suite", "none", "--profile-recipe", "--profile-steps", "0"])
    assert "argument --profile-steps: must be a positive integer, got 0" in capsys.readouterr().err


def test_a_variant_that_fails_is_printed_with_its_error_and_the_others_still_timed(capsys):
    from xpnet.cli.bench import time_variants
    from xpnet.cli.bench_conv import measure_row

    def broken():
        raise KeyError("us")

    variants = {"good": (lambda: None, lambda: None), "bad": (broken, lambda: None)}
    row = measure_row("a row", variants, time_variants, 1, 0.001, None)
    assert row["results"]["bad"] == {"error": "KeyError: 'us'"} and row["results"]["good"]["us"] >= 0
    assert "bad failed: KeyError: 'us'" in capsys.readouterr().out


def test_each_variant_reports_the_range_of_its_repeats_beside_their_median(capsys):
    """On a noisy machine a median alone hides how far the repeats moved: the report keeps the
    fastest and the slowest repeat, and the progress line prints them."""
    from xpnet.cli.bench import time_variants
    from xpnet.cli.bench_conv import measure_row

    calls = itertools.count(1)  # each step a millisecond slower than the one before: every repeat slower
    row = measure_row("a row", {"v": (lambda: time.sleep(1e-3 * next(calls)), lambda: None)}, time_variants, 3, 0, None)
    fastest, slowest = row["results"]["v"]["us_range"]
    assert fastest < row["results"]["v"]["us"] < slowest
    assert f"v {row['results']['v']['us']:.0f} µs ({fastest:.0f}–{slowest:.0f})" in capsys.readouterr().out


def test_a_side_whose_profile_fails_is_reported_and_the_other_still_profiled(monkeypatch, capsys):
    pytest.importorskip("torch")
    import xpnet
    from xpnet.cli import bench_profile

    real_sides = bench_profile._sides

    def sides(*args):
        found = real_sides(*args)

        def broken():
            raise RuntimeError("no CUPTI")

        return {"xpnet": broken, "torch": found["torch"]}

    monkeypatch.setattr(bench_profile, "_sides", sides)
    report = bench_profile.profile_recipe(xpnet.get_backend("numpy"), [("widths", (4, 8, 8)), ("batch_size", 8)], 1,
                                          tf32=False)  # fmt: skip
    assert report["xpnet"] == {"error": "RuntimeError: no CUPTI"} and report["torch"]["kernels"]
    text = bench_profile.format_profile(report)
    assert "xpnet: failed: RuntimeError: no CUPTI" in text and "| torch: kernel |" in text


GPU_LOG_PASSED = "........................................................ [100%]\n77 passed in 64.21s\n"
GPU_LOG_FAILED = (
    "...F....\n=========================== short test summary info ============================\n"
    "FAILED tests/test_gpu.py::test_direct_small_filter_convs_match_numpy_within_their_rounding[True-x_shape0-float32]"
    " - AssertionError\n"
    "FAILED tests/test_gpu.py::test_plane_sums_add_each_plane_across_a_warp[float32] - AssertionError\n"
    "2 failed, 75 passed in 61.02s\n"
)


def _ops_json(folder, **net_us):
    results = {name.replace("_", " "): {"us": us} for name, us in net_us.items()}
    (folder / "bench_ops_gpu.json").write_text(json.dumps({"ops": {"net": {"results": results}}}))


@pytest.mark.parametrize(
    "log, net, flags, said",
    [
        # the tests passed and the ops suite favours both switches
        (GPU_LOG_PASSED, dict(xpnet=100, xpnet_warp_sums=90, xpnet_autotuned_convs=80),
         "--tf32 --conv-autotune --warp-plane-sums", "--warp-plane-sums: its tests passed; the whole network 90 µs"),
        # the warp sums slower: left out; autotuning within 5% of im2col alone: kept
        (GPU_LOG_PASSED, dict(xpnet=100, xpnet_warp_sums=110, xpnet_autotuned_convs=104),
         "--tf32 --conv-autotune", "--warp-plane-sums left out: the whole network took 110 µs with it, 100 without"),
        # no ops suite: autotuning on its tests alone (it picks by timing), the warp sums not
        (GPU_LOG_PASSED, None, "--tf32 --conv-autotune", "--warp-plane-sums left out: its tests passed (the ops"),
        # the direct kernels' and the plane sums' tests failed: neither switch, whatever the timings
        (GPU_LOG_FAILED, dict(xpnet=100, xpnet_warp_sums=50, xpnet_autotuned_convs=50), "--tf32",
         "--conv-autotune left out: test_direct_small_filter_convs_match_numpy_within_their_rounding failed"),
        # the whole training on the card did not follow NumPy's: no autotuning on top of it
        (GPU_LOG_PASSED.replace("77 passed", "FAILED tests/test_gpu.py::test_the_fast_recipe_on_cupy_trains_as_on_"
                                "numpy_given_the_same_draws[autotune] - AssertionError\n1 failed, 76 passed"),
         dict(xpnet=100, xpnet_warp_sums=90, xpnet_autotuned_convs=80), "--tf32 --warp-plane-sums",
         "--conv-autotune left out: test_the_fast_recipe_on_cupy_trains_as_on_numpy_given_the_same_draws failed"),
        # a run cut off before its summary: nothing is trusted
        ("....F...", None, "--tf32", "no finished run of the GPU tests"),
    ],
)  # fmt: skip
def test_recipe_flags_follow_the_first_calls_tests_and_timings(tmp_path, capsys, log, net, flags, said):
    (tmp_path / "test_gpu.log").write_text(log)
    if net is not None:
        _ops_json(tmp_path, **net)
    assert _benchmark_script("recipe_flags").main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == flags
    assert said in err


def test_recipe_flags_without_test_results_trust_no_switch(tmp_path, capsys):
    _ops_json(tmp_path, xpnet=100, xpnet_warp_sums=50, xpnet_autotuned_convs=50)
    assert _benchmark_script("recipe_flags").main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "--tf32"


def test_the_carried_pieces_unpack_to_the_files_they_were_staged_from(tmp_path):
    """stage_gpu_run.sh compresses each batch file with xz's delta filter and LZMA2 (several
    blocks with -T2); unpack_carry.py restores them with the standard library, byte for byte."""
    import lzma
    import shutil
    import subprocess

    rng = np.random.default_rng(0)
    image_rows = np.cumsum(rng.integers(-3, 4, 300_000), dtype=np.int64).astype(np.uint8).tobytes()  # smooth
    carry = tmp_path / "carry"
    (carry / "cifar1").mkdir(parents=True)
    (carry / "cifar2").mkdir()
    filters = [{"id": lzma.FILTER_DELTA, "dist": 1}, {"id": lzma.FILTER_LZMA2, "preset": 6}]
    (carry / "cifar1" / "data_batch_1.xz").write_bytes(lzma.compress(image_rows, lzma.FORMAT_XZ, filters=filters))
    (carry / "cifar2" / "batches.meta").write_bytes(b"meta")
    expected = {"data_batch_1": image_rows, "batches.meta": b"meta"}
    if shutil.which("xz"):  # the command the staging script runs, as it runs it
        packed = subprocess.run(["xz", "--delta=dist=1", "--lzma2=preset=6", "-T2", "--block-size=100000", "-c"],
                                input=image_rows[::-1], capture_output=True, check=True).stdout  # fmt: skip
        (carry / "cifar2" / "test_batch.xz").write_bytes(packed)
        expected["test_batch"] = image_rows[::-1]
    dest = tmp_path / "cifar"
    assert _benchmark_script("unpack_carry").main([str(carry), str(dest)]) == 0
    assert {path.name: path.read_bytes() for path in dest.iterdir()} == expected
    assert len((carry / "cifar1" / "data_batch_1.xz").read_bytes()) < len(image_rows) / 2  # the delta filter pays
