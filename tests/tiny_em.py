"""Tiny EM runs for the tests: a learnable noise volume and a 6-step config over it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bbem.volumes import write_volumes


def tiny_volume(path: Path, seed: int, shape: tuple[int, int, int] = (8, 48, 48)) -> Path:
    """A noise volume with three dark cleft sheets, learnable in a few steps."""
    rng = np.random.default_rng(seed)
    raw = rng.normal(128, 20, size=shape)
    clefts = np.zeros(shape, np.uint64)
    for i in range(3):
        y, x = rng.integers(8, shape[1] - 8, size=2)
        clefts[1:-1, y : y + 2, x - 5 : x + 5] = i + 1
    raw[clefts > 0] -= 60  # a dark sheet: learnable in a few steps
    write_volumes(
        path,
        {"volumes/raw": np.clip(raw, 0, 255).astype(np.uint8), "volumes/labels/clefts": clefts},
        voxel_size=(40, 4, 4),
    )
    return path


def tiny_volumes(folder: Path) -> Path:
    """``folder`` with ``train.zarr`` (seed 1) and ``val.zarr`` (seed 2), as tiny_config reads."""
    tiny_volume(folder / "train.zarr", 1)
    tiny_volume(folder / "val.zarr", 2)
    return folder


def tiny_config(
    volumes: Path, path: Path, bb: dict[str, Any] | None = None, **sections: dict[str, Any]
) -> Path:
    """A 6-step config over :func:`tiny_volume`s in ``volumes`` (train.zarr, val.zarr),
    written to ``path``; ``bb`` is the bb section (dense by default) and each of ``sections``
    updates that section."""
    cfg = {
        "name": "tiny",
        "data": {
            "root": str(volumes),
            "train": [{"path": "train.zarr"}],
            "val": [{"path": "val.zarr"}],
            "patch_size": [4, 32, 32],
            "batch_size": 2,
        },
        "model": {"channels": [4, 8, 16], "strides": [[1, 2, 2], [2, 2, 2]], "num_res_units": 1},
        "bb": bb or {"method": "dense"},
        "augment": {"elastic": 0.0},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {
            "steps": 6,
            "eval_every": 3,
            "checkpoint_every": 2,
            "log_every": 1,
            "seed": 0,
            "device": "cpu",
        },
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    path.write_text(yaml.safe_dump(cfg))
    return path
