"""Validation of training data, done once before it is moved to the device."""

from __future__ import annotations

from collections.abc import Mapping

from array_api_compat import array_namespace

from .backend.dispatch import refusal
from .input_checks import is_array

__all__ = ["validate_split", "checked_labelled_set", "check_finite_values", "check_image_batch", "REQUIRED_KEYS"]

REQUIRED_KEYS = ("X_train", "y_train", "X_val", "y_val")


def _image_layout_hint(shape, expected, name: str = "X") -> str:
    """A hint when a batch of ``shape`` holds (C, H, W) ``expected`` images in another layout:
    stored channels last, as ``load_CIFAR10`` returns them (the likeliest slip), flattened into
    rows, as the fully connected nets take them, one image without its batch axis, or
    one-channel images without their channel axis. The
    expression that fixes it names the array ``name``."""
    if len(expected) != 3:
        return ""
    c, h, w = expected
    shape = tuple(shape)
    if shape[1:] == (h, w, c) and c != h:
        return f"; these look like images with their channels last: {name}.transpose(0, 3, 1, 2) puts them first"
    if len(shape) == 2 and shape[1] == c * h * w:
        return f"; these look like images flattened into rows: {name}.reshape(-1, {c}, {h}, {w}) restores their shape"
    if shape == tuple(expected):
        return f"; for one image, give a batch of one: {name}[None]"
    if c == 1 and shape[1:] == (h, w):  # grayscale images as load_digits and most loaders give them
        return f"; these look like one-channel images without their channel axis: {name}[:, None] adds it"
    return ""


def _labels_hint(y, y_name: str, rows: int | None = None) -> str:
    """How to turn the likeliest wrong label layouts into class indices: a column (N, 1) or a
    row (1, N) of them (as scipy.io.loadmat and np.matrix give them; N the ``rows`` of X), one
    row of one-hot or scores per sample (N, C), or whole numbers stored as floats."""
    if y.ndim == 2 and (y.shape[1] == 1 or (y.shape[0] == 1 and y.shape[1] == rows != 1)):
        return f"; a {'column' if y.shape[1] == 1 else 'row'} of labels: {y_name}.reshape(-1) makes it 1-D"
    if y.ndim == 2:
        return f"; for one-hot rows (or scores), {y_name}.argmax(axis=1) gives the class indices"
    xp = array_namespace(y)
    if y.ndim == 1 and xp.isdtype(y.dtype, "real floating") and bool(xp.all(y == xp.round(y))):
        return f"; these are whole numbers: {y_name}.astype(int) makes them labels"
    return ""


def check_image_batch(owner: str, X, expected: tuple) -> None:
    """ValueError naming ``owner`` unless X is (N, *expected), ``expected`` being (C, H, W)."""
    if tuple(X.shape[1:]) != tuple(expected):
        raise ValueError(
            f"{owner}: inputs must be (N, {', '.join(map(str, expected))}), got {tuple(X.shape)}"
            + _image_layout_hint(X.shape, expected)
        )


def validate_split(
    data: dict,
    split: str,
    num_classes: int | None,
    input_shape=None,
    check_finite=True,
    names: dict | None = None,
    caller: str | None = None,
) -> None:
    """Check ``data['X_<split>']`` and ``data['y_<split>']``; raise ValueError naming the problem
    (after ``caller + ': '`` when given: a function that took the arrays as its arguments).

    Checks: both present; X has a leading dimension matching y's length; y is a
    1-D integer array with labels in [0, num_classes); X is finite (unless
    ``check_finite`` is False: then call :func:`check_finite_values` later); X's sample
    shape flattens to ``input_shape``'s size when given (an int), or equals it
    (a tuple, for image models). ``names`` maps a key to what messages call it (default:
    ``data['X_train']``), for callers that took the arrays as arguments of their own.
    """
    try:
        _validate_split(data, split, num_classes, input_shape, check_finite, names)
    except ValueError as error:
        if caller is None:
            raise
        raise ValueError(f"{caller}: {error}") from None


