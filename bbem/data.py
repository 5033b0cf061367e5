"""Training patches: cleft-seeking sampling from EM volumes, and the MONAI augmentations.

Clefts cover well under 1% of voxels, so uniform patches are mostly background. As in PyTorch
Connectomics' rejection sampling, a fraction ``pos_fraction`` of patches is forced to contain a
cleft voxel: the patch is placed around a cleft voxel drawn from a per-volume list of cleft
coordinates (computed once, subsampled). Every array here is ordered z, y, x; EM is anisotropic
(~4 x 4 x 40 nm), so rotations and transposes act only in the y-x plane.

Patches come out as ``{"image": float32 [1, Z, Y, X] in [0, 1] (before intensity
augmentation), "label": float32 [1, Z, Y, X] (1 = cleft)}``; :func:`make_loader` batches them to
``[B, 1, Z, Y, X]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pickle
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    Rand2DElasticd,
    RandFlipd,
    RandGaussianNoised,
    Randomizable,
    RandomizableTransform,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monai.utils import convert_to_tensor
from rich.progress import track
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bbem.config import AugmentConfig, DataConfig, RunConfig, VolumeSpec
from bbem.errors import UserError
from bbem.volumes import normalize_raw

KEYS = ("image", "label")
#: Cleft coordinates kept per volume for forced sampling (a uniform subsample beyond this).
MAX_CLEFT_COORDS = 200_000
_SLAB_BYTES = 64 << 20


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
        """The same source with lazy volumes reopened (for a loader worker process)."""
        return dataclasses.replace(self, raw=_reopen(self.raw), label=_reopen(self.label))

    def read(self, start: Sequence[int], size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Raw ``float32 [Z, Y, X]`` (normalised) and cleft mask ``bool [Z, Y, X]`` of one box.

        The box may stick out of the volume (a volume smaller than a patch): the part outside
        is zero in both.
        """
        lo = [max(0, s) for s in start]
        hi = [min(d, s + n) for d, s, n in zip(self.shape, start, size)]
        z0 = self.z_range[0]
        idx = (slice(lo[0] + z0, hi[0] + z0), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        raw = normalize_raw(np.asarray(self.raw[idx]))
        lab = np.asarray(self.label[idx]) != 0
        pad = [(a - s, s + n - b) for s, n, a, b in zip(start, size, lo, hi)]
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
                sl, _ = slice(int(sl), int(sl) + 1), squeeze.append(axis)
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


def _reopen(a: Any) -> Any:
    # A Volume pickles as the URI it was opened by; in-memory arrays are shared as they are.
    if isinstance(a, np.ndarray):
        return a
    try:
        return pickle.loads(pickle.dumps(a))
    except (TypeError, pickle.PicklingError, AttributeError):
        return a


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
    """Open the raw and label volumes a :class:`~bbem.config.VolumeSpec` names."""
    from bbem.volumes import open_volume

    path = data.resolve(spec.path)
    if not path.exists():
        raise UserError(
            f"data file {path} not found: check data.root and the path (bbem.config."
            "resolve_volumes makes synthetic volumes and explains where real ones go)"
        )
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
    from bbem.volumes import open_volume

    out = []
    for spec in cfg.data.val:
        path = cfg.data.resolve(spec.path)
        if not path.exists():
            raise UserError(f"validation volume {path} not found: check data.root and data.val")
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


# -- sampling -------------------------------------------------------------------------------------


class PatchSampler:
    """Draws patches ``{"image": float32 [1, Z, Y, X], "label": float32 [1, Z, Y, X]}``.

    With probability ``pos_fraction`` the patch is placed so that a random cleft voxel lies in
    its middle half (per axis); otherwise it is uniform over the volume. Volumes are chosen in
    proportion to their voxel count (cleft patches: among volumes that have clefts).
    """

    def __init__(
        self,
        sources: Sequence[PatchSource],
        patch_size: Sequence[int],
        pos_fraction: float = 0.8,
    ) -> None:
        if not sources:
            raise UserError("no training volumes: list at least one under data.train")
        self.sources = list(sources)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.pos_fraction = float(pos_fraction)
        sizes = np.array([s.n_voxels for s in self.sources], float)
        self._p_all = sizes / sizes.sum()
        has = np.array([len(s.clefts) > 0 for s in self.sources])
        if self.pos_fraction > 0 and not has.any():
            names = ", ".join(s.name for s in self.sources)
            raise UserError(
                f"no cleft voxels in the training volumes ({names}): check data.train label_key, "
                "or set data.pos_fraction=0 to sample uniformly"
            )
        w = sizes * has
        self._p_pos = w / w.sum() if w.sum() > 0 else self._p_all

    def sample_box(self, rng: np.random.Generator) -> tuple[int, tuple[int, int, int], bool]:
        """Choose ``(source index, patch start z, y, x, forced to hold a cleft)``."""
        forced = bool(rng.random() < self.pos_fraction)
        i = int(rng.choice(len(self.sources), p=self._p_pos if forced else self._p_all))
        src = self.sources[i]
        shape, p = src.shape, self.patch_size
        if forced:
            c = src.clefts[rng.integers(len(src.clefts))]
            # the cleft lands in the middle half of the patch, then the box is pushed inside
            off = [int(rng.integers(n // 4, max(n // 4 + 1, n - n // 4))) for n in p]
            start = [int(c[a]) - off[a] for a in range(3)]
            start = [min(max(s, 0), max(0, d - n)) for s, d, n in zip(start, shape, p)]
        else:
            start = [int(rng.integers(0, max(0, d - n) + 1)) for d, n in zip(shape, p)]
        # a volume smaller than the patch: centre it (read pads with zeros)
        start = [s if d >= n else -((n - d) // 2) for s, d, n in zip(start, shape, p)]
        return i, (start[0], start[1], start[2]), forced

    def sample(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """One patch as a dict of tensors ``[1, Z, Y, X]`` (no augmentation)."""
        i, start, _ = self.sample_box(rng)
        raw, lab = self.sources[i].read(start, self.patch_size)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(raw))[None],
            "label": torch.from_numpy(lab.astype(np.float32))[None],
        }


class PatchDataset(IterableDataset):
    """An endless stream of (augmented) patches; deterministic for a ``seed``.

    ``sources`` is a list of :class:`PatchSource` (or a function returning one, called in each
    process); in loader workers, lazy volumes are reopened so no file handle crosses a fork.
    Each worker draws from its own generator seeded by ``(seed, worker id)``.
    """

    def __init__(
        self,
        sources: Sequence[PatchSource] | Callable[[], Sequence[PatchSource]],
        patch_size: Sequence[int],
        pos_fraction: float = 0.8,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._sources = sources
        self.patch_size = tuple(patch_size)
        self.pos_fraction = pos_fraction
        self.transform = transform
        self.seed = int(seed)

    @property
    def sources(self) -> list[PatchSource]:
        """The training sources (opened now if a function was given)."""
        if callable(self._sources):
            self._sources = list(self._sources())
        return list(self._sources)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        sources = self._sources() if callable(self._sources) else self._sources
        if info is not None:
            # hdf5 handles must not cross a fork: each worker reopens its lazy volumes
            sources = [s.reopened() for s in sources]
        sampler = PatchSampler(sources, self.patch_size, self.pos_fraction)
        ss = np.random.SeedSequence([self.seed, worker])
        rng = np.random.default_rng(ss)
        transform = self.transform
        if isinstance(transform, Randomizable):
            transform.set_random_state(seed=int(ss.generate_state(1)[0]))
        while True:
            with _one_thread():
                item = sampler.sample(rng)
                if transform is not None:
                    item = transform(item)
                item = {
                    k: convert_to_tensor(item[k], torch.float32, track_meta=False).contiguous()
                    for k in KEYS
                }
            yield item


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread: patch-sized ops on a busy 2-core machine are 5x faster
    without the thread pool's hand-offs (loader workers are single-threaded already)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def make_dataset(cfg: RunConfig, seed: int) -> PatchDataset:
    """The training :class:`PatchDataset` a config describes (augmented unless disabled)."""
    data = cfg.data
    sources = open_sources(cfg, "train")
    PatchSampler(sources, data.patch_size, data.pos_fraction)  # fail here, not in a worker
    transform = build_augment(cfg.augment) if cfg.augment.enabled else None
    return PatchDataset(sources, data.patch_size, data.pos_fraction, transform, seed)


def make_loader(cfg: RunConfig, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches ``{"image": float32 [B, 1, Z, Y, X], "label": float32 [B, 1, Z, Y, X]}`` forever."""
    return batches(make_dataset(cfg, seed), cfg.data.batch_size, cfg.data.workers)


def batches(
    ds: PatchDataset, batch_size: int, workers: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Batch a :class:`PatchDataset` forever: ``[B, 1, Z, Y, X]`` tensors.

    ``workers > 0`` uses a torch ``DataLoader`` with that many processes; with 0, patches are
    made and stacked in this process on one thread (a ``DataLoader`` would stack them on the
    trainer's thread pool, 4x slower for patch-sized tensors on a busy 2-core machine). Change
    ``ds.seed`` and call again to restart the stream deterministically.
    """
    if workers > 0:
        return iter(DataLoader(ds, batch_size=batch_size, num_workers=workers))
    return _stack(iter(ds), batch_size)


def _stack(
    items: Iterator[dict[str, torch.Tensor]], batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        group = [next(items) for _ in range(batch_size)]
        with _one_thread():
            batch = {k: torch.stack([g[k] for g in group]) for k in KEYS}
        yield batch  # outside the context: the consumer keeps its threads


# -- EM-specific augmentations --------------------------------------------------------------------


def _section_count(d: Mapping[Hashable, Any], keys: Sequence[Hashable]) -> int:
    for k in keys:
        if k in d:
            return int(d[k].shape[1])
    raise KeyError(f"none of {list(keys)} in the data")


class RandMissingSectiond(RandomizableTransform, MapTransform):
    """Replace one whole z-section of ``keys`` (images ``[C, Z, Y, X]``) by ``fill``.

    Models sections lost in cutting or imaging; labels are left alone (the cleft is still there,
    the network must infer it from the neighbouring sections).
    """

    def __init__(
        self,
        keys: Sequence[Hashable] = ("image",),
        prob: float = 0.1,
        fill: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.fill = float(fill)
        self.z = 0

    def randomize(self, n_sections: int) -> None:  # type: ignore[override]
        super().randomize(None)
        self.z = int(self.R.randint(n_sections))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(_section_count(d, self.keys))
        if not self._do_transform:
            return d
        for k in self.key_iterator(d):
            img = torch.as_tensor(d[k]).clone()
            img[:, self.z] = self.fill
            d[k] = img
        return d


class RandMisalignedSectiond(RandomizableTransform, MapTransform):
    """Shift sections in y-x by up to ``max_shift`` px, consistently in image and label.

    Two CREMI-style modes, chosen at random: ``translation`` shifts every section from a random
    z onward (a registration jump), ``slip`` shifts one section only. Shapes ``[C, Z, Y, X]`` are
    kept; the uncovered border repeats the edge pixels, in image and label alike, so the two
    still agree there.
    """

    def __init__(
        self,
        keys: Sequence[Hashable] = KEYS,
        prob: float = 0.1,
        max_shift: int = 8,
        slip_prob: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.max_shift = int(max_shift)
        self.slip_prob = float(slip_prob)
        self.z0, self.z1, self.shift = 1, 2, (0, 0)

    def randomize(self, n_sections: int) -> None:  # type: ignore[override]
        super().randomize(None)
        if n_sections < 2:
            self._do_transform = False
            return
        shift = (0, 0)
        while shift == (0, 0):
            shift = tuple(int(s) for s in self.R.randint(-self.max_shift, self.max_shift + 1, 2))
        self.shift = shift  # type: ignore[assignment]
        if self.R.rand() < self.slip_prob:
            self.z0 = int(self.R.randint(n_sections))
            self.z1 = self.z0 + 1
        else:
            self.z0 = int(self.R.randint(1, n_sections))
            self.z1 = n_sections

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(_section_count(d, self.keys))
        if not self._do_transform:
            return d
        for k in self.key_iterator(d):
            img = torch.as_tensor(d[k]).clone()
            part = img[:, self.z0 : self.z1]
            img[:, self.z0 : self.z1] = _shift_yx(part, self.shift)
            d[k] = img
        return d


def _shift_yx(a: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    """Shift ``[..., Y, X]`` by whole pixels; the uncovered border repeats the edge."""
    dy, dx = shift
    y, x = a.shape[-2:]
    # pad (x-left, x-right, y-top, y-bottom) on the side the content moves away from
    pad = (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0))
    flat = a.reshape(-1, 1, y, x).float()
    padded = F.pad(flat, pad, mode="replicate")
    oy, ox = max(-dy, 0), max(-dx, 0)
    out = padded[..., oy : oy + y, ox : ox + x]
    return out.reshape(a.shape).to(a.dtype)


class RandMotionBlurd(RandomizableTransform, MapTransform):
    """Blur one z-section of ``keys`` (``[C, Z, Y, X]``) along a random in-plane direction.

    A normalised line kernel of odd length in ``[3, max_kernel]`` at a uniform angle: the smear
    of a stage moving during exposure. Labels are not touched.
    """

    def __init__(
        self,
        keys: Sequence[Hashable] = ("image",),
        prob: float = 0.1,
        max_kernel: int = 9,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.max_kernel = max(3, int(max_kernel))
        self.z, self.kernel = 0, line_kernel(3, 0.0)

    def randomize(self, n_sections: int) -> None:  # type: ignore[override]
        super().randomize(None)
        self.z = int(self.R.randint(n_sections))
        size = 2 * int(self.R.randint(1, (self.max_kernel - 1) // 2 + 1)) + 1
        self.kernel = line_kernel(size, float(self.R.uniform(0.0, np.pi)))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(_section_count(d, self.keys))
        if not self._do_transform:
            return d
        k = torch.from_numpy(self.kernel)[None, None]
        r = k.shape[-1] // 2
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key]).clone()
            sec = img[:, self.z].float()[:, None]  # [C, 1, Y, X]
            mode = "reflect" if min(sec.shape[-2:]) > r else "replicate"
            blurred = F.conv2d(F.pad(sec, (r, r, r, r), mode=mode), k.to(sec.dtype))
            img[:, self.z] = blurred[:, 0].to(img.dtype)
            d[key] = img
        return d


def line_kernel(size: int, angle: float) -> np.ndarray:
    """A ``[size, size]`` float32 kernel summing to 1: a line through the centre at ``angle``
    (radians from the x axis), anti-aliased by sampling it densely."""
    c = (size - 1) / 2
    t = np.linspace(-c, c, 8 * size)
    ys, xs = c + t * np.sin(angle), c + t * np.cos(angle)
    k = np.zeros((size, size), np.float64)
    # bilinear splat of the sample points
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = ys - y0, xs - x0
    for oy, ox, w in (
        (0, 0, (1 - fy) * (1 - fx)),
        (1, 0, fy * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 1, fy * fx),
    ):
        yy, xx = np.clip(y0 + oy, 0, size - 1), np.clip(x0 + ox, 0, size - 1)
        np.add.at(k, (yy, xx), w)
    return (k / k.sum()).astype(np.float32)


class RandElasticYXd(RandomizableTransform, MapTransform):
    """In-plane elastic deformation and rotation of ``[C, Z, Y, X]`` images, the same in every
    section (EM sections are cut, not warped, along z).

    Wraps MONAI's ``Rand2DElasticd`` by treating the z sections as channels: images are
    resampled bilinearly, labels (``label_keys``) by nearest neighbour.
    """

    def __init__(
        self,
        keys: Sequence[Hashable] = KEYS,
        prob: float = 0.1,
        spacing: int = 48,
        magnitude: tuple[float, float] = (0.0, 4.0),
        rotate_degrees: float = 15.0,
        label_keys: Sequence[Hashable] = ("label",),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        keys = tuple(keys)
        self._inner = Rand2DElasticd(
            keys=keys,
            spacing=(spacing, spacing),
            magnitude_range=magnitude,
            prob=1.0,
            rotate_range=(math.radians(rotate_degrees),),
            mode=tuple("nearest" if k in label_keys else "bilinear" for k in keys),
            padding_mode="reflection",
            allow_missing_keys=allow_missing_keys,
        )

    def set_random_state(self, seed: int | None = None, state: Any = None) -> RandElasticYXd:
        super().set_random_state(seed, state)
        self._inner.set_random_state(seed=int(self.R.randint(2**31 - 1)))
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        shapes = {k: torch.as_tensor(d[k]).shape for k in self.key_iterator(d)}
        flat = {k: torch.as_tensor(d[k]).reshape(-1, *shapes[k][-2:]) for k in shapes}
        out = self._inner(flat)
        for k in shapes:
            d[k] = torch.as_tensor(out[k]).reshape(shapes[k])
        return d


def build_augment(aug: AugmentConfig | Mapping[str, Any] | None = None) -> Compose:
    """The training augmentations as a MONAI ``Compose`` of dictionary transforms on
    ``image``/``label`` tensors ``[1, Z, Y, X]``; shapes are preserved.

    Order: geometry (flips in z, y, x; quarter turns in y-x only, since EM z is ~10x coarser;
    optional in-plane elastic), then EM section defects (misalignment of image and label,
    missing section, motion blur), then intensity (scale, shift, Gaussian noise).
    """
    a = aug if isinstance(aug, AugmentConfig) else AugmentConfig(**dict(aug or {}))
    t: list[Any] = [
        EnsureTyped(keys=KEYS, data_type="tensor", dtype=torch.float32, track_meta=False)
    ]
    if not a.enabled:
        return Compose(t)
    if a.flips > 0:
        t += [RandFlipd(keys=KEYS, prob=a.flips, spatial_axis=ax) for ax in (0, 1, 2)]
    if a.rot90 > 0:
        # spatial_axes counts spatial dims of channel-first [C, Z, Y, X]: (1, 2) is the y-x plane
        t.append(RandRotate90d(keys=KEYS, prob=a.rot90, max_k=3, spatial_axes=(1, 2)))
    if a.elastic > 0:
        t.append(
            RandElasticYXd(
                prob=a.elastic,
                spacing=a.elastic_spacing,
                magnitude=a.elastic_magnitude,
                rotate_degrees=a.elastic_rotate,
            )
        )
    if a.misaligned_section > 0:
        t.append(
            RandMisalignedSectiond(prob=a.misaligned_section, max_shift=a.misaligned_max_shift)
        )
    if a.missing_section > 0:
        t.append(RandMissingSectiond(prob=a.missing_section))
    if a.motion_blur > 0:
        t.append(RandMotionBlurd(prob=a.motion_blur, max_kernel=a.motion_blur_kernel))
    if a.intensity > 0:
        t.append(RandScaleIntensityd(keys="image", factors=a.intensity_scale, prob=a.intensity))
        t.append(RandShiftIntensityd(keys="image", offsets=a.intensity_shift, prob=a.intensity))
    if a.noise > 0:
        t.append(RandGaussianNoised(keys="image", prob=a.noise, std=a.noise_std))
    # plain contiguous tensors out (MONAI returns MetaTensors), so batches collate cheaply
    t.append(EnsureTyped(keys=KEYS, data_type="tensor", dtype=torch.float32, track_meta=False))
    return Compose(t)
