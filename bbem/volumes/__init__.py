"""Reading and writing EM volumes: zarr (v2, v3, OME-Zarr), tiff stacks, CREMI-style hdf5.

Everything is read lazily through :class:`Volume` (z, y, x; voxel size and offset in nm) and
written as OME-Zarr v3 (zstd) or tiff, atomically::

    from bbem.volumes import open_volume, write_volume
    raw = open_volume("sample_A.hdf:volumes/raw")     # or "c.zarr/volumes/raw", key=...
    block = raw[0:16, 0:256, 0:256]                    # reads only the chunks it touches
    write_volume("out.zarr", block, voxel_size=raw.voxel_size)

:func:`list_volumes` names the volumes a container holds and what each is (image, labels,
probability).
"""

from bbem.volumes.base import CLEFT_BACKGROUND, Volume, check_finite, check_same_shape
from bbem.volumes.convert import convert, convert_from_cli
from bbem.volumes.hdf5_io import CREMI_CLEFTS, CREMI_NEURONS, CREMI_RAW
from bbem.volumes.io import iter_blocks, open_volume, split_uri, write_volume, write_volumes
from bbem.volumes.listing import VolumeEntry, is_volume_path, list_volumes
from bbem.volumes.normalize import normalize_raw
from bbem.volumes.zarr_io import create_ome_zarr, default_chunks, list_keys, ome_multiscales

__all__ = [
    "CLEFT_BACKGROUND",
    "CREMI_CLEFTS",
    "CREMI_NEURONS",
    "CREMI_RAW",
    "Volume",
    "VolumeEntry",
    "check_finite",
    "check_same_shape",
    "convert",
    "convert_from_cli",
    "create_ome_zarr",
    "default_chunks",
    "is_volume_path",
    "iter_blocks",
    "list_keys",
    "list_volumes",
    "normalize_raw",
    "ome_multiscales",
    "open_volume",
    "split_uri",
    "write_volume",
    "write_volumes",
]
