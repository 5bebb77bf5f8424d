"""Solver: training on the device, transfers only at logging points,
checkpoints, resume, divergence and data validation."""

import math
import os
import signal

import numpy as np
import pytest
from helpers import small_data, small_model, to_np

import xpnet
from xpnet.backend import namespace
from xpnet.checkpoint import load_checkpoint
from xpnet.solver import Solver
from xpnet.training import Callback, Checkpointer
from xpnet.training.interrupts import interrupts_held
from xpnet.vis_utils import plotting_unavailable

# The Solver tests run on every backend of the suite ($XPNET_TEST_BACKENDS) in both dtypes.


def test_tiny_net_overfits_50_samples(backend, dtype):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((50, 12)).astype(dtype)
    y = rng.integers(0, 5, 50)
    model = xpnet.FullyConnectedNet(
        [64, 64], input_dim=12, num_classes=5, weight_scale=0.1, seed=0, dtype=dtype, backend=backend
    )
    solver = Solver(
        model,
        {"X_train": X, "y_train": y, "X_val": X, "y_val": y},
        update_rule="adam",
        optim_config={"learning_rate": 5e-3},
        batch_size=25,
        num_epochs=60,
        verbose=False,
        seed=0,
    )
    solver.train()
    assert solver.train_acc_history[-1] == 1.0
    assert solver.best_val_acc == 1.0
    assert all(isinstance(v, float) for v in solver.loss_history + solver.train_acc_history + solver.val_acc_history)
    assert len(solver.loss_history) == 60 * 2
    assert solver.loss_history[-1] < 0.05


class TransferCounter:
    """Counts every conversion of an array-api-strict array to a Python number or to NumPy."""

    METHODS = (
        "__float__",
        "__int__",
        "__bool__",
        "__index__",
        "__complex__",
        "__array__",
        "__buffer__",  # what np.asarray reads on Python 3.12+ with NumPy 2.5
        "__dlpack__",
        "__iter__",
    )

    def __init__(self, monkeypatch):
        import array_api_strict

        self.count = 0
        self.by_method = {}
        self._moved = []  # arrays just copied to the CPU: reading them is part of that one transfer
        array_class = type(array_api_strict.asarray(0.0))
        for name in self.METHODS:
            original = getattr(array_class, name, None)
            if original is not None:
                monkeypatch.setattr(array_class, name, self._wrap(name, original))
        original_to_device = array_class.to_device

        def to_device(this, device, *args, **kwargs):
            moved = original_to_device(this, device, *args, **kwargs)
            if device == array_api_strict.Device("CPU_DEVICE") and this.device != device:
                self._hit("to_device(CPU)")
                self._moved.append(moved)
            return moved

        monkeypatch.setattr(array_class, "to_device", to_device)

    def _hit(self, name):
        self.count += 1
        self.by_method[name] = self.by_method.get(name, 0) + 1

    def _wrap(self, name, original):
        def counted(this, *args, **kwargs):
            if not any(this is moved for moved in self._moved):
                self._hit(name)
            return original(this, *args, **kwargs)

        return counted


