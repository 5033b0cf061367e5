"""CREMI-style hdf5: ``volumes/raw``, ``volumes/labels/clefts``, ``volumes/labels/neuron_ids``.

Each dataset carries ``resolution`` (nm, z/y/x) and ``offset`` (nm) attributes. h5py reads only
the hdf5 chunks an index touches. Cleft datasets use the largest uint64 for "no cleft";
:class:`~bbem.volumes.base.Volume` maps it to 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py

from bbem.errors import UserError, one_line
from bbem.volumes.base import Volume

HDF5_SUFFIXES = (".h5", ".hdf", ".hdf5", ".he5", ".cremi")
CREMI_RAW = "volumes/raw"
CREMI_CLEFTS = "volumes/labels/clefts"
CREMI_NEURONS = "volumes/labels/neuron_ids"


def list_datasets(group: h5py.Group) -> list[str]:
    """Paths of every dataset under ``group``, sorted."""
    keys: list[str] = []
    group.visititems(lambda n, o: keys.append(n) if isinstance(o, h5py.Dataset) else None)
    return sorted(keys)


def open_hdf5_file(path: Path) -> h5py.File:
    """``path`` opened read-only; an empty, truncated or foreign file is a UserError."""
    try:
        return h5py.File(path, "r")
    except OSError as e:  # h5py says "file signature not found", "truncated file", ...
        size = path.stat().st_size if path.is_file() else None
        what = "is empty (0 bytes)" if size == 0 else "is not a readable hdf5 file"
        raise UserError(
            f"{path} {what} ({one_line(e)}): give an hdf5 file (CREMI layout), or convert the "
            "original again if this one was cut short"
        ) from e


def open_hdf5(path: Path, key: str | None, uri: str, reopen: Any) -> Volume:
    """Open one dataset of an hdf5 file; with no key, ``volumes/raw`` or the only dataset."""
    f = open_hdf5_file(path)
    try:
        keys = list_datasets(f)
        if key is None:
            if CREMI_RAW in keys:
                key = CREMI_RAW
            elif len(keys) == 1:
                key = keys[0]
            else:
                raise UserError(
                    f"{path} holds {len(keys)} datasets: choose one with --key or "
                    f"{path.name}:KEY; it holds: {', '.join(keys) or 'nothing'}"
                )
        key = key.strip("/")
        ds = f.get(key)
        if not isinstance(ds, h5py.Dataset):
            raise UserError(
                f"key {key!r} is not a dataset in {path}; it holds: {', '.join(keys) or 'nothing'}"
            )
        attrs: dict[str, Any] = dict(ds.attrs)
        vs = attrs.get("resolution", attrs.get("voxel_size", (1.0, 1.0, 1.0)))
        off = attrs.get("offset", (0.0, 0.0, 0.0))
        name = uri if uri.endswith(key) else f"{uri}:{key}"
        return Volume(
            ds,
            name=name,
            voxel_size=vs,
            offset=off,
            chunks=ds.chunks,
            fmt="hdf5",
            reopen=reopen,
            close=f.close,
        )
    except BaseException:
        f.close()
        raise
