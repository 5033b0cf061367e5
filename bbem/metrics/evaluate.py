"""``evaluate``: voxel, object and CREMI measures of a prediction in one streaming pass.

The volume is read in z-slabs of whole sections (about ``slab_voxels`` voxels each, aligned to
the prediction's chunks), so memory is bounded by a slab plus what the measures keep (256-bin
histograms, per-object sums, cleft boundary coordinates), whatever the volume's depth.

Protocol (stated again in every result under ``"protocol"``):

- headline, as the paper: voxel-wise PR-AUC and F1, no connected-component post-processing;
- objects: components (cc3d, ``connectivity``) of the prediction at ``threshold`` (the one rule,
  :func:`bbem.metrics.threshold.binarize`: stored level >= ``threshold_level(threshold)``), those smaller
  than ``min_size`` voxels dropped; truth instances are its label ids, or its components when
  it is binary; one-to-one matching at IoU > 0.2 and > 0.5;
- CREMI: predicted cleft = probability at ``threshold``, distances in nm (see bbem.metrics.cremi);
- only voxels inside the mask and ``margin`` voxels away from every border are scored; CREMI
  distances still see clefts in the unscored border, so a voxel at the edge is not penalised
  for a partner just outside it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bbem.atomic import check_output, write_json  # write_json: re-exported for callers here
from bbem.errors import UserError
from bbem.metrics.cremi import CremiDistances
from bbem.metrics.objects import Objects, Overlaps, object_metrics
from bbem.metrics.threshold import binarize, stored_threshold, threshold_level
from bbem.metrics.voxel import PRHistogram, as_levels, check_prediction_dtype, cleft_mask

#: PR-AUC where the truth holds no cleft voxel (printed; the JSON holds null)
UNDEFINED_PR_AUC = "undefined (no cleft voxels)"
#: voxels of truth sampled to tell labels from raw intensities
_TRUTH_SAMPLE = (8, 512, 512)


def evaluate(
    prediction: Any,
    truth: Any,
    mask: Any = None,
    voxel_size: Sequence[float] | None = None,
    margin: Sequence[int] | None = None,
    threshold: float = 0.5,
    *,
    min_size: int = 100,
    connectivity: int = 26,
    iou_thresholds: Sequence[float] = (0.2, 0.5),
    match_distance_nm: float | None = None,
    cremi_distance_nm: float = 200.0,
    truth_instances: str = "auto",
    slab_voxels: int = 16_000_000,
    max_cremi_points: int = 16_000_000,
    cremi: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Every measure of ``prediction`` against ``truth`` (``Volume``, numpy, zarr or h5py
    arrays of shape z, y, x).

    ``prediction``: uint8 levels 0-255 or float probabilities 0-1 (or a bool mask); other
    dtypes are refused. ``truth``: integer cleft labels, mostly background (nonzero is cleft;
    CREMI's 2**64-1 is background), or a bool mask; float truth, or integers mostly nonzero (raw
    intensities), are refused. With no cleft voxel in the scored truth, ``pr_auc`` is None
    (undefined). ``mask``: voxels to score (nonzero). ``voxel_size``: nm (z, y, x); default
    the truth's, else the prediction's, else 1. ``margin``: voxels (z, y, x) not scored at each
    border. ``threshold``: probability for the object and CREMI measures and the voxel counts
    ``voxel["counts_at_threshold"]`` (bbem's one rule: a voxel is cleft when its uint8 level is
    ``>= threshold_level(threshold)``, the smallest level L with L/255 >= threshold).
    ``cremi=False`` skips the CREMI distances (the slowest part for noisy predictions).

    Returns ``{"voxel": {...}, "object": {...}, "cremi": {...}, "protocol": {...}}``.
    """
    t_start = time.perf_counter()
    names = {"prediction": _name(prediction, "prediction"), "truth": _name(truth, "truth")}
    shape = _shape(prediction, "prediction")
    if _shape(truth, "truth") != shape:
        raise UserError(
            f"prediction shape {shape} and truth shape {_shape(truth, 'truth')} disagree: "
            "evaluate a prediction of the same region as the labels"
        )
    if mask is not None and _shape(mask, "mask") != shape:
        raise UserError(f"mask shape {_shape(mask, 'mask')} and prediction shape {shape} disagree")
    level = threshold_level(threshold)  # refuses a threshold outside [0, 1] before any work
    if truth_instances not in ("auto", "labels", "components"):
        raise UserError(
            f"truth_instances must be auto, labels or components, got {truth_instances!r}"
        )
    if int(min_size) < 0:
        raise UserError(f"min_size (--min-size) must be a voxel count of 0 or more, got {min_size}")
    check_prediction_dtype(_dtype(prediction), names["prediction"])
    _check_truth(truth, shape, names["truth"])
    margin_t = _margin(margin, shape)
    vs, vs_source = _voxel_size(voxel_size, truth, prediction)
    truth_dtype = _dtype(truth)
    label_ok = truth_dtype.kind in "iu" and truth_instances != "components"
    cc_ok = truth_instances != "labels" or not label_ok

    hist = PRHistogram()
    pred_obj = Objects("components", connectivity)
    truth_cc = Objects("components", connectivity) if cc_ok else None
    truth_lab = Objects("labels") if label_ok else None
    ov_cc, ov_lab = Overlaps(), Overlaps()
    dist = CremiDistances(vs, cremi_distance_nm, max_cremi_points)
    if not cremi:
        dist.skipped = "not requested (cremi=False)"

    z_total = shape[0]
    step = _slab_depth(shape, getattr(prediction, "chunks", None), slab_voxels)
    starts = list(range(0, z_total, step))

    def read(z0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        z1 = min(z_total, z0 + step)
        m = None if mask is None else np.asarray(mask[z0:z1])
        return np.asarray(prediction[z0:z1]), np.asarray(truth[z0:z1]), m

    # reading (decompression) of the next slab overlaps the work on this one
    with _progress(progress, z_total, names["prediction"]) as advance, ThreadPoolExecutor(1) as ex:
        pending = ex.submit(read, starts[0])
        for i, z0 in enumerate(starts):
            z1 = min(z_total, z0 + step)
            p_raw, t_raw, m_raw = pending.result()
            if i + 1 < len(starts):
                pending = ex.submit(read, starts[i + 1])
            try:
                p = as_levels(p_raw)
            except UserError as e:
                raise UserError(f"{names['prediction']} sections {z0}-{z1 - 1}: {e}") from None
            del p_raw
            tb = cleft_mask(t_raw)
            scored = _scored(m_raw, margin_t, shape, z0, z1)
            hist.update(p, tb, scored)
            pb = binarize(p, threshold)
            pb_s, tb_s = (pb, tb) if scored is None else (pb & scored, tb & scored)
            pid, poff = pred_obj.add(pb_s, z0)
            if truth_lab is not None:
                truth_lab.add(t_raw, z0, where=tb_s)
                ov_lab.add(pid, poff, t_raw, tb_s)
                if truth_cc is not None and truth_lab.n_instances() > 1:
                    truth_cc = None  # two ids seen: instances are the labels, for sure
            if truth_cc is not None:
                tid, toff = truth_cc.add(tb_s, z0)
                ov_cc.add(pid, poff, tid, tid > 0, toff)
            if cremi:
                dist.add(pb, tb, scored, z0, last=z1 == z_total)
            advance(z1 - z0)

    if hist.n_voxels == 0:
        raise UserError("no voxel is scored: the mask and margin leave nothing to evaluate")
    if truth_lab is not None and (truth_cc is None or truth_lab.n_instances() > 1):
        t_obj, ov, instances = truth_lab, ov_lab, "labels"
    else:
        assert truth_cc is not None  # cc_ok: only truth_instances="labels" goes without it
        t_obj, ov, instances = truth_cc, ov_cc, "components"
    voxel = hist.result()
    if hist.n_positive == 0:  # PR-AUC needs positives; PRHistogram's 0 would read as a score
        voxel["pr_auc"] = None
    voxel["counts_at_threshold"] = {"threshold": threshold, **hist.counts_at(level)}
    objects = object_metrics(
        pred_obj,
        t_obj,
        ov,
        min_size=min_size,
        iou_thresholds=tuple(iou_thresholds),
        match_distance_nm=match_distance_nm,
        voxel_size=vs,
    )
    protocol = {
        "headline": "voxel-wise PR-AUC and F1, no connected-component post-processing",
        "pr_auc": "average precision (sklearn average_precision_score) over the 256 uint8 levels",
        "threshold": threshold,
        "threshold_level_u8": level,
        "threshold_rule": "cleft where the stored uint8 level rint(255 p) >= threshold_level_u8, "
        "the smallest level L with L/255 >= threshold (ceil(255 threshold))",
        "objects": {
            "connectivity": connectivity,
            "min_size_voxels": min_size,
            "truth_instances": instances,
            "matching": "one-to-one, most matches then best total (Hungarian)",
            "rules": [f"IoU > {t:g}" for t in iou_thresholds]
            + ([f"centroid distance <= {match_distance_nm:g} nm"] if match_distance_nm else []),
        },
        "cremi": {
            "distance_nm": cremi_distance_nm,
            "background": "0 and 2**64-1 (CREMI) are background",
            "distances": "exact Euclidean distances in nm to the nearest voxel of the other set "
            "anywhere in the volume (KD-tree over its boundary voxels)",
            "score": "(ADGT + ADF) / 2",
            "fscore": "F1 of precision 1 - FP/n_pred and recall 1 - FN/n_truth",
        },
        "voxel_size_nm": list(vs),
        "voxel_size_from": vs_source,
        "mask": _name(mask, "mask") if mask is not None else None,
        "margin_voxels": list(margin_t),
        "scored_voxels": hist.n_voxels,
        "shape": list(shape),
        "prediction": names["prediction"],
        "truth": names["truth"],
        "elapsed_s": round(time.perf_counter() - t_start, 3),
    }
    return {"voxel": voxel, "object": objects, "cremi": dist.result(), "protocol": protocol}


def evaluate_from_cli(
    prediction: str,
    truth: str,
    mask: str | None = None,
    json_path: str | None = None,
    plot_path: str | None = None,
    margin: Sequence[int] | None = None,
    threshold: float | None = None,
    overwrite: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """``bbem evaluate``: open the volumes, evaluate, print a table, write JSON and PNG.

    ``options`` go to :func:`evaluate` (``min_size``, ``voxel_size``, ``match_distance_nm``,
    ``connectivity``, ``cremi``); ``None`` values keep its defaults. The JSON and PNG outputs
    are checked before any work: an existing one needs ``overwrite`` and must be a file of the
    same kind, and neither may be an input.
    """
    from bbem.volumes import open_volume

    inputs = [prediction, truth, mask]
    outs = [(p, k) for p, k in ((json_path, "json"), (plot_path, "png")) if p]
    for path, kind in outs:
        check_output(path, overwrite, kind=kind, inputs=inputs)
    if json_path and plot_path and Path(json_path).resolve() == Path(plot_path).resolve():
        raise UserError("--json and --plot name the same file: give each its own path")

    pred_v = open_volume(prediction)
    truth_v = open_volume(truth)
    if threshold is None:
        threshold = stored_threshold(prediction)
        print(
            f"threshold {threshold:.3f}: the one validation chose, stored with the prediction"
            if threshold is not None
            else "threshold 0.5: the prediction carries none (give --threshold to choose)"
        )
        threshold = 0.5 if threshold is None else threshold
    mask_v = open_volume(mask) if mask else None
    options = {k: v for k, v in options.items() if v is not None}
    result = evaluate(
        pred_v, truth_v, mask_v, margin=margin, threshold=threshold, progress=True, **options
    )
    print_table(result)
    if json_path:
        write_json(result, json_path)
        print(f"wrote {json_path}")
    if plot_path:
        from bbem.metrics.plot import plot_pr_curve

        plot_pr_curve(
            result["voxel"]["curve"],
            plot_path,
            title=f"{Path(prediction).name} vs {Path(truth).name}",
        )
        print(f"wrote {plot_path}")
    return result


def print_table(result: dict[str, Any], console: Any = None) -> None:
    """The headline numbers as rich tables on the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    v, o, c, pr = result["voxel"], result["object"], result["cremi"], result["protocol"]
    t = Table(title="voxel level (headline: no post-processing)", title_justify="left")
    for col in ("PR-AUC", "F1 best", "at t", "F1 @0.5", "precision @0.5", "recall @0.5"):
        t.add_column(col, justify="right")
    pr_auc = UNDEFINED_PR_AUC if v["pr_auc"] is None else f"{v['pr_auc']:.4f}"
    t.add_row(
        pr_auc,
        *(
            f"{x:.4f}"
            for x in (
                v["f1_best"],
                v["threshold_best"],
                v["f1_05"],
                v["precision_05"],
                v["recall_05"],
            )
        ),
    )
    console.print(t)
    if v["pr_auc"] is None:
        console.print(
            f"note: truth {pr['truth']} has no cleft voxel in the scored region, so PR-AUC and "
            "recall are undefined; if it should, check the labels dataset (e.g. "
            "volumes/labels/clefts), the mask and the margin"
        )
    t = Table(
        title=f"object level (t={pr['threshold']:g}, min size {pr['objects']['min_size_voxels']}, "
        f"{o['n_pred']} predicted, {o['n_true']} true, {o['split']} split, {o['merged']} merged)",
        title_justify="left",
    )
    for col in ("rule", "precision", "recall", "F1", "missed", "spurious"):
        t.add_column(col, justify="right")
    for r in o.values():
        if isinstance(r, dict):
            t.add_row(
                r["rule"],
                f"{r['precision']:.4f}",
                f"{r['recall']:.4f}",
                f"{r['f1']:.4f}",
                str(r["missed"]),
                str(r["spurious"]),
            )
    console.print(t)
    t = Table(
        title=f"CREMI clefts ({c['distance_nm']:g} nm, voxel size {pr['voxel_size_nm']} nm)",
        title_justify="left",
    )
    if c.get("skipped"):
        console.print(f"CREMI clefts: skipped: {c['skipped']}")
    else:
        for col in ("FP", "FN", "F-score", "ADF nm", "ADGT nm", "CREMI score"):
            t.add_column(col, justify="right")
        t.add_row(
            str(c["fp"]),
            str(c["fn"]),
            f"{c['fscore']:.4f}",
            _fmt(c["adf"]),
            _fmt(c["adgt"]),
            "n/a" if c["score"] is None else f"{c['score']:.2f}",
        )
        console.print(t)
    console.print(
        f"protocol: {pr['headline']}; scored {pr['scored_voxels']} voxels, margin "
        f"{pr['margin_voxels']}, mask {pr['mask'] or 'none'}; {pr['elapsed_s']:.1f} s"
    )


def _fmt(stats: dict[str, float] | None) -> str:
    return "n/a" if stats is None else f"{stats['mean']:.2f}"


def _dtype(x: Any) -> np.dtype:
    dt = getattr(x, "dtype", None)  # not `or`: a plain np.dtype is falsy (it has no fields)
    return np.dtype(dt if dt is not None else np.asarray(x[0:1]).dtype)


def _check_truth(truth: Any, shape: tuple[int, ...], name: str) -> None:
    """Refuse truth that is no cleft labels: float, or integers mostly nonzero in a sample."""
    dt = _dtype(truth)
    if dt.kind == "b":
        return
    if dt.kind not in "iu":
        raise UserError(
            f"truth {name} is {dt}: truth must be cleft labels (integers, 0 = background) or a "
            "bool mask; float looks like raw intensities or a prediction, not labels: give the "
            "labels dataset, e.g. sample.hdf:volumes/labels/clefts"
        )
    # a central block: cleft labels are overwhelmingly background anywhere, raw EM nowhere
    box = tuple(
        slice((n - min(n, b)) // 2, (n - min(n, b)) // 2 + min(n, b))
        for n, b in zip(shape, _TRUTH_SAMPLE, strict=True)
    )
    sample = np.asarray(truth[box])
    background = 1.0 - float(cleft_mask(sample).mean())
    if background < 0.5:
        where = ", ".join(f"{a} {s.start}-{s.stop - 1}" for a, s in zip("zyx", box, strict=True))
        raise UserError(
            f"truth {name} looks like raw intensities, not labels: only {background:.0%} of "
            f"the block {where} is background (0), where cleft labels are mostly background; "
            "give the cleft labels dataset, e.g. sample.hdf:volumes/labels/clefts"
        )


def _name(x: Any, default: str) -> str:
    return str(getattr(x, "name", None) or default) if not isinstance(x, np.ndarray) else default


def _shape(x: Any, what: str) -> tuple[int, ...]:
    s = tuple(int(v) for v in getattr(x, "shape", np.shape(x)))
    if len(s) != 3:
        raise UserError(f"{what} has shape {s}: evaluate needs 3D volumes (z, y, x)")
    if min(s) == 0:
        raise UserError(f"{what} is empty (shape {s})")
    return s


def _margin(margin: Sequence[int] | None, shape: tuple[int, ...]) -> tuple[int, int, int]:
    m = tuple(int(v) for v in (margin if margin is not None else (0, 0, 0)))
    if len(m) != 3 or min(m) < 0:
        raise UserError(f"margin must be three non-negative voxel counts z,y,x, got {margin}")
    if any(2 * a >= s for a, s in zip(m, shape, strict=True)):
        raise UserError(f"margin {list(m)} leaves no voxel of a volume of shape {list(shape)}")
    return m


def _voxel_size(
    voxel_size: Sequence[float] | None, truth: Any, prediction: Any
) -> tuple[tuple[float, float, float], str]:
    if voxel_size is not None:
        vs = tuple(float(v) for v in voxel_size)
        if len(vs) != 3 or min(vs) <= 0:
            raise UserError(f"voxel_size must be three positive nm values z,y,x, got {voxel_size}")
        return vs, "argument"
    for src, name in ((truth, "truth"), (prediction, "prediction")):
        src_vs = getattr(src, "voxel_size", None)
        if src_vs is not None and tuple(float(v) for v in src_vs) != (1.0, 1.0, 1.0):
            return tuple(float(v) for v in src_vs), name  # type: ignore[return-value]
    return (1.0, 1.0, 1.0), "unknown: 1 nm assumed"


def _slab_depth(shape: tuple[int, ...], chunks: Any, slab_voxels: int) -> int:
    """Sections per slab: ~``slab_voxels`` voxels, a multiple of the chunk depth when it fits."""
    plane = shape[1] * shape[2]
    depth = max(1, min(shape[0], slab_voxels // plane))
    try:  # zarr/h5py/Volume: ints; dask: a tuple of block sizes per axis
        c0 = chunks[0] if chunks else 0
        cz = int(c0[0] if isinstance(c0, tuple) else c0)
    except (TypeError, IndexError, ValueError):
        cz = 0
    if 0 < cz <= depth:
        depth = depth // cz * cz
    return depth


def _scored(
    mask: Any, margin: tuple[int, int, int], shape: tuple[int, ...], z0: int, z1: int
) -> np.ndarray | None:
    """Voxels of sections ``z0:z1`` to score, or None when all are."""
    if mask is None and not any(margin):
        return None
    s = np.ones((z1 - z0, *shape[1:]), dtype=bool) if mask is None else np.asarray(mask[z0:z1]) != 0
    mz, my, mx = margin
    if mz:
        z = np.arange(z0, z1)
        s[(z < mz) | (z >= shape[0] - mz)] = False
    if my:
        s[:, :my] = False
        s[:, shape[1] - my :] = False
    if mx:
        s[:, :, :mx] = False
        s[:, :, shape[2] - mx :] = False
    return s


@contextlib.contextmanager
def _progress(enabled: bool, total: int, name: str) -> Iterator[Callable[[int], None]]:
    """Advance a transient bar over sections (``bbem.progress``); drawing nothing when not
    ``enabled``."""
    from bbem.progress import progress_bar

    with progress_bar(enabled=enabled, transient=True) as bar:
        task = bar.add_task(f"evaluating {name}", total=total)
        yield lambda n: bar.advance(task, n)
