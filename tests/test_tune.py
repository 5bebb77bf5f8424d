"""Hyperparameter sweeps: the search-space grammar and its errors, sweeps in this
process and on a 2-worker Dask cluster, and a sweep killed with SIGKILL that
completes when the same command runs again."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import deny_writing, write_fake_cifar

from xpnet.checkpoint import load_checkpoint, save_checkpoint
from xpnet.experiment import Experiment
from xpnet.tune.report import OUTPUT_FILES
from xpnet.tune.space import SpaceError, load_space_file, parse_space

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "scripts" / "sweep.py"
SPACE = ["--space", "lr=loguniform(1e-3,1e-2)", "--space", "hidden_dims=choice(20,50)", "--space", "epochs=3"]


# ----------------------------------------------------------------------------- the grammar
def test_space_grammar():
    space = parse_space(
        [
            "lr=loguniform(1e-4,1e-2)",
            "reg=uniform(0, 0.5)",
            "batch_size=int(50,400)",
            "hidden_dims=choice(100,512x256)",
            "normalization=choice(none,batchnorm)",
            "update_rule=adam",
        ]
    )
    d = space.dimensions
    assert (d["lr"].kind, d["lr"].values) == ("loguniform", (1e-4, 1e-2))
    assert (d["batch_size"].kind, d["batch_size"].values) == ("int", (50, 400))
    assert d["hidden_dims"].values == (100, "512x256") and d["update_rule"].kind == "fixed"
    assert space.describe()["lr"] == {"loguniform": [1e-4, 1e-2]}
    assert type(space).from_description(space.describe()).describe() == space.describe()


def test_space_suggestions_become_run_settings():
    class FakeTrial:
        def suggest_float(self, name, low, high, log):
            return low

        def suggest_int(self, name, low, high, log):
            return high

        def suggest_categorical(self, name, choices):
            return choices[-1]

    space = parse_space(["lr=loguniform(1e-4,1e-2)", "epochs=int(2,5)", "hidden_dims=choice(100,512x256)",
                         "normalization=choice(batchnorm,none)"])  # fmt: skip
    assert space.suggest(FakeTrial()) == {"lr": 1e-4, "epochs": 5, "hidden_dims": [512, 256], "normalization": None}


@pytest.mark.parametrize(
    "expression, message",
    [
        ("learning_rate=loguniform(1e-4,1e-2)", "unknown setting 'learning_rate'"),
        ("lr=loguniform(1e-2,1e-4)", r"the range loguniform\(0.01, 0.0001\) is empty"),
        ("lr=uniform(0,1e-2)", "lr: 0 is not a finite number > 0"),
        ("reg=loguniform(0,1)", "loguniform needs bounds > 0"),
        ("dropout=uniform(0,1)", "dropout: 1 is not a probability in"),
        ("hidden_dims=choice(100,abc)", "'abc' is not a layer size"),
        ("hidden_dims=uniform(10,100)", r"uniform\(...\) does not fit this setting"),
        ("epochs=int(1.5,4)", "bounds must be integers"),
        ("update_rule=choice(adam,adamw)", "'adamw' is not one of"),
        ("batch_size=choice()", r"choice\(\) needs at least one value"),
        ("lr=1e-3=4", "is not a finite number"),
        ("lr", "cannot read --space 'lr'"),
        # bounds that are no numbers, or not finite, were called an empty range
        ("lr=uniform(a,b)", r"lr: uniform bounds must be finite numbers, got \('a', 'b'\)"),
        ("reg=loguniform(1e-4,nan)", r"reg: loguniform bounds must be finite numbers, got \(0.0001, nan\)"),
        ("weight_scale=uniform(1e-3,inf)", "bounds must be finite numbers"),
    ],
)
def test_bad_spaces_are_refused_by_name(expression, message):
    with pytest.raises(SpaceError, match=message):
        parse_space([expression])


def test_parse_space_takes_one_expression_alone_and_names_other_kinds():
    """A string was read a character at a time ("cannot read --space 'l'"); None and a number
    failed inside the loop or the regular expression; load_space_file(None) inside os.fspath."""
    assert parse_space("lr=loguniform(1e-4,1e-2)").describe() == parse_space(["lr=loguniform(1e-4,1e-2)"]).describe()
    with pytest.raises(SpaceError, match="^parse_space takes a list of --space expressions, got NoneType$"):
        parse_space(None)
    with pytest.raises(SpaceError, match="a mapping is a space file's: SearchSpace.from_description$"):
        parse_space({"lr": 1e-3})
    with pytest.raises(SpaceError, match="^cannot read --space 3: write name=kind"):
        parse_space([3])
    with pytest.raises(TypeError, match=r"^load_space_file: path must be a file path \(str or Path\), got NoneType$"):
        load_space_file(None)


def test_duplicate_names_and_grid_over_ranges_are_refused():
    with pytest.raises(SpaceError, match="lr is given twice"):
        parse_space(["lr=1e-3", "lr=1e-2"])
    with pytest.raises(SpaceError, match=r"--sampler grid needs choice\(...\).*\['lr'\]"):
        parse_space(["lr=loguniform(1e-4,1e-2)"]).grid()


def test_space_files_in_json_and_yaml(tmp_path):
    text = '{"lr": {"loguniform": [1e-4, 1e-2]}, "hidden_dims": {"choice": [100, 500]}, "epochs": 10}'
    (tmp_path / "s.json").write_text(text)
    space = load_space_file(tmp_path / "s.json")
    assert space.describe() == json.loads(text)
    (tmp_path / "s.yaml").write_text("lr:\n  loguniform: [1.0e-4, 1.0e-2]\nepochs: 10\n")
    pytest.importorskip("yaml")
    assert load_space_file(tmp_path / "s.yaml").describe() == {"lr": {"loguniform": [1e-4, 1e-2]}, "epochs": 10}
    (tmp_path / "bad.json").write_text('{"lr": {"loguniform": [1e-4, 1e-2], "uniform": [0, 1]}}')
    with pytest.raises(SpaceError, match="give one distribution"):
        load_space_file(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SpaceError, match="broken.json is not a valid search space file"):
        load_space_file(tmp_path / "broken.json")


def test_a_space_file_that_is_no_text_or_never_ends_is_refused_unread(tmp_path):
    """/dev/zero was read into memory until it ran out, and a binary file failed in the
    decoder with "'utf-8' codec can't decode byte 0x89"; a pipe still serves."""
    with pytest.raises(SpaceError, match=r"^/dev/zero is not a search space file: it holds more than 1048576 "):
        load_space_file("/dev/zero")
    (tmp_path / "s.json").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(SpaceError, match=r"s.json is not a search space file: it is not UTF-8 text \(invalid"):
        load_space_file(tmp_path / "s.json")
    read, write = os.pipe()
    with os.fdopen(write, "w") as f:
        f.write('{"lr": {"loguniform": [1e-4, 1e-2]}}')
    try:
        assert load_space_file(f"/dev/fd/{read}").describe() == {"lr": {"loguniform": [1e-4, 1e-2]}}
    finally:
        os.close(read)


def test_a_space_file_whose_aliases_expand_to_gigabytes_is_refused_in_a_short_message(tmp_path):
    """YAML's aliases let 406 bytes hold a list of 9**8 strings: the message that named the bad
    value held its whole repr (312 MB, built in 6.7 s; gigabytes a level deeper)."""
    pytest.importorskip("yaml")
    from xpnet.tune import SpaceError, load_space_file

    text = '&l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'
    for level in range(1, 8):
        text = f"&l{level} [{text}" + f", *l{level - 1}" * 8 + "]"
    path = tmp_path / "space.yaml"
    path.write_text(f"lr: {{choice: [{text}]}}\n")
    assert path.stat().st_size < 600
    with pytest.raises(SpaceError, match=r"^lr: \[\[\[") as error:
        load_space_file(path)
    assert len(str(error.value)) < 1000


def test_space_files_take_the_command_lines_grammar_in_strings(tmp_path):
    """A file holding "lr": "loguniform(1e-4,1e-2)", as --space writes it, was refused as
    "'loguniform(1e-4,1e-2)' is not a finite number > 0"."""
    text = '{"lr": "loguniform(1e-4, 1e-2)", "hidden_dims": "choice(100,512x256)", "model": "fc", "epochs": 10}'
    (tmp_path / "s.json").write_text(text)
    expressions = ["lr=loguniform(1e-4,1e-2)", "hidden_dims=choice(100,512x256)", "model=fc", "epochs=10"]
    assert load_space_file(tmp_path / "s.json").describe() == parse_space(expressions).describe()
    (tmp_path / "wrong.json").write_text('{"lr": "lognormal(1e-4, 1e-2)"}')  # not a distribution: a value
    with pytest.raises(SpaceError, match=r"lr: 'lognormal\(1e-4, 1e-2\)' is not a finite number > 0"):
        load_space_file(tmp_path / "wrong.json")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--space", "momentum=0.9"], "unknown setting 'momentum'"),
        ([], "the search space is empty"),
        (["--space", "lr=1e-3", "--sampler", "grid", "--space", "reg=uniform(0,1)"], "--sampler grid needs"),
        (["--space", "lr=1e-3", "--data-dir", "/x"], "data_dir and num_train apply to the cifar10 dataset only"),
        (["--space", "lr=1e-3", "--workers", "2", "--trials-per-gpu", "2"], "choose one of"),
        (
            ["--space", "lr=1e-3", "--trials-per-gpu", "2"],
            "trials_per_gpu runs trials on GPUs: it needs the cupy backend",
        ),
        (["--space", "lr=1e-3", "--backend", "foo"], "unknown backend 'foo'"),
        (["--space", "lr=1e-3", "--trials", "0"], "argument --trials: must be a positive integer, got 0"),
        (["--space", "lr=1e-3", "--workers", "-1"], "argument --workers: must be a non-negative integer, got -1"),
        (["--space", "lr=1e-3", "--scheduler", "tcp://127.0.0.1:1"], "needs --storage to be a database"),
        (["--space", "lr=1e-3", "--seed", "-1"], "argument --seed: must be a non-negative integer, got -1"),
        (["--space", "lr=1e-3", "--data-dir", ""], "argument --data-dir: an empty path (an unset shell variable?)"),
        # every trial that drew twolayer failed, one by one
        (
            ["--space", "model=choice(twolayer,fc)", "--space", "hidden_dims=100x50"],
            "model 'twolayer' cannot run with any hidden_dims and normalization of this sweep: --model twolayer "
            "takes one hidden size, got --hidden-dims [100, 50]",
        ),
        (
            ["--model", "cnn", "--space", "normalization=choice(layernorm)"],
            "model 'cnn' cannot run with any hidden_dims and normalization of this sweep: --model cnn normalises "
            "with batchnorm only",
        ),
    ],
)
def test_sweep_command_refuses_bad_input_before_running(args, message, tmp_path, capsys):
    from xpnet.cli.sweep import main

    with pytest.raises(SystemExit) as info:
        main([*args, "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "trials.csv").exists()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(trials=0), "trials must be a positive integer, got 0"),
        (dict(trials="3"), "trials must be a positive integer, got '3'"),
        (dict(workers=-2), "workers must be an integer >= 0, got -2"),
        (dict(seed=-1), "seed must be an integer >= 0, got -1"),
        (dict(sampler="tpee"), "unknown sampler 'tpee'"),
        (dict(pruner="mediann"), "unknown pruner 'mediann'"),
        (dict(workers=2, scheduler="tcp://127.0.0.1:1"), "choose one of workers, scheduler and trials_per_gpu"),
        (dict(experiment=Experiment(dataset="mnist")), "unknown dataset 'mnist'; use one of digits, cifar10"),
        (dict(experiment=Experiment(model="resnet")), "unknown model 'resnet'"),
        (dict(backend="foo"), "unknown backend 'foo'"),
        # fixed settings that every trial failed on, one by one
        (dict(experiment=Experiment(batch_size=0)), "experiment.batch_size: 0 is not a positive integer"),
        (dict(experiment=Experiment(update_rule="adamm")), "experiment.update_rule: 'adamm' is not one of sgd,"),
        (dict(experiment=Experiment(hidden_dims=[100, 0])), "experiment.hidden_dims: [100, 0] is not a layer size"),
        (dict(experiment=Experiment(dropout=1.0)), "experiment.dropout: 1.0 is not a probability in [0, 1)"),
        (dict(experiment=Experiment(print_every=0)), "experiment.print_every must be a positive integer, got 0"),
        (dict(experiment=Experiment(seed=-1)), "experiment.seed must be None or a non-negative integer, got -1"),
        (dict(experiment=Experiment(cuda_graph=True)), "experiment.cuda_graph needs the cupy backend; backend 'numpy'"),
        (
            dict(experiment=Experiment(model="twolayer", hidden_dims=[100, 50])),
            "model 'twolayer' cannot run with any hidden_dims and normalization of this sweep",
        ),
        # a string is truthy: "False" was refused as if True had been asked for, and plots="no" drew them
        (dict(experiment=Experiment(cuda_graph="False")), "experiment.cuda_graph must be True or False, got 'False'"),
        (dict(experiment=Experiment(download="no")), "experiment.download must be True or False, got 'no'"),
        (dict(plots="no"), "SweepConfig: plots must be True or False, got 'no'"),
        (dict(backend="foo", scheduler="tcp://127.0.0.1:1", storage="sqlite:///{tmp}/x.db"), "unknown backend 'foo'"),
    ],
)
def test_run_sweep_refuses_settings_that_cannot_run_before_any_trial(settings, message, tmp_path):
    """run_sweep from Python had no checks of its own: trials=0 ran nothing without a word, and an
    unknown backend or data set failed every trial one by one."""
    from xpnet.tune import SweepConfig, parse_space, run_sweep

    if "storage" in settings:  # in the test's folder, wherever the test runs
        settings = {**settings, "storage": settings["storage"].format(tmp=tmp_path)}
    config = SweepConfig(
        space=parse_space(["lr=1e-3", "epochs=1"]), out=str(tmp_path / "out"), verbose=False, **settings
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        run_sweep(config)
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.db").exists()


def test_a_searched_setting_is_not_held_to_the_experiments_fixed_value():
    from xpnet.tune import SweepConfig, parse_space

    config = SweepConfig(space=parse_space(["dropout=choice(0.0,0.5)"]), experiment=Experiment(dropout=1.5))
    config.check()  # the space decides each trial's dropout
    with pytest.raises(ValueError, match=re.escape("experiment.dropout: 1.5 is not a probability")):
        SweepConfig(space=parse_space(["lr=1e-3"]), experiment=Experiment(dropout=1.5)).check()


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(space="lr=loguniform(1e-4,1e-2)"), "space must be a SearchSpace, got str: parse_space(["),
        (dict(space={"lr": 1e-3}), "space must be a SearchSpace, got dict: SearchSpace.from_description(space)"),
        (dict(experiment={"epochs": 1}), "experiment must be an xpnet.experiment.Experiment, got dict: Experiment(**"),
        (dict(out=None), "out must be a folder path (str or Path), got NoneType"),
        (dict(storage=3), "storage must be a journal file path or a database URL (str or Path), got int"),
        (dict(study_name=float("nan")), "study_name must be a string, got float"),
        (dict(sampler=None), "sampler must be a string, got NoneType"),
        (dict(scheduler=8786), "scheduler must be an address (tcp://host:8786), got int"),
    ],
)
def test_run_sweep_names_settings_of_the_wrong_kind(settings, message, tmp_path):
    """Each failed inside the sweep: "'str' object has no attribute 'describe'", os.fspath's
    "expected str, bytes or os.PathLike object", Optuna's "Should not reach" for a NaN study name."""
    from xpnet.tune import SweepConfig, parse_space, run_sweep

    options = dict(space=parse_space(["lr=1e-3", "epochs=1"]), out=str(tmp_path / "out"), verbose=False)
    with pytest.raises(TypeError, match="^SweepConfig: " + re.escape(message)):
        run_sweep(SweepConfig(**{**options, **settings}))
    assert not (tmp_path / "out").exists()


