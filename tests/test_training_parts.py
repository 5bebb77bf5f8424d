"""The Solver's parts: learning-rate schedules and parameter groups on the device,
samplers, early stopping, explicit generators, and models that are not xpnet's."""

import re

import numpy as np
import pytest
from array_api_compat import device
from helpers import small_data, small_model, to_np

import xpnet
from xpnet.solver import Solver
from xpnet.training import Callback, EarlyStopping, EpochPermutation
from xpnet.training.update import learning_rate_factor


def spy_rule(seen):
    """An update rule that records the learning rate it is given (and updates nothing)."""

    def spy(w, dw, config=None):
        seen.append(float(to_np(config["learning_rate"])))
        return w, config

    return spy


# ----------------------------------------------------------------------------- schedules and groups
def test_per_iteration_schedule_and_epoch_decay_reach_every_step(backend):
    seen = []
    schedule = lambda t: 0.2 + 0.1 * t  # noqa: E731
    solver = Solver(
        small_model(backend, dtype="float64"),
        small_data(),
        update_rule=spy_rule(seen),
        optim_config={"learning_rate": 0.5},
        lr_decay=0.5,
        lr_schedule=schedule,
        batch_size=50,  # 4 steps per epoch
        num_epochs=3,
        verbose=False,
        seed=0,
    )
    solver.train()
    per_param = len(solver.model.params)
    rates = seen[::per_param]  # every parameter shares one group here
    expected = [0.5 * 0.5 ** (t // 4) * schedule(t) for t in range(12)]
    np.testing.assert_allclose(rates, expected, rtol=1e-15)
    assert solver.optim_configs["W1"]["learning_rate"] == pytest.approx(0.5 * 0.5**3 * schedule(12))


def test_parameter_groups_get_their_own_hyper_parameters(backend):
    seen = []
    model = small_model(backend, dtype="float64")
    solver = Solver(
        model,
        small_data(),
        update_rule=spy_rule(seen),
        optim_config={"learning_rate": 0.1},
        param_groups=[{"params": lambda name: name.startswith("b"), "learning_rate": 6.4}],
        lr_schedule=lambda t: 1.0 / (t + 1),
        batch_size=100,
        num_epochs=1,
        verbose=False,
    )
    solver.train()
    names = list(model.params)
    for step in range(2):
        for name, rate in zip(names, seen[step * len(names) : (step + 1) * len(names)]):
            base = 6.4 if name.startswith("b") else 0.1
            assert rate == pytest.approx(base / (step + 1), rel=1e-15), (name, step)


def test_groups_and_schedules_train_with_every_rule_like_the_plain_rule(backend):
    """A schedule of ones gives exactly the parameters of training without one."""
    results = []
    for schedule in (None, lambda t: 1.0):
        solver = Solver(
            small_model(backend, dtype="float64"),
            small_data(),
            update_rule="adam",
            optim_config={"learning_rate": 1e-2},
            lr_schedule=schedule,
            batch_size=50,
            num_epochs=2,
            verbose=False,
            seed=1,
        )
        solver.train()
        results.append({k: to_np(v) for k, v in solver.model.params.items()})
    for name in results[0]:
        np.testing.assert_allclose(results[1][name], results[0][name], rtol=1e-12, err_msg=name)


class ParameterRecorder(Callback):
    """Keeps a host copy of one parameter after every step."""

    def __init__(self, name):
        self.name, self.values = name, []

    def on_step(self, solver):
        self.values.append(to_np(solver.model.params[self.name]).copy())


def test_a_group_with_its_own_schedule_follows_it_and_a_zero_holds_it_fixed(backend):
    seen = []
    settings = dict(
        optim_config={"learning_rate": 0.1},
        param_groups=[{"params": ["b1"], "lr_schedule": lambda t: 1.0 if t < 2 else 0.0}],
        lr_schedule=lambda t: 0.5,
        batch_size=50,  # 4 steps
        num_epochs=1,
        verbose=False,
        seed=0,
    )
    model = small_model(backend, dtype="float64")
    Solver(model, small_data(), update_rule=spy_rule(seen), **settings).train()
    names = list(model.params)
    for step in range(4):
        for name, rate in zip(names, seen[step * len(names) : (step + 1) * len(names)]):
            expected = (0.1 if step < 2 else 0.0) if name == "b1" else 0.05
            assert rate == pytest.approx(expected, abs=1e-17), (name, step)
    model = small_model(backend, dtype="float64")
    start = to_np(model.params["b1"]).copy()
    recorder = ParameterRecorder("b1")
    Solver(model, small_data(), update_rule="nesterov_sgd", callbacks=[recorder], **settings).train()
    assert not np.array_equal(recorder.values[1], start)
    np.testing.assert_array_equal(recorder.values[3], recorder.values[1])  # held where step 2 left it


@pytest.mark.parametrize("on_device", [False, True])
def test_a_gradient_of_none_leaves_its_parameter_and_its_state_alone(backend, on_device):
    """As PyTorch's optimizers skip a parameter without a gradient; a missing one is an error."""
    from xpnet.training.update import Update

    backend = xpnet.get_backend(backend)
    params = {"w": backend.asarray([1.0, 2.0], dtype="float64"), "b": backend.asarray([3.0], dtype="float64")}
    update = Update("nesterov_sgd", {"learning_rate": 0.1, "momentum": 0.9}, list(params), on_device=on_device)
    update.start(backend, "float64", 0, 3)
    for _ in range(2):
        update.apply(params, {"w": backend.asarray([1.0, 1.0], dtype="float64"), "b": None})
    assert "velocity" not in update.configs["b"] and "velocity" in update.configs["w"]
    np.testing.assert_array_equal(to_np(params["b"]), [3.0])
    assert not np.array_equal(to_np(params["w"]), [1.0, 2.0])
    with pytest.raises(KeyError, match="b"):
        update.apply(params, {"w": backend.asarray([1.0, 1.0], dtype="float64")})


@pytest.mark.parametrize(
    "groups, message",
    [
        ([{"learning_rate": 1.0}], "needs a 'params' entry"),
        ([{"params": ["W9"], "learning_rate": 1.0}], r"unknown parameters \['W9'\]"),
        ([{"params": ["W1"], "learning_rat": 1.0}], "unknown optim_config key 'learning_rat'"),
        ([{"params": ["W1"], "learning_rate": -1.0}], "learning_rate must be a finite number > 0"),
        # A string was taken as groups of its characters: "needs a 'params' entry, got ['W']".
        ("W1", "param_groups must be a list of dicts, each with a 'params' entry; got 'W1'"),
        (["W1"], "param_groups must be a list of dicts, each with a 'params' entry; got 'W1' in it"),
        (3, "param_groups must be a list of dicts, each with a 'params' entry; got 3$"),  # "'int' object is not iterable"
        # In two groups, the first won without a word (PyTorch refuses it too).
        ([{"params": ["b1"], "learning_rate": 0.1}, {"params": ["b1", "b2"], "learning_rate": 0.2}],
         r"parameter 'b1' is in param_groups 0 and 1; each parameter may be in one group"),
        ([{"params": ["W2"], "learning_rate": 0.1}, {"params": lambda name: name.startswith("W"), "learning_rate": 0.2}],
         r"parameter 'W2' is in param_groups 0 and 1"),
    ],
)  # fmt: skip
def test_bad_parameter_groups_are_refused(groups, message):
    with pytest.raises(ValueError, match=message):
        Solver(small_model("numpy"), small_data(), param_groups=groups)


def test_one_parameter_group_may_be_given_as_a_dict():
    solver = Solver(small_model("numpy"), small_data(), param_groups={"params": ["b1"], "learning_rate": 0.5},
                    update_rule="sgd", optim_config={"learning_rate": 0.01}, verbose=False)  # fmt: skip
    assert solver.optim_configs["b1"]["learning_rate"] == 0.5
    assert solver.optim_configs["W1"]["learning_rate"] == 0.01


def test_callbacks_given_as_a_string_are_refused_whole():
    with pytest.raises(ValueError, match="callbacks must be a list of xpnet.training.Callback objects, got 'abc'"):
        Solver(small_model("numpy"), small_data(), callbacks="abc")
    # the class rather than an object made from it: "'type' object is not iterable"
    with pytest.raises(
        ValueError, match=r"callbacks must be Callback objects; EarlyStopping is a class: give EarlyStopping\(...\)"
    ):
        Solver(small_model("numpy"), small_data(), callbacks=EarlyStopping)


def test_an_optim_config_that_is_no_dict_is_named():
    """The update rule itself failed as "'function' object is not iterable", a string inside dict()."""
    from xpnet.optim import adam

    for config, got in ((adam, "function; the rule itself goes in update_rule"), ("learning_rate=1e-3", "str"),
                        ([("learning_rate", 1e-3)], "list")):  # fmt: skip
        with pytest.raises(ValueError, match=rf"optim_config must be a dict of hyper-parameters, .* got {got}$"):
            Solver(small_model("numpy"), small_data(), optim_config=config)


def test_learning_rate_factor():
    assert learning_rate_factor(7, 4, 0.5) == 0.5
    assert learning_rate_factor(7, 4, 0.5, lambda t: t) == 3.5
    assert learning_rate_factor(7, 4, 0.5, lambda t: np.float32(0.5)) == 0.25


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf"), None, "0.5"])
def test_a_schedule_that_gives_no_usable_factor_is_refused_by_name(value):
    """A negative factor would climb the loss and NaN end training as a divergence."""
    with pytest.raises(ValueError, match=rf"lr_schedule\(0\) returned {re.escape(repr(value))}; it must give a finite"):
        Solver(small_model("numpy"), small_data(), verbose=False, lr_schedule=lambda t: value).train()


def test_a_parameter_group_may_name_one_parameter_as_a_string():
    solver = Solver(small_model("numpy"), small_data(), verbose=False, num_epochs=1,
                    param_groups=[{"params": "W1", "learning_rate": 0.5}])  # fmt: skip
    assert solver.update.base_lr["W1"] == 0.5
    assert solver.update.base_lr["W2"] != 0.5


# ----------------------------------------------------------------------------- samplers
class RowRecorder:
    """A model of a student's own: params and loss(X, y=None), nothing else. Its inputs are row
    numbers, so it records which rows each minibatch held."""

    def __init__(self, backend):
        self.params = {"w": backend.asarray(np.zeros(1), dtype="float64")}
        self.batches = []

    def loss(self, X, y=None):
        xp = xpnet.backend.namespace(X)
        if y is None:
            return xp.zeros((X.shape[0], 2), dtype=X.dtype, device=device(X))
        self.batches.append(sorted(int(v) for v in to_np(X[:, 0])))
        return xp.sum(self.params["w"]), {"w": xp.zeros_like(self.params["w"])}


def test_epoch_permutation_uses_each_row_once_and_drops_the_partial_batch(backend):
    rows = np.arange(10, dtype=np.float64)[:, None]
    data = {"X_train": rows, "y_train": np.zeros(10, dtype=np.int64), "X_val": rows, "y_val": np.zeros(10, np.int64)}
    model = RowRecorder(backend)
    solver = Solver(model, data, sampler="epoch", batch_size=3, num_epochs=2, verbose=False, seed=0)
    assert solver.iterations_per_epoch == 3
    solver.train()
    assert len(model.batches) == 6
    for epoch in (model.batches[:3], model.batches[3:]):
        used = [r for batch in epoch for r in batch]
        assert len(used) == len(set(used)) == 9  # no row twice; one left over
    assert model.batches[:3] != model.batches[3:]  # a new permutation each epoch
    again = RowRecorder(backend)
    Solver(again, data, sampler=EpochPermutation, batch_size=3, num_epochs=2, verbose=False, seed=0).train()
    assert again.batches == model.batches


def test_the_courses_sampler_takes_a_batch_larger_than_the_training_set(backend):
    """As the course's Solver does (rows drawn with replacement, max(N // B, 1) steps an epoch):
    10 rows at batch 16 make one step an epoch of 16 rows drawn from the 10; the 'epoch' sampler,
    which draws without replacement, refuses such a batch by name."""
    rows = np.arange(10, dtype=np.float64)[:, None]
    data = {"X_train": rows, "y_train": np.zeros(10, dtype=np.int64), "X_val": rows, "y_val": np.zeros(10, np.int64)}
    model = RowRecorder(backend)
    solver = Solver(model, data, batch_size=16, num_epochs=2, verbose=False, seed=0)
    assert solver.iterations_per_epoch == 1
    solver.train()
    assert len(model.batches) == 2
    assert all(len(batch) == 16 and set(batch) <= set(range(10)) for batch in model.batches)
    message = r"batch_size=16 is larger than the training set \(10 rows\), and the 'epoch' sampler draws each batch"
    with pytest.raises(ValueError, match=message):
        Solver(RowRecorder(backend), data, sampler="epoch", batch_size=16)


def test_epoch_permutation_writes_each_epoch_into_the_same_arrays(backend):
    sampler = EpochPermutation(10, 3)
    orders, arrays = [], []
    for epoch in range(3):
        sampler.start_epoch(backend.rng((0, epoch)))
        arrays.append((sampler._order, sampler._start))
        order = np.concatenate([to_np(sampler.indices(backend.rng(0))) for _ in range(3)])
        assert len(set(order.tolist())) == 9 and set(order.tolist()) <= set(range(10))
        orders.append(order)
    assert all(a[0] is arrays[0][0] and a[1] is arrays[0][1] for a in arrays)  # a captured step keeps reading them
    assert not np.array_equal(orders[0], orders[1])


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="unknown sampler 'shuffle'"):
        Solver(small_model("numpy"), small_data(), sampler="shuffle")
    with pytest.raises(ValueError, match=r"unknown sampler \['epoch'\]; use one of"):  # "unhashable type: 'list'"
        Solver(small_model("numpy"), small_data(), sampler=["epoch"])


# ----------------------------------------------------------------------------- early stopping
def test_on_log_returning_false_stops_at_that_point_and_restores_the_best(backend):
    records = []

    def stop_after_first_epoch(record):
        records.append(record)
        return record.get("epoch") != 1

    solver = Solver(
        small_model(backend),
        small_data(),
        update_rule="adam",
        batch_size=20,
        num_epochs=10,
        print_every=3,
        on_log=stop_after_first_epoch,
        verbose=False,
        seed=0,
    )
    solver.train()
    assert solver.iteration == 10 and solver.epoch == 1
    assert records[-1]["iteration"] == 10 and "val_acc" in records[-1]
    assert solver.check_accuracy(solver.X_val, solver.y_val) == solver.best_val_acc
    assert all(isinstance(v, float) for v in solver.loss_history)


def test_on_log_returning_numpys_false_stops_and_an_answer_of_another_kind_is_named():
    """``on_log=lambda r: np.isfinite(r['loss'])`` returns np.False_, which a test of ``is False``
    let go on in silence; a list or a string was taken as "go on" too."""
    stops = []

    def finite(record):
        stops.append(record["iteration"])
        return np.isfinite(record.get("loss", 0.0)) & (record["iteration"] < 3)

    solver = Solver(small_model("numpy"), small_data(), batch_size=20, num_epochs=2, print_every=1,
                    on_log=finite, verbose=False, seed=0)  # fmt: skip
    solver.train()
    assert stops[-1] == 3 and solver.iteration == 3  # stopped at the first logging point that said no

    def says_no(record):
        return "no"

    solver = Solver(small_model("numpy"), small_data(), batch_size=20, num_epochs=1, on_log=says_no, verbose=False)
    with pytest.raises(TypeError, match=r"^on_log of says_no must return None, True or False .*got str$"):
        solver.train()


def test_stop_ends_training_at_the_next_logging_point():
    class StopAtEpoch2(Callback):
        def on_epoch_end(self, solver):
            if solver.epoch == 2:
                solver.stop()

    solver = Solver(
        small_model("numpy"), small_data(), batch_size=20, num_epochs=10, callbacks=[StopAtEpoch2()], verbose=False
    )
    solver.train()
    assert solver.epoch == 2 and solver.iteration == 20


def test_early_stopping_waits_for_patience_checks():
    stopper = EarlyStopping(patience=2)
    solver = Solver(
        small_model("numpy"),
        small_data(),
        optim_config={"learning_rate": 1e-12},  # nothing improves
        batch_size=20,
        num_epochs=10,
        callbacks=[stopper],
        verbose=False,
        seed=0,
    )
    solver.train()
    # checks at iteration 1 and after epochs 1, 2: the best is the first; two without improvement stop it
    assert len(solver.val_acc_history) == 3 and solver.epoch == 2
    for patience in (0, 2.5):
        with pytest.raises(ValueError, match=f"patience must be an integer of at least 1, got {patience}"):
            EarlyStopping(patience=patience)
    with pytest.raises(ValueError, match="min_delta must be a finite number >= 0, got -0.1"):
        EarlyStopping(min_delta=-0.1)
    assert EarlyStopping(patience=np.int64(2)).patience == 2
    # One callback given as itself, not in a list, is one callback (it raised "not iterable").
    alone = EarlyStopping(patience=2)
    solver = Solver(small_model("numpy"), small_data(), optim_config={"learning_rate": 1e-12}, batch_size=20,
                    num_epochs=10, callbacks=alone, verbose=False, seed=0)  # fmt: skip
    solver.train()
    assert solver.epoch == 2


def test_one_early_stopping_serves_several_solvers():
    """It kept the first run's best: a second Solver (a search loop's next trial) that did not beat
    it stopped at its first checks, after 0 epochs here."""
    stopper = EarlyStopping(patience=2)
    runs = []
    for learning_rate in (1e-1, 1e-4):  # the first reaches 100% validation accuracy, the second far less
        solver = Solver(small_model("numpy"), small_data(), update_rule="adam", optim_config={"learning_rate": learning_rate},
                        batch_size=20, num_epochs=8, callbacks=[stopper], verbose=False, seed=0)  # fmt: skip
        solver.train()
        runs.append(solver)
    assert runs[0].best_val_acc == 1.0 and runs[1].best_val_acc < 0.9
    alone = Solver(small_model("numpy"), small_data(), update_rule="adam", optim_config={"learning_rate": 1e-4},
                   batch_size=20, num_epochs=8, callbacks=[EarlyStopping(patience=2)], verbose=False, seed=0)  # fmt: skip
    alone.train()
    assert runs[1].epoch == alone.epoch > 0 and runs[1].val_acc_history == alone.val_acc_history


def test_callbacks_and_on_log_that_the_solver_cannot_call_are_refused_up_front():
    with pytest.raises(ValueError, match=r"callbacks must be xpnet.training.Callback objects .*got <function"):
        Solver(small_model("numpy"), small_data(), callbacks=[lambda solver: None])
    with pytest.raises(ValueError, match=r"callbacks must be a list of xpnet.training.Callback objects, got 3$"):
        Solver(small_model("numpy"), small_data(), callbacks=3)  # "'int' object is not iterable"
    Solver(small_model("numpy"), small_data(), callbacks=None).train()  # None is none (it raised "not iterable")
    with pytest.raises(ValueError, match="on_log must be a function of the logged record, got 'print'"):
        Solver(small_model("numpy"), small_data(), on_log="print")


# ----------------------------------------------------------------------------- generators and any model
def test_a_graph_run_captures_the_step_again_when_the_model_changes_what_it_computes(monkeypatch):
    """A CUDA graph freezes Python numbers such as the regularisation strength: replacing one
    within an epoch must capture the step again, or the old value would go on being used. A
    stand-in capture that replays by running the step checks the keying on the CPU by the
    number of captures (the stand-in runs the Python again on each replay, so it cannot go
    stale itself)."""
    from xpnet.backend.numpy_backend import NumpyBackend

    class Replayed:
        def __init__(self, step):
            self.replay = step

    class StrongerRegularisation(Callback):
        def on_step(self, solver):
            if solver.iteration == 6:  # within the second epoch of 4 steps
                solver.model.reg = 0.5

    def train(cuda_graph):
        model = small_model("numpy", dtype="float64")
        solver = Solver(model, small_data(), update_rule="sgd", optim_config={"learning_rate": 0.1}, batch_size=50,
                        num_epochs=3, verbose=False, seed=0, cuda_graph=cuda_graph,
                        callbacks=[StrongerRegularisation()])  # fmt: skip
        solver.train()
        return solver, model

    monkeypatch.setattr(NumpyBackend, "can_capture", True)
    monkeypatch.setattr(NumpyBackend, "capture", lambda self, step: Replayed(step))
    graphed, graphed_model = train(True)
    _, eager_model = train(False)
    assert graphed_model.graph_key[0] == 0.5
    assert graphed.graph.captures == 4  # each epoch's generators, and the change
    for name, value in eager_model.params.items():
        np.testing.assert_array_equal(to_np(graphed_model.params[name]), to_np(value), err_msg=name)


def test_seeded_training_leaves_the_shared_generator_alone_and_repeats_exactly(backend):
    backend.seed(5)
    expected = to_np(backend.default_rng().uniform((4,)))
    backend.seed(5)
    runs = []
    for _ in range(2):
        model = small_model(backend, dropout=0.3, seed=None, rng=backend.rng(0))
        Solver(model, small_data(), update_rule="adam", batch_size=20, num_epochs=2, verbose=False, seed=3).train()
        runs.append(to_np(model.params["W1"]))
    np.testing.assert_array_equal(to_np(backend.default_rng().uniform((4,))), expected)
    np.testing.assert_array_equal(runs[0], runs[1])


def test_dropout_masks_differ_between_epochs_but_not_between_runs():
    model = small_model("numpy", dropout=0.5, seed=None, rng=xpnet.get_backend("numpy").rng(0))
    solver = Solver(model, small_data(), batch_size=200, num_epochs=1, verbose=False, seed=0)
    solver._start_epoch(0)
    first = model.rng.uniform((3,))
    solver._start_epoch(1)
    second = model.rng.uniform((3,))
    solver._start_epoch(0)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(model.rng.uniform((3,)), first)


class SoftmaxRegression:
    """A student's own model: just params and loss, as the course asks."""

    def __init__(self, backend, dim=6, classes=3):
        self.params = {"W": backend.asarray(np.zeros((dim, classes)), dtype="float32")}

    def loss(self, X, y=None):
        from xpnet.layers import softmax_loss

        scores = X @ self.params["W"]
        if y is None:
            return scores
        loss, dscores = softmax_loss(scores, y)
        return loss, {"W": X.T @ dscores}


@pytest.mark.parametrize("spec", ["numpy", "array_api_strict:device1"])
def test_a_model_of_ones_own_trains_checkpoints_and_resumes(tmp_path, spec):
    backend = xpnet.get_backend(spec)
    options = dict(
        update_rule="sgd_momentum", optim_config={"learning_rate": 0.1}, batch_size=20, verbose=False, seed=0
    )
    full = Solver(
        SoftmaxRegression(backend), small_data(), num_epochs=4, checkpoint_name=str(tmp_path / "m"), **options
    )
    full.train()
    assert full.best_val_acc > 0.9
    assert full.X_train.dtype == backend.xp.float32  # inputs took the parameters' dtype and device
    resumed = Solver(SoftmaxRegression(backend), small_data(), num_epochs=4, **options)
    resumed.resume(tmp_path / "m_epoch_2.npz")
    resumed.train()
    np.testing.assert_array_equal(to_np(resumed.model.params["W"]), to_np(full.model.params["W"]))
