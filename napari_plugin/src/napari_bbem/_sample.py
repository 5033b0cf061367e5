"""The sample data contribution: File > Open Sample > napari-bbem > bbem synthetic EM."""

from __future__ import annotations

from napari_bbem.reader import LayerData, geometry

#: Small enough to make in about a second, large enough for a few synapses.
SAMPLE_SHAPE = (16, 128, 128)
SAMPLE_SEED = 0


def synthetic_em() -> list[LayerData]:
    """A small synthetic CREMI-like volume (:func:`bbem.synth.make_synthetic`, fixed seed, in
    memory): raw EM (image) and synaptic clefts (labels), in nm with axes z, y, x."""
    from bbem.synth import make_synthetic

    vol = make_synthetic(SAMPLE_SHAPE, seed=SAMPLE_SEED)
    where = geometry(vol["voxel_size"], (0.0, 0.0, 0.0))
    meta = {"bbem_sample": "synthetic", "bbem_seed": SAMPLE_SEED}
    return [
        (
            vol["raw"],
            {
                "name": "synthetic raw",
                "colormap": "gray",
                "contrast_limits": (0, 255),
                "metadata": {**meta, "bbem_kind": "image"},
                **where,
            },
            "image",
        ),
        (
            vol["clefts"],
            {
                "name": "synthetic clefts",
                "opacity": 0.8,
                "metadata": {**meta, "bbem_kind": "labels"},
                **where,
            },
            "labels",
        ),
    ]
