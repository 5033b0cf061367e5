"""Random fields and in-plane geometry the synthesis stages share (every array ``[Z, Y, X]``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

# -- noise helpers --------------------------------------------------------------------------------


def _upsample(small: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Linear interpolation of ``small`` onto ``shape``, one axis at a time (cheap, separable)."""
    out = small
    for axis, n in enumerate(shape):
        m = out.shape[axis]
        pos = np.linspace(0, m - 1, n, dtype=np.float32)
        i0 = np.minimum(pos.astype(np.int64), m - 2) if m > 1 else np.zeros(n, np.int64)
        w = (pos - i0) if m > 1 else np.zeros(n, np.float32)
        i1 = np.minimum(i0 + 1, m - 1)
        bshape = [1] * out.ndim
        bshape[axis] = n
        w = w.reshape(bshape)
        out = np.take(out, i0, axis=axis) * (1 - w) + np.take(out, i1, axis=axis) * w
    return out.astype(np.float32, copy=False)


def smooth_noise(
    rng: np.random.Generator, shape: Sequence[int], sigma_px: Sequence[float]
) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field with correlation length ``sigma_px``.

    Fine fields are filtered at full size; coarse ones are drawn on a grid coarsened by their
    correlation length and interpolated up, which is far cheaper and looks the same.
    """
    shape = tuple(int(s) for s in shape)
    if max(sigma_px) <= 3:
        noise = rng.standard_normal(shape, dtype=np.float32)
        field = ndi.gaussian_filter(noise, [s if s >= 0.3 else 0 for s in sigma_px])
    else:
        step = [max(1.0, s / 1.5) for s in sigma_px]
        small = tuple(max(2, math.ceil(n / st) + 1) for n, st in zip(shape, step, strict=True))
        coarse = rng.standard_normal(small, dtype=np.float32)
        coarse = ndi.gaussian_filter(coarse, [0.8 if m > 2 else 0 for m in small], mode="wrap")
        field = _upsample(coarse, shape)
    return (field - field.mean()) / (field.std() + 1e-8)


def inplane_dilate(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
    """Binary dilation by a cross within each section (sections are 10x thicker than pixels)."""
    out = mask.copy()
    for _ in range(iterations):
        grown = out.copy()
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        grown[:, :, 1:] |= out[:, :, :-1]
        grown[:, :, :-1] |= out[:, :, 1:]
        out = grown
    return out


# -- geometry helpers ------------------------------------------------------------------------------


def boundaries(lab: np.ndarray) -> np.ndarray:
    """In-plane label boundaries, both sides marked (membranes are two-sided)."""
    b = np.zeros(lab.shape, bool)
    dy = lab[:, 1:, :] != lab[:, :-1, :]
    dx = lab[:, :, 1:] != lab[:, :, :-1]
    b[:, 1:, :] |= dy
    b[:, :-1, :] |= dy
    b[:, :, 1:] |= dx
    b[:, :, :-1] |= dx
    return b


def inplane_distance(mask: np.ndarray) -> np.ndarray:
    """Distance in pixels to the nearest ``mask`` voxel in the same section."""
    out = np.empty(mask.shape, np.float32)
    for z in range(mask.shape[0]):
        if mask[z].any():
            out[z] = ndi.distance_transform_edt(~mask[z])
        else:
            out[z] = 1e3
    return out


def stamp_vesicles(
    dark: np.ndarray,
    centres: np.ndarray,
    radii: np.ndarray,
    vs: Sequence[float],
    strength: float,
    ring_px: float,
) -> None:
    """Rings of the vesicles' membranes (``ring_px`` wide, ``strength`` dark) in every section
    a vesicle reaches; ``centres`` ``[N, 3]`` and ``radii`` ``[N]`` in nm."""
    Z, Y, X = dark.shape
    for (cz, cy, cx), r in zip(centres, radii, strict=True):
        zc = cz / vs[0] - 0.5
        for z in range(max(0, math.floor(zc - 2)), min(Z, math.ceil(zc + 3))):
            gap = max(0.0, abs((z + 0.5) * vs[0] - cz) - vs[0] / 2)  # sections are slabs
            if gap >= r:
                continue
            rs = math.sqrt(r * r - gap * gap) / vs[1]
            h = int(rs + 3)
            y0, x0 = int(cy / vs[1]), int(cx / vs[2])
            ys, xs = (
                slice(max(0, y0 - h), min(Y, y0 + h + 1)),
                slice(max(0, x0 - h), min(X, x0 + h + 1)),
            )
            yy = np.arange(ys.start, ys.stop)[:, None] + 0.5 - cy / vs[1]
            xx = np.arange(xs.start, xs.stop)[None, :] + 0.5 - cx / vs[2]
            rho = np.sqrt(yy * yy + xx * xx)
            ring = strength * np.exp(-(((rho - rs) / ring_px) ** 2)) * (1 - gap / r) ** 0.5
            dark[z, ys, xs] = np.maximum(dark[z, ys, xs], ring)


def box_slices(lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice]:
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))  # type: ignore[return-value]
