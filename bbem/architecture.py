"""The U-Net's default architecture and its downsampling factor: plain data and arithmetic.

No torch here, so the config schema (``bbem.config``) and block planners can check shapes
without loading torch; :mod:`bbem.model` builds the network from the same description.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: The anisotropic default: EM sections are ~10x thicker than pixels, so z is not downsampled in
#: the first two levels.
DEFAULT_MODEL: dict[str, Any] = {
    "name": "unet",
    "channels": [16, 32, 64, 128],
    "strides": [[1, 2, 2], [1, 2, 2], [2, 2, 2]],
    "num_res_units": 2,
    "norm": "instance",
    "act": "relu",
    "dropout": 0.0,
}

#: MONAI's BasicUNet pools by 2 four times along every axis, whatever its features.
BASICUNET_FACTOR = (16, 16, 16)

#: The norm and activation names MONAI's layer factories know (``Norm.names``, ``Act.names``,
#: lower-cased), so the schema checks them without importing MONAI; tests/test_config.py
#: checks they still match the installed MONAI.
MONAI_NORMS = (
    "instance",
    "batch",
    "instance_nvfuser",
    "group",
    "layer",
    "localresponse",
    "syncbatch",
)
MONAI_ACTS = (
    "elu",
    "relu",
    "leakyrelu",
    "prelu",
    "relu6",
    "selu",
    "celu",
    "gelu",
    "sigmoid",
    "tanh",
    "softmax",
    "logsoftmax",
    "swish",
    "memswish",
    "mish",
    "geglu",
)


def stride_product(strides: Sequence[int | Sequence[int]]) -> tuple[int, int, int]:
    """Product along z, y, x of per-level strides (each an int or a z, y, x triple)."""
    f = [1, 1, 1]
    for s in strides:
        s3 = list(s) if isinstance(s, Sequence) else [s, s, s]
        f = [a * int(b) for a, b in zip(f, s3, strict=True)]
    return (f[0], f[1], f[2])


def downsample_factor(model_cfg: Mapping[str, Any] | None = None) -> tuple[int, int, int]:
    """The network's total downsampling (z, y, x): patch and block shapes must be multiples.

    ``model_cfg`` is a model section (missing keys take :data:`DEFAULT_MODEL`'s values).
    """
    cfg = {**DEFAULT_MODEL, **dict(model_cfg or {})}
    if str(cfg["name"]).lower() == "basicunet":
        return BASICUNET_FACTOR
    return stride_product(cfg["strides"])
