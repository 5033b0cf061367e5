"""Which 3D volumes a container holds, and whether each is raw EM, labels or cleft probabilities.

:func:`list_volumes` walks a zarr store (v2, v3, OME-Zarr with its ``labels/*`` images), a
CREMI-style hdf5 file or a tiff stack and returns one :class:`VolumeEntry` per ``[Z, Y, X]``
volume; ``open_volume(path, key=entry.key)`` opens it. A viewer (napari-bbem) shows each by its
kind; the rules are here so that every tool agrees on them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import zarr

from bbem.errors import UserError
from bbem.volumes.hdf5_io import HDF5_SUFFIXES, list_datasets, open_hdf5_file
from bbem.volumes.io import open_volume
from bbem.volumes.tiff_io import TIFF_SUFFIXES
from bbem.volumes.zarr_io import _broken, is_zarr_dir, ome_multiscales, open_zarr_node

Kind = Literal["image", "labels", "probability"]
KINDS: tuple[Kind, ...] = get_args(Kind)
#: The multiscales name ``bbem infer`` gives its probability image.
PROBABILITY_NAME = "cleft_probability"
#: Dataset names (substrings of the last path part) that hold integer labels.
LABEL_NAMES = ("clefts", "neuron_ids", "labels", "segmentation", "mask")
#: The root attribute napari-bbem's writer saves (``{"kind": ..., ...}``): it names the kind.
LAYER_ATTR = "bbem_layer"


@dataclass(frozen=True)
class VolumeEntry:
    """One 3D volume of a container.

    ``key`` is what :func:`bbem.volumes.open_volume` takes (``volumes/raw``, ``labels/clefts``);
    None for a root array, an OME-Zarr image at the root, or a tiff stack. ``kind`` is
    ``"image"`` (raw EM), ``"labels"`` (integer ids) or ``"probability"`` (cleft probabilities).
    """

    key: str | None
    kind: Kind


def is_volume_path(path: str | os.PathLike) -> bool:
    """True for a zarr store (directory with zarr metadata), an hdf5 file or a tiff stack.

    Decided from the name alone (nothing is opened), so a viewer can claim a path cheaply.
    """
    p = Path(path)
    if p.is_dir():
        return is_zarr_dir(p)
    return p.is_file() and p.suffix.lower() in HDF5_SUFFIXES + TIFF_SUFFIXES


def list_volumes(path: str | os.PathLike) -> list[VolumeEntry]:
    """The ``[Z, Y, X]`` volumes of ``path``: raw first, then probabilities, then labels with
    clefts last.

    Returns a non-empty list. An OME-Zarr image at the root (a ``bbem infer`` output) has key
    None and its ``labels/*`` follow it; hdf5 datasets that are not 3D (CREMI annotations) are
    skipped. A path that is no container, an unreadable store or one without a 3D volume is a
    :class:`~bbem.errors.UserError`.
    """
    p = Path(path)
    if not is_volume_path(p):
        raise UserError(
            f"{p} is neither a zarr store, an hdf5 file nor a tiff stack: bbem cannot open it"
        )
    if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES:
        found = _tiff_entries(p)
    else:
        found = _hdf5_entries(p) if p.is_file() else _zarr_entries(p)
    if not found:
        raise UserError(f"{p} holds no 3D volume (z, y, x)")
    # viewers draw later layers on top: raw, then probabilities, then neurons, clefts last
    order = {"image": 0, "probability": 1, "labels": 2}
    return sorted(found, key=lambda e: (order[e.kind], "cleft" in (e.key or "")))


# -- helpers ---------------------------------------------------------------------------------------


def _kind(key: str, dtype: np.dtype, ms_name: str | None = None) -> Kind:
    """The kind a dataset's path and dtype suggest (``key``: its path or file name)."""
    parts = key.lower().split("/")
    # an array named "0" is a multiscale level: its group names it
    leaf = parts[-1] if parts[-1] not in ("", "0") else (parts[-2] if len(parts) > 1 else "")
    if ms_name == PROBABILITY_NAME or (dtype == np.uint8 and ("prob" in leaf or "pred" in leaf)):
        return "probability"
    if np.issubdtype(dtype, np.integer) and (
        "labels" in parts[:-1] or any(n in leaf for n in LABEL_NAMES)
    ):
        return "labels"
    return "image"


def _tiff_entries(path: Path) -> list[VolumeEntry]:
    """A tiff stack is one volume (key None); a 2D tiff is refused by open_volume."""
    with open_volume(path) as vol:
        return [VolumeEntry(None, _kind(path.stem, vol.dtype))] if len(vol.shape) == 3 else []


def _hdf5_entries(path: Path) -> list[VolumeEntry]:
    with open_hdf5_file(path) as f:
        # CREMI files also hold annotations (point lists): only 3D arrays are volumes
        return [VolumeEntry(k, _kind(k, f[k].dtype)) for k in list_datasets(f) if f[k].ndim == 3]


def _saved_kind(attrs: dict[str, Any]) -> Kind | None:
    """The kind napari-bbem's writer recorded for a store it saved, if any."""
    saved = attrs.get(LAYER_ATTR)
    kind = saved.get("kind") if isinstance(saved, dict) else None
    return kind if kind in KINDS else None


def _zarr_entries(path: Path) -> list[VolumeEntry]:
    root = open_zarr_node(path)
    if isinstance(root, zarr.Array):
        return [VolumeEntry(None, _kind(path.name, root.dtype))] if root.ndim == 3 else []
    found: list[VolumeEntry] = []

    def walk(group: zarr.Group, prefix: str) -> None:
        attrs = dict(group.attrs)
        ms = ome_multiscales(attrs)
        if ms is not None:
            level0 = group[ms[0]["datasets"][0]["path"]]
            # OME t/c axes of length 1 are dropped by open_volume; more than one is not a volume
            # (a group in place of level 0 is broken metadata: open_volume reports it, not here)
            if (
                isinstance(level0, zarr.Array)
                and level0.ndim >= 3
                and all(s == 1 for s in level0.shape[:-3])
            ):
                kind = _saved_kind(attrs) or _kind(
                    prefix or path.name, level0.dtype, ms[0].get("name")
                )
                found.append(VolumeEntry(prefix.rstrip("/") or None, kind))
            # OME-Zarr labels sit in the image's "labels" group; other levels are not volumes
            if "labels" in group and isinstance(group["labels"], zarr.Group):
                walk(group["labels"], f"{prefix}labels/")
            return
        for name, member in sorted(group.members(), key=lambda kv: kv[0]):
            if isinstance(member, zarr.Group):
                walk(member, f"{prefix}{name}/")
            elif member.ndim == 3:
                found.append(VolumeEntry(f"{prefix}{name}", _kind(f"{prefix}{name}", member.dtype)))

    try:
        walk(root, "")
    except Exception as e:  # a member's metadata can be as broken as the root's
        raise _broken(path, e) from e
    return found
