"""Geometry of block-wise inference: sliding windows, blocks, and what each block reads.

Why the result does not depend on the block size: the sliding windows sit on one grid anchored
at the volume's origin (step ``roi - halo``, the last window flush with the volume's end, as
MONAI places them over a whole volume). A block reads exactly the span of the global windows
that touch it, and MONAI, run on that span, places its windows on the same global positions.
So every voxel is the Gaussian blend of the same windows, in the same order, as a whole-volume
prediction. ``halo`` is the overlap of neighbouring windows; when the block is a multiple of
the step, the span is the block widened by ``roi - halo`` before it and ``halo`` after it
(clipped to the volume).
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from bbem.errors import UserError

ZYX = tuple[int, int, int]

#: Sliding-window size when the checkpoint's training config names no patch size.
DEFAULT_ROI: ZYX = (16, 128, 128)
#: Target block shape; rounded to a multiple of the window step and capped to the volume.
DEFAULT_BLOCK: ZYX = (32, 256, 256)
#: A halo costing this many times the default's windows per voxel is worth a warning.
HALO_WARN_FACTOR = 4.0


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
        return tuple(r - h for r, h in zip(self.roi, self.halo, strict=True))  # type: ignore[return-value]

    @property
    def grid(self) -> ZYX:
        """Number of blocks along z, y, x."""
        return tuple(math.ceil(s / b) for s, b in zip(self.shape, self.block, strict=True))  # type: ignore[return-value]

    @property
    def n_blocks(self) -> int:
        return math.prod(self.grid)

    @property
    def overlap(self) -> tuple[float, float, float]:
        """MONAI's ``overlap`` argument that gives exactly ``step`` (it takes ``int(roi*(1-o))``).

        Half a voxel below the exact fraction so float rounding can never give ``step - 1``.
        """
        return tuple(max(0.0, (h - 0.5) / r) for r, h in zip(self.roi, self.halo, strict=True))  # type: ignore[return-value]

    def blocks(self) -> Iterator[ZYX]:
        """Block indices in C order."""
        return itertools.product(*(range(g) for g in self.grid))  # type: ignore[return-value]

    def block_box(self, index: Sequence[int]) -> tuple[slice, slice, slice]:
        """The voxels block ``index`` owns (and writes)."""
        return tuple(  # type: ignore[return-value]
            slice(i * b, min((i + 1) * b, s))
            for i, b, s in zip(index, self.block, self.shape, strict=True)
        )

    def block_voxels(self, index: Sequence[int]) -> int:
        """How many voxels block ``index`` owns (a block at the far end may be cut short)."""
        return math.prod(s.stop - s.start for s in self.block_box(index))

    def read_box(self, index: Sequence[int]) -> tuple[slice, slice, slice]:
        """The voxels block ``index`` reads: the span of the global windows that touch it."""
        out = []
        for box, size, roi, step in zip(
            self.block_box(index), self.shape, self.roi, self.step, strict=True
        ):
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
    return t


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
    for r, f in zip(roi3, factor, strict=True):
        if r <= 0 or r % f:
            raise UserError(
                f"sliding-window size {fmt(roi3)} must be a positive multiple of the network's "
                f"downsampling factor {fmt(factor)}: choose e.g. {fmt(_round_up(roi3, factor))}"
            )
    # Cap to the volume; an axis thinner than the factor keeps one factor and MONAI pads it.
    roi3 = cast(
        ZYX, tuple(max(f, min(r, s // f * f)) for r, f, s in zip(roi3, factor, shape3, strict=True))
    )

    halo3 = _as_zyx(halo, "--halo")
    if halo3 is None:
        halo3 = cast(ZYX, tuple(r // 4 for r in roi3))
    elif any(h < 0 or h >= r for h, r in zip(halo3, roi3, strict=True)):
        raise UserError(
            f"--halo {fmt(halo3)} must be smaller than the sliding window {fmt(roi3)} "
            f"along every axis: try --halo {fmt(tuple(r // 4 for r in roi3))}"
        )
    step = tuple(r - h for r, h in zip(roi3, halo3, strict=True))

    block3 = _as_zyx(block, "--block")
    if block3 is None:
        block3 = cast(
            ZYX,
            tuple(
                max(r, round(d / s) * s) for d, s, r in zip(DEFAULT_BLOCK, step, roi3, strict=True)
            ),
        )
    else:
        small = [b < min(r, s) for b, r, s in zip(block3, roi3, shape3, strict=True)]
        if any(small):
            raise UserError(
                f"--block {fmt(block3)} is smaller than the network's field of view (the "
                f"sliding window {fmt(roi3)}): pass --block of at least that, ideally a "
                f"multiple of the window step {fmt(step)}"
            )
    block3 = cast(ZYX, tuple(min(b, s) for b, s in zip(block3, shape3, strict=True)))
    return Plan(shape=shape3, block=block3, halo=halo3, roi=roi3)


def _round_up(a: Sequence[int], f: Sequence[int]) -> ZYX:
    return tuple(max(q, -(-x // q) * q) for x, q in zip(a, f, strict=True))  # type: ignore[return-value]


def fmt(t: Sequence[int]) -> str:
    """``z,y,x`` as the command line writes it."""
    return ",".join(str(int(v)) for v in t)


def halo_cost(plan: Plan) -> float:
    """Windows per voxel of ``plan`` relative to the default halo (a quarter of the window).

    Along an axis longer than the window, a voxel lies in about ``roi / step`` windows; an
    axis the window spans whole has one window whatever the halo.
    """
    cost = 1.0
    for size, r, h in zip(plan.shape, plan.roi, plan.halo, strict=True):
        if size > r:
            cost *= (r - r // 4) / (r - h)
    return cost


def warn_halo_cost(plan: Plan) -> None:
    """One line on stderr when a chosen ``--halo`` makes inference much slower than the default."""
    cost = halo_cost(plan)
    if cost >= HALO_WARN_FACTOR:
        default = tuple(r // 4 for r in plan.roi)
        print(
            f"bbem infer: warning: --halo {fmt(plan.halo)} leaves the sliding windows "
            f"({fmt(plan.roi)}) only {fmt(plan.step)} apart: about {cost:.0f}x the windows "
            f"per voxel of the default --halo {fmt(default)}, so inference takes about "
            f"{cost:.0f}x as long",
            file=sys.stderr,
        )
