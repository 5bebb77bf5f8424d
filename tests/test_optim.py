"""Update rules against independent out-of-place NumPy computations."""

import importlib.util

import numpy as np
import pytest
from helpers import to_np

from xpnet import cache_blocks, optim


def reference_steps(rule, w, grads, config):
    """The textbook formulas, written out of place in NumPy."""
    w = w.copy()
    lr = config.get("learning_rate", 1e-3 if rule == "adam" else 1e-2)
    mu = config.get("momentum", 0.9)
    v = np.zeros_like(w)
    m = np.zeros_like(w)
    cache = np.zeros_like(w)
    for t, dw in enumerate(grads, start=1):
        if rule == "sgd":
            w = w - lr * dw
        elif rule == "sgd_momentum":
            v = mu * v - lr * dw
            w = w + v
        elif rule == "sgd_nesterov_momentum":
            v_old = v
            v = mu * v - lr * dw
            w = w + v + mu * (v - v_old)
        elif rule == "rmsprop":
            decay, eps = config.get("decay_rate", 0.99), config.get("epsilon", 1e-8)
            cache = decay * cache + (1 - decay) * dw**2
            w = w - lr * dw / (np.sqrt(cache) + eps)
        elif rule == "nesterov_sgd":  # PyTorch's SGD(nesterov=True, weight_decay=wd)
            g = dw + config.get("weight_decay", 0.0) * w
            v = mu * v + g
            w = w - lr * (g + mu * v)
        elif rule == "adam":
            b1, b2, eps = config.get("beta1", 0.9), config.get("beta2", 0.999), config.get("epsilon", 1e-8)
            m = b1 * m + (1 - b1) * dw
            cache = b2 * cache + (1 - b2) * dw**2
            w = w - lr * (m / (1 - b1**t)) / (np.sqrt(cache / (1 - b2**t)) + eps)
    return w


RULES = ["sgd", "sgd_momentum", "sgd_nesterov_momentum", "nesterov_sgd", "rmsprop", "adam"]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("config", [{}, {"learning_rate": 0.05, "momentum": 0.5, "decay_rate": 0.9, "beta1": 0.8}])
def test_update_rules_match_reference(backend, np_rng, rule, config):
    config = {k: v for k, v in config.items() if k in optim.CONFIG_KEYS[rule][0]}
    if rule == "nesterov_sgd" and config:
        config["weight_decay"] = 0.3
    w0 = np.linspace(-0.4, 0.6, 20).reshape(4, 5)
    grads = [np_rng.standard_normal((4, 5)) for _ in range(4)]
    w = backend.asarray(w0, dtype="float64", copy=True)  # the rules update w in place
    cfg = dict(config)
    for dw in grads:
        w, cfg = getattr(optim, rule)(w, backend.asarray(dw, dtype="float64"), cfg)
    np.testing.assert_allclose(to_np(w), reference_steps(rule, w0, grads, config), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "rule, defaults",
    [
        ("sgd", {"learning_rate": 1e-2}),
        ("sgd_momentum", {"learning_rate": 1e-2, "momentum": 0.9}),
        ("sgd_nesterov_momentum", {"learning_rate": 1e-2, "momentum": 0.9}),
        ("rmsprop", {"learning_rate": 1e-2, "decay_rate": 0.99, "epsilon": 1e-8}),
        ("adam", {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}),
        ("nesterov_sgd", {"learning_rate": 1e-2, "momentum": 0.9, "weight_decay": 0.0}),
    ],
)
def test_defaults_and_state_keys(backend, rule, defaults):
    w = backend.asarray(np.ones((2, 3)), dtype="float64")
    _, config = getattr(optim, rule)(w, backend.asarray(np.ones((2, 3)), dtype="float64"))
    for key, value in defaults.items():
        assert config[key] == value
    state = {
        "sgd": [],
        "sgd_momentum": ["velocity"],
        "sgd_nesterov_momentum": ["velocity"],
        "nesterov_sgd": ["velocity"],
        "rmsprop": ["cache"],
        "adam": ["m", "v"],
    }[rule]
    for key in state:
        assert tuple(config[key].shape) == (2, 3)
    if rule == "adam":
        assert int(config["t"]) == 1  # a Python int; a 0-d device array on CuPy


