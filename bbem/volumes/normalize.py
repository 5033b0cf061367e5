"""Raw EM intensities as network input: the one rule training and inference share."""

from __future__ import annotations

import numpy as np

from bbem.errors import UserError


def normalize_raw(block: np.ndarray) -> np.ndarray:
    """Raw EM intensities -> float32 network input, the one rule training and inference share.

    uint8 -> x / 255, uint16 -> x / 65535, floating point -> unchanged (already normalised).
    Any shape; the result has the same shape and dtype float32.
    """
    a = np.asarray(block)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255)
    if a.dtype == np.uint16:
        return a.astype(np.float32) / np.float32(65535)
    if np.issubdtype(a.dtype, np.floating):
        return a.astype(np.float32, copy=False)
    raise UserError(
        f"raw intensities of dtype {a.dtype} are not supported: convert the volume to uint8, "
        "uint16 or float32"
    )
