"""What every xpnet network shares: its backend, its dtype, its parameters and
how it takes input."""

from __future__ import annotations

import contextlib
import contextvars
import math
import os

from .backend import Backend, backend_of, check_generator, get_backend, namespace, to_numpy
from .batching import predicted_classes
from .checkpoint import non_finite_path, not_float_array, tree_to_device, tree_to_host
from .input_checks import (
    as_int,
    check_seed,
    check_writable,
    is_array,
    is_number,
    layer_namespace,
    refuse_unsupported_subclasses,
    short_repr,
)
from .layers import BATCHNORM_KEYS, check_eps, check_momentum

# The batchnorm keys that hold arrays (the others are settings).
RUNNING_KEYS = ("running_mean", "running_var")

__all__ = [
    "Model",
    "L2Strength",
    "backend_for",
    "param_dtype",
    "input_preparers",
    "loss_and_grads",
    "model_state",
    "load_model_state",
    "values_at_most",
]

# (the bound, what is left of it) for networks built inside values_at_most; None: no bound.
_values_left: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("xpnet_values_left", default=None)


@contextlib.contextmanager
def values_at_most(limit: int):
    """Networks built inside may allocate at most ``limit`` values, parameters and buffers
    together; one that would allocate more raises ValueError before it does. For sizes read
    from a file, whose arrays must then fit in it: a few bytes could declare widths whose
    weights take every byte of memory."""
    token = _values_left.set((limit, limit))
    try:
        yield
    finally:
        _values_left.reset(token)


def _claim(shape) -> None:
    """Count an allocation of ``shape`` against :func:`values_at_most`'s bound, if one is set."""
    bound = _values_left.get()
    if bound is None:
        return
    limit, left = bound
    left -= math.prod(shape)
    if left < 0:
        raise ValueError(f"declares a network of more values than the {limit} it has room for")
    _values_left.set((limit, left))


class L2Strength:
    """A model's ``reg``, the L2 strength: read at each loss call, so it may be changed after
    construction, and checked whenever it is set (a negative or non-numeric one failed, or
    trained, far from the assignment). A class attribute: ``reg = L2Strength()``."""

    def __set_name__(self, owner, name):
        self.attribute = "_" + name

    def __get__(self, model, owner=None):
        return self if model is None else getattr(model, self.attribute)

    def __set__(self, model, value):
        setattr(model, self.attribute, check_finite("reg", value, minimum=0))


