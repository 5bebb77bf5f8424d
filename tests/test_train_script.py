"""scripts/train.py end to end on the bundled digits, and its argument errors."""

import importlib.util
import json
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers import deny_writing, write_fake_cifar

import xpnet

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_default_run_trains_digits_above_90_percent(train, capsys):
    assert train([]) == 0
    out = capsys.readouterr().out
    assert "backend: numpy (" in out
    assert "(Epoch 20 / 20)" in out
    test_acc = float(out.split("test acc: ")[1].split()[0])
    assert test_acc > 0.90
    assert "wall time:" in out


def test_log_plot_checkpoint_and_resume(train, tmp_path, capsys):
    log, plot, ckpt = tmp_path / "m.jsonl", tmp_path / "curves.png", tmp_path / "ckpt"
    args = [
        "--epochs",
        "2",
        "--quiet",
        "--normalization",
        "layernorm",
        "--dropout",
        "0.1",
        "--print-every",
        "5",
        "--log",
        str(log),
        "--plot",
        str(plot),
        "--checkpoint-dir",
        str(ckpt),
    ]
    assert train(args) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == [1, 6, 11, 16, 21]  # 2 epochs of 12
    assert sum("val_acc" in r for r in records) == 3
    assert "test_acc" in records[-1] and records[-1]["wall_s"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in ckpt.iterdir()) == ["digits_fc_epoch_1.npz", "digits_fc_epoch_2.npz"]
    capsys.readouterr()
    resume = [
        "--epochs",
        "3",
        "--quiet",
        "--normalization",
        "layernorm",
        "--dropout",
        "0.1",
        "--resume",
        str(ckpt / "digits_fc_epoch_2.npz"),
    ]
    assert train(resume) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out
    # the wall time is this process's: the one epoch trained since the checkpoint, not all three
    assert "s for 1 epoch (12 iterations) after resuming at epoch 2" in out
    # Resumed at --epochs already: said in the command's terms, once, and the test accuracy still given.
    resume[1] = "2"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # not the Solver's warning as well
        assert train(resume) == 0
    out = capsys.readouterr().out
    assert "nothing to train: the checkpoint has run 2 epochs of --epochs 2" in out and "test acc:" in out
    assert "s for 0 epochs (0 iterations) after resuming at epoch 2" in out


def test_a_resumed_runs_log_reads_as_the_log_of_one_uninterrupted_run(train, tmp_path, capsys):
    """--log was opened with "w" before anything else: resuming with it lost every record
    before the checkpoint. The records logged after the checkpoint by the interrupted run
    (here, its last epoch) and its closing line give way to the resumed run's."""
    common = ["--epochs", "3", "--quiet", "--print-every", "5", "--seed", "4"]

    def without_times(path):
        return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in path.read_text().splitlines()]

    whole = tmp_path / "whole.jsonl"
    assert train([*common, "--log", str(whole)]) == 0
    log, ckpt = tmp_path / "m.jsonl", tmp_path / "ck"
    assert train([*common, "--log", str(log), "--checkpoint-dir", str(ckpt)]) == 0
    with log.open("a") as f:
        f.write('{"iteration": 36, "epo')  # a line cut short by a crash
    assert train([*common, "--log", str(log), "--resume", str(ckpt / "digits_fc_epoch_1.npz")]) == 0
    assert without_times(log) == without_times(whole)
    assert [line.count("wall_s") for line in log.read_text().splitlines()][-2:] == [0, 1]
    capsys.readouterr()