@pytest.mark.parametrize("spec", ["array_api_strict", "array_api_strict:device1"])
@pytest.mark.parametrize("print_every", [5, 1000])
def test_values_cross_to_host_only_at_logging_points(monkeypatch, spec, print_every):
    data = small_data(n_train=400)
    model = small_model(spec, normalization="batchnorm", dropout=0.1)
    solver = Solver(
        model,
        data,
        update_rule="adam",
        batch_size=20,
        num_epochs=3,
        print_every=print_every,
        num_train_samples=100,
        verbose=False,
        seed=0,
    )
    counter = TransferCounter(monkeypatch)
    solver.train()
    iterations = 3 * (400 // 20)
    assert solver.iteration == iterations == 60
    loss_logs = len(range(0, iterations, print_every))
    accuracy_checks = len(solver.train_acc_history)  # first iteration and each epoch end
    assert accuracy_checks == 4
    # One transfer per logging point (the loss with the finite flag; both accuracies with
    # the finite flag), and one at the end that turns the loss history into floats.
    assert counter.count == loss_logs + accuracy_checks + 1, counter.by_method
    assert counter.count < iterations


def test_training_data_lives_on_the_model_device():
    import array_api_strict

    model = small_model("array_api_strict:device1")
    solver = Solver(model, small_data(), verbose=False)
    for key in ("X_train", "y_train", "X_val", "y_val"):
        assert getattr(solver, key).device == array_api_strict.Device("device1")


def test_resume_equals_uninterrupted_run(tmp_path, backend, dtype):
    data = small_data()
    options = dict(
        update_rule="adam",
        optim_config={"learning_rate": 1e-2},
        lr_decay=0.9,
        batch_size=20,
        num_epochs=4,
        num_train_samples=50,
        verbose=False,
        seed=3,
    )

    def fresh_model():
        return small_model(backend, normalization="batchnorm", dropout=0.2, dtype=dtype)

    full = Solver(fresh_model(), data, checkpoint_name=str(tmp_path / "run"), **options)
    full.train()
    assert sorted(os.listdir(tmp_path)) == [f"run_epoch_{e}.npz" for e in range(1, 5)]

    resumed = Solver(fresh_model(), data, **options)
    resumed.resume(tmp_path / "run_epoch_2.npz")
    assert resumed.epoch == 2 and resumed.iteration == 20
    resumed.train()
    for name, value in full.model.params.items():
        np.testing.assert_array_equal(to_np(resumed.model.params[name]), to_np(value), err_msg=name)
    assert resumed.loss_history == full.loss_history
    assert resumed.val_acc_history == full.val_acc_history
    assert resumed.best_val_acc == full.best_val_acc
    for layer_full, layer_resumed in zip(full.model.bn_params, resumed.model.bn_params):
        np.testing.assert_array_equal(to_np(layer_full["running_mean"]), to_np(layer_resumed["running_mean"]))


def test_a_later_train_keeps_the_best_parameters_of_the_earlier_one(backend):
    """After train() the model held the Solver's best_params dict itself, so the next train()
    (more epochs) updated the kept best parameters in place: with no better validation accuracy
    after it, the model ended with the last parameters, not the best."""
    model = small_model(backend, dtype="float64")
    # a rate so small that the accuracy cannot improve, while each update still moves the weights
    solver = Solver(model, small_data(), update_rule="sgd", optim_config={"learning_rate": 1e-12},
                    num_epochs=1, batch_size=20, verbose=False, seed=0)  # fmt: skip
    solver.train()
    best = {name: to_np(value) for name, value in solver.best_params.items()}
    solver.num_epochs = 3
    solver.train()
    assert len(set(solver.val_acc_history)) == 1 and solver.best_val_acc == solver.val_acc_history[0]
    for name in best:
        np.testing.assert_array_equal(to_np(solver.best_params[name]), best[name], err_msg=name)
        np.testing.assert_array_equal(to_np(solver.model.params[name]), best[name], err_msg=name)


def test_the_best_model_has_the_running_averages_its_validation_accuracy_was_scored_with(backend):
    """With the best parameters the model got the last epoch's batchnorm running averages, so
    its validation accuracy was not the best_val_acc recorded for it (0.95 against 0.96 on the
    digits)."""
    from xpnet.data_utils import load_digits_data

    digits = load_digits_data()
    data = {key: digits[key] for key in ("X_train", "y_train", "X_val", "y_val")}
    model = xpnet.FullyConnectedNet([50], input_dim=64, num_classes=10, normalization="batchnorm", seed=0,
                                    backend=backend)  # fmt: skip
    averages = []  # the running averages at each accuracy check

    def record(entry):
        if "val_acc" in entry:
            averages.append(
                (entry["val_acc"], [to_np(model.bn_params[0][k]).copy() for k in ("running_mean", "running_var")])
            )

    solver = Solver(model, data, num_epochs=8, batch_size=50, optim_config={"learning_rate": 1e-2}, verbose=False,
                    seed=0, on_log=record)  # fmt: skip
    solver.train()
    first_best = solver.val_acc_history.index(solver.best_val_acc)
    assert first_best < len(solver.val_acc_history) - 1  # the averages moved on after the best check
    best = averages[first_best][1]
    for key, expected in zip(("running_mean", "running_var"), best):
        np.testing.assert_array_equal(to_np(model.bn_params[0][key]), expected, err_msg=key)
    assert solver.check_accuracy(data["X_val"], data["y_val"]) == solver.best_val_acc


def test_paths_starting_with_a_tilde_mean_the_home_folder(tmp_path, monkeypatch):
    """As the data folders do: Solver(checkpoint_name="~/runs/net") made a folder named "~" in the
    working folder, and load_checkpoint("~/...") reported the file missing."""
    from helpers import write_fake_cifar

    from xpnet.data_utils import load_CIFAR10
    from xpnet.vis_utils import plot_history

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    solver = Solver(small_model("numpy"), small_data(), num_epochs=1, batch_size=20, verbose=False, seed=0,
                    checkpoint_name="~/runs/net")  # fmt: skip
    solver.train()
    assert solver.last_checkpoint == str(home / "runs" / "net_epoch_1.npz")
    assert load_checkpoint("~/runs/net_epoch_1.npz")["epoch"] == 1
    resumed = Solver(small_model("numpy"), small_data(), batch_size=20, verbose=False).resume("~/runs/net_epoch_1.npz")
    assert resumed.epoch == 1 and resumed.last_checkpoint == solver.last_checkpoint
    if plotting_unavailable() is None:
        plot_history(solver, "~/curves.png")
        assert (home / "curves.png").is_file()
    write_fake_cifar(home / "cifar", per_batch=2)
    assert load_CIFAR10("~/cifar")[0].shape == (10, 32, 32, 3)
    assert os.listdir(work) == []


def test_checkpoint_moves_between_backends(tmp_path):
    data = small_data()
    options = dict(update_rule="sgd_momentum", batch_size=20, num_epochs=2, verbose=False, seed=0)
    first = Solver(small_model("numpy"), data, checkpoint_name=str(tmp_path / "np"), **options)
    first.train()
    state = load_checkpoint(tmp_path / "np_epoch_2.npz")
    assert isinstance(state["model"]["params"]["W1"], np.ndarray)
    assert state["epoch"] == 2 and state["rng"] == {"seed": 0, "epoch": 2, "stream": "numpy"}
    assert state["settings"]["update_rule"] == "sgd_momentum"
    assert "velocity" in state["optim_configs"]["W1"]

    other = Solver(small_model("array_api_strict:device1"), data, **{**options, "num_epochs": 3})
    other.resume(tmp_path / "np_epoch_2.npz")
    assert other.resume_changes == ["num_epochs = 3 (the checkpoint has 2)"]  # and no note on the draws
    np.testing.assert_array_equal(to_np(other.model.params["W2"]), state["model"]["params"]["W2"])
    other.train()
    assert other.epoch == 3


def test_numpy_integer_settings_train_and_checkpoint_as_python_ints(tmp_path):
    """batch_size=np.int64(20) from a search loop trains as 20 and goes into the checkpoint's JSON."""
    data = small_data()
    options = dict(update_rule="sgd", verbose=False, seed=0, checkpoint_name=str(tmp_path / "run"))
    numpy_set = Solver(
        small_model("numpy"), data, batch_size=np.int64(20), num_epochs=np.int64(2), print_every=np.int64(3), **options
    )
    numpy_set.train()
    python_set = Solver(
        small_model("numpy"), data, batch_size=20, num_epochs=2, print_every=3, **{**options, "checkpoint_name": None}
    )
    python_set.train()
    assert numpy_set.loss_history == python_set.loss_history
    settings = load_checkpoint(tmp_path / "run_epoch_2.npz")["settings"]
    assert (settings["batch_size"], settings["num_epochs"]) == (20, 2) and type(settings["batch_size"]) is int


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    data = small_data()
    solver = Solver(
        small_model("numpy"),
        data,
        batch_size=50,
        num_epochs=1,
        verbose=False,
        checkpoint_name=str(tmp_path / "ck"),
        seed=0,
    )
    solver.train()
    path = tmp_path / "ck_epoch_1.npz"
    good = path.read_bytes()

    def crash(f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(np, "savez", crash)
    solver.epoch = 1
    with pytest.raises(KeyboardInterrupt):
        Checkpointer(str(tmp_path / "ck")).on_epoch_end(solver)
    assert path.read_bytes() == good  # the old file is untouched
    assert os.listdir(tmp_path) == ["ck_epoch_1.npz"]  # and no temporary file is left


def test_ctrl_c_during_a_checkpoint_write_lets_the_write_and_its_record_finish(tmp_path, monkeypatch, sigint_raises):
    """SIGINT arriving just after the rename, before the Solver records the file:
    the interrupt waits, so the run names the file that is on disk."""
    solver = Solver(small_model("numpy"), small_data(), batch_size=50, num_epochs=1, verbose=False, seed=0)
    solver.train()
    real_replace = os.replace

    def replace_then_ctrl_c(src, dst):
        real_replace(src, dst)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace_then_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        Checkpointer(str(tmp_path / "ck")).on_epoch_end(solver)
    assert solver.last_checkpoint == str(tmp_path / "ck_epoch_1.npz")
    assert load_checkpoint(solver.last_checkpoint)["epoch"] == 1
    assert signal.getsignal(signal.SIGINT) is handler


def test_interrupts_held_changes_nothing_when_no_interrupt_comes():
    handler = signal.getsignal(signal.SIGINT)
    ran = []
    with interrupts_held():
        ran.append(True)
    assert ran == [True]
    assert signal.getsignal(signal.SIGINT) is handler
    with pytest.raises(ValueError, match="inside"), interrupts_held():
        raise ValueError("inside")
    assert signal.getsignal(signal.SIGINT) is handler


def test_resume_rejects_missing_and_corrupt_files(tmp_path):
    solver = Solver(small_model("numpy"), small_data(), verbose=False)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        solver.resume(tmp_path / "nope.npz")
    with pytest.raises(IsADirectoryError, match=r"is a folder; give one file in it$"):
        solver.resume(tmp_path)
    for epoch in (2, 1):  # epoch 1 written last
        (tmp_path / f"run_epoch_{epoch}.npz").write_bytes(b"")
        os.utime(tmp_path / f"run_epoch_{epoch}.npz", (epoch * 1000, (3 - epoch) * 1000))
    with pytest.raises(IsADirectoryError, match=r"give one file in it, e\.g\. '.*run_epoch_1\.npz'"):
        solver.resume(tmp_path)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match="bad.npz.*corrupt"):
        solver.resume(bad)


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_divergence_stops_training_with_a_clear_message():
    model = small_model("numpy", weight_scale=1.0)
    solver = Solver(
        model,
        small_data(),
        update_rule="sgd",
        optim_config={"learning_rate": 1e6},
        batch_size=10,
        num_epochs=50,
        print_every=5,
        verbose=False,
        seed=0,
    )
    with pytest.warns(
        RuntimeWarning,
        match=r"diverged between iterations \d+ and \d+ of 1000 .*learning rate 1000000\.0\. Likely cause: the learning rate",
    ):
        solver.train()
    assert solver.diverged is not None
    assert solver.iteration < 50 * 20
    assert all(isinstance(v, float) for v in solver.loss_history)


def test_after_divergence_the_best_model_scores_its_best_validation_accuracy():
    """The diverging steps had moved batchnorm's running averages on, and the best parameters
    came back beside them: 0.1 instead of the best check's 0.275 on the digits."""
    from xpnet.data_utils import load_digits_data

    digits = load_digits_data()
    data = {key: digits[key] for key in ("X_train", "y_train", "X_val", "y_val")}
    model = xpnet.FullyConnectedNet([50], input_dim=64, num_classes=10, normalization="batchnorm", seed=0)
    solver = Solver(model, data, update_rule="sgd", optim_config={"learning_rate": 1e3}, num_epochs=20,
                    batch_size=50, verbose=False, seed=0)  # fmt: skip
    with pytest.warns(RuntimeWarning, match="diverged"), np.errstate(over="ignore", invalid="ignore"):
        solver.train()
    assert solver.diverged is not None and solver.best_val_acc > max(solver.val_acc_history[1:])
    assert solver.check_accuracy(data["X_val"], data["y_val"]) == solver.best_val_acc


def test_learning_rate_decays_each_epoch(backend):
    solver = Solver(
        small_model(backend),
        small_data(),
        optim_config={"learning_rate": 0.1},
        lr_decay=0.5,
        batch_size=100,
        num_epochs=3,
        verbose=False,
    )
    solver.train()
    for config in solver.optim_configs.values():
        assert config["learning_rate"] == pytest.approx(0.1 * 0.5**3)


def test_verbose_output_and_logging_callback(capsys):
    records = []
    solver = Solver(
        small_model("numpy"),
        small_data(),
        batch_size=50,
        num_epochs=2,
        print_every=3,
        on_log=records.append,
        seed=0,
    )
    solver.train()
    out = capsys.readouterr().out
    assert "(Iteration 1 / 8) loss:" in out
    assert "(Epoch 2 / 2) train acc:" in out
    losses = [r for r in records if "loss" in r]
    accs = [r for r in records if "val_acc" in r]
    assert [r["iteration"] for r in losses] == [1, 4, 7]
    assert len(accs) == 3 and all(isinstance(r["val_acc"], float) for r in accs)


def test_progress_bar_when_asked(capsys):
    solver = Solver(small_model("numpy"), small_data(), batch_size=50, num_epochs=1, progress=True, verbose=False)
    solver.train()
    err = capsys.readouterr().err
    assert "/4 [" in err and "it/s" in err  # the bar is drawn (and cleared when done)


def test_best_params_are_swapped_in(backend, dtype):
    solver = Solver(
        small_model(backend, dtype=dtype),
        small_data(),
        update_rule="adam",
        batch_size=20,
        num_epochs=3,
        verbose=False,
        seed=0,
    )
    solver.train()
    assert solver.best_val_acc == max(solver.val_acc_history)
    accuracy = solver.check_accuracy(solver.X_val, solver.y_val)
    assert accuracy == solver.best_val_acc


def test_check_accuracy_subsamples(backend):
    model = small_model(backend)
    solver = Solver(model, small_data(), verbose=False)
    full = solver.check_accuracy(solver.X_val, solver.y_val)
    sub = solver.check_accuracy(solver.X_val, solver.y_val, num_samples=7, batch_size=3)
    assert 0.0 <= full <= 1.0
    assert sub * 7 == pytest.approx(round(sub * 7))
    # rng: a seed draws the same rows as the generator it names (an int was taken as "no generator")
    seeded = [solver.check_accuracy(solver.X_val, solver.y_val, num_samples=7, rng=3) for _ in range(2)]
    assert seeded[0] == seeded[1] == solver.check_accuracy(solver.X_val, solver.y_val, 7, rng=solver.backend.rng(3))
    with pytest.raises(ValueError, match=r"check_accuracy: rng must be a seed \(an integer >= 0\), a generator"):
        solver.check_accuracy(solver.X_val, solver.y_val, num_samples=7, rng="x")
    with pytest.raises(
        TypeError, match=r"^Solver.step: rng must be a generator of the backend, backend.rng\(seed\), got int$"
    ):
        solver.step(rng=3)  # it failed inside the sampler


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.pop("y_val"), "missing 'y_val'; it needs"),
        (lambda d: d.update(Y_val=d.pop("y_val")), r"missing 'y_val' \(it has 'Y_val': the keys are case-sensitive\)"),
        (
            lambda d: d.update(y_train=d["y_train"][:-1]),
            "has 200 rows but data\\['y_train'\\] has 199 labels",
        ),
        (lambda d: d.update(y_train=d["y_train"] + 1), "label 3 outside \\[0, 3\\)"),
        (lambda d: d.update(y_val=d["y_val"] - 1), "label -1 outside"),
        (
            lambda d: d.update(y_train=d["y_train"].astype(np.float32)),
            r"integer class labels, got dtype float32; these are whole numbers: data\['y_train'\]\.astype\(int\)",
        ),
        (lambda d: d.update(y_train=d["y_train"] + 0.5), r"integer class labels, got dtype float64$"),
        (
            lambda d: d.update(y_val=np.eye(3)[d["y_val"]]),
            r"must be 1-D, got shape \(60, 3\); for one-hot rows .* data\['y_val'\]\.argmax\(axis=1\)",
        ),
        (lambda d: d.update(y_val=d["y_val"][:, None]), r"\(60, 1\); a column of labels: data\['y_val'\]\.reshape"),
        # a row, as scipy.io.loadmat gives labels (and np.matrix, refused first since its reshape keeps it 2-D)
        (lambda d: d.update(y_val=d["y_val"][None, :]), r"\(1, 60\); a row of labels: data\['y_val'\]\.reshape"),
        (lambda d: d.update(y_val=np.matrix(d["y_val"])), r"data\['y_val'\] is a matrix: np.matrix's \* and"),
        (
            lambda d: d.update(X_train=np.ma.masked_array(d["X_train"])),
            r"X_train'\] is a MaskedArray: the layers do not",
        ),
        (lambda d: d["X_train"].__setitem__((3, 2), np.nan), "NaN or infinite"),
        (lambda d: d.update(X_val=d["X_val"][:, :4]), "the model expects 6 inputs"),
        (lambda d: d.update(y_train=list(d["y_train"])), "must be an array"),
    ],
)
@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_bad_data_is_rejected(change, message):
    data = small_data()
    change(data)
    with pytest.raises(ValueError, match=message):
        Solver(small_model("numpy"), data)


