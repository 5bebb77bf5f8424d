"""Networks: initialisation, forward against independent NumPy code,
gradients against numerical gradients in float64, construction errors."""

import numpy as np
import pytest
from helpers import to_np

import xpnet
from xpnet import fc_net, neural_net
from xpnet.backend import backend_of
from xpnet.cnn import FastConvNet, ThreeLayerConvNet
from xpnet.gradient_check import eval_numerical_gradient, rel_error, rounding_floor


def np_params(model):
    return {k: to_np(v) for k, v in model.params.items()}


def assert_gradients_match(model, X, y, loss_fn=None, exclude=()):
    """Every parameter's analytic gradient against centred differences, relative error < 1e-6.

    Elements below the centred difference's rounding floor (about 1e-4 for a
    loss near 2 and h = 1e-5) cannot be resolved to 1e-6 and are compared
    against that floor instead.
    """
    loss_fn = loss_fn or (lambda: model.loss(X, y))
    loss, grads = loss_fn()
    assert set(grads) == set(model.params)
    floor = rounding_floor(loss, h=1e-5)
    for name, param in model.params.items():
        assert backend_of(grads[name]) == model.backend
        assert tuple(grads[name].shape) == tuple(param.shape), name
        if name in exclude:
            continue
        numeric = eval_numerical_gradient(lambda _: loss_fn()[0], param, verbose=False, h=1e-5)
        error = rel_error(numeric, grads[name], floor=floor)
        assert error < 1e-6, f"{name}: relative error {error:.2e}"


def data(backend, np_rng, n, d, c):
    X = backend.asarray(np_rng.standard_normal((n, d)), dtype="float64")
    y = backend.asarray(np_rng.integers(0, c, n))
    return X, y


# ---------------------------------------------------------------- modular TwoLayerNet
def test_two_layer_net_initialisation(backend):
    model = xpnet.TwoLayerNet(
        input_dim=300, hidden_dims=200, num_classes=10, weight_scale=1e-2, seed=0, backend=backend
    )
    p = np_params(model)
    assert p["W1"].shape == (300, 200) and p["b1"].shape == (200,)
    assert p["W2"].shape == (200, 10) and p["b2"].shape == (10,)
    assert abs(p["W1"].std() - 1e-2) < 5e-4 and abs(p["W1"].mean()) < 5e-4
    assert abs(p["W2"].std() - 1e-2) < 2e-3
    assert not p["b1"].any() and not p["b2"].any()
    assert model.backend is backend


def test_two_layer_net_scores_match_numpy(backend, np_rng):
    model = xpnet.TwoLayerNet(input_dim=6, hidden_dims=5, num_classes=3, weight_scale=0.5, seed=1, backend=backend)
    X, y = data(backend, np_rng, 4, 6, 3)
    p = np_params(model)
    X_np = to_np(X)
    expected = np.maximum(X_np @ p["W1"] + p["b1"], 0) @ p["W2"] + p["b2"]
    np.testing.assert_allclose(to_np(model.loss(X)), expected, rtol=1e-12)
    model.reg = 0.7
    loss, _ = model.loss(X, y)
    shifted = expected - expected.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    data_loss = -log_probs[np.arange(4), to_np(y)].mean()
    reg_loss = 0.5 * 0.7 * ((p["W1"] ** 2).sum() + (p["W2"] ** 2).sum())
    assert float(loss) == pytest.approx(data_loss + reg_loss, rel=1e-12)


def test_two_layer_net_takes_cs231n_hidden_dim():
    """cs231n's notebooks build it as TwoLayerNet(input_dim=D, hidden_dim=H, num_classes=C, weight_scale=std)."""
    named = fc_net.TwoLayerNet(input_dim=7, hidden_dim=5, num_classes=3, weight_scale=0.1, seed=4)
    reference = fc_net.TwoLayerNet(input_dim=7, hidden_dims=5, num_classes=3, weight_scale=0.1, seed=4)
    assert named.params.keys() == reference.params.keys()
    for name, value in reference.params.items():
        np.testing.assert_array_equal(named.params[name], value)
    with pytest.raises(ValueError, match="give hidden_dims or hidden_dim"):
        fc_net.TwoLayerNet(hidden_dims=50, hidden_dim=60)
    # hidden_dims equal to its default passed as given (hidden_dim won without a word)
    with pytest.raises(ValueError, match="not both: hidden_dims=100, hidden_dim=60"):
        fc_net.TwoLayerNet(hidden_dims=100, hidden_dim=60)
    assert fc_net.TwoLayerNet().params["W1"].shape == (3 * 32 * 32, 100)
    with pytest.raises(ValueError, match="positive integer"):
        fc_net.TwoLayerNet(hidden_dim=0)


@pytest.mark.parametrize("reg", [0.0, 0.7])
def test_two_layer_net_gradients(backend, np_rng, reg):
    model = xpnet.TwoLayerNet(
        input_dim=5, hidden_dims=6, num_classes=4, weight_scale=0.3, reg=reg, seed=2, backend=backend
    )
    X, y = data(backend, np_rng, 3, 5, 4)
    assert_gradients_match(model, X, y)


