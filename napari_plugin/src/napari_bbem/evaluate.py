"""What the "Evaluate" widget shows, without Qt: :func:`bbem.metrics.evaluate` on two layers'
arrays, its headline numbers (:func:`summary_rows`), the PR curve (:func:`plot_pr`) and the
clefts it missed and invented (:func:`mismatches`), by the same rules as ``bbem evaluate``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from bbem.errors import UserError

#: napari's dark theme: canvas background and text, for figures docked in the viewer.
DARK_BG = "#262930"
DARK_FG = "#d7d9de"
IOUS = (0.2, 0.5)


def dark(fig: Figure) -> Figure:
    """Restyle every axes of ``fig`` for napari's dark theme (dark face, light text)."""
    fig.set_facecolor(DARK_BG)
    for ax in fig.axes:
        ax.set_facecolor(DARK_BG)
        ax.tick_params(colors=DARK_FG, which="both")
        for spine in ax.spines.values():
            spine.set_color("#8a8d93")
        ax.xaxis.label.set_color(DARK_FG)
        ax.yaxis.label.set_color(DARK_FG)
        ax.title.set_color(DARK_FG)
        legend = ax.get_legend()
        if legend is not None:
            legend.get_frame().set_facecolor(DARK_BG)
            legend.get_frame().set_edgecolor("#8a8d93")
            for text in legend.get_texts():
                text.set_color(DARK_FG)
    for text in fig.texts:
        text.set_color(DARK_FG)
    return fig


