"""Stage 3: labelled synapses, look-alike contacts, and vesicles.

At chosen contacts the cleft is labelled as a sheet 3 voxels thick (1 presynaptic, 2
postsynaptic) spanning a few sections; the presynaptic side gets a vesicle cloud and the
postsynaptic side a dark density. Look-alike contacts get the same densities without vesicles
and without a label, and a few vesicle clouds sit beside plain membranes, so a model has to
learn the context rather than "dark line" or "vesicles".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from bbem.synth.constants import SynthConstants
from bbem.synth.fields import box_slices, inplane_dilate, stamp_vesicles

# -- stage 3: synapses, look-alike contacts, vesicles ---------------------------------------------


def _contact_sheet(
    lab: np.ndarray,
    p: np.ndarray,
    a: int,
    b: int,
    vs: Sequence[float],
    rng: np.random.Generator,
    taken: np.ndarray,
    c: SynthConstants,
) -> tuple[np.ndarray, np.ndarray] | None:
    """A sheet 3 voxels thick (1 on a, 2 on b) on the a|b interface around ``p``.

    Returns (box origin, sheet mask in the box), or None when the contact is too small or
    overlaps one already ``taken``.
    """
    r_lat = rng.uniform(*c.contact_radius)
    r_z = rng.uniform(*c.contact_half_depth)
    half = np.ceil(np.array([r_z, r_lat, r_lat]) / np.asarray(vs)).astype(int)
    lo = np.maximum(p - half, 0)
    hi = np.minimum(p + half + 1, lab.shape)
    sub = lab[box_slices(lo, hi)]
    A, B = sub == a, sub == b
    sheet = (A & inplane_dilate(B, 1)) | (B & inplane_dilate(A, 2))
    grid = np.ogrid[tuple(slice(lo[k], hi[k]) for k in range(3))]
    g = [(grid[k] - p[k]) * vs[k] for k in range(3)]
    sheet &= (g[0] / r_z) ** 2 + (g[1] ** 2 + g[2] ** 2) / r_lat**2 <= 1
    if sheet.sum() < c.min_sheet_voxels or (sheet & taken[box_slices(lo, hi)]).any():
        return None
    cc, n = ndi.label(sheet, np.ones((3, 3, 3), bool))
    if n > 1:
        sheet = cc == (1 + int(np.argmax(np.bincount(cc.ravel())[1:])))
    if sheet.sum() < c.min_sheet_voxels or np.unique(np.nonzero(sheet)[0]).size < 2:
        return None  # too small, or a single section: not a sheet
    return lo, sheet


def _contact_partner(lab: np.ndarray, p: np.ndarray) -> tuple[int, int] | None:
    """The cell at ``p`` and an in-plane neighbour from another cell, or None."""
    _, Y, X = lab.shape
    z, y, x = p
    a = int(lab[z, y, x])
    nb = [
        int(lab[z, yy, xx])
        for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1))
        if 0 <= yy < Y and 0 <= xx < X and lab[z, yy, xx] != a
    ]
    return (a, nb[0]) if nb else None


@dataclass
class Contacts:
    """What :func:`synapses` made: labels, densities, vesicle clouds and counts per kind."""

    clefts: np.ndarray  # uint64 [Z, Y, X]
    psd: np.ndarray  # float32 [Z, Y, X] darkness
    vesicle_centres: list[np.ndarray]  # [N, 3] nm each
    vesicle_radii: list[np.ndarray]  # [N] nm each
    count: dict[str, int]


def synapses(
    lab: np.ndarray,
    bnd: np.ndarray,
    dist: np.ndarray,
    vs: Sequence[float],
    rng: np.random.Generator,
    c: SynthConstants,
) -> Contacts:
    """Labelled synapses, look-alike contacts and vesicle clouds at plain membranes, placed at
    random membrane voxels until the cleft fraction is reached and every kind has its share."""
    shape = lab.shape
    vsa = np.asarray(vs)
    out = Contacts(np.zeros(shape, np.uint64), np.zeros(shape, np.float32), [], [], {})
    taken = np.zeros(shape, bool)  # keeps contacts apart
    target = rng.uniform(*c.cleft_fraction) * lab.size
    cand = np.flatnonzero(bnd & (dist == 0))
    cand = cand[rng.permutation(len(cand))[: c.contact_candidates]]
    margin = np.ceil(np.array(c.contact_margin) / vsa).astype(int)
    quota = dict(c.contact_mix)
    count = out.count = {k: 0 for k in quota}
    labelled = 0
    for flat in cand:
        p = np.array(np.unravel_index(flat, shape))
        if taken[tuple(p)]:
            continue
        pair = _contact_partner(lab, p)
        if pair is None:
            continue
        a, b = pair
        # interleave the kinds by their quotas so each gets placed while room lasts
        open_kinds = [k for k in quota if k != "syn" or labelled < target]
        if labelled >= target and all(count[k] >= quota[k] * count["syn"] for k in open_kinds):
            break
        kind = min(open_kinds, key=lambda k: (count[k] + 1) / quota[k])
        if rng.random() < 0.5:
            a, b = b, a  # a is the presynaptic side
        got = _contact_sheet(lab, p, a, b, vs, rng, taken, c)
        if got is None:
            continue
        slo, small = got
        shi = slo + np.array(small.shape)
        lo = np.maximum(slo - margin, 0)
        hi = np.minimum(shi + margin, shape)
        box = box_slices(lo, hi)
        sheet = np.zeros(hi - lo, bool)
        sheet[box_slices(slo - lo, shi - lo)] = small
        sub = lab[box]
        d_sheet = ndi.distance_transform_edt(~sheet, sampling=vs).astype(np.float32)  # nm
        pre, post = sub == a, sub == b
        if kind in ("syn", "fake"):
            _densities(out.psd, box, kind, pre, post, d_sheet, rng, c)
        if kind in ("syn", "lonely"):
            _vesicle_cloud(out, pre, d_sheet, dist[box], int(small.sum()), lo, vsa, rng, c)
        count[kind] += 1
        if kind == "syn":
            out.clefts[box][sheet] = count["syn"]
            labelled += int(sheet.sum())
        taken[box] |= d_sheet < c.contact_spacing
    return out


def _densities(
    psd: np.ndarray,
    box: tuple[slice, slice, slice],
    kind: str,
    pre: np.ndarray,
    post: np.ndarray,
    d_sheet: np.ndarray,
    rng: np.random.Generator,
    c: SynthConstants,
) -> None:
    """The postsynaptic density (a dark band fading at its edge) and the presynaptic active
    zone, into ``psd[box]``; a look-alike puts its band on either or both sides."""
    thick = rng.uniform(*c.psd_thickness)
    band = np.clip((thick - d_sheet) / c.psd_edge, 0, 1) * rng.uniform(*c.psd_darkness)
    side = post if (kind == "syn" or rng.random() < 0.5) else (post | pre)
    psd[box] = np.maximum(psd[box], np.where(side, band, 0))
    az = np.clip((c.active_zone - d_sheet) / c.active_zone_edge, 0, 1) * c.active_zone_darkness
    psd[box] = np.maximum(psd[box], np.where(pre, az, 0))


def _vesicle_cloud(
    out: Contacts,
    pre: np.ndarray,
    d_sheet: np.ndarray,
    dist: np.ndarray,
    sheet_voxels: int,
    lo: np.ndarray,
    vsa: np.ndarray,
    rng: np.random.Generator,
    c: SynthConstants,
) -> None:
    """A cloud of vesicles on the presynaptic side near the sheet, denser close to it."""
    near, far = c.cloud_span
    ok = pre & (d_sheet > near) & (d_sheet < far) & (dist > c.cloud_min_membrane_px)
    spots = np.flatnonzero(ok)
    if not len(spots):
        return
    w = np.exp(-d_sheet.ravel()[spots] / c.cloud_decay)
    k = int(rng.integers(*c.cloud_vesicles) * max(1.0, sheet_voxels / c.cloud_sheet))
    pick = rng.choice(spots, size=min(k, len(spots)), replace=False, p=w / w.sum())
    centres = (np.stack(np.unravel_index(pick, pre.shape), 1) + lo + 0.5) * vsa
    centres += rng.uniform(-0.5, 0.5, centres.shape) * vsa
    out.vesicle_centres.append(centres)
    r = rng.normal(c.vesicle_radius, c.vesicle_radius_sd, len(centres))
    out.vesicle_radii.append(r.clip(*c.vesicle_radius_clip))


def vesicles(
    dark: np.ndarray,
    contacts: Contacts,
    dist: np.ndarray,
    vs: Sequence[float],
    rng: np.random.Generator,
    c: SynthConstants,
) -> None:
    """Stamp the vesicles into ``dark``: free ones in every cell (as neuropil has, sparser than
    a synaptic cloud), then the synaptic clouds."""
    shape, size = dark.shape, dark.size
    vsa = np.asarray(vs)
    n_free = int(size / c.free_vesicle_voxels)
    free = rng.integers(0, size, size=3 * n_free)
    free = free[dist.ravel()[free] > c.free_vesicle_min_membrane_px][:n_free]
    if len(free):
        centres = (np.stack(np.unravel_index(free, shape), 1) + rng.random((len(free), 3))) * vsa
        r = rng.normal(c.free_vesicle_radius, c.free_vesicle_radius_sd, len(free))
        r = r.clip(*c.free_vesicle_radius_clip)
        stamp_vesicles(dark, centres, r, vs, c.free_vesicle_darkness, c.vesicle_ring_px)
    if contacts.vesicle_centres:
        centres = np.concatenate(contacts.vesicle_centres)
        r = np.concatenate(contacts.vesicle_radii)
        stamp_vesicles(dark, centres, r, vs, c.vesicle_darkness, c.vesicle_ring_px)