# ---------------------------------------------------------------- FullyConnectedNet
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(reg=3.14),
        dict(normalization="batchnorm", reg=0.1),
        dict(use_batchnorm=True),
        dict(normalization="layernorm", reg=0.1),
        dict(dropout=0.25, seed=123),
        dict(normalization="batchnorm", dropout=0.5, seed=7),
    ],
    ids=["plain", "reg", "batchnorm", "use_batchnorm", "layernorm", "dropout", "batchnorm+dropout"],
)
def test_fully_connected_net_gradients(backend, np_rng, options):
    options = {"seed": 0, **options}
    model = xpnet.FullyConnectedNet(
        [6, 7], input_dim=5, num_classes=4, weight_scale=0.3, dtype="float64", backend=backend, **options
    )
    # Non-zero biases, so that a sample whose units are all dropped or dead
    # does not sit exactly on the next ReLU's kink at 0.
    for k in ("b1", "b2", "b3"):
        model.params[k] = backend.asarray(0.1 * np_rng.standard_normal(model.params[k].shape), dtype="float64")
    X, y = data(backend, np_rng, 4, 5, 4)
    # b1 and b2 feed batchnorm, which subtracts the batch mean: their gradient is exactly 0.
    exclude = ("b1", "b2") if model.normalization == "batchnorm" else ()
    assert_gradients_match(model, X, y, exclude=exclude)
    if exclude:
        _, grads = model.loss(X, y)
        assert max(float(backend.xp.max(backend.xp.abs(grads[k]))) for k in exclude) < 1e-12


def reference_fc_scores(p, X, hidden_layers, normalization=None, eps=1e-5):
    out = X
    for i in range(1, hidden_layers + 1):
        out = out @ p[f"W{i}"] + p[f"b{i}"]
        if normalization == "batchnorm":
            out = (out - out.mean(0)) / np.sqrt(out.var(0) + eps) * p[f"gamma{i}"] + p[f"beta{i}"]
        elif normalization == "layernorm":
            mean, var = out.mean(1, keepdims=True), out.var(1, keepdims=True)
            out = (out - mean) / np.sqrt(var + eps) * p[f"gamma{i}"] + p[f"beta{i}"]
        out = np.maximum(out, 0)
    last = hidden_layers + 1
    return out @ p[f"W{last}"] + p[f"b{last}"]


@pytest.mark.parametrize("normalization", [None, "layernorm"])
def test_fully_connected_net_scores_match_numpy(backend, np_rng, normalization):
    model = xpnet.FullyConnectedNet(
        [8, 6, 5],
        input_dim=7,
        num_classes=3,
        normalization=normalization,
        weight_scale=0.4,
        dtype="float64",
        seed=3,
        backend=backend,
    )
    for k in list(model.params):
        if k.startswith(("gamma", "beta", "b")):  # non-trivial values so they are exercised
            model.params[k] = backend.asarray(np_rng.standard_normal(model.params[k].shape), dtype="float64")
    X = np_rng.standard_normal((4, 7))
    expected = reference_fc_scores(np_params(model), X, 3, normalization)
    np.testing.assert_allclose(to_np(model.loss(backend.asarray(X, dtype="float64"))), expected, rtol=1e-10)


def test_batchnorm_net_uses_running_averages_at_test_time(backend, np_rng):
    model = xpnet.FullyConnectedNet(
        [5], input_dim=4, num_classes=3, normalization="batchnorm", dtype="float64", seed=0, backend=backend
    )
    X, y = data(backend, np_rng, 20, 4, 3)
    model.loss(X, y)  # train mode: updates the running averages
    bn = model.bn_params[0]
    p = np_params(model)
    hidden = to_np(X) @ p["W1"] + p["b1"]
    np.testing.assert_allclose(to_np(bn["running_mean"]), 0.1 * hidden.mean(0), rtol=1e-10)
    scores = to_np(model.loss(X[:1, ...]))  # test mode: one sample is fine
    normed = (hidden[:1] - to_np(bn["running_mean"])) / np.sqrt(to_np(bn["running_var"]) + 1e-5)
    expected = np.maximum(normed, 0) @ p["W2"] + p["b2"]
    np.testing.assert_allclose(scores, expected, rtol=1e-10)


def test_fully_connected_net_initialisation(backend):
    model = xpnet.FullyConnectedNet(
        [300, 200],
        input_dim=400,
        num_classes=10,
        normalization="layernorm",
        weight_scale=2e-2,
        seed=0,
        backend=backend,
    )
    p = np_params(model)
    assert sorted(p) == sorted(["W1", "b1", "W2", "b2", "W3", "b3", "gamma1", "beta1", "gamma2", "beta2"])
    assert p["W1"].shape == (400, 300) and p["W2"].shape == (300, 200) and p["W3"].shape == (200, 10)
    assert p["W1"].dtype == np.float32
    assert abs(p["W1"].std() - 2e-2) < 5e-4 and abs(p["W2"].std() - 2e-2) < 5e-4
    assert (p["gamma1"] == 1).all() and (p["beta2"] == 0).all() and (p["b3"] == 0).all()


@pytest.mark.parametrize("make", [lambda: fc_net.FullyConnectedNet([4], input_dim=3, num_classes=2),
                                  lambda: ThreeLayerConvNet(input_dim=(1, 4, 4), num_filters=2, filter_size=3)])  # fmt: skip