def _validate_split(data, split, num_classes, input_shape, check_finite, names) -> None:
    if not isinstance(data, Mapping):  # a list of arrays would fail the key test below inside NumPy
        raise ValueError(
            f"data must be a dict with keys {', '.join(REQUIRED_KEYS)}, got {type(data).__name__}"
            + (f" of {len(data)}" if isinstance(data, (list, tuple)) else "")
        )
    x_key, y_key = f"X_{split}", f"y_{split}"
    x_name, y_name = ((names or {}).get(key, f"data[{key!r}]") for key in (x_key, y_key))
    for key in (x_key, y_key):
        if key not in data:
            near = [k for k in data if isinstance(k, str) and k.lower() == key.lower()]
            hint = f" (it has {near[0]!r}: the keys are case-sensitive)" if near else ""
            raise ValueError(f"data is missing {key!r}{hint}; it needs {', '.join(REQUIRED_KEYS)}")
    X, y = data[x_key], data[y_key]
    for name, value in ((x_name, X), (y_name, y)):
        if not is_array(value):
            raise ValueError(f"{name} must be an array, got {type(value).__name__}")
        reason = refusal(value)  # np.matrix (its labels come as a row), a masked array (the mask would be dropped)
        if reason is not None:
            raise ValueError(f"{name} is a {type(value).__name__}: {reason}")
    if y.ndim != 1:
        rows = X.shape[0] if X.ndim else None
        # inputs where the labels go (an argument order slip); a one-hot y as wide as X's rows is not one
        like_inputs = y.ndim == X.ndim > 1 and tuple(y.shape[1:]) == tuple(X.shape[1:])
        if X.ndim == 1:
            hint = f"; {x_name} looks like labels and {y_name} like inputs: the inputs come first"
        elif like_inputs and (y.ndim > 2 or num_classes is not None and y.shape[1] != num_classes):
            hint = f"; {y_name} holds inputs shaped as {x_name}'s samples, not labels: are the arguments in order?"
        else:
            hint = _labels_hint(y, y_name, rows)
        raise ValueError(f"{y_name} must be 1-D, got shape {tuple(y.shape)}" + hint)
    if X.ndim < 1 or X.shape[0] != y.shape[0]:
        raise ValueError(f"{x_name} has {X.shape[0] if X.ndim else 0} rows but {y_name} has {y.shape[0]} labels")
    if y.shape[0] == 0:
        raise ValueError(f"{x_name} is empty")
    y_ns = array_namespace(y)
    if not y_ns.isdtype(y.dtype, "integral"):
        raise ValueError(f"{y_name} must hold integer class labels, got dtype {y.dtype}" + _labels_hint(y, y_name))
    low, high = int(y_ns.min(y)), int(y_ns.max(y))
    if low < 0 or (num_classes is not None and high >= num_classes):
        bad = low if low < 0 else high
        raise ValueError(f"{y_name} has label {bad} outside [0, {num_classes}) for a model with {num_classes} classes")
    if array_namespace(X).isdtype(X.dtype, "complex floating"):  # the move to the model's dtype drops .imag
        raise ValueError(
            f"{x_name} holds complex numbers (dtype {X.dtype}), and the nets take real inputs: "
            f"give the parts as features of their own, or abs({x_name})"
        )
    if check_finite:
        check_finite_values(X, x_key, x_name)
    if isinstance(input_shape, tuple):  # an image model: the sample shape itself must match
        if tuple(X.shape[1:]) != input_shape:
            raise ValueError(
                f"{x_name} samples have shape {tuple(X.shape[1:])} but the model expects {input_shape}"
                + _image_layout_hint(X.shape, input_shape, x_name)
            )
    elif input_shape is not None:
        features = 1
        for d in X.shape[1:]:
            features *= d
        if features != input_shape:
            raise ValueError(
                f"{x_name} samples have shape {tuple(X.shape[1:])} ({features} values) "
                f"but the model expects {input_shape} inputs"
            )


def checked_labelled_set(X, y, model, prepare_inputs, prepare_labels, caller: str, names=("X", "y")) -> tuple:
    """(X, y) on the model's device, checked as a Solver checks its training data (one integer
    label in [0, num_classes) per row, finite inputs of the model's shape), with ``caller`` and
    ``names`` naming any problem: a test set whose labels count from 1 would otherwise score as
    wrong predictions. Arrays are checked as given, so that messages name the dtypes the caller
    passed (not the device library's); other sequences once converted. Finiteness is checked
    after the move, where a GPU does it in one reduction."""
    X = X if is_array(X) else prepare_inputs(X)
    y = y if is_array(y) else prepare_labels(y)
    given = {"X_set": names[0], "y_set": names[1]}
    num_classes, input_shape = getattr(model, "num_classes", None), getattr(model, "input_dim", None)
    validate_split({"X_set": X, "y_set": y}, "set", num_classes, input_shape, False, given, caller)
    X, y = prepare_inputs(X), prepare_labels(y)
    check_finite_values(X, "X_set", f"{caller}: {names[0]}")
    return X, y


def check_finite_values(X, key: str, name: str | None = None) -> None:
    """ValueError when floating ``X`` holds NaN or infinite values (``name``: what to call it,
    default ``data[key]``). On a GPU run this on the device copy: one reduction there instead
    of a pass over the host array before the copy."""
    xp = array_namespace(X)
    if xp.isdtype(X.dtype, "real floating") and not bool(xp.all(xp.isfinite(X))):
        raise ValueError(f"{name or f'data[{key!r}]'} contains NaN or infinite values")
