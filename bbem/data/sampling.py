"""Patch sampling: cleft-seeking boxes, the endless patch stream, and batches.

As in PyTorch Connectomics' rejection sampling, a fraction ``pos_fraction`` of patches is forced
to contain a cleft voxel: the patch is placed around a cleft voxel drawn from the source's list
of cleft coordinates. Patches come out as ``{"image": float32 [1, Z, Y, X] in [0, 1] (before
intensity augmentation), "label": float32 [1, Z, Y, X] (1 = cleft)}``; :func:`make_loader`
batches them to ``[B, 1, Z, Y, X]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable
from monai.utils import convert_to_tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bbem.config import RunConfig
from bbem.data.augment import KEYS, build_augment
from bbem.data.sources import PatchSource, open_sources
from bbem.errors import UserError


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
            start = [min(max(s, 0), max(0, d - n)) for s, d, n in zip(start, shape, p, strict=True)]
        else:
            start = [int(rng.integers(0, max(0, d - n) + 1)) for d, n in zip(shape, p, strict=True)]
        # a volume smaller than the patch: centre it (read pads with zeros)
        start = [s if d >= n else -((n - d) // 2) for s, d, n in zip(start, shape, p, strict=True)]
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

    def check_workers(self) -> None:
        """Raise :class:`UserError` now, in this process, if a loader worker could not reopen
        a source's volumes (see :func:`bbem.data.sources.reopen_for_worker`). Sources made by
        a function are made in each worker, so they cross no fork."""
        if callable(self._sources):
            return
        for src in self._sources:
            src.check_reopenable()

    @property
    def sources(self) -> list[PatchSource]:
        """The training sources (opened now if a function was given)."""
        if callable(self._sources):
            self._sources = list(self._sources())
        return list(self._sources)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if callable(self._sources):
            sources = self._sources()  # opened here, in this process
        elif info is not None:
            # hdf5 handles must not cross a fork: each worker reopens its lazy volumes
            sources = [s.reopened() for s in self._sources]
        else:
            sources = self._sources
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
        ds.check_workers()  # a worker's error would arrive wrapped in its traceback
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
