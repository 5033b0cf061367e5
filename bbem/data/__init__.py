"""Training data: patch sources, cleft-seeking sampling, and the MONAI augmentations.

- :mod:`bbem.data.sources`: the volumes a config names (making missing synthetic ones), as
  :class:`PatchSource` with their cleft coordinates; validation volumes in memory.
- :mod:`bbem.data.sampling`: patch boxes, the endless patch stream, batches.
- :mod:`bbem.data.augment`: the augmentations, EM section defects included.

Every array is ordered z, y, x; patches are ``{"image", "label"}`` float32 ``[1, Z, Y, X]``.
"""

from bbem.data.augment import (
    KEYS,
    RandElasticYXd,
    RandMisalignedSectiond,
    RandMissingSectiond,
    RandMotionBlurd,
    build_augment,
    line_kernel,
)
from bbem.data.sampling import PatchDataset, PatchSampler, batches, make_dataset, make_loader
from bbem.data.sources import (
    MAX_CLEFT_COORDS,
    PatchSource,
    YXCrop,
    auto_pos_weight,
    cleft_fraction,
    crop_yx,
    ensure_volumes,
    load_val_volumes,
    open_source,
    open_sources,
    reopen_for_worker,
    source_from_arrays,
    volume_path,
)

__all__ = [
    "KEYS",
    "MAX_CLEFT_COORDS",
    "PatchDataset",
    "PatchSampler",
    "PatchSource",
    "RandElasticYXd",
    "RandMisalignedSectiond",
    "RandMissingSectiond",
    "RandMotionBlurd",
    "YXCrop",
    "auto_pos_weight",
    "batches",
    "build_augment",
    "cleft_fraction",
    "crop_yx",
    "ensure_volumes",
    "line_kernel",
    "load_val_volumes",
    "make_dataset",
    "make_loader",
    "open_source",
    "open_sources",
    "reopen_for_worker",
    "source_from_arrays",
    "volume_path",
]
