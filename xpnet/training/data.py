"""The Solver's data: validated once, moved to the model's device once."""

from __future__ import annotations

from ..data_checks import check_finite_values, validate_split
from ..input_checks import is_array

__all__ = ["checked_rows", "device_data", "checked_labelled_set"]


def _validate_for(model, data: dict, split: str, **options) -> None:
    validate_split(data, split, getattr(model, "num_classes", None), getattr(model, "input_dim", None), **options)


def checked_rows(data: dict, model) -> int:
    """The training set's row count, after the host's checks of both splits (shapes, dtypes and
    label ranges) have named any problem; nothing has moved to the device yet."""
    for split in ("train", "val"):
        _validate_for(model, data, split, check_finite=False)
    return data["X_train"].shape[0]


def checked_labelled_set(X, y, model, prepare_inputs, prepare_labels, caller: str) -> tuple:
    """(X, y) on the model's device, checked as the training data are (one integer label in
    [0, num_classes) per row, finite inputs of the model's shape), with ``caller`` naming any
    problem: a test set whose labels count from 1 would otherwise score as wrong predictions.
    Arrays are checked as given, so that messages name the dtypes the caller passed; other
    sequences once converted."""
    X = X if is_array(X) else prepare_inputs(X)
    y = y if is_array(y) else prepare_labels(y)
    _validate_for(model, {"X_set": X, "y_set": y}, "set", check_finite=False, names={"X_set": "X", "y_set": "y"},
                  caller=caller)  # fmt: skip
    X, y = prepare_inputs(X), prepare_labels(y)
    check_finite_values(X, "X_set", f"{caller}: X")  # on the device, as device_data does
    return X, y


def device_data(data: dict, prepare_inputs, prepare_labels) -> tuple:
    """(X_train, y_train, X_val, y_val) of data that :func:`checked_rows` has passed, on the device.

    Finiteness is checked after the move, where a GPU does it in one reduction instead of a
    pass over the host array.
    """
    arrays = (
        prepare_inputs(data["X_train"]),
        prepare_labels(data["y_train"]),
        prepare_inputs(data["X_val"]),
        prepare_labels(data["y_val"]),
    )
    for key, X in (("X_train", arrays[0]), ("X_val", arrays[2])):
        check_finite_values(X, key)
    return arrays