def test_reg_is_checked_whenever_it_is_set(make):
    """reg is read at each loss call, so it may change after construction; a negative one trained
    in silence, and a string failed inside the L2 term ("can't multiply sequence by non-int")."""
    model = make()
    model.reg = 0.25
    assert model.reg == 0.25
    for value, message in ((-1.0, "reg must be >= 0, got -1.0"), ("0.1", "reg must be a finite number, got '0.1'")):
        with pytest.raises(ValueError, match=message):
            model.reg = value
        assert model.reg == 0.25


@pytest.mark.parametrize("reg", [0.0, 0.1])
def test_a_float32_models_loss_scores_and_gradients_stay_float32(backend, np_rng, reg):
    """float32 from end to end, the L2 term's Python floats included (NumPy 1 made such a loss float64)."""
    X, y = data(backend, np_rng, 6, 5, 3)
    X = backend.asarray(to_np(X), dtype="float32")
    models = [
        xpnet.FullyConnectedNet([7, 4], input_dim=5, num_classes=3, normalization="batchnorm", dropout=0.2,
                                reg=reg, dtype="float32", seed=0, backend=backend),
        xpnet.TwoLayerNet(input_dim=5, hidden_dims=7, num_classes=3, reg=reg, dtype="float32", seed=0, backend=backend),
    ]  # fmt: skip
    for model in models:
        loss, grads = model.loss(X, y)
        assert loss.dtype == backend.xp.float32, type(model).__name__
        assert all(g.dtype == backend.xp.float32 for g in grads.values()), type(model).__name__
        assert model.loss(X).dtype == backend.xp.float32


def test_predict_scores_in_batches_and_gives_the_whole_sets_classes(backend, np_rng):
    """A conv net's activations for a whole test set at once take gigabytes (ThreeLayerConvNet:
    about 0.8 GB a thousand CIFAR images), so predict scores batch_size rows at a time."""
    model = ThreeLayerConvNet(input_dim=(1, 8, 8), num_filters=3, filter_size=3, hidden_dim=5, num_classes=4,
                              weight_scale=1e-1, dtype="float64", seed=0, backend=backend)  # fmt: skip
    X = np_rng.standard_normal((23, 1, 8, 8))
    expected = np.argmax(to_np(model.loss(backend.asarray(X))), axis=1)
    rows = []
    loss = model.loss
    model.loss = lambda X_batch, y=None: rows.append(X_batch.shape[0]) or loss(X_batch, y)
    predictions = model.predict(X, batch_size=10)  # NumPy rows, moved to the model's backend
    assert backend_of(predictions) == backend and rows == [10, 10, 3]
    np.testing.assert_array_equal(to_np(predictions), expected)
    rows.clear()
    np.testing.assert_array_equal(to_np(model.predict(backend.asarray(X))), expected)
    assert rows == [23]  # one batch of the default 500
    with pytest.raises(ValueError, match="predict: batch_size must be a positive integer, got 0"):
        model.predict(X, batch_size=0)


def test_seed_makes_initialisation_and_dropout_reproducible(backend, np_rng):
    X, y = data(backend, np_rng, 6, 5, 3)
    losses = []
    for _ in range(2):
        model = xpnet.FullyConnectedNet(
            [9],
            input_dim=5,
            num_classes=3,
            dropout=0.5,
            seed=11,
            dtype="float64",
            weight_scale=0.5,
            backend=backend,
        )
        losses.append(float(model.loss(X, y)[0]))
    assert losses[0] == losses[1]


def test_dropout_keep_ratio_is_one_minus_the_dropout_probability(backend, np_rng):
    """The course's newer keyword: keeping 3/4 of the units is dropping 1/4, mask for mask."""
    X, y = data(backend, np_rng, 6, 5, 3)
    options = dict(input_dim=5, num_classes=3, seed=11, dtype="float64", weight_scale=0.5, backend=backend)
    kept = xpnet.FullyConnectedNet([9], dropout_keep_ratio=0.75, **options)
    dropped = xpnet.FullyConnectedNet([9], dropout=0.25, **options)
    assert kept.use_dropout and kept.dropout_param["p"] == 0.25
    (loss_kept, grads_kept), (loss_dropped, grads_dropped) = kept.loss(X, y), dropped.loss(X, y)
    assert float(loss_kept) == float(loss_dropped)
    for name in grads_kept:
        np.testing.assert_array_equal(to_np(grads_kept[name]), to_np(grads_dropped[name]))
    assert xpnet.FullyConnectedNet([9], dropout_keep_ratio=np.float32(0.75), **options).dropout_param["p"] == 0.25
    assert xpnet.FullyConnectedNet([9], dropout=np.float32(0.25), **options).dropout_param["p"] == 0.25
    plain = xpnet.FullyConnectedNet([9], **options)
    everything = xpnet.FullyConnectedNet([9], dropout_keep_ratio=1, **options)
    assert not everything.use_dropout and float(everything.loss(X, y)[0]) == float(plain.loss(X, y)[0])
    assert float(loss_kept) != float(plain.loss(X, y)[0])  # some units were dropped


