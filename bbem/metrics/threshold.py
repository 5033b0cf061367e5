"""The one threshold rule, and thresholds that travel with a prediction.

bbem stores probabilities as uint8 levels ``L = rint(255 p)`` (:func:`bbem.metrics.to_uint8`),
and every threshold is applied to those levels, never to a float probability: a voxel is a
cleft at threshold ``t`` when ``L >= threshold_level(t)``, the smallest level ``L`` with
``L / 255 >= t``. ``bbem infer`` (its labels), ``bbem evaluate`` (object and CREMI measures,
voxel counts), the demo and the napari plugin all go through :func:`binarize`, so a voxel is a
cleft for one exactly when it is for the others. (Comparing the float before storing would not
agree: p = 0.5005 is stored as level 128, which is a cleft at t = 128/255, while 0.5005 < t.)

A model trained with a positive-class weight is not calibrated, so 0.5 is rarely the right
threshold; the one validation chose is recorded in the checkpoint, and ``bbem infer`` stores it
with the prediction it writes, so ``bbem evaluate`` and the napari plugin default to it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from bbem.errors import UserError

#: the prediction image's attribute holding the thresholds it was made with
THRESHOLD_ATTR = "bbem"
#: Slack (in levels) for a threshold given as a float near a level: 128/255 computed in float64
#: or float32 lands a few 1e-6 levels either side of 128, and must still mean level 128.
LEVEL_TOLERANCE = 1e-4


def threshold_level(t: float) -> int:
    """The smallest uint8 level ``L`` with ``L / 255 >= t``: ``ceil(255 t)``, within
    :data:`LEVEL_TOLERANCE`. 0 gives 0, 0.5 and 128/255 give 128, 1 gives 255.

    A threshold outside [0, 1] (or NaN) is a :class:`UserError`.
    """
    try:
        x = float(t)
    except (TypeError, ValueError):
        raise UserError(f"threshold must be a probability in [0, 1], got {t!r}") from None
    if not 0.0 <= x <= 1.0:  # also refuses NaN
        raise UserError(f"threshold must be a probability in [0, 1], got {t}")
    return min(255, max(0, math.ceil(255.0 * x - LEVEL_TOLERANCE)))


def binarize(levels: np.ndarray, t: float) -> np.ndarray:
    """Cleft voxels at threshold ``t``: ``levels >= threshold_level(t)``.

    ``levels``: uint8 probability levels of any shape (e.g. z, y, x); returns bool, same shape.
    Float probabilities are refused: convert them with :func:`bbem.metrics.to_uint8` first, so
    that they are thresholded as they are stored.
    """
    a = np.asarray(levels)
    if a.dtype != np.uint8:
        raise UserError(
            f"binarize needs uint8 probability levels, got {a.dtype}: convert with to_uint8"
        )
    return a >= np.uint8(threshold_level(t))


def store_thresholds(
    store: Path, validation: float | None, labels: float | None, min_size: int | None = None
) -> None:
    """Record with a zarr prediction the threshold validation chose for its model, and the one
    (and the smallest object size) its labels were made with, so ``bbem evaluate`` and napari
    default to them rather than 0.5."""
    import zarr

    attrs = {"threshold_val": None if validation is None else float(validation)}
    attrs["labels_threshold"] = None if labels is None else float(labels)
    attrs["labels_min_size"] = min_size
    zarr.open_group(store, mode="a").attrs.update({THRESHOLD_ATTR: attrs})


def stored_threshold(prediction: str | os.PathLike) -> float | None:
    """The validation threshold stored with a zarr prediction by :func:`store_thresholds`."""
    from bbem.volumes import split_uri

    path = Path(split_uri(str(prediction))[0])
    if not (path / "zarr.json").is_file():
        return None
    import zarr

    try:
        attrs: dict[str, Any] = dict(zarr.open_group(path, mode="r").attrs)
        t = attrs.get(THRESHOLD_ATTR, {}).get("threshold_val")
    except Exception:  # foreign metadata: no stored threshold, the caller's default applies
        return None
    return float(t) if isinstance(t, (int, float)) and 0 <= t <= 1 else None
