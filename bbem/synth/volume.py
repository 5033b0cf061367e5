"""Stage 4 (imaging, section defects) and the whole volume: :func:`make_synthetic`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from bbem.atomic import check_output
from bbem.errors import UserError
from bbem.synth.constants import (
    DEFAULT_CONSTANTS,
    DEFAULT_SHAPE,
    DEFAULT_VOXEL_SIZE,
    KEYS,
    MIN_SHAPE,
    SynthConstants,
)
from bbem.synth.fields import boundaries, inplane_distance, smooth_noise
from bbem.synth.synapses import synapses, vesicles
from bbem.synth.tissue import cytoplasm_and_membranes, mitochondria, neurites

# -- stage 4: imaging ------------------------------------------------------------------------------


def imaging(img: np.ndarray, rng: np.random.Generator, c: SynthConstants) -> np.ndarray:
    """The microscope: blur, uneven contrast, shot and read noise, then the grey levels of real
    EM (float64 ``[Z, Y, X]`` in [0, 255])."""
    Z, Y, X = img.shape
    img = ndi.gaussian_filter(img, (0, c.optics_blur_px, c.optics_blur_px))
    gain = rng.normal(1.0, c.section_gain_sd, int(Z)).astype(np.float32)
    bias = rng.normal(0.0, c.section_bias_sd, int(Z)).astype(np.float32)
    shade = c.shading * smooth_noise(rng, img.shape, (c.shading_px, Y / 3, X / 3))
    img = img * gain[:, None, None] * (1 + shade) + bias[:, None, None]
    img = rng.poisson(np.clip(img, 0, None) * c.electrons).astype(np.float32) / c.electrons
    img += rng.normal(0, c.read_noise, img.shape).astype(np.float32)
    img = ndi.gaussian_filter(img, (0, c.detector_blur_px, c.detector_blur_px))
    # a monotone map onto the 5% quantiles of the real VNC stacks, so the histogram is that
    # of real EM whatever the seed
    return np.interp(img, np.percentile(img, np.linspace(0, 100, 21)), c.quantiles)


def section_defects(
    raw: np.ndarray,
    clefts: np.ndarray,
    lab: np.ndarray,
    rng: np.random.Generator,
    c: SynthConstants,
) -> tuple[list[int], list[int]]:
    """Missing and shifted sections, in place; labels move with a shifted section, a missing
    section keeps its labels. Returns (missing, shifted) section indices."""
    Z, Y, X = raw.shape
    missing: list[int] = []
    shifted: list[int] = []
    for z in range(Z):
        r = rng.random()
        if r < c.missing_section_p and Z > 3:
            raw[z] = rng.normal(rng.uniform(*c.missing_level), c.missing_noise, (Y, X))
            missing.append(z)
        elif r < c.missing_section_p + c.shifted_section_p and Z > 3:
            sh = rng.integers(-c.max_shift_px, c.max_shift_px + 1, 2)
            raw[z] = ndi.shift(raw[z], sh, order=0, mode="nearest")
            clefts[z] = ndi.shift(clefts[z], sh, order=0, mode="nearest")
            lab[z] = ndi.shift(lab[z], sh, order=0, mode="nearest")
            shifted.append(z)
    return missing, shifted


# -- the volume -----------------------------------------------------------------------------------


def make_synthetic(
    shape: Sequence[int] = DEFAULT_SHAPE,
    seed: int = 0,
    voxel_size: Sequence[float] = DEFAULT_VOXEL_SIZE,
    constants: SynthConstants = DEFAULT_CONSTANTS,
) -> dict[str, Any]:
    """A synthetic CREMI-like EM volume with labels, deterministic for ``seed``.

    Returns ``{"raw": uint8 [Z, Y, X], "clefts": uint64 [Z, Y, X] (0 background, instance ids
    1..K), "neuron_ids": uint64 [Z, Y, X], "voxel_size": (z, y, x) nm, "info": {...}}``.
    Clefts cover roughly 0.3-0.6% of voxels.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s < m for s, m in zip(shape, MIN_SHAPE, strict=True)):
        raise UserError(
            f"synthetic shape must be 3 integers z,y,x with z >= {MIN_SHAPE[0]} and "
            f"y, x >= {MIN_SHAPE[1]}, got {shape}"
        )
    vs = tuple(float(v) for v in voxel_size)
    c = constants
    rng = np.random.default_rng(seed)
    lab = neurites(shape, vs, rng, c)
    bnd = boundaries(lab)
    dist = inplane_distance(bnd)
    img, dark = cytoplasm_and_membranes(lab, dist, rng, c)
    mitochondria(dark, lab, dist, vs, rng, c)
    contacts = synapses(lab, bnd, dist, vs, rng, c)
    dark = np.maximum(dark, contacts.psd)
    vesicles(dark, contacts, dist, vs, rng, c)
    raw = imaging(img * (1 - dark), rng, c)
    clefts = contacts.clefts
    missing, shifted = section_defects(raw, clefts, lab, rng, c)
    return {
        "raw": np.round(raw).astype(np.uint8),
        "clefts": clefts,
        "neuron_ids": lab,
        "voxel_size": vs,
        "info": {
            "seed": int(seed),
            "synapses": contacts.count["syn"],
            "lookalike_contacts": contacts.count["fake"],
            "vesicle_clouds_at_plain_membranes": contacts.count["lonely"],
            "cleft_fraction": float((clefts > 0).mean()),
            "missing_sections": missing,
            "shifted_sections": shifted,
        },
    }


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
    check_output(output, overwrite)  # refuse before spending the time
    return write_container(output, make_synthetic(shape, seed, voxel_size), overwrite)


def write_container(output: str | os.PathLike, vol: dict[str, Any], overwrite: bool) -> Path:
    """Write :func:`make_synthetic`'s volumes under :data:`KEYS` (zarr v3, OME-Zarr)."""
    from bbem.volumes import write_volumes

    return write_volumes(
        output,
        {KEYS[k]: vol[k] for k in ("raw", "clefts", "neuron_ids")},
        voxel_size=vol["voxel_size"],
        overwrite=overwrite,
    )
