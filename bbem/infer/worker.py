"""One block of a run: what a worker needs (:class:`BlockJob`), what it keeps open between
blocks (:class:`BlockResources`), and :func:`run_block`.

A :class:`BlockResources` lives exactly as long as one run in one process: the threads
scheduler makes one and shares it between its threads; a Dask worker makes one when the run's
plugin is registered on it and drops it when the run unregisters the plugin. So a worker loads
the model once per run, and nothing of a run (model, volume, open arrays) outlives it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from bbem.infer.plan import ZYX, Plan
from bbem.infer.region import predict_block
from bbem.infer.store import LABEL_DTYPE, mark_done


@dataclass(frozen=True)
class BlockJob:
    """Everything a worker needs for any block of a run (small: pickled to Dask workers)."""

    input: str
    key: str | None
    work: str  # the .partial store
    prob_path: str
    label_path: str | None
    plan: Plan
    tta: bool
    threshold: float | None
    device: str = "cpu"  # where a worker that loads the checkpoint runs it


@dataclass(frozen=True)
class BlockResult:
    index: ZYX
    voxels: int  # voxels written
    model_loads: int  # 1 if this block loaded the model from disk


class BlockResources:
    """The model, the input volume and the output arrays of one run, opened once per process.

    ``model``: a checkpoint path (loaded on first use, counted in :attr:`model_loads`) or a
    model object. ``volume``: an already open input volume, or None to open ``job.input``.
    Safe to share between threads: each thing is opened under a lock, then only read.
    """

    def __init__(self, job: BlockJob, model: str | Any, volume: Any = None) -> None:
        self.job = job
        self._model_ref = model
        self._model = None if isinstance(model, str) else model
        self._volume = volume
        self._arrays: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.model_loads = 0

    def model(self) -> tuple[Any, bool]:
        """The model, and whether this call loaded it from disk."""
        with self._lock:
            if self._model is not None:
                return self._model, False
            from bbem.model import load_inference_model

            self._model, _ = load_inference_model(self._model_ref, device=self.job.device)
            self.model_loads += 1
            return self._model, True

    def volume(self) -> Any:
        with self._lock:
            if self._volume is None:
                from bbem.volumes import open_volume

                self._volume = open_volume(self.job.input, key=self.job.key)
            return self._volume

    def array(self, path: str) -> Any:
        with self._lock:
            if path not in self._arrays:
                import zarr

                self._arrays[path] = zarr.open_array(path, mode="r+")
            return self._arrays[path]


def run_block(res: BlockResources, index: ZYX) -> BlockResult:
    """Predict, write and mark block ``index`` of ``res.job``.

    Writes the block's uint8 levels (``rint(255 p)``) and, with a threshold, its labels:
    :func:`bbem.metrics.binarize` of those levels, the rule ``bbem evaluate`` and napari use,
    as 0/1 (a cleft spans blocks: :func:`bbem.infer.store.finish` numbers them once all are done).
    """
    from bbem.metrics import binarize, to_uint8

    job = res.job
    net, loaded = res.model()
    own, prob = predict_block(net, res.volume(), job.plan, index, job.tta)
    levels = to_uint8(prob)
    res.array(job.prob_path)[own] = levels
    if job.label_path is not None and job.threshold is not None:
        res.array(job.label_path)[own] = binarize(levels, job.threshold).astype(LABEL_DTYPE)
    # The marker comes last: a block killed before this line is simply redone on --resume.
    mark_done(job.work, index)
    return BlockResult(index, int(levels.size), int(loaded))