def test_settings_set_between_train_calls_are_checked_and_take_effect(capsys):
    """solver.verbose = False was ignored (the console report had copied it), and print_every = 0
    was taken and failed at the first step with "integer modulo by zero"."""
    solver = Solver(small_model("numpy"), small_data(), batch_size=50, num_epochs=1, seed=0)
    solver.verbose = False
    solver.train()
    assert capsys.readouterr().out == ""
    solver.num_epochs, solver.print_every, solver.verbose = 2, 2, True
    solver.train()
    out = capsys.readouterr().out
    assert "(Iteration 5 / 8)" in out and "(Iteration 6 / 8)" not in out and "(Epoch 2 / 2)" in out
    for name, value, message in (
        ("print_every", 0, "print_every must be a positive integer, got 0"),
        ("num_epochs", -1, "num_epochs must be a non-negative integer, got -1"),
        ("seed", 1.5, "seed must be None or a non-negative integer, got 1.5"),
    ):
        with pytest.raises(ValueError, match=message):
            setattr(solver, name, value)
        assert getattr(solver, name) != value


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"verbose": "False"}, r"verbose must be True or False \(or None\), got 'False'"),  # it printed
        ({"progress": "no"}, r"progress must be True or False \(or None\), got 'no'"),  # it drew a bar
        ({"cuda_graph": "False"}, r"cuda_graph must be True or False, got 'False'"),  # "cuda_graph=True needs"
        ({"verbose": np.array([1, 0])}, r"verbose must be True or False \(or None\), got array"),
    ],
)
def test_switches_given_as_words_are_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        Solver(small_model("numpy"), small_data(), **setting)
    solver = Solver(small_model("numpy"), small_data(), verbose=np.False_, progress=None, cuda_graph=0)
    assert not solver.verbose and not solver.cuda_graph
    name, value = next(iter(setting.items()))
    if name != "cuda_graph":  # set between train() calls, checked alike
        with pytest.raises(ValueError, match=message):
            setattr(solver, name, value)


