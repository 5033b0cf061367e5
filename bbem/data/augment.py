"""The training augmentations: MONAI dictionary transforms, and EM section defects.

EM is anisotropic (~4 x 4 x 40 nm), so rotations, transposes and elastic warps act only in the
y-x plane. Every transform takes ``{"image", "label"}`` tensors ``[C, Z, Y, X]`` and keeps
their shapes; :func:`build_augment` composes them as the ``augment`` config section says.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    Rand2DElasticd,
    RandFlipd,
    RandGaussianNoised,
    RandomizableTransform,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

from bbem.config import AugmentConfig

#: The keys of a patch dict.
KEYS = ("image", "label")


def _section_count(d: Mapping[Hashable, Any], keys: Sequence[Hashable]) -> int:
    for k in keys:
        if k in d:
            return int(d[k].shape[1])
    raise KeyError(f"none of {list(keys)} in the data")


class RandMissingSectiond(RandomizableTransform, MapTransform):
    """Replace one whole z-section of ``keys`` (images ``[C, Z, Y, X]``) by ``fill``.

    Models sections lost in cutting or imaging; labels are left alone (the cleft is still there,
    the network must infer it from the neighbouring sections).
    """

    def __init__(
        self,
        keys: Sequence[Hashable] = ("image",),
        prob: float = 0.1,
        fill: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.fill = float(fill)
        self.z = 0

    def randomize(self, n_sections: int) -> None:
        super().randomize(None)
        self.z = int(self.R.randint(n_sections))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(_section_count(d, self.keys))
        if not self._do_transform:
            return d
        for k in self.key_iterator(d):
            img = torch.as_tensor(d[k]).clone()
            img[:, self.z] = self.fill
            d[k] = img
        return d


class RandMisalignedSectiond(RandomizableTransform, MapTransform):
    """Shift sections in y-x by up to ``max_shift`` px, consistently in image and label.

    Two CREMI-style modes, chosen at random: ``translation`` shifts every section from a random
    z onward (a registration jump), ``slip`` shifts one section only. Shapes ``[C, Z, Y, X]`` are
    kept; the uncovered border repeats the edge pixels, in image and label alike, so the two
    still agree there.
    """

    def __init__(
        self,
        keys: Sequence[Hashable] = KEYS,
        prob: float = 0.1,
        max_shift: int = 8,
        slip_prob: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.max_shift = int(max_shift)
        self.slip_prob = float(slip_prob)
        self.z0, self.z1, self.shift = 1, 2, (0, 0)

    def randomize(self, n_sections: int) -> None:
        super().randomize(None)
        if n_sections < 2:
            self._do_transform = False
            return
        dy, dx = 0, 0
        while (dy, dx) == (0, 0):
            dy, dx = (int(s) for s in self.R.randint(-self.max_shift, self.max_shift + 1, 2))
        self.shift = (dy, dx)
        if self.R.rand() < self.slip_prob:
            self.z0 = int(self.R.randint(n_sections))
            self.z1 = self.z0 + 1
        else:
            self.z0 = int(self.R.randint(1, n_sections))
            self.z1 = n_sections

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(_section_count(d, self.keys))
        if not self._do_transform:
            return d
        for k in self.key_iterator(d):
            img = torch.as_tensor(d[k]).clone()
            part = img[:, self.z0 : self.z1]
            img[:, self.z0 : self.z1] = _shift_yx(part, self.shift)
            d[k] = img
        return d


def _shift_yx(a: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    """Shift ``[..., Y, X]`` by whole pixels; the uncovered border repeats the edge."""
    dy, dx = shift
    y, x = a.shape[-2:]
    # pad (x-left, x-right, y-top, y-bottom) on the side the content moves away from
    pad = (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0))
    flat = a.reshape(-1, 1, y, x).float()
    padded = F.pad(flat, pad, mode="replicate")
    oy, ox = max(-dy, 0), max(-dx, 0)
    out = padded[..., oy : oy + y, ox : ox + x]
    return out.reshape(a.shape).to(a.dtype)


class RandMotionBlurd(RandomizableTransform, MapTransform):
    """Blur one z-section of ``keys`` (``[C, Z, Y, X]``) along a random in-plane direction.

    A normalised line kernel of odd length in ``[3, max_kernel]`` at a uniform angle: the smear
    of a stage moving during exposure. Labels are not touched.
    """

    def __init__(
        self,
        keys: Sequence[Hashable] = ("image",),
        prob: float = 0.1,
        max_kernel: int = 9,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.max_kernel = max(3, int(max_kernel))
        self.z, self.kernel = 0, line_kernel(3, 0.0)

    def randomize(self, n_sections: int) -> None:
        super().randomize(None)
        self.z = int(self.R.randint(n_sections))
        size = 2 * int(self.R.randint(1, (self.max_kernel - 1) // 2 + 1)) + 1
        self.kernel = line_kernel(size, float(self.R.uniform(0.0, np.pi)))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(_section_count(d, self.keys))
        if not self._do_transform:
            return d
        k = torch.from_numpy(self.kernel)[None, None]
        r = k.shape[-1] // 2
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key]).clone()
            sec = img[:, self.z].float()[:, None]  # [C, 1, Y, X]
            mode = "reflect" if min(sec.shape[-2:]) > r else "replicate"
            blurred = F.conv2d(F.pad(sec, (r, r, r, r), mode=mode), k.to(sec.dtype))
            img[:, self.z] = blurred[:, 0].to(img.dtype)
            d[key] = img
        return d


def line_kernel(size: int, angle: float) -> np.ndarray:
    """A ``[size, size]`` float32 kernel summing to 1: a line through the centre at ``angle``
    (radians from the x axis), anti-aliased by sampling it densely."""
    c = (size - 1) / 2
    t = np.linspace(-c, c, 8 * size)
    ys, xs = c + t * np.sin(angle), c + t * np.cos(angle)
    k = np.zeros((size, size), np.float64)
    # bilinear splat of the sample points
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = ys - y0, xs - x0
    for oy, ox, w in (
        (0, 0, (1 - fy) * (1 - fx)),
        (1, 0, fy * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 1, fy * fx),
    ):
        yy, xx = np.clip(y0 + oy, 0, size - 1), np.clip(x0 + ox, 0, size - 1)
        np.add.at(k, (yy, xx), w)
    return (k / k.sum()).astype(np.float32)


class RandElasticYXd(RandomizableTransform, MapTransform):
    """In-plane elastic deformation and rotation of ``[C, Z, Y, X]`` images, the same in every
    section (EM sections are cut, not warped, along z).

    Wraps MONAI's ``Rand2DElasticd`` by treating the z sections as channels: images are
    resampled bilinearly, labels (``label_keys``) by nearest neighbour.
    """

    def __init__(
        self,
        keys: Sequence[Hashable] = KEYS,
        prob: float = 0.1,
        spacing: int = 48,
        magnitude: tuple[float, float] = (0.0, 4.0),
        rotate_degrees: float = 15.0,
        label_keys: Sequence[Hashable] = ("label",),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        keys = tuple(keys)
        self._inner = Rand2DElasticd(
            keys=keys,
            spacing=(spacing, spacing),
            magnitude_range=magnitude,
            prob=1.0,
            rotate_range=(math.radians(rotate_degrees),),
            mode=tuple("nearest" if k in label_keys else "bilinear" for k in keys),
            padding_mode="reflection",
            allow_missing_keys=allow_missing_keys,
        )

    def set_random_state(self, seed: int | None = None, state: Any = None) -> RandElasticYXd:
        super().set_random_state(seed, state)
        self._inner.set_random_state(seed=int(self.R.randint(2**31 - 1)))
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        shapes = {k: torch.as_tensor(d[k]).shape for k in self.key_iterator(d)}
        flat = {k: torch.as_tensor(d[k]).reshape(-1, *shapes[k][-2:]) for k in shapes}
        out = self._inner(flat)
        for k in shapes:
            d[k] = torch.as_tensor(out[k]).reshape(shapes[k])
        return d


def build_augment(aug: AugmentConfig | Mapping[str, Any] | None = None) -> Compose:
    """The training augmentations as a MONAI ``Compose`` of dictionary transforms on
    ``image``/``label`` tensors ``[1, Z, Y, X]``; shapes are preserved.

    Order: geometry (flips in z, y, x; quarter turns in y-x only, since EM z is ~10x coarser;
    optional in-plane elastic), then EM section defects (misalignment of image and label,
    missing section, motion blur), then intensity (scale, shift, Gaussian noise).
    """
    a = aug if isinstance(aug, AugmentConfig) else AugmentConfig(**dict(aug or {}))
    t: list[Any] = [
        EnsureTyped(keys=KEYS, data_type="tensor", dtype=torch.float32, track_meta=False)
    ]
    if not a.enabled:
        return Compose(t)
    if a.flips > 0:
        t += [RandFlipd(keys=KEYS, prob=a.flips, spatial_axis=ax) for ax in (0, 1, 2)]
    if a.rot90 > 0:
        # spatial_axes counts spatial dims of channel-first [C, Z, Y, X]: (1, 2) is the y-x plane
        t.append(RandRotate90d(keys=KEYS, prob=a.rot90, max_k=3, spatial_axes=(1, 2)))
    if a.elastic > 0:
        t.append(
            RandElasticYXd(
                prob=a.elastic,
                spacing=a.elastic_spacing,
                magnitude=a.elastic_magnitude,
                rotate_degrees=a.elastic_rotate,
            )
        )
    if a.misaligned_section > 0:
        t.append(
            RandMisalignedSectiond(prob=a.misaligned_section, max_shift=a.misaligned_max_shift)
        )
    if a.missing_section > 0:
        t.append(RandMissingSectiond(prob=a.missing_section))
    if a.motion_blur > 0:
        t.append(RandMotionBlurd(prob=a.motion_blur, max_kernel=a.motion_blur_kernel))
    if a.intensity > 0:
        t.append(RandScaleIntensityd(keys="image", factors=a.intensity_scale, prob=a.intensity))
        t.append(RandShiftIntensityd(keys="image", offsets=a.intensity_shift, prob=a.intensity))
    if a.noise > 0:
        t.append(RandGaussianNoised(keys="image", prob=a.noise, std=a.noise_std))
    # plain contiguous tensors out (MONAI returns MetaTensors), so batches collate cheaply
    t.append(EnsureTyped(keys=KEYS, data_type="tensor", dtype=torch.float32, track_meta=False))
    return Compose(t)
