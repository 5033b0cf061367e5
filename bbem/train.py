"""The training loop: ``bbem train CONFIG`` -> a run directory (see :mod:`bbem.rundir`).

Determinism and resume: the patch stream is reseeded at every checkpoint boundary from
``(train.seed, step)``, and checkpoints hold the model, optimiser, scheduler, BB state and RNG
states, so a run resumed from ``last.pt`` continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bbem.atomic import check_not_input
from bbem.config import RunConfig, load_config, resolve_volumes
from bbem.errors import UserError
from bbem.model import attach_from_config, build_model, load_checkpoint, save_checkpoint
from bbem.rundir import RunDir, bb_summary_columns


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is 'cuda' but no CUDA device is visible: use auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def lr_lambda(cfg: RunConfig):
    """Linear warm-up from 0, then cosine to 0 at ``train.steps`` (or constant)."""
    warm, total = cfg.optim.warmup_steps, cfg.train.steps

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.optim.schedule == "constant":
            return 1.0
        frac = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    return f


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

    def __init__(self, bce_weight: float, dice_weight: float, pos_weight: float):
        super().__init__()
        from monai.losses import DiceLoss

        self.bce_weight, self.dice_weight = bce_weight, dice_weight
        self.register_buffer("pos_weight", torch.tensor([pos_weight]))
        # batch=True: Dice over the whole batch, so a patch without clefts is not a 0/0 case.
        self.dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = logits.new_zeros(())
        if self.bce_weight:
            bce = nn.functional.binary_cross_entropy_with_logits(
                logits, target, pos_weight=self.pos_weight.to(logits.device)
            )
            loss = loss + self.bce_weight * bce
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits, target)
        return loss


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - third-party code may draw from the global RNG
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    kind, keys, *rest = s["numpy"]  # stored as plain values (see bbem.checkpoint)
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))  # noqa: NPY002
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class _Batches:
    """Training batches; the stream restarts from ``(seed, step)`` at each checkpoint boundary."""

    def __init__(self, cfg: RunConfig):
        from bbem.data import make_dataset

        self.cfg = cfg
        self.dataset = make_dataset(cfg, cfg.train.seed)
        self.it: Iterator[dict[str, torch.Tensor]] | None = None

    def restart(self, step: int) -> None:
        from bbem.data import batches

        self.dataset.seed = int(
            np.random.SeedSequence([self.cfg.train.seed, step]).generate_state(1)[0]
        )
        self.it = batches(self.dataset, self.cfg.data.batch_size, self.cfg.data.workers)

    def next(self) -> dict[str, torch.Tensor]:
        assert self.it is not None
        return next(self.it)


def validate(model: nn.Module, volumes: list, patch_size, model_cfg: dict) -> dict[str, Any]:
    """Sliding-window prediction of every validation volume; voxel PR-AUC and F1 over all of them."""
    from bbem.infer import make_plan, predict_region
    from bbem.metrics.voxel import PRHistogram, to_uint8
    from bbem.model import downsample_factor

    was_training = model.training
    model.eval()
    hist = PRHistogram()
    try:
        for raw, truth, _ in volumes:
            plan = make_plan(raw.shape, downsample_factor(model_cfg), roi=patch_size)
            prob = predict_region(model, raw, plan)
            hist.update(to_uint8(prob), truth)
    finally:
        model.train(was_training)
    return hist.result()


def train(
    cfg: RunConfig,
    run_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a cleft detector; returns the final row of ``metrics.csv`` plus ``run_dir``."""
    from bbem.data import auto_pos_weight, load_val_volumes

    resolve_volumes(cfg)
    if resume is not None:
        rd = RunDir.open(resume)
    else:
        path = run_dir or Path("runs") / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
        data = [cfg.data.resolve(v.path) for v in (*cfg.data.train, *cfg.data.val)]
        check_not_input(path, data)  # a run directory inside a zarr input would alter it
        rd = RunDir.create(path, cfg.to_dict())
    with rd:
        device = pick_device(cfg.train.device)
        torch.set_num_threads(cfg.train.threads or max(1, os.cpu_count() or 1))
        _seed_all(cfg.train.seed)

        model_cfg = cfg.model.model_dump()
        model = build_model(model_cfg).to(device)
        bb = attach_from_config(model, cfg.bb_kwargs())
        opt_cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[
            cfg.optim.name
        ]
        opt = opt_cls(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        if bb is not None:
            bb.set_optimizer(opt)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        batches = _Batches(cfg)
        pos_weight = cfg.loss.pos_weight
        if pos_weight == "auto":
            pos_weight = auto_pos_weight(batches.dataset.sources)
        loss_fn = CleftLoss(cfg.loss.bce_weight, cfg.loss.dice_weight, float(pos_weight)).to(device)
        use_amp = device.type == "cuda" and cfg.train.amp in ("auto", True)
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

        step, best, elapsed0 = 0, -1.0, 0.0
        pending: list[float] = []
        window: list[float] = []  # losses since the last loss.csv row
        if resume is not None:
            last = rd.checkpoint_path("last")
            if last.is_file():
                ck = load_checkpoint(last)
                try:
                    model.load_state_dict(ck["model"])
                    if bb is not None and ck.get("bb") is not None:
                        bb.load_state_dict(ck["bb"])
                    opt.load_state_dict(ck["optimizer"])
                    sched.load_state_dict(ck["scheduler"])
                except (RuntimeError, ValueError, KeyError, TypeError):
                    # torch lists every mismatched tensor (dozens of lines): say what differs
                    raise UserError(_misfit(last, rd.path, ck, cfg)) from None
                _set_rng_state(ck["rng"])
                step, best = int(ck["step"]), float(ck.get("best", -1.0))
                elapsed0 = float(ck.get("elapsed_s", 0.0))
                pending = list(ck.get("pending_losses", []))
                window = list(ck.get("pending_log", []))
            rd.truncate_after(step)
            rd.log.info("resumed at step %d", step)
            if step >= cfg.train.steps:
                raise UserError(f"run {rd.path} already finished ({step} steps): nothing to resume")

        val_volumes = load_val_volumes(cfg)
        if not any(lab.any() for _, lab, _ in val_volumes):
            raise UserError(
                "the validation volumes hold no cleft voxels, so PR-AUC is undefined and no "
                "checkpoint or threshold can be chosen: give data.val a box with synapses"
            )
        rd.log.info("training %s on %s: %d steps", cfg.name, device, cfg.train.steps)
        t0 = time.perf_counter() - elapsed0
        losses: list[float] = pending
        row: dict[str, Any] = {}
        last_val: dict[str, Any] = {}

        def checkpoint(name: str, metrics: dict[str, Any]) -> None:
            save_checkpoint(
                rd.checkpoint_path(name),
                {
                    "step": step,
                    "config": cfg.to_dict(),
                    "model": model.state_dict(),
                    "bb": bb.state_dict() if bb is not None else None,
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": _rng_state(),
                    "metrics": metrics,
                    "best": best,
                    "elapsed_s": time.perf_counter() - t0,
                    # losses since the last evaluation, so a resumed run averages the same steps
                    "pending_losses": list(losses),
                    "pending_log": list(window),
                },
            )

        bar = _Progress(cfg.train.steps, step, enabled=progress)
        with bar:
            batches.restart(step)
            model.train()
            while step < cfg.train.steps:
                batch = batches.next()
                x, y = batch["image"].to(device), batch["label"].to(device)
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, enabled=use_amp):
                    loss = loss_fn(model(x), y)
                scaler.scale(loss).backward()
                if cfg.optim.grad_clip:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                scaler.step(opt)
                scaler.update()
                sched.step()
                if bb is not None:
                    bb.step()
                step += 1
                value = loss.item()
                if not math.isfinite(value):
                    raise UserError(
                        f"training diverged at step {step} (loss {value}): lower optim.lr"
                    )
                losses.append(value)
                window.append(value)
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    rd.append_loss(
                        {
                            "step": step,
                            "loss": round(float(np.mean(window)), 6),
                            "lr": opt.param_groups[0]["lr"],
                            "time_s": round(time.perf_counter() - t0, 2),
                        }
                    )
                    window = []
                density = bb.density() if bb is not None else 1.0
                bar.update(step, loss=losses[-1], density=density, pr_auc=last_val.get("pr_auc"))

                if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                    last_val = validate(model, val_volumes, cfg.data.patch_size, model_cfg)
                    row = {
                        "step": step,
                        "time_s": round(time.perf_counter() - t0, 2),
                        "train_loss": round(float(np.mean(losses)), 6),
                        "density": round(density, 6),
                        "lr": opt.param_groups[0]["lr"],
                        **{f"val_{k}": round(float(last_val[k]), 6) for k in VAL_COLUMNS},
                    }
                    if bb is not None:
                        row.update(bb_summary_columns(bb.summary()))
                    losses = []
                    rd.append_metrics(row)
                    if bb is not None:
                        rd.append_bb(step, bb)
                    rd.log.info("step %d %s", step, {k: v for k, v in row.items() if k != "step"})
                    if last_val["pr_auc"] > best:
                        best = last_val["pr_auc"]
                        checkpoint("best", last_val)
                    bar.update(
                        step, loss=row["train_loss"], density=density, pr_auc=last_val["pr_auc"]
                    )
                if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
                    checkpoint("last", last_val)
                    # the patch stream restarts here, so a resume from this checkpoint sees the same patches
                    batches.restart(step)
        row = dict(row)
        row["run_dir"] = str(rd.path)
        row["best_pr_auc"] = best
        rd.log.info("finished: %s", row)
        return row