def test_a_seed_beside_a_generator_is_refused():
    """Given both, the seed was ignored without a word (the generator drew the initial weights)."""
    generator = xpnet.get_backend("numpy").rng(1)
    for make in (lambda: xpnet.FullyConnectedNet([5], input_dim=4, seed=0, rng=generator),
                 lambda: ThreeLayerConvNet(seed=0, rng=generator), lambda: FastConvNet(widths=(2, 2, 2), seed=0, rng=generator)):  # fmt: skip
        with pytest.raises(ValueError, match=r"give seed or rng \(the initial weights' generator\), not both: seed=0"):
            make()


def test_rng_must_be_a_generator_of_the_models_backend():
    """A seed or NumPy's own Generator failed at the first draw ("'int' object has no attribute
    'normal'", "normal() got an unexpected keyword argument 'std'"), and another backend's generator
    drew the weights on the wrong device."""
    for rng, error, message in (
        (0, TypeError, r"rng must be a generator of the backend, backend.rng\(seed\), got int; a seed goes in seed="),
        (np.random.default_rng(0), TypeError, r"backend.rng\(seed\), got Generator$"),
        (xpnet.get_backend("array_api_strict").rng(0), ValueError,
         r"rng draws on backend 'array_api_strict' but the model lives on 'numpy'"),
    ):  # fmt: skip
        with pytest.raises(error, match=message):
            xpnet.FullyConnectedNet([5], input_dim=4, backend="numpy", rng=rng)
    made = xpnet.FullyConnectedNet([5], input_dim=4, backend="numpy", rng=xpnet.get_backend("numpy").rng(0))
    again = xpnet.FullyConnectedNet([5], input_dim=4, backend="numpy", seed=0)
    np.testing.assert_array_equal(made.params["W1"], again.params["W1"])


def test_numpy_integers_size_the_nets_as_python_ints_do():
    """A course's search loop draws sizes with np.random.choice: np.int64 is an integer like any."""
    i = np.int64
    pairs = [
        (fc_net.TwoLayerNet(input_dim=i(6), hidden_dims=i(5), num_classes=i(3), seed=0), fc_net.TwoLayerNet(6, 5, 3, seed=0)),
        (fc_net.TwoLayerNet(input_dim=6, hidden_dim=i(5), num_classes=3, seed=0), fc_net.TwoLayerNet(6, 5, 3, seed=0)),
        (xpnet.FullyConnectedNet(np.array([5, 4]), input_dim=i(6), num_classes=i(3), seed=0),
         xpnet.FullyConnectedNet([5, 4], input_dim=6, num_classes=3, seed=0)),
        (ThreeLayerConvNet((i(1), i(4), i(4)), num_filters=i(2), filter_size=i(3), hidden_dim=i(5), num_classes=i(3), seed=0),
         ThreeLayerConvNet((1, 4, 4), num_filters=2, filter_size=3, hidden_dim=5, num_classes=3, seed=0)),
        (neural_net.TwoLayerNet(i(6), i(5), i(3), seed=0), neural_net.TwoLayerNet(6, 5, 3, seed=0)),
    ]  # fmt: skip
    for numpy_sized, python_sized in pairs:
        assert numpy_sized.params.keys() == python_sized.params.keys()
        for name, value in python_sized.params.items():
            np.testing.assert_array_equal(numpy_sized.params[name], value)
        assert type(numpy_sized.num_classes) is int and type(numpy_sized.input_dim) in (int, tuple)
    assert type(pairs[3][0].conv_param["pad"]) is int
    for make in (lambda s: xpnet.FullyConnectedNet([5], input_dim=4, seed=s), lambda s: ThreeLayerConvNet(seed=s),
                 lambda s: neural_net.TwoLayerNet(4, 5, 3, seed=s)):  # fmt: skip
        for seed in (-1, "a", 1.5):  # NumPy's seeding said 'expected non-negative integer' or 'expects int'
            with pytest.raises(ValueError, match=f"seed must be None or a non-negative integer, got {seed!r}"):
                make(seed)
    for flag in (True, np.True_):  # a bool is not a size
        with pytest.raises(ValueError, match="hidden_dims must be a positive integer or a list of them"):
            fc_net.TwoLayerNet(hidden_dims=flag)
    # A string is iterable: '10' was read as the sizes '1' and '0', and named as "got '1'".
    with pytest.raises(ValueError, match="hidden_dims must be a positive integer or a list of them, got '10'"):
        fc_net.TwoLayerNet(hidden_dim="10")
    with pytest.raises(ValueError, match="hidden_dims must be a positive integer or a list of them, got '100'"):
        xpnet.FullyConnectedNet("100", input_dim=4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: fc_net.TwoLayerNet(6, 5, 3, seed=0),
        lambda: xpnet.FullyConnectedNet([5, 4], input_dim=6, num_classes=3, normalization="batchnorm", seed=0),
        lambda: ThreeLayerConvNet((1, 4, 4), num_filters=2, filter_size=3, hidden_dim=5, use_batchnorm=True, seed=0),
        lambda: neural_net.TwoLayerNet(6, 5, 3, seed=0),
        lambda: FastConvNet(widths=(4, 6, 5), seed=0),
    ],
)
def test_values_at_most_bounds_what_a_network_allocates_before_it_allocates_it(make, monkeypatch):
    """Sizes read from a file build a network no larger than the file's values: a few bytes
    declaring widths of 20,000 asked for 72 GB of weights."""
    from xpnet import model as model_module

    net = make()
    arrays = [*net.params.values(), *(v for b in net.buffers() for v in b.values() if hasattr(v, "shape"))]
    held = sum(int(np.prod(a.shape)) for a in arrays)
    with model_module.values_at_most(held):
        make()  # exactly as many: built
    claimed = []
    monkeypatch.setattr(model_module, "_claim", claimed.append)  # every array the network holds is counted
    make()
    assert sum(int(np.prod(shape)) for shape in claimed) >= held
    monkeypatch.undo()
    with pytest.raises(ValueError, match=f"declares a network of more values than the {held - 1} it has room for"):
        with model_module.values_at_most(held - 1):
            make()
    make()  # the bound ends with the block