def test_adam_step_count_is_incremented_before_bias_correction(backend):
    # With t incremented first, the first Adam step moves every weight by ~lr * sign(dw).
    w = backend.asarray(np.zeros(4), dtype="float64")
    dw = backend.asarray(np.array([3.0, -0.5, 1e-3, -20.0]), dtype="float64")
    w, _ = optim.adam(w, dw, {"learning_rate": 0.1})
    np.testing.assert_allclose(to_np(w), [-0.1, 0.1, -0.1, 0.1], rtol=1e-4)


def test_updates_are_in_place(backend):
    w = backend.asarray(np.ones(3), dtype="float64")
    next_w, _ = optim.sgd_momentum(w, backend.asarray(np.ones(3), dtype="float64"))
    assert next_w is w


# The FullyConnectedNets notebook's checks: its inputs and the values it prints (8 digits).
_N, _D = 4, 5
_COURSE_W = np.linspace(-0.4, 0.6, num=_N * _D).reshape(_N, _D)
_COURSE_DW = np.linspace(-0.6, 0.4, num=_N * _D).reshape(_N, _D)
_COURSE_CHECKS = {
    "sgd_momentum": (
        {"learning_rate": 1e-3, "velocity": np.linspace(0.6, 0.9, num=_N * _D).reshape(_N, _D)},
        [[0.1406, 0.20738947, 0.27417895, 0.34096842, 0.40775789],
         [0.47454737, 0.54133684, 0.60812632, 0.67491579, 0.74170526],
         [0.80849474, 0.87528421, 0.94207368, 1.00886316, 1.07565263],
         [1.14244211, 1.20923158, 1.27602105, 1.34281053, 1.40960000]],
        {"velocity": [[0.5406, 0.55475789, 0.56891579, 0.58307368, 0.59723158],
                      [0.61138947, 0.62554737, 0.63970526, 0.65386316, 0.66802105],
                      [0.68217895, 0.69633684, 0.71049474, 0.72465263, 0.73881053],
                      [0.75296842, 0.76712632, 0.78128421, 0.79544211, 0.80960000]]},
    ),
    "rmsprop": (
        {"learning_rate": 1e-2, "cache": np.linspace(0.6, 0.9, num=_N * _D).reshape(_N, _D)},
        [[-0.39223849, -0.34037513, -0.28849239, -0.23659121, -0.18467247],
         [-0.132737, -0.08078555, -0.02881884, 0.02316247, 0.07515774],
         [0.12716641, 0.17918792, 0.23122175, 0.28326742, 0.33532447],
         [0.38739248, 0.43947102, 0.49155973, 0.54365823, 0.59576619]],
        {"cache": [[0.5976, 0.6126277, 0.6277108, 0.64284931, 0.65804321],
                   [0.67329252, 0.68859723, 0.70395734, 0.71937285, 0.73484377],
                   [0.75037008, 0.7659518, 0.78158892, 0.79728144, 0.81302936],
                   [0.82883269, 0.84469141, 0.86060554, 0.87657507, 0.8926]]},
    ),
    "adam": (
        {"learning_rate": 1e-2, "t": 5, "m": np.linspace(0.6, 0.9, num=_N * _D).reshape(_N, _D),
         "v": np.linspace(0.7, 0.5, num=_N * _D).reshape(_N, _D)},
        [[-0.40094747, -0.34836187, -0.29577703, -0.24319299, -0.19060977],
         [-0.1380274, -0.08544591, -0.03286534, 0.01971428, 0.0722929],
         [0.1248705, 0.17744702, 0.23002243, 0.28259667, 0.33516969],
         [0.38774145, 0.44031188, 0.49288093, 0.54544852, 0.59801459]],
        {"v": [[0.69966, 0.68908382, 0.67851319, 0.66794809, 0.65738853],
               [0.64683452, 0.63628604, 0.6257431, 0.61520571, 0.60467385],
               [0.59414753, 0.58362676, 0.57311152, 0.56260183, 0.55209767],
               [0.54159906, 0.53110598, 0.52061845, 0.51013645, 0.49966]],
         "m": [[0.48, 0.49947368, 0.51894737, 0.53842105, 0.55789474],
               [0.57736842, 0.59684211, 0.61631579, 0.63578947, 0.65526316],
               [0.67473684, 0.69421053, 0.71368421, 0.73315789, 0.75263158],
               [0.77210526, 0.79157895, 0.81105263, 0.83052632, 0.85]]},
    ),
}  # fmt: skip


