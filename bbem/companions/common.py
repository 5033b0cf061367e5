"""What both companion tasks share: config loading, BB attachment, the training loop.

The loop writes the same run directory as the EM training (``config.yaml``, ``metrics.csv``
with ``step, time_s, train_loss, density`` plus the task's validation columns, ``bb.csv``,
``checkpoints/last.pt`` and ``best.pt``), so ``bbem report RUN_DIR`` reads either.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from bbem.checkpoint import load_checkpoint, save_checkpoint
from bbem.errors import UserError
from bbem.rundir import RunDir, bb_summary_columns

BB_METHODS = ("dense", "bb", "bb_tiers", "magnitude", "random")


# -- config ---------------------------------------------------------------------------------------


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on top, section by section (neither is modified)."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(
    config: str | os.PathLike | Mapping[str, Any],
    defaults: Mapping[str, Any],
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """A YAML file (or dict) merged over ``defaults``, then ``--set`` overrides applied.

    Unknown sections or keys raise :class:`UserError` naming them, so a typo never silently
    falls back to a default. The ``bb`` section is passed to :class:`bbem.bb.BBConfig` as is
    (its fields are checked there), except ``method: dense``, which attaches nothing.
    """
    if isinstance(config, Mapping):
        raw: Any = dict(config)
    else:
        p = Path(config)
        if not p.is_file():
            raise UserError(f"config {p} not found: pass a YAML file such as configs/asr.yaml")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            first = str(e).strip().splitlines()[0]
            raise UserError(f"config {p} is not valid YAML ({first}): fix the file") from None
        if not isinstance(raw, dict):
            raise UserError(f"config {p} must be a mapping of sections (data, model, bb, ...)")
    if overrides:
        from bbem.config import apply_overrides

        raw = apply_overrides(raw, overrides)
    _check_keys(raw, defaults, "")
    cfg = deep_merge(defaults, raw)
    method = str(cfg.get("bb", {}).get("method", "bb"))
    if method not in BB_METHODS:
        raise UserError(f"bb.method {method!r} is unknown: use one of {', '.join(BB_METHODS)}")
    return cfg


def _check_keys(raw: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> None:
    for k, v in raw.items():
        if where == "bb.":  # BBConfig validates its own fields
            continue
        if k not in defaults:
            known = ", ".join(sorted(defaults))
            raise UserError(f"config key {where}{k} is unknown: known keys here are {known}")
        if isinstance(v, Mapping) and isinstance(defaults[k], Mapping):
            _check_keys(v, defaults[k], f"{where}{k}.")


def default_run_dir(config: str | os.PathLike | Mapping[str, Any], task: str) -> Path:
    """``runs/<config name>-<YYYYmmdd-HHMMSS>``, the EM training's convention."""
    name = task if isinstance(config, Mapping) else Path(config).stem
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def cache_key(obj: Any, n: int = 12) -> str:
    """A short stable hash of a JSON-able object (the cache folder of a generated dataset)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


# -- BB -------------------------------------------------------------------------------------------


def attach_from_config(
    model: nn.Module,
    bb_cfg: Mapping[str, Any],
    layers: Any,
    modes: Mapping[str, str] | None,
    optimizer: torch.optim.Optimizer | None,
) -> Any:
    """Attach BB (or a baseline) as the ``bb`` section says; ``None`` for ``method: dense``."""
    cfg = dict(bb_cfg)
    if str(cfg.get("method", "bb")) == "dense":
        return None
    from bbem.bb import BBConfig, attach_bb

    try:
        bcfg = BBConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise UserError(f"bb section: {e}: see METHOD.md for BBConfig's fields") from None
    try:
        return attach_bb(model, bcfg, layers=layers, modes=dict(modes or {}), optimizer=optimizer)
    except ValueError as e:
        raise UserError(f"bb: {e}: check model.bb_layers / model.bb_modes") from None


class UnitMeans:
    """Per-sample channel means of the outputs of modules matching ``patterns`` (fnmatch on
    module names), collected while it is active: the input of METHOD.md's decorrelation.

    ``channel_dim`` is 1 for conv maps ``[N, C, ...]`` and -1 for sequences ``[N, T, C]``; for
    the latter set ``.valid`` to a ``[N, T]`` bool mask so padding does not count.
    """

    def __init__(self, model: nn.Module, patterns: Sequence[str], channel_dim: int = 1):
        import fnmatch

        self.valid: torch.Tensor | None = None
        self.means: dict[str, list[torch.Tensor]] = {}
        self._hooks = []
        for name, m in model.named_modules():
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                self.means[name] = []
                self._hooks.append(m.register_forward_hook(self._hook(name, channel_dim)))

    def _hook(self, name: str, channel_dim: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            x = out.detach().float()
            if channel_dim == 1:
                self.means[name].append(x.reshape(x.shape[0], x.shape[1], -1).mean(-1))
            else:
                w = torch.ones(x.shape[:2]) if self.valid is None else self.valid.float()
                self.means[name].append((x * w[..., None]).sum(1) / w.sum(1, keepdim=True))

        return hook

    def decorrelation(self) -> float:
        """Mean over the modules of the mean |Pearson r| between their units (lower: more
        decorrelated), and remove the hooks."""
        from bbem.bb import decorrelation

        for h in self._hooks:
            h.remove()
        vals = [decorrelation(torch.cat(v)) for v in self.means.values() if v]
        vals = [v for v in vals if math.isfinite(v)]
        return float(np.mean(vals)) if vals else float("nan")


# -- training loop --------------------------------------------------------------------------------


@dataclass
class Task:
    """One companion task, as the loop sees it.

    ``batches(seed)`` starts a stream that yields training batches forever, drawn from
    ``seed`` alone (the loop restarts it at every checkpoint, which makes resume exact); ``loss(model, batch)`` returns a scalar;
    ``evaluate(model)`` returns ``{"val_...": float}`` (called under ``torch.no_grad`` and
    ``model.eval()``); ``best`` names the column that picks ``best.pt`` and ``best_mode`` is
    ``"min"`` or ``"max"``. ``bb_layers``/``bb_modes`` go to ``attach_bb``.
    """

    name: str
    model: nn.Module
    batches: Callable[[int], Iterator[Any]]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]
    best: str
    best_mode: str = "min"
    bb_layers: Any = (nn.Linear,)
    bb_modes: dict[str, str] = field(default_factory=dict)
    final: Callable[[nn.Module], dict[str, float]] | None = None


def run_task(
    make_task: Callable[[Mapping[str, Any]], Task],
    cfg: Mapping[str, Any],
    run_dir: str | os.PathLike,
    resume: bool = False,
) -> dict[str, float]:
    """Set threads and seeds from ``cfg["train"]``, build the task, train it; the last row."""
    threads = cfg["train"].get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    seed_everything(int(cfg["train"]["seed"]))
    return train(make_task(cfg), cfg, run_dir, resume=resume)


def run_from_cli(
    task: str,
    example: str,
    defaults: Mapping[str, Any],
    run: Callable[..., dict[str, float]],
    config: str | None,
    overrides: Sequence[str] = (),
    run_dir: str | None = None,
    resume: str | None = None,
) -> None:
    """``bbem TASK CONFIG [--set k=v] [--run-dir DIR]`` or ``bbem TASK --resume RUN_DIR``.

    ``run(cfg, run_dir, resume=...)`` trains; a resumed run keeps its saved config unchanged.
    """
    if resume is not None:
        if config is not None or overrides:
            raise UserError("--resume continues a run with its saved config: drop CONFIG and --set")
        rd = Path(resume)
        cfg = RunDir.open(rd, lock=False).config
    elif config is None:
        raise UserError(f"bbem {task} needs a CONFIG (e.g. {example}) or --resume RUN_DIR")
    else:
        cfg = load_config(config, defaults, overrides)
        rd = Path(run_dir) if run_dir else default_run_dir(config, task)
    print_summary(task, rd, run(cfg, rd, resume=resume is not None))


def stream_seed(seed: int, step: int) -> int:
    """The seed of the batch stream (and torch's RNG) from checkpoint ``step`` on."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def train(
    task: Task, cfg: Mapping[str, Any], run_dir: str | os.PathLike, resume: bool = False
) -> dict[str, float]:
    """Train ``task.model`` as ``cfg`` says, writing the run directory; return the last metrics.

    Every step: forward, loss, backward, clip, optimiser step, ``bb.step()``. Every
    ``train.eval_every`` steps (and at the end): evaluate, append a metrics row and the
    per-unit BB rows, keep ``best.pt``. ``last.pt`` every ``train.checkpoint_every`` steps;
    the batch stream and torch's RNG restart from ``(train.seed, step)`` there, so
    ``resume=True`` continues from ``last.pt`` exactly as if the run had never stopped.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    tcfg, ocfg = cfg["train"], cfg["optim"]
    steps, eval_every = int(tcfg["steps"]), max(1, int(tcfg["eval_every"]))
    ckpt_every = max(1, int(tcfg["checkpoint_every"]))
    device = torch.device(str(tcfg.get("device", "cpu")))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no GPU is visible: set train.device=cpu")
    rd = RunDir.open(run_dir) if resume else RunDir.create(run_dir, cfg)
    with rd:
        rd.log.info("task %s, %d steps, bb %s", task.name, steps, cfg["bb"])
        model = task.model.to(device)
        opt = torch.optim.AdamW(
            model.parameters(), lr=float(ocfg["lr"]), weight_decay=float(ocfg["weight_decay"])
        )
        # warm up the learning rate, then cosine: Transformers diverge without the first part
        warm = int(ocfg.get("warmup_steps", 0))

        def lr_at(s: int) -> float:
            if s < warm:
                return (s + 1) / warm
            t = (s - warm) / max(1, steps - warm)
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        bb = attach_from_config(model, cfg["bb"], task.bb_layers, task.bb_modes, opt)
        clip = float(ocfg.get("grad_clip", 0) or 0)
        sign = -1.0 if task.best_mode == "max" else 1.0
        best_val, start, elapsed0 = math.inf, 0, 0.0
        losses: list[float] = []
        row: dict[str, Any] = {}
        if resume:
            ck = _load_last(rd)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            if bb is not None and ck.get("bb") is not None:
                bb.load_state_dict(ck["bb"])
            start, best_val = int(ck["step"]), float(ck["best_val"])
            losses, row = list(ck["pending_losses"]), dict(ck["metrics"])
            elapsed0 = float(ck["elapsed_s"])
            rd.truncate_after(start)
            rd.log.info("resumed at step %d", start)
            if start >= steps:
                raise UserError(
                    f"run {rd.path} already finished ({start} steps): nothing to resume"
                )
        t0 = time.perf_counter() - elapsed0

        def restart(step: int) -> Iterator[Any]:
            s = stream_seed(int(tcfg["seed"]), step)
            torch.manual_seed(s)
            return task.batches(s)

        def payload(step: int, metrics: Mapping[str, float]) -> dict[str, Any]:
            # The EM checkpoints' payload (bbem.checkpoint adds the format tag), plus ``task``.
            return {
                "task": task.name,
                "step": step,
                "config": dict(cfg),
                "model": model.state_dict(),
                "bb": bb.state_dict() if bb is not None else None,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "metrics": dict(metrics),
                "best_val": best_val,
                "pending_losses": list(losses),
                "elapsed_s": time.perf_counter() - t0,
            }

        columns = (
            TextColumn(f"[bold]{task.name}[/] {cfg['bb'].get('method', 'bb')}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, disable=bool(tcfg.get("quiet", False))) as progress:
            bar = progress.add_task("train", total=steps, completed=start, info="")
            batches = restart(start)
            for step in range(start + 1, steps + 1):
                model.train()
                batch = next(batches)
                loss = task.loss(model, batch)
                if not torch.isfinite(loss):
                    raise UserError(
                        f"{task.name}: loss became {loss.item()} at step {step}: lower optim.lr"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                sched.step()
                if bb is not None:
                    bb.step()
                losses.append(float(loss.item()))
                if step % eval_every == 0 or step == steps:
                    model.eval()
                    with torch.no_grad():
                        val = task.evaluate(model)
                        if step == steps and task.final is not None:
                            val.update(task.final(model))
                    density = float(bb.summary()["density"]) if bb is not None else 1.0
                    row = {
                        "step": step,
                        "time_s": round(time.perf_counter() - t0, 2),
                        "train_loss": round(float(np.mean(losses)), 5),
                        "density": round(density, 5),
                        "lr": opt.param_groups[0]["lr"],
                        **{k: round(float(v), 5) for k, v in val.items()},
                    }
                    if bb is not None:  # the same BB columns as the EM training
                        row |= bb_summary_columns(bb.summary())
                    losses = []
                    rd.append_metrics(row)
                    rd.append_bb(step, bb)
                    rd.log.info("step %d %s", step, row)
                    score = sign * float(val[task.best])
                    if score < best_val:
                        best_val = score
                        save_checkpoint(rd.checkpoint_path("best"), payload(step, row))
                    progress.update(bar, info=f"{task.best} {val[task.best]:.3f}")
                if step % ckpt_every == 0 or step == steps:
                    save_checkpoint(rd.checkpoint_path("last"), payload(step, row))
                    batches = restart(step)
                progress.update(bar, advance=1)
        return row


def _load_last(rd: RunDir) -> dict[str, Any]:
    path = rd.checkpoint_path("last")
    if not path.is_file():
        raise UserError(f"{rd.path} has no checkpoints/last.pt yet: start the run again instead")
    ck = load_checkpoint(path)
    missing = [k for k in ("scheduler", "best_val", "pending_losses", "elapsed_s") if k not in ck]
    if missing:
        raise UserError(f"{path} predates resume support (lacks {missing}): start the run again")
    return ck


def print_summary(task: str, run_dir: Path, row: Mapping[str, Any]) -> None:
    """The last metrics row as one line per value (what a user reads after a run)."""
    from rich.console import Console

    c = Console()
    c.print(f"[bold]{task}[/] finished: {run_dir}")
    for k, v in row.items():
        c.print(f"  {k:<18} {v}")
