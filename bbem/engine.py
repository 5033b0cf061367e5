"""The one training loop. A task (EM cleft detection in :mod:`bbem.train`, each companion in
:mod:`bbem.companions`) is a :class:`Task`: it supplies the model, batches, the loss and an
evaluation; :func:`fit` owns everything else, with one rule for each idea:

- **optimiser and schedule**: ``optim.name`` (AdamW by default) at ``optim.lr``; the rate rises
  linearly from 0 over ``optim.warmup_steps``, then follows a cosine down to ``optim.lr_floor``
  times the base rate (default 0) at ``train.steps``, or holds (``optim.schedule: constant``).
- **the step**: forward and loss (under autocast where AMP is on), a finite-loss check *before*
  backward and the optimiser step, so a diverged step never reaches the weights or the
  checkpoints; backward, gradient clipping (``optim.grad_clip``), step, schedule, ``bb.step()``.
- **BB**: :func:`attach_from_config` turns the ``bb`` section into a :class:`bbem.bb.BBConfig`
  and attaches it to the layers the task names; ``method: dense`` attaches nothing.
- **evaluation** every ``train.eval_every`` steps and at the end: a ``metrics.csv`` row, the
  ``bb.csv`` rows, and ``best.pt`` whenever the task's score improves (higher or lower is
  better, as the task says); ``loss.csv`` every ``train.log_every`` steps.
- **resume**: ``last.pt`` every ``train.checkpoint_every`` steps and at the end holds the model,
  optimiser, schedule, AMP scaler, BB state and every RNG state; the batch stream restarts
  there from ``(train.seed, step)``. A run resumed from ``last.pt`` therefore writes the same
  rows and weights as one that never stopped.
- **threads**: ``train.threads`` (or every core) while training; the caller's count after,
  whether training returns or raises.
- **several processes** (torchrun, DDP): rank 0 writes and validates, rank ``r`` draws the stream
  ``stream_seed(train.seed, step, r)``; see :mod:`bbem.distributed`.

Knows nothing of EM: imports torch, :mod:`bbem.bb` and the generic run-directory, checkpoint
and progress helpers only.
"""

from __future__ import annotations

import math
import os
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from bbem import distributed as ddp
from bbem.bb import BBConfig, BudgetedBroadcast, attach_bb
from bbem.checkpoint import load_checkpoint, misfit, save_checkpoint
from bbem.errors import UserError
from bbem.progress import progress_bar
from bbem.rundir import RunDir, bb_summary_columns

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
SCHEDULES = ("cosine", "constant")


# -- what a task supplies -------------------------------------------------------------------------


@dataclass
class Evaluation:
    """What :meth:`Task.evaluate` returns.

    ``metrics`` become metrics.csv columns (rounded to 6 digits there) and must hold the task's
    ``score_name``; ``details`` is stored as the checkpoints' ``"metrics"`` (the EM task keeps
    its threshold and PR curve there), the metrics row when None.
    """

    metrics: Mapping[str, float]
    details: Mapping[str, Any] | None = None


class Task(ABC):
    """One training problem, as :func:`fit` sees it.

    Class attributes: ``name`` (progress bar and log), ``score_name`` (the metrics column that
    picks ``best.pt``), ``higher_is_better``, and ``bb_layers`` / ``bb_modes``, which go to
    :func:`bbem.bb.attach_bb` (layer types, name patterns or a predicate; per-pattern modes).
    """

    name: str = "task"
    score_name: str = "score"
    higher_is_better: bool = True
    bb_layers: Any = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    bb_modes: Mapping[str, str] = MappingProxyType({})

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model, built once after seeding, so its initial weights follow ``train.seed``."""

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Load what training needs (data, loss modules) once the model, optimiser and BB exist
        and before a resume restores the RNG states. A :class:`UserError` here leaves no run."""
        return  # optional: a task whose constructor loaded everything needs none

    @abstractmethod
    def batches(self, step: int, seed: int) -> Iterator[Any]:
        """Training batches forever from ``step`` on, drawn from ``seed`` alone (the engine
        passes ``stream_seed(train.seed, step)`` and restarts the stream at every checkpoint).
        A batch is a tensor or a tuple, list or dict of them; the engine moves it to the device."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar training loss of one batch."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> Evaluation:
        """Validation, called with the model in eval mode under ``torch.no_grad``."""


# -- settings, schedule, seeds --------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The ``train`` and ``optim`` keys the engine reads; other keys belong to the task."""

    steps: int
    eval_every: int = 100
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    amp: bool | str = False
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    #: where the cosine ends, as a fraction of ``lr``
    lr_floor: float = 0.0
    grad_clip: float | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        t = config.get("train") or {}
        o = {("optimizer" if k == "name" else k): v for k, v in (config.get("optim") or {}).items()}
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in {**o, **t}.items() if k in names}
        if "steps" not in kw:
            raise UserError("train.steps is missing: set the number of training steps")
        return cls(**kw)

    def __post_init__(self) -> None:
        for key in ("steps", "eval_every", "checkpoint_every", "log_every"):
            if int(getattr(self, key)) < 1:
                raise UserError(f"train.{key} must be at least 1, got {getattr(self, key)}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(
                f"optim.name {self.optimizer!r} is unknown: use {', '.join(OPTIMIZERS)}"
            )
        if self.schedule not in SCHEDULES:
            raise UserError(f"optim.schedule {self.schedule!r} is unknown: use cosine or constant")
        if not 0 <= self.lr_floor < 1:
            raise UserError(f"optim.lr_floor must be in [0, 1), got {self.lr_floor}")