@pytest.mark.parametrize("rule", sorted(_COURSE_CHECKS))
def test_update_rules_give_the_values_the_course_printed(backend, rule):
    given, next_w, state = _COURSE_CHECKS[rule]
    # Copies: the rules update the weights and their state in place.
    config = {k: backend.asarray(v, copy=True) if isinstance(v, np.ndarray) else v for k, v in given.items()}
    w = backend.asarray(_COURSE_W, copy=True)
    got, config = getattr(optim, rule)(w, backend.asarray(_COURSE_DW), config=config)
    np.testing.assert_allclose(to_np(got), next_w, rtol=0, atol=1e-8)
    for key, printed in state.items():
        np.testing.assert_allclose(to_np(config[key]), printed, rtol=0, atol=1e-8, err_msg=key)


@pytest.mark.parametrize("rule", RULES)
def test_a_gradient_or_state_of_another_shape_is_refused_not_broadcast(backend, rule):
    """A dw of shape (3,) for a w of shape (2, 3) broadcast into a wrong update without a word;
    a velocity or moment of another shape failed in NumPy's broadcasting."""
    update = getattr(optim, rule)
    w = backend.asarray(np.ones((2, 3)), dtype="float64")
    before = to_np(w)
    with pytest.raises(ValueError, match=rf"{rule}: dw has shape \(3,\) but w has shape \(2, 3\)"):
        update(w, backend.asarray(np.ones(3), dtype="float64"), {})
    np.testing.assert_array_equal(to_np(w), before)
    dw = backend.asarray(np.full((2, 3), 0.1), dtype="float64")
    _, config = update(w, dw, {})
    for key in ("velocity", "cache", "m", "v"):
        if key in config:
            wrong = dict(config, **{key: backend.asarray(np.zeros((3, 2)), dtype="float64")})
            with pytest.raises(
                ValueError, match=rf"^{rule}: config\['{key}'\] has shape \(3, 2\) but w has shape \(2, 3\)"
            ):
                update(w, dw, wrong)
    with pytest.raises(TypeError, match=rf"{rule}: w and dw must be arrays, got list and list"):
        update([1.0, 2.0], [0.1, 0.1], {})


@pytest.mark.parametrize("rule", RULES)
def test_a_state_of_another_dtype_or_kind_is_refused_by_name(backend, rule):
    """An integer velocity failed inside NumPy's in-place update ('Cannot cast ufunc'), a list
    with "'list' object has no attribute 'shape'", and a float32 moment for float64 weights
    was rounded to float32 at every step."""
    update = getattr(optim, rule)
    w = backend.asarray(np.ones((2, 3)), dtype="float64")
    dw = backend.asarray(np.full((2, 3), 0.1), dtype="float64")
    _, config = update(w, dw, {})
    before = to_np(w)
    for key in ("velocity", "cache", "m", "v"):
        if key in config:
            for wrong, words in (
                (backend.asarray(np.zeros((2, 3), dtype=np.int64)), "has dtype int64 but w has dtype float64"),
                (backend.asarray(np.zeros((2, 3)), dtype="float32"), "has dtype float32 but w has dtype float64"),
                ([[0.0] * 3] * 2, "must be an array like w, got list"),
            ):
                with pytest.raises(TypeError, match=rf"^{rule}: config\['{key}'\] {words}$"):
                    update(w, dw, dict(config, **{key: wrong}))
    np.testing.assert_array_equal(to_np(w), before)