@pytest.mark.parametrize("dtype", ["float32", "float64", np.float32, np.float64])
def test_dtype_options(backend, dtype):
    model = xpnet.FullyConnectedNet([3], input_dim=2, num_classes=2, dtype=dtype, backend=backend)
    assert model.params["W1"].dtype == backend.dtype(dtype)
    scores = model.loss(np.ones((1, 2)))  # host input is moved to the model's device
    assert backend_of(scores) == backend and scores.dtype == backend.dtype(dtype)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_dims=[]), "at least one hidden layer"),
        (dict(hidden_dims=[10, 0]), "positive integer"),
        (dict(hidden_dims=[10, -3]), "positive integer"),
        (dict(hidden_dims=[10], dropout=1.0), r"must be in \[0, 1\)"),
        (dict(hidden_dims=[10], dropout=-0.2), r"must be in \[0, 1\)"),
        (dict(hidden_dims=[10], dropout_keep_ratio=0), r"probability of keeping a unit and must be in \(0, 1\]"),
        (dict(hidden_dims=[10], dropout_keep_ratio=1.5), r"probability of keeping a unit and must be in \(0, 1\]"),
        (dict(hidden_dims=[10], dropout=0.5, dropout_keep_ratio=0.5), "not both"),
        (dict(hidden_dims=[10], normalization="groupnorm"), "unknown normalization 'groupnorm'"),
        (dict(hidden_dims=[10], dtype="int32"), "float32 or float64"),
        (dict(hidden_dims=[10], input_dim=0), "input_dim"),
        # the conv nets' image shape: the flattened size is named
        (dict(hidden_dims=[10], input_dim=(3, 32, 32)), r"got \(3, 32, 32\): .* one input flattened, input_dim=3072$"),
        (dict(hidden_dims=[10], input_dim=(3, 0)), r"input_dim must be a positive integer, got \(3, 0\)$"),
        (dict(hidden_dims=[10], backend="jax"), "unknown backend 'jax'"),
    ],
)
def test_construction_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        xpnet.FullyConnectedNet(**kwargs)


def test_two_layer_net_construction_errors():
    with pytest.raises(ValueError, match="one hidden layer"):
        fc_net.TwoLayerNet(hidden_dims=[10, 10])
    with pytest.raises(ValueError, match="positive integer"):
        fc_net.TwoLayerNet(hidden_dims=0)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        fc_net.TwoLayerNet(dropout=2)
    with pytest.raises(ValueError, match="hidden_size"):
        neural_net.TwoLayerNet(4, 0, 3)
    with pytest.raises(ValueError, match="one input flattened, input_dim=64$"):
        fc_net.TwoLayerNet(input_dim=(1, 8, 8))
    with pytest.raises(ValueError, match="one input flattened, input_size=64$"):
        neural_net.TwoLayerNet((1, 8, 8), 10, 3)
    X, y = np.zeros((6, 4)), np.arange(6) % 3
    for iterations in (-1, 2.5):
        with pytest.raises(ValueError, match=f"num_iters must be a non-negative integer, got {iterations}"):
            neural_net.TwoLayerNet(4, 5, 3).train(X, y, X, y, num_iters=iterations)
    stats = neural_net.TwoLayerNet(4, 5, 3).train(X, y, X, y, num_iters=np.int64(3), batch_size=np.int64(2))
    assert len(stats["loss_history"]) == 3


def test_use_batchnorm_takes_true_or_false():
    """use_batchnorm='False' built batchnorm layers: a string is truthy."""
    with pytest.raises(ValueError, match="^use_batchnorm must be True or False, got 'False'$"):
        fc_net.FullyConnectedNet([5], input_dim=4, use_batchnorm="False")
    with pytest.raises(ValueError, match="^use_batchnorm must be True or False, got 'no'$"):
        ThreeLayerConvNet(input_dim=(1, 8, 8), use_batchnorm="no")
    assert ThreeLayerConvNet(input_dim=(1, 8, 8), use_batchnorm=np.True_).bn_params
    assert not fc_net.FullyConnectedNet([5], input_dim=4, use_batchnorm=0).bn_params


def test_the_first_courses_two_layer_net_checks_the_reg_its_loss_is_given():
    """train() refused a negative reg, but loss(X, y, reg=-1) returned a loss that rewards large
    weights, and reg='0.1' failed inside the L2 term ("can't multiply sequence by non-int")."""
    X, y = np.ones((4, 4)), np.arange(4) % 3
    for reg, message in ((-1.0, "reg must be >= 0, got -1.0"), ("0.1", "reg must be a finite number, got '0.1'")):
        with pytest.raises(ValueError, match=message):
            neural_net.TwoLayerNet(4, 5, 3).loss(X, y, reg=reg)