def test_run_sweep_takes_paths_for_its_folder_and_storage(tmp_path):
    from xpnet.tune import SweepConfig, parse_space, run_sweep

    space = parse_space(["lr=1e-3", "epochs=1", "hidden_dims=20"])
    config = SweepConfig(space=space, trials=1, out=tmp_path / "out", storage=tmp_path / "j.journal", plots=False)
    config.verbose = False
    summary = run_sweep(config)
    assert summary["complete"] == 1 and (tmp_path / "j.journal").exists() and (tmp_path / "out" / "trials.csv").exists()


def test_a_sweep_continued_with_its_data_moved_tests_the_best_model_on_the_data_where_it_is_now(tmp_path):
    """The test accuracy read the data set from the folder the best trial had used: a sweep
    continued with another --data-dir (which leaves the sweep the same) failed at the end."""
    from xpnet.tune import SweepConfig, parse_space, run_sweep

    write_fake_cifar(tmp_path / "before", per_batch=1000)
    space = parse_space(["lr=1e-3", "epochs=1", "hidden_dims=20"])
    options = dict(space=space, trials=1, out=tmp_path / "out", plots=False, verbose=False)
    experiment = Experiment(dataset="cifar10", num_train=100, data_dir=str(tmp_path / "before"))
    first = run_sweep(SweepConfig(**options, experiment=experiment))
    (tmp_path / "before").rename(tmp_path / "after")
    experiment = Experiment(dataset="cifar10", num_train=100, data_dir=str(tmp_path / "after"))
    again = run_sweep(SweepConfig(**options, experiment=experiment))
    assert again["complete"] == 1 and again["test_acc"] == first["test_acc"]