def test_a_resumed_runs_log_into_a_pipe_is_written_not_read():
    """Only a regular file holds records to keep: --log /dev/stdout after --resume read the pipe
    to find them, and waited there for ever."""
    import subprocess
    import sys

    program = (
        "import os; from xpnet.cli.metrics_log import MetricsLog; read, write = os.pipe(); "
        "log = MetricsLog(f'/dev/fd/{write}'); log.continue_after(5); log.write({'iteration': 6}); log.close(); "
        "os.close(write); print(os.read(read, 100).decode(), end='')"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout == '{"iteration": 6}\n'


def test_a_log_goes_to_a_pipe_in_a_folder_the_user_cannot_write(train, tmp_path, monkeypatch, capsys):
    """--log /dev/stdout was refused for every user but root, who alone may write /dev: a log is
    written as a stream, so a pipe or terminal that may be written is enough."""
    import contextlib
    import threading

    pipe = tmp_path / "stdout"
    os.mkfifo(pipe)
    deny_writing(monkeypatch, tmp_path)  # the folder as a user other than root finds /dev
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(pipe.read_text().splitlines()))
    reader.start()
    try:
        code = train(["--epochs", "1", "--quiet", "--log", str(pipe)])
    finally:
        with contextlib.suppress(OSError):  # a reader still waiting for a writer gets an empty pipe
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(timeout=60)
    assert code == 0, capsys.readouterr().err
    monkeypatch.undo()
    assert train(["--epochs", "1", "--quiet", "--log", str(tmp_path / "file.jsonl")]) == 0
    as_file = (tmp_path / "file.jsonl").read_text().splitlines()
    assert len(lines) == len(as_file) > 1 and lines[:-1] == as_file[:-1] and "test_acc" in json.loads(lines[-1])


