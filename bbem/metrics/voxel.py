"""Voxel-level measures: the exact PR curve of uint8 probabilities from two 256-bin histograms.

Predictions are stored as uint8 levels ``round(255 p)``, so a volume has at most 256 distinct
scores; counting positives and negatives per level is enough to rebuild the whole PR curve
exactly, block by block, in constant memory. Threshold semantics everywhere in bbem (the one
rule, :mod:`bbem.metrics.threshold`): a voxel is predicted positive at threshold ``t`` when its
level is ``>= threshold_level(t)``, the smallest level L with L/255 >= t; 0.5 is level 128.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bbem.errors import UserError
from bbem.metrics.threshold import threshold_level

#: CREMI marks background in uint64 label volumes with the largest uint64.
CREMI_BACKGROUND = np.iinfo(np.uint64).max
LEVELS = 256


def to_uint8(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] (float, any shape) -> uint8 levels ``rint(255 p)``, same shape.

    The one conversion bbem uses (training validation, inference writing, evaluation). Values
    a rounding error outside [0, 1] are clipped; NaN, or values clearly outside (logits?), are a
    :class:`UserError` rather than a silently wrong level.
    """
    p = np.asarray(prob)
    if not np.issubdtype(p.dtype, np.floating):
        raise UserError(f"to_uint8 expects float probabilities in [0, 1], got dtype {p.dtype}")
    if p.size:
        lo, hi = float(p.min()), float(p.max())
        if np.isnan(lo) or np.isnan(hi):
            raise UserError("prediction contains NaN: the model or the file is broken")
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise UserError(
                f"float prediction must hold probabilities in [0, 1], found values in "
                f"[{lo:.4g}, {hi:.4g}]: apply a sigmoid to logits, or store uint8 levels 0-255"
            )
    # float32 keeps 255*p exact enough (levels are 1/255 apart) and halves the temporary
    t = np.array(np.multiply(p, 255, dtype=np.float64 if p.dtype == np.float64 else np.float32))
    np.clip(t, 0, 255, out=t)
    np.rint(t, out=t)
    return t.astype(np.uint8)


#: what a prediction must be, for error messages
PREDICTION_DTYPES = (
    "a prediction must be uint8 levels in [0, 255] (round(255 p), as bbem infer writes) or "
    "float probabilities in [0, 1]"
)


def check_prediction_dtype(dtype: Any, name: str = "prediction") -> None:
    """Refuse a dtype that is no probability map: only uint8, float and bool are.

    Other integers are refused whatever their values: an int16 or uint16 volume is raw
    intensities or labels far more often than levels, and reading it as levels is silently wrong.
    """
    dt = np.dtype(dtype)
    if dt == np.uint8 or dt.kind in "bf":
        return
    raise UserError(
        f"{name} is {dt}: {PREDICTION_DTYPES}; is it raw intensities or labels rather than "
        "a prediction?"
    )


def as_levels(pred: np.ndarray) -> np.ndarray:
    """A prediction block as uint8 levels: uint8 as is, floats checked to lie in [0, 1] then
    :func:`to_uint8`, bool as 0 / 255; any other dtype is a :class:`UserError`."""
    p = np.asarray(pred)
    check_prediction_dtype(p.dtype)
    if p.dtype == np.uint8:
        return p
    if p.dtype == bool:
        return p.astype(np.uint8) * np.uint8(255)
    return to_uint8(p)


def cleft_mask(labels: np.ndarray) -> np.ndarray:
    """Cleft voxels of a label block: nonzero, and (uint64) not CREMI's background 2**64-1."""
    t = np.asarray(labels)
    if t.dtype == bool:
        return t
    b = t != 0
    if t.dtype == np.uint64:
        b &= t != CREMI_BACKGROUND
    return b