def layer_array(layer: Any) -> Any:
    """A layer's level-0 data (multiscale layers hold a list of levels)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def default_threshold(metadata: dict[str, Any] | None) -> float:
    """The threshold stored with a prediction layer (``threshold`` in its metadata), else 0.5."""
    t = (metadata or {}).get("threshold")
    try:
        t = float(t)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.5
    return t if 0.0 <= t <= 1.0 else 0.5


def evaluate_arrays(
    prediction: Any,
    truth: Any,
    threshold: float = 0.5,
    min_size: int = 100,
    voxel_size: Any = None,
) -> dict[str, Any]:
    """:func:`bbem.metrics.evaluate` on in-memory arrays (dask is computed first)."""
    from bbem.metrics import evaluate

    pred = np.asarray(prediction)
    true = np.asarray(truth)
    if pred.ndim != 3 or true.ndim != 3:
        raise UserError(
            f"evaluate needs 3D (z, y, x) layers: prediction is {pred.ndim}D, truth {true.ndim}D"
        )
    vs = None if voxel_size is None else tuple(float(v) for v in voxel_size)
    return evaluate(
        pred, true, threshold=threshold, min_size=int(min_size), voxel_size=vs, iou_thresholds=IOUS
    )


def f1_at_threshold(result: dict[str, Any]) -> float:
    """Voxel F1 at the evaluated threshold, from ``voxel["counts_at_threshold"]``."""
    c = result["voxel"]["counts_at_threshold"]
    d = 2 * c["tp"] + c["fp"] + c["fn"]
    return 2 * c["tp"] / d if d else 0.0


def summary_rows(result: dict[str, Any]) -> list[tuple[str, float | None]]:
    """The headline numbers as ``(name, value)``: voxel PR-AUC, best F1, F1 at the threshold,
    object F1 at IoU 0.2 / 0.5, CREMI ADGT, ADF (nm), score and F-score (None: undefined)."""
    v, o, c = result["voxel"], result["object"], result["cremi"]
    t = v["counts_at_threshold"]["threshold"]
    rows: list[tuple[str, float | None]] = [
        ("voxel PR-AUC", v["pr_auc"]),
        (f"voxel best F1 (t={v['threshold_best']:.2f})", v["f1_best"]),
        (f"voxel F1 at t={t:.2f}", f1_at_threshold(result)),
    ]
    rows += [(f"object F1, IoU > {i:g}", o[f"iou_{i:g}"]["f1"]) for i in IOUS]
    rows += [
        ("CREMI ADGT (nm)", c.get("adgt_mean")),
        ("CREMI ADF (nm)", c.get("adf_mean")),
        ("CREMI score (nm)", c.get("score")),
        ("CREMI F-score", c.get("fscore")),
    ]
    return rows


def fmt(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.4g}"


#: :func:`bbem.metrics.plot.draw_pr_curve`'s colours on napari's dark theme
DARK_PR = {
    "iso": "#5a5d63",
    "iso_text": "#8a8d93",
    "curve": "#4fc3f7",
    "best": "#ff7043",
    "marked": "#aed581",
}


def plot_pr(fig: Figure, result: dict[str, Any], title: str = "") -> Figure:
    """The voxel PR curve of ``result`` into ``fig`` (cleared), with the best-F1 point and the
    point at the evaluated threshold; dark-themed."""
    from bbem.metrics.plot import draw_pr_curve

    fig.clear()
    ax = fig.add_subplot()
    v = result["voxel"]
    draw_pr_curve(ax, v["curve"], float(v["counts_at_threshold"]["threshold"]), colors=DARK_PR)
    ax.set_title(title or "voxel precision-recall", fontsize=9)
    ax.grid(alpha=0.25)
    ax.legend(loc="lower left", fontsize=7)
    return dark(fig)


def mismatches(
    prediction: Any,
    truth: Any,
    threshold: float = 0.5,
    min_size: int = 100,
    iou: float = 0.5,
    connectivity: int = 26,
) -> tuple[np.ndarray, np.ndarray]:
    """``(missed, spurious)`` label volumes: truth objects without a match (their truth ids) and
    predicted objects (components of at least ``min_size`` voxels at ``threshold``) without a
    match, one-to-one at IoU > ``iou``, as :func:`bbem.metrics.evaluate` counts them."""
    import cc3d

    from bbem.metrics import as_levels, binarize, cleft_mask, match

    pred = np.asarray(prediction)
    true = np.asarray(truth)
    if pred.shape != true.shape:
        raise UserError(f"prediction shape {pred.shape} and truth shape {true.shape} disagree")
    pb = binarize(as_levels(pred), threshold)
    # cc3d's stub takes a Literal connectivity; ours is an int (as in bbem.metrics.objects)
    p_ids = cc3d.connected_components(  # type: ignore[call-overload]
        pb, connectivity=connectivity, out_dtype=np.uint32
    )
    p_sizes = np.bincount(p_ids.ravel())
    small = np.flatnonzero(p_sizes < min_size)
    p_ids[np.isin(p_ids, small[small > 0])] = 0
    tb = cleft_mask(true)
    ids = np.unique(true[tb]) if true.dtype.kind in "iu" else np.array([])
    if ids.size > 1:  # instances are the labels (evaluate's "auto")
        t_ids = np.where(tb, true, 0).astype(np.int64)
    else:  # one id (or a mask): instances are connected components
        t_ids = cc3d.connected_components(  # type: ignore[call-overload]
            tb, connectivity=connectivity
        ).astype(np.int64)
    both = (p_ids > 0) & (t_ids > 0)
    pairs, counts = np.unique(np.stack([p_ids[both], t_ids[both]]), axis=1, return_counts=True)
    t_keys, t_counts = np.unique(t_ids[t_ids > 0], return_counts=True)
    t_size = dict(zip(t_keys.tolist(), t_counts.tolist(), strict=True))
    cand = []
    for (a, b), n in zip(pairs.T.tolist(), counts.tolist(), strict=True):
        score = n / (p_sizes[a] + t_size[b] - n)
        if score > iou:
            cand.append((a, b, float(score)))
    matched = match(cand)
    hit_p = np.array([m[0] for m in matched], dtype=np.int64)
    hit_t = np.array([m[1] for m in matched], dtype=np.int64)
    missed = np.where(np.isin(t_ids, hit_t, invert=True), t_ids, 0)
    spurious = np.where(np.isin(p_ids, hit_p, invert=True), p_ids, 0).astype(np.int64)
    return missed, spurious


def n_objects(labels: np.ndarray) -> int:
    """Distinct nonzero ids."""
    return int(np.unique(labels[labels > 0]).size)
