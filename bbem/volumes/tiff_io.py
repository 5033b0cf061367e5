"""Tiff stacks: a multi-page tiff, or a folder of 2D tiffs (one section each, natural order).

Reading goes through tifffile's zarr store, so an index decodes only the strips or tiles it
touches. Voxel size comes from the tiff metadata where it says so: tifffile's shaped JSON
(``spacing`` + ``unit``), ImageJ (``spacing``, ``unit``), OME-TIFF (``PhysicalSize*``), or the
resolution tags in centimetres; otherwise 1 nm.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr

from bbem.errors import UserError
from bbem.volumes.base import Volume

TIFF_SUFFIXES = (".tif", ".tiff")
_UNIT_NM = {"nm": 1.0, "nanometer": 1.0, "um": 1e3, "µm": 1e3, "micron": 1e3, "micrometer": 1e3}


def tiff_files(folder: Path) -> list[Path]:
    """The 2D tiffs of a folder in natural order (``s2.tif`` before ``s10.tif``)."""
    names = [p.name for p in folder.iterdir() if p.suffix.lower() in TIFF_SUFFIXES]
    return [folder / n for n in tifffile.natural_sorted(names)]


def _resolution_nm(page: tifffile.TiffPage, unit_nm: float | None) -> tuple[float, float] | None:
    """In-plane pixel size (y, x) in nm from the resolution tags, when they mean something."""
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None

    def px(tag: str) -> float:
        num, den = tags[tag].value
        return den / num if num else 0.0

    y, x = px("YResolution"), px("XResolution")
    resunit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    if unit_nm is not None:  # the description names the unit; the tag holds pixels per unit
        scale = unit_nm
    elif resunit == 3:  # centimetre
        scale = 1e7
    else:  # inch / none without a unit in the description: typically a meaningless 72 dpi
        return None
    if y <= 0 or x <= 0:
        return None
    return (y * scale, x * scale)


def _ome_voxel_size(tif: tifffile.TiffFile) -> tuple[float, float, float] | None:
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(tif.ome_metadata or "")
    except ET.ParseError:
        return None
    pix = next((e for e in root.iter() if e.tag.endswith("Pixels")), None)
    if pix is None:
        return None

    def size(axis: str) -> float:
        v = float(pix.get(f"PhysicalSize{axis}", 1.0))
        unit = pix.get(f"PhysicalSize{axis}Unit", "µm")
        return v * _UNIT_NM.get(unit, 1e3)

    return (size("Z"), size("Y"), size("X"))


def tiff_offset(tif: tifffile.TiffFile) -> tuple[float, float, float]:
    """Offset (nm) that bbem keeps in tifffile's shaped description; else 0."""
    if tif.is_shaped and tif.shaped_metadata:
        off = tif.shaped_metadata[0].get("offset")
        if isinstance(off, list) and len(off) == 3:
            return tuple(float(o) for o in off)  # type: ignore[return-value]
    return (0.0, 0.0, 0.0)


def tiff_voxel_size(tif: tifffile.TiffFile) -> tuple[float, float, float] | None:
    """Voxel size (z, y, x) in nm from whatever metadata the tiff carries, or None."""
    if tif.is_ome:
        vs = _ome_voxel_size(tif)
        if vs is not None:
            return vs
    page = tif.pages.first
    meta: dict[str, Any] = {}
    if tif.is_imagej and tif.imagej_metadata:
        meta = dict(tif.imagej_metadata)
    elif tif.is_shaped and tif.shaped_metadata:
        meta = dict(tif.shaped_metadata[0])
    unit = str(meta.get("unit", "")).lower() or None
    unit_nm = _UNIT_NM.get(unit) if unit else None
    yx = _resolution_nm(page, unit_nm)
    z = meta.get("spacing")
    if yx is None and z is None:
        return None
    z_nm = float(z) * (unit_nm or 1.0) if z is not None else 1.0
    return (z_nm, *(yx or (1.0, 1.0)))


def open_tiff(path: Path, uri: str, reopen: Any) -> Volume:
    """Open a multi-page tiff or a folder of 2D tiffs lazily."""
    if path.is_dir():
        files = tiff_files(path)
        if not files:
            raise UserError(f"{path} holds no .tif/.tiff files")
        try:
            with tifffile.TiffFile(files[0]) as first:
                vs = tiff_voxel_size(first)
                off = tiff_offset(first)
                page_shape = first.series[0].shape
            if len(page_shape) != 2:
                raise UserError(
                    f"{files[0]} has shape {page_shape}: a folder of tiffs needs one 2D section "
                    "per file"
                )
            seq = tifffile.TiffSequence([str(f) for f in files], pattern=None)
            store = seq.aszarr()
        except (tifffile.TiffFileError, ValueError) as e:
            raise UserError(f"{path}: cannot read its tiffs as one stack ({e})") from e
        close = store.close
        fmt = "tiff folder"
    else:
        try:
            tif = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, ValueError) as e:
            raise UserError(f"{path} is not a readable tiff ({e})") from e
        vs = tiff_voxel_size(tif)
        off = tiff_offset(tif)
        store = tif.series[0].aszarr()
        shape = tif.series[0].shape
        if len(shape) == 2:
            tif.close()
            raise UserError(
                f"{path} is a single 2D image {shape}: bbem needs 3D volumes; give a "
                "multi-page tiff or a folder of sections"
            )

        def close() -> None:
            store.close()
            tif.close()

        fmt = "tiff"
    arr = zarr.open_array(store, mode="r")
    if arr.ndim > 3 and all(s == 1 for s in arr.shape[:-3]):
        from bbem.volumes.zarr_io import _Squeezed

        arr = _Squeezed(arr, list(range(arr.ndim - 3)))
    return Volume(
        arr,
        name=uri,
        voxel_size=vs or (1.0, 1.0, 1.0),
        offset=off,
        chunks=tuple(arr.chunks),
        fmt=fmt,
        reopen=reopen,
        close=close,
    )


def write_tiff(
    path: str | Path,
    pages: Iterable[np.ndarray],
    shape: Sequence[int],
    dtype: Any,
    voxel_size: Sequence[float],
    offset: Sequence[float] = (0.0, 0.0, 0.0),
) -> None:
    """Write z sections (an iterable of 2D arrays, so any size streams) as one zlib tiff.

    The voxel size is kept the way tifffile and bbem read it back: ``spacing`` (z) and
    ``unit: nm`` in the shaped description, pixels per nm in the resolution tags.
    """
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    big = int(np.prod(shape)) * dtype.itemsize > 2**31  # classic tiff stops at 4 GB of offsets
    tifffile.imwrite(
        str(path),
        data=iter(pages),
        shape=shape,
        dtype=dtype,
        bigtiff=big,
        photometric="minisblack",
        compression="zlib",
        resolution=(1.0 / float(voxel_size[2]), 1.0 / float(voxel_size[1])),
        metadata={
            "spacing": float(voxel_size[0]),
            "unit": "nm",
            "axes": "ZYX",
            "offset": [float(o) for o in offset],
        },
    )


def sections(data: Any) -> Iterator[np.ndarray]:
    """Yield the z sections of a numpy, dask or Volume array one at a time."""
    for z in range(data.shape[0]):
        yield np.asarray(data[z : z + 1])[0] if not isinstance(data, np.ndarray) else data[z]
