"""napari-bbem: look at bbem volumes, predictions and BB on-rates in napari.

- reader: zarr / OME-Zarr containers (CREMI layout, ``bbem synth`` and ``bbem infer`` outputs)
  and CREMI hdf5, opened lazily through :func:`bbem.volumes.open_volume`;
- widget "Predictions": run a checkpoint over an image layer, threshold the probabilities;
- widget "On-rates": per-channel on-rate, degree and balance of a run's ``bb.csv``.

The logic lives in plain functions (:mod:`napari_bbem.reader`, :mod:`napari_bbem.predict`,
:mod:`napari_bbem.onrates`); the widgets only wire them to napari. Nothing is imported here:
napari imports this package to find the manifest, and torch should not load before it is used.
"""

__version__ = "0.1.0"
