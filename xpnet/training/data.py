"""The Solver's data: validated once, moved to the model's device once."""

from __future__ import annotations

from ..data_checks import check_finite_values, validate_split

__all__ = ["device_data"]


def device_data(data: dict, model, prepare_inputs, prepare_labels, batch_size: int) -> tuple:
    """(X_train, y_train, X_val, y_val) on the device, after the checks that name each problem.

    Shapes, dtypes and label ranges are checked on the host; finiteness after the move,
    where a GPU does it in one reduction instead of a pass over the host array.
    """
    for split in ("train", "val"):
        validate_split(data, split, getattr(model, "num_classes", None), getattr(model, "input_dim", None), False)
    rows = data["X_train"].shape[0]
    if batch_size > rows:
        raise ValueError(f"batch_size={batch_size} is larger than the training set ({rows} rows)")
    arrays = (
        prepare_inputs(data["X_train"]),
        prepare_labels(data["y_train"]),
        prepare_inputs(data["X_val"]),
        prepare_labels(data["y_val"]),
    )
    for key, X in (("X_train", arrays[0]), ("X_val", arrays[2])):
        check_finite_values(X, key)
    return arrays