def lr_factor(
    step: int, warmup: int, total: int, schedule: str = "cosine", floor: float = 0.0
) -> float:
    """The multiple of the base rate used by optimiser step ``step`` (0-based): ``(step + 1) /
    warmup`` during warm-up, then 1 (``constant``) or ``floor + (1 - floor) (1 + cos(pi t)) / 2``
    with ``t`` the fraction of the post-warm-up steps done, which reaches ``floor`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def pick_device(choice: str, what: str = "train.device") -> torch.device:
    """``auto`` is CUDA where visible, else the CPU; ``cuda`` without a GPU is a UserError
    naming the setting (``what``)."""
    if choice.split(":")[0] not in ("auto", "cpu", "cuda"):
        raise UserError(f"{what} must be auto, cpu or cuda, got {choice!r}")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{what} is {choice!r} but no CUDA device is visible: use auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def stream_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of the batch stream that starts at checkpoint ``step`` (on process ``rank``)."""
    return int(np.random.SeedSequence([seed, step, *([rank] if rank else [])]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    """Python's, NumPy's global and torch's RNGs (third-party code may draw from any of them)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG state, as plain values a checkpoint can hold."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(s: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    random.setstate(s["python"])
    kind, keys, *rest = s["numpy"]  # stored as plain values (see bbem.checkpoint)
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))  # noqa: NPY002
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (nested tuples, lists, dicts) on ``device``."""
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def attach_from_config(
    model: nn.Module,
    section: Mapping[str, Any] | None,
    layers: Any = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d),
    modes: Mapping[str, str] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> BudgetedBroadcast | None:
    """Attach BB (or a baseline) as a config's ``bb`` section says; None for ``method: dense``.

    Every key other than ``method: dense`` is a :class:`bbem.bb.BBConfig` field; a bad value is
    a :class:`UserError` naming it.
    """
    if not section or str(section.get("method", "bb")) == "dense":
        return None
    try:
        cfg = BBConfig(**dict(section))
    except (TypeError, ValueError) as e:
        raise UserError(f"bb section: {e}: see METHOD.md for BBConfig's fields") from None
    try:
        return attach_bb(model, cfg, layers=layers, modes=dict(modes or {}), optimizer=optimizer)
    except ValueError as e:
        raise UserError(f"bb: {e}: check the layers and modes BB is given") from None


# -- the loop -------------------------------------------------------------------------------------


def fit(
    task: Task,
    config: Mapping[str, Any],
    run_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``task`` as ``config`` (its ``train``, ``optim`` and ``bb`` sections) says, in a new
    run directory or, with ``resume``, continuing ``run_dir`` from its ``last.pt``.

    Returns the last metrics row plus ``run_dir``, ``best_score`` and ``best_step``.
    """
    settings = Settings.from_config(config)
    group, device = ddp.join(pick_device(settings.device))  # one process: (rank 0 of 1, device)
    threads = torch.get_num_threads()
    finished = False
    try:
        with ddp.open_run_dir(group, run_dir, resume, config) as rd:
            # an explicit count, also for None, so a resumed process computes like the first
            torch.set_num_threads(int(settings.threads or ddp.cores(group)))
            out = _Run(task, settings, config, rd, device).run(resume, progress)
        finished = True
        return out
    finally:
        torch.set_num_threads(threads)
        ddp.leave(finished)


class _Run:
    """The state of one training run between two checkpoints, and what a checkpoint holds."""

    def __init__(
        self, task: Task, s: Settings, config: Mapping[str, Any], rd: RunDir, device: torch.device
    ):
        self.task, self.s, self.config, self.rd, self.device = task, s, dict(config), rd, device
        g = self.group = ddp.from_env()  # rank 0 of 1 on one process
        seed_all(s.seed)
        self.model = task.build_model().to(device)
        self.bb = attach_from_config(self.model, config.get("bb"), task.bb_layers, task.bb_modes)
        if g.rank:  # the same initial weights everywhere, then each rank its own draws
            seed_all(stream_seed(s.seed, 0, g.rank))
        self.net = ddp.wrap(g, self.model, device)  # what the loss runs: DDP on several
        self.opt = OPTIMIZERS[s.optimizer](
            self.model.parameters(), lr=s.lr, weight_decay=s.weight_decay
        )
        if self.bb is not None:
            self.bb.set_optimizer(self.opt)  # refreshes reset the moments of changed edges

        def factor(step: int) -> float:
            return lr_factor(step, s.warmup_steps, s.steps, s.schedule, s.lr_floor)

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.amp = device.type == "cuda" and s.amp in ("auto", True)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        task.setup(self.model, device)
        self.step, self.elapsed0, self.t0 = 0, 0.0, time.perf_counter()
        self.best: float | None = None
        self.best_step: int | None = None
        self.losses: list[float] = []  # since the last evaluation: its train_loss
        self.window: list[float] = []  # since the last loss.csv row
        self.row: dict[str, Any] = {}  # the last metrics row
        self.details: dict[str, Any] = {}  # the last evaluation's checkpoint "metrics"

    # -- resume --------------------------------------------------------------------------------
    def restore(self) -> None:
        """Continue from ``last.pt``; a run killed before its first checkpoint starts again."""
        last = self.rd.checkpoint_path("last")
        if not last.is_file():
            return
        ck = load_checkpoint(last)
        missing = [k for k in ("step", "model", "optimizer", "scheduler") if k not in ck]
        if missing:
            raise UserError(f"{last} lacks {missing}: it predates resume, start the run again")
        try:
            self.model.load_state_dict(ck["model"])
            if self.bb is not None and ck.get("bb") is not None:
                self.bb.load_state_dict(ck["bb"])
            self.opt.load_state_dict(ck["optimizer"])
            self.sched.load_state_dict(ck["scheduler"])
            if self.amp and ck.get("scaler"):
                self.scaler.load_state_dict(ck["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError):
            # torch lists every mismatched tensor (dozens of lines): say what differs instead
            raise UserError(
                misfit(last, self.rd.path, ck.get("config") or {}, self.config)
            ) from None
        self.step = int(ck["step"])
        rng = ddp.own_rng(self.group, ck, last)  # this rank's states, from the same last.pt
        if rng is not None:
            set_rng_state(rng)
        else:  # written before RNG states were saved: those runs reseeded here
            seed_all(stream_seed(self.s.seed, self.step))
        self.best, self.best_step = _saved_best(ck, self.task.higher_is_better), ck.get("best_step")
        self.elapsed0 = float(ck.get("elapsed_s", 0.0))
        self.losses = list(ck.get("pending_losses", []))
        self.window = list(ck.get("pending_log", []))
        self.details = dict(ck.get("metrics") or {})

    def checkpoint(self, name: str, ranks: list[Any] | None = None) -> None:
        """Rank 0 writes ``name``.pt; ``last`` holds every rank's RNG states (``ranks``)."""
        extra = {"world_size": self.group.size, "rng_ranks": ranks} if self.group.on else {}
        save_checkpoint(
            self.rd.checkpoint_path(name),
            {
                **extra,
                "task": self.task.name,
                "step": self.step,
                "config": self.config,
                "model": self.model.state_dict(),
                "bb": self.bb.state_dict() if self.bb is not None else None,
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict() if self.amp else None,
                "rng": rng_state(),
                "metrics": self.details,
                "best_score": self.best,
                "best_step": self.best_step,
                "elapsed_s": self.elapsed(),
                # losses not yet averaged into a row, so a resumed run averages the same steps
                "pending_losses": list(self.losses),
                "pending_log": list(self.window),
            },
        )

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    # -- one step, one evaluation --------------------------------------------------------------
    def train_step(self, batch: Any) -> float:
        """One optimiser step; the loss value. A non-finite loss stops before it changes anything."""
        batch = to_device(batch, self.device)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=self.amp):
            loss = self.task.loss(self.net, batch)
        value = ddp.mean(self.group, loss)  # every rank stops together on a non-finite loss
        if not math.isfinite(value):
            raise UserError(
                f"{self.task.name}: training diverged at step {self.step + 1} (loss {value}): "
                "lower optim.lr"
            )
        self.scaler.scale(loss).backward()
        if self.s.grad_clip:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.s.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        if self.bb is not None:
            self.bb.step()
        self.step += 1
        return value

    def evaluate(self, density: float) -> None:
        """A metrics row, the bb.csv rows, and ``best.pt`` when the score improved."""
        if not self.group.main:  # rank 0 validates and reports; the others forget their losses
            self.losses = []
            return
        self.model.eval()
        try:
            with torch.no_grad():
                ev = self.task.evaluate(self.model)
        finally:
            self.model.train()
        row = {
            "step": self.step,
            "time_s": round(self.elapsed(), 2),
            "train_loss": round(float(np.mean(self.losses)), 6),
            "density": round(density, 6),
            "lr": self.opt.param_groups[0]["lr"],
            **{k: round(float(v), 6) for k, v in ev.metrics.items()},
        }
        if self.bb is not None:
            row.update(bb_summary_columns(self.bb.summary()))
        self.losses = []
        self.rd.append_metrics(row)
        if self.bb is not None:
            self.rd.append_bb(self.step, self.bb)
        self.rd.log.info("step %d %s", self.step, {k: v for k, v in row.items() if k != "step"})
        self.row = row
        self.details = dict(ev.details) if ev.details is not None else dict(row)
        score = float(ev.metrics[self.task.score_name])
        if _better(score, self.best, self.task.higher_is_better):
            self.best, self.best_step = score, self.step
            self.checkpoint("best")

    def run(self, resume: bool, progress: bool) -> dict[str, Any]:
        s, task, rd = self.s, self.task, self.rd
        if resume:
            self.restore()
            if self.step >= s.steps:
                raise UserError(
                    f"run {rd.path} already finished ({self.step} steps): nothing to resume"
                )
            rd.truncate_after(self.step)
            rd.log.info("resumed at step %d", self.step)
        rd.log.info("training %s on %s: %d steps", task.name, self.device, s.steps)
        self.t0 = time.perf_counter() - self.elapsed0
        rank = self.group.rank
        with progress_bar("{task.fields[info]}", enabled=progress and self.group.main) as bar:
            bar_task = bar.add_task(task.name, total=s.steps, completed=self.step, info="")
            batches = task.batches(self.step, stream_seed(s.seed, self.step, rank))
            self.model.train()
            while self.step < s.steps:
                value = self.train_step(next(batches))
                step = self.step
                self.losses.append(value)
                self.window.append(value)
                if step % s.log_every == 0 or step == s.steps:
                    rd.append_loss(
                        {
                            "step": step,
                            "loss": round(float(np.mean(self.window)), 6),
                            "lr": self.opt.param_groups[0]["lr"],
                            "time_s": round(self.elapsed(), 2),
                        }
                    )
                    self.window = []
                density = self.bb.density() if self.bb is not None else 1.0
                if step % s.eval_every == 0 or step == s.steps:
                    self.evaluate(density)
                score = self.row.get(task.score_name)
                shown = "-" if score is None else f"{score:.3f}"
                info = f"loss {value:.4f} density {density:.3f} {task.score_name} {shown}"
                bar.update(bar_task, completed=step, info=info)
                if step % s.checkpoint_every == 0 or step == s.steps:
                    ranks = ddp.gather(self.group, rng_state())
                    if self.group.main:
                        self.checkpoint("last", ranks)
                    # a run resumed from this checkpoint draws this same stream
                    batches = task.batches(step, stream_seed(s.seed, step, rank))
        out = {**self.row, "run_dir": str(rd.path), "best_score": self.best}
        out = ddp.broadcast(self.group, {**out, "best_step": self.best_step})
        # one argument that is a dict would be taken by logging as %-mapping: pass its text
        rd.log.info("finished: %s", str(out))
        return out


def _better(score: float, best: float | None, higher: bool) -> bool:
    return math.isfinite(score) and (best is None or (score > best if higher else score < best))


def _saved_best(ck: Mapping[str, Any], higher: bool) -> float | None:
    """The best score so far from a checkpoint, including the two layouts before the engine:
    the EM loop's ``best`` (PR-AUC, -1 before any evaluation) and the companions' ``best_val``
    (the score negated when higher was better, +inf before any evaluation)."""
    if "best_val" in ck and "best_score" not in ck:
        v = float(ck["best_val"])
        return None if math.isinf(v) else (-v if higher else v)
    v = ck.get("best_score", ck.get("best"))
    return None if v is None else float(v)
