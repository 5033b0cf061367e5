"""Zarr (v2 and v3, OME-Zarr 0.4 and 0.5) reading, and the OME-Zarr v3 writer.

bbem writes every image as an OME-Zarr 0.5 image group: a zarr v3 group whose ``ome`` attribute
holds the multiscales metadata (axes z, y, x in nanometer, scale = voxel size, translation =
offset) and whose array ``0`` holds the data, zstd-compressed. The array also carries CREMI-style
``resolution`` and ``offset`` attributes so it stays self-describing when opened on its own.
napari (napari-ome-zarr) and other OME-Zarr tools open such a group directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from bbem.errors import UserError, one_line
from bbem.volumes.base import Volume

#: Conversion of OME-Zarr axis units to nm.
_UNIT_NM = {
    "angstrom": 0.1,
    "nanometer": 1.0,
    "nm": 1.0,
    "micrometer": 1e3,
    "micron": 1e3,
    "um": 1e3,
    "millimeter": 1e6,
    "mm": 1e6,
}
OME_VERSION = "0.5"
LEVEL0 = "0"


def default_chunks(shape: Sequence[int]) -> tuple[int, int, int]:
    """Chunks for EM volumes: a few sections deep, 256 x 256 in-plane (2 MB of uint8)."""
    return (min(int(shape[0]), 32), min(int(shape[1]), 256), min(int(shape[2]), 256))


def is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in ("zarr.json", ".zarray", ".zgroup"))


# -- reading --------------------------------------------------------------------------------------


def ome_multiscales(attrs: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The OME-Zarr ``multiscales`` list of a group's attributes, or None when the group is not
    an OME image (no list, or an empty one).

    The one reader of that metadata in bbem (``open_volume``, ``bbem convert``, the napari
    plugin): OME-Zarr 0.5 (zarr v3) nests it under ``ome``, 0.4 (zarr v2) keeps it at the top.
    """
    ome = attrs.get("ome")
    ms = ome.get("multiscales") if isinstance(ome, Mapping) else None
    if ms is None:
        ms = attrs.get("multiscales")
    return list(ms) if isinstance(ms, list) and ms else None


def _transforms(transforms: list[dict[str, Any]] | None, ndim: int) -> tuple[list, list]:
    scale, trans = [1.0] * ndim, [0.0] * ndim
    for t in transforms or []:
        if t.get("type") == "scale" and "scale" in t:
            scale = [a * b for a, b in zip(scale, t["scale"], strict=True)]
        elif t.get("type") == "translation" and "translation" in t:
            trans = [a + b for a, b in zip(trans, t["translation"], strict=True)]
    return scale, trans


def _multiscale_level(
    group: zarr.Group, ms: dict[str, Any], level: int, name: str
) -> tuple[Any, tuple, tuple, list[int]]:
    """Array of one level, voxel size and offset in nm (z, y, x), and the leading axes to drop."""
    datasets = ms.get("datasets") or []
    if not 0 <= level < len(datasets):
        raise UserError(
            f"{name} has {len(datasets)} multiscale level(s) (0-{len(datasets) - 1}); "
            f"level {level} does not exist"
        )
    ds = datasets[level]
    # a group here is broken metadata: open_zarr reports the AttributeError as such
    arr = cast(zarr.Array, group[ds["path"]])
    ndim = arr.ndim
    axes = ms.get("axes") or [{"name": n, "type": "space"} for n in "zyx"[-ndim:]]
    axes = [a if isinstance(a, dict) else {"name": a} for a in axes]  # 0.3 used plain names
    scale, trans = _transforms(ds.get("coordinateTransformations"), ndim)
    gscale, gtrans = _transforms(ms.get("coordinateTransformations"), ndim)
    scale = [a * b for a, b in zip(scale, gscale, strict=True)]
    trans = [a * gs + gt for a, gs, gt in zip(trans, gscale, gtrans, strict=True)]
    spatial = [i for i, a in enumerate(axes) if a.get("type", "space") == "space"]
    if len(spatial) != 3:
        raise UserError(
            f"{name} has {len(spatial)} spatial axes ({[a.get('name') for a in axes]}): "
            "bbem needs 3D volumes (z, y, x)"
        )
    drop = [i for i in range(ndim) if i not in spatial]
    if any(arr.shape[i] != 1 for i in drop):
        raise UserError(
            f"{name} has non-spatial axes with more than one entry (shape {arr.shape}, axes "
            f"{[a.get('name') for a in axes]}): extract one channel/time point first"
        )
    factors = [_UNIT_NM.get(str(axes[i].get("unit", "nanometer")).lower(), 1.0) for i in spatial]
    vs = tuple(scale[i] * f for i, f in zip(spatial, factors, strict=True))
    off = tuple(trans[i] * f for i, f in zip(spatial, factors, strict=True))
    return arr, vs, off, drop


