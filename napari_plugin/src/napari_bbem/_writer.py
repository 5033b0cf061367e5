"""The napari writer contribution: an image (prediction) or labels layer as OME-Zarr v3.

The store is what ``bbem infer`` writes and ``bbem evaluate`` / :func:`bbem.volumes.open_volume`
read: one OME-Zarr image at the root, the layer's scale as voxel size (nm) and its translate as
offset (nm). The layer's kind (``labels`` / ``probability`` / ``image``) is kept in the
``bbem_layer`` attribute so that napari-bbem's reader shows it the same way again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bbem.errors import UserError

# The root attribute that records the napari layer a store was saved from; bbem.volumes reads
# its kind back (list_volumes), so the name lives there.
from bbem.volumes.listing import LAYER_ATTR


def layer_kind(layer_type: str, meta: dict[str, Any]) -> str:
    """``labels``, ``probability`` (an image marked so by napari-bbem) or ``image``."""
    if layer_type == "labels":
        return "labels"
    bbem_kind = (meta.get("metadata") or {}).get("bbem_kind")
    return "probability" if bbem_kind == "probability" else "image"


def saved_by_writer(path: Path) -> bool:
    """True for a zarr store this writer saved (it carries :data:`LAYER_ATTR`)."""
    import zarr

    try:
        return LAYER_ATTR in dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # not a zarr group (a file, a folder of other things, an array)
        return False


def write_layer(path: str, data: Any, meta: dict[str, Any], layer_type: str) -> list[str]:
    """Write one layer's data (level 0 if multiscale) to ``path`` (``.zarr`` added if missing)."""
    from bbem.volumes import write_volume

    p = Path(path)
    if p.suffix.lower() != ".zarr":
        p = p.with_name(p.name + ".zarr")
    if meta.get("multiscale") or isinstance(data, list):
        data = data[0]
    ndim = len(getattr(data, "shape", ()))
    if ndim != 3:
        raise UserError(f"napari-bbem writes 3D (z, y, x) layers; this one has {ndim} dimensions")
    scale = tuple(float(s) for s in meta.get("scale", (1.0, 1.0, 1.0)))
    translate = tuple(float(t) for t in meta.get("translate", (0.0, 0.0, 0.0)))
    if p.exists() and not saved_by_writer(p):
        # never replace what napari-bbem did not write: a raw volume, bbem infer's output, ...
        raise UserError(
            f"{p} exists and was not saved by napari-bbem: choose a new name (nothing written)"
        )
    kind = layer_kind(layer_type, meta)
    name = str(meta.get("name") or p.stem)
    write_volume(p, data, voxel_size=scale, offset=translate, overwrite=True, name=name)
    import zarr

    group = zarr.open_group(str(p), mode="r+")
    extra = {
        k: v
        for k, v in (meta.get("metadata") or {}).items()
        if k in ("bbem_source", "threshold") and isinstance(v, str | int | float)
    }
    group.attrs[LAYER_ATTR] = {"kind": kind, "name": name, **extra}
    return [str(p)]


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for image layers (probabilities, raw)."""
    return write_layer(path, data, meta, "image")


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for labels layers (clefts, ground truth)."""
    return write_layer(path, data, meta, "labels")