def test_a_database_that_cannot_be_opened_is_named_with_the_likely_slip(tmp_path, monkeypatch):
    """sqlite:///tmp/s.db names tmp/s.db in the working folder; SQLAlchemy's OperationalError
    reached the user as a traceback."""
    from xpnet.tune import SweepConfig, parse_space, run_sweep

    monkeypatch.chdir(tmp_path)
    space = parse_space(["lr=1e-3", "epochs=1", "hidden_dims=20"])
    config = SweepConfig(space=space, trials=1, out="out", storage="sqlite:///missing/s.db", plots=False, verbose=False)
    expected = (
        "cannot open the study's storage sqlite:///missing/s.db: (sqlite3.OperationalError) unable to open database "
        f"file; the folder {tmp_path / 'missing'} does not exist (sqlite:///missing/s.db is relative to the working "
        "folder; sqlite:////missing/s.db is absolute)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        run_sweep(config)


def test_a_script_that_starts_dask_workers_without_a_main_guard_is_told_so(tmp_path):
    """Each worker process imports the script again and tries to start a cluster of its own;
    Dask said only "Nanny failed to start", below the workers' tracebacks."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from xpnet.tune import SweepConfig, parse_space, run_sweep\n"
        "run_sweep(SweepConfig(space=parse_space(['lr=1e-3', 'epochs=1']), trials=2, workers=2,"
        f" out={str(tmp_path / 'out')!r}, plots=False, verbose=False))\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "the 2 Dask worker processes did not start" in last and "if __name__ == '__main__':" in last, last


# ----------------------------------------------------------------------------- the picture
@pytest.mark.parametrize("model", ["fc", "cnn"])
def test_the_first_layer_picture_shows_each_unit_or_filter_as_an_image(model):
    import xpnet
    from xpnet.experiment import Experiment, apply_defaults, build_model
    from xpnet.tune.report import first_layer_images

    settings = Experiment(dataset="digits", model=model, hidden_dims=[6], num_filters=5, filter_size=3)
    apply_defaults(settings)
    data = {"X_train": np.zeros((2, 1, 8, 8) if model == "cnn" else (2, 64), dtype=np.float32)}
    net = build_model(settings, data, xpnet.get_backend("numpy"))
    w1 = net.params["W1"]
    images = first_layer_images(net, settings)
    if model == "cnn":  # filter f, row i, column j, channel c
        assert images.shape == (5, 3, 3, 1) and images[4, 0, 2, 0] == w1[4, 0, 0, 2]
    else:  # unit k's 64 weights as an 8x8 image
        assert images.shape == (6, 8, 8, 1) and images[5, 1, 2, 0] == w1[1 * 8 + 2, 5]


def test_the_best_models_test_accuracy_is_scored_in_batches(monkeypatch, tmp_path):
    """The one pass over the test set comes after every trial: scoring 10,000 CIFAR images at
    once takes about 8 GB for ThreeLayerConvNet's im2col columns, and failing there lost the
    summary of a whole sweep."""
    import xpnet
    from xpnet.experiment import apply_defaults, build_model, load_data
    from xpnet.model import model_state
    from xpnet.tune import report

    settings = Experiment(dataset="digits", model="cnn", hidden_dims=[6], num_filters=3, filter_size=3)
    apply_defaults(settings)
    data = load_data(settings)
    reps = -(-1200 // data["X_test"].shape[0])
    data["X_test"], data["y_test"] = np.concatenate([data["X_test"]] * reps), np.concatenate([data["y_test"]] * reps)
    monkeypatch.setattr(report, "load_data", lambda _: data)
    net = build_model(settings, data, xpnet.get_backend("numpy"))
    expected = float(np.mean(np.argmax(net.loss(data["X_test"]), axis=1) == data["y_test"]))
    rows = []
    loss = type(net).loss
    monkeypatch.setattr(type(net), "loss", lambda self, X, y=None: rows.append(X.shape[0]) or loss(self, X, y))
    best = {"settings": vars(settings), "model_state": model_state(net, net.backend)}
    path = save_checkpoint(tmp_path / "best_model.npz", best)
    test_acc, _, _ = report._test_accuracy(best, "numpy", path)
    assert test_acc == expected and sum(rows) == data["X_test"].shape[0] and max(rows) <= 500


def _best_trial_file(tmp_path):
    """A best_model.npz as run_sweep writes it, of a small net trained on nothing."""
    import xpnet
    from xpnet.experiment import apply_defaults, build_model, load_data
    from xpnet.model import model_state

    settings = Experiment(dataset="digits", hidden_dims=[6])
    apply_defaults(settings)
    net = build_model(settings, load_data(settings), xpnet.get_backend("numpy"))
    best = {"value": 0.5, "number": 3, "settings": vars(settings), "params": {"lr": 1e-3},
            "model_state": model_state(net, net.backend)}  # fmt: skip
    return best, save_checkpoint(tmp_path / "best_model.npz", best)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda best: best.pop("value"), "it has no value"),
        (lambda best: best.pop("model_state"), "it has no model_state"),
        (lambda best: best.update(value="high"), "its value 'high' is not a validation accuracy"),
        (lambda best: best.update(value=float("nan")), "its value nan is not a validation accuracy"),
        (lambda best: best.update(number=-1), "its trial number -1 is not one"),
        (lambda best: best.update(settings=[1]), "its settings, params and model_state are not all dicts"),
        (lambda best: best["settings"].update(colour="red"), "its settings are not a run's .*'colour'\\)"),
        # found by altering the file's entries: NumPy's TypeError from the seed, and CIFAR-10 looked for
        (
            lambda best: best["settings"].update(seed="batchnorm"),
            "its settings are not a run's: experiment.seed must be None or a non-negative integer, got 'batchnorm'",
        ),
        (
            lambda best: best["settings"].update(dataset=[1]),
            r"its settings are not a run's: unknown dataset \[1\]; use one of digits, cifar10",
        ),
        (
            lambda best: best["settings"].update(lr=-1),
            "its settings are not a run's: experiment.lr: -1 is not a finite number > 0",
        ),
    ],
)
def test_a_best_model_file_that_no_sweep_wrote_is_refused_by_name(tmp_path, change, message):
    """A sweep reads the file back when it starts and when it ends: these failed after every trial
    had run, in a KeyError or TypeError (or went on with a NaN best)."""
    from xpnet.checkpoint import CheckpointError
    from xpnet.tune.report import read_best_model

    best, path = _best_trial_file(tmp_path)
    assert read_best_model(path)["number"] == 3 and read_best_model(tmp_path / "none.npz") is None
    change(best)
    save_checkpoint(path, best)
    with pytest.raises(CheckpointError, match=f"best_model.npz is not the best model a sweep keeps: {message}; move"):
        read_best_model(path)


def test_a_best_model_file_declaring_a_network_larger_than_it_holds_is_refused_before_it_is_built(tmp_path):
    """Hidden sizes of a million from a few kilobytes asked NumPy for 3.6 TiB."""
    from xpnet.checkpoint import CheckpointError
    from xpnet.tune import report

    best, path = _best_trial_file(tmp_path)
    best["settings"]["hidden_dims"] = [10**6, 10**6]
    save_checkpoint(path, best)
    with pytest.raises(CheckpointError, match="best_model.npz: declares a network of more values than the \\d+ it"):
        report._test_accuracy(report.read_best_model(path), "numpy", path)


# ----------------------------------------------------------------------------- sweeps
pytest.importorskip("optuna")
pytest.importorskip("distributed")


def study_of(out):
    import optuna

    from xpnet.tune.study import storage_for

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name="xpnet-sweep", storage=storage_for(str(out / "study.journal")))


def check_outputs(out, trials, printed):
    rows = (out / "trials.csv").read_text().strip().splitlines()
    assert rows[0].startswith("number,state,value,seconds,hidden_dims,lr")
    assert len(rows) == 1 + trials
    summary = json.loads((out / "summary.json").read_text())
    best = load_checkpoint(out / "best_model.npz")
    assert (
        summary["best_val_acc"] == best["value"] == max(float(r.split(",")[2]) for r in rows[1:] if ",complete," in r)
    )
    assert 0.5 < summary["test_acc"] <= 1.0
    assert printed.strip().splitlines()[-1] == f"best val acc: {best['value']:.4f}"
    for picture in ("optimization_history.png", "first_layer_weights.png"):
        assert (out / picture).read_bytes()[:4] == b"\x89PNG"


def test_a_sweep_whose_folder_holds_a_damaged_best_model_runs_no_trial(tmp_path, capsys):
    from xpnet.cli.sweep import main

    out = tmp_path / "sweep"
    out.mkdir()
    save_checkpoint(out / "best_model.npz", {"number": 1})
    with pytest.raises(SystemExit):
        main(["--trials", "2", "--out", str(out), *SPACE])
    assert "best_model.npz is not the best model a sweep keeps: it has no value" in capsys.readouterr().err
    assert study_of(out).trials == []


def test_sweep_in_process_on_digits(tmp_path, capsys):
    from xpnet.cli.sweep import main

    out = tmp_path / "sweep"
    assert main(["--trials", "4", "--out", str(out), "--sampler", "random", *SPACE]) == 0
    check_outputs(out, 4, capsys.readouterr().out)
    # the list that is checked before the first trial names every file the sweep wrote
    assert {p.name for p in out.iterdir()} - {"study.journal"} == set(OUTPUT_FILES)
    assert main(["--trials", "4", "--out", str(out), "--sampler", "random", *SPACE]) == 0  # already done
    assert len(study_of(out).trials) == 4
    # Another question asked of the same run folder is refused, not answered with the old trials;
    # another seed (or data folder) continues the same sweep.
    for other in (["--model", "cnn", *SPACE], [*SPACE[:-1], "epochs=2"], SPACE[:-2]):
        with pytest.raises(SystemExit):
            main(["--trials", "5", "--out", str(out), "--sampler", "random", *other])
        assert "holds a sweep of other settings" in capsys.readouterr().err
    assert len(study_of(out).trials) == 4
    assert main(["--trials", "5", "--out", str(out), "--sampler", "random", "--seed", "3", *SPACE]) == 0
    assert len(study_of(out).trials) == 5


def test_a_sweep_without_matplotlib_ends_with_its_results_and_no_pictures(tmp_path, capsys, monkeypatch):
    """The plots needed matplotlib, imported only after every trial had run: an ImportError
    then ended the command before the best model's test accuracy."""
    import sys

    from xpnet import vis_utils
    from xpnet.cli.sweep import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    vis_utils._figure_class.cache_clear()
    out = tmp_path / "sweep"
    try:
        assert main(["--trials", "2", "--out", str(out), "--sampler", "random", *SPACE]) == 0
    finally:
        vis_utils._figure_class.cache_clear()
    printed = capsys.readouterr().out
    assert 'plots skipped: plotting needs matplotlib: pip install "xpnet[plot]"' in printed
    assert printed.strip().splitlines()[-1].startswith("best val acc: ")
    assert not list(out.glob("*.png"))
    assert json.loads((out / "summary.json").read_text())["test_acc"] > 0


def test_a_sweep_whose_disk_fills_while_it_writes_its_summary_keeps_the_last_one(tmp_path, capsys, monkeypatch):
    """summary.json and trials.csv are written whole or not at all: the old summary had been
    truncated before the new one was written, and trials.csv's temporary stayed behind."""
    import errno

    from xpnet.cli.sweep import main

    out = tmp_path / "sweep"
    args = ["--trials", "2", "--out", str(out), "--sampler", "random", "--no-plots", *SPACE]
    assert main(args) == 0
    before = {name: (out / name).read_bytes() for name in ("summary.json", "trials.csv")}
    capsys.readouterr()

    def full_disk(value, f, **kwargs):
        f.write('{"trials": ')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", full_disk)
    with pytest.raises(SystemExit):
        main(args)  # the study is complete: only the reports are written again
    assert "No space left on device" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


def test_a_grid_sweep_runs_each_point_once_and_ends_cleanly(tmp_path, capsys):
    """Optuna's grid sampler asks the study to stop once its last point is told, which the
    ask-and-tell loop must take as the end of the grid; trials beyond the grid are not run."""
    from xpnet.cli.sweep import main

    out = tmp_path / "sweep"
    space = ["--space", "model=cnn", "--space", "normalization=choice(none,batchnorm,layernorm)", "--space",
             "hidden_dims=choice(20,50)", "--space", "epochs=2", "--space", "num_filters=4", "--space", "filter_size=3"]  # fmt: skip
    assert main(["--trials", "8", "--out", str(out), "--sampler", "grid", "--pruner", "none", *space]) == 0
    printed = capsys.readouterr().out
    assert "the grid has 6 points: 6 trials, not 8" in printed
    trials = study_of(out).trials
    points = sorted((t.params["normalization"], t.params["hidden_dims"]) for t in trials)
    assert points == sorted((n, h) for n in ("none", "batchnorm", "layernorm") for h in (20, 50))
    states = {(t.params["normalization"], t.state.name) for t in trials}
    assert states == {("none", "COMPLETE"), ("batchnorm", "COMPLETE"), ("layernorm", "FAIL")}
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert all("batchnorm only" in t.user_attrs["error"] for t in failed)  # a cnn takes no layernorm, by name
    assert printed.strip().splitlines()[-1].startswith("best val acc: ")


def test_a_trial_whose_model_cannot_take_its_settings_fails_by_name(tmp_path, capsys):
    """A sweep over several models gives each trial every setting: one that the model cannot
    honour (two hidden sizes for the conv net) fails the trial with the reason, rather than
    training another net than the one its record names; settings a model does not have
    (num_filters for fc) are left aside."""
    from xpnet.cli.sweep import main

    out = tmp_path / "sweep"
    space = ["--space", "model=choice(fc,cnn)", "--space", "hidden_dims=choice(20,20x10)", "--space", "epochs=1",
             "--space", "num_filters=4", "--space", "filter_size=3"]  # fmt: skip
    assert main(["--trials", "4", "--out", str(out), "--sampler", "grid", "--pruner", "none", *space]) == 0
    trials = {(t.params["model"], t.params["hidden_dims"]): t for t in study_of(out).trials}
    assert {key: t.state.name for key, t in trials.items()} == {
        ("fc", 20): "COMPLETE",
        ("fc", "20x10"): "COMPLETE",
        ("cnn", 20): "COMPLETE",
        ("cnn", "20x10"): "FAIL",
    }
    assert "--model cnn takes one hidden size, got --hidden-dims [20, 10]" in trials["cnn", "20x10"].user_attrs["error"]


def test_an_out_folder_that_cannot_take_the_study_is_refused_before_any_trial(tmp_path, capsys):
    """It failed with the bare OSError text ('[Errno 17] File exists: ...')."""
    from xpnet.cli.sweep import main

    (tmp_path / "file").write_text("a file, not a folder")
    for out, message in (
        (tmp_path / "file", "is a file, not a folder"),
        (tmp_path / "file" / "sub", "cannot write there"),
    ):
        with pytest.raises(SystemExit) as info:
            main(["--trials", "1", "--space", "epochs=1", "--out", str(out)])
        assert info.value.code == 2
        assert f"--out {out}: {message}" in capsys.readouterr().err


def test_a_result_file_kept_read_only_is_refused_before_any_trial(tmp_path, capsys, monkeypatch):
    """The sweep ran every trial, then failed writing trials.csv (or replaced it, before files
    written whole kept a read-only file)."""
    from xpnet.cli.sweep import main

    out = tmp_path / "sweep"
    out.mkdir()
    (out / "trials.csv").write_text("kept\n")
    deny_writing(monkeypatch, out / "trials.csv")
    with pytest.raises(SystemExit) as info:
        main(["--trials", "1", "--out", str(out), *SPACE])
    assert info.value.code == 2
    assert f"the sweep's results cannot be written there ({out / 'trials.csv'} is read-only)" in capsys.readouterr().err
    assert (out / "trials.csv").read_text() == "kept\n" and not (out / "study.journal").exists()


def test_a_diverging_trial_fails_by_name_without_the_array_librarys_warnings(tmp_path, capsys):
    """Each diverging trial filled stderr with NumPy's overflow warnings and the guard's own
    RuntimeWarning, beside the failure the sweep reports."""
    import warnings

    from xpnet.cli.sweep import main

    space = ["--space", "lr=loguniform(1e5,1e6)", "--space", "update_rule=sgd", "--space", "epochs=1"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["--trials", "1", "--out", str(tmp_path / "sweep"), "--pruner", "none", *space]) == 1
    out = capsys.readouterr().out
    assert "trial 0: fail  (FloatingPointError: training diverged" in out
    assert not [w for w in caught if "training diverged" in str(w.message) or "encountered" in str(w.message)]
    (trial,) = study_of(tmp_path / "sweep").trials
    assert trial.state.name == "FAIL" and "training diverged" in trial.user_attrs["error"]


def test_a_quiet_sweep_whose_trials_all_failed_says_so(tmp_path, capsys):
    """It ended with status 1 and not a word: the report's line is printed only when not quiet."""
    from xpnet.cli.sweep import main

    space = ["--space", "lr=1e6", "--space", "update_rule=sgd", "--space", "epochs=1"]
    assert main(["--trials", "1", "--out", str(tmp_path / "sweep"), "--pruner", "none", "--quiet", *space]) == 1
    printed = capsys.readouterr()
    assert printed.out == ""
    assert f"no trial completed; see {tmp_path / 'sweep' / 'trials.csv'} for the errors" in printed.err


def run_sweep_command(out, trials, workers, epochs):
    args = [sys.executable, str(SWEEP), "--trials", str(trials), "--out", str(out), "--pruner", "none",
            "--space", "lr=loguniform(1e-3,1e-2)", "--space", "hidden_dims=choice(20,50)", "--space", f"epochs={epochs}"]  # fmt: skip
    if workers:
        args += ["--workers", str(workers)]
    return subprocess.Popen(
        args, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def group_is_gone(pgid, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_sweep_on_a_two_worker_local_cluster_leaves_no_worker_behind(tmp_path):
    out = tmp_path / "sweep"
    process = run_sweep_command(out, trials=4, workers=2, epochs=3)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    check_outputs(out, 4, stdout)
    assert group_is_gone(process.pid)


def test_a_killed_sweep_continues_without_repeating_finished_trials(tmp_path):
    import optuna

    out = tmp_path / "sweep"
    first = run_sweep_command(out, trials=8, workers=2, epochs=15)
    deadline = time.time() + 180
    finished = []
    while time.time() < deadline:
        if (out / "study.journal").exists():
            finished = [t for t in study_of(out).trials if t.state == optuna.trial.TrialState.COMPLETE]
            if len(finished) >= 2:
                break
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate(timeout=60)
    assert len(finished) >= 2
    assert group_is_gone(first.pid)
    before = {t.number: t.value for t in study_of(out).trials if t.state == optuna.trial.TrialState.COMPLETE}

    second = run_sweep_command(out, trials=8, workers=2, epochs=15)
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr
    assert group_is_gone(second.pid)
    trials = study_of(out).trials
    kept = {t.number: t.value for t in trials if t.number in before}
    assert kept == before  # finished trials were kept as they were, not run again
    stale = [t for t in trials if t.user_attrs.get("stale")]
    counted = [t for t in trials if not t.user_attrs.get("stale")]
    assert len(counted) == 8 and all(t.state.is_finished() for t in counted)
    assert len(trials) == 8 + len(stale)
    for t in stale:  # run again with the settings it had drawn (a kill between draws leaves some undrawn)
        if t.params:
            assert any(t.params.items() <= other.params.items() for other in counted), t.params
    assert len((out / "trials.csv").read_text().strip().splitlines()) == 1 + len(trials)
    assert np.isfinite(json.loads((out / "summary.json").read_text())["test_acc"])


def test_sweep_on_an_existing_dask_cluster_with_a_database_storage(tmp_path, capsys):
    from distributed import LocalCluster

    from xpnet.cli.sweep import main

    out = tmp_path / "sweep"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        args = ["--trials", "3", "--out", str(out), "--scheduler", cluster.scheduler_address, "--storage", storage]
        assert main([*args, "--sampler", "random", *SPACE]) == 0
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1].startswith("best val acc: ")
    assert (out / "best_model.npz").exists() and not (out / "study.journal").exists()
    assert len((out / "trials.csv").read_text().strip().splitlines()) == 4