class Squeezed:
    """A view of an array with leading singleton axes (OME t, c) indexed away."""

    def __init__(self, arr: Any, drop: list[int]) -> None:
        self._arr, self._drop = arr, drop
        self.shape = tuple(s for i, s in enumerate(arr.shape) if i not in drop)
        self.dtype = arr.dtype
        self.chunks = tuple(c for i, c in enumerate(arr.chunks) if i not in drop)

    def __getitem__(self, key: tuple) -> np.ndarray:
        it = iter(key)
        full = tuple(0 if i in self._drop else next(it) for i in range(len(self._arr.shape)))
        return self._arr[full]


def list_keys(group: zarr.Group) -> list[str]:
    """Readable keys of a group, sorted: arrays, and OME images (groups with multiscales) as one
    key each."""
    keys: list[str] = []

    def walk(g: zarr.Group, prefix: str) -> None:
        for name, member in sorted(g.members(), key=lambda kv: kv[0]):
            path = f"{prefix}{name}"
            if isinstance(member, zarr.Group):
                if ome_multiscales(dict(member.attrs)) is not None:
                    keys.append(path)
                else:
                    walk(member, path + "/")
            else:
                keys.append(path)

    walk(group, "")
    return keys


def open_zarr_node(path: Path) -> zarr.Array | zarr.Group:
    """The zarr array or group at ``path``, read-only; broken metadata is a UserError."""
    try:
        return zarr.open(str(path), mode="r")
    except Exception as e:  # zarr raises several types for broken metadata
        raise _broken(path, e) from e


def _broken(path: Path, e: Exception) -> UserError:
    return UserError(
        f"{path} is not a readable zarr store ({type(e).__name__}: {one_line(e)}): its metadata "
        "(zarr.json, .zarray, .zgroup, .zattrs) is damaged; restore it or convert the original "
        "again"
    )


def open_zarr(path: Path, key: str | None, level: int, uri: str, reopen: Any) -> Volume:
    """Open a zarr array or group; a group resolves through ``key``, OME multiscales, or CREMI."""
    try:
        return _open_zarr(path, key, level, uri, reopen)
    except UserError:
        raise
    except Exception as e:  # a member's metadata can be as broken as the root's
        raise _broken(path, e) from e


