"""bbem volumes as napari layer data: which datasets a container holds, and how to show each.

Plain functions (no Qt): :func:`volume_keys` lists the 3D volumes of a zarr / OME-Zarr / CREMI
hdf5 container, :func:`read_bbem` turns each into a napari ``LayerDataTuple``
``(dask array [Z, Y, X], kwargs, "image" | "labels")`` with scale = voxel size (nm),
translate = offset (nm), units nm and axis labels z, y, x (:func:`geometry`), read lazily
through :func:`bbem.volumes.open_volume`.

How a dataset is shown:

- cleft probabilities (``bbem infer`` output, multiscales name ``cleft_probability``; or a
  uint8 dataset named ``*prob*`` / ``*pred*``): image, ``magma``, additive, contrast 0-255;
- labels (integer data under a ``labels`` group, or named ``clefts`` / ``neuron_ids``): labels;
- anything else (raw EM): a gray image.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from bbem.errors import UserError
from bbem.volumes import ome_multiscales, open_volume

#: Extensions the reader claims (besides directories that are zarr stores).
HDF5_SUFFIXES = (".h5", ".hdf", ".hdf5", ".he5", ".cremi")
TIFF_SUFFIXES = (".tif", ".tiff")
#: The multiscales name ``bbem infer`` gives its probability image.
PROBABILITY_NAME = "cleft_probability"
LABEL_NAMES = ("clefts", "neuron_ids", "labels", "segmentation", "mask")
ZARR_METADATA = ("zarr.json", ".zgroup", ".zarray")

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


def is_bbem_path(path: str | os.PathLike) -> bool:
    """True for a zarr store (directory with zarr metadata), an hdf5 file or a tiff stack."""
    p = Path(path)
    if p.is_dir():
        return any((p / m).is_file() for m in ZARR_METADATA)
    return p.is_file() and p.suffix.lower() in HDF5_SUFFIXES + TIFF_SUFFIXES


def volume_keys(path: str | os.PathLike) -> list[tuple[str | None, str]]:
    """The 3D volumes in a container, as ``(key for open_volume, kind)``, raw first.

    ``kind`` is ``"image"``, ``"labels"`` or ``"probability"``. An OME-Zarr image at the
    root (a ``bbem infer`` output) has key ``None``; its ``labels/*`` follow it.
    """
    p = Path(path)
    if not is_bbem_path(p):
        raise UserError(
            f"{p} is neither a zarr store, an hdf5 file nor a tiff stack: napari-bbem cannot open it"
        )
    if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES:
        found = _tiff_keys(p)
    else:
        found = _hdf5_keys(p) if p.is_file() else _zarr_keys(p)
    if not found:
        raise UserError(f"{p} holds no 3D volume (z, y, x) napari-bbem could show")
    # napari draws later layers on top: raw, then probabilities, then neurons, clefts last
    order = {"image": 0, "probability": 1, "labels": 2}
    return sorted(found, key=lambda kv: (order[kv[1]], "cleft" in (kv[0] or "")))


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
    infer_attrs, writer_attrs = attrs.get(THRESHOLD_ATTR), attrs.get("bbem_layer")
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
    for key, kind in volume_keys(p):
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


def _kind(key: str, dtype: np.dtype, ms_name: str | None = None) -> str:
    parts = key.lower().split("/")
    leaf = parts[-1] if parts[-1] not in ("", "0") else (parts[-2] if len(parts) > 1 else "")
    if ms_name == PROBABILITY_NAME or (dtype == np.uint8 and ("prob" in leaf or "pred" in leaf)):
        return "probability"
    if np.issubdtype(dtype, np.integer) and (
        "labels" in parts[:-1] or any(n in leaf for n in LABEL_NAMES)
    ):
        return "labels"
    return "image"


def _tiff_keys(path: Path) -> list[tuple[str | None, str]]:
    """A tiff stack is one volume (key None); 2D tiffs are not volumes."""
    vol = open_volume(path)
    return [(None, _kind(path.stem, vol.dtype))] if len(vol.shape) == 3 else []


def _hdf5_keys(path: Path) -> list[tuple[str | None, str]]:
    import h5py

    from bbem.volumes.hdf5_io import list_datasets

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path} is not a readable hdf5 file ({e})") from e
    with f:
        # CREMI files also hold annotations (point lists): only 3D arrays are volumes
        return [(k, _kind(k, f[k].dtype)) for k in list_datasets(f) if f[k].ndim == 3]


def _zarr_keys(path: Path) -> list[tuple[str | None, str]]:
    import zarr

    try:
        root = zarr.open(str(path), mode="r")
    except Exception as e:  # zarr raises several types for broken metadata
        raise UserError(f"{path} is not a readable zarr store ({type(e).__name__}: {e})") from e
    if isinstance(root, zarr.Array):
        return [(None, _kind(path.name, root.dtype))] if root.ndim == 3 else []
    found: list[tuple[str | None, str]] = []

    def walk(group: Any, prefix: str) -> None:
        ms = ome_multiscales(dict(group.attrs))
        if ms is not None:
            level0 = group[ms[0]["datasets"][0]["path"]]
            # OME t/c axes of length 1 are dropped by open_volume; more than one is not a volume
            if level0.ndim >= 3 and all(s == 1 for s in level0.shape[:-3]):
                key = prefix.rstrip("/") or None
                kind = _kind(prefix or path.name, level0.dtype, ms[0].get("name"))
                # a store napari-bbem's writer saved says which layer it was
                saved = dict(group.attrs).get("bbem_layer")
                if isinstance(saved, dict) and saved.get("kind") in (
                    "image",
                    "labels",
                    "probability",
                ):
                    kind = saved["kind"]
                found.append((key, kind))
            # OME-Zarr labels sit in the image's "labels" group; other levels are not volumes
            if "labels" in group and isinstance(group["labels"], zarr.Group):
                walk(group["labels"], f"{prefix}labels/")
            return
        for name, member in sorted(group.members(), key=lambda kv: kv[0]):
            if isinstance(member, zarr.Group):
                walk(member, f"{prefix}{name}/")
            elif member.ndim == 3:
                found.append((f"{prefix}{name}", _kind(f"{prefix}{name}", member.dtype)))

    walk(root, "")
    return found
