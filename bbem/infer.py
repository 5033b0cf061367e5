"""Block-wise inference over EM volumes of any size, in one process or on a Dask cluster.

The volume is cut into blocks that are exactly the output's zarr chunks, so two workers never
write the same chunk. Each block is predicted with MONAI's
:func:`~monai.inferers.sliding_window_inference` (Gaussian blending) over the block plus a halo.

Why the result does not depend on the block size: the sliding windows sit on one grid anchored
at the volume's origin (step ``roi - halo``, the last window flush with the volume's end, as
MONAI places them over a whole volume). A block reads exactly the span of the global windows
that touch it, and MONAI, run on that span, places its windows on the same global positions.
So every voxel is the Gaussian blend of the same windows, in the same order, as a whole-volume
prediction. ``halo`` is the overlap of neighbouring windows; when the block is a multiple of
the step, the span is the block widened by ``roi - halo`` before it and ``halo`` after it
(clipped to the volume).

Schedulers: ``threads`` runs ``workers`` blocks at a time on threads of this process, sharing
one model; ``local`` starts a Dask LocalCluster of ``workers`` processes on 127.0.0.1;
``tcp://host:port`` uses an existing Dask scheduler. Dask workers load the model once each
(a per-process cache) and use one torch thread each.

Writing protocol (what makes ``--resume`` exact): the output is built at
``<output>.partial`` with a manifest of the run's settings; each block leaves the marker
``.bbem_done/<z>_<y>_<x>`` only after its chunks are written; on completion the markers go and
the directory is renamed to ``<output>``, which keeps the manifest (the input's path, key, size
and modification time among it) so ``--resume`` on a finished output can tell what made it. A
resumed run skips marked blocks and recomputes the rest, which are deterministic, so it ends
with the bytes an uninterrupted run writes. A run that fails before finishing any block
removes its ``.partial``: there is nothing in it to resume.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bbem.atomic import (
    check_not_input,
    check_output,
    check_writable,
    kind_for,
    output_lock,
    partial_path,
    remove,
)
from bbem.errors import UserError
from bbem.volumes.normalize import normalize_raw

ZYX = tuple[int, int, int]

#: Sliding-window size when the checkpoint's training config names no patch size.
DEFAULT_ROI: ZYX = (16, 128, 128)
#: Target block shape; rounded to a multiple of the window step and capped to the volume.
DEFAULT_BLOCK: ZYX = (32, 256, 256)
#: MONAI's Gaussian blending sigma, as a fraction of the window (its default).
SIGMA_SCALE = 0.125
#: tiff output reads the finished volume whole, so it is for small volumes only.
MAX_TIFF_VOXELS = 2**30
#: How long an existing Dask scheduler may take to show a worker before we give up.
WORKER_WAIT_S = 5
DONE_DIR = ".bbem_done"
#: Label objects smaller than this (voxels) are removed: bbem evaluate's default, so what
#: infer labels is what evaluate counts.
DEFAULT_MIN_SIZE = 100
MANIFEST = ".bbem_run.json"
#: 2: the record also names the input file's size and modification time
MANIFEST_VERSION = 2
LABEL_NAME = "clefts"
#: The full-resolution array of an OME-Zarr image group (as bbem.volumes writes it).
LEVEL0 = "0"


# -- geometry -------------------------------------------------------------------------------------


def _window_starts(size: int, roi: int, step: int) -> np.ndarray:
    """Window starts along one axis, as MONAI's ``dense_patch_slices`` places them over ``size``."""
    if size <= roi:
        return np.zeros(1, dtype=np.int64)
    n = math.ceil((size - roi) / step)  # the first d with d * step + roi >= size
    return np.minimum(np.arange(n + 1, dtype=np.int64) * step, size - roi)


@dataclass(frozen=True)
class Plan:
    """How a volume of ``shape`` (z, y, x) is cut: blocks, sliding windows and their overlap.

    ``block`` is also the output chunk shape. Windows are ``roi``-sized and ``roi - halo`` apart.
    """

    shape: ZYX
    block: ZYX
    halo: ZYX
    roi: ZYX

    @property
    def step(self) -> ZYX:
        return tuple(r - h for r, h in zip(self.roi, self.halo))  # type: ignore[return-value]

    @property
    def grid(self) -> ZYX:
        """Number of blocks along z, y, x."""
        return tuple(math.ceil(s / b) for s, b in zip(self.shape, self.block))  # type: ignore[return-value]

    @property
    def n_blocks(self) -> int:
        return math.prod(self.grid)

    @property
    def overlap(self) -> tuple[float, float, float]:
        """MONAI's ``overlap`` argument that gives exactly ``step`` (it takes ``int(roi*(1-o))``).

        Half a voxel below the exact fraction so float rounding can never give ``step - 1``.
        """
        return tuple(max(0.0, (h - 0.5) / r) for r, h in zip(self.roi, self.halo))  # type: ignore[return-value]

    def blocks(self) -> Iterator[ZYX]:
        """Block indices in C order."""
        return itertools.product(*(range(g) for g in self.grid))  # type: ignore[return-value]

    def block_box(self, index: Sequence[int]) -> tuple[slice, slice, slice]:
        """The voxels block ``index`` owns (and writes)."""
        return tuple(  # type: ignore[return-value]
            slice(i * b, min((i + 1) * b, s)) for i, b, s in zip(index, self.block, self.shape)
        )

    def read_box(self, index: Sequence[int]) -> tuple[slice, slice, slice]:
        """The voxels block ``index`` reads: the span of the global windows that touch it."""
        out = []
        for box, size, roi, step in zip(self.block_box(index), self.shape, self.roi, self.step):
            starts = _window_starts(size, roi, step)
            r = min(roi, size)
            touching = starts[(starts < box.stop) & (starts + r > box.start)]
            out.append(slice(int(touching.min()), int(touching.max()) + r))
        return tuple(out)  # type: ignore[return-value]