def test_top_level_reexports():
    assert xpnet.TwoLayerNet is fc_net.TwoLayerNet
    assert xpnet.FullyConnectedNet is fc_net.FullyConnectedNet


# ---------------------------------------------------------------- monolithic TwoLayerNet
def test_monolithic_net_layout_and_scores(backend, np_rng):
    model = neural_net.TwoLayerNet(4, 10, 3, std=1e-1, seed=0, backend=backend)
    p = np_params(model)
    assert p["W1"].shape == (10, 4) and p["W2"].shape == (3, 10)
    X = np_rng.standard_normal((5, 4))
    expected = np.maximum(X @ p["W1"].T + p["b1"], 0) @ p["W2"].T + p["b2"]
    np.testing.assert_allclose(to_np(model.loss(X)), expected, rtol=1e-12)


def test_monolithic_net_loss_and_gradients(backend, np_rng):
    model = neural_net.TwoLayerNet(4, 6, 3, std=3e-1, seed=1, backend=backend)
    X, y = data(backend, np_rng, 5, 4, 3)
    p = np_params(model)
    scores = np.maximum(to_np(X) @ p["W1"].T, 0) @ p["W2"].T
    shifted = scores - scores.max(1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(1, keepdims=True)
    expected = -np.log(probs[np.arange(5), to_np(y)]).mean() + 0.05 * 0.5 * (
        (p["W1"] ** 2).sum() + (p["W2"] ** 2).sum()
    )
    assert float(model.loss(X, y, reg=0.05)[0]) == pytest.approx(expected, rel=1e-12)
    assert_gradients_match(model, X, y, loss_fn=lambda: model.loss(X, y, reg=0.05))


def test_monolithic_net_trains_on_separable_data(backend, np_rng):
    centres = np_rng.standard_normal((3, 8)) * 3
    y_np = np_rng.integers(0, 3, 300)
    X_np = centres[y_np] + 0.3 * np_rng.standard_normal((300, 8))
    model = neural_net.TwoLayerNet(8, 20, 3, std=1e-1, seed=0, backend=backend)
    stats = model.train(
        X_np[:250],
        y_np[:250],
        X_np[250:],
        y_np[250:],
        learning_rate=0.5,
        num_iters=100,
        batch_size=50,
        seed=0,
    )
    assert len(stats["loss_history"]) == 100 and all(isinstance(v, float) for v in stats["loss_history"])
    assert len(stats["train_acc_history"]) == 20 and len(stats["val_acc_history"]) == 20
    assert stats["loss_history"][-1] < 0.5 * stats["loss_history"][0]
    assert stats["val_acc_history"][-1] > 0.95
    predictions = model.predict(backend.asarray(X_np[250:]))
    assert backend_of(predictions) == backend
    assert np.mean(to_np(predictions) == y_np[250:]) > 0.95


# ----------------------------------------------------------------------------- np.random.seed, as in the course
def test_the_course_toy_two_layer_net_gives_the_scores_and_loss_the_course_printed():
    """ECE C147/C247's two-layer notebook seeds NumPy's global generator before building its toy
    net; the scores and loss it checks against are printed in the course's notebook."""
    np.random.seed(0)
    net = neural_net.TwoLayerNet(4, 10, 3, std=1e-1)
    np.random.seed(1)
    X, y = 10 * np.random.randn(5, 4), np.array([0, 1, 2, 2, 1])
    correct_scores = np.asarray([
        [-1.07260209, 0.05083871, -0.87253915],
        [-2.02778743, -0.10832494, -1.52641362],
        [-0.74225908, 0.15259725, -0.39578548],
        [-0.38172726, 0.10835902, -0.17328274],
        [-0.64417314, -0.18886813, -0.41106892],
    ])  # fmt: skip
    np.testing.assert_allclose(net.loss(X), correct_scores, atol=5e-9)
    assert abs(float(net.loss(X, y, reg=0.05)[0]) - 1.071696123862817) < 1e-12


@pytest.mark.parametrize("normalization, printed", [(None, (2.300479089768492, 7.052114776533016)),
                                                     ("batchnorm", (2.2611955101340957, 6.996533220108303))])  # fmt: skip
def test_the_course_fully_connected_nets_give_the_initial_losses_the_course_printed(normalization, printed):
    """cs231n's FullyConnectedNets and BatchNormalization notebooks: np.random.seed(231), then
    the data and, for each reg, a net; the losses are those printed in the course's notebooks."""
    np.random.seed(231)
    N, D, H1, H2, C = 2, 15, 20, 30, 10
    X = np.random.randn(N, D)
    y = np.random.randint(C, size=(N,))
    for reg, expected in zip([0, 3.14], printed):
        model = fc_net.FullyConnectedNet(
            [H1, H2], input_dim=D, num_classes=C, reg=reg, weight_scale=5e-2, dtype=np.float64,
            normalization=normalization,
        )  # fmt: skip
        loss, _ = model.loss(X, y)
        assert abs(float(loss) - expected) < 1e-14, (reg, float(loss))


@pytest.mark.parametrize("spec", ["numpy", "array_api_strict:device1"])
def test_unseeded_draws_on_numpy_come_from_numpys_global_generator(spec):
    """The course's `np.random.seed(231)` before a model seeds its weights (drawn in float64 and cast,
    as the course's `weight_scale * np.random.randn(...)` then `astype`) and the shared generator."""
    backend = xpnet.get_backend(spec)
    np.random.seed(231)
    model = xpnet.FullyConnectedNet([6, 7], input_dim=5, num_classes=3, weight_scale=5e-2, backend=backend)
    np.random.seed(231)
    expected = [5e-2 * np.random.randn(5, 6), 5e-2 * np.random.randn(6, 7), 5e-2 * np.random.randn(7, 3)]
    for i, weights in enumerate(expected, start=1):
        np.testing.assert_array_equal(to_np(model.params[f"W{i}"]), weights.astype(np.float32))
    backend.seed(4)
    drawn = to_np(backend.default_rng().uniform((3,), dtype="float64"))
    np.random.seed(4)
    np.testing.assert_array_equal(drawn, np.random.random_sample(3))


def test_the_course_toy_training_draws_its_minibatches_as_the_course_loop_does():
    """An unseeded TwoLayerNet.train samples from NumPy's global generator: the course's loop
    (np.random.choice minibatches, SGD, the decay after every epoch of one step), written out
    here in NumPy from the same state, ends at the same loss."""
    np.random.seed(0)
    net = neural_net.TwoLayerNet(4, 10, 3, std=1e-1)
    np.random.seed(1)
    X, y = 10 * np.random.randn(5, 4), np.array([0, 1, 2, 2, 1])
    state = np.random.get_state()
    stats = net.train(X, y, X, y, learning_rate=1e-1, reg=5e-6, num_iters=100, verbose=False)

    np.random.seed(0)
    W1 = 1e-1 * np.random.randn(10, 4)  # the course's initialisation, in its order
    W2 = 1e-1 * np.random.randn(3, 10)
    b1, b2 = np.zeros(10), np.zeros(3)
    np.random.set_state(state)
    lr, reg, rows = 1e-1, 5e-6, np.arange(200)
    for _ in range(100):
        batch = np.random.choice(5, 200)
        Xb, yb = X[batch], y[batch]
        hidden = np.maximum(Xb @ W1.T + b1, 0)
        scores = hidden @ W2.T + b2
        probs = np.exp(scores - scores.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        loss = -np.log(probs[rows, yb]).mean() + 0.5 * reg * ((W1**2).sum() + (W2**2).sum())
        dscores = probs.copy()
        dscores[rows, yb] -= 1
        dscores /= 200
        dhidden = (dscores @ W2) * (hidden > 0)
        W1, b1 = W1 - lr * (dhidden.T @ Xb + reg * W1), b1 - lr * dhidden.sum(0)
        W2, b2 = W2 - lr * (dscores.T @ hidden + reg * W2), b2 - lr * dscores.sum(0)
        lr *= 0.95  # 5 rows, batches of 200: every step ends an epoch
    assert abs(stats["loss_history"][-1] - loss) < 1e-12
    assert stats["loss_history"][-1] < 0.02  # and it learnt the toy data


def test_two_layer_net_train_refuses_data_that_cannot_be_right_by_its_argument_names(np_rng):
    """The course's train(X, y, X_val, y_val) loop: a y one short was indexed past its end only
    when a minibatch drew the last row, a short y_val failed at the first epoch's end, and a
    column of labels inside the loss."""
    net = neural_net.TwoLayerNet(12, 10, 4, seed=0)
    X, y = np_rng.standard_normal((60, 12)), np_rng.integers(0, 4, 60)
    with_nan = X.copy()
    with_nan[3, 3] = np.nan
    cases = [
        ((X, y[:59], X[:10], y[:10]), "X has 60 rows but y has 59 labels"),
        ((X, y, X[:10], y[:9]), "X_val has 10 rows but y_val has 9 labels"),
        ((X, y[:, None], X[:10], y[:10]), r"y must be 1-D, got shape \(60, 1\)"),
        ((X, y + 1, X[:10], y[:10]), r"y has label 4 outside \[0, 4\)"),
        ((X[:, :5], y, X[:10], y[:10]), "X samples have shape .* but the model expects 12 inputs"),
        ((with_nan, y, X[:10], y[:10]), "X contains NaN or infinite values"),
        # train(X, X_val, y, y_val): the labels' place holds inputs, which the one-hot hint (argmax) misread
        ((X, X[:10], y, y[:10]), r"y must be 1-D, got shape \(10, 12\); y holds inputs shaped as X's samples"),
        ((y, X, y[:10], X[:10]), r"got shape \(60, 12\); X looks like labels and y like inputs: the inputs come first"),
        # a one-hot y stays one-hot, even when as wide as X's rows would be
        ((X, np.eye(4)[y], X[:10], y[:10]), r"\(60, 4\); for one-hot rows .* y.argmax\(axis=1\)"),
    ]
    before = np_params(net)
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            net.train(*args, num_iters=5, batch_size=10)
    with pytest.raises(
        ValueError, match="verbose must be True or False, got 'False'"
    ):  # a string is truthy: it printed
        net.train(X, y, X[:10], y[:10], num_iters=5, batch_size=10, verbose="False")
    for key, value in np_params(net).items():
        np.testing.assert_array_equal(value, before[key])


def test_two_layer_net_train_names_itself_and_the_callers_dtypes_on_every_backend(backend, np_rng):
    """train() checked its data after moving it: on PyTorch float labels were named as
    'torch.float64', and no message said which function refused them."""
    net = neural_net.TwoLayerNet(12, 10, 4, seed=0, backend=backend)
    X, y = np_rng.standard_normal((60, 12)), np_rng.integers(0, 4, 60)
    for args, message in (
        ((X, y.astype(np.float64), X[:10], y[:10]), "y must hold integer class labels, got dtype float64;"),
        ((X, y, X[:10], y[:10] + 1), r"y_val has label 4 outside \[0, 4\)"),
        ((X, y, X[:10, :5], y[:10]), r"X_val samples have shape \(5,\)"),
    ):
        with pytest.raises(ValueError, match=f"^TwoLayerNet.train: {message}"):
            net.train(*args, num_iters=5, batch_size=10)


# ---------------------------------------------------------------- copies of a model
def _every_model(backend):
    """One of each network, with its batchnorm and dropout where it has them, and its input shape."""
    return [
        (neural_net.TwoLayerNet(12, 7, 4, backend=backend), (12,)),
        (
            fc_net.FullyConnectedNet(
                [7, 6], 12, 4, normalization="batchnorm", dropout_keep_ratio=0.5, seed=3, backend=backend
            ),
            (12,),
        ),
        (
            ThreeLayerConvNet((3, 6, 6), 2, 3, 5, 4, use_batchnorm=True, seed=3, backend=backend),
            (3, 6, 6),
        ),
        (xpnet.cnn.FastConvNet((3, 16, 16), widths=(2, 3, 3), num_classes=4, seed=3, backend=backend), (3, 16, 16)),
    ]


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_a_model_copies_with_deepcopy_and_pickle_onto_the_same_backend(backend, np_rng, copier):
    """``best = copy.deepcopy(model)`` keeps a model while it trains on, as in a notebook's search;
    pickle carries one to another process (multiprocessing, Dask). The copy has the original's
    backend object, equal parameters and running averages, and arrays of its own."""
    import copy
    import pickle

    copy_of = copy.deepcopy if copier == "deepcopy" else (lambda m: pickle.loads(pickle.dumps(m)))
    for model, input_shape in _every_model(backend):
        name = type(model).__name__
        X = backend.asarray(np_rng.standard_normal((5, *input_shape)), dtype=model.dtype)
        y = backend.asarray(np_rng.integers(0, 4, 5))
        model.loss(X, y)  # running averages that are not the initial ones
        model.rng = backend.rng(0)  # as a Solver leaves it: a copy leaves the generator behind
        twin = copy_of(model)
        assert twin.backend is model.backend and twin.rng is None and model.rng is not None, name
        assert all(backend_of(value) == backend for value in twin.params.values()), name
        mine, theirs = model.state_dict(), twin.state_dict()
        assert set(theirs["params"]) == set(mine["params"]), name
        for key, value in mine["params"].items():
            np.testing.assert_array_equal(theirs["params"][key], value, err_msg=f"{name} {key}")
        for layer, (ours, copied) in enumerate(zip(mine["buffers"], theirs["buffers"], strict=True)):
            assert set(copied) == set(ours), (name, layer)
            for key, value in ours.items():
                np.testing.assert_array_equal(copied[key], value, err_msg=f"{name} layer {layer} {key}")
        for bn_param in getattr(model, "bn_params", []):
            bn_param["mode"] = "test"
        for bn_param in getattr(twin, "bn_params", []):
            bn_param["mode"] = "test"
        np.testing.assert_array_equal(to_np(twin.loss(X)), to_np(model.loss(X)), err_msg=name)
        before = {k: to_np(v) for k, v in model.params.items()}
        xp = backend.xp
        for key in twin.params:
            twin.params[key] = twin.params[key] + xp.ones_like(twin.params[key])
        for key, value in model.params.items():
            np.testing.assert_array_equal(to_np(value), before[key], err_msg=f"{name} {key} changed with its copy")


def test_a_trained_solver_copies_and_its_copy_trains_on_alone(backend, np_rng):
    import copy

    from xpnet.solver import Solver

    if backend.random_stream == "cupy":
        pytest.skip("CuPy's generators cannot be copied (their bit generator holds a threading.Lock)")

    X = np_rng.standard_normal((40, 12))
    y = np_rng.integers(0, 4, 40)
    data = dict(X_train=X[:30], y_train=y[:30], X_val=X[30:], y_val=y[30:])
    model = fc_net.FullyConnectedNet([7], input_dim=12, num_classes=4, seed=0, backend=backend)
    solver = Solver(model, data, num_epochs=1, batch_size=10, seed=0, verbose=False)
    solver.train()
    twin = copy.deepcopy(solver)
    kept = {k: to_np(v) for k, v in solver.model.params.items()}
    twin.num_epochs = 2
    twin.train()
    assert twin.epoch == 2 and solver.epoch == 1
    for key, value in solver.model.params.items():
        np.testing.assert_array_equal(to_np(value), kept[key])