def _misfit(last: Path, run: Path, ck: dict[str, Any], cfg: RunConfig) -> str:
    """Why ``last.pt`` cannot be loaded into the model ``config.yaml`` describes, and the fix."""
    saved, now = ck.get("config") or {}, cfg.to_dict()

    def changed(section: str) -> list[str]:
        a, b = saved.get(section) or {}, now.get(section) or {}
        return [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]

    # the model and BB shape the weights; optimiser changes (a new lr) alone are a legal resume
    diff = changed("model") + changed("bb") or changed("optim")
    what = f" ({', '.join(diff)} changed since it was written)" if diff else ""
    return (
        f"checkpoint {last} does not fit the model config in {run / 'config.yaml'}{what}: restore "
        "the settings the run was trained with, or train a new run with another --run-dir"
    )


class _Progress:
    """A rich progress bar: step, loss, density, validation PR-AUC, time left."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.p = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
        )
        self.task = self.p.add_task("train", total=total, completed=start, info="")

    def __enter__(self):
        if self.enabled:
            self.p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)

    def update(self, step: int, loss: float, density: float, pr_auc: float | None) -> None:
        if not self.enabled:
            return
        auc = "-" if pr_auc is None else f"{pr_auc:.3f}"
        self.p.update(
            self.task,
            completed=step,
            info=f"loss {loss:.4f} density {density:.3f} val PR-AUC {auc}",
        )


def train_from_cli(
    config: str | None,
    overrides: Iterable[str] = (),
    run_dir: str | None = None,
    resume: str | None = None,
) -> dict[str, Any]:
    """``bbem train``: a config (with ``--set`` overrides) or ``--resume RUN_DIR``."""
    if resume is not None:
        if config is not None or list(overrides):
            raise UserError("--resume continues a run with its saved config: drop CONFIG and --set")
        rd_path = Path(resume)
        if not (rd_path / "config.yaml").is_file():
            raise UserError(
                f"{rd_path} is not a run directory (no config.yaml): pass the run's folder"
            )
        cfg = load_config(rd_path / "config.yaml")
        result = train(cfg, resume=rd_path)
    else:
        if config is None:
            raise UserError(
                "bbem train needs a CONFIG (e.g. configs/demo.yaml) or --resume RUN_DIR"
            )
        cfg = load_config(config, list(overrides))
        result = train(cfg, run_dir=run_dir)
    _print_result(result)
    return result


def _print_result(row: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"bbem train: {row.get('run_dir')}")
    for col in ("step", "val_pr_auc", "val_f1_best", "val_f1_05", "density", "time_s"):
        t.add_column(col)
    t.add_row(
        *(
            f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "-"))
            for c in ("step", "val_pr_auc", "val_f1_best", "val_f1_05", "density", "time_s")
        )
    )
    Console().print(t)