def _open_zarr(path: Path, key: str | None, level: int, uri: str, reopen: Any) -> Volume:
    node = open_zarr_node(path)
    if key:
        if not isinstance(node, zarr.Group):
            raise UserError(f"{path} is a zarr array, not a group: it has no key {key!r}")
        try:
            node = node[key.strip("/")]
        except KeyError:
            keys = list_keys(node)  # type: ignore[arg-type]
            raise UserError(
                f"key {key!r} is not in {path}; it holds: {', '.join(keys) or 'nothing'}"
            ) from None
    if isinstance(node, zarr.Group):
        group = node
        ms = ome_multiscales(dict(group.attrs))
        if ms is None:
            keys = list_keys(group)
            pick = "volumes/raw" if "volumes/raw" in keys else (keys[0] if len(keys) == 1 else None)
            if pick is None:
                raise UserError(
                    f"{uri} is a zarr group with {len(keys)} datasets: choose one with --key "
                    f"or path/key; it holds: {', '.join(keys) or 'nothing'}"
                )
            return _open_zarr(path, f"{key.strip('/')}/{pick}" if key else pick, level, uri, reopen)
        arr, vs, off, drop = _multiscale_level(group, ms[0], level, uri)
    else:
        arr = node
        attrs: dict[str, Any] = dict(arr.attrs)
        vs = attrs.get("resolution", attrs.get("voxel_size", (1.0, 1.0, 1.0)))
        off = attrs.get("offset", (0.0, 0.0, 0.0))
        drop = []
    array = Squeezed(arr, drop) if drop else arr
    # name the dataset, not just the container: "clefts" in it switches on the CREMI mapping
    name = uri if not key or uri.rstrip("/").endswith(key.strip("/")) else f"{uri}/{key.strip('/')}"
    return Volume(
        array,
        name=name,
        voxel_size=vs,
        offset=off,
        chunks=tuple(array.chunks),
        fmt=f"zarr v{arr.metadata.zarr_format}",
        reopen=reopen,
    )


# -- writing --------------------------------------------------------------------------------------


def ome_attributes(
    name: str, voxel_size: Sequence[float], offset: Sequence[float]
) -> dict[str, Any]:
    """OME-Zarr 0.5 multiscales metadata for one level ``0`` of a z, y, x image in nm."""
    return {
        "ome": {
            "version": OME_VERSION,
            "multiscales": [
                {
                    "name": name,
                    "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
                    "datasets": [
                        {
                            "path": LEVEL0,
                            "coordinateTransformations": [
                                {"type": "scale", "scale": [float(v) for v in voxel_size]},
                                {"type": "translation", "translation": [float(o) for o in offset]},
                            ],
                        }
                    ],
                }
            ],
        }
    }


def init_ome_image(
    group: zarr.Group,
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int] | None = None,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    offset: Sequence[float] = (0.0, 0.0, 0.0),
    name: str = "raw",
    fill_value: Any = 0,
) -> zarr.Array:
    """Turn ``group`` into an OME-Zarr image and create its level-0 array (zstd, z/y/x names)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise UserError(f"an EM volume needs a non-empty 3D shape (z, y, x), got {shape}")
    chunks = tuple(int(c) for c in (chunks or default_chunks(shape)))
    chunks = tuple(max(1, min(c, s)) for c, s in zip(chunks, shape, strict=True))
    group.attrs.update(ome_attributes(name, voxel_size, offset))
    return group.create_array(
        LEVEL0,
        shape=shape,
        dtype=np.dtype(dtype),
        chunks=chunks,
        compressors=ZstdCodec(level=3),
        fill_value=fill_value,
        dimension_names=("z", "y", "x"),
        attributes={
            "resolution": [float(v) for v in voxel_size],
            "offset": [float(o) for o in offset],
        },
    )


def create_ome_zarr(
    path: str | Path,
    shape: Sequence[int],
    dtype: Any,
    chunks: Sequence[int] | None,
    voxel_size: Sequence[float] = (1, 1, 1),
    offset: Sequence[float] = (0, 0, 0),
    name: str = "raw",
    fill_value: Any = 0,
) -> zarr.Array:
    """Create (replacing whatever is at ``path``) an OME-Zarr v3 image and return its array.

    ``path`` becomes a zarr v3 group holding the single level ``0`` of shape ``[Z, Y, X]``;
    ``open_volume(path)`` returns that array. No temporary name: the caller renames.
    """
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    return init_ome_image(group, shape, dtype, chunks, voxel_size, offset, name, fill_value)


def create_container(path: str | Path) -> zarr.Group:
    """A fresh zarr v3 root group at ``path`` (replacing whatever was there)."""
    return zarr.open_group(str(path), mode="w", zarr_format=3)
