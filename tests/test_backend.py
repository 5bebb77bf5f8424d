import importlib.util
import os
import re
import sys
import threading

import numpy as np
import pytest
from helpers import assert_the_recipes_draws_are_fair

import xpnet
from xpnet.backend import backend_of, current_backend, get_backend, set_backend, using_backend
from xpnet.backend import registry as backend_module


def test_numpy_backend_has_namespace_device_and_name():
    b = get_backend("numpy")
    assert b.name == "numpy"
    assert b.device == "cpu"
    assert b.xp.__name__.endswith("numpy")
    assert get_backend(b) is b


def test_strict_device1_arrays_live_on_device1():
    import array_api_strict as strict

    b = get_backend("array_api_strict:device1")
    x = b.asarray([1.0, 2.0])
    assert x.device == strict.Device("device1")
    assert backend_of(x) is b


def test_spec_aliases_share_one_backend():
    assert get_backend("array-api-strict") is get_backend("array_api_strict")
    assert get_backend("NumPy") is get_backend("numpy")


def test_unknown_spec_names_it_and_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        get_backend("tensorflow")
    message = str(info.value)
    assert "tensorflow" in message
    for valid in ("numpy", "cupy", "torch", "array_api_strict"):
        assert valid in message


def test_bad_strict_device_is_rejected():
    with pytest.raises(ValueError, match="device7"):
        get_backend("array_api_strict:device7")


def test_a_malformed_device_is_named_whatever_is_installed(monkeypatch):
    """'cupy:abc' said to install CuPy (and, with CuPy, named the index only then); 'torch:cudax'
    was taken as cuda:0."""
    monkeypatch.setitem(sys.modules, "cupy", None)  # no CuPy: the spec is still wrong first
    monkeypatch.setattr(backend_module, "_CACHE", {})
    with pytest.raises(ValueError, match="invalid device index 'abc' in backend spec 'cupy:abc'"):
        get_backend("cupy:abc")
    # the dashes of 'array-api-strict' are the library's name only: 'cupy:-1' was shown as 'cupy:_1'
    with pytest.raises(ValueError, match="invalid device index '-1' in backend spec 'cupy:-1'"):
        get_backend("cupy:-1")
    assert get_backend("Array-API-Strict:device1") is get_backend("array_api_strict:device1")
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match="invalid device index 'x' in backend spec 'torch:cuda:x'"):
        get_backend("torch:cuda:x")
    with pytest.raises(ValueError, match="unknown torch device 'cudax'"):
        get_backend("torch:cudax")


def test_spec_must_be_string_or_backend():
    with pytest.raises(TypeError, match="spec string or a Backend"):
        get_backend(3)


