"""What the "Predictions" widget runs, without Qt: bbem's in-memory prediction
(:func:`bbem.infer.predict_array`, :func:`bbem.infer.predict_steps`, re-exported here), a
warning for float raw the model would see unscaled, the checkpoint's validation threshold, and
the clefts at a threshold by bbem's one rule.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from bbem.infer.array import MAX_VOXELS, predict_array, predict_steps

__all__ = [
    "MAX_VOXELS",
    "best_threshold",
    "predict_array",
    "predict_steps",
    "raw_range_warning",
    "threshold_clefts",
]

#: How far float raw may stray outside [0, 1] before the widget warns.
RANGE_SLACK = 0.1


def raw_range_warning(raw: Any, name: str = "the image") -> str | None:
    """A warning when float raw is far outside [0, 1] (the model would see it unscaled), else None.

    uint8 / uint16 raw is scaled by :func:`bbem.volumes.normalize_raw`; floats are taken as
    already normalised, so float data in [0, 255] or [0, 65535] gives meaningless predictions.
    """
    if not np.issubdtype(np.dtype(getattr(raw, "dtype", np.float32)), np.floating):
        return None
    if math.prod(np.shape(raw)) > MAX_VOXELS:  # refused by predict_array anyway: do not read it
        return None
    lo, hi = (float(np.asarray(f(raw))) for f in (np.nanmin, np.nanmax))
    if lo >= -RANGE_SLACK and hi <= 1.0 + RANGE_SLACK:
        return None
    return (
        f"{name} is {np.dtype(raw.dtype)} with values in [{lo:.3g}, {hi:.3g}]: the model expects "
        "uint8 / uint16 raw EM, or float already normalised to [0, 1]; convert the layer "
        "(e.g. to uint8) or the prediction is meaningless"
    )


def best_threshold(checkpoint: str | os.PathLike) -> float | None:
    """The validation threshold of best F1 a checkpoint (or export) recorded, else None."""
    from bbem.model import load_checkpoint, validation_threshold

    return validation_threshold(load_checkpoint(checkpoint))


def threshold_clefts(prob: np.ndarray, threshold: float, min_size: int = 0) -> np.ndarray:
    """Cleft instances ``[Z, Y, X]`` uint32 (0 background, 1..n) at ``threshold``.

    ``prob``: uint8 levels (``rint(255 p)``, as :func:`predict_array` and ``bbem infer`` write)
    or float probabilities (stored as levels first); ``threshold`` a probability in [0, 1].
    A voxel is a cleft by bbem's one rule (:func:`bbem.metrics.binarize`: level >=
    ``threshold_level(threshold)``), so the viewer shows what ``bbem infer`` labels and
    ``bbem evaluate`` counts. The ids are those ``bbem infer --threshold --min-size`` writes
    (:func:`bbem.metrics.label_objects`): 26-connected components, those under ``min_size``
    voxels dropped, numbered in the z-y-x scan order of their first voxel.
    """
    from bbem.metrics import as_levels, binarize, label_objects

    mask = binarize(as_levels(np.asarray(prob)), threshold)
    out = np.zeros(mask.shape, dtype=np.uint32)
    label_objects(mask, out, min_size=int(min_size), slab=max(1, mask.shape[0]))
    return out
