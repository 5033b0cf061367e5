"""Synthetic CREMI-like EM with cleft labels: the embedded default data, made from a seed.

The generator builds the tissue first and images it second:

1. Neurites: a power diagram of curved lines (mostly running across sections, some in-plane)
   in physical coordinates, warped by smooth noise. This gives cells of varied size whose
   profiles drift from section to section, as in anisotropic serial-section EM.
2. Membranes darken along in-plane label boundaries; where a boundary runs obliquely through a
   section it shows as a grey smear. Cytoplasm is textured, with small dark organelles;
   mitochondria are dark ellipsoids with a rim and cristae.
3. Synapses: at chosen contacts, the cleft is labelled as a sheet 3 voxels thick (1 presynaptic,
   2 postsynaptic) spanning a few sections; the presynaptic side gets a vesicle cloud and the
   postsynaptic side a dark density. Look-alike contacts get the same densities without vesicles
   and without a label, and a few vesicle clouds sit beside plain membranes, so a model has to
   learn the context rather than "dark line" or "vesicles".
4. Imaging: blur, shot and read noise, uneven contrast between sections and across each
   section, and occasional missing or shifted sections (labels shift with their section).

Everything is drawn from one ``numpy.random.Generator``, so a seed fixes the volume.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from bbem.atomic import atomic_output, check_not_input, check_output, output_lock
from bbem.errors import UserError

DEFAULT_SHAPE = (32, 256, 256)
DEFAULT_VOXEL_SIZE = (40.0, 4.0, 4.0)
#: the keys of the zarr container ``write_synthetic`` writes (CREMI's hdf5 layout)
KEYS = {
    "raw": "volumes/raw",
    "clefts": "volumes/labels/clefts",
    "neuron_ids": "volumes/labels/neuron_ids",
}
MIN_SHAPE = (1, 32, 32)
#: Grey levels at the 0, 5, ..., 100th percentiles of ../shared/data's real ssTEM stacks
#: (vnc-stack1-left.hdf and vnc-stack2-raw.tif agree to one level).
REAL_EM_QUANTILES = (
    0,
    32,
    49,
    63,
    75,
    86,
    96,
    106,
    116,
    125,
    134,
    143,
    151,
    159,
    167,
    174,
    181,
    188,
    196,
    206,
    255,
)


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


def _smooth_noise(
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
        small = tuple(max(2, math.ceil(n / st) + 1) for n, st in zip(shape, step))
        coarse = rng.standard_normal(small, dtype=np.float32)
        coarse = ndi.gaussian_filter(coarse, [0.8 if m > 2 else 0 for m in small], mode="wrap")
        field = _upsample(coarse, shape)
    return (field - field.mean()) / (field.std() + 1e-8)


def _inplane(mask: np.ndarray, iterations: int = 1) -> np.ndarray:
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


# -- tissue ---------------------------------------------------------------------------------------


def _neurites(shape: Sequence[int], vs: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Neuron ids (uint64, 1..N) of a warped power diagram of lines, ``[Z, Y, X]``."""
    Z, Y, X = shape
    ext = np.array([Z * vs[0], Y * vs[1], X * vs[2]])  # nm
    area_um2 = ext[1] * ext[2] / 1e6
    n = int(rng.poisson(22 * area_um2 * (1 + 0.25 * ext[0] / 1000))) + 6
    # directions: most neurites cross the sections at an angle; a quarter run in-plane
    theta = np.where(rng.random(n) < 0.75, rng.uniform(0, 0.9, n), rng.uniform(1.1, math.pi / 2, n))
    phi = rng.uniform(0, 2 * math.pi, n)
    u = np.stack([np.cos(theta), np.sin(theta) * np.sin(phi), np.sin(theta) * np.cos(phi)], 1)
    centre = rng.uniform(-0.1, 1.1, (n, 3)) * ext
    radius = np.exp(rng.normal(math.log(110.0), 0.55, n))  # nm, lognormal: few big, many small
    # half resolution in-plane: the distance evaluation is the cost; the warp hides the steps
    hs = (Z, (Y + 1) // 2, (X + 1) // 2)
    zz, yy, xx = np.meshgrid(
        ((np.arange(hs[0]) + 0.5) * vs[0]).astype(np.float32),
        ((np.arange(hs[1]) * 2 + 0.5) * vs[1]).astype(np.float32),
        ((np.arange(hs[2]) * 2 + 0.5) * vs[2]).astype(np.float32),
        indexing="ij",
    )
    # large-scale bending of the neurites (coordinates warped before distances)
    bend = 130.0  # nm
    lsig = [max(1.0, 600 / vs[0]), 300 / (2 * vs[1]), 300 / (2 * vs[2])]
    zz = zz + bend * 0.5 * _smooth_noise(rng, hs, lsig)
    yy = yy + bend * _smooth_noise(rng, hs, lsig)
    xx = xx + bend * _smooth_noise(rng, hs, lsig)
    # power distance to line i: |p - c|^2 - ((p - c).u)^2 - r^2. Dropping |p|^2 (the same for
    # every line) leaves -(p.u)^2 - 2 p.c' + k with c' = c - (c.u)u: two matmuls per chunk.
    cu = (centre * u).sum(1)
    cperp = centre - cu[:, None] * u
    k = (cperp**2).sum(1) - radius**2
    pts = np.stack([zz.ravel(), yy.ravel(), xx.ravel()], 1).astype(np.float32)
    ut, ct = u.T.astype(np.float32), cperp.T.astype(np.float32)
    label = np.empty(len(pts), np.uint32)
    for start in range(0, len(pts), 1 << 15):
        chunk = pts[start : start + (1 << 15)]
        pu = chunk @ ut
        score = k.astype(np.float32) - pu * pu - 2 * (chunk @ ct)
        label[start : start + len(chunk)] = score.argmin(1) + 1
    label = label.reshape(hs)
    # full resolution: sample the half-res ids at finely warped positions (wiggly membranes)
    fine = [max(1.0, 80 / vs[0]), 20.0, 20.0]
    wy = 4.0 * _smooth_noise(rng, shape, fine)
    wx = 4.0 * _smooth_noise(rng, shape, fine)
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


def _boundaries(lab: np.ndarray) -> np.ndarray:
    """In-plane label boundaries, both sides marked (membranes are two-sided)."""
    b = np.zeros(lab.shape, bool)
    dy = lab[:, 1:, :] != lab[:, :-1, :]
    dx = lab[:, :, 1:] != lab[:, :, :-1]
    b[:, 1:, :] |= dy
    b[:, :-1, :] |= dy
    b[:, :, 1:] |= dx
    b[:, :, :-1] |= dx
    return b


def _inplane_distance(mask: np.ndarray) -> np.ndarray:
    """Distance in pixels to the nearest ``mask`` voxel in the same section."""
    out = np.empty(mask.shape, np.float32)
    for z in range(mask.shape[0]):
        if mask[z].any():
            out[z] = ndi.distance_transform_edt(~mask[z])
        else:
            out[z] = 1e3
    return out


def _mitochondria(
    dark: np.ndarray,
    lab: np.ndarray,
    dist: np.ndarray,
    vs: Sequence[float],
    rng: np.random.Generator,
) -> None:
    """Dark ellipsoids with a darker rim and striped cristae, inside single cells."""
    Z, Y, X = lab.shape
    n = int(rng.poisson(2.5 * Y * X * vs[1] * vs[2] / 1e6 * max(1.0, Z * vs[0] / 1000)))
    inner = np.argwhere(dist > 14)
    if len(inner) == 0:
        return
    for _ in range(n):
        c = inner[rng.integers(len(inner))]
        cell = lab[tuple(c)]
        half = np.array([rng.uniform(150, 450), rng.uniform(45, 75), rng.uniform(45, 75)])  # nm
        # random orientation of the long axis, then an orthonormal frame
        a = rng.standard_normal(3)
        a /= np.linalg.norm(a)
        b = np.cross(a, rng.standard_normal(3))
        b /= np.linalg.norm(b)
        frame = np.stack([a, b, np.cross(a, b)])
        reach = half.max()
        lo = np.maximum(c - np.ceil(reach / np.array(vs)).astype(int), 0)
        hi = np.minimum(c + np.ceil(reach / np.array(vs)).astype(int) + 1, lab.shape)
        box = tuple(slice(lo_, hi_) for lo_, hi_ in zip(lo, hi))
        grid = np.meshgrid(
            *[(np.arange(lo[k], hi[k]) - c[k]) * vs[k] for k in range(3)], indexing="ij"
        )
        p = np.stack(grid, -1) @ frame.T  # coordinates in the mitochondrion's frame
        q = np.sqrt(((p / half) ** 2).sum(-1))
        inside = (q < 1) & (lab[box] == cell)
        cristae = 0.5 + 0.5 * np.sin(2 * math.pi * p[..., 0] / rng.uniform(28, 40))
        val = np.where(q > 0.8, 0.62, 0.36 + 0.16 * cristae)
        dark[box] = np.where(inside, np.maximum(dark[box], val), dark[box])


def _stamp_vesicles(
    dark: np.ndarray,
    centres: np.ndarray,
    radii: np.ndarray,
    vs: Sequence[float],
    strength: float = 0.8,
) -> None:
    """Rings of the vesicles' membranes in every section a vesicle reaches (z in nm)."""
    Z, Y, X = dark.shape
    for (cz, cy, cx), r in zip(centres, radii):
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
            ring = strength * np.exp(-(((rho - rs) / 1.2) ** 2)) * (1 - gap / r) ** 0.5
            dark[z, ys, xs] = np.maximum(dark[z, ys, xs], ring)


def _box(lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice]:
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def _contact_sheet(
    lab: np.ndarray,
    p: np.ndarray,
    a: int,
    b: int,
    vs: Sequence[float],
    rng: np.random.Generator,
    taken: np.ndarray,
) -> tuple[np.ndarray, np.ndarray] | None:
    """A sheet 3 voxels thick (1 on a, 2 on b) on the a|b interface around ``p``.

    Returns (box origin, sheet mask in the box), or None when the contact is too small or
    overlaps one already ``taken``.
    """
    r_lat = rng.uniform(150, 280)  # nm: contact radius in-plane
    r_z = rng.uniform(60, 140)  # nm: so a cleft spans ~3-7 sections
    half = np.ceil(np.array([r_z, r_lat, r_lat]) / np.asarray(vs)).astype(int)
    lo = np.maximum(p - half, 0)
    hi = np.minimum(p + half + 1, lab.shape)
    sub = lab[_box(lo, hi)]
    A, B = sub == a, sub == b
    sheet = (A & _inplane(B, 1)) | (B & _inplane(A, 2))
    g = np.ogrid[tuple(slice(lo[k], hi[k]) for k in range(3))]
    g = [(g[k] - p[k]) * vs[k] for k in range(3)]
    sheet &= (g[0] / r_z) ** 2 + (g[1] ** 2 + g[2] ** 2) / r_lat**2 <= 1
    if sheet.sum() < 150 or (sheet & taken[_box(lo, hi)]).any():
        return None
    cc, n = ndi.label(sheet, np.ones((3, 3, 3), bool))
    if n > 1:
        sheet = cc == (1 + int(np.argmax(np.bincount(cc.ravel())[1:])))
    if sheet.sum() < 150 or np.unique(np.nonzero(sheet)[0]).size < 2:
        return None  # too small, or a single section: not a sheet
    return lo, sheet


def make_synthetic(
    shape: Sequence[int] = DEFAULT_SHAPE,
    seed: int = 0,
    voxel_size: Sequence[float] = DEFAULT_VOXEL_SIZE,
) -> dict[str, Any]:
    """A synthetic CREMI-like EM volume with labels, deterministic for ``seed``.

    Returns ``{"raw": uint8 [Z, Y, X], "clefts": uint64 [Z, Y, X] (0 background, instance ids
    1..K), "neuron_ids": uint64 [Z, Y, X], "voxel_size": (z, y, x) nm, "info": {...}}``.
    Clefts cover roughly 0.3-0.6% of voxels.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s < m for s, m in zip(shape, MIN_SHAPE)):
        raise UserError(
            f"synthetic shape must be 3 integers z,y,x with z >= {MIN_SHAPE[0]} and "
            f"y, x >= {MIN_SHAPE[1]}, got {shape}"
        )
    vs = tuple(float(v) for v in voxel_size)
    vsa = np.asarray(vs)
    rng = np.random.default_rng(seed)
    Z, Y, X = shape

    lab = _neurites(shape, vs, rng)
    bnd = _boundaries(lab)
    dist = _inplane_distance(bnd)

    # -- cytoplasm and membranes (brightness in [0, 1]; darkness layers multiply it) ----------
    n_cells = int(lab.max())
    cell_level = rng.uniform(0.74, 0.92, n_cells + 1).astype(np.float32)
    dark_cells = rng.random(n_cells + 1) < 0.1  # glia-like darker profiles
    cell_level[dark_cells] -= rng.uniform(0.1, 0.2, int(dark_cells.sum())).astype(np.float32)
    img = cell_level[lab]
    img += 0.05 * _smooth_noise(rng, shape, (1.0, 10.0, 10.0))
    img += 0.07 * _smooth_noise(rng, shape, (0.3, 1.0, 1.0))
    dark = np.zeros(shape, np.float32)
    # granular cytoplasm: small dark specks (microtubules, ER, ribosomes) from thresholded noise
    speck = _smooth_noise(rng, shape, (0.4, 1.3, 1.3))
    dark = np.maximum(dark, np.clip((speck - 0.9) * 0.6, 0, 0.6))
    depth = np.clip(0.88 + 0.06 * _smooth_noise(rng, shape, (2.0, 20.0, 20.0)), 0.7, 0.97)
    width = np.clip(1.9 + 0.45 * _smooth_noise(rng, shape, (2.0, 25.0, 25.0)), 1.2, 3.2)
    membrane = depth * np.exp(-((dist / width) ** 2))
    # boundaries crossing between sections: membranes seen obliquely, a grey smear
    zcross = np.zeros(shape, bool)
    if Z > 1:
        zc = lab[1:] != lab[:-1]
        zcross[1:] |= zc
        zcross[:-1] |= zc
    smear = ndi.gaussian_filter(zcross.astype(np.float32), (0, 1.5, 1.5)) * 0.4
    dark = np.maximum(dark, np.maximum(membrane, smear))
    _mitochondria(dark, lab, dist, vs, rng)

    # -- synapses, look-alike contacts, vesicle clouds at plain membranes -------------------------
    clefts = np.zeros(shape, np.uint64)
    taken = np.zeros(shape, bool)  # keeps contacts apart
    psd = np.zeros(shape, np.float32)
    target = rng.uniform(0.003, 0.006) * lab.size
    cand = np.flatnonzero(bnd & (dist == 0))
    cand = cand[rng.permutation(len(cand))[:3000]]
    margin = np.ceil(np.array([120.0, 210.0, 210.0]) / vsa).astype(int)
    ves_c: list[np.ndarray] = []
    ves_r: list[np.ndarray] = []
    n_syn = n_fake = n_lonely = 0
    labelled = 0
    for flat in cand:
        p = np.array(np.unravel_index(flat, shape))
        if taken[tuple(p)]:
            continue
        z, y, x = p
        a = int(lab[z, y, x])
        nb = [
            int(lab[z, yy, xx])
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1))
            if 0 <= yy < Y and 0 <= xx < X and lab[z, yy, xx] != a
        ]
        if not nb:
            continue
        b = nb[0]
        # interleave the kinds at 1 : 0.7 : 0.35 so each gets placed while room lasts
        quota = {"syn": 1.0, "fake": 0.7, "lonely": 0.35}
        count = {"syn": n_syn, "fake": n_fake, "lonely": n_lonely}
        open_kinds = [k for k in quota if k != "syn" or labelled < target]
        if labelled >= target and all(count[k] >= quota[k] * n_syn for k in open_kinds):
            break
        kind = min(open_kinds, key=lambda k: (count[k] + 1) / quota[k])
        if rng.random() < 0.5:
            a, b = b, a  # a is the presynaptic side
        got = _contact_sheet(lab, p, a, b, vs, rng, taken)
        if got is None:
            continue
        slo, small = got
        shi = slo + np.array(small.shape)
        lo = np.maximum(slo - margin, 0)
        hi = np.minimum(shi + margin, shape)
        box = _box(lo, hi)
        sheet = np.zeros(hi - lo, bool)
        sheet[_box(slo - lo, shi - lo)] = small
        sub = lab[box]
        d_sheet = ndi.distance_transform_edt(~sheet, sampling=vs).astype(np.float32)  # nm
        pre, post = sub == a, sub == b
        if kind in ("syn", "fake"):
            # postsynaptic density: a dark band ~30-45 nm deep, fading at its edge
            thick = rng.uniform(28, 45)
            band = np.clip((thick - d_sheet) / 10.0, 0, 1) * rng.uniform(0.55, 0.75)
            side = post if (kind == "syn" or rng.random() < 0.5) else (post | pre)
            psd[box] = np.maximum(psd[box], np.where(side, band, 0))
            az = np.clip((16 - d_sheet) / 8.0, 0, 1) * 0.5  # presynaptic active zone
            psd[box] = np.maximum(psd[box], np.where(pre, az, 0))
        if kind in ("syn", "lonely"):
            # a cloud of ~40 nm vesicles within ~250 nm of the contact, presynaptic side
            ok = pre & (d_sheet > 24) & (d_sheet < 200) & (dist[box] > 4)
            spots = np.flatnonzero(ok)
            if len(spots):
                w = np.exp(-d_sheet.ravel()[spots] / 70.0)
                k = int(rng.integers(90, 160) * max(1.0, small.sum() / 1500))
                pick = rng.choice(spots, size=min(k, len(spots)), replace=False, p=w / w.sum())
                c = (np.stack(np.unravel_index(pick, sheet.shape), 1) + lo + 0.5) * vsa
                c += rng.uniform(-0.5, 0.5, c.shape) * vsa
                ves_c.append(c)
                ves_r.append(rng.normal(17, 2.0, len(c)).clip(12, 23))
        if kind == "syn":
            n_syn += 1
            clefts[box][sheet] = n_syn
            labelled += int(sheet.sum())
        elif kind == "fake":
            n_fake += 1
        else:
            n_lonely += 1
        taken[box] |= d_sheet < 160
    dark = np.maximum(dark, psd)
    # every cell holds some vesicles and small round profiles, as neuropil does
    n_free = int(lab.size / 2500)  # sparser than a synaptic cloud
    free = rng.integers(0, lab.size, size=3 * n_free)
    free = free[dist.ravel()[free] > 5][:n_free]
    if len(free):
        c = (np.stack(np.unravel_index(free, shape), 1) + rng.random((len(free), 3))) * vsa
        _stamp_vesicles(dark, c, rng.normal(16, 3, len(free)).clip(10, 24), vs, strength=0.4)
    if ves_c:
        _stamp_vesicles(dark, np.concatenate(ves_c), np.concatenate(ves_r), vs)
    img = img * (1 - dark)

    # -- imaging ----------------------------------------------------------------------------------
    img = ndi.gaussian_filter(img, (0, 0.7, 0.7))
    gain = rng.normal(1.0, 0.06, Z).astype(np.float32)
    bias = rng.normal(0.0, 0.03, Z).astype(np.float32)
    shade = 0.06 * _smooth_noise(rng, shape, (3.0, Y / 3, X / 3))
    img = img * gain[:, None, None] * (1 + shade) + bias[:, None, None]
    electrons = 40.0
    img = rng.poisson(np.clip(img, 0, None) * electrons).astype(np.float32) / electrons
    img += rng.normal(0, 0.03, shape).astype(np.float32)
    img = ndi.gaussian_filter(img, (0, 0.5, 0.5))
    # grey levels: a monotone map onto the 5% quantiles of the real VNC stacks (see
    # REAL_EM_QUANTILES), so the histogram is that of real EM whatever the seed
    raw = np.interp(img, np.percentile(img, np.linspace(0, 100, 21)), REAL_EM_QUANTILES)

    # section defects: labels move with a shifted section; a missing section keeps its labels
    missing: list[int] = []
    shifted: list[int] = []
    for z in range(Z):
        r = rng.random()
        if r < 0.02 and Z > 3:
            raw[z] = rng.normal(rng.uniform(20, 235), 3, (Y, X))
            missing.append(z)
        elif r < 0.05 and Z > 3:
            sh = rng.integers(-8, 9, 2)
            raw[z] = ndi.shift(raw[z], sh, order=0, mode="nearest")
            clefts[z] = ndi.shift(clefts[z], sh, order=0, mode="nearest")
            lab[z] = ndi.shift(lab[z], sh, order=0, mode="nearest")
            shifted.append(z)
    raw = np.round(raw).astype(np.uint8)
    return {
        "raw": raw,
        "clefts": clefts,
        "neuron_ids": lab,
        "voxel_size": vs,
        "info": {
            "seed": int(seed),
            "synapses": n_syn,
            "lookalike_contacts": n_fake,
            "vesicle_clouds_at_plain_membranes": n_lonely,
            "cleft_fraction": float((clefts > 0).mean()),
            "missing_sections": missing,
            "shifted_sections": shifted,
        },
    }


# -- files ----------------------------------------------------------------------------------------


def write_synthetic(
    output: str | os.PathLike,
    shape: Sequence[int] = DEFAULT_SHAPE,
    seed: int = 0,
    overwrite: bool = False,
    voxel_size: Sequence[float] = DEFAULT_VOXEL_SIZE,
) -> Path:
    """Make a synthetic volume and write it as a zarr v3 container (atomically).

    Keys: ``volumes/raw`` (uint8), ``volumes/labels/clefts`` (uint64, 0 background),
    ``volumes/labels/neuron_ids`` (uint64), each an OME-Zarr image with the voxel size.
    """
    from bbem.volumes import write_volumes

    check_output(output, overwrite)  # refuse before spending the time
    vol = make_synthetic(shape, seed, voxel_size)
    return write_volumes(
        output,
        {KEYS[k]: vol[k] for k in ("raw", "clefts", "neuron_ids")},
        voxel_size=vol["voxel_size"],
        overwrite=overwrite,
    )


def preview_png(
    raw: np.ndarray,
    clefts: np.ndarray,
    path: str | os.PathLike,
    n: int = 4,
    overwrite: bool = False,
    title: str = "",
) -> Path:
    """A PNG montage of ``n`` sections (those with the most cleft voxels first), clefts outlined.

    ``raw`` and ``clefts`` are ``[Z, Y, X]``; written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = (clefts > 0).sum((1, 2))
    blank = raw.reshape(raw.shape[0], -1).std(1) < 8  # missing sections say little
    order = np.lexsort((-per, blank))
    zs = sorted(int(z) for z in order[: min(n, raw.shape[0])])
    cols = min(len(zs), 2 if len(zs) == 4 else len(zs))
    rows = math.ceil(len(zs) / cols)
    aspect = raw.shape[1] / raw.shape[2]
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 5 * rows * aspect + 0.4), squeeze=False)
    for ax, z in zip(axes.ravel(), zs):
        ax.imshow(raw[z], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        if per[z]:
            ax.contour(clefts[z] > 0, [0.5], colors="red", linewidths=0.8)
        ax.set_title(
            f"z = {z}: {len(np.unique(clefts[z])) - (0 in clefts[z])} cleft(s)", fontsize=9
        )
        ax.set_axis_off()
    for ax in axes.ravel()[len(zs) :]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_output(path, overwrite, kind="png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def synth_from_cli(
    output: str,
    shape: Sequence[int] = DEFAULT_SHAPE,
    seed: int = 0,
    preview: str | None = None,
    overwrite: bool = False,
) -> None:
    """``bbem synth OUTPUT [--shape z,y,x] [--seed N] [--preview PNG] [--overwrite]``."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from bbem.volumes import write_volumes

    check_output(output, overwrite)
    if preview is not None:
        if Path(preview).suffix.lower() != ".png":
            raise UserError(f"--preview must name a .png file, got {preview}")
        check_output(preview, overwrite, kind="png")
        check_not_input(preview, [output])  # the volume's rename would take the preview along
    with (
        output_lock(output),
        Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True
        ) as bar,
    ):
        task = bar.add_task(f"synthesising {'x'.join(map(str, shape))} (seed {seed})", total=None)
        vol = make_synthetic(shape, seed)
        bar.update(task, description=f"writing {output}")
        write_volumes(
            output,
            {KEYS[k]: vol[k] for k in ("raw", "clefts", "neuron_ids")},
            voxel_size=vol["voxel_size"],
            overwrite=overwrite,
        )
        if preview is not None:
            bar.update(task, description=f"writing {preview}")
            preview_png(
                vol["raw"],
                vol["clefts"],
                preview,
                overwrite=overwrite,
                title=f"bbem synth seed {seed}: clefts outlined in red",
            )
    info = vol["info"]
    Console().print(
        f"wrote {output}: {'x'.join(map(str, shape))} at "
        f"{'x'.join(f'{v:g}' for v in vol['voxel_size'])} nm, {info['synapses']} clefts "
        f"({100 * info['cleft_fraction']:.2f}% of voxels), {info['lookalike_contacts']} look-alike "
        f"contacts" + (f"; preview {preview}" if preview else "")
    )
