"""Is a cleft prediction short on finding synapses, or on placing the thin cleft inside them?

Voxel PR-AUC mixes two skills. On labels a few voxels thick (CREMI-style cleft sheets) a
detector can find every synapse and still score low, because it paints the whole dark
synaptic density instead of the sheet at its edge. This splits the score:

- **detection**: average precision of the prediction, max-filtered over ``--radius`` pixels
  in-plane, against the band of that radius around the labelled clefts, leaving out the ring
  between one and two radii (did it fire near the synapses, and not elsewhere? A thin cleft
  and a painted band both count as found);
- **localisation**: average precision of the raw prediction against the labels, counting only
  the voxels inside that band (given it is near a synapse, is it on the cleft?); the chance
  level of each (its positive fraction) is printed beside it.

Average precision is scikit-learn's ``average_precision_score``, as in the tests' oracle.

    .venv/bin/python bench/localisation.py data/demo/val.zarr runs/demo/val_prediction.zarr \
        [more predictions ...] --radius 6 --png split.png --names "U-Net,forest"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np


def split_scores(pred: np.ndarray, clefts: np.ndarray, radius: int = 6) -> dict[str, Any]:
    """Voxel AP, detection AP and localisation AP of ``pred`` against ``clefts`` (both
    ``[Z, Y, X]``; ``pred`` any scores, ``clefts`` non-zero on cleft voxels)."""
    from scipy import ndimage as ndi
    from sklearn.metrics import average_precision_score

    truth = np.asarray(clefts) != 0
    p = np.asarray(pred, np.float32)
    size = (1, 2 * radius + 1, 2 * radius + 1)
    band = ndi.binary_dilation(truth, np.ones(size, bool))
    # the max filter widens a painted band by one radius: that ring is neither hit nor miss
    outer = ndi.binary_dilation(truth, np.ones((1, 4 * radius + 1, 4 * radius + 1), bool))
    care = band | ~outer
    near = ndi.maximum_filter(p, size=size)
    return {
        "pr_auc": float(average_precision_score(truth.ravel(), p.ravel())),
        "detection": float(average_precision_score(band[care], near[care])),
        "detection_chance": float(band[care].mean()),
        "localisation": float(average_precision_score(truth[band], p[band])),
        "localisation_chance": float(truth[band].mean()),
        "radius": radius,
    }


def plot(raw: np.ndarray, clefts: np.ndarray, preds: dict[str, np.ndarray], path: str) -> None:
    """The section with the most cleft voxels: the image with the clefts outlined, then each
    prediction (0-1 colour scale) with the same outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = int(np.argmax((clefts != 0).sum((1, 2))))
    n = 1 + len(preds)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.4))
    panels: list[tuple[str, np.ndarray, str, tuple[int, int] | None]] = [
        ("image, clefts outlined", raw[z], "gray", None)
    ]
    panels += [(name, p[z], "magma", (0, 1)) for name, p in preds.items()]
    for ax, (title, img, cmap, lim) in zip(axes, panels, strict=True):
        ax.imshow(img, cmap=cmap, vmin=lim[0] if lim else None, vmax=lim[1] if lim else None)
        ax.contour(clefts[z] != 0, levels=[0.5], colors="cyan", linewidths=0.6)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"section {z}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("truth", help="a container holding volumes/labels/clefts")
    ap.add_argument("predictions", nargs="+", help="probability volumes (zarr, tiff, ...)")
    ap.add_argument("--radius", type=int, default=6, help="band half-width, in-plane pixels")
    ap.add_argument("--png", default=None, help="also draw the busiest section of each")
    ap.add_argument("--names", default=None, help="comma-separated panel titles for --png")
    a = ap.parse_args(argv)
    from bbem.volumes import open_volume

    clefts = open_volume(a.truth, "volumes/labels/clefts")[:]
    preds: dict[str, np.ndarray] = {}
    print(f"| prediction | PR-AUC | detection (chance) | localisation (chance), r={a.radius} px |")
    print("|---|---|---|---|")
    names = a.names.split(",") if a.names else a.predictions
    for name, path in zip(names, a.predictions, strict=True):
        p = open_volume(path)
        pred = p[:].astype(np.float32) / (255.0 if p.dtype == np.uint8 else 1.0)
        preds[name] = pred
        s = split_scores(pred, clefts, a.radius)
        print(
            f"| {name} | {s['pr_auc']:.3f} | {s['detection']:.3f} ({s['detection_chance']:.3f})"
            f" | {s['localisation']:.3f} ({s['localisation_chance']:.3f}) |"
        )
    if a.png:
        plot(open_volume(a.truth, "volumes/raw")[:], clefts, preds, a.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