def test_missing_cupy_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` fail
    monkeypatch.setattr(backend_module, "_CACHE", {})
    with pytest.raises(ImportError) as info:
        get_backend("cupy")
    assert 'pip install "xpnet[cuda12]"' in str(info.value)
    assert "CuPy is not installed" in str(info.value)


def test_missing_torch_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setattr(backend_module, "_CACHE", {})
    with pytest.raises(ImportError, match="pip install torch"):
        get_backend("torch")


def test_cupy_without_gpu_says_so(monkeypatch):
    class FakeRuntime:
        @staticmethod
        def getDeviceCount():
            return 0

    class FakeCuda:
        runtime = FakeRuntime

    class FakeCupy:
        cuda = FakeCuda

    monkeypatch.setitem(sys.modules, "cupy", FakeCupy)
    monkeypatch.setattr(backend_module, "_CACHE", {})
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible"):
        get_backend("cupy")


def test_import_xpnet_without_cupy(tmp_path):
    import subprocess

    code = "import sys; sys.modules['cupy'] = None; import xpnet; print(xpnet.get_backend().name)"
    env = {"PATH": "", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "numpy"


def test_default_comes_from_environment(monkeypatch):
    monkeypatch.setattr(backend_module, "_PROCESS_DEFAULT", [None])
    monkeypatch.setenv("XPNET_BACKEND", "array_api_strict")
    assert current_backend().name == "array_api_strict"
    monkeypatch.delenv("XPNET_BACKEND")
    assert current_backend().name == "numpy"


def test_a_bad_backend_in_the_environment_is_named_as_the_environments(monkeypatch):
    """Set long ago in a shell's profile, it was reported as if the caller had asked for it."""
    monkeypatch.setattr(backend_module, "_PROCESS_DEFAULT", [None])
    monkeypatch.setenv("XPNET_BACKEND", "nmupy")
    with pytest.raises(ValueError, match=r"^XPNET_BACKEND='nmupy' in the environment: unknown backend 'nmupy'"):
        current_backend()
    with pytest.raises(ValueError, match=r"^XPNET_BACKEND='nmupy' in the environment"):
        xpnet.FullyConnectedNet([3], input_dim=2, num_classes=2)
    assert xpnet.FullyConnectedNet([3], input_dim=2, num_classes=2, backend="numpy").backend.name == "numpy"


def test_set_backend_changes_process_default(monkeypatch):
    monkeypatch.setattr(backend_module, "_PROCESS_DEFAULT", [None])
    set_backend("array_api_strict")
    assert current_backend().name == "array_api_strict"
    assert xpnet.FullyConnectedNet([3], input_dim=2, num_classes=2).backend.name == "array_api_strict"


def test_using_backend_is_scoped_to_block_and_thread(monkeypatch):
    monkeypatch.setattr(backend_module, "_PROCESS_DEFAULT", [None])
    monkeypatch.delenv("XPNET_BACKEND", raising=False)
    seen_in_thread = []
    with using_backend("array_api_strict:device1") as b:
        assert b.name == "array_api_strict:device1"
        assert current_backend() is b
        thread = threading.Thread(target=lambda: seen_in_thread.append(current_backend().name))
        thread.start()
        thread.join()
    assert seen_in_thread == ["numpy"]
    assert current_backend().name == "numpy"


def test_asarray_and_to_numpy_round_trip(backend):
    host = np.arange(6, dtype=np.float64).reshape(2, 3)
    x = backend.asarray(host, dtype="float32")
    assert backend_of(x) == backend
    assert x.dtype == backend.xp.float32
    back = backend.to_numpy(x)
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, host.astype(np.float32))


def test_every_backend_takes_the_arrays_of_every_other(backend):
    """NumPy refused array-api-strict's device1 arrays with strict's RuntimeError ("Can't
    convert array on the device1 device to a NumPy array"), as it refuses CuPy's and PyTorch's
    CUDA arrays: a Solver on NumPy given such data failed in that library's words. They now
    come through the host."""
    host = np.arange(6.0).reshape(2, 3)
    torch = ["torch:cpu"] if importlib.util.find_spec("torch") else []
    for spec in ("numpy", "array_api_strict", "array_api_strict:device1", *torch, backend.name):
        moved = backend.asarray(get_backend(spec).asarray(host), dtype="float32")
        assert backend.owns(moved), spec
        np.testing.assert_array_equal(backend.to_numpy(moved), host.astype(np.float32), err_msg=spec)


def test_to_numpy_is_a_copy_on_every_backend(backend):
    """It shared the array's memory on NumPy, PyTorch's CPU and array-api-strict's default
    device (not on device1 or a GPU): a state_dict() taken as a snapshot changed with the
    next in-place update there, and writing into a host copy wrote into the model."""
    from xpnet import optim
    from xpnet.backend import to_numpy

    x = backend.asarray(np.zeros(3), dtype="float64")
    for copy in (backend.to_numpy(x), to_numpy(x)):
        copy[0] = 5.0
    np.testing.assert_array_equal(backend.to_numpy(x), np.zeros(3))
    model = xpnet.FullyConnectedNet([5], input_dim=4, num_classes=3, dtype="float64", seed=0, backend=backend)
    snapshot = model.state_dict()
    before = snapshot["params"]["W1"].copy()
    optim.sgd(model.params["W1"], backend.asarray(np.ones((4, 5)), dtype="float64"), {"learning_rate": 1.0})
    np.testing.assert_array_equal(snapshot["params"]["W1"], before)
    host = np.zeros(2)
    assert to_numpy(host) is not host


def test_host_data_in_any_numpy_layout_reaches_every_backend(backend, np_rng):
    """A flip (``X[:, :, ::-1]``, negative strides) and big-endian data read from a file are
    arrays PyTorch refuses to take from NumPy as they are; every backend takes them, with their
    values, and a model trains on them."""
    from xpnet.solver import Solver

    host = np_rng.standard_normal((20, 3, 4, 4)).astype(np.float32)
    for layout in (host[:, :, ::-1], host[::-2], host.astype(">f4"), np.asarray(host[0, 0, 0, 0], dtype=">f8")):
        moved = backend.asarray(layout)
        assert tuple(moved.shape) == layout.shape
        np.testing.assert_array_equal(backend.to_numpy(moved), layout)
    labels = np_rng.integers(0, 3, 20)
    data = dict(X_train=host[:16, :, :, ::-1], y_train=labels[:16][::-1], X_val=host[16:].astype(">f4"),
                y_val=labels[16:].astype(">i8"))  # fmt: skip
    model = xpnet.FullyConnectedNet([5], input_dim=48, num_classes=3, seed=0, backend=backend)
    solver = Solver(model, data, num_epochs=1, batch_size=4, seed=0, verbose=False)
    solver.train()
    assert len(solver.loss_history) == 4 and np.isfinite(solver.loss_history).all()


@pytest.mark.parametrize(
    "data, words",
    [
        ("abc", "got a str of text"),
        (np.array(["a", "b"]), "got a ndarray of text"),
        ([1, "x"], "got a list of text"),
        (None, "got a NoneType of Python objects"),
        ({"a": 1}, "got a dict of Python objects"),
        (np.array(["2026-01-01"], dtype="datetime64[D]"), "got a ndarray of dates"),
    ],
)
def test_data_that_holds_no_numbers_is_refused_alike_on_every_backend(backend, data, words):
    """NumPy's backend made string and object arrays of these, which failed later, far away;
    array-api-strict said 'res_dtype = array_api_strict.str96 not understood', PyTorch 'Could not
    infer dtype of dict'."""
    with pytest.raises(TypeError, match=re.escape(f"{backend.name} backend: arrays hold numbers or booleans, {words}")):
        backend.asarray(data)


def test_a_ragged_list_is_refused_naming_the_backend(backend):
    with pytest.raises(ValueError, match=re.escape(f"{backend.name} backend: cannot make an array of this list: ")):
        backend.asarray([[1.0, 2.0], [3.0]])
    assert backend.to_numpy(backend.asarray([[True], [False]])).tolist() == [[True], [False]]


def test_dtype_accepts_strings_numpy_dtypes_and_namespace_dtypes(backend):
    xp = backend.xp
    for spec in ("float32", np.float32, np.dtype("float32"), xp.float32):
        assert backend.dtype(spec) == xp.float32
    with pytest.raises(ValueError, match="unsupported dtype"):
        backend.dtype("floaty")


def test_rng_draws_on_device_with_requested_shapes_and_dtypes(backend):
    rng = backend.rng(0)
    xp = backend.xp
    ints = rng.integers(3, 9, 1000)
    assert backend_of(ints) == backend
    assert tuple(ints.shape) == (1000,)
    ints_np = backend.to_numpy(ints)
    assert ints_np.min() >= 3 and ints_np.max() < 9
    assert set(np.unique(ints_np)) == set(range(3, 9))
    normal = rng.normal((200, 50), std=2.0, dtype=xp.float32)
    assert normal.dtype == xp.float32 and tuple(normal.shape) == (200, 50)
    normal_np = backend.to_numpy(normal)
    assert abs(normal_np.mean()) < 0.05
    assert abs(normal_np.std() - 2.0) < 0.05
    uniform = backend.to_numpy(rng.uniform((10000,), dtype=xp.float64))
    assert uniform.min() >= 0.0 and uniform.max() < 1.0
    assert abs(uniform.mean() - 0.5) < 0.02
    perm = backend.to_numpy(rng.permutation(50))
    assert sorted(perm.tolist()) == list(range(50))


def test_rng_draws_default_to_float64_and_scale_by_std_without_a_dtype(backend):
    """normal(shape, std=2.0) without a dtype failed on NumPy's generator ('numpy.float64' has no
    attribute 'type'): the default dtype was a scalar type where a dtype was needed."""
    scaled, unit = backend.rng(7).normal((300,), std=3.0), backend.rng(7).normal((300,))
    assert scaled.dtype == backend.xp.float64 and backend.rng(7).uniform((4,)).dtype == backend.xp.float64
    np.testing.assert_allclose(backend.to_numpy(scaled), 3.0 * backend.to_numpy(unit), rtol=1e-15)


def test_the_recipes_draws_are_fair(backend):
    assert_the_recipes_draws_are_fair(backend)


def test_rng_seeds_reproduce_and_differ(backend):
    a = backend.to_numpy(backend.rng(7).uniform((20,)))
    b = backend.to_numpy(backend.rng(7).uniform((20,)))
    c = backend.to_numpy(backend.rng((7, 1)).uniform((20,)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("seed", [-1, 1.5, "a", (), (1, -2), True])
def test_a_seed_no_generator_can_take_is_refused_naming_the_call(backend, seed):
    """NumPy's SeedSequence said 'expected non-negative integer' or 'SeedSequence expects int',
    naming neither the call nor what it takes; PyTorch's and CuPy's generators, other things."""
    message = "seed must be None, a non-negative integer or a sequence of them, got " + re.escape(repr(seed))
    with pytest.raises(ValueError, match="Backend.rng: " + message):
        backend.rng(seed)
    with pytest.raises(ValueError, match="Backend.seed: " + message):
        backend.seed(seed)
    for good in (0, np.int64(3), (1, np.uint32(2)), [3, 4], 2**70):
        backend.rng(good).uniform((2,))


BAD_DRAWS = [
    (lambda r: r.integers(5, 2, 3), ValueError, "integers: need low < high"),
    (lambda r: r.integers(0, 2**63, 3), ValueError, "integers: need low < high, both within int64"),
    (lambda r: r.integers(0.5, 3, 2), TypeError, "integers: low and high must be integers"),
    (lambda r: r.integers(0, 5, -1), ValueError, "integers: the shape must be an integer >= 0"),
    (lambda r: r.integers(0, 5, None), ValueError, "integers: the shape must be"),
    (lambda r: r.normal((2, -1)), ValueError, "normal: the shape must be an integer >= 0 or a tuple"),
    (lambda r: r.normal((2, 2), std=-1.0), ValueError, "normal: std must be a finite number >= 0, got -1.0"),
    (lambda r: r.normal((2, 2), std=float("nan")), ValueError, "normal: std must be a finite number"),
    (lambda r: r.normal((2,), dtype="int64"), ValueError, "normal: dtype must be float32 or float64"),
    (lambda r: r.uniform((2, 1.5)), ValueError, "uniform: the shape must be"),
    (lambda r: r.uniform(3, dtype="float16"), ValueError, "uniform: dtype must be float32 or float64"),
    (lambda r: r.permutation(-1), ValueError, "permutation: n must be an integer >= 0, got -1"),
    (lambda r: r.permutation(2.5), ValueError, "permutation: n must be an integer >= 0"),
]


@pytest.mark.parametrize(
    "call, error, words", BAD_DRAWS, ids=[f"{words.split(':')[0]}-{i}" for i, (_, _, words) in enumerate(BAD_DRAWS)]
)
def test_every_generator_refuses_the_same_bad_draws_in_the_same_words(backend, call, error, words):
    """Each library said something of its own, or nothing: NumPy permuted range(-1) to an empty
    array where PyTorch raised, NumPy took low=0.5 and std=-1, PyTorch a NaN std, and the
    messages named NumPy's or PyTorch's internals ('random_ expects from < to', 'Overflow when
    unpacking long long', 'axis 0 is out of bounds')."""
    for rng in (backend.rng(0), backend.default_rng()):
        with pytest.raises(error, match="DeviceRNG." + re.escape(words)):
            call(rng)


def test_generators_take_numpy_integers_lists_and_empty_shapes(backend):
    rng = backend.rng(0)
    assert tuple(rng.integers(np.int64(-3), np.int32(4), [2, np.int64(3)]).shape) == (2, 3)
    assert tuple(rng.normal((0, 4), std=np.float32(0.0)).shape) == (0, 4)
    assert tuple(rng.uniform(()).shape) == () and tuple(rng.permutation(np.int64(0)).shape) == (0,)


def test_backend_seed_resets_default_generator(backend):
    backend.seed(3)
    a = backend.to_numpy(backend.default_rng().uniform((5,)))
    backend.seed(3)
    b = backend.to_numpy(backend.default_rng().uniform((5,)))
    np.testing.assert_array_equal(a, b)


def test_to_floats_transfers_scalars(backend):
    xp = backend.xp
    values = [xp.sum(backend.asarray([1.0, 2.0])), xp.mean(backend.asarray([3.0, 5.0]))]
    assert backend.to_floats(values) == [3.0, 4.0]
    assert backend.to_floats([]) == []


def test_a_new_backend_is_one_module_and_one_registration(monkeypatch):
    import importlib

    from helpers import small_data, small_model

    from xpnet.solver import Solver

    monkeypatch.setattr(backend_module, "_REGISTRY", dict(backend_module._REGISTRY))
    monkeypatch.setattr(backend_module, "_CACHE", {})
    import toy_backend

    importlib.reload(toy_backend)  # registers "toy" in this test's copy of the table
    toy = get_backend("toy")
    assert toy.name == "toy" and "toy" in str(backend_module.valid_specs())
    model = small_model(toy)
    assert backend_of(model.params["W1"]) is toy
    options = dict(update_rule="adam", optim_config={"learning_rate": 1e-2}, batch_size=50, num_epochs=10)
    solver = Solver(model, small_data(), verbose=False, seed=0, **options)
    solver.train()
    assert solver.best_val_acc > 0.8
    assert backend_of(model.params["W1"]) is toy

    monkeypatch.setitem(sys.modules, "array_api_strict", None)
    monkeypatch.setattr(backend_module, "_CACHE", {})
    with pytest.raises(ImportError, match="pip install toy"):
        get_backend("toy")


@pytest.mark.parametrize("method", ["set_tf32", "set_cudnn", "set_conv_autotune"])
def test_backend_switches_take_true_or_false(backend, method):
    """A string is truthy: set_tf32("False") switched TF32 on on CuPy, and elsewhere was
    refused as if True had been asked for."""
    with pytest.raises(ValueError, match=f"^{method}: enabled must be True or False, got 'False'$"):
        getattr(backend, method)("False")
    getattr(backend, method)(False)
    getattr(backend, method)(0)


def test_only_numpys_arrays_are_known_to_live_on_one_device(backend):
    """The layers compare the devices of their arrays except where the library has one device:
    reading NumPy's ``.device`` cost about 0.3 µs an array on every layer call."""
    from xpnet.backend.dispatch import on_one_device

    x = backend.asarray(np.ones(2))
    assert on_one_device(x) is (backend.lib is np)
    assert on_one_device(np.ma.masked_array([1.0])) and not on_one_device([1.0])