def test_a_command_that_fails_before_training_leaves_the_old_log(train, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no CIFAR-10 anywhere it is looked for
    monkeypatch.delenv("XPNET_DATA_DIR", raising=False)
    log = tmp_path / "m.jsonl"
    log.write_text('{"iteration": 1, "epoch": 0, "loss": 2.3}\n')
    with pytest.raises(SystemExit):  # the data set is looked for after the log was opened
        train(["--epochs", "1", "--log", str(log), "--dataset", "cifar10", "--data-dir", str(tmp_path / "no")])
    assert "CIFAR-10 not found" in capsys.readouterr().err
    assert log.read_text() == '{"iteration": 1, "epoch": 0, "loss": 2.3}\n'


def test_paths_after_an_equals_sign_expand_a_tilde(train, tmp_path, monkeypatch, capsys):
    """A shell expands ~ only at the start of a word: --log=~/m.jsonl made a folder named "~"."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert train(["--epochs", "1", "--quiet", "--log=~/m.jsonl", "--checkpoint-dir=~/ck"]) == 0
    assert (home / "m.jsonl").is_file() and (home / "ck" / "digits_fc_epoch_1.npz").is_file()
    assert train(["--epochs", "2", "--quiet", "--resume=~/ck/digits_fc_epoch_1.npz"]) == 0
    assert f"resumed from {home / 'ck' / 'digits_fc_epoch_1.npz'} at epoch 1" in capsys.readouterr().out
    assert os.listdir(work) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "tensorflow"], "unknown backend 'tensorflow'"),
        (["--dropout", "1.5"], "probability of dropping a unit"),
        (["--lr", "-1"], "must be > 0"),
        (["--seed", "-1"], "argument --seed: must be a non-negative integer, got -1"),  # NumPy's words before
        (["--hidden-dims", "0"], "positive integer"),
        (["--model", "resnet"], "invalid choice"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "CIFAR-10 not found"),
        (["--resume", "/nonexistent.pkl", "--epochs", "1"], "does not exist"),
        (["--resume", "/dev/null"], "checkpoint '/dev/null' is not a regular file"),  # was: does not exist
        (["--model", "twolayer", "--hidden-dims", "10", "10"], "one hidden size"),
        (["--cuda-graph"], "needs the cupy backend"),
        # refused before the data set is looked for, not after minutes of loading it
        (["--dataset", "cifar10", "--data-dir", "/nonexistent", "--cuda-graph"], "--cuda-graph needs the cupy backend"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent", "--resume", "/nonexistent.npz"], "does not exist"),
        (["--model", "cnn", "--dropout", "0.2"], "--dropout does not apply to --model cnn"),
        (["--model", "cnn", "--normalization", "layernorm"], "--model cnn normalises with batchnorm only"),
        (["--model", "twolayer", "--normalization", "batchnorm"], "--model twolayer takes no --normalization"),
        (["--model", "fc", "--num-filters", "8"], "--num-filters does not apply to --model fc"),
        (["--model", "cnn", "--hidden-dims", "10", "10"], "--model cnn takes one hidden size"),
        (["--model", "cnn", "--filter-size", "4"], "argument --filter-size: must be odd so the convolution keeps"),
        (["--tf32"], "TF32 applies to CUDA GPUs"),
        (["--cudnn"], "cuDNN applies to CUDA GPUs; backend 'numpy'"),
        (["--conv-autotune"], "convolution autotuning applies to CUDA GPUs; backend 'numpy'"),
        (["--recipe", "fast94"], "trains on CIFAR-10: add --dataset cifar10"),
        (
            ["--recipe", "fast94", "--dataset", "cifar10", "--lr", "1"],
            "--lr does not apply to --recipe fast94: its network and hyper-parameters are its own settings "
            "(--recipe-set KEY=VALUE changes one)",
        ),
        (
            ["--recipe", "fast94", "--dataset", "cifar10", "--lr", "1", "--reg", "0.1"],
            "--lr, --reg do not apply to --recipe fast94",
        ),
        (["--recipe", "fast94", "--dataset", "cifar10", "--data-dir", "/nonexistent"], "CIFAR-10 not found"),
        (["--recipe", "fast94", "--dataset", "cifar10", "--tf32"], "TF32 applies to CUDA GPUs"),
        (["--recipe", "fast94", "--dataset", "cifar10", "--cudnn"], "cuDNN applies to CUDA GPUs"),
        (["--recipe", "fast94", "--dataset", "cifar10", "--conv-autotune"], "convolution autotuning applies to CUDA"),
        (["--recipe", "fast94", "--dataset", "cifar10", "--cuda-graph"], "--cuda-graph needs the cupy backend"),
        (["--fp16"], "--fp16 applies to --recipe fast94 only"),
        (["--num-test", "5"], "--num-test applies to --dataset cifar10 only, not to digits"),
        (["--dataset", "cifar10", "--num-test", "10001"], "--num-test 10001: CIFAR-10 has 10000 test images"),
        (
            ["--dataset", "cifar10", "--num-train", "49001"],
            "--num-train 49001: CIFAR-10 has 49000 training images beside the 1000 that validate",
        ),
        (["--recipe", "fast94", "--dataset", "cifar10", "--num-train", "50001"], "CIFAR-10 has 50000 training images"),
        (
            ["--recipe", "fast94", "--dataset", "cifar10", "--fp16", "--backend", "array_api_strict"],
            "--fp16: backend 'array_api_strict' has no float16 type",
        ),
    ],
)
def test_bad_arguments_give_clean_errors(train, capsys, monkeypatch, tmp_path, args, message):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XPNET_DATA_DIR", raising=False)
    with pytest.raises(SystemExit) as info:
        train(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_a_resume_file_that_cannot_be_read_is_refused_before_the_data_is_looked_for(train, capsys, tmp_path):
    """A pickle without --trust-pickle, or a file that is no checkpoint, was refused only after the
    data set had been loaded (minutes for CIFAR-10)."""
    old_format, not_one = tmp_path / "old.pkl", tmp_path / "notes.npz"
    old_format.write_bytes(pickle.dumps({"format": "xpnet"}))
    not_one.write_text("not a checkpoint")
    for path, message in ((old_format, "in the old pickle format"), (not_one, "not an .npz file")):
        with pytest.raises(SystemExit) as info:
            train(["--dataset", "cifar10", "--data-dir", "/nonexistent", "--resume", str(path)])
        assert info.value.code == 2
        assert message in capsys.readouterr().err


def test_visualize_grid_tiles_images():
    from xpnet.vis_utils import visualize_grid

    images = np.arange(5 * 2 * 3 * 1, dtype=float).reshape(5, 2, 3, 1)
    grid = visualize_grid(images, ubound=1.0, padding=1)
    assert grid.shape == (3 * 3 - 1, 3 * 4 - 1, 1)
    np.testing.assert_allclose(grid[0:2, 0:3, 0], (images[0, :, :, 0] - images[0].min()) / 5.0)
    assert (grid[2, :, :] == 0).all()  # padding row
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        visualize_grid(np.zeros((2, 3)))
    with pytest.raises(
        ValueError, match=r"no images to tile, got shape \(0, 2, 3, 1\)"
    ):  # was NumPy's "negative dimensions"
        visualize_grid(images[:0])
    with pytest.raises(ValueError, match="padding must be a non-negative integer, got -1"):
        visualize_grid(images, padding=-1)
    # weights after a divergence: NaN tiles came out blank, inf ones as inf / inf under a warning
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="visualize_grid: the images hold NaN or infinite values"):
            visualize_grid(np.where(images == 3.0, bad, images))
    for ubound in (0, float("nan"), "255"):
        with pytest.raises(ValueError, match="visualize_grid: ubound must be a finite number > 0"):
            visualize_grid(images, ubound=ubound)
    # conv weights (F, C, HH, WW) not yet transposed: tiled as 16-channel images of height 3 before
    weights = np.zeros((4, 3, 16, 16))
    with pytest.raises(ValueError, match=r"got shape \(4, 3, 16, 16\); these look like images with their channels "
                                         r"first: Xs.transpose\(0, 2, 3, 1\) puts them last"):  # fmt: skip
        visualize_grid(weights)
    with pytest.raises(ValueError, match=r"images of 1, 3 or 4 channels \(N, H, W, C\), got shape \(2, 5, 5, 8\)$"):
        visualize_grid(np.zeros((2, 5, 5, 8)))

    assert visualize_grid(np.ones((2, 5, 5, 4))).shape == (2 * 6 - 1, 2 * 6 - 1, 4)  # RGBA
    # a model's weights on a device that NumPy cannot read directly, and nested lists
    on_device = xpnet.get_backend("array_api_strict:device1").asarray(images)
    np.testing.assert_array_equal(visualize_grid(on_device, ubound=1.0), grid)
    np.testing.assert_array_equal(visualize_grid(images.tolist(), ubound=1.0), grid)


def _course_tiles(tiles, rows, columns, background):
    """The course's vis_grid / vis_nn loop, written out: tile (i, j) at (i·(H+1), j·(W+1)), then
    the whole grid scaled to [0, 1]."""
    H, W, C = tiles[0].shape
    grid = np.full((rows * H + rows, columns * W + columns, C), background)
    for n, tile in enumerate(tiles):
        y, x = divmod(n, columns)
        grid[y * H + y : (y + 1) * H + y, x * W + x : (x + 1) * W + x, :] = tile
    return (grid - grid.min()) / (grid.max() - grid.min())


def test_vis_grid_and_vis_nn_tile_as_the_course_does():
    from xpnet.vis_utils import vis_grid, vis_nn

    rng = np.random.default_rng(0)
    images = rng.uniform(3.0, 9.0, size=(5, 4, 3, 3))
    grid = vis_grid(images)
    assert grid.shape == (3 * 5, 3 * 4, 3)  # ceil(sqrt(5)) = 3 tiles a side, one pixel after each
    np.testing.assert_array_equal(grid, _course_tiles(images, 3, 3, images.min()))
    pixels = (images * 20).astype(np.uint8)
    np.testing.assert_array_equal(vis_grid(pixels), _course_tiles(pixels, 3, 3, pixels.min()))

    table = [[images[0], images[1], images[2]], [images[3], images[4], images[0]]]
    np.testing.assert_array_equal(vis_nn(table), _course_tiles([*table[0], *table[1]], 2, 3, 1.0))
    np.testing.assert_array_equal(vis_nn([[images[0].tolist()]]), _course_tiles([images[0]], 1, 1, 1.0))
    on_device = xpnet.get_backend("array_api_strict:device1").asarray(images)  # NumPy cannot read it directly
    np.testing.assert_array_equal(vis_grid(on_device), grid)
    device_table = [[on_device[i, ...] for i in (0, 1, 2)], [on_device[i, ...] for i in (3, 4, 0)]]
    np.testing.assert_array_equal(vis_nn(device_table), vis_nn(table))
    np.testing.assert_array_equal(vis_grid(np.full((2, 3, 3, 1), 4.0)), np.zeros((8, 8, 1)))  # was 0 / 0

    with pytest.raises(ValueError, match="vis_grid: the images hold NaN or infinite values"):
        vis_grid(np.where(images == images.max(), np.nan, images))
    with pytest.raises(ValueError, match=r"vis_grid tiles images of 1, 3 or 4 channels .*channels first"):
        vis_grid(np.zeros((4, 3, 16, 16)))
    with pytest.raises(ValueError, match=r"vis_nn: every row must hold as many images; got rows of \[1, 2\]"):
        vis_nn([[images[0]], [images[1], images[2]]])
    with pytest.raises(ValueError, match=r"vis_nn: the images must be \(H, W, C\) arrays of one shape, got shapes"):
        vis_nn([[images[0], images[1][:2]]])
    with pytest.raises(ValueError, match="vis_nn expects a list of rows"):
        vis_nn(images)


def test_plot_history_draws_on_a_figure_without_switching_the_global_backend(tmp_path):
    import matplotlib
    from matplotlib.figure import Figure

    from xpnet.vis_utils import plot_history

    before = matplotlib.get_backend()
    history = {"loss_history": [2.3, 1.5, 0.9], "train_acc_history": [0.1, 0.6], "val_acc_history": [0.1, 0.5]}
    fig = plot_history(history, tmp_path / "c.png", title="t")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert list(fig.axes[1].lines[1].get_ydata()) == [0.1, 0.5]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert matplotlib.get_backend() == before
    # errors from inside matplotlib or PIL before ("x, y, and format string must not be None")
    with pytest.raises(ValueError, match=r"^plot_history: history needs loss_history, train_acc_history and "
                                         r"val_acc_history .*; dict has no train_acc_history, val_acc_history$"):  # fmt: skip
        plot_history({"loss_history": [2.3, 1.5]})
    with pytest.raises(ValueError, match=r"plot_history: history needs .*; list has no loss_history"):
        plot_history([2.3, 1.5])
    with pytest.raises(FileNotFoundError, match=f"^plot_history: folder {tmp_path / 'no'} does not exist"):
        plot_history(history, tmp_path / "no" / "c.png")
    with pytest.raises(TypeError, match=r"^plot_history: path must be a file path \(str or Path\), got int$"):
        plot_history(history, 3)  # failed inside os.fspath, which names neither the function nor the argument
    # a folder: savefig wrote <folder>.png beside it
    with pytest.raises(ValueError, match=f"^plot_history: {tmp_path} is a folder; name a file in it, such as "):
        plot_history(history, tmp_path)
    assert not tmp_path.with_name(tmp_path.name + ".png").exists()
    with pytest.raises(ValueError, match=r"^plot_history: matplotlib cannot save a figure as \.xyz; end the file"):
        plot_history(history, tmp_path / "c.xyz")  # matplotlib's own "Format 'xyz' is not supported"


def test_cnn_trains_on_digit_images_and_resumes(train, tmp_path, capsys):
    ckpt = tmp_path / "ck"
    args = ["--model", "cnn", "--epochs", "4", "--num-filters", "8", "--filter-size", "3", "--quiet"]
    assert train([*args, "--checkpoint-dir", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "model: cnn [100]" in out
    assert float(out.split("test acc: ")[1].split()[0]) > 0.8
    assert train([*args[:2], "--epochs", "5", *args[4:], "--resume", str(ckpt / "digits_cnn_epoch_4.npz")]) == 0
    assert "for 1 epoch (12 iterations) after resuming at epoch 4" in capsys.readouterr().out


def test_cnn_with_batchnorm_trains_on_digit_images_and_its_checkpoint_keeps_the_running_averages(
    train, tmp_path, capsys
):
    ckpt = tmp_path / "ck"
    args = ["--model", "cnn", "--normalization", "batchnorm", "--epochs", "3", "--num-filters", "8", "--filter-size",
            "3", "--quiet"]  # fmt: skip
    assert train([*args, "--checkpoint-dir", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "model: cnn [100], batchnorm" in out
    assert float(out.split("test acc: ")[1].split()[0]) > 0.8
    from xpnet.checkpoint import load_checkpoint

    state = load_checkpoint(ckpt / "digits_cnn_epoch_3.npz")["model"]
    assert {"gamma1", "beta1", "gamma2", "beta2"} <= set(state["params"])
    assert [sorted(layer) for layer in state["buffers"]] == [["mode", "running_mean", "running_var"]] * 2
    without = [a for a in args if a not in ("--normalization", "batchnorm")]
    with pytest.raises(SystemExit) as info:  # a net without batchnorm cannot take these parameters
        train([*without, "--resume", str(ckpt / "digits_cnn_epoch_3.npz")])
    assert info.value.code == 2 and "gamma1" in capsys.readouterr().err


def test_the_fast94_recipe_runs_from_the_command_line(train, tmp_path, capsys, monkeypatch):
    """The recipe's command on a small stand-in for CIFAR-10 (64 training images, 20 test images)."""
    write_fake_cifar(tmp_path / "cifar", per_batch=20)
    log = tmp_path / "recipe.jsonl"
    args = ["--dataset", "cifar10", "--recipe", "fast94", "--data-dir", str(tmp_path / "cifar"), "--num-train", "64",
            "--batch-size", "32", "--epochs", "1", "--log", str(log)]  # fmt: skip
    assert train([*args, "--checkpoint-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert f"model: {tmp_path / 'runs' / 'fast94.npz'}" in out
    from xpnet.recipes import load_fast94_model

    assert load_fast94_model(tmp_path / "runs" / "fast94.npz").widths == (64, 256, 256)
    assert "data: cifar10, 64 train / 20 test" in out
    assert "fast94: test accuracy" in out and "(2 steps, 1.00 epochs)" in out
    # on a CPU it says where it is: the published settings take hours there
    assert "fast94: epoch 1 of 1, " in out and "fast94: evaluating 20 test images (TTA level 2), " in out
    record = json.loads(log.read_text())
    assert record["recipe"] == "fast94" and record["steps"] == 2 and 0 <= record["test_accuracy"] <= 1
    assert record["seconds"] == pytest.approx(
        record["whiten_seconds"] + record["train_seconds"] + record["eval_seconds"]
    )
    assert record["activations"] == "float32"

    import xpnet.cli.recipe as recipe_cli

    settings_seen = []

    def spy(data, **kwargs):
        settings_seen.append(kwargs)
        return fast94(data, **kwargs)

    fast94 = recipe_cli.fast94
    monkeypatch.setattr(recipe_cli, "fast94", spy)
    assert train([*args, "--fp16"]) == 0
    assert settings_seen[0]["activation_dtype"] == "float16"
    half = json.loads(log.read_text())
    assert half["activations"] == "float16" and half["steps"] == 2
    assert train([*args, "--recipe-set", "widths=4,8,8", "--recipe-set", "tta_level=1"]) == 0
    assert settings_seen[1]["widths"] == (4, 8, 8) and settings_seen[1]["tta_level"] == 1
    assert train([*args, "--num-test", "7"]) == 0
    assert "data: cifar10, 64 train / 7 test" in capsys.readouterr().out
    correct = json.loads(log.read_text())["test_accuracy"] * 7  # scored on 7 images: a whole number right
    assert correct == pytest.approx(round(correct), abs=1e-9)


def test_ctrl_c_in_the_recipe_says_where_it_was(train, tmp_path, capsys, monkeypatch):
    import xpnet.cli.recipe as recipe_cli

    def interrupted(data, progress=None, **settings):
        progress("fast94: epoch 2 of 10, 5 s; training loss 2.100 per image in the epoch before")
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe_cli, "fast94", interrupted)
    write_fake_cifar(tmp_path / "cifar", per_batch=20)
    assert train(["--dataset", "cifar10", "--recipe", "fast94", "--data-dir", str(tmp_path / "cifar")]) == 130
    captured = capsys.readouterr()
    assert "fast94: epoch 2 of 10, 5 s" in captured.out
    assert "interrupted in the recipe after 'fast94: epoch 2 of 10, 5 s; training loss" in captured.err
    assert "before training started" not in captured.err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-train", "200"], "--num-train 200 exceeds the 100 training images of CIFAR-10"),
        (["--num-test", "21"], "--num-test 21 exceeds the 20 test images of CIFAR-10"),
    ],
)
def test_the_recipe_refuses_more_rows_than_the_data_set_has(train, tmp_path, capsys, extra, message):
    write_fake_cifar(tmp_path / "cifar", per_batch=20)
    with pytest.raises(SystemExit) as info:
        train(["--dataset", "cifar10", "--recipe", "fast94", "--data-dir", str(tmp_path / "cifar"), *extra])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--recipe-set", "epochs=2"], "--recipe-set: epochs (use --epochs) has a flag of its own"),
        (["--recipe-set", "conv_autotune=true"], "conv_autotune (use --conv-autotune) has a flag of its own"),
        (
            ["--recipe-set", "epochs=2", "--recipe-set", "batch_size=64"],
            "epochs (use --epochs), batch_size (use --batch-size) have flags of their own",
        ),
        (["--recipe-set", "lr=1"], "fast94: unknown settings lr"),
        (["--recipe-set", "widths=8,16"], "fast94: widths must be three positive integers, got (8, 16)"),
        (["--recipe-set", "widths"], "--recipe-set takes KEY=VALUE, got 'widths'"),
    ],
)
def test_recipe_settings_from_the_command_line_are_checked_before_the_data_is_read(train, capsys, extra, message):
    # No CIFAR-10 where --data-dir points: a setting's error must come first.
    with pytest.raises(SystemExit) as info:
        train(["--dataset", "cifar10", "--recipe", "fast94", "--data-dir", "/nonexistent", *extra])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_recipe_set_without_a_recipe_is_refused(train, capsys):
    with pytest.raises(SystemExit) as info:
        train(["--recipe-set", "widths=8,16,16"])
    assert info.value.code == 2
    assert "--recipe-set applies to --recipe only" in capsys.readouterr().err