@pytest.mark.parametrize(
    "name, value",
    [("batch_size", 25), ("update_rule", "adam"), ("optim_config", {"learning_rate": 1e-3}), ("lr_decay", 0.5),
     ("checkpoint_name", "runs/x"), ("cuda_graph", True), ("sampler", "epoch")],
)  # fmt: skip
def test_settings_the_solver_was_built_from_cannot_be_set_afterwards(name, value):
    """They were taken and ignored: the sampler kept drawing batches of the old size, the update
    its old rule and learning rate, and no checkpoint was written."""
    solver = Solver(small_model("numpy"), small_data(), batch_size=50, verbose=False)
    before = getattr(solver, name)
    with pytest.raises(AttributeError, match=rf"Solver.{name} is fixed once the Solver is made .*give {name}="):
        setattr(solver, name, value)
    assert getattr(solver, name) is before


@pytest.mark.parametrize("name", ["X_train", "y_train", "X_val", "y_val"])
def test_the_data_cannot_be_replaced_after_the_solver_is_made(name):
    """solver.X_train = X[:10] was taken: the sampler drew rows of the old count and failed inside
    NumPy ("index 84 is out of bounds"), and new validation labels went unchecked."""
    solver = Solver(small_model("numpy"), small_data(), batch_size=50, num_epochs=1, verbose=False)
    before = getattr(solver, name)
    with pytest.raises(AttributeError, match=rf"^Solver.{name} is fixed once the Solver is made .*to a new Solver"):
        setattr(solver, name, before[:10])
    assert getattr(solver, name) is before
    solver.train()


