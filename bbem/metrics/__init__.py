"""Evaluation of cleft predictions: voxel PR-AUC and F1, object F1, CREMI cleft distances.

Everything streams over volumes of any size::

    from bbem.metrics import evaluate, voxel_metrics, PRHistogram, to_uint8, binarize
    result = evaluate(open_volume("pred.zarr"), open_volume("sample.hdf:volumes/labels/clefts"))
    result["voxel"]["pr_auc"], result["object"]["iou_0.5"]["f1"], result["cremi"]["score"]
"""

from bbem.metrics.cremi import CremiDistances
from bbem.metrics.evaluate import evaluate, evaluate_from_cli, print_table, write_json
from bbem.metrics.objects import Objects, Overlaps, label_objects, match, object_metrics
from bbem.metrics.plot import plot_pr_curve, save_figure
from bbem.metrics.threshold import binarize, threshold_level
from bbem.metrics.voxel import (
    CREMI_BACKGROUND,
    PRHistogram,
    as_levels,
    cleft_mask,
    to_uint8,
    voxel_metrics,
)

__all__ = [
    "CREMI_BACKGROUND",
    "CremiDistances",
    "Objects",
    "Overlaps",
    "PRHistogram",
    "as_levels",
    "binarize",
    "cleft_mask",
    "evaluate",
    "evaluate_from_cli",
    "label_objects",
    "match",
    "object_metrics",
    "plot_pr_curve",
    "print_table",
    "save_figure",
    "threshold_level",
    "to_uint8",
    "voxel_metrics",
    "write_json",
]