@pytest.mark.parametrize("count", [-1, np.int64(-1), 2.5, "3", True, None, 2**63 - 1, 2**70])
def test_adams_step_count_must_be_a_whole_number_of_steps(backend, count):
    """A negative count made the bias correction's square root NaN, 2.5 was truncated to 2, and
    '3' failed inside int(). A count kept on the device (CuPy) is an int64 that one more step must
    fit: 2**70 failed inside CuPy's conversion and 2**63 - 1 would have wrapped to a negative count."""
    w = backend.asarray(np.ones((2, 3)), dtype="float64")
    dw = backend.asarray(np.full((2, 3), 0.1), dtype="float64")
    with pytest.raises(
        ValueError, match=r"^adam: config\['t'\], the step count, must be an integer from 0 to 2\*\*63 - 2, got "
    ):
        optim.adam(w, dw, {"t": count})
    np.testing.assert_array_equal(to_np(w), np.ones((2, 3)))
    for count in (0, np.int64(7), 2**63 - 2):
        _, config = optim.adam(w, dw, {"t": count})
        assert int(config["t"]) == count + 1


@pytest.mark.parametrize("rule", RULES)
def test_integer_or_boolean_weights_and_gradients_are_refused_by_name(backend, rule):
    """Integer weights failed inside NumPy's in-place subtraction ('Cannot cast ufunc'); a
    boolean gradient updated float weights in silence."""
    update = getattr(optim, rule)
    w = backend.asarray(np.ones((2, 3)), dtype="float64")
    before = to_np(w)
    for name, weights, gradient, dtype in (
        ("w", backend.asarray(np.ones((2, 3), dtype=np.int64)), backend.asarray(np.ones((2, 3))), "int64"),
        ("dw", w, backend.asarray(np.ones((2, 3), dtype=bool)), "bool"),
    ):
        with pytest.raises(TypeError, match=rf"^{rule}: {name} must be a floating-point array, got dtype {dtype}$"):
            update(weights, gradient, {})
    np.testing.assert_array_equal(to_np(w), before)


@pytest.mark.parametrize("rule", RULES)
def test_read_only_weights_are_refused_by_name(rule):
    """The rules change w in place: memory-mapped weights failed with NumPy's "output array is
    read-only", after a momentum rule had already written its state."""
    weights = np.ones((2, 3))
    weights.setflags(write=False)
    config: dict = {}
    with pytest.raises(ValueError, match=rf"^{rule}: w is read-only, and the update rules change w in place"):
        getattr(optim, rule)(weights, np.ones((2, 3)), config)
    assert config == {}


