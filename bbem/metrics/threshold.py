"""Thresholds that travel with a prediction.

A model trained with a positive-class weight is not calibrated, so 0.5 is rarely the right
threshold; the one validation chose is recorded in the checkpoint, and ``bbem infer`` stores it
with the prediction it writes, so ``bbem evaluate`` and the napari plugin default to it.
"""

from __future__ import annotations

import os
from pathlib import Path

#: the prediction image's attribute holding the thresholds it was made with
THRESHOLD_ATTR = "bbem"


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
        t = dict(zarr.open_group(path, mode="r").attrs).get(THRESHOLD_ATTR, {}).get("threshold_val")
    except Exception:  # foreign metadata: no stored threshold, the caller's default applies
        return None
    return float(t) if isinstance(t, (int, float)) and 0 <= t <= 1 else None
