"""bbem volumes as napari layer data: how to show each volume a container holds.

Plain functions (no Qt): :func:`bbem.volumes.list_volumes` says which 3D volumes a zarr /
OME-Zarr / CREMI hdf5 container or tiff stack holds and what each is; :func:`read_bbem` turns
each into a napari ``LayerDataTuple``
``(dask array [Z, Y, X], kwargs, "image" | "labels")`` with scale = voxel size (nm),
translate = offset (nm), units nm and axis labels z, y, x (:func:`geometry`), read lazily
through :func:`bbem.volumes.open_volume`.

How each kind is shown:

- ``probability`` (cleft probabilities): image, ``magma``, additive, contrast 0-255;
- ``labels``: a labels layer, neuron ids faint under the clefts;
- ``image`` (raw EM): a gray image.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from bbem.volumes import list_volumes, ome_multiscales, open_volume
from bbem.volumes.listing import LAYER_ATTR

LayerData = tuple[Any, dict[str, Any], str]
#: The axes of every bbem volume, and their unit (voxel sizes and offsets are in nm).
AXES = ("z", "y", "x")
UNITS = ("nm", "nm", "nm")


def geometry(scale: Any, translate: Any) -> dict[str, Any]:
    """Layer keywords placing a ``[Z, Y, X]`` volume: scale and translate in nm, units, axes."""
    return {
        "scale": tuple(float(s) for s in scale),
        "translate": tuple(float(t) for t in translate),
        "units": UNITS,
        "axis_labels": AXES,
    }


def saved_threshold(path: Path) -> float | None:
    """The threshold a zarr prediction carries: the one validation chose (``bbem infer``
    stores it), else the one its labels were made with, else what napari-bbem's writer saved."""
    from bbem.metrics.threshold import THRESHOLD_ATTR, stored_threshold

    t = stored_threshold(path)
    if t is not None or not (path / "zarr.json").is_file():
        return t
    import zarr

    try:
        attrs: dict[str, Any] = dict(zarr.open_group(path, mode="r").attrs)
    except Exception:  # foreign metadata: no stored threshold
        return None
    infer_attrs, writer_attrs = attrs.get(THRESHOLD_ATTR), attrs.get(LAYER_ATTR)
    for v in (
        infer_attrs.get("labels_threshold") if isinstance(infer_attrs, dict) else None,
        writer_attrs.get("threshold") if isinstance(writer_attrs, dict) else None,
    ):
        if isinstance(v, (int, float)) and 0 <= v <= 1:
            return float(v)
    return None


def read_bbem(path: str | os.PathLike) -> list[LayerData]:
    """Every 3D volume of ``path`` as a lazy napari layer (see the module docstring)."""
    p = Path(path)
    layers: list[LayerData] = []
    for entry in list_volumes(p):
        key, kind = entry.key, entry.kind
        levels = _open_levels(p, key)
        vol = levels[0]
        data = [v.to_dask() for v in levels]
        name = _layer_name(p, key)
        meta: dict[str, Any] = {"bbem_path": str(p), "bbem_key": key, "bbem_kind": kind}
        if kind == "probability" and (t := saved_threshold(p)) is not None:
            meta["threshold"] = t  # the Evaluate widget starts from it
        kwargs: dict[str, Any] = {
            "name": name,
            **geometry(vol.voxel_size, vol.offset),
            "metadata": meta,
        }
        if len(data) > 1:
            kwargs["multiscale"] = True
        layer_data = data if len(data) > 1 else data[0]
        if kind == "labels":
            # neuron segmentations cover every voxel: keep them faint under the clefts
            kwargs["opacity"] = 0.8 if "cleft" in name else 0.3
            layers.append((layer_data, kwargs, "labels"))
            continue
        if kind == "probability":
            kwargs.update(
                colormap="magma", blending="additive", contrast_limits=(0, 255), opacity=0.8
            )
        else:
            kwargs.update(colormap="gray", contrast_limits=_contrast(vol.dtype))
        layers.append((layer_data, kwargs, "image"))
    return layers


# -- helpers ---------------------------------------------------------------------------------------


def _contrast(dtype: np.dtype) -> tuple[float, float] | None:
    # Integer EM is shown over its full range (no full read to find min/max); floats are
    # normalised intensities in [0, 1].
    if dtype == np.uint8:
        return (0, 255)
    if dtype == np.uint16:
        return (0, 65535)
    if np.issubdtype(dtype, np.floating):
        return (0.0, 1.0)
    return None


def _layer_name(path: Path, key: str | None) -> str:
    if key is None:
        return path.name.removesuffix(".zarr") if path.is_dir() else path.stem
    return key.rstrip("/").rsplit("/", 1)[-1]


def _open_levels(path: Path, key: str | None) -> list[Any]:
    """Level 0 and, for a multiscale OME-Zarr image, every coarser level."""
    first = open_volume(path, key=key)
    levels = [first]
    if path.is_dir():
        import zarr

        node = zarr.open(str(path), mode="r")
        if key and isinstance(node, zarr.Group):  # open_volume refused a key into an array
            node = node[key]
        ms = ome_multiscales(dict(node.attrs)) if isinstance(node, zarr.Group) else None
        n = len(ms[0].get("datasets", [])) if ms else 1
        levels += [open_volume(path, key=key, level=i) for i in range(1, n)]
    return levels
