"""PR-curve figure, shared by ``bbem evaluate --plot`` and ``bbem report``.

Uses matplotlib's object API with the Agg canvas, never pyplot, so it neither needs a display nor
changes the backend of a host application (napari).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bbem.atomic import atomic_output
from bbem.metrics.threshold import threshold_level


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG atomically (temporary name, then rename)."""
    FigureCanvasAgg(fig)
    with atomic_output(path, overwrite=True, kind="png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


#: colours of :func:`draw_pr_curve` on a white background; napari's dark theme passes its own
LIGHT = {"iso": "0.85", "iso_text": "0.6", "curve": "C0", "best": "C3", "marked": "C2"}


def draw_pr_curve(
    ax: Any,
    curve: Mapping[str, Sequence[float]],
    marked: float = 0.5,
    others: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    colors: Mapping[str, str] = LIGHT,
) -> None:
    """Draw a PR curve (``{"precision", "recall", "thresholds"}`` in sklearn's order, as
    :meth:`bbem.metrics.PRHistogram.result` gives) into ``ax``, with iso-F1 lines, the best-F1
    point and the point at threshold ``marked`` (by the one threshold rule). ``others``: more
    curves by label, drawn thinner."""
    for f in (0.2, 0.4, 0.6, 0.8):
        r = np.linspace(f / (2 - f) + 1e-9, 1, 100)
        ax.plot(r, f * r / (2 * r - f), color=colors["iso"], lw=0.8, zorder=0)
        ax.annotate(
            f"F1={f:g}",
            xy=(0.92, f * 0.92 / (2 * 0.92 - f) + 0.01),
            color=colors["iso_text"],
            fontsize=7,
        )
    for label, c in (others or {}).items():
        ax.plot(c["recall"], c["precision"], lw=1, drawstyle="steps-post", label=label)
    p = np.asarray(curve["precision"], dtype=float)
    r = np.asarray(curve["recall"], dtype=float)
    t = np.asarray(curve["thresholds"], dtype=float)
    ap = float(-np.sum(np.diff(r) * p[:-1])) if len(r) > 1 else 0.0
    ax.plot(r, p, lw=2, color=colors["curve"], drawstyle="steps-post", label=f"PR-AUC {ap:.3f}")
    if len(t):
        s = p[:-1] + r[:-1]
        f1 = np.divide(2 * p[:-1] * r[:-1], s, out=np.zeros_like(s), where=s > 0)
        b = int(np.argmax(f1))
        ax.plot(r[b], p[b], "o", color=colors["best"], label=f"best F1 {f1[b]:.3f} at t={t[b]:.2f}")
        at = np.flatnonzero(np.rint(t * 255) >= threshold_level(marked))
        if at.size:
            i = int(at[0])
            label = f"t={marked:.2f}: F1 {f1[i]:.3f}" if i < len(f1) else f"t={marked:.2f}"
            ax.plot(r[i], p[i], "s", color=colors["marked"], mfc="none", ms=7, label=label)
    ax.set(xlim=(0, 1.01), ylim=(0, 1.01), xlabel="recall", ylabel="precision")


def plot_pr_curve(
    curve: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    title: str = "Precision-recall",
    others: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
) -> Path:
    """:func:`draw_pr_curve` (marking t = 0.5) with ``title``, written to a PNG."""
    fig = Figure(figsize=(5.6, 5.0), layout="constrained")
    ax = fig.add_subplot()
    draw_pr_curve(ax, curve, 0.5, others)
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return save_figure(fig, path)
