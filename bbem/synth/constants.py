"""The physical constants of the synthetic tissue and its imaging, in one frozen dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass

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
REAL_EM_QUANTILES: tuple[int, ...] = (0, 32, 49, 63, 75, 86, 96, 106, 116, 125, 134, 143, 151)
REAL_EM_QUANTILES += (159, 167, 174, 181, 188, 196, 206, 255)

Range = tuple[float, float]
ZYX = tuple[float, float, float]


@dataclass(frozen=True)
class SynthConstants:
    """The tissue and the microscope. Lengths are in nm unless named ``_px`` (pixels in-plane,
    sections along z); brightness is in [0, 1] before imaging; a pair is a uniform range."""

    # -- neurites (stage 1) --
    neurites_per_um2: float = 22.0  # cross-sections per um^2 of section
    neurites_per_um_depth: float = 0.25  # relative extra per um of volume depth
    minneurites: int = 6
    crossing_fraction: float = 0.75  # the rest run nearly in-plane
    crossing_tilt: Range = (0.0, 0.9)  # radians from the z axis
    inplane_tilt: Range = (1.1, math.pi / 2)
    centre_span: Range = (-0.1, 1.1)  # line centres, as fractions of the volume's extent
    radius_median: float = 110.0  # lognormal radius: few big cells, many small
    radius_log_sd: float = 0.55
    bend: float = 130.0  # large-scale bending of the lines
    bend_length: ZYX = (600.0, 300.0, 300.0)  # its correlation length
    wiggle_px: float = 4.0  # fine warp of the membranes
    wiggle_length_z: float = 80.0
    wiggle_length_px: float = 20.0
    # -- cytoplasm and membranes (stage 2) --
    cell_brightness: Range = (0.74, 0.92)
    dark_cell_fraction: float = 0.1  # glia-like darker profiles
    dark_cell_dimming: Range = (0.1, 0.2)
    texture_coarse: float = 0.05
    texture_coarse_px: ZYX = (1.0, 10.0, 10.0)
    texture_fine: float = 0.07
    texture_fine_px: ZYX = (0.3, 1.0, 1.0)
    speck_px: ZYX = (0.4, 1.3, 1.3)  # microtubules, ER, ribosomes: thresholded noise
    speck_threshold: float = 0.9
    speck_gain: float = 0.6
    membrane_depth: float = 0.88  # darkness at the membrane's centre line
    membrane_depth_sd: float = 0.06
    membrane_depth_clip: Range = (0.7, 0.97)
    membrane_depth_px: ZYX = (2.0, 20.0, 20.0)
    membrane_width_px: float = 1.9
    membrane_width_sd: float = 0.45
    membrane_width_clip: Range = (1.2, 3.2)
    membrane_width_length_px: ZYX = (2.0, 25.0, 25.0)
    oblique_blur_px: float = 1.5  # a membrane crossing between sections: a grey smear
    oblique_darkness: float = 0.4
    # -- mitochondria --
    mito_per_um2: float = 2.5  # per um^2 of section and um of depth (at least one um)
    mito_min_depth_px: float = 14.0  # centres this far inside a cell
    mito_half_length: Range = (150.0, 450.0)
    mito_half_width: Range = (45.0, 75.0)
    cristae_period: Range = (28.0, 40.0)
    mito_rim: float = 0.62  # darkness of the outer 20% of the radius
    mito_matrix: float = 0.36
    cristae_contrast: float = 0.16
    # -- synapses and look-alikes (stage 3) --
    cleft_fraction: Range = (0.003, 0.006)  # of all voxels
    contact_candidates: int = 3000
    contact_mix: tuple[tuple[str, float], ...] = (("syn", 1.0), ("fake", 0.7), ("lonely", 0.35))
    contact_radius: Range = (150.0, 280.0)  # in-plane
    contact_half_depth: Range = (60.0, 140.0)  # so a cleft spans ~3-7 sections
    min_sheet_voxels: int = 150
    contact_margin: ZYX = (120.0, 210.0, 210.0)  # room around a sheet for its densities
    contact_spacing: float = 160.0  # no other contact this close to a sheet
    psd_thickness: Range = (28.0, 45.0)  # postsynaptic density
    psd_edge: float = 10.0  # its fade
    psd_darkness: Range = (0.55, 0.75)
    active_zone: float = 16.0  # presynaptic density: depth, fade, darkness
    active_zone_edge: float = 8.0
    active_zone_darkness: float = 0.5
    cloud_span: Range = (24.0, 200.0)  # synaptic vesicles this far from the sheet
    cloud_min_membrane_px: float = 4.0
    cloud_decay: float = 70.0
    cloud_vesicles: tuple[int, int] = (90, 160)  # per cloud, for a sheet of cloud_sheet voxels
    cloud_sheet: float = 1500.0
    vesicle_radius: float = 17.0
    vesicle_radius_sd: float = 2.0
    vesicle_radius_clip: Range = (12.0, 23.0)
    vesicle_ring_px: float = 1.2  # membrane ring width
    vesicle_darkness: float = 0.8
    free_vesicle_voxels: int = 2500  # one free vesicle per this many voxels, anywhere
    free_vesicle_min_membrane_px: float = 5.0
    free_vesicle_radius: float = 16.0
    free_vesicle_radius_sd: float = 3.0
    free_vesicle_radius_clip: Range = (10.0, 24.0)
    free_vesicle_darkness: float = 0.4
    # -- imaging (stage 4) --
    optics_blur_px: float = 0.7
    section_gain_sd: float = 0.06
    section_bias_sd: float = 0.03
    shading: float = 0.06
    shading_px: float = 3.0  # along z; in-plane a third of the section
    electrons: float = 40.0  # per pixel at full brightness: shot noise
    read_noise: float = 0.03
    detector_blur_px: float = 0.5
    missing_section_p: float = 0.02
    shifted_section_p: float = 0.03
    max_shift_px: int = 8
    missing_level: Range = (20.0, 235.0)
    missing_noise: float = 3.0
    quantiles: tuple[int, ...] = REAL_EM_QUANTILES  # grey levels of the result (see above)


DEFAULT_CONSTANTS = SynthConstants()
