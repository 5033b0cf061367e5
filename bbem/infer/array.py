"""Cleft prediction on an in-memory volume: :func:`predict_array`, and :func:`predict_steps`, the
same as a generator that reports progress and can be stopped between blocks (what napari-bbem's
worker thread runs).

The same steps as ``bbem infer`` on one machine: the checkpoint's model and sliding window
(:func:`bbem.model.load_inference_model`, :func:`bbem.infer.make_plan`), raw normalised by
:func:`bbem.volumes.normalize_raw`, MONAI's Gaussian-blended windows block by block
(:func:`bbem.infer.predict_blocks`), probabilities stored as uint8 levels
(:func:`bbem.metrics.to_uint8`). Volumes too large for memory go through ``bbem infer``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Generator
from typing import Any, cast

import numpy as np

from bbem.errors import UserError

#: Largest volume predicted in memory (voxels); float32 input and output take 8 bytes each.
MAX_VOXELS = 2**27


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
    """:func:`predict_array` as a generator.

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
            f"the image has {math.prod(shape):,} voxels, more than is predicted in memory "
            f"({MAX_VOXELS:,}): run `bbem infer CHECKPOINT INPUT OUT.zarr` and open OUT.zarr"
        )
    if not os.path.isfile(checkpoint):
        raise UserError(f"checkpoint {checkpoint} does not exist: choose a .pt file")
    from bbem.volumes import normalize_raw

    raw = np.asarray(raw)
    normalize_raw(raw[:0])  # its one error for a dtype it cannot scale, before the model loads
    yield "loading model..."
    from bbem.infer.plan import make_plan
    from bbem.infer.region import model_factor, predict_blocks
    from bbem.metrics import to_uint8
    from bbem.model import load_inference_model

    model, info = load_inference_model(checkpoint)
    if roi_size is None:
        patch = ((info.get("config") or {}).get("data") or {}).get("patch_size")
        roi_size = tuple(patch) if patch else None
    plan = make_plan(shape, model_factor(model, info["model_config"]), block=block, roi=roi_size)
    prob = yield from predict_blocks(model, raw, plan, tta=tta)
    return to_uint8(prob)
