"""``predict_volume``: a checkpoint over a volume of any size, block by block, resumable.

The volume is cut into blocks that are exactly the output's zarr chunks (:mod:`.plan`), so two
workers never write the same chunk; each block is predicted with MONAI's Gaussian-blended
sliding windows over the block plus the windows that reach into it (:mod:`.region`), on the
chosen scheduler (:mod:`.schedulers`), into a ``.partial`` store that ``--resume`` can finish
(:mod:`.store`). Labels, when asked for, follow bbem's one threshold rule on the stored uint8
levels (:func:`bbem.metrics.binarize`), so they are what ``bbem evaluate`` and napari count.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bbem.atomic import remove
from bbem.errors import UserError
from bbem.infer import store
from bbem.infer.plan import fmt, make_plan, warn_halo_cost
from bbem.infer.region import check_window_fits, model_factor
from bbem.infer.schedulers import BlockProgress, check_scheduler, open_scheduler
from bbem.infer.store import OnExisting
from bbem.infer.worker import BlockJob
from bbem.volumes.normalize import normalize_raw

#: Label objects smaller than this (voxels) are removed: bbem evaluate's default, so what
#: infer labels is what evaluate counts.
DEFAULT_MIN_SIZE = 100


@dataclass(frozen=True)
class InferStats:
    """What a :func:`predict_volume` call did."""

    output: Path
    blocks_total: int
    #: blocks this call predicted
    blocks_done: int
    #: blocks an interrupted run had finished, kept by ``on_existing="resume"``
    blocks_skipped: int
    #: voxels this call predicted
    voxels: int
    #: wall time of the block loop (not the model's first load or a cluster's start)
    seconds: float
    #: loads of the checkpoint from disk by this call: here, plus once on each Dask worker
    model_loads: int
    #: Dask worker address -> its loads of the model (empty for the threads scheduler)
    worker_model_loads: Mapping[str, int] = field(default_factory=dict)
    #: where the blocks ran, in words
    where: str = ""

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else 0.0


def resolve_threshold(threshold: float | str | None, info: Mapping[str, Any]) -> float | None:
    """A probability in [0, 1], or ``"val"``: the threshold validation chose for this checkpoint.

    Models trained with a positive-class weight are not calibrated (0.5 can label most of a
    volume), so the validation-chosen threshold is usually the one to apply.
    """
    if threshold is None:
        return None
    if str(threshold) == "val":
        from bbem.model import validation_threshold

        t = validation_threshold(info)
        if t is None:
            raise UserError(
                "--threshold val needs a training checkpoint (or its export) that recorded a "
                "validation threshold: give a number instead"
            )
        return float(t)
    try:
        t = float(threshold)
    except ValueError:
        raise UserError(
            f"--threshold must be a probability in [0, 1] or 'val', got {threshold!r}"
        ) from None
    if not 0.0 <= t <= 1.0:
        raise UserError(f"--threshold must be a probability in [0, 1] or 'val', got {threshold}")
    return t


def predict_volume(
    checkpoint_or_model: str | os.PathLike | Any,
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    key: str | None = None,
    block: Sequence[int] | None = None,
    halo: Sequence[int] | None = None,
    roi_size: Sequence[int] | None = None,
    tta: bool = False,
    threshold: float | str | None = None,
    min_size: int = DEFAULT_MIN_SIZE,
    scheduler: str = "threads",
    workers: int = 2,
    on_existing: OnExisting = "refuse",
    device: str = "auto",
    progress: bool = True,
) -> InferStats:
    """Predict cleft probabilities over ``input`` (z, y, x) block by block into ``output``.

    ``checkpoint_or_model``: a training checkpoint or export (BB masks are baked in), or a
    model in eval mode (input ``[B, 1, Z, Y, X]``, logits out). ``key``: the dataset inside
    the input container. ``output``: a zarr v3 OME-Zarr image ``[Z, Y, X]`` of uint8
    probability levels (``rint(255 p)``) with the input's voxel size and offset, plus
    ``labels/clefts`` (uint32 cleft ids 1..n: the 26-connected components of level >=
    ``threshold_level(threshold)``, numbered by first voxel in z-y-x order, those under
    ``min_size`` voxels dropped; see :func:`bbem.metrics.label_objects`) when ``threshold`` is
    given (a number, or ``"val"`` for the
    one validation chose, see :func:`resolve_threshold`); or a tiff when it ends ``.tif``
    (small volumes). ``block``, ``halo``, ``roi_size``: see :func:`~bbem.infer.make_plan`.
    ``tta``: average the 8 flips in z, y, x. ``scheduler``: ``threads`` (this process,
    ``workers`` blocks at a time on threads), ``local`` (a Dask LocalCluster of ``workers``
    processes on 127.0.0.1) or ``tcp://host:port`` (an existing Dask scheduler whose workers
    see the same paths). ``on_existing``: what to do when ``output`` (or an interrupted run of
    it) exists: ``"refuse"``, ``"overwrite"`` it, or ``"resume"`` the interrupted run (a no-op
    on a finished output made with the same arguments). ``progress``: a progress bar and a
    summary line on stdout.
    """
    from bbem.engine import pick_device
    from bbem.model import load_inference_model, validation_threshold

    store.check_on_existing(on_existing)
    dev = str(pick_device(device, what="--device"))
    check_scheduler(scheduler)
    if int(workers) < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if int(min_size) < 0:
        raise UserError(f"--min-size must be 0 or more voxels, got {min_size}")
    output = Path(output).absolute()
    work = store.work_path(output)
    is_path = isinstance(checkpoint_or_model, (str, os.PathLike))
    inputs = [input, checkpoint_or_model if is_path else None]
    with store.claim_output(output, on_existing, inputs, labels=threshold is not None) as finished:
        # The model: a path is loaded here to check it early (and, on Dask, once per worker).
        ckpt: str | None
        if isinstance(checkpoint_or_model, (str, os.PathLike)):  # is_path
            ckpt = str(Path(checkpoint_or_model).absolute())
            model, info = load_inference_model(ckpt, device=dev)
            factor = model_factor(model, info["model_config"])
            if roi_size is None:
                roi_size = ((info.get("config") or {}).get("data") or {}).get("patch_size")
        else:
            ckpt, model, info = None, checkpoint_or_model, {}
            factor = model_factor(model)
        loads = int(is_path)
        t = resolve_threshold(threshold, info)

        input_s = str(input) if "://" in str(input) else str(Path(input).absolute())
        from bbem.volumes import open_volume

        vol = open_volume(input_s, key=key)
        if len(vol.shape) != 3:
            raise UserError(
                f"{input} has shape {tuple(vol.shape)}: bbem infer needs a 3D volume (z, y, x) "
                "with one channel"
            )
        normalize_raw(np.zeros(1, dtype=vol.dtype))  # refuse e.g. int64 raw before any work
        plan = make_plan(vol.shape, factor, block, halo, roi_size)
        manifest = store.build_manifest(ckpt, input_s, key, plan, tta, t, int(min_size))
        if finished:
            store.check_finished(output, manifest)
            if progress:
                print(f"bbem infer: {output} is already complete")
            n = plan.n_blocks
            return InferStats(output, n, 0, n, 0, 0.0, loads, where="already complete")
        if store.is_tiff(output) and math.prod(plan.shape) > store.MAX_TIFF_VOXELS:
            raise UserError(
                f"{math.prod(plan.shape)} voxels is too large for a tiff output: write a .zarr"
            )
        check_window_fits(model, plan, factor, input)
        if halo is not None:
            warn_halo_cost(plan)
        resume = on_existing == "resume"
        if resume:  # a refused resume leaves the work folder as it was
            store.resume_record(work, output, manifest)

        succeeded = False
        with open_scheduler(scheduler, int(workers), ckpt, model, vol) as sched:
            try:
                prob_path, label_path, complete = store.prepare_work(
                    work, output, manifest, vol, plan, labels=t is not None, resume=resume
                )
                tv = validation_threshold(info)
                store.record_thresholds(work, tv, t, int(min_size))
                job = BlockJob(
                    input=input_s,
                    key=key,
                    work=str(work),
                    prob_path=prob_path,
                    label_path=label_path,
                    plan=plan,
                    tta=tta,
                    threshold=t,
                    device=dev,
                )
                done = set(plan.blocks()) if complete else store.done_blocks(work)
                todo = [i for i in plan.blocks() if i not in done]
                t0 = time.perf_counter()
                with BlockProgress(plan.n_blocks, len(done), enabled=progress) as bar:
                    report = sched.run(job, todo, bar) if todo else None
                seconds = time.perf_counter() - t0
                store.finish(work, output, plan, label_path, int(min_size))
                succeeded = True
            finally:
                # A run that failed before finishing any block leaves nothing worth resuming,
                # and a .partial left behind would make the corrected command ask for
                # --overwrite.
                if not succeeded and work.exists() and not store.worth_resuming(work):
                    remove(work)
        worker_loads = dict(report.worker_model_loads) if report else {}
        stats = InferStats(
            output=output,
            blocks_total=plan.n_blocks,
            blocks_done=len(todo),
            blocks_skipped=len(done),
            voxels=sum(plan.block_voxels(i) for i in todo),
            seconds=seconds,
            model_loads=loads + sum(worker_loads.values()),
            worker_model_loads=worker_loads,
            where=report.where if report else "(no block left to predict)",
        )
        if progress:
            print(
                f"bbem infer: wrote {output}: {plan.n_blocks} blocks of {fmt(plan.block)} "
                f"({len(done)} already done), {stats.voxels} voxels predicted in {seconds:.1f} s "
                f"({stats.voxels_per_second:,.0f} voxels/s) {stats.where}"
            )
        return stats


def infer_from_cli(args: argparse.Namespace) -> InferStats:
    """``bbem infer``: :func:`predict_volume` with the parsed command line (see bbem.cli)."""
    on_existing: OnExisting = (
        "resume" if args.resume else "overwrite" if args.overwrite else "refuse"
    )
    return predict_volume(
        args.checkpoint,
        args.input,
        args.output,
        key=args.key,
        block=args.block,
        halo=args.halo,
        tta=args.tta,
        threshold=args.threshold,
        min_size=args.min_size,
        scheduler=args.scheduler,
        workers=args.workers,
        on_existing=on_existing,
        device=args.device,
    )
