"""``bbem convert``: any supported volume -> OME-Zarr v3 (or tiff), chunk by chunk, verified.

Memory stays bounded whatever the volume size: data moves in chunk-aligned blocks no larger
than ``max_memory / 6`` (room for the block, zarr's per-chunk copies and encoded chunks, and
allocator slack on its worker threads).
Each block's hash is kept while writing; once everything is written the output is read back
block by block and compared, before the temporary output is renamed into place.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from bbem.atomic import atomic_output, check_output, output_lock
from bbem.errors import UserError
from bbem.progress import progress_bar
from bbem.volumes.base import Volume, check_finite, check_same_shape
from bbem.volumes.hdf5_io import list_datasets, open_hdf5_file
from bbem.volumes.io import detect_format, hold_interrupts, iter_blocks, open_volume, split_uri
from bbem.volumes.tiff_io import TIFF_SUFFIXES, write_tiff
from bbem.volumes.zarr_io import (
    create_container,
    default_chunks,
    init_ome_image,
    list_keys,
    ome_multiscales,
    open_zarr_node,
)

DEFAULT_MAX_MEMORY = 512 * 2**20


def block_shape(
    shape: Sequence[int], chunks: Sequence[int], itemsize: int, budget: int
) -> tuple[int, int, int]:
    """The largest chunk-aligned block (grown along x, then y, then z) within ``budget`` bytes.

    Never smaller than one chunk: a chunk is the unit zarr writes.
    """
    block = [int(c) for c in chunks]
    for axis in (2, 1, 0):
        while block[axis] < shape[axis]:
            grown = list(block)
            grown[axis] = min(block[axis] + chunks[axis], shape[axis])
            if int(np.prod(grown)) * itemsize > budget:
                break
            block = grown
        if block[axis] < shape[axis]:
            break  # growing an outer axis only pays once the inner one spans the volume
    return tuple(block)  # type: ignore[return-value]


def _trimmer() -> Any:
    """glibc's ``malloc_trim``, or a no-op elsewhere.

    zarr encodes chunks on worker threads, each with its own malloc arena; freed blocks stay
    mapped there, so without a trim the resident size creeps above the cap as blocks stream by.
    """
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda _pad: 0


def _digest(block: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(block).data, digest_size=16).digest()


def _source_volumes(input: str | os.PathLike, key: str | None) -> dict[str, Volume]:
    """The volumes to convert, by output key ('' = the output root is the image)."""
    container, inner = split_uri(input)
    if key or inner:
        return {"": open_volume(input, key=key)}
    fmt = detect_format(container)
    if fmt == "hdf5":
        with open_hdf5_file(container) as f:
            keys = [k for k in list_datasets(f) if f[k].ndim == 3]
    elif fmt == "zarr":
        import zarr

        node = open_zarr_node(container)
        if isinstance(node, zarr.Array) or ome_multiscales(dict(node.attrs)) is not None:
            return {"": open_volume(container)}
        keys = list_keys(node)
    else:
        return {"": open_volume(container)}
    # A CREMI file also holds 1D/2D annotation tables: convert the volumes.
    volumes_only = [k for k in keys if k.startswith("volumes/")]
    keys = volumes_only or keys
    if not keys:
        raise UserError(f"{input} holds no 3D datasets to convert")
    if len(keys) == 1:
        return {"": open_volume(container, key=keys[0])}
    vols = {k: open_volume(container, key=k) for k in keys}
    check_same_shape(*vols.values())
    return vols


def convert(
    input: str | os.PathLike,
    output: str | os.PathLike,
    key: str | None = None,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool = True,
) -> dict[str, Volume]:
    """Copy ``input`` to ``output`` in bounded memory and verify the copy.

    A container (CREMI hdf5, zarr group) without ``key`` is converted whole into the same key
    layout (``volumes/raw``, ``volumes/labels/...``); a single volume becomes an OME-Zarr image
    at the output root, or a tiff if ``output`` ends in .tif/.tiff. Cleft labels are written
    with background 0. Returns the output volumes, opened, by key.
    """
    out = Path(output)
    check_output(out, overwrite, inputs=[input])
    with output_lock(out), hold_interrupts() as check:
        return _convert(input, out, key, chunks, overwrite, max_memory, progress, check)


def _convert(
    input: str | os.PathLike,
    out: Path,
    key: str | None,
    chunks: Sequence[int] | None,
    overwrite: bool,
    max_memory: int,
    progress: bool,
    check: Callable[[], None],
) -> dict[str, Volume]:
    sources = _source_volumes(input, key)
    try:
        to_tiff = out.suffix.lower() in TIFF_SUFFIXES
        if to_tiff and len(sources) > 1:
            raise UserError(
                f"{input} holds {len(sources)} volumes ({', '.join(sources)}) but a tiff holds "
                "one: write zarr, or choose one with --key"
            )
        if chunks is not None and (len(chunks) != 3 or min(chunks) <= 0):
            raise UserError(f"--chunks must be three positive integers z,y,x, got {chunks}")
        budget = max(1, int(max_memory) // 6)
        trim = _trimmer()
        plans = {}
        for k, vol in sources.items():
            c = (1, *vol.shape[1:]) if to_tiff else tuple(chunks or default_chunks(vol.shape))
            c = tuple(max(1, min(a, s)) for a, s in zip(c, vol.shape, strict=True))
            blk = c if to_tiff else block_shape(vol.shape, c, vol.dtype.itemsize, budget)
            plans[k] = (c, blk, list(iter_blocks(vol.shape, blk)))
        total = 2 * sum(len(p[2]) for p in plans.values())
        with (
            atomic_output(out, overwrite, inputs=[input]) as tmp,
            progress_bar(enabled=progress) as bar,
        ):
            task = bar.add_task(f"convert {Path(os.fspath(input)).name}", total=total)
            digests: dict[str, list[bytes]] = {}
            if to_tiff:
                ((k, vol),) = sources.items()
                digests[k] = []

                def pages() -> Any:
                    for sl in plans[k][2]:
                        check()
                        block = vol[sl]
                        check_finite(block, vol.name, (sl[0].start,))
                        digests[k].append(_digest(block))
                        bar.advance(task)
                        yield block[0]

                write_tiff(tmp, pages(), vol.shape, vol.dtype, vol.voxel_size, vol.offset)
            else:
                root = create_container(tmp)
                for k, vol in sources.items():
                    group = root.require_group(k) if k else root
                    name = (k or Path(vol.name.split(":")[-1]).name).split("/")[-1]
                    arr = init_ome_image(
                        group,
                        vol.shape,
                        vol.dtype,
                        plans[k][0],
                        vol.voxel_size,
                        vol.offset,
                        name=name,
                    )
                    digests[k] = []
                    for sl in plans[k][2]:
                        block = vol[sl]
                        check_finite(block, vol.name, tuple((s.start, s.stop) for s in sl))
                        arr[sl] = block
                        digests[k].append(_digest(block))
                        del block
                        trim(0)
                        bar.advance(task)
                        check()
            for k, vol in sources.items():
                bar.update(task, description=f"verify {k or out.name}")
                uri = tmp if not k else f"{tmp}/{k}"
                with open_volume(uri) as copy:
                    _verify(vol, copy, plans[k][2], digests[k], bar, task, check)
    finally:
        for vol in sources.values():
            vol.close()
    if out.suffix.lower() in TIFF_SUFFIXES or len(sources) == 1:
        return {"": open_volume(out)}
    return {k: open_volume(out, key=k) for k in sources}


def _verify(
    src: Volume,
    copy: Volume,
    blocks: list,
    digests: list[bytes],
    bar: Progress,
    task: Any,
    check: Callable[[], None],
) -> None:
    if copy.shape != src.shape or copy.dtype != src.dtype:
        raise RuntimeError(
            f"verification failed: {copy.name} is {copy.shape} {copy.dtype}, "
            f"source {src.shape} {src.dtype}"
        )
    if not np.allclose(copy.voxel_size, src.voxel_size):
        raise RuntimeError(f"verification failed: voxel size {copy.voxel_size} != {src.voxel_size}")
    trim = _trimmer()
    for sl, d in zip(blocks, digests, strict=True):
        if _digest(copy[sl]) != d:
            raise RuntimeError(f"verification failed: block {sl} of {copy.name} differs")
        trim(0)
        bar.advance(task)
        check()


def convert_from_cli(
    input: str,
    output: str,
    key: str | None = None,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
) -> None:
    """``bbem convert INPUT OUTPUT [--key K] [--chunks z,y,x] [--overwrite]``."""
    outs = convert(input, output, key=key, chunks=chunks, overwrite=overwrite)
    console = Console()
    for vol in outs.values():
        vs = "x".join(f"{v:g}" for v in vol.voxel_size)
        console.print(
            f"wrote {vol.name}: {'x'.join(map(str, vol.shape))} {vol.dtype}, "
            f"voxel {vs} nm, chunks {vol.chunks} (verified)"
        )
        vol.close()
