"""``open_volume`` for every format, and the atomic writers (OME-Zarr v3 or tiff)."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from bbem.atomic import atomic_output
from bbem.errors import UserError
from bbem.volumes.base import Volume, check_finite, check_same_shape
from bbem.volumes.hdf5_io import HDF5_SUFFIXES, open_hdf5
from bbem.volumes.tiff_io import TIFF_SUFFIXES, open_tiff, sections, tiff_files, write_tiff
from bbem.volumes.zarr_io import (
    create_container,
    default_chunks,
    init_ome_image,
    is_zarr_dir,
    open_zarr,
)

SUPPORTED = (
    "zarr (v2/v3, OME-Zarr) directory, multi-page .tif/.tiff, folder of .tif sections, "
    "hdf5 (.h5/.hdf/.hdf5, CREMI layout)"
)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def split_uri(path_or_uri: str | os.PathLike) -> tuple[Path, str | None]:
    """Split ``file.hdf:volumes/raw`` or ``c.zarr/volumes/raw`` into container and inner key."""
    s = os.fspath(path_or_uri)
    p = Path(s)
    if p.exists():
        return p, None
    head, sep, tail = s.rpartition(":")
    if sep and head and Path(head).exists():
        return Path(head), tail.strip("/") or None
    for parent in p.parents:
        if parent == Path(".") or parent == Path(parent.anchor):
            break
        if parent.exists():
            if parent.is_file() or is_zarr_dir(parent):
                return parent, p.relative_to(parent).as_posix()
            break
    raise UserError(f"{s} does not exist: check the path")


def detect_format(path: Path) -> str:
    """``zarr``, ``tiff`` or ``hdf5`` for an existing path, else a UserError."""
    if path.is_dir():
        if is_zarr_dir(path):
            return "zarr"
        if tiff_files(path):
            return "tiff"
        raise UserError(
            f"{path} is a directory with neither zarr metadata (zarr.json, .zarray, .zgroup) "
            f"nor .tif sections: unknown format (supported: {SUPPORTED})"
        )
    suffix = path.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        return "hdf5"
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic in _TIFF_MAGIC:
        return "tiff"
    if h5py.is_hdf5(path):
        return "hdf5"
    raise UserError(f"{path}: unknown format (supported: {SUPPORTED})")


def open_volume(
    path_or_uri: str | os.PathLike,
    key: str | None = None,
    level: int = 0,
    voxel_size: Sequence[float] | None = None,
) -> Volume:
    """Open an EM volume lazily as a :class:`Volume` (z, y, x).

    ``path_or_uri``: a zarr array or group (v2, v3, OME-Zarr: multiscale ``level``), a
    multi-page tiff, a folder of 2D tiffs, or an hdf5 file; ``file.hdf:volumes/raw`` or
    ``c.zarr/volumes/raw`` selects a dataset inside a container, as does ``key``. A container
    opened without a key gives ``volumes/raw`` (the CREMI layout) or its only dataset.
    ``voxel_size`` (nm, z/y/x) overrides what the file says, for formats that cannot say it.
    """
    reopen = functools.partial(
        open_volume, os.fspath(path_or_uri), key=key, level=level, voxel_size=voxel_size
    )
    container, inner = split_uri(path_or_uri)
    key = f"{inner}/{key.strip('/')}" if inner and key else (key or inner)
    fmt = detect_format(container)
    uri = os.fspath(path_or_uri)
    if fmt == "zarr":
        vol = open_zarr(container, key, level, uri, reopen)
    elif fmt == "hdf5":
        vol = open_hdf5(container, key, uri, reopen)
    else:
        if key:
            raise UserError(f"{container} is a tiff stack: it holds one volume, no key {key!r}")
        vol = open_tiff(container, uri, reopen)
    if voxel_size is not None:
        vol.voxel_size = tuple(float(v) for v in voxel_size)  # type: ignore[assignment]
    return vol


# -- writing --------------------------------------------------------------------------------------


@contextlib.contextmanager
def hold_interrupts() -> Iterator[Callable[[], None]]:
    """Hold Ctrl-C while zarr writes are in flight; yield ``check``, to call between blocks.

    zarr writes a block's chunks on its own event-loop thread. A KeyboardInterrupt raised in the
    main thread mid-write leaves those writes running while the cleanup removes the ``.partial``
    folder under them: a traceback, and a ``.partial`` left behind. Here the first Ctrl-C only
    sets a flag and ``check()`` raises KeyboardInterrupt at the next block boundary, when no
    write is in flight; a second Ctrl-C interrupts at once. Off the main thread (signals cannot
    be caught there), or under a SIGINT handler someone else installed, nothing is held.
    """
    hit = False

    def check() -> None:
        if hit:
            raise KeyboardInterrupt

    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield check
        return

    def held(signum: int, frame: object) -> None:
        nonlocal hit
        hit = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, held)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def iter_blocks(shape: Sequence[int], block: Sequence[int]) -> Iterator[tuple[slice, slice, slice]]:
    """Chunk-aligned blocks covering ``shape``, z-major."""
    for z in range(0, shape[0], block[0]):
        for y in range(0, shape[1], block[1]):
            for x in range(0, shape[2], block[2]):
                yield (
                    slice(z, min(z + block[0], shape[0])),
                    slice(y, min(y + block[1], shape[1])),
                    slice(x, min(x + block[2], shape[2])),
                )


def _check_data(data: Any, name: str) -> None:
    shape = tuple(data.shape)
    if len(shape) != 3:
        raise UserError(f"{name} has {len(shape)} dimensions {shape}: bbem writes 3D (z, y, x)")
    if min(shape) == 0:
        raise UserError(f"{name} is empty (shape {shape}): nothing to write")


def _fill(arr: Any, data: Any, name: str, check: Callable[[], None]) -> None:
    """Copy ``data`` into a zarr array block by block (so dask/Volume inputs stream);
    ``check`` (see :func:`hold_interrupts`) runs after each write."""
    if isinstance(data, np.ndarray):
        check_finite(data, name)
        arr[...] = data
        check()
        return
    for sl in iter_blocks(arr.shape, arr.chunks):
        block = np.asarray(data[sl])
        check_finite(block, name, tuple((s.start, s.stop) for s in sl))
        arr[sl] = block
        check()


def write_volume(
    path: str | os.PathLike,
    data: Any,
    voxel_size: Sequence[float] = (1, 1, 1),
    offset: Sequence[float] = (0, 0, 0),
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
    name: str = "raw",
) -> Path:
    """Write a ``[Z, Y, X]`` numpy/dask array as OME-Zarr v3 (or a tiff for .tif/.tiff paths).

    The write goes to ``<path>.partial`` and is renamed when complete; an existing ``path`` is
    refused unless ``overwrite``. Floating-point data with NaN is refused.
    """
    path = Path(path)
    _check_data(data, name)
    with hold_interrupts() as check, atomic_output(path, overwrite) as tmp:
        if path.suffix.lower() in TIFF_SUFFIXES:
            if isinstance(data, np.ndarray):
                check_finite(data, name)
            pages = (_checked(s, name, check) for s in sections(data))
            write_tiff(tmp, pages, data.shape, data.dtype, voxel_size, offset)
        else:
            group = create_container(tmp)
            arr = init_ome_image(
                group, data.shape, data.dtype, chunks, voxel_size, offset, name=name
            )
            _fill(arr, data, name, check)
    return path


def _checked(section: np.ndarray, name: str, check: Callable[[], None]) -> np.ndarray:
    check()
    check_finite(section, name)
    return section


def write_volumes(
    path: str | os.PathLike,
    arrays: Mapping[str, Any],
    voxel_size: Sequence[float] = (1, 1, 1),
    offset: Sequence[float] = (0, 0, 0),
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write several same-shape volumes into one zarr v3 container at keys such as
    ``volumes/raw``, ``volumes/labels/clefts`` (the CREMI layout), each an OME-Zarr image.

    Atomic (``<path>.partial`` renamed when complete); refuses an existing path unless
    ``overwrite``. Readable with ``open_volume(path, key=...)`` or ``open_volume(path/key)``.
    """
    path = Path(path)
    if not arrays:
        raise UserError(f"nothing to write to {path}: no volumes given")
    for k, a in arrays.items():
        _check_data(a, k)
    shapes = {k: tuple(a.shape) for k, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise UserError(f"raw and label shapes disagree: {shapes}; they must cover the same voxels")
    with hold_interrupts() as check, atomic_output(path, overwrite) as tmp:
        root = create_container(tmp)
        for k, a in arrays.items():
            group = root.require_group(k.strip("/"))
            arr = init_ome_image(
                group,
                a.shape,
                a.dtype,
                chunks,
                voxel_size,
                offset,
                name=k.strip("/").split("/")[-1],
            )
            _fill(arr, a, k, check)
    return path


__all__ = [
    "check_same_shape",
    "default_chunks",
    "detect_format",
    "hold_interrupts",
    "iter_blocks",
    "open_volume",
    "split_uri",
    "write_volume",
    "write_volumes",
]
