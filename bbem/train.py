"""EM cleft detection as a task for :mod:`bbem.engine`, and ``bbem train CONFIG``.

The engine owns the loop, schedule, checkpoints and resume (see its docstring); this module
supplies the U-Net, the patch stream, the BCE + Dice loss and validation (voxel PR-AUC and F1
by sliding-window prediction of the validation volumes). ``best.pt`` is the checkpoint with
the highest validation PR-AUC; its ``"metrics"`` hold the threshold ``bbem infer --threshold
val`` uses.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bbem import distributed as ddp
from bbem.atomic import check_not_input
from bbem.config import RunConfig, load_config
from bbem.configfile import default_run_dir, resolve_cli
from bbem.engine import Evaluation, Task, fit, pick_device
from bbem.errors import UserError
from bbem.model import BB_LAYERS, build_model
from bbem.rundir import RunDir

#: Validation numbers written to metrics.csv (as ``val_<name>``).
VAL_COLUMNS = (
    "pr_auc",
    "f1_best",
    "threshold_best",
    "f1_05",
    "precision_05",
    "recall_05",
    "positive_fraction",
)


class CleftLoss(nn.Module):
    """``bce_weight * BCE(pos_weight) + dice_weight * Dice`` on logits ``[B, 1, Z, Y, X]``."""

    pos_weight: torch.Tensor  # a buffer, so it follows the module to the device

    def __init__(
        self,
        bce_weight: float,
        dice_weight: float,
        pos_weight: float,
        near_weight: float = 1.0,
        near_radius: int = 4,
    ):
        super().__init__()
        from monai.losses import DiceLoss

        self.bce_weight, self.dice_weight = bce_weight, dice_weight
        self.near_weight, self.near_radius = near_weight, near_radius
        self.register_buffer("pos_weight", torch.tensor([pos_weight]))
        # batch=True: Dice over the whole batch, so a patch without clefts is not a 0/0 case.
        self.dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)

    def near_mask(self, target: torch.Tensor) -> torch.Tensor:
        """Background voxels of ``target`` ``[B, 1, Z, Y, X]`` within ``near_radius`` pixels
        in-plane of a cleft voxel (an in-plane square max filter)."""
        r = self.near_radius
        grown = nn.functional.max_pool3d(target, (1, 2 * r + 1, 2 * r + 1), 1, (0, r, r))
        return (grown > 0) & (target == 0)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros(())
        if self.bce_weight:
            weight = None
            if self.near_weight != 1.0:
                weight = 1.0 + (self.near_weight - 1.0) * self.near_mask(target).to(logits.dtype)
            bce = nn.functional.binary_cross_entropy_with_logits(
                logits, target, weight=weight, pos_weight=self.pos_weight.to(logits.device)
            )
            loss = loss + self.bce_weight * bce
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits, target)
        return loss


def validate(model: nn.Module, volumes: list, patch_size, model_cfg: dict) -> dict[str, Any]:
    """Sliding-window prediction of every validation volume (``(raw [Z, Y, X], truth [Z, Y, X],
    voxel size)`` each); voxel PR-AUC and F1 over all of them (see ``PRHistogram.result``).
    Call it with the model in eval mode."""
    from bbem.infer import make_plan, predict_region
    from bbem.metrics.voxel import PRHistogram, to_uint8
    from bbem.model import downsample_factor

    hist = PRHistogram()
    for raw, truth, _ in volumes:
        plan = make_plan(raw.shape, downsample_factor(model_cfg), roi=patch_size)
        hist.update(to_uint8(predict_region(model, raw, plan)), truth)
    return hist.result()


class CleftTask(Task):
    """A 3D U-Net finding synaptic clefts: patches ``{"image", "label": [B, 1, Z, Y, X]}``."""

    name = "train"
    score_name = "val_pr_auc"
    higher_is_better = True
    bb_layers = BB_LAYERS

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.model_cfg = cfg.model.model_dump()

    def build_model(self) -> nn.Module:
        return build_model(self.model_cfg)

    def setup(self, model: nn.Module, device: torch.device) -> None:
        from bbem.data import auto_pos_weight, load_val_volumes, make_dataset

        cfg = self.cfg
        self.dataset = make_dataset(cfg, cfg.train.seed)
        pos_weight = cfg.loss.pos_weight
        if pos_weight == "auto":
            pos_weight = auto_pos_weight(self.dataset.sources)
        self.loss_fn = CleftLoss(
            cfg.loss.bce_weight,
            cfg.loss.dice_weight,
            float(pos_weight),
            cfg.loss.near_weight,
            cfg.loss.near_radius,
        )
        self.loss_fn.to(device)
        self.val_volumes = load_val_volumes(cfg)
        if not any(lab.any() for _, lab, _ in self.val_volumes):
            raise UserError(
                "the validation volumes hold no cleft voxels, so PR-AUC is undefined and no "
                "checkpoint or threshold can be chosen: give data.val a box with synapses"
            )

    def batches(self, step: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        from bbem.data import batches

        self.dataset.seed = seed
        return batches(self.dataset, self.cfg.data.batch_size, self.cfg.data.workers)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(model(batch["image"]), batch["label"])

    def evaluate(self, model: nn.Module) -> Evaluation:
        r = validate(model, self.val_volumes, self.cfg.data.patch_size, self.model_cfg)
        return Evaluation({f"val_{k}": float(r[k]) for k in VAL_COLUMNS}, details=r)


def train(
    cfg: RunConfig,
    run_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a cleft detector in ``run_dir`` (default ``runs/<name>-<time>``), or continue the
    run in ``resume``; returns the final row of ``metrics.csv`` plus ``run_dir``,
    ``best_pr_auc`` (= ``best_score``) and ``best_step``.

    Under torchrun each process calls this with the same arguments (see
    :mod:`bbem.distributed`): rank 0 makes missing synthetic volumes before the others look."""
    from bbem.data import ensure_volumes

    group = ddp.from_env()
    if group.on:  # join now, so that rank 0 makes the volumes before the others read them
        ddp.join(pick_device(cfg.train.device))
    with ddp.main_first(group):
        ensure_volumes(cfg)  # names a missing volume, makes a missing synthetic one
    if resume is not None:
        path = Path(resume)
    else:
        path = Path(run_dir) if run_dir else default_run_dir(cfg.name)
        data = [cfg.data.resolve(v.path) for v in (*cfg.data.train, *cfg.data.val)]
        check_not_input(path, data)  # a run directory inside a zarr input would alter it
    row = fit(CleftTask(cfg), cfg.to_dict(), path, resume=resume is not None, progress=progress)
    row["best_pr_auc"] = row["best_score"]
    return row


