"""The output of ``bbem infer``: claiming it, the ``.partial`` work store, its run record, resume.

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

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from bbem.atomic import (
    check_not_input,
    check_output,
    check_writable,
    kind_for,
    output_lock,
    partial_path,
    remove,
    write_json,
)
from bbem.errors import UserError
from bbem.infer.plan import ZYX, Plan

#: What to do with an output that exists: refuse it, replace it, or finish (resume) its run.
OnExisting = Literal["refuse", "overwrite", "resume"]
ON_EXISTING: tuple[str, ...] = get_args(OnExisting)

#: tiff output reads the finished volume whole, so it is for small volumes only.
MAX_TIFF_VOXELS = 2**30
DONE_DIR = ".bbem_done"
MANIFEST = ".bbem_run.json"
#: 2: the record also names the input file's size and modification time
MANIFEST_VERSION = 2
LABEL_NAME = "clefts"
#: The full-resolution array of an OME-Zarr image group (as bbem.volumes writes it).
LEVEL0 = "0"
#: Cleft instance ids 1..n (0: background), as CREMI's cleft labels and napari-bbem's.
LABEL_DTYPE = np.uint32


def is_tiff(path: Path) -> bool:
    return path.suffix.lower() in (".tif", ".tiff")


def tiff_labels_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}_{LABEL_NAME}{output.suffix}")


def work_path(output: Path) -> Path:
    """Where the run writes until it is complete."""
    # A tiff is written by write_volume through its own <out>.partial file: keep clear of it.
    return Path(f"{partial_path(output)}.zarr") if is_tiff(output) else partial_path(output)


def check_on_existing(on_existing: str) -> None:
    if on_existing not in ON_EXISTING:
        raise UserError(f"on_existing must be one of {', '.join(ON_EXISTING)}, got {on_existing!r}")


@contextlib.contextmanager
def claim_output(
    output: Path, on_existing: OnExisting, inputs: Sequence[Any], labels: bool
) -> Iterator[bool]:
    """Refuse an output this run may not write, then hold its lock for the run.

    Never writes over an input (or the checkpoint); an existing output is replaced only with
    ``on_existing="overwrite"`` and only when it is a bbem output of the same kind. Yields
    whether ``output`` is a finished output to check rather than write (``resume`` with no
    interrupted run in its way).
    """
    work = work_path(output)
    check_not_input(output, inputs)
    check_writable(output)  # before the lock file, which would otherwise be what fails
    with output_lock(output):
        finished = on_existing == "resume" and output.exists() and not work.exists()
        if is_tiff(output) and labels and not finished:
            check_output(tiff_labels_path(output), on_existing != "refuse", "tiff", inputs)
        if on_existing == "overwrite":
            check_output(output, overwrite=True, kind=kind_for(output), inputs=inputs)
        elif on_existing == "refuse":
            check_output(output, overwrite=False)
            if work.exists():
                raise UserError(
                    f"an interrupted run left {work}: pass --resume to finish it or --overwrite "
                    "to start again"
                )
        yield finished


# -- the run record -------------------------------------------------------------------------------


def input_stat(input: str) -> os.stat_result | None:
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


def build_manifest(
    checkpoint: str | None,
    input: str,
    key: str | None,
    plan: Plan,
    tta: bool,
    threshold: float | None,
    min_size: int = 0,
) -> dict[str, Any]:
    """The run record: everything that decides the bytes of the output."""
    ck: dict[str, Any] = {"path": checkpoint}
    if checkpoint is not None:
        ck_st = os.stat(checkpoint)
        ck.update(size=ck_st.st_size, mtime_ns=ck_st.st_mtime_ns)
    st = input_stat(input)
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
        # progress flags, not settings ("small_removed": the records of an older bbem)
        if k not in ("complete", "labelled", "small_removed") and old.get(k) != new.get(k)
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


def check_finished(output: Path, manifest: Mapping[str, Any]) -> None:
    """Refuse to call ``output`` complete unless its run record matches this run's."""
    fix = "pass --overwrite to predict it again, or choose another output"
    old = None if is_tiff(output) else _read_manifest(output / MANIFEST, output, fix)
    if old is None:
        raise UserError(
            f"{output} keeps no record of the input it was made from (a tiff, or written by an "
            f"older bbem), so --resume cannot tell it is complete for these arguments: {fix}"
        )
    diff = _mismatch(old, manifest)
    if diff is not None:
        raise UserError(f"{output} was made {diff}: {fix}")
    labels = output / "labels" / LABEL_NAME / LEVEL0
    if manifest.get("threshold") is not None and labels.is_dir():
        import zarr

        dtype = np.dtype(zarr.open_array(labels, mode="r").dtype)
        if dtype != LABEL_DTYPE:
            raise UserError(
                f"{output} was made by an older bbem, whose labels are {dtype} 0/1, not "
                f"{np.dtype(LABEL_DTYPE)} cleft ids: {fix}"
            )


