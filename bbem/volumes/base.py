"""The one lazy interface every EM volume is read through, whatever its format.

A :class:`Volume` wraps a chunked array-like (a zarr array, an h5py dataset, a tifffile zarr
store) that reads only what an index touches, and carries the spatial metadata EM tools need:
voxel size and offset in nm, both ordered z, y, x.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bbem.errors import UserError, one_line

#: CREMI marks "no cleft" with the largest uint64; bbem always uses 0 for background.
CLEFT_BACKGROUND = np.iinfo(np.uint64).max


def _normalise_index(key: Any, shape: tuple[int, ...]) -> tuple[slice | int, ...]:
    """Expand ``key`` to one entry per axis (ints and slices only: what chunked stores do)."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = next(j for j, k in enumerate(key) if k is Ellipsis)
        fill = (slice(None),) * (len(shape) - len(key) + 1)
        key = key[:i] + fill + key[i + 1 :]
    if len(key) > len(shape):
        raise IndexError(f"too many indices for a {len(shape)}D volume: {key}")
    key = key + (slice(None),) * (len(shape) - len(key))
    for k in key:
        if not isinstance(k, slice | int | np.integer):
            raise IndexError(f"volumes take ints and slices only, got {k!r}")
    return key


class Volume:
    """A lazy 3D EM volume (z, y, x) with voxel size and offset in nm.

    ``vol[z0:z1, y0:y1, x0:x1]`` returns a numpy array and reads only the chunks it touches;
    :meth:`read` reads it whole; :meth:`to_dask` gives a lazy dask array. Cleft label datasets
    (``"clefts"`` in the name, 32/64-bit unsigned integers) read CREMI's background
    0xffffffffffffffff as 0. A Volume pickles as the URI it was opened by and reopens on the
    other side, so dask workers in other processes can read it.
    """

    def __init__(
        self,
        array: Any,
        *,
        name: str,
        voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
        offset: Sequence[float] = (0.0, 0.0, 0.0),
        chunks: Sequence[int] | None = None,
        fmt: str = "",
        reopen: Callable[[], Volume] | None = None,
        close: Callable[[], None] | None = None,
    ) -> None:
        shape = tuple(int(s) for s in array.shape)
        if len(shape) != 3:
            raise UserError(
                f"{name} has {len(shape)} dimensions {shape}: bbem needs 3D volumes (z, y, x); "
                "stack 2D sections into a folder of tiffs or a multi-page tiff"
            )
        if min(shape) == 0:
            raise UserError(f"{name} is empty (shape {shape}): it holds no voxels")
        self._array = array
        self.name = name
        self.shape: tuple[int, int, int] = shape
        self.dtype = np.dtype(array.dtype)
        self.voxel_size: tuple[float, float, float] = _triple(voxel_size, "voxel size", name)
        self.offset: tuple[float, float, float] = _triple(offset, "offset", name)
        if any(v <= 0 for v in self.voxel_size):
            raise UserError(f"{name} has a non-positive voxel size {self.voxel_size}")
        self.chunks: tuple[int, ...] | None = (
            tuple(int(c) for c in chunks) if chunks is not None else None
        )
        self.format = fmt
        self._reopen = reopen
        self._close = close
        # CREMI uses the largest uint64 as background; the mapping works for any file. Only
        # 32/64-bit ids: 255 in a uint8 mask is a foreground value, not "no cleft".
        self.is_cleft_labels = (
            "clefts" in name.lower() and self.dtype.kind == "u" and self.dtype.itemsize >= 4
        )

    # -- numpy-like surface -----------------------------------------------------------------

    @property
    def ndim(self) -> int:
        return 3

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        index = _normalise_index(key, self.shape)
        try:
            out = np.asarray(self._array[index])
        except (IndexError, MemoryError, UserError):
            raise  # the caller's index or this machine, not the file
        except Exception as e:
            # zarr/numcodecs, tifffile, h5py and zlib each raise their own types (RuntimeError,
            # ValueError, OSError, TiffFileError, ...) for a chunk that does not decode: this is
            # the one place every read passes, so a damaged file is reported here, once.
            raise UserError(
                f"cannot read {self.name} at {_describe_block(index, self.shape)}: the file is "
                f"damaged or truncated ({type(e).__name__}: {one_line(e)}); restore it from a "
                "good copy or convert the original again"
            ) from e
        if self.is_cleft_labels:
            bg = out == np.iinfo(self.dtype).max
            if bg.any():
                out = out.copy() if not out.flags.writeable else out
                out[bg] = 0
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.read()
        return out if dtype is None else out.astype(dtype)

    def read(self) -> np.ndarray:
        """The whole volume as a numpy array ``[Z, Y, X]`` (use only when it fits memory)."""
        return self[:, :, :]

    def to_dask(self, chunks: Any = None) -> Any:
        """A lazy dask array ``[Z, Y, X]``; default chunks are the native ones grown to ~64 MB."""
        import dask.array as da
        from dask.base import tokenize

        if chunks is None:
            chunks = da.core.normalize_chunks(
                "auto",
                self.shape,
                limit="64MiB",
                dtype=self.dtype,
                previous_chunks=self.chunks or self.shape,
            )
        token = tokenize(self.name, self.format, self.shape, str(self.dtype), chunks)
        return da.from_array(self, chunks=chunks, name=f"volume-{token}", asarray=True, fancy=False)

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release the file handle (hdf5, tiff); the volume cannot be read afterwards."""
        if self._close is not None:
            self._close()
            self._close = None

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple:
        if self._reopen is None:
            raise TypeError(f"volume {self.name} cannot be pickled (opened from memory)")
        return (_call, (self._reopen,))

    def __repr__(self) -> str:
        return (
            f"Volume({self.name!r}, shape={self.shape}, dtype={self.dtype}, "
            f"voxel_size={self.voxel_size}, offset={self.offset}, chunks={self.chunks}, "
            f"format={self.format!r})"
        )


def _describe_block(index: tuple[slice | int, ...], shape: tuple[int, ...]) -> str:
    """``z 0-7, y 0-63, x 64-127``: the voxels an index covers, for error messages."""
    parts = []
    for axis, k, n in zip("zyx", index, shape, strict=True):
        if isinstance(k, slice):
            start, stop, _ = k.indices(n)
            parts.append(f"{axis} {start}-{max(start, stop - 1)}")
        else:
            parts.append(f"{axis} {int(k)}")
    return "block " + ", ".join(parts)


def _call(fn: Callable[[], Volume]) -> Volume:
    return fn()


def _triple(values: Sequence[float], what: str, name: str) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in np.asarray(values, dtype=float).ravel())
    if len(vals) != 3:
        raise UserError(f"{name}: {what} must have 3 values (z, y, x), got {vals}")
    return vals


def check_same_shape(*volumes: Volume) -> None:
    """Raise a UserError unless every volume (e.g. raw and its labels) has the same shape."""
    shapes = {v.shape for v in volumes}
    if len(shapes) > 1:
        listing = ", ".join(f"{v.name} {v.shape}" for v in volumes)
        raise UserError(
            f"raw and label shapes disagree: {listing}; they must cover the same voxels"
        )


def check_finite(block: np.ndarray, name: str, where: Any = None) -> None:
    """Raise a UserError if a floating-point block holds NaN or infinity."""
    if block.dtype.kind in "fc" and not np.isfinite(block).all():
        at = f" in block {where}" if where is not None else ""
        raise UserError(
            f"{name} holds NaN or infinite values{at}: fix or mask them before using it"
        )
