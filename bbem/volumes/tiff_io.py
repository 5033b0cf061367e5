"""Tiff stacks: a multi-page tiff, or a folder of 2D tiffs (one section each, natural order).

Reading goes through tifffile's zarr store, so an index decodes only the strips or tiles it
touches. Voxel size comes from the tiff metadata where it says so: tifffile's shaped JSON
(``spacing`` + ``unit``), ImageJ (``spacing``, ``unit``), OME-TIFF (``PhysicalSize*``), or the
resolution tags in centimetres; otherwise 1 nm.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tifffile
import zarr

from bbem.errors import UserError, one_line
from bbem.volumes.base import Volume
from bbem.volumes.zarr_io import Squeezed

if TYPE_CHECKING:
    from tifffile.zarr import ZarrStore

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


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Open a tiff with its damage as a UserError naming ``path``.

    tifffile raises for a file that is no tiff, but only *logs* some damage (a page offset past
    the end of a truncated file, a shape its pages cannot fill) and then reads what it can, so
    a cut-off stack would open as fewer sections: its logged errors are made errors here.
    """
    log = logging.getLogger("tifffile")
    handler = _Records()
    log.addHandler(handler)
    try:
        yield
    except (tifffile.TiffFileError, ValueError, OSError, EOFError, IndexError, KeyError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(
            f"{path} is not a readable tiff ({type(e).__name__}: {one_line(e)}): check the file, "
            "or convert the original again if this one was cut short"
        ) from e
    finally:
        log.removeHandler(handler)
    errors = [r for r in handler.records if r.levelno >= logging.ERROR]
    if errors:
        raise UserError(
            f"{path} is truncated or damaged (tifffile: {_message(errors[0])}): "
            "restore it from a good copy or convert the original again"
        )
    for r in handler.records:  # warnings: shown as tifffile would have shown them
        log.handle(r)


def _message(record: logging.LogRecord) -> str:
    """A tifffile log message without its leading object repr (``<tifffile.TiffPages @8>``)."""
    return re.sub(r"^<[^>]*>\s*", "", one_line(record.getMessage()))


def _refuse_colour(path: Path, series: tifffile.TiffPageSeries) -> None:
    """Refuse channel-last colour (y, x, 3) or (z, y, x, 3): it would pass for z, y, x.

    Planar samples (axes ``SYX``) stay readable as z: tifffile itself writes a 3- or 4-section
    stack that way when no photometric is given.
    """
    axes = series.axes
    if not axes.endswith("S"):
        return
    photometric = tifffile.PHOTOMETRIC(series.keyframe.photometric).name
    raise UserError(
        f"{path} is a colour image ({photometric}, {series.shape[-1]} samples per pixel, shape "
        f"{series.shape}, axes {axes}): bbem reads greyscale EM (z, y, x); convert it first, "
        f"e.g. python -c \"import tifffile; tifffile.imwrite('grey.tif', "
        f"tifffile.imread('{path}').mean(axis=-1).round().astype('uint8'))\" or in ImageJ "
        "Image > Type > 8-bit"
    )


def _check_sections(files: list[Path]) -> None:
    """Refuse a tiff folder unless every file is a readable 2D greyscale section of one shape
    and dtype. Only headers are read; a misfit would otherwise fail deep in a later read."""
    first: tuple[tuple[int, ...], Any] | None = None
    for f in files:
        with _reading(f), tifffile.TiffFile(f) as tif:
            series = tif.series[0]
            _refuse_colour(f, series)
            found = (tuple(series.shape), series.dtype)
        if len(found[0]) != 2:
            raise UserError(
                f"{f} has shape {found[0]}: a folder of tiffs needs one 2D section per file"
            )
        if first is None:
            first = found
        elif found != first:
            raise UserError(
                f"{f} is {found[0]} {found[1]} but {files[0].name} is {first[0]} {first[1]}: "
                "every section of a tiff folder must have the same shape and dtype; crop, pad or "
                "convert the odd ones, or move them out of the folder"
            )


def open_tiff(path: Path, uri: str, reopen: Any) -> Volume:
    """Open a multi-page tiff or a folder of 2D tiffs lazily."""
    store: ZarrStore  # over the files of a folder, or the pages of one file
    if path.is_dir():
        files = tiff_files(path)
        if not files:
            raise UserError(f"{path} holds no .tif/.tiff files")
        _check_sections(files)
        with _reading(files[0]), tifffile.TiffFile(files[0]) as first:
            vs = tiff_voxel_size(first)
            off = tiff_offset(first)
        with _reading(path):
            seq = tifffile.TiffSequence([str(f) for f in files], pattern=None)
            store = seq.aszarr()
        close = store.close
        fmt = "tiff folder"
    else:
        with _reading(path):
            tif = tifffile.TiffFile(path)
        try:
            with _reading(path):
                series = tif.series[0]
                _refuse_colour(path, series)
                vs = tiff_voxel_size(tif)
                off = tiff_offset(tif)
                store = series.aszarr()
            if len(series.shape) == 2:
                raise UserError(
                    f"{path} is a single 2D image {series.shape}: bbem needs 3D volumes; give a "
                    "multi-page tiff or a folder of sections"
                )
        except BaseException:
            tif.close()
            raise

        def close() -> None:
            store.close()
            tif.close()

        fmt = "tiff"
    arr = zarr.open_array(store, mode="r")
    array: zarr.Array | Squeezed = arr
    if arr.ndim > 3 and all(s == 1 for s in arr.shape[:-3]):
        array = Squeezed(arr, list(range(arr.ndim - 3)))
    return Volume(
        array,
        name=uri,
        voxel_size=vs or (1.0, 1.0, 1.0),
        offset=off,
        chunks=tuple(array.chunks),
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
