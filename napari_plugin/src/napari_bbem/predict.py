"""Cleft prediction on an in-memory volume (what the "Predictions" widget runs), without Qt.

The same steps as ``bbem infer`` for one block: the checkpoint's model and sliding window
(:func:`bbem.model.load_inference_model`, :func:`bbem.infer.make_plan`), raw normalised by
:func:`bbem.volumes.normalize_raw`, MONAI's Gaussian-blended windows
(:func:`bbem.infer.predict_region`), probabilities stored as uint8 levels
(:func:`bbem.metrics.to_uint8`). Volumes too large for memory go through ``bbem infer``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Generator
from typing import Any, cast

import numpy as np

from bbem.errors import UserError

#: Largest volume predicted in the viewer (voxels); float32 input and output take 8 bytes each.
MAX_VOXELS = 2**27
#: How far float raw may stray outside [0, 1] before the widget warns.
RANGE_SLACK = 0.1


def predict_array(
    checkpoint: str | os.PathLike,
    raw: Any,
    tta: bool = False,
    roi_size: tuple[int, int, int] | None = None,
    block: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Cleft probabilities ``[Z, Y, X]`` uint8 (``rint(255 p)``) for raw EM ``[Z, Y, X]``.

    ``checkpoint``: a training checkpoint or an export. ``raw``: a numpy or dask array (uint8,
    uint16 or float in [0, 1]), read whole. ``roi_size``: the sliding window; by default the
    checkpoint's training patch size (as ``bbem infer``), capped to the volume. ``block``: the
    blocks progress is counted in (``bbem infer``'s default); the result does not depend on it.
    """
    steps = predict_steps(checkpoint, raw, tta=tta, roi_size=roi_size, block=block)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return cast(np.ndarray, done.value)


def predict_steps(
    checkpoint: str | os.PathLike,
    raw: Any,
    tta: bool = False,
    roi_size: tuple[int, int, int] | None = None,
    block: tuple[int, int, int] | None = None,
) -> Generator[str | tuple[int, int], None, np.ndarray]:
    """:func:`predict_array` as a generator (what the widget's worker thread runs).

    Yields ``"loading model..."`` before torch and the checkpoint load, then ``(done, total)``
    blocks (:func:`bbem.infer.predict_blocks`), from ``(0, total)`` to ``(total, total)``;
    returns the uint8 probabilities. Not resuming it stops the prediction between blocks.
    """
    shape = tuple(int(s) for s in np.shape(raw))
    if len(shape) != 3:
        raise UserError(
            f"the image has shape {shape}: cleft prediction needs a 3D volume (z, y, x) with "
            "one channel"
        )
    if math.prod(shape) > MAX_VOXELS:
        raise UserError(
            f"the image has {math.prod(shape):,} voxels, more than the viewer predicts in memory "
            f"({MAX_VOXELS:,}): run `bbem infer CHECKPOINT INPUT OUT.zarr` and open OUT.zarr"
        )
    if not os.path.isfile(checkpoint):
        raise UserError(f"checkpoint {checkpoint} does not exist: choose a .pt file")
    from bbem.volumes import normalize_raw

    raw = np.asarray(raw)
    normalize_raw(raw[:0])  # its one error for a dtype it cannot scale, before the model loads
    yield "loading model..."
    from bbem.infer import make_plan, model_factor, predict_blocks
    from bbem.metrics import to_uint8
    from bbem.model import load_inference_model

    model, info = load_inference_model(checkpoint)
    if roi_size is None:
        patch = ((info.get("config") or {}).get("data") or {}).get("patch_size")
        roi_size = tuple(patch) if patch else None
    plan = make_plan(shape, model_factor(model, info["model_config"]), block=block, roi=roi_size)
    prob = yield from predict_blocks(model, raw, plan, tta=tta)
    return to_uint8(prob)


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
    """The validation threshold of best F1 a training checkpoint recorded, else None.

    Training writes ``metrics["threshold_best"]`` with every evaluation; an export keeps the
    metrics it was made from under ``info``, when it has them.
    """
    from bbem.model import load_checkpoint

    data = load_checkpoint(checkpoint)
    metrics = data.get("metrics") or (data.get("info") or {}).get("metrics") or {}
    t = metrics.get("threshold_best")
    return float(t) if isinstance(t, (int, float)) and 0.0 <= t <= 1.0 else None


def threshold_clefts(prob: np.ndarray, threshold: float) -> np.ndarray:
    """Connected clefts ``[Z, Y, X]`` uint32 (0 background, 1..n) at ``threshold``.

    ``prob``: uint8 levels (``rint(255 p)``, as :func:`predict_array` and ``bbem infer`` write)
    or float probabilities (stored as levels first); ``threshold`` a probability in [0, 1].
    A voxel is a cleft by bbem's one rule (:func:`bbem.metrics.binarize`: level >=
    ``threshold_level(threshold)``), so the viewer shows what ``bbem infer`` labels and
    ``bbem evaluate`` counts. 26-connectivity, as bbem's object metrics count clefts.
    """
    import cc3d

    from bbem.metrics import as_levels, binarize

    mask = binarize(as_levels(np.asarray(prob)), threshold)
    return cc3d.connected_components(mask, connectivity=26).astype(np.uint32, copy=False)
