"""Synthetic CREMI-like EM with cleft labels: the embedded default data, made from a seed.

The generator builds the tissue first and images it second, one function per stage:

1. :func:`~bbem.synth.tissue.neurites`: a power diagram of curved lines (mostly running across sections, some
   in-plane) in physical coordinates, warped by smooth noise. This gives cells of varied size
   whose profiles drift from section to section, as in anisotropic serial-section EM.
2. :func:`~bbem.synth.tissue.cytoplasm_and_membranes`: membranes darken along in-plane label boundaries; where a
   boundary runs obliquely through a section it shows as a grey smear. Cytoplasm is textured,
   with small dark organelles. :func:`~bbem.synth.tissue.mitochondria` adds dark ellipsoids with a rim and
   cristae.
3. :func:`~bbem.synth.synapses.synapses`: at chosen contacts, the cleft is labelled as a sheet 3 voxels thick
   (1 presynaptic, 2 postsynaptic) spanning a few sections; the presynaptic side gets a
   vesicle cloud and the postsynaptic side a dark density. Look-alike contacts get the same
   densities without vesicles and without a label, and a few vesicle clouds sit beside plain
   membranes, so a model has to learn the context rather than "dark line" or "vesicles".
4. :func:`~bbem.synth.volume.imaging` and
   :func:`~bbem.synth.volume.section_defects`: blur, shot and read noise, uneven contrast
   between sections and across each section, and occasional missing or shifted sections
   (labels shift with their section).

Every physical constant is a field of :class:`SynthConstants` (:mod:`bbem.synth.constants`).
Everything is drawn from one ``numpy.random.Generator`` in a fixed order, so a seed fixes the
volume. :func:`make_synthetic` returns arrays, :func:`write_synthetic` writes a zarr container,
:func:`synth_from_cli` is ``bbem synth``.
"""

from bbem.synth.constants import (
    DEFAULT_CONSTANTS,
    DEFAULT_SHAPE,
    DEFAULT_VOXEL_SIZE,
    KEYS,
    MIN_SHAPE,
    REAL_EM_QUANTILES,
    SynthConstants,
)
from bbem.synth.preview import preview_png, synth_from_cli
from bbem.synth.volume import make_synthetic, write_container, write_synthetic

__all__ = [
    "DEFAULT_CONSTANTS",
    "DEFAULT_SHAPE",
    "DEFAULT_VOXEL_SIZE",
    "KEYS",
    "MIN_SHAPE",
    "REAL_EM_QUANTILES",
    "SynthConstants",
    "make_synthetic",
    "preview_png",
    "synth_from_cli",
    "write_container",
    "write_synthetic",
]
