"""Stages 1 and 2: neurites (a warped power diagram of lines), then cytoplasm, membranes and
mitochondria as brightness and darkness layers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from bbem.synth.constants import SynthConstants
from bbem.synth.fields import box_slices, smooth_noise

# -- stage 1: neurites ----------------------------------------------------------------------------


def neurites(
    shape: Sequence[int], vs: Sequence[float], rng: np.random.Generator, c: SynthConstants
) -> np.ndarray:
    """Neuron ids (uint64, 1..N) of a warped power diagram of lines, ``[Z, Y, X]``."""
    Z, Y, X = shape
    ext = np.array([Z * vs[0], Y * vs[1], X * vs[2]])  # nm
    area_um2 = ext[1] * ext[2] / 1e6
    n = int(
        rng.poisson(c.neurites_per_um2 * area_um2 * (1 + c.neurites_per_um_depth * ext[0] / 1000))
    )
    n += c.minneurites
    # directions: most neurites cross the sections at an angle; the rest run in-plane
    theta = np.where(
        rng.random(n) < c.crossing_fraction,
        rng.uniform(*c.crossing_tilt, n),
        rng.uniform(*c.inplane_tilt, n),
    )
    phi = rng.uniform(0, 2 * math.pi, n)
    u = np.stack([np.cos(theta), np.sin(theta) * np.sin(phi), np.sin(theta) * np.cos(phi)], 1)
    centre = rng.uniform(*c.centre_span, (n, 3)) * ext
    radius = np.exp(rng.normal(math.log(c.radius_median), c.radius_log_sd, n))
    # half resolution in-plane: the distance evaluation is the cost; the warp hides the steps
    hs = (Z, (Y + 1) // 2, (X + 1) // 2)
    zz, yy, xx = np.meshgrid(
        ((np.arange(hs[0]) + 0.5) * vs[0]).astype(np.float32),
        ((np.arange(hs[1]) * 2 + 0.5) * vs[1]).astype(np.float32),
        ((np.arange(hs[2]) * 2 + 0.5) * vs[2]).astype(np.float32),
        indexing="ij",
    )
    # large-scale bending of the neurites (coordinates warped before distances)
    bz, by, bx = c.bend_length
    lsig = [max(1.0, bz / vs[0]), by / (2 * vs[1]), bx / (2 * vs[2])]
    zz += c.bend * 0.5 * smooth_noise(rng, hs, lsig)
    yy += c.bend * smooth_noise(rng, hs, lsig)
    xx += c.bend * smooth_noise(rng, hs, lsig)
    # power distance to line i: |p - c|^2 - ((p - c).u)^2 - r^2. Dropping |p|^2 (the same for
    # every line) leaves -(p.u)^2 - 2 p.c' + k with c' = c - (c.u)u: two matmuls per chunk.
    cu = (centre * u).sum(1)
    cperp = centre - cu[:, None] * u
    k = (cperp**2).sum(1) - radius**2
    pts = np.stack([zz.ravel(), yy.ravel(), xx.ravel()], 1).astype(np.float32)
    ut, ct = u.T.astype(np.float32), cperp.T.astype(np.float32)
    label: np.ndarray = np.empty(len(pts), np.uint32)
    for start in range(0, len(pts), 1 << 15):
        chunk = pts[start : start + (1 << 15)]
        pu = chunk @ ut
        score = k.astype(np.float32) - pu * pu - 2 * (chunk @ ct)
        label[start : start + len(chunk)] = score.argmin(1) + 1
    label = label.reshape(hs)
    # full resolution: sample the half-res ids at finely warped positions (wiggly membranes)
    fine = [max(1.0, c.wiggle_length_z / vs[0]), c.wiggle_length_px, c.wiggle_length_px]
    wy = c.wiggle_px * smooth_noise(rng, shape, fine)
    wx = c.wiggle_px * smooth_noise(rng, shape, fine)
    gz, gy, gx = np.meshgrid(
        np.arange(Z, dtype=np.float32),
        (np.arange(Y, dtype=np.float32) - 0.5) / 2,
        (np.arange(X, dtype=np.float32) - 0.5) / 2,
        indexing="ij",
    )
    coords = np.stack([gz, gy + wy / 2, gx + wx / 2])
    full = ndi.map_coordinates(label, coords, order=0, mode="nearest")
    # renumber 1..K so ids are compact
    present = np.bincount(full.ravel(), minlength=n + 1) > 0
    lut = np.cumsum(present).astype(np.uint64)
    return lut[full]


# -- stage 2: cytoplasm, membranes, mitochondria --------------------------------------------------


def cytoplasm_and_membranes(
    lab: np.ndarray, dist: np.ndarray, rng: np.random.Generator, c: SynthConstants
) -> tuple[np.ndarray, np.ndarray]:
    """Brightness ``img`` and darkness ``dark`` (float32 ``[Z, Y, X]`` in [0, 1]; the image is
    ``img * (1 - dark)``) of textured cells and their membranes."""
    shape = lab.shape
    n_cells = int(lab.max())
    cell_level = rng.uniform(*c.cell_brightness, n_cells + 1).astype(np.float32)
    dark_cells = rng.random(n_cells + 1) < c.dark_cell_fraction
    dimming = rng.uniform(*c.dark_cell_dimming, int(dark_cells.sum())).astype(np.float32)
    cell_level[dark_cells] -= dimming
    img = cell_level[lab]
    img += c.texture_coarse * smooth_noise(rng, shape, c.texture_coarse_px)
    img += c.texture_fine * smooth_noise(rng, shape, c.texture_fine_px)
    dark = np.zeros(shape, np.float32)
    speck = smooth_noise(rng, shape, c.speck_px)
    dark = np.maximum(dark, np.clip((speck - c.speck_threshold) * c.speck_gain, 0, c.speck_gain))
    depth = c.membrane_depth + c.membrane_depth_sd * smooth_noise(rng, shape, c.membrane_depth_px)
    depth = np.clip(depth, *c.membrane_depth_clip)
    width = c.membrane_width_px + c.membrane_width_sd * smooth_noise(
        rng, shape, c.membrane_width_length_px
    )
    width = np.clip(width, *c.membrane_width_clip)
    membrane = depth * np.exp(-((dist / width) ** 2))
    # boundaries crossing between sections: membranes seen obliquely, a grey smear
    zcross = np.zeros(shape, bool)
    if shape[0] > 1:
        zc = lab[1:] != lab[:-1]
        zcross[1:] |= zc
        zcross[:-1] |= zc
    blur = (0, c.oblique_blur_px, c.oblique_blur_px)
    smear = ndi.gaussian_filter(zcross.astype(np.float32), blur) * c.oblique_darkness
    dark = np.maximum(dark, np.maximum(membrane, smear))
    return img, dark


def mitochondria(
    dark: np.ndarray,
    lab: np.ndarray,
    dist: np.ndarray,
    vs: Sequence[float],
    rng: np.random.Generator,
    c: SynthConstants,
) -> None:
    """Dark ellipsoids with a darker rim and striped cristae, inside single cells (in ``dark``)."""
    Z, Y, X = lab.shape
    depth_um = max(1.0, Z * vs[0] / 1000)
    n = int(rng.poisson(c.mito_per_um2 * Y * X * vs[1] * vs[2] / 1e6 * depth_um))
    inner = np.argwhere(dist > c.mito_min_depth_px)
    if len(inner) == 0:
        return
    for _ in range(n):
        p = inner[rng.integers(len(inner))]
        cell = lab[tuple(p)]
        half = np.array(
            [
                rng.uniform(*c.mito_half_length),
                rng.uniform(*c.mito_half_width),
                rng.uniform(*c.mito_half_width),
            ]
        )
        # random orientation of the long axis, then an orthonormal frame
        a = rng.standard_normal(3)
        a /= np.linalg.norm(a)
        b = np.cross(a, rng.standard_normal(3))
        b /= np.linalg.norm(b)
        frame = np.stack([a, b, np.cross(a, b)])
        reach = half.max()
        lo = np.maximum(p - np.ceil(reach / np.array(vs)).astype(int), 0)
        hi = np.minimum(p + np.ceil(reach / np.array(vs)).astype(int) + 1, lab.shape)
        box = box_slices(lo, hi)
        grid = np.meshgrid(
            *[(np.arange(lo[k], hi[k]) - p[k]) * vs[k] for k in range(3)], indexing="ij"
        )
        q = np.stack(grid, -1) @ frame.T  # coordinates in the mitochondrion's frame
        r = np.sqrt(((q / half) ** 2).sum(-1))
        inside = (r < 1) & (lab[box] == cell)
        cristae = 0.5 + 0.5 * np.sin(2 * math.pi * q[..., 0] / rng.uniform(*c.cristae_period))
        val = np.where(r > 0.8, c.mito_rim, c.mito_matrix + c.cristae_contrast * cristae)
        dark[box] = np.where(inside, np.maximum(dark[box], val), dark[box])
