"""The MONAI 3D U-Net factory, and the checkpoint format every part of bbem reads and writes.

A checkpoint (``checkpoints/last.pt``, ``best.pt``) is a dict::

    {"format": "bbem-checkpoint-1", "step": int, "config": <resolved run config as a dict>,
     "model": model.state_dict()  (with BB parametrizations when BB is attached),
     "bb": bb.state_dict() or None, "optimizer": ..., "scheduler": ..., "rng": ...,
     "metrics": {...}}

An export (``bbem export``) is ``{"format": "bbem-export-1", "model_config": {...},
"state_dict": plain weights with the masks multiplied in, "info": {...}}``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bbem.architecture import (  # noqa: F401 - re-exported: model users import them from here
    DEFAULT_MODEL,
    downsample_factor,
)
from bbem.atomic import check_output
from bbem.checkpoint import (  # noqa: F401 - re-exported: bbem.model is where users look
    CHECKPOINT_FORMAT,
    EXPORT_FORMAT,
    load_checkpoint,
    save_checkpoint,
    save_torch_file,
)
from bbem.errors import UserError


def build_model(model_cfg: Mapping[str, Any] | None = None) -> nn.Module:
    """A MONAI 3D U-Net: input ``[B, 1, Z, Y, X]`` -> cleft logits ``[B, 1, Z, Y, X]``.

    ``model_cfg`` keys (defaults in :data:`DEFAULT_MODEL`): ``name`` (``unet`` or
    ``basicunet``), ``channels``, ``strides`` (per level, an int or a z,y,x triple),
    ``num_res_units``, ``norm``, ``act``, ``dropout``. Z, Y, X must be divisible by the product
    of the strides along each axis.
    """
    cfg = {**DEFAULT_MODEL, **dict(model_cfg or {})}
    name = str(cfg["name"]).lower()
    if name == "unet":
        from monai.networks.nets import UNet

        strides = tuple(tuple(s) if isinstance(s, (list, tuple)) else s for s in cfg["strides"])
        return UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            channels=tuple(cfg["channels"]),
            # MONAI's annotation says Sequence[int]; it takes per-axis (z, y, x) strides too
            strides=strides,  # type: ignore[arg-type]
            num_res_units=int(cfg["num_res_units"]),
            norm=cfg["norm"],
            act=cfg["act"],
            dropout=float(cfg["dropout"]),
        )
    if name == "basicunet":
        from monai.networks.nets import BasicUNet

        feats = list(cfg["channels"])
        if len(feats) != 6:
            raise UserError(f"model.channels for basicunet needs 6 numbers, got {feats}")
        return BasicUNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            features=tuple(feats),
            act=cfg["act"],
            norm=cfg["norm"],
            dropout=float(cfg["dropout"]),
        )
    raise UserError(f"model.name must be 'unet' or 'basicunet', got {cfg['name']!r}")


#: The layers BB prunes in the U-Net (those with one input or output channel stay dense).
BB_LAYERS = (nn.Conv3d,)


def load_inference_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """A plain model in eval mode (BB masks baked in) and info: ``model_config``, ``config``, ``step``.

    Accepts a training checkpoint or an export.
    """
    from bbem.engine import attach_from_config

    data = load_checkpoint(path)
    if data["format"] == EXPORT_FORMAT:
        model_cfg = data["model_config"]
        model = build_model(model_cfg)
        _load_state(model, data["state_dict"], path)
        info = dict(data.get("info", {}))
    else:
        config = data["config"]
        model_cfg = config.get("model", {})
        model = build_model(model_cfg)
        # a "layers" key is ignored, as it always was here: the U-Net's are BB_LAYERS
        bb_section = {k: v for k, v in (config.get("bb") or {}).items() if k != "layers"}
        bb = attach_from_config(model, bb_section, layers=BB_LAYERS)
        _load_state(model, data["model"], path)
        if bb is not None:
            if data.get("bb") is not None:
                bb.load_state_dict(data["bb"])
            bb.bake()
        info = {"config": config, "step": data.get("step"), "metrics": data.get("metrics", {})}
    info["model_config"] = {**DEFAULT_MODEL, **dict(model_cfg)}
    return model.to(device).eval(), info


def validation_threshold(data: Mapping[str, Any]) -> float | None:
    """The threshold of best validation F1 recorded with a model, or None.

    ``data``: a loaded training checkpoint (its ``metrics``), an export (``info["metrics"]``),
    or the info :func:`load_inference_model` returns (``metrics``). Training writes
    ``threshold_best`` with every evaluation; a value outside [0, 1] counts as absent.
    """
    metrics = data.get("metrics") or (data.get("info") or {}).get("metrics") or {}
    t = metrics.get("threshold_best")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
        return None
    return float(t)


def _load_state(model: nn.Module, state: Mapping[str, Any], path: str | os.PathLike) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(
            f"checkpoint {path} does not fit the model its config describes: {first}"
        ) from None


def export_model(
    checkpoint: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write a plain model (masks multiplied into the weights, no BB machinery) for use elsewhere.

    With ``overwrite``, only an earlier export is replaced (never a training checkpoint).
    """
    check_output(out, overwrite, kind="torch", inputs=[checkpoint])
    if Path(out).exists():
        old = load_checkpoint(out)
        if old.get("format") != EXPORT_FORMAT:
            raise UserError(
                f"output {out} is a training checkpoint, not an export: --overwrite replaces only "
                "an earlier export; choose another path"
            )
    model, info = load_inference_model(checkpoint)
    payload = {
        "format": EXPORT_FORMAT,
        "model_config": info["model_config"],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "info": {k: v for k, v in info.items() if k != "model_config"},
    }
    return save_torch_file(out, payload, overwrite=overwrite, inputs=[checkpoint])