def test_weights_and_gradients_of_two_libraries_are_refused_by_name():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="sgd: arrays from different libraries"):  # was: unsupported operand type(s)
        optim.sgd(np.ones(3), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("rule", RULES)
def test_a_misspelt_config_key_in_a_direct_call_is_named(backend, rule):
    """optim.sgd(w, dw, {'learning_rte': 0.1}) took the default rate and kept the typo; the
    Solver already refused it, a notebook's direct call now does too."""
    w = backend.asarray(np.ones((2, 3)), dtype="float64")
    dw = backend.asarray(np.full((2, 3), 0.1), dtype="float64")
    with pytest.raises(ValueError, match=rf"unknown optim_config key 'learning_rte' for update rule '{rule}'"):
        getattr(optim, rule)(w, dw, {"learning_rte": 0.1})
    # the learning rate where the config goes, or a config of another kind: "'float' object has no attribute 'keys'"
    with pytest.raises(TypeError, match=rf"^{rule}: config must be a dict .*got float; a learning rate goes in it: "):
        getattr(optim, rule)(w, dw, 0.1)
    with pytest.raises(TypeError, match=rf"^{rule}: config must be a dict of settings \(or None\), got list$"):
        getattr(optim, rule)(w, dw, [0.1])


@pytest.mark.parametrize("rule", ["sgd_nesterov_momentum", "nesterov_sgd", "rmsprop", "adam"])  # six or more passes
@pytest.mark.parametrize("transposed", [False, True])
def test_updates_in_cache_sized_blocks_give_the_whole_array_values(backend, np_rng, monkeypatch, rule, transposed):
    """On NumPy a large array is updated a block of rows at a time (xpnet.cache_blocks):
    blocks that do not divide the rows, rows longer than a block and a non-contiguous w
    must give the whole array's values bit for bit, weights and state, in place; on every
    backend, so that the blocks' slices are known to write through wherever they run."""
    monkeypatch.setattr(backend, "cache_blocks", True)
    config = {"weight_decay": 0.3} if rule == "nesterov_sgd" else {}
    w0 = np_rng.standard_normal((23, 7))
    grads = [np_rng.standard_normal((23, 7)) for _ in range(3)]

    def run(whole_up_to, block):
        monkeypatch.setattr(cache_blocks, "UPDATE_WHOLE_UP_TO", whole_up_to)
        monkeypatch.setattr(cache_blocks, "BLOCK", block)
        w = backend.asarray(w0.T if transposed else w0, dtype="float64", copy=True)
        cfg = dict(config)
        for dw in grads:
            next_w, cfg = getattr(optim, rule)(w, backend.asarray(dw.T if transposed else dw, dtype="float64"), cfg)
            assert next_w is w
        return to_np(w), {k: to_np(v) for k, v in cfg.items() if k in optim.CONFIG_KEYS[rule][1] and k != "t"}

    whole_w, whole_state = run(10**9, 1 << 15)
    for block in (1, 30, 1000):  # a row (or less) a block; blocks of 4 or 1 rows and a remainder; all rows
        w, state = run(10, block)
        np.testing.assert_array_equal(w, whole_w, err_msg=f"block {block}")
        for key, value in whole_state.items():
            np.testing.assert_array_equal(state[key], value, err_msg=f"{key}, block {block}")


def test_update_in_blocks_visits_every_row_once(backend, monkeypatch):
    monkeypatch.setattr(backend, "cache_blocks", True)
    monkeypatch.setattr(cache_blocks, "UPDATE_WHOLE_UP_TO", 10)
    monkeypatch.setattr(cache_blocks, "BLOCK", 12)  # 3 rows of 4: 10 // 3 rows a block
    counts = backend.asarray(np.zeros((10, 4)), dtype="float64")
    visits = []

    def count(a):
        visits.append(tuple(a.shape))
        a += 1.0

    cache_blocks.update_in_blocks(count, counts)
    np.testing.assert_array_equal(to_np(counts), np.ones((10, 4)))
    assert visits == [(3, 4), (3, 4), (3, 4), (1, 4)]
    visits.clear()
    cache_blocks.update_in_blocks(count, backend.asarray(np.zeros((2, 5)), dtype="float64"))  # 10 elements: whole
    assert visits == [(2, 5)]
    visits.clear()
    monkeypatch.setattr(backend, "cache_blocks", False)  # a GPU, PyTorch, array-api-strict
    cache_blocks.update_in_blocks(count, counts)
    assert visits == [(10, 4)]
    np.testing.assert_array_equal(to_np(counts), np.full((10, 4), 2.0))


def test_only_numpy_runs_in_cache_blocks():
    """Measured: NumPy gains from blocks; PyTorch's CPU tensors and array-api-strict lose."""
    import xpnet

    assert xpnet.get_backend("numpy").cache_blocks
    assert not xpnet.get_backend("array_api_strict").cache_blocks
    if importlib.util.find_spec("torch") is not None:
        assert not xpnet.get_backend("torch").cache_blocks
