"""The Solver's data: validated once, moved to the model's device once."""

from __future__ import annotations

from ..data_checks import check_finite_values, validate_split

__all__ = ["checked_rows", "device_data"]


def checked_rows(data: dict, model) -> int:
    """The training set's row count, after the host's checks of both splits (shapes, dtypes and
    label ranges) have named any problem; nothing has moved to the device yet."""
    for split in ("train", "val"):
        validate_split(data, split, getattr(model, "num_classes", None), getattr(model, "input_dim", None), False)
    return data["X_train"].shape[0]


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