def test_a_solver_given_data_or_a_class_for_its_model_says_so():
    with pytest.raises(
        ValueError, match=r"dict has no params: .*this looks like the data: Solver\(model, data\) takes"
    ):
        Solver(small_data(), small_model("numpy"))
    with pytest.raises(
        ValueError, match=r"FullyConnectedNet is a class: give a model made from it, FullyConnectedNet\(...\)"
    ):
        Solver(xpnet.FullyConnectedNet, small_data())


@pytest.mark.parametrize("as_sequence", [list, tuple])
def test_data_that_is_not_a_dict_is_named(as_sequence):
    """Arrays in a list or tuple failed inside NumPy ("the truth value of an array ... is ambiguous")."""
    data = small_data()
    with pytest.raises(ValueError, match=rf"data must be a dict with keys X_train, y_train, X_val, y_val, got "
                                         rf"{as_sequence.__name__} of 4$"):  # fmt: skip
        Solver(small_model("numpy"), as_sequence(data[key] for key in ("X_train", "y_train", "X_val", "y_val")))


def test_an_update_rule_of_ones_own_trains_and_its_slips_are_named():
    """A hand-written rule returning w alone, None, a w of another shape or no config dict
    failed in tuple unpacking (or in the next layer); the course's form trains as optim's do."""

    def plain_sgd(w, dw, config):
        w -= config.get("learning_rate", 1e-2) * dw
        return w, config

    mine = Solver(small_model("numpy"), small_data(), update_rule=plain_sgd, num_epochs=2, verbose=False, seed=0)
    theirs = Solver(small_model("numpy"), small_data(), update_rule="sgd", num_epochs=2, verbose=False, seed=0)
    mine.train(), theirs.train()
    assert mine.loss_history == theirs.loss_history
    for rule, error, message in (
        (
            lambda w, dw, c: w - 1e-3 * dw,
            TypeError,
            r"update_rule <lambda> must return \(next_w, config\).*got ndarray",
        ),
        (lambda w, dw, c: None, TypeError, "got NoneType"),
        (lambda w, dw, c: (w, c, 0), TypeError, "got a tuple of 3"),
        (lambda w, dw, c: (w[:1], c), ValueError, r"returned next_w \(1, 16\) for a parameter of shape \(6, 16\)"),
        (lambda w, dw, c: (w, None), TypeError, "must return its config dict second, got NoneType"),
    ):
        with pytest.raises(error, match=message):
            Solver(small_model("numpy"), small_data(), update_rule=rule, num_epochs=1, verbose=False).train()


