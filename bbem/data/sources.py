"""Patch sources: the raw + cleft-label volumes training reads, with their cleft coordinates.

Clefts cover well under 1% of voxels, so training forces a fraction of patches to hold one
(:mod:`bbem.data.sampling`); a :class:`PatchSource` keeps a list of cleft voxel coordinates
(computed once, subsampled) for that. Every array here is ordered z, y, x.

A loader worker process must not use a file handle its parent opened (hdf5 is not fork-safe):
:func:`reopen_for_worker` reopens each lazy volume from its pickle (a
:class:`bbem.volumes.Volume` pickles as the URI it was opened by), and refuses, with a clear
error, any array it cannot reopen.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import track

from bbem.config import DataConfig, RunConfig, VolumeSpec, resolve_volumes
from bbem.errors import UserError, one_line
from bbem.volumes import normalize_raw, open_volume

#: Cleft coordinates kept per volume for forced sampling (a uniform subsample beyond this).
MAX_CLEFT_COORDS = 200_000
_SLAB_BYTES = 64 << 20


# -- where the volumes are ------------------------------------------------------------------------


def volume_path(spec: VolumeSpec, data: DataConfig) -> Path:
    """The absolute path of a spec's volume, making it first when it is a missing synthetic one.

    A volume listed twice (train and val boxes of one file) is made from whichever entry has
    the ``synth`` spec. A missing volume that is not synthetic raises :class:`UserError`.
    """
    path = data.resolve(spec.path)
    if path.exists():
        return path
    synth = next(
        (
            s.synth
            for s in (*data.train, *data.val)
            if s.synth is not None and data.resolve(s.path) == path
        ),
        None,
    )
    if synth is None:
        raise UserError(f"data file {path} not found: check data.root and the path")
    from bbem.synth import write_synthetic  # scipy-heavy; only needed the first time

    write_synthetic(path, tuple(synth.shape), synth.seed)
    return path


def ensure_volumes(cfg: RunConfig) -> list[Path]:
    """Check every train/val volume (:func:`bbem.config.resolve_volumes`) and make the missing
    synthetic ones; returns their absolute paths, train first."""
    resolve_volumes(cfg)  # every missing real volume is named before anything is made
    return [volume_path(s, cfg.data) for s in (*cfg.data.train, *cfg.data.val)]


def reopen_for_worker(array: Any, name: str) -> Any:
    """``array`` as a loader worker process must hold it.

    numpy arrays are kept (the fork copies them); a lazy array is reopened from its pickle, so
    the worker reads through its own file handle. An array that cannot be pickled (an
    ``h5py.Dataset``, a Volume opened from memory) raises :class:`UserError`: sharing its
    parent's handle across the fork would give wrong reads, not an error.
    """
    if isinstance(array, np.ndarray):
        return array
    try:
        return pickle.loads(pickle.dumps(array))
    except (TypeError, pickle.PicklingError, AttributeError) as e:
        raise _not_reopenable(array, name, e) from None


def check_reopenable(array: Any, name: str) -> None:
    """Raise :func:`reopen_for_worker`'s error now, without opening anything."""
    if isinstance(array, np.ndarray):
        return
    try:
        pickle.dumps(array)
    except (TypeError, pickle.PicklingError, AttributeError) as e:
        raise _not_reopenable(array, name, e) from None


def _not_reopenable(array: Any, name: str, e: Exception) -> UserError:
    return UserError(
        f"{name}: a loader worker cannot reopen its {type(array).__name__} ({one_line(e)}): "
        "open volumes by path (bbem.volumes.open_volume), or set data.workers: 0"
    )


# -- volumes --------------------------------------------------------------------------------------