def resume_record(work: Path, output: Path, manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run record of the work folder to resume (None: none yet); refused if it differs."""
    fix = f"pass --overwrite to start {output} again"
    old = _read_manifest(work / MANIFEST, work, fix)
    if old is not None:
        diff = _mismatch(old, manifest)
        if diff is not None:
            raise UserError(f"{work} was started {diff}: resume with the same arguments, or {fix}")
    return old


# -- block markers --------------------------------------------------------------------------------


def _marker(index: Sequence[int]) -> str:
    return "_".join(str(int(i)) for i in index)


def mark_done(work: str | Path, index: Sequence[int]) -> None:
    """Record that block ``index`` is written; only then may a resumed run skip it."""
    Path(work, DONE_DIR, _marker(index)).touch()


def done_blocks(work: Path) -> set[ZYX]:
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


def worth_resuming(work: Path) -> bool:
    """Whether a work folder holds a finished block (or all of them) for --resume to keep."""
    if done_blocks(work):
        return True
    try:
        return bool(json.loads((work / MANIFEST).read_text()).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


# -- the work store -------------------------------------------------------------------------------


def prepare_work(
    work: Path,
    output: Path,
    manifest: dict[str, Any],
    vol: Any,
    plan: Plan,
    labels: bool,
    resume: bool,
) -> tuple[str, str | None, bool]:
    """Create (or, resuming, check) the .partial store: a uint8 OME-Zarr image of ``plan.shape``
    (z, y, x) chunked by ``plan.block``, with ``labels/clefts`` (uint32) when ``labels``.

    Returns the probability and label array paths, and whether every block was already done
    (a run killed while finishing).
    """
    from bbem.volumes import create_ome_zarr

    label_group = work / "labels" / LABEL_NAME if labels else None
    prob_path = work / LEVEL0
    label_path = None if label_group is None else label_group / LEVEL0
    old = resume_record(work, output, manifest) if resume else None
    if old is not None:
        if label_path is not None:
            import zarr

            _check_label_dtype(zarr.open_array(label_path, mode="r").dtype, work, output)
        complete = bool(old.get("complete"))
        return str(prob_path), None if label_path is None else str(label_path), complete
    # No manifest: nothing usable was written (it is the last thing setup writes).
    remove(work)
    work.parent.mkdir(parents=True, exist_ok=True)
    common = dict(chunks=plan.block, voxel_size=tuple(vol.voxel_size), offset=tuple(vol.offset))
    create_ome_zarr(work, plan.shape, np.uint8, name="cleft_probability", **common)
    if label_group is not None:
        import zarr

        create_ome_zarr(label_group, plan.shape, LABEL_DTYPE, name=LABEL_NAME, **common)
        # OME-Zarr labels: the image group lists its label images; each names its source image.
        zarr.open_group(work / "labels", mode="a").attrs.update(
            {"ome": {"version": "0.5", "labels": [LABEL_NAME]}}
        )
        lab = zarr.open_group(label_group, mode="a")
        attrs: dict[str, Any] = dict(lab.attrs)
        ome = dict(attrs.get("ome", {}))
        ome["image-label"] = {"source": {"image": "../../"}}
        lab.attrs.update({"ome": ome})
    (work / DONE_DIR).mkdir()
    write_json(manifest, work / MANIFEST)
    return str(prob_path), None if label_path is None else str(label_path), False


def _check_label_dtype(dtype: Any, work: Path, output: Path) -> None:
    """Refuse a work store whose labels are not instance ids (an older bbem wrote uint8 0/1)."""
    if np.dtype(dtype) != LABEL_DTYPE:
        raise UserError(
            f"{work} was started by an older bbem, which wrote {np.dtype(dtype)} 0/1 labels, "
            f"not {np.dtype(LABEL_DTYPE)} cleft ids: pass --overwrite to start {output} again"
        )


def record_thresholds(
    work: Path, validation: float | None, labels: float | None, min_size: int
) -> None:
    """Store with the prediction the validation threshold and the one its labels used."""
    from bbem.metrics.threshold import store_thresholds

    store_thresholds(work, validation, labels, int(min_size) if labels is not None else None)


def finish(work: Path, output: Path, plan: Plan, label_path: str | None, min_size: int = 0) -> None:
    """Number the labels, drop the markers and rename; a tiff output is written from the store.

    Blocks write their labels as 0/1: a cleft spans blocks, so it gets its instance id only
    here, once every block is done (:func:`bbem.metrics.label_objects`, in place, guarded by
    the manifest's ``labelled``: it gives the same ids when a killed finish runs again).
    A zarr output keeps the run record (:data:`MANIFEST`, marked complete) inside it.
    """
    man_path = work / MANIFEST
    man = json.loads(man_path.read_text())
    if label_path is not None and not man.get("labelled"):
        import zarr

        from bbem.metrics.objects import label_objects

        labels = zarr.open_array(label_path, mode="r+")
        _check_label_dtype(labels.dtype, work, output)
        label_objects(labels, min_size=min_size, slab=plan.block[0])
        man["labelled"] = True
        write_json(man, man_path)
    man["complete"] = True
    write_json(man, man_path)
    shutil.rmtree(work / DONE_DIR, ignore_errors=True)
    if is_tiff(output):
        from bbem.volumes import open_volume, write_volume

        vol = open_volume(str(work))
        write_volume(
            output, vol.read(), voxel_size=vol.voxel_size, offset=vol.offset, overwrite=True
        )
        if label_path is not None:
            write_volume(
                tiff_labels_path(output),
                open_volume(str(Path(label_path).parent)).read(),
                voxel_size=vol.voxel_size,
                offset=vol.offset,
                overwrite=True,
            )
        remove(work)
        return
    remove(output)
    os.replace(work, output)  # the run record stays: --resume checks a finished output with it
