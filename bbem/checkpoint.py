"""Checkpoint files: the format tags, an atomic writer and a reader with one-line errors.

Torch only, so the EM training, inference, the napari plugin and the companion tasks share
it without importing each other.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bbem.atomic import atomic_output
from bbem.errors import UserError

CHECKPOINT_FORMAT = "bbem-checkpoint-1"
EXPORT_FORMAT = "bbem-export-1"


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write a checkpoint atomically (temporary name, then rename)."""
    data = {"format": CHECKPOINT_FORMAT, **payload}
    with atomic_output(path, overwrite=True) as tmp:
        torch.save(data, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint or an export; a clear :class:`UserError` when it is missing or foreign."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint {p} not found: pass a run's checkpoints/best.pt or last.pt")
    try:
        data = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a corrupt file
        raise UserError(
            f"checkpoint {p} cannot be read ({type(e).__name__}): is it a bbem checkpoint?"
        ) from None
    if not isinstance(data, dict) or data.get("format") not in (CHECKPOINT_FORMAT, EXPORT_FORMAT):
        raise UserError(f"{p} is not a bbem checkpoint or export (no bbem format tag)")
    return data