class PRHistogram:
    """Counts of positive and negative voxels per uint8 level; mergeable, so it runs block-wise.

    ``update`` blocks of any shape, ``merge`` partial histograms (e.g. from Dask workers),
    ``result`` the exact PR curve and its summaries.
    """

    def __init__(self) -> None:
        self.pos = np.zeros(LEVELS, dtype=np.int64)
        self.neg = np.zeros(LEVELS, dtype=np.int64)

    def update(
        self, prob_u8: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None
    ) -> PRHistogram:
        """Add a block: ``prob_u8`` uint8 levels, ``truth`` cleft voxels (bool, or labels where
        nonzero is cleft), ``mask`` voxels to score (None: all); all the same shape."""
        p = np.asarray(prob_u8)
        if p.dtype != np.uint8:
            raise UserError(
                f"PRHistogram.update needs uint8 levels, got {p.dtype}: convert with to_uint8"
            )
        t = cleft_mask(truth)
        if t.shape != p.shape or (mask is not None and np.shape(mask) != p.shape):
            shapes = [p.shape, t.shape] + ([np.shape(mask)] if mask is not None else [])
            raise UserError(f"prediction, truth and mask shapes disagree: {shapes}")
        # all scored voxels, then the (few) cleft voxels: negatives are the difference
        if mask is None:
            total = _bincount_u8(p)
            pos = _bincount_u8(p[t])
        else:
            m = np.asarray(mask, dtype=bool)
            total = _bincount_u8(p[m])
            pos = _bincount_u8(p[t & m])
        self.pos += pos
        self.neg += total - pos
        return self

    def merge(self, other: PRHistogram) -> PRHistogram:
        """Add another histogram's counts into this one."""
        self.pos += other.pos
        self.neg += other.neg
        return self

    @property
    def n_voxels(self) -> int:
        return int(self.pos.sum() + self.neg.sum())

    @property
    def n_positive(self) -> int:
        return int(self.pos.sum())

    def counts_at(self, level: int) -> dict[str, int]:
        """Confusion counts when voxels with level ``>= level`` are predicted positive."""
        tp = int(self.pos[level:].sum())
        fp = int(self.neg[level:].sum())
        return {"tp": tp, "fp": fp, "fn": self.n_positive - tp, "tn": int(self.neg[:level].sum())}

    def result(self) -> dict[str, Any]:
        """PR-AUC (= sklearn's ``average_precision_score``), best F1 and its threshold (a level
        L as L/255, so ``threshold_level`` of it is L again), F1, precision and recall at 0.5
        (level 128), and the curve in sklearn's order.

        Defined edge cases, as sklearn: no positive voxel gives recall 1 at every threshold and
        PR-AUC 0; precision and recall with an empty denominator are 0. ``n_positive`` says so.
        """
        n = self.n_voxels
        if n == 0:
            raise UserError("no voxel was scored: the mask and margin leave nothing to evaluate")
        n_pos = self.n_positive
        levels = np.flatnonzero(self.pos + self.neg)  # distinct scores, ascending
        tp_at = np.cumsum(self.pos[::-1])[::-1][levels].astype(np.float64)
        fp_at = np.cumsum(self.neg[::-1])[::-1][levels].astype(np.float64)
        precision = tp_at / (tp_at + fp_at)  # never 0/0: every level holds a voxel
        recall = tp_at / n_pos if n_pos else np.ones_like(tp_at)
        # sklearn's curve: thresholds ascending, then the (recall 0, precision 1) end point
        prec_c = np.r_[precision, 1.0]
        rec_c = np.r_[recall, 0.0]
        # + 0.0: with no positive voxel the sum is -0.0, which tables print as "-0"
        ap = float(-np.sum(np.diff(rec_c) * prec_c[:-1])) + 0.0
        f1 = _f1(precision, recall) if n_pos else np.zeros_like(precision)
        best = int(np.argmax(f1))
        c05 = self.counts_at(threshold_level(0.5))
        p05, r05 = _safe_div(c05["tp"], c05["tp"] + c05["fp"]), _safe_div(c05["tp"], n_pos)
        return {
            "pr_auc": ap,
            "f1_best": float(f1[best]),
            "threshold_best": float(levels[best] / 255),
            "level_best": int(levels[best]),
            "precision_best": float(precision[best]),
            "recall_best": float(recall[best]) if n_pos else 0.0,
            "f1_05": float(_f1(np.float64(p05), np.float64(r05))),
            "precision_05": p05,
            "recall_05": r05,
            "counts_05": c05,
            "n_voxels": n,
            "n_positive": n_pos,
            "positive_fraction": n_pos / n,
            "curve": {
                "precision": prec_c.tolist(),
                "recall": rec_c.tolist(),
                "thresholds": (levels / 255).tolist(),
            },
        }


def voxel_metrics(
    prob: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None
) -> dict[str, Any]:
    """:meth:`PRHistogram.result` of in-memory arrays (any equal shapes, e.g. z, y, x).

    ``prob``: float probabilities in [0, 1] or uint8 levels; ``truth``: bool or labels
    (nonzero, and not CREMI's 2**64-1, is cleft); ``mask``: voxels to score.
    """
    p, t = np.asarray(prob), np.asarray(truth)
    if p.shape != t.shape:
        raise UserError(f"prediction shape {p.shape} and truth shape {t.shape} disagree")
    return PRHistogram().update(as_levels(p), t, mask).result()


def _bincount_u8(x: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """Counts of each uint8 level; in cache-sized pieces, since bincount first copies its input
    to intp (8x the bytes): ~8x faster than one call on a 16 M-voxel slab."""
    flat = np.ravel(x)
    out = np.zeros(LEVELS, dtype=np.int64)
    for s in range(0, flat.size, chunk):
        out += np.bincount(flat[s : s + chunk], minlength=LEVELS)
    return out


def _safe_div(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def _f1(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    s = p + r
    return np.divide(2 * p * r, s, out=np.zeros_like(s, dtype=np.float64), where=s > 0)