def train_from_cli(
    config: str | None,
    overrides: Iterable[str] = (),
    run_dir: str | None = None,
    resume: str | None = None,
) -> dict[str, Any]:
    """``bbem train CONFIG [--set k=v] [--run-dir DIR]`` or ``bbem train --resume RUN_DIR``."""
    cfg, resumed = resolve_cli(
        "train", "configs/demo.yaml", config, list(overrides), resume, load_config
    )
    result = train(cfg, resume=resumed) if resumed else train(cfg, run_dir=run_dir)
    if ddp.from_env().main:
        _print_result(result)
    return result


def launch_from_cli(
    nproc: int,
    config: str | None,
    overrides: Iterable[str] = (),
    run_dir: str | None = None,
    resume: str | None = None,
) -> int:
    """``bbem train ... --nproc N``: check the config and volumes here (a mistake is one line,
    not one per process), then run the same command on N processes under torchrun (``--nproc
    1``: in this process). The exit status."""
    from bbem.config import resolve_volumes

    overrides = list(overrides)
    cfg, _ = resolve_cli("train", "configs/demo.yaml", config, overrides, resume, load_config)
    ddp.check_launch(nproc, cfg.train.device)
    if nproc == 1:
        train_from_cli(config, overrides, run_dir, resume)
        return 0
    argv = ["train", *([config] if config else []), *(a for o in overrides for a in ("--set", o))]
    argv += [
        *(["--run-dir", run_dir] if run_dir else []),
        *(["--resume", resume] if resume else []),
    ]
    resolve_volumes(cfg)  # names a missing volume; rank 0 makes a missing synthetic one
    if run_dir and not resume:
        RunDir.check_new(run_dir)  # an existing run, a file in the way
    return ddp.launch(nproc, argv)


def _print_result(row: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = ("step", "val_pr_auc", "val_f1_best", "val_f1_05", "density", "time_s")
    t = Table(title=f"bbem train: {row.get('run_dir')}")
    for col in cols:
        t.add_column(col)
    t.add_row(
        *(f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in cols)
    )
    Console().print(t)