def test_bad_settings_are_rejected():
    model, data = small_model("numpy"), small_data()
    with pytest.raises(ValueError, match="Unrecognized arguments learning_rate"):
        Solver(model, data, learning_rate=0.1)
    with pytest.raises(ValueError, match="unknown update_rule 'adamw'"):
        Solver(model, data, update_rule="adamw")
    with pytest.raises(ValueError, match="batch_size"):
        Solver(model, data, batch_size=0)
    for name, value in (("num_train_samples", 0), ("num_val_samples", -5), ("num_train_samples", 2.5)):
        with pytest.raises(ValueError, match=f"{name} must be None or a positive integer, got {value}"):
            Solver(model, data, **{name: value})
    for seed in ("abc", -1, 1.5):  # NumPy's seeding said 'unrecognized seed string' or 'expected non-negative integer'
        with pytest.raises(ValueError, match=f"seed must be None or a non-negative integer, got {seed!r}"):
            Solver(model, data, seed=seed)
    with pytest.raises(ValueError, match="checkpoint_name must be a path"):
        Solver(model, data, checkpoint_name=123)  # it wrote 123_epoch_1.npz in the working folder
    with pytest.raises(ValueError, match="checkpoint_name is empty: give a path such as 'runs/net', or None"):
        Solver(model, data, checkpoint_name="")  # an unset variable, say: it trained without a checkpoint
    for rule, config, message in (
        ("sgd_momentum", {"momentum": 1.5}, r"momentum must be a finite number in \[0, 1\), got 1.5"),
        ("adam", {"beta1": 1.0}, r"beta1 must be a finite number in \[0, 1\), got 1.0"),  # bias correction / 0
        ("adam", {"epsilon": -1e-8}, "epsilon must be a finite number >= 0"),
        ("rmsprop", {"decay_rate": float("nan")}, r"decay_rate must be a finite number in \[0, 1\), got nan"),
        ("nesterov_sgd", {"weight_decay": -5e-4}, "weight_decay must be a finite number >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            Solver(model, data, update_rule=rule, optim_config=config)


def test_check_accuracy_refuses_counts_that_cannot_be_right():
    solver = Solver(small_model("numpy"), small_data(), verbose=False)
    for options, message in ((dict(num_samples=0), "num_samples"), (dict(num_samples=-1), "num_samples"),
                             (dict(batch_size=0), "batch_size"), (dict(batch_size=1.5), "batch_size")):  # fmt: skip
        with pytest.raises(ValueError, match=f"check_accuracy: {message} must be a positive integer"):
            solver.check_accuracy(solver.X_val, solver.y_val, **options)
    data = small_data()
    for labels, message in (
        (data["y_val"][:-1], r"X has 60 rows but y has 59 labels"),  # NumPy's broadcasting error, before
        (data["y_val"][:, None], r"y must be 1-D, got shape \(60, 1\); a column of labels: y.reshape\(-1\)"),
    ):
        with pytest.raises(ValueError, match=f"^check_accuracy: {message}"):
            solver.check_accuracy(data["X_val"], labels)


def test_check_accuracy_checks_its_data_as_the_training_data_are_checked(backend):
    """A test set with labels counted from 1, labels stored as floats, a NaN pixel or rows of
    another shape scored a plausible accuracy before (0.0 for labels out of range)."""
    solver = Solver(small_model(backend), small_data(), verbose=False)
    X, y = small_data()["X_val"], small_data()["y_val"]  # NumPy arrays: moved by check_accuracy
    nan_row = X.copy()
    nan_row[7, 2] = np.nan
    for X_given, y_given, message in (
        (X, y + 1, r"y has label 3 outside \[0, 3\) for a model with 3 classes"),
        (X, y - 1, r"y has label -1 outside \[0, 3\)"),
        (X, y.astype(np.float64), r"y must hold integer class labels, got dtype float64; these are whole numbers"),
        (nan_row, y, "X contains NaN or infinite values"),
        (X + 1j, y, r"X holds complex numbers \(dtype complex(64|128)\), and the nets take real inputs"),
        (X[:, :5], y, r"X samples have shape \(5,\) \(5 values\) but the model expects 6 inputs"),
    ):
        with pytest.raises(ValueError, match=f"^check_accuracy: {message}"):
            solver.check_accuracy(X_given, y_given)
    # on the device already, and subsampled: checked all the same
    with pytest.raises(ValueError, match=r"^check_accuracy: y has label 3 outside \[0, 3\)"):
        solver.check_accuracy(solver.X_val, solver.y_val + 1, num_samples=5)
    assert 0.0 <= solver.check_accuracy(X, y) <= 1.0  # the same data, well formed, is scored


def test_complex_inputs_are_refused_not_cast_to_their_real_part():
    """The move to the model's dtype dropped the imaginary part, with a ComplexWarning from
    inside array-api-compat, and the Solver trained on half the data."""
    data = small_data()
    data["X_val"] = data["X_val"] * (1 + 1j)
    with pytest.raises(ValueError, match=r"^data\['X_val'\] holds complex numbers \(dtype complex"):
        Solver(small_model("numpy"), data, verbose=False)


def test_cuda_graph_needs_a_backend_that_can_capture():
    with pytest.raises(ValueError, match="cuda_graph=True needs the cupy backend; backend 'numpy' cannot capture"):
        Solver(small_model("numpy"), small_data(), cuda_graph=True)


def test_callable_update_rule():
    calls = []

    def halve(w, dw, config=None):
        calls.append(1)
        return w * 0.5, config or {}

    solver = Solver(small_model("numpy"), small_data(), update_rule=halve, batch_size=100, num_epochs=1, verbose=False)
    solver.train()
    assert len(calls) == 2 * len(solver.model.params)


class _HandWrittenModel:
    """A model of the user's own, as the course's Solver takes one, whose loss returns the
    gradients that ``mistake`` edits: a softmax regression on 6 inputs and 3 classes."""

    def __init__(self, mistake=lambda grads: None, returns=lambda loss, grads: (loss, grads), scores=lambda s: s):
        self.params = {"W": np.zeros((6, 3)), "b": np.zeros(3)}
        self.mistake, self.returns, self.scores = mistake, returns, scores

    def loss(self, X, y=None):
        scores = X @ self.params["W"] + self.params["b"]
        if y is None:
            return self.scores(scores)
        loss, dscores = xpnet.layers.softmax_loss(scores, y)
        grads = {"W": X.T @ dscores, "b": namespace(dscores).sum(dscores, axis=0)}
        self.mistake(grads)
        return self.returns(loss, grads)


@pytest.mark.parametrize(
    "mistake, message",
    [
        (
            lambda g: g.update(B=g.pop("b")),
            r"no gradient for \['b'\] .*; it returned gradients for \['B'\], which are not",
        ),
        (lambda g: g.pop("b"), r"no gradient for \['b'\] \(None leaves a parameter as it is\)$"),
        (lambda g: g.update(W=g["W"].T), r"a gradient of shape \(3, 6\) for 'W', whose shape is \(6, 3\)"),
    ],
)
def test_a_hand_written_model_hears_what_is_wrong_with_its_gradients(mistake, message):
    solver = Solver(_HandWrittenModel(mistake), small_data(), batch_size=20, num_epochs=1, verbose=False)
    with pytest.raises(ValueError, match=message):
        solver.train()


def test_a_hand_written_model_hears_of_a_gradient_that_is_no_array():
    """It failed inside the first update: "'list' object has no attribute 'shape'"."""
    solver = Solver(_HandWrittenModel(lambda g: g.update(b=g["b"].tolist())), small_data(), batch_size=20,
                    num_epochs=1, verbose=False)  # fmt: skip
    with pytest.raises(TypeError, match=r"returned a list as the gradient of 'b'; gradients are arrays"):
        solver.train()


@pytest.mark.parametrize(
    "param, error",
    [
        ([0.0, 0.0, 0.0], r"^Solver: model.params\['b'\] must be an array, got list \(np.asarray"),
        (0.0, r"^Solver: model.params\['b'\] must be an array, got float"),
        (np.zeros(3, dtype=np.int64), r"^Solver: model.params\['b'\] must be a floating-point array, got dtype int64"),
    ],
    ids=["list", "number", "integers"],
)
def test_a_hand_written_model_hears_which_parameter_is_no_float_array(param, error):
    """Lists and numbers failed inside the first update ("'list' object has no attribute 'shape'");
    integers were refused by a layer or an update rule that named its own argument, not the parameter."""
    model = _HandWrittenModel()
    model.params["b"] = param
    with pytest.raises(TypeError, match=error):
        Solver(model, small_data(), batch_size=20, num_epochs=1, verbose=False)
    model.params = [np.zeros((6, 3)), np.zeros(3)]
    with pytest.raises(TypeError, match="model.params must be a dict of parameter arrays, got list"):
        Solver(model, small_data(), batch_size=20, num_epochs=1, verbose=False)


def test_read_only_parameters_are_refused_when_the_solver_is_made():
    """Weights loaded with np.load(..., mmap_mode="r") failed at the first update, after a whole
    forward and backward pass, in NumPy's words."""
    model = small_model("numpy")
    model.params["W2"].setflags(write=False)
    with pytest.raises(ValueError, match=r"^Solver: model.params\['W2'\] is read-only, and the update rules"):
        Solver(model, small_data(), verbose=False)


@pytest.mark.parametrize(
    "returns, error, message",
    [
        (lambda loss, g: loss, TypeError, r"must return \(loss, grads\), as xpnet's nets do; got the loss alone$"),
        (lambda loss, g: (loss, g, {}), TypeError, r"must return \(loss, grads\).*; got a tuple of 3$"),
        (
            lambda loss, g: (np.asarray([loss]), g),
            ValueError,
            r"a scalar loss \(a 0-d array or a number\); got shape \(1,\)",
        ),
        (lambda loss, g: (loss, list(g.values())), TypeError, r"its gradients as a dict; got list"),
    ],
)
def test_a_hand_written_model_hears_what_is_wrong_with_what_its_loss_returns(returns, error, message):
    solver = Solver(_HandWrittenModel(returns=returns), small_data(), batch_size=20, num_epochs=1, verbose=False)
    with pytest.raises(error, match=message):
        solver.train()


@pytest.mark.parametrize(
    "scores, message",
    [
        (lambda s: s[:, 0], r"got shape \(200,\)$"),
        (lambda s: s[:2], r"got shape \(2, 3\)$"),
        (lambda s: (s, {}), r"got a tuple \(without y, loss\(X\) must return the scores alone, not \(loss, grads\)\)$"),
    ],
)
def test_a_hand_written_model_hears_what_is_wrong_with_its_scores(scores, message):
    solver = Solver(_HandWrittenModel(scores=scores), small_data(), batch_size=20, num_epochs=1, verbose=False)
    with pytest.raises(
        ValueError,
        match=r"loss\(X\) must return class scores of shape \(N, C\), one row for each of the 200 inputs; " + message,
    ):
        solver.train()


def test_a_hand_written_model_may_return_its_loss_as_a_python_number(backend):
    """A loss a model summed in Python (a float) trains as a 0-d array would, on any backend."""
    xp = backend.xp
    model = _HandWrittenModel(returns=lambda loss, g: (float(loss), g))
    model.params = {k: backend.asarray(v) for k, v in model.params.items()}
    solver = Solver(
        model, small_data(), batch_size=20, num_epochs=1, verbose=False, optim_config={"learning_rate": 0.1}
    )
    solver.train()
    assert len(solver.loss_history) == solver.num_iterations and all(math.isfinite(v) for v in solver.loss_history)
    assert bool(xp.any(model.params["W"] != 0))


def test_a_hand_written_model_may_leave_a_parameter_out_with_none():
    model = _HandWrittenModel(lambda g: g.update(b=None))
    Solver(model, small_data(), batch_size=20, num_epochs=1, verbose=False, optim_config={"learning_rate": 0.1}).train()
    assert not model.params["b"].any() and model.params["W"].any()


def test_an_unseeded_run_repeats_after_seeding_the_shared_generator(backend):
    """With seed=None the Solver draws from the backend's shared generator, so seeding that (on
    NumPy: np.random.seed, as a course notebook does) repeats minibatches, dropout and subsamples."""

    def run():
        model = small_model(backend, dropout=0.3, seed=0)
        solver = Solver(model, small_data(), batch_size=20, num_epochs=2, num_train_samples=50, verbose=False)
        solver.train()
        return solver.loss_history, solver.train_acc_history, to_np(model.params["W1"])

    backend.seed(231)
    first = run()
    backend.seed(231)
    again = run()
    assert first[:2] == again[:2]
    np.testing.assert_array_equal(first[2], again[2])
    if backend.name == "numpy":
        np.random.seed(231)
        assert run()[0] == first[0]


def test_ctrl_c_leaves_float_histories_a_closed_bar_and_a_run_that_goes_on(backend):
    """A KeyboardInterrupt mid-epoch: the losses so far are floats (a notebook plots them next),
    the progress bar is closed, and train() again finishes the run as if nothing had happened."""

    class CtrlC(Callback):
        def on_step(self, solver):
            if solver.iteration == 7:
                raise KeyboardInterrupt

    options = dict(update_rule="adam", batch_size=20, num_epochs=2, print_every=5, verbose=False, seed=1)
    interrupted = Solver(small_model(backend, dropout=0.2), small_data(), progress=True, callbacks=[CtrlC()], **options)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert interrupted.iteration == 7 and len(interrupted.loss_history) == 7
    assert all(type(value) is float for value in interrupted.loss_history)
    assert interrupted._console._bar is None
    interrupted.train()
    whole = Solver(small_model(backend, dropout=0.2), small_data(), **options)
    whole.train()
    assert interrupted.loss_history == whole.loss_history
    assert interrupted.val_acc_history == whole.val_acc_history


def test_an_unseeded_run_after_np_random_seed_draws_what_the_course_solver_draws():
    """The course's Solver, written out here in NumPy (np.random.choice minibatches, SGD, the
    accuracy checks at the first step, each epoch end and the last step, each drawing its
    training subsample with np.random.choice): from the same np.random.seed, xpnet's unseeded
    Solver on NumPy follows it loss for loss and accuracy for accuracy."""
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((60, 8)), rng.integers(0, 4, 60)
    data = {"X_train": X[:40], "y_train": y[:40], "X_val": X[40:], "y_val": y[40:]}
    options = dict(update_rule="sgd", optim_config={"learning_rate": 0.5}, lr_decay=0.9, batch_size=15, num_epochs=3,
                   num_train_samples=25)  # fmt: skip

    np.random.seed(231)
    model = xpnet.FullyConnectedNet([12], input_dim=8, num_classes=4, weight_scale=0.3, dtype="float64")
    solver = Solver(model, data, verbose=False, **options)
    solver.train()

    np.random.seed(231)
    W1, b1 = 0.3 * np.random.randn(8, 12), np.zeros(12)
    W2, b2 = 0.3 * np.random.randn(12, 4), np.zeros(4)

    def scores(X):
        return np.maximum(X @ W1 + b1, 0) @ W2 + b2

    def check_accuracy(X, y, num_samples):
        if num_samples is not None and X.shape[0] > num_samples:
            mask = np.random.choice(X.shape[0], num_samples)
            X, y = X[mask], y[mask]
        return float(np.mean(np.argmax(scores(X), axis=1) == y))

    lr, per_epoch, losses, train_accs, val_accs = 0.5, 40 // 15, [], [], []
    for t in range(3 * per_epoch):
        batch = np.random.choice(40, 15)
        Xb, yb = data["X_train"][batch], data["y_train"][batch]
        hidden = np.maximum(Xb @ W1 + b1, 0)
        s = hidden @ W2 + b2
        probs = np.exp(s - s.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        losses.append(-np.log(probs[np.arange(15), yb]).mean())
        ds = probs.copy()
        ds[np.arange(15), yb] -= 1
        ds /= 15
        dh = (ds @ W2.T) * (hidden > 0)
        W1, b1, W2, b2 = W1 - lr * (Xb.T @ dh), b1 - lr * dh.sum(0), W2 - lr * (hidden.T @ ds), b2 - lr * ds.sum(0)
        epoch_end = (t + 1) % per_epoch == 0
        lr *= 0.9 if epoch_end else 1.0
        if t == 0 or t == 3 * per_epoch - 1 or epoch_end:
            train_accs.append(check_accuracy(data["X_train"], data["y_train"], 25))
            val_accs.append(check_accuracy(data["X_val"], data["y_val"], None))

    np.testing.assert_allclose(solver.loss_history, losses, rtol=1e-12)
    assert solver.train_acc_history == train_accs and solver.val_acc_history == val_accs