class Model:
    """Base class of the networks.

    Attributes:
        backend: the :class:`~xpnet.backend.Backend` the parameters live on.
        dtype: the floating dtype of the parameters (an ``backend.xp`` dtype).
        params: dict mapping names ('W1', 'b1', ...) to arrays on ``backend``.
    """

    def __init__(self, backend: "str | Backend | None" = None, dtype="float32"):
        self.backend = get_backend(backend)
        self.dtype = self.backend.dtype(dtype)
        if self.dtype not in (self.backend.xp.float32, self.backend.xp.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
        self.params: dict = {}
        # The generator for draws during training (dropout masks); the Solver gives
        # each epoch its own. None: the backend's shared generator.
        self.rng = None

    def __getstate__(self) -> dict:
        # A copy or a pickle leaves the training generator behind: the Solver hands each epoch
        # its own, and CuPy's generators cannot be copied (their bit generator holds a lock).
        return {**self.__dict__, "rng": None}

    @property
    def xp(self):
        return self.backend.xp

    def prepare_inputs(self, X):
        """``X`` as an array of the model's backend and dtype (moved there if needed)."""
        return converted_inputs(self.backend, X, self.dtype, type(self).__name__)

    def prepare_labels(self, y):
        """``y`` as an integer array on the model's backend."""
        return converted_labels(self.backend, y, type(self).__name__)

    def loss(self, X, y=None):
        """Scores (N, C) when ``y`` is None, else ``(loss, grads)``."""
        raise NotImplementedError

    def predict(self, X, batch_size=500):
        """Predicted class indices (N,) as an array on the model's device, for X (N, ...) of
        any backend; scored ``batch_size`` rows at a time, so that a conv net's activations
        for a whole test set never exist at once."""
        return predicted_classes(self.loss, self.prepare_inputs(X), batch_size, "predict", "loss(X)")

    @property
    def graph_key(self) -> tuple:
        """The Python values beside its arrays that decide what a training step computes
        (a regularisation strength, which gradients are wanted). A CUDA graph freezes them
        at capture, so a graph run captures the step again when one of them is replaced
        (compared by identity). None by default."""
        return ()

    # -- state that checkpoints carry ------------------------------------------
    def buffers(self) -> list:
        """Per-layer dicts of non-trained state (batchnorm running averages); none by default."""
        return []

    def state_dict(self) -> dict:
        """Parameters and buffers as NumPy arrays on the host, independent of the backend."""
        return model_state(self, self.backend)

    def load_state_dict(self, state: dict) -> None:
        """Load what :meth:`state_dict` returned (on any backend) onto this model's device."""
        load_model_state(self, state, self.backend)

    def _add_l2(self, loss, grads, names, reg):
        """The L2 term: 0.5 * reg * sum of w² over ``names`` added to the loss, reg * w to their gradients."""
        if not reg:
            return loss, grads
        xp = self.xp
        for name in names:
            w = self.params[name]
            loss = loss + 0.5 * reg * xp.sum(w * w)
            grads[name] = grads[name] + reg * w
        return loss, grads

    def _init_rng(self, seed, rng=None):
        """The generator for initialisation: ``rng`` if given, else one seeded with
        ``seed``, else the backend's shared one."""
        seed = check_seed(seed)
        if rng is not None:
            if seed is not None:  # one of them would be ignored without a word
                raise ValueError(f"give seed or rng (the initial weights' generator), not both: seed={seed!r}")
            return check_generator("rng", rng, self.backend, "the model", "a seed goes in seed=")
        return self.backend.default_rng() if seed is None else self.backend.rng(seed)

    # Every parameter and buffer of xpnet's networks is made by these (bounded by values_at_most).
    def _weight(self, rng, shape, std):
        _claim(shape)
        return rng.normal(shape, std=std, dtype=self.dtype)

    def _uniform(self, rng, shape, fan_in):
        """Uniform in ±1/sqrt(fan_in), as PyTorch initialises its layers."""
        _claim(shape)
        bound = 1.0 / math.sqrt(fan_in)
        return (2.0 * rng.uniform(shape, dtype=self.dtype) - 1.0) * bound

    def _zeros(self, n):
        _claim((n,))
        return self.xp.zeros((n,), dtype=self.dtype, device=self.backend.device)

    def _ones(self, n):
        _claim((n,))
        return self.xp.ones((n,), dtype=self.dtype, device=self.backend.device)


# --------------------------------------------------------------------------- any model
# The Solver trains any object with ``params`` (a dict of arrays) and ``loss(X, y=None)``,
# as in the course. What xpnet's Model adds (backend, input preparation, buffers) is
# inferred for a model that lacks it.
def backend_for(model) -> Backend:
    """The model's backend: ``model.backend``, else that of its first parameter, after
    checking the parameters (:func:`check_params`)."""
    if getattr(model, "params", None):
        check_params(model.params)
    backend = getattr(model, "backend", None)
    if backend is not None:
        return get_backend(backend)
    if not getattr(model, "params", None):
        hint = ""
        if isinstance(model, dict) and "X_train" in model:  # Solver(data, model)
            hint = "; this looks like the data: Solver(model, data) takes the model first"
        elif isinstance(model, type):  # Solver(FullyConnectedNet, data)
            hint = f"; {model.__name__} is a class: give a model made from it, {model.__name__}(...)"
        raise ValueError(f"{type(model).__name__} has no params: a model needs a dict of parameter arrays{hint}")
    return backend_of(next(iter(model.params.values())))


def check_params(params) -> None:
    """TypeError naming the first entry of a model's ``params`` that is no floating-point array
    of the others' library. A model written by hand with a list, a number or integers there
    failed inside the Solver's first update ("'list' object has no attribute 'shape'"), or
    in an update rule that named its argument ``w``, not the parameter."""
    if not isinstance(params, dict):
        raise TypeError(f"model.params must be a dict of parameter arrays, got {type(params).__name__}")
    layer_namespace("Solver", {f"model.params[{name!r}]": value for name, value in params.items()})
    for name, value in params.items():  # np.load(..., mmap_mode="r") weights failed at the first update
        check_writable("Solver", f"model.params[{name!r}]", value, "the update rules change the parameters in place")


def param_dtype(model):
    """The model's floating dtype: ``model.dtype``, else that of its first parameter."""
    return getattr(model, "dtype", None) or next(iter(model.params.values())).dtype


def input_preparers(model, backend):
    """(prepare_inputs, prepare_labels) for ``model``: its own, else conversions onto
    ``backend`` in the dtype of its first parameter."""
    if hasattr(model, "prepare_inputs") and hasattr(model, "prepare_labels"):
        return model.prepare_inputs, model.prepare_labels
    dtype, owner = param_dtype(model), type(model).__name__
    return (lambda X: converted_inputs(backend, X, dtype, owner)), (lambda y: converted_labels(backend, y, owner))


def converted_inputs(backend, X, dtype, owner: str):
    """``X`` as an array of ``backend`` in ``dtype`` (moved there if needed); TypeError, naming
    ``owner``, for an array type its library refuses: asarray dropped a masked array's mask."""
    if backend.owns(X):
        return X if X.dtype == dtype else backend.xp.astype(X, dtype)
    refuse_unsupported_subclasses(owner, {"X": X})
    return backend.asarray(X, dtype=dtype)


def converted_labels(backend, y, owner: str):
    """``y`` as an array of ``backend``, refused as :func:`converted_inputs` refuses."""
    if backend.owns(y):
        return y
    refuse_unsupported_subclasses(owner, {"y": y})
    return backend.asarray(y)


def loss_and_grads(result, backend) -> tuple:
    """What ``model.loss(X, y)`` returned, checked to be (loss, grads) as the course's models
    return it: a scalar loss (0-d array; a number is moved onto ``backend``) and a dict of
    gradients. A model written by hand gets its slip named, not an unpacking error."""
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        if isinstance(result, (tuple, list)):
            got = f"a {type(result).__name__} of {len(result)}"
        elif is_number(result) or is_array(result) and result.ndim == 0:
            got = "the loss alone"
        else:
            got = type(result).__name__
        raise TypeError(f"the model's loss(X, y) must return (loss, grads), as xpnet's nets do; got {got}")
    loss, grads = result
    if is_number(loss):
        loss = backend.asarray(loss)
    elif not is_array(loss) or loss.ndim != 0:
        got = f"shape {tuple(loss.shape)}" if is_array(loss) else type(loss).__name__
        raise ValueError(f"the model's loss(X, y) must return a scalar loss (a 0-d array or a number); got {got}")
    if not isinstance(grads, dict):
        raise TypeError(f"the model's loss(X, y) must return its gradients as a dict; got {type(grads).__name__}")
    return loss, grads


def model_state(model, backend) -> dict:
    """A model's parameters and buffers (batchnorm running averages) as host arrays."""
    return {"params": tree_to_host(model.params, backend), "buffers": tree_to_host(model_buffers(model), backend)}


def load_model_state(model, state: dict, backend) -> None:
    """Load what :func:`model_state` returned (from any backend) onto ``backend``."""
    if not isinstance(state, dict) or not {"params", "buffers"} <= set(state):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        hint = ""
        if isinstance(state, dict) and "model" in state:
            hint = " (a Solver checkpoint keeps it under 'model': pass load_checkpoint(path)['model'])"
        elif isinstance(state, (str, os.PathLike)):
            hint = " (a file is read first: load_state_dict(load_checkpoint(path)))"
        raise ValueError(
            f"a model state is a dict with 'params' and 'buffers', as state_dict() returns; got {keys}{hint}"
        )
    if not isinstance(state["params"], dict) or not isinstance(state["buffers"], list):
        raise ValueError("a model state's 'params' is a dict of arrays and its 'buffers' a list of dicts")
    if set(model.params) != set(state["params"]):
        raise ValueError(f"saved parameters {sorted(state['params'])} do not match the model's {sorted(model.params)}")
    for name, value in state["params"].items():
        if not_float_array(value):
            raise ValueError(f"saved parameter {name} is not an array of floats (got {not_float_array(value)})")
        if tuple(value.shape) != tuple(model.params[name].shape):
            raise ValueError(
                f"saved parameter {name} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(model.params[name].shape)}"
            )
    check_saved_buffers(model, state["buffers"])
    where = non_finite_path({"params": state["params"], "buffers": state["buffers"]})
    if where is not None:  # the model would predict one class for every input, and say nothing
        raise ValueError(f"the saved state holds NaN or infinite values in {where}")
    dtype = param_dtype(model)
    model.params = tree_to_device(state["params"], backend, dtype)
    for layer, saved in zip(model_buffers(model), state["buffers"]):
        layer.update(tree_to_device(saved, backend, dtype))


def model_buffers(model) -> list:
    """A model's per-layer dicts of non-trained state (none for a model without ``buffers()``)."""
    return model.buffers() if hasattr(model, "buffers") else []


def check_saved_buffers(model, saved_buffers: list) -> None:
    """ValueError unless ``saved_buffers`` can replace ``model``'s buffers, one dict per layer
    (see :func:`_check_saved_buffer`)."""
    buffers = model_buffers(model)
    if len(saved_buffers) != len(buffers):
        raise ValueError(f"the saved state has {len(saved_buffers)} buffers (layer state), the model {len(buffers)}")
    for i, (layer, saved) in enumerate(zip(buffers, saved_buffers)):
        _check_saved_buffer(i, layer, saved)


def copied_arrays(entries: dict) -> dict:
    """Copies, on their own devices, of the arrays among ``entries`` (the other entries left out):
    the update rules and batchnorm change a model's arrays in place."""
    return {key: namespace(value).asarray(value, copy=True) for key, value in entries.items() if is_array(value)}


def buffer_arrays(model) -> list:
    """Copies of the arrays in ``model``'s buffers (batchnorm's running averages), one dict per
    layer, for :func:`restore_buffer_arrays`: the Solver keeps those of its best check with
    the best parameters, since the validation accuracy it recorded was scored with them."""
    return [copied_arrays(layer) for layer in model_buffers(model)]


def restore_buffer_arrays(model, arrays: list) -> None:
    """Write what :func:`buffer_arrays` copied back into ``model``'s buffers, in place where the
    array is there (a captured CUDA graph reads the same arrays)."""
    for layer, saved in zip(model_buffers(model), arrays):
        for key, value in saved.items():
            current = layer.get(key)
            if is_array(current) and tuple(current.shape) == tuple(value.shape) and current.dtype == value.dtype:
                current[...] = value
            else:
                layer[key] = copied_arrays({key: value})[key]


def _check_saved_buffer(i: int, layer: dict, saved) -> None:
    """ValueError naming saved buffer ``i`` unless it can replace ``layer``'s state: what a layer
    would refuse at its next call (a key it does not read, a momentum of 5), and arrays of another
    shape than the model's (a whitening filter bank of 5 filters failed at the first forward pass
    as a bias that did not match, with no word of the file)."""
    if not isinstance(saved, dict):
        raise ValueError(f"saved buffer {i} is a {type(saved).__name__}, not a dict of layer state")
    # Running averages are created on a layer's first call, so a fresh model may lack them.
    unknown = sorted(set(saved) - set(layer) - set(BATCHNORM_KEYS))
    if unknown:
        raise ValueError(f"saved buffer {i} has unknown key(s) {', '.join(unknown)}")
    for key, value in saved.items():
        current = layer.get(key)
        if not (key in RUNNING_KEYS or is_array(current)):
            continue
        if not_float_array(value):
            raise ValueError(f"saved buffer {i}'s {key} is not an array of floats (got {not_float_array(value)})")
        shape = tuple(value.shape)
        if current is None:  # a running average the layer will make at its first call: one per feature
            if len(shape) != 1:
                raise ValueError(f"saved buffer {i}'s {key} has shape {shape}, the model expects one value per feature")
        elif shape != tuple(current.shape):
            raise ValueError(f"saved buffer {i}'s {key} has shape {shape}, the model expects {tuple(current.shape)}")
    if all(key in saved for key in RUNNING_KEYS) and saved["running_mean"].shape != saved["running_var"].shape:
        raise ValueError(
            f"saved buffer {i}'s running_mean {tuple(saved['running_mean'].shape)} and running_var "
            f"{tuple(saved['running_var'].shape)} differ in shape"
        )
    variance = saved.get("running_var")
    if variance is not None and is_array(variance) and to_numpy(namespace(variance).any(variance < 0)):
        # Test mode took its square root: NaN everywhere, one class predicted for every input.
        raise ValueError(f"saved buffer {i}'s running_var holds negative values; a variance is never below 0")
    where = f"saved buffer {i}"  # the layers' own checks, in the file's terms
    if saved.get("mode", "train") not in ("train", "test"):
        raise ValueError(f"{where}: mode must be 'train' or 'test', got {short_repr(saved['mode'])}")
    check_momentum(where, saved.get("momentum", 0.9), "momentum")
    check_eps(where, saved.get("eps", 1e-5), "eps")
    if not isinstance(saved.get("unbiased_running_var", False), bool):
        raise ValueError(f"{where}: unbiased_running_var must be True or False, got {saved['unbiased_running_var']!r}")


def check_sizes(name: str, value, count: int, what: str) -> tuple:
    """``value`` as a tuple of ``count`` positive ints, or a ValueError saying ``name`` must be
    ``what``: a single number and a string (whose characters would pass for sizes) are refused whole."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or len(tuple(value)) != count:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return tuple(check_positive_int(f"each of {name}", d) for d in value)


def check_flat_input_dim(name: str, value) -> int:
    """A fully connected net's input size D as an int; a ValueError naming ``name``, and for an
    image shape such as (3, 32, 32) (the conv nets' input_dim) the flattened size to give."""
    sizes = [as_int(d) for d in value] if isinstance(value, (tuple, list)) else []
    if sizes and all(d is not None and d > 0 for d in sizes):
        flat = math.prod(d for d in sizes if d is not None)
        raise ValueError(
            f"{name} must be a positive integer, got {value!r}: a fully connected net takes the size of one "
            f"input flattened, {name}={flat}"
        )
    return check_positive_int(name, value)


def check_input_dim(input_dim) -> tuple:
    """(C, H, W) of one input as positive integers, or a ValueError naming the problem."""
    return check_sizes("input_dim", input_dim, 3, "(C, H, W)")


def check_positive_int(name: str, value) -> int:
    """``value`` as an int, or ValueError naming ``name`` when it is not a positive integer."""
    number = as_int(value)
    if number is None or number <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def check_num_classes(value) -> int:
    """At least two classes: a classifier of one class has nothing to learn."""
    number = as_int(value)
    if number is None or number < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {value!r}")
    return number


def check_finite(name: str, value, minimum=None) -> float:
    """``value`` as a float, or ValueError naming ``name`` when it is not a finite number
    (or is below ``minimum``)."""
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return float(value)


def check_hidden_dims(hidden_dims) -> list:
    """A non-empty list of positive ints (an int is taken as a list of one)."""
    if as_int(hidden_dims) is not None:
        dims = [hidden_dims]
    elif isinstance(hidden_dims, (str, bytes)):  # iterable, but its characters are not sizes
        raise ValueError(f"hidden_dims must be a positive integer or a list of them, got {hidden_dims!r}")
    else:
        try:
            dims = list(hidden_dims)
        except TypeError:  # neither a size nor a list of sizes
            raise ValueError(f"hidden_dims must be a positive integer or a list of them, got {hidden_dims!r}") from None
    if not dims:
        raise ValueError("hidden_dims must name at least one hidden layer, got an empty list")
    return [check_positive_int("each hidden layer size", d) for d in dims]


def check_keep_ratio(keep_ratio) -> float:
    """The probability of keeping a unit, or ValueError when it is outside (0, 1]."""
    if not is_number(keep_ratio) or not 0 < keep_ratio <= 1:
        raise ValueError(
            f"dropout_keep_ratio is the probability of keeping a unit and must be in (0, 1], got {keep_ratio!r}"
        )
    return float(keep_ratio)


def check_dropout(dropout) -> float:
    """The dropout probability, or ValueError when it is outside [0, 1)."""
    if not is_number(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"dropout is the probability of dropping a unit and must be in [0, 1), got {dropout!r}")
    return float(dropout)