def _as_zyx(value: Sequence[int] | None, what: str) -> ZYX | None:
    if value is None:
        return None
    t = tuple(int(v) for v in value)
    if len(t) != 3:
        raise UserError(f"{what} needs three numbers z,y,x, got {value!r}")
    return t  # type: ignore[return-value]


def make_plan(
    shape: Sequence[int],
    factor: Sequence[int],
    block: Sequence[int] | None = None,
    halo: Sequence[int] | None = None,
    roi: Sequence[int] | None = None,
) -> Plan:
    """Choose and check the block, halo and window (roi) shapes for a volume of ``shape``.

    ``factor`` is the network's downsampling factor (z, y, x): the window must be a multiple.
    The window is capped to the volume; the halo defaults to a quarter of the window (MONAI's
    default overlap, 0.25: a smaller overlap costs fewer windows per voxel); the block
    defaults to about :data:`DEFAULT_BLOCK`, a multiple of the step.
    """
    shape3 = _as_zyx(shape, "volume shape")
    assert shape3 is not None
    roi3 = _as_zyx(roi, "roi size") or DEFAULT_ROI
    for r, f in zip(roi3, factor):
        if r <= 0 or r % f:
            raise UserError(
                f"sliding-window size {_fmt(roi3)} must be a positive multiple of the network's "
                f"downsampling factor {_fmt(factor)}: choose e.g. {_fmt(_round_up(roi3, factor))}"
            )
    # Cap to the volume; an axis thinner than the factor keeps one factor and MONAI pads it.
    roi3 = tuple(max(f, min(r, s // f * f)) for r, f, s in zip(roi3, factor, shape3))  # type: ignore[assignment]

    halo3 = _as_zyx(halo, "--halo")
    if halo3 is None:
        halo3 = tuple(r // 4 for r in roi3)  # type: ignore[assignment]
    elif any(h < 0 or h >= r for h, r in zip(halo3, roi3)):
        raise UserError(
            f"--halo {_fmt(halo3)} must be smaller than the sliding window {_fmt(roi3)} "
            f"along every axis: try --halo {_fmt(tuple(r // 4 for r in roi3))}"
        )
    step = tuple(r - h for r, h in zip(roi3, halo3))

    block3 = _as_zyx(block, "--block")
    if block3 is None:
        block3 = tuple(  # type: ignore[assignment]
            max(r, round(d / s) * s) for d, s, r in zip(DEFAULT_BLOCK, step, roi3)
        )
    else:
        small = [b < min(r, s) for b, r, s in zip(block3, roi3, shape3)]
        if any(small):
            raise UserError(
                f"--block {_fmt(block3)} is smaller than the network's field of view (the "
                f"sliding window {_fmt(roi3)}): pass --block of at least that, ideally a "
                f"multiple of the window step {_fmt(step)}"
            )
    block3 = tuple(min(b, s) for b, s in zip(block3, shape3))  # type: ignore[assignment]
    return Plan(shape=shape3, block=block3, halo=halo3, roi=roi3)  # type: ignore[arg-type]


def _round_up(a: Sequence[int], f: Sequence[int]) -> ZYX:
    return tuple(max(q, -(-x // q) * q) for x, q in zip(a, f))  # type: ignore[return-value]


def _fmt(t: Sequence[int]) -> str:
    return ",".join(str(int(v)) for v in t)


# -- the model and the per-block prediction -------------------------------------------------------


def model_factor(model: Any, model_config: Mapping[str, Any] | None = None) -> ZYX:
    """The network's downsampling factor (z, y, x), from its config or from a MONAI net itself."""
    from bbem.model import downsample_factor

    if model_config is not None:
        return downsample_factor(model_config)
    strides = getattr(model, "strides", None)  # monai.networks.nets.UNet keeps them
    if strides is not None:
        f = [1, 1, 1]
        for s in strides:
            s3 = list(s) if isinstance(s, (list, tuple)) else [s, s, s]
            f = [a * int(b) for a, b in zip(f, s3)]
        return tuple(f)  # type: ignore[return-value]
    if type(model).__name__ == "BasicUNet":
        return (16, 16, 16)
    raise UserError(
        f"cannot tell the downsampling factor of a {type(model).__name__}: pass roi_size "
        "(a multiple of it) or a bbem checkpoint"
    )


class _Predictor:
    """Window -> cleft probability; with ``tta`` the running mean over the 8 flips in z, y, x.

    Input and output ``[B, 1, Z, Y, X]``. The running mean keeps one extra window in memory
    whatever the number of flips.
    """

    FLIPS: tuple[tuple[int, ...], ...] = tuple(
        dims for n in range(4) for dims in itertools.combinations((2, 3, 4), n)
    )

    def __init__(self, model: Any, tta: bool) -> None:
        self.model = model
        self.tta = tta

    def __call__(self, x: Any) -> Any:
        import torch

        if not self.tta:
            return torch.sigmoid(self.model(x))
        mean = None
        for k, dims in enumerate(self.FLIPS, start=1):
            xf = torch.flip(x, dims) if dims else x
            p = torch.sigmoid(self.model(xf))
            p = torch.flip(p, dims) if dims else p
            mean = p if mean is None else mean.add_(p.sub_(mean), alpha=1.0 / k)
        return mean


_WEIGHTS: dict[ZYX, Any] = {}


def predict_region(model: Any, raw: np.ndarray, plan: Plan, tta: bool = False) -> np.ndarray:
    """Probabilities ``[Z, Y, X]`` float32 for a region ``[Z, Y, X]`` of normalised raw.

    Windows of ``plan.roi`` placed by MONAI from the region's corner, ``plan.step`` apart,
    blended with a Gaussian. Called on a :meth:`Plan.read_box` region it reproduces a
    whole-volume prediction there.
    """
    import torch
    from monai.data.utils import compute_importance_map
    from monai.inferers import sliding_window_inference

    if plan.roi not in _WEIGHTS:  # the same map MONAI would compute on every call
        _WEIGHTS[plan.roi] = compute_importance_map(
            plan.roi, mode="gaussian", sigma_scale=SIGMA_SCALE, device="cpu"
        )
    x = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))[None, None]
    # Windows run where the model lives (a GPU while training validates); blending stays on
    # the CPU, so a large region never has to fit in device memory.
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    sw_device = param.device if param is not None else x.device
    with torch.inference_mode():
        out = sliding_window_inference(
            x,
            sw_device=sw_device,
            device=x.device,
            roi_size=plan.roi,
            sw_batch_size=1,  # one window per forward: the result cannot depend on batching
            predictor=_Predictor(model, tta),
            overlap=plan.overlap,
            mode="gaussian",
            sigma_scale=SIGMA_SCALE,
            roi_weight_map=_WEIGHTS[plan.roi],
        )
    return out[0, 0].numpy()


# -- per-process caches: a worker loads the model and opens the volumes once ----------------------

_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()
#: How many times this process has loaded a model from disk (tests check "once per worker").
MODEL_LOADS = 0


def _cached(key: tuple, make: Any) -> Any:
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = make()
        return _CACHE[key]


def _load_model_cached(checkpoint: str) -> Any:
    def load() -> Any:
        global MODEL_LOADS
        from bbem.model import load_inference_model

        model, _ = load_inference_model(checkpoint)
        MODEL_LOADS += 1
        return model

    st = os.stat(checkpoint)
    return _cached(("model", checkpoint, st.st_mtime_ns, st.st_size), load)


def _in_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


# -- one block --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """Everything a worker needs for any block of a run (small, pickled per task)."""

    input: str
    key: str | None
    input_id: tuple  # (path, key, mtime_ns): identifies the input's content for worker caches
    work: str  # the .partial store
    prob_path: str
    label_path: str | None
    plan: Plan
    tta: bool
    threshold: float | None


def _run_block(job: _Job, index: ZYX, model: Any) -> tuple[ZYX, int, int, int]:
    """Predict, write and mark one block. ``model`` is a checkpoint path or a model object.

    Returns (index, voxels written, process id, 1 if this call loaded the model else 0).
    """
    import zarr

    from bbem.metrics import to_uint8

    if _in_dask_worker():
        import torch

        torch.set_num_threads(1)  # one thread per worker process: the cluster is the parallelism
    loads_before = MODEL_LOADS
    net = _load_model_cached(model) if isinstance(model, str) else model
    # Keys carry what identifies the content, so a long-lived worker never reuses a stale handle.
    vol = _cached(("volume", *job.input_id), lambda: _open_volume(job.input, job.key))
    shape_id = (job.plan.shape, job.plan.block)
    probs = _cached(
        ("zarr", job.prob_path, *shape_id), lambda: zarr.open_array(job.prob_path, mode="r+")
    )
    read = job.plan.read_box(index)
    own = job.plan.block_box(index)
    prob = predict_region(net, normalize_raw(vol[read]), job.plan, job.tta)
    prob = prob[tuple(slice(o.start - r.start, o.stop - r.start) for o, r in zip(own, read))]
    probs[own] = to_uint8(prob)
    if job.label_path is not None:
        labels = _cached(
            ("zarr", job.label_path, *shape_id),
            lambda: zarr.open_array(job.label_path, mode="r+"),
        )
        labels[own] = (prob >= job.threshold).astype(np.uint8)
    # The marker comes last: a block killed before this line is simply redone on --resume.
    Path(job.work, DONE_DIR, _marker(index)).touch()
    return index, int(prob.size), os.getpid(), MODEL_LOADS - loads_before


def _marker(index: Sequence[int]) -> str:
    return "_".join(str(int(i)) for i in index)


def _done_blocks(work: Path) -> set[ZYX]:
    d = work / DONE_DIR
    if not d.is_dir():
        return set()
    out = set()
    for p in d.iterdir():
        try:
            z, y, x = (int(v) for v in p.name.split("_"))
        except ValueError:
            continue
        out.add((z, y, x))
    return out


# -- volumes ---------------------------------------------------------------------------------------


def _open_volume(path: str, key: str | None) -> Any:
    from bbem.volumes import open_volume

    return open_volume(path, key=key)


# -- the run ---------------------------------------------------------------------------------------


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in (".tif", ".tiff")


def _manifest(
    checkpoint: str | None,
    input: str,
    key: str | None,
    plan: Plan,
    tta: bool,
    threshold: Any,
    min_size: int = 0,
) -> dict[str, Any]:
    ck: dict[str, Any] = {"path": checkpoint}
    if checkpoint is not None:
        st = os.stat(checkpoint)
        ck.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    st = _input_stat(input)
    return {
        "version": MANIFEST_VERSION,
        "checkpoint": ck,
        "input": input,
        "key": key,
        # what says the input is the same file: a finished output keeps this record, so
        # --resume can tell it was made from this input and not only from this path
        "input_file": None if st is None else {"size": st.st_size, "mtime_ns": st.st_mtime_ns},
        "plan": {k: list(v) for k, v in asdict(plan).items()},
        "tta": bool(tta),
        "threshold": threshold,
        "min_size": min_size if threshold is not None else None,
        "complete": False,
    }


def _read_manifest(path: Path, what: Path, fix: str) -> dict[str, Any] | None:
    """The run record at ``path`` (None when absent); a damaged one is a UserError with ``fix``."""
    if not path.is_file():
        return None
    try:
        man = json.loads(path.read_text())
    except (OSError, ValueError):
        man = None
    if not isinstance(man, dict) or "plan" not in man:
        raise UserError(f"{what} holds a damaged run record ({path.name}): {fix}")
    return man


def _mismatch(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """How the run recorded in ``old`` differs from the one ``new`` describes, or None."""
    keys = sorted(
        k
        for k in set(old) | set(new)
        if k not in ("complete", "small_removed") and old.get(k) != new.get(k)
    )
    if not keys:
        return None
    if "input" in keys or "key" in keys:

        def name(m: Mapping[str, Any]) -> str:
            return f"{m.get('input')}" + (f" (key {m['key']})" if m.get("key") else "")

        return f"from another input ({name(old)}, not {name(new)})"
    if keys == ["input_file"]:
        return f"from {new['input']} before it changed (its size or modification time differ)"
    return f"with other settings ({', '.join(keys)} differ)"


def _check_finished(output: Path, manifest: Mapping[str, Any]) -> None:
    """Refuse to call ``output`` complete unless its run record matches this run's."""
    fix = "pass --overwrite to predict it again, or choose another output"
    old = None if _is_tiff(output) else _read_manifest(output / MANIFEST, output, fix)
    if old is None:
        raise UserError(
            f"{output} keeps no record of the input it was made from (a tiff, or written by an "
            f"older bbem), so --resume cannot tell it is complete for these arguments: {fix}"
        )
    diff = _mismatch(old, manifest)
    if diff is not None:
        raise UserError(f"{output} was made {diff}: {fix}")


def _worth_resuming(work: Path) -> bool:
    """Whether a work folder holds a finished block (or all of them) for --resume to keep."""
    if _done_blocks(work):
        return True
    try:
        return bool(json.loads((work / MANIFEST).read_text()).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _prepare_work(
    work: Path,
    output: Path,
    manifest: dict[str, Any],
    vol: Any,
    plan: Plan,
    threshold: float | None,
    resume: bool,
) -> tuple[str, str | None, bool]:
    """Create (or, resuming, check) the .partial store.

    Returns the probability and label array paths, and whether every block was already done
    (a run killed while finishing).
    """
    from bbem.volumes import create_ome_zarr

    label_group = work / "labels" / LABEL_NAME if threshold is not None else None
    prob_path = work / LEVEL0
    label_path = None if label_group is None else label_group / LEVEL0
    man_path = work / MANIFEST
    old = _resume_record(work, output, manifest) if resume else None
    if old is not None:
        complete = bool(old.get("complete"))
        return str(prob_path), None if label_path is None else str(label_path), complete
    # No manifest: nothing usable was written (it is the last thing setup writes).
    remove(work)
    common = dict(chunks=plan.block, voxel_size=tuple(vol.voxel_size), offset=tuple(vol.offset))
    create_ome_zarr(work, plan.shape, np.uint8, name="cleft_probability", **common)
    if label_group is not None:
        import zarr

        create_ome_zarr(label_group, plan.shape, np.uint8, name=LABEL_NAME, **common)
        # OME-Zarr labels: the image group lists its label images; each names its source image.
        zarr.open_group(work / "labels", mode="a").attrs.update(
            {"ome": {"version": "0.5", "labels": [LABEL_NAME]}}
        )
        lab = zarr.open_group(label_group, mode="a")
        ome = dict(lab.attrs.get("ome", {}))
        ome["image-label"] = {"source": {"image": "../../"}}
        lab.attrs.update({"ome": ome})
    (work / DONE_DIR).mkdir()
    _write_json(man_path, manifest)
    return str(prob_path), None if label_path is None else str(label_path), False


def _resume_record(work: Path, output: Path, manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run record of the work folder to resume (None: none yet); refused if it differs."""
    fix = f"pass --overwrite to start {output} again"
    old = _read_manifest(work / MANIFEST, work, fix)
    if old is not None:
        diff = _mismatch(old, manifest)
        if diff is not None:
            raise UserError(f"{work} was started {diff}: resume with the same arguments, or {fix}")
    return old


def _finish(
    work: Path, output: Path, plan: Plan, label_path: str | None, min_size: int = 0
) -> None:
    """Drop the markers and rename; a tiff output is written from the finished store.

    A zarr output keeps the run record (:data:`MANIFEST`, marked complete) inside it.
    """
    man_path = work / MANIFEST
    man = json.loads(man_path.read_text())
    if label_path is not None and min_size > 0 and not man.get("small_removed"):
        import zarr

        from bbem.metrics.objects import remove_small_objects

        # Blocks label voxels independently; objects are whole only once every block is done.
        remove_small_objects(zarr.open_array(label_path, mode="r+"), min_size, slab=plan.block[0])
        man["small_removed"] = True
        _write_json(man_path, man)
    man["complete"] = True
    _write_json(man_path, man)
    shutil.rmtree(work / DONE_DIR, ignore_errors=True)
    if _is_tiff(output):
        from bbem.volumes import open_volume, write_volume

        vol = open_volume(str(work))
        write_volume(
            output, vol.read(), voxel_size=vol.voxel_size, offset=vol.offset, overwrite=True
        )
        if label_path is not None:
            write_volume(
                _tiff_labels_path(output),
                open_volume(str(Path(label_path).parent)).read(),
                voxel_size=vol.voxel_size,
                offset=vol.offset,
                overwrite=True,
            )
        remove(work)
        return
    remove(output)
    os.replace(work, output)  # the run record stays: --resume checks a finished output with it


def _tiff_labels_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}_{LABEL_NAME}{output.suffix}")


def _work_path(output: Path) -> Path:
    # A tiff is written by write_volume through its own <out>.partial file: keep clear of it.
    return Path(f"{partial_path(output)}.zarr") if _is_tiff(output) else partial_path(output)


def resolve_threshold(threshold: float | str | None, info: dict[str, Any]) -> float | None:
    """A probability in [0, 1], or ``"val"``: the threshold validation chose for this checkpoint.

    Models trained with a positive-class weight are not calibrated (0.5 can label most of a
    volume), so the validation-chosen threshold is usually the one to apply.
    """
    if threshold is None:
        return None
    if str(threshold) == "val":
        t = (info.get("metrics") or {}).get("threshold_best")
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
    block: Sequence[int] | None = None,
    halo: Sequence[int] | None = None,
    scheduler: str = "threads",
    workers: int = 2,
    tta: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    key: str | None = None,
    threshold: float | str | None = None,
    roi_size: Sequence[int] | None = None,
    min_size: int = DEFAULT_MIN_SIZE,
    progress: bool = True,
) -> Path:
    """Predict cleft probabilities over ``input`` (z, y, x) block by block; return ``output``.

    ``checkpoint_or_model``: a training checkpoint or export (BB masks are baked in), or a
    model in eval mode (input ``[B, 1, Z, Y, X]``, logits out). ``output``: a zarr v3 OME-Zarr
    image of uint8 probabilities (p * 255) with the input's voxel size and offset, plus
    ``labels/clefts`` (uint8 0/1, ``p >= threshold``) when ``threshold`` is given (a number,
    or ``"val"`` for the one validation chose, see :func:`resolve_threshold`); or a tiff
    when it ends ``.tif`` (small volumes). ``block``, ``halo``, ``roi_size``: see
    :func:`make_plan`. ``scheduler``: ``threads`` (this process, ``workers`` blocks at a time
    on threads), ``local`` (a Dask LocalCluster of ``workers`` processes on 127.0.0.1) or
    ``tcp://host:port`` (an existing Dask scheduler whose workers see the same paths).
    ``resume`` finishes an interrupted run; ``overwrite`` replaces an existing output.
    """
    from bbem.model import load_inference_model

    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other: pick one")
    _check_scheduler(scheduler)
    if int(workers) < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if int(min_size) < 0:
        raise UserError(f"--min-size must be 0 or more voxels, got {min_size}")
    output = Path(output).absolute()
    work = _work_path(output)
    # Never write over an input (or its checkpoint); hold the output for the whole run.
    is_path = isinstance(checkpoint_or_model, (str, os.PathLike))
    inputs = [input, checkpoint_or_model if is_path else None]
    check_not_input(output, inputs)
    check_writable(output)  # before the lock file, which would otherwise be what fails
    with output_lock(output):
        # A finished output is checked against its run record once the plan is known.
        finished = resume and output.exists() and not work.exists()
        if _is_tiff(output) and threshold is not None and not finished:
            check_output(_tiff_labels_path(output), overwrite or resume, "tiff", inputs)
        if overwrite:
            check_output(output, overwrite=True, kind=kind_for(output), inputs=inputs)
        elif not resume:
            check_output(output, overwrite=False)
            if work.exists():
                raise UserError(
                    f"an interrupted run left {work}: pass --resume to finish it or --overwrite "
                    "to start again"
                )

        # The model: a path is loaded here to check it early, and again (once) in each worker.
        if is_path:
            ckpt: str | None = str(Path(checkpoint_or_model).absolute())
            model, info = load_inference_model(ckpt)
            factor = model_factor(model, info["model_config"])
            if roi_size is None:
                roi_size = ((info.get("config") or {}).get("data") or {}).get("patch_size")
        else:
            ckpt, model, info = None, checkpoint_or_model, {}
            factor = model_factor(model)
        threshold = resolve_threshold(threshold, info)

        input_s = str(input) if "://" in str(input) else str(Path(input).absolute())
        vol = _open_volume(input_s, key)
        if len(vol.shape) != 3:
            raise UserError(
                f"{input} has shape {tuple(vol.shape)}: bbem infer needs a 3D volume (z, y, x) "
                "with one channel"
            )
        normalize_raw(np.zeros(1, dtype=vol.dtype))  # refuse e.g. int64 raw before any work
        plan = make_plan(vol.shape, factor, block, halo, roi_size)
        manifest = _manifest(ckpt, input_s, key, plan, tta, threshold, int(min_size))
        if finished:
            _check_finished(output, manifest)
            if progress:
                print(f"bbem infer: {output} is already complete")
            return output
        if _is_tiff(output) and math.prod(plan.shape) > MAX_TIFF_VOXELS:
            raise UserError(
                f"{math.prod(plan.shape)} voxels is too large for a tiff output: write a .zarr"
            )
        _check_window_fits(model, plan, factor, input)
        if halo is not None:
            _warn_halo_cost(plan)

        if resume:  # a refused resume leaves the work folder as it was
            _resume_record(work, output, manifest)

        # Connect first: an unreachable scheduler fails in seconds and leaves nothing behind.
        client, cluster = _connect(scheduler, workers) if scheduler != "threads" else (None, None)
        succeeded = False
        try:
            if overwrite:
                remove(work)
            work.parent.mkdir(parents=True, exist_ok=True)
            prob_path, label_path, complete = _prepare_work(
                work, output, manifest, vol, plan, threshold, resume=resume
            )
            from bbem.metrics.threshold import store_thresholds

            tv = (info.get("metrics") or {}).get("threshold_best")
            store_thresholds(work, tv, threshold, int(min_size) if threshold is not None else None)
            job = _Job(
                input=input_s,
                key=key,
                input_id=(input_s, key, _mtime(input_s)),
                work=str(work),
                prob_path=prob_path,
                label_path=label_path,
                plan=plan,
                tta=tta,
                threshold=None if threshold is None else float(threshold),
            )
            done = set(plan.blocks()) if complete else _done_blocks(work)
            todo = [i for i in plan.blocks() if i not in done]
            t0 = time.perf_counter()
            with _Progress(plan, len(done), enabled=progress) as bar:
                if client is None:
                    where = _run_threads(job, todo, ckpt, model, vol, workers, bar)
                else:
                    where = _run_dask(job, todo, ckpt, model, client, bar)
            seconds = time.perf_counter() - t0
            _finish(work, output, plan, label_path, int(min_size))
            succeeded = True
        finally:
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()
            # A run that failed before finishing any block leaves nothing worth resuming, and
            # a .partial left behind would make the corrected command ask for --overwrite.
            if not succeeded and work.exists() and not _worth_resuming(work):
                remove(work)
        if progress:
            voxels = sum(_box_size(plan.block_box(i)) for i in todo)
            print(
                f"bbem infer: wrote {output}: {plan.n_blocks} blocks of {_fmt(plan.block)} "
                f"({len(done)} already done), {voxels} voxels predicted in {seconds:.1f} s "
                f"({voxels / max(seconds, 1e-9):,.0f} voxels/s) {where}"
            )
        return output


#: ``tcp://HOST:PORT``, the host a name, an IPv4 address or a bracketed IPv6 address
_TCP_ADDRESS = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})/?")


def _check_scheduler(scheduler: str) -> None:
    """Refuse a malformed ``--scheduler`` before anything is opened or written."""
    s = str(scheduler)
    if s in ("threads", "local"):
        return
    if not s.startswith("tcp://"):
        raise UserError(f"--scheduler must be threads, local or tcp://HOST:PORT, got {s!r}")
    m = _TCP_ADDRESS.fullmatch(s)
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise UserError(
            f"--scheduler {s} is not a scheduler address: give tcp://HOST:PORT with a port "
            "number, as `dask scheduler` prints it (e.g. tcp://127.0.0.1:8786)"
        )


def _check_window_fits(model: Any, plan: Plan, factor: Sequence[int], input: Any) -> None:
    """Refuse a volume so small that the network cannot run on one window of it.

    A window capped to a small volume can reach the network's deepest level as a single voxel,
    where instance normalisation fails (a ValueError deep in the first block). Only that case
    is tried, on one zero window, so a normal run costs nothing.
    """
    if math.prod(r // f for r, f in zip(plan.roi, factor)) > 1:
        return
    import torch

    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    x = torch.zeros((1, 1, *plan.roi), device=param.device if param is not None else "cpu")
    try:
        with torch.inference_mode():
            model(x)
    except (ValueError, RuntimeError):
        need = (factor[0], 2 * factor[1], 2 * factor[2])
        raise UserError(
            f"{input} is {_fmt(plan.shape)} voxels (z,y,x), too small for this network: a "
            f"window of it shrinks to a single voxel at the network's deepest level (it "
            f"downsamples by {_fmt(factor)}); infer a volume of at least {_fmt(need)} voxels"
        ) from None


#: A halo costing this many times the default's windows per voxel is worth a warning.
HALO_WARN_FACTOR = 4.0


def halo_cost(plan: Plan) -> float:
    """Windows per voxel of ``plan`` relative to the default halo (a quarter of the window).

    Along an axis longer than the window, a voxel lies in about ``roi / step`` windows; an
    axis the window spans whole has one window whatever the halo.
    """
    cost = 1.0
    for size, r, h in zip(plan.shape, plan.roi, plan.halo):
        if size > r:
            cost *= (r - r // 4) / (r - h)
    return cost


def _warn_halo_cost(plan: Plan) -> None:
    cost = halo_cost(plan)
    if cost >= HALO_WARN_FACTOR:
        default = tuple(r // 4 for r in plan.roi)
        print(
            f"bbem infer: warning: --halo {_fmt(plan.halo)} leaves the sliding windows "
            f"({_fmt(plan.roi)}) only {_fmt(plan.step)} apart: about {cost:.0f}x the windows "
            f"per voxel of the default --halo {_fmt(default)}, so inference takes about "
            f"{cost:.0f}x as long",
            file=sys.stderr,
        )


def _box_size(box: Sequence[slice]) -> int:
    return math.prod(s.stop - s.start for s in box)


def _input_stat(input: str) -> os.stat_result | None:
    """``os.stat`` of the file (or folder) an input reference names; None for a remote one.

    ``x.hdf:volumes/raw`` names ``x.hdf``; ``file://`` is a local path.
    """
    if "://" in input and not input.startswith("file://"):
        return None
    s = input.removeprefix("file://")
    while True:
        try:
            return os.stat(s)
        except OSError:
            if ":" not in s:
                return None
            s = s.rsplit(":", 1)[0]  # path:key, the key naming a dataset inside the container


def _mtime(path: str) -> int | None:
    st = _input_stat(path)
    return None if st is None else st.st_mtime_ns


def _run_threads(
    job: _Job,
    todo: list[ZYX],
    ckpt: str | None,
    model: Any,
    vol: Any,
    workers: int,
    bar: _Progress,
) -> str:
    """The blocks in this process, ``workers`` at a time on threads sharing one model.

    Each thread gets ``cores // workers`` torch threads: on a busy machine torch's intra-op
    threads spin on each other (2 on 2 busy cores ran 4x slower than 1, bench/), while blocks
    on separate threads release the GIL inside torch and never wait on each other.
    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    import torch

    # The model and volume opened by the caller serve every block; nothing outlives the run.
    keys = [("volume", *job.input_id)]
    _cached(keys[0], lambda: vol)
    if ckpt is not None:
        st = os.stat(ckpt)
        keys.append(("model", ckpt, st.st_mtime_ns, st.st_size))
        _cached(keys[-1], lambda: model)
    ref = ckpt if ckpt is not None else model
    torch_threads = torch.get_num_threads()
    per_block = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(per_block)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bbem-infer")
    try:
        pending = iter(todo)
        running = {pool.submit(_run_block, job, i, ref) for i in itertools.islice(pending, workers)}
        while running:
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                _, n, _, _ = fut.result()
                bar.advance(n)
                nxt = next(pending, None)
                if nxt is not None:
                    running.add(pool.submit(_run_block, job, nxt, ref))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(torch_threads)
        with _CACHE_LOCK:
            for k in list(_CACHE):
                if k in keys or (k[0] == "zarr" and k[1] in (job.prob_path, job.label_path)):
                    del _CACHE[k]
    return f"in one process, {workers} blocks at a time ({per_block} torch thread(s) each)"


# -- Dask -------------------------------------------------------------------------------------------


def _connect(scheduler: str, workers: int) -> tuple[Any, Any]:
    """A distributed Client (and the LocalCluster it owns, or None)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise UserError(
            "--scheduler local/tcp needs dask.distributed: pip install 'dask[distributed]'"
        ) from None
    if scheduler == "local":
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",  # nothing outside this machine can reach it
            dashboard_address=None,
        )
        return Client(cluster), cluster
    if scheduler.startswith("tcp://"):
        try:
            client = Client(scheduler, timeout="5s")
        except (OSError, TimeoutError, ValueError) as e:  # ValueError: a malformed address
            raise UserError(
                f"cannot reach the Dask scheduler at {scheduler} ({type(e).__name__}): start it "
                "with `dask scheduler` and workers with `dask worker ADDRESS`, or use "
                "--scheduler local"
            ) from None
        try:  # a scheduler without workers would leave every block waiting forever
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except (OSError, TimeoutError):
            client.close()
            raise UserError(
                f"the Dask scheduler at {scheduler} has no workers after {WORKER_WAIT_S} s: "
                f"start some with `dask worker {scheduler}`"
            ) from None
        return client, None
    raise UserError(f"--scheduler must be threads, local or tcp://HOST:PORT, got {scheduler!r}")


def _run_dask(
    job: _Job, todo: list[ZYX], ckpt: str | None, model: Any, client: Any, bar: _Progress
) -> str:
    """Run the blocks on Dask; a summary of where they ran (address, workers, model loads)."""
    from distributed import as_completed

    # A checkpoint path travels as a string (each worker loads it once); a model object is
    # sent once to every worker.
    ref = ckpt if ckpt is not None else client.scatter(model, broadcast=True)
    n_workers = max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))
    # Bounded submission: the scheduler holds a few tasks per worker, not one per block of a
    # petavoxel volume.
    pending = iter(todo)
    futures = [
        client.submit(_run_block, job, i, ref, pure=False)
        for i in itertools.islice(pending, 2 * n_workers + 2)
    ]
    queue = as_completed(futures)
    loads: dict[int, int] = {}
    for fut in queue:
        _, n, pid, loaded = fut.result()
        loads[pid] = loads.get(pid, 0) + loaded
        bar.advance(n)
        nxt = next(pending, None)
        if nxt is not None:
            queue.add(client.submit(_run_block, job, nxt, ref, pure=False))
    if ckpt is None:
        how = "model sent to every worker"
    elif set(loads.values()) == {1}:
        how = "model loaded once per worker"
    else:
        how = f"model loads per worker: {sorted(loads.values())}"
    return f"on Dask {client.scheduler.address} with {n_workers} workers ({how})"


# -- progress ---------------------------------------------------------------------------------------


class _Progress:
    """A rich bar: blocks done / total, voxels per second, time left."""

    def __init__(self, plan: Plan, already: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total = plan.n_blocks
        self.already = already
        self.voxels = 0
        self.t0 = time.perf_counter()

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("infer"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("blocks"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("elapsed,"),
                TimeRemainingColumn(),
                TextColumn("left"),
            )
            self.bar.__enter__()
            self.task = self.bar.add_task(
                "infer", total=self.total, completed=self.already, rate="- vox/s"
            )
        return self

    def advance(self, voxels: int) -> None:
        self.voxels += voxels
        if self.enabled:
            rate = self.voxels / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, advance=1, rate=f"{rate:,.0f} vox/s")

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)


# -- CLI ---------------------------------------------------------------------------------------------


def infer_from_cli(
    checkpoint: str,
    input: str,
    output: str,
    block: Sequence[int] | None = None,
    halo: Sequence[int] | None = None,
    scheduler: str = "threads",
    workers: int = 2,
    tta: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    key: str | None = None,
    threshold: float | str | None = None,
    min_size: int = DEFAULT_MIN_SIZE,
) -> Path:
    """``bbem infer``: see :func:`predict_volume`."""
    return predict_volume(
        checkpoint,
        input,
        output,
        block=block,
        halo=halo,
        scheduler=scheduler,
        workers=workers,
        tta=tta,
        resume=resume,
        overwrite=overwrite,
        key=key,
        threshold=threshold,
        min_size=min_size,
    )