def test_conv_autotune_reports_the_paths_it_kept(train, capsys, monkeypatch):
    """--conv-autotune on a backend whose convolutions have paths to choose (CuPy's kernels,
    here run on the CPU by tests/cpu_kernels.py): after training it prints each timed
    convolution and the path it kept; the 3×3 filters of one channel (9 taps) may take the
    direct kernels or im2col."""
    import cpu_kernels
    import numpy as np

    from xpnet.backend import dispatch
    from xpnet.backend.numpy_backend import NumpyBackend

    if cpu_kernels.COMPILER is None:
        pytest.skip("no C++ compiler to run the kernels on the CPU")
    kernels = cpu_kernels.cupy_kernels_on_cpu()
    monkeypatch.setitem(dispatch._ACCELERATORS, np.ndarray, kernels)
    monkeypatch.setattr(NumpyBackend, "set_conv_autotune", lambda self, on: setattr(kernels.conv_paths, "autotune", on))
    args = ["--model", "cnn", "--epochs", "1", "--num-filters", "8", "--filter-size", "3", "--quiet", "--conv-autotune"]
    assert train(args) == 0
    out = capsys.readouterr().out
    assert "| autotuned convolution (x → w, stride, pad) |" in out
    rows = [line for line in out.splitlines() if "→ (8, 1, 3, 3), 1, 1 |" in line]
    assert rows and all("direct " in row and "im2col " in row for row in rows)
