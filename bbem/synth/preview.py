"""``bbem synth``: write a synthetic volume, with a PNG preview of its busiest sections."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bbem.atomic import atomic_output, check_not_input, check_output, output_lock
from bbem.errors import UserError
from bbem.progress import progress_bar
from bbem.synth.constants import DEFAULT_SHAPE
from bbem.synth.volume import make_synthetic, write_container


def preview_png(
    raw: np.ndarray,
    clefts: np.ndarray,
    path: str | os.PathLike,
    n: int = 4,
    overwrite: bool = False,
    title: str = "",
) -> Path:
    """A PNG montage of ``n`` sections (those with the most cleft voxels first), clefts outlined.

    ``raw`` and ``clefts`` are ``[Z, Y, X]``; written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = (clefts > 0).sum((1, 2))
    blank = raw.reshape(raw.shape[0], -1).std(1) < 8  # missing sections say little
    order = np.lexsort((-per, blank))
    zs = sorted(int(z) for z in order[: min(n, raw.shape[0])])
    cols = min(len(zs), 2 if len(zs) == 4 else len(zs))
    rows = math.ceil(len(zs) / cols)
    aspect = raw.shape[1] / raw.shape[2]
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 5 * rows * aspect + 0.4), squeeze=False)
    # the grid may have more panels than sections: the spare ones are blanked below
    for ax, z in zip(axes.ravel(), zs, strict=False):
        ax.imshow(raw[z], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        if per[z]:
            ax.contour(clefts[z] > 0, [0.5], colors="red", linewidths=0.8)
        ax.set_title(
            f"z = {z}: {len(np.unique(clefts[z])) - (0 in clefts[z])} cleft(s)", fontsize=9
        )
        ax.set_axis_off()
    for ax in axes.ravel()[len(zs) :]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_output(path, overwrite, kind="png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def synth_from_cli(
    output: str,
    shape: Sequence[int] = DEFAULT_SHAPE,
    seed: int = 0,
    preview: str | None = None,
    overwrite: bool = False,
) -> None:
    """``bbem synth OUTPUT [--shape z,y,x] [--seed N] [--preview PNG] [--overwrite]``."""
    from rich.console import Console

    check_output(output, overwrite)
    if preview is not None:
        if Path(preview).suffix.lower() != ".png":
            raise UserError(f"--preview must name a .png file, got {preview}")
        check_output(preview, overwrite, kind="png")
        check_not_input(preview, [output])  # the volume's rename would take the preview along
    with output_lock(output), progress_bar(counted=False, transient=True) as bar:
        task = bar.add_task(f"synthesising {'x'.join(map(str, shape))} (seed {seed})", total=None)
        vol = make_synthetic(shape, seed)
        bar.update(task, description=f"writing {output}")
        write_container(output, vol, overwrite)
        if preview is not None:
            bar.update(task, description=f"writing {preview}")
            preview_png(
                vol["raw"],
                vol["clefts"],
                preview,
                overwrite=overwrite,
                title=f"bbem synth seed {seed}: clefts outlined in red",
            )
    info = vol["info"]
    Console().print(
        f"wrote {output}: {'x'.join(map(str, shape))} at "
        f"{'x'.join(f'{v:g}' for v in vol['voxel_size'])} nm, {info['synapses']} clefts "
        f"({100 * info['cleft_fraction']:.2f}% of voxels), {info['lookalike_contacts']} look-alike "
        f"contacts" + (f"; preview {preview}" if preview else "")
    )