@dataclass
class PatchSource:
    """One raw + label volume restricted to sections ``z_range``, ready for patch sampling.

    ``raw`` and ``label`` are sliceable ``[Z, Y, X]`` arrays (a :class:`bbem.volumes.Volume`, or
    numpy when the volume was small enough to load); ``label`` is nonzero on clefts.
    ``clefts`` holds cleft voxel coordinates ``[N, 3]`` (z relative to ``z_range[0]``),
    subsampled to at most :data:`MAX_CLEFT_COORDS`; ``n_cleft`` counts them all.
    """

    raw: Any
    label: Any
    z_range: tuple[int, int]
    name: str
    clefts: np.ndarray
    n_cleft: int
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape ``(Z, Y, X)`` of the usable part (after ``z_range``)."""
        return (self.z_range[1] - self.z_range[0], *self.raw.shape[1:])

    @property
    def n_voxels(self) -> int:
        return math.prod(self.shape)

    def reopened(self) -> PatchSource:
        """The same source with lazy volumes reopened (for a loader worker process); raises
        :class:`UserError` when one cannot be (see :func:`reopen_for_worker`)."""
        return dataclasses.replace(
            self,
            raw=reopen_for_worker(self.raw, self.name),
            label=reopen_for_worker(self.label, self.name),
        )

    def check_reopenable(self) -> None:
        """Raise :class:`UserError` if a loader worker could not reopen this source's volumes."""
        check_reopenable(self.raw, self.name)
        check_reopenable(self.label, self.name)

    def read(self, start: Sequence[int], size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Raw ``float32 [Z, Y, X]`` (normalised) and cleft mask ``bool [Z, Y, X]`` of one box.

        The box may stick out of the volume (a volume smaller than a patch): the part outside
        is zero in both.
        """
        lo = [max(0, s) for s in start]
        hi = [min(d, s + n) for d, s, n in zip(self.shape, start, size, strict=True)]
        z0 = self.z_range[0]
        idx = (slice(lo[0] + z0, hi[0] + z0), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        raw = normalize_raw(np.asarray(self.raw[idx]))
        lab = np.asarray(self.label[idx]) != 0
        pad = [(a - s, s + n - b) for s, n, a, b in zip(start, size, lo, hi, strict=True)]
        if any(p != (0, 0) for p in pad):
            raw, lab = np.pad(raw, pad), np.pad(lab, pad)
        return raw, lab


class YXCrop:
    """A lazy ``[Z, Y, X]`` view of ``array`` inside ``y_range`` and ``x_range`` ([start, stop)).

    Reading a box reads only that box of ``array`` (a lazy Volume stays lazy); it pickles as
    the array it wraps, so loader workers reopen it like a Volume.
    """

    def __init__(
        self,
        array: Any,
        y_range: Sequence[int] | None,
        x_range: Sequence[int] | None,
        name: str = "volume",
    ):
        z, y, x = (int(n) for n in array.shape)
        (y0, y1), (x0, x1) = y_range or (0, y), x_range or (0, x)
        for axis, stop, size in (("y", y1, y), ("x", x1, x)):
            if stop > size:
                raise UserError(
                    f"{name}: {axis}_range stop {stop} is outside its {size} voxels along "
                    f"{axis}: use a stop <= {size}"
                )
        self.array, self.origin = array, (0, y0, x0)
        self.shape = (z, y1 - y0, x1 - x0)
        self.dtype = array.dtype
        self.voxel_size = getattr(array, "voxel_size", (1.0, 1.0, 1.0))

    def __getitem__(self, idx: Any) -> np.ndarray:
        idx = idx if isinstance(idx, tuple) else (idx,)
        idx = idx + (slice(None),) * (3 - len(idx))
        inner, squeeze = [], []
        for axis, (sl, o, n) in enumerate(zip(idx, self.origin, self.shape, strict=True)):
            if isinstance(sl, (int, np.integer)):
                sl = slice(int(sl), int(sl) + 1)
                squeeze.append(axis)
            a, b, step = sl.indices(n)
            if step != 1:
                raise IndexError("YXCrop takes unit-step slices only")
            inner.append(slice(a + o, b + o))
        out = np.asarray(self.array[tuple(inner)])
        return out.squeeze(tuple(squeeze)) if squeeze else out


def crop_yx(array: Any, spec: VolumeSpec, name: str = "volume") -> Any:
    """``array`` restricted to the spec's ``y_range`` / ``x_range`` (itself when neither is set)."""
    if spec.y_range is None and spec.x_range is None:
        return array
    return YXCrop(array, spec.y_range, spec.x_range, name)


def source_from_arrays(
    raw: Any,
    label: Any,
    z_range: tuple[int, int] | None = None,
    name: str = "array",
    voxel_size: Sequence[float] | None = None,
    in_memory_mb: float = 512.0,
    seed: int = 0,
) -> PatchSource:
    """A :class:`PatchSource` from two sliceable ``[Z, Y, X]`` arrays (Volumes or numpy).

    When raw (at its dtype) plus a boolean label fit in ``in_memory_mb`` they are read once
    into memory (fast patches on CPU); otherwise every patch is read from disk. The cleft
    coordinate scan reads the label once, slab by slab.
    """
    if tuple(raw.shape) != tuple(label.shape):
        raise UserError(
            f"{name}: raw shape {tuple(raw.shape)} and label shape {tuple(label.shape)} differ: "
            "check data raw_key and label_key"
        )
    if len(raw.shape) != 3:
        raise UserError(f"{name}: expected a 3D volume (z, y, x), got shape {tuple(raw.shape)}")
    z_total = int(raw.shape[0])
    z0, z1 = z_range if z_range is not None else (0, z_total)
    if z1 > z_total:
        raise UserError(
            f"{name}: z_range [{z0}, {z1}] is outside its {z_total} sections: "
            f"use a stop <= {z_total}"
        )
    vs = voxel_size if voxel_size is not None else getattr(raw, "voxel_size", (1.0, 1.0, 1.0))
    plane = int(raw.shape[1]) * int(raw.shape[2])
    n_vox = (z1 - z0) * plane
    in_memory = n_vox * (np.dtype(raw.dtype).itemsize + 1) <= in_memory_mb * (1 << 20)
    # Read the label in z slabs: a uint64 volume is 8x the size of its boolean mask.
    slab = max(1, _SLAB_BYTES // max(1, plane * np.dtype(label.dtype).itemsize))
    rng = np.random.default_rng(seed)
    masks, coords, n_cleft = [], [], 0
    label_bytes = n_vox * np.dtype(label.dtype).itemsize
    for a in track(
        range(z0, z1, slab),
        description=f"finding clefts in {name}",
        transient=True,
        disable=label_bytes < _SLAB_BYTES * 4,  # only worth a bar when it takes a while
    ):
        m = np.asarray(label[a : min(z1, a + slab)]) != 0
        c = np.argwhere(m).astype(np.int32)
        c[:, 0] += a - z0
        n_cleft += len(c)
        if len(c) > MAX_CLEFT_COORDS:
            c = c[rng.choice(len(c), MAX_CLEFT_COORDS, replace=False)]
        coords.append(c)
        if in_memory:
            masks.append(m)
    clefts = np.concatenate(coords) if coords else np.zeros((0, 3), np.int32)
    if len(clefts) > MAX_CLEFT_COORDS:
        clefts = clefts[np.sort(rng.choice(len(clefts), MAX_CLEFT_COORDS, replace=False))]
    if in_memory:
        raw = np.asarray(raw[z0:z1])
        label = np.concatenate(masks) if masks else np.zeros((0, *raw.shape[1:]), bool)
        z0, z1 = 0, z1 - z0
    return PatchSource(
        raw=raw,
        label=label,
        z_range=(z0, z1),
        name=name,
        clefts=clefts,
        n_cleft=n_cleft,
        voxel_size=tuple(float(v) for v in vs),  # type: ignore[arg-type]
    )


def open_source(spec: VolumeSpec, data: DataConfig, seed: int = 0) -> PatchSource:
    """Open the raw and label volumes a :class:`~bbem.config.VolumeSpec` names (making a
    missing synthetic one first)."""
    path = volume_path(spec, data)
    raw = crop_yx(open_volume(path, spec.raw_key), spec, str(path))
    label = crop_yx(open_volume(path, spec.label_key), spec, str(path))
    return source_from_arrays(
        raw,
        label,
        z_range=tuple(spec.z_range) if spec.z_range is not None else None,  # type: ignore[arg-type]
        name=f"{path}:{spec.raw_key}",
        voxel_size=raw.voxel_size,
        in_memory_mb=data.in_memory_mb,
        seed=seed,
    )


def open_sources(cfg: RunConfig, split: str = "train") -> list[PatchSource]:
    """The :class:`PatchSource` of every volume of ``cfg.data.train`` (or ``val``)."""
    return [open_source(s, cfg.data) for s in getattr(cfg.data, split)]


def cleft_fraction(sources: Sequence[PatchSource]) -> float:
    """Fraction of voxels that are cleft over all sources (exact, from the label scan)."""
    n = sum(s.n_voxels for s in sources)
    return sum(s.n_cleft for s in sources) / n if n else 0.0


def auto_pos_weight(sources: Sequence[PatchSource], max_weight: float = 1000.0) -> float:
    """BCE positive-class weight ``background / cleft`` voxels (``loss.pos_weight: auto``)."""
    f = cleft_fraction(sources)
    if f <= 0:
        return 1.0
    return float(min(max_weight, (1.0 - f) / f))


def load_val_volumes(
    cfg: RunConfig,
) -> list[tuple[np.ndarray, np.ndarray, tuple[float, float, float]]]:
    """Validation volumes in memory: ``(raw float32 [Z, Y, X] in [0, 1], cleft bool [Z, Y, X],
    voxel size (z, y, x) nm)`` each, with ``z_range`` applied."""
    out = []
    for spec in cfg.data.val:
        path = volume_path(spec, cfg.data)
        raw = crop_yx(open_volume(path, spec.raw_key), spec, str(path))
        label = crop_yx(open_volume(path, spec.label_key), spec, str(path))
        if raw.shape != label.shape:
            raise UserError(
                f"{path}: raw shape {raw.shape} and label shape {label.shape} differ: check "
                "raw_key and label_key"
            )
        z0, z1 = spec.z_range if spec.z_range is not None else (0, raw.shape[0])
        if z1 > raw.shape[0]:
            raise UserError(
                f"{path}: z_range [{z0}, {z1}] is outside its {raw.shape[0]} sections: "
                f"use a stop <= {raw.shape[0]}"
            )
        out.append(
            (
                normalize_raw(raw[z0:z1]),
                label[z0:z1] != 0,
                tuple(float(v) for v in raw.voxel_size),
            )
        )
    return out  # type: ignore[return-value]
