"""What the "Train" widget runs, without Qt: ``bbem train`` in a subprocess, and the run's
curves read from its CSVs while it trains.

The widget starts the same command a user would type (``python -m bbem train CONFIG --run-dir
DIR``, or ``--resume DIR`` once the run has a checkpoint), so a run started in the viewer is an
ordinary run directory: ``bbem report``, ``bbem infer`` and the On-rates widget read it, and a
stopped run resumes from the shell as well as from the widget.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from bbem.errors import UserError
from bbem.report import csv_columns, smooth
from bbem.rundir import RunDir
from napari_bbem.evaluate import dark

#: Seconds a stopped run may take to exit before it is killed (it resumes from its checkpoint).
STOP_TIMEOUT_S = 30.0


def can_resume(run_dir: str | os.PathLike) -> bool:
    """True when ``run_dir`` holds a checkpoint ``bbem train --resume`` continues from."""
    return (Path(run_dir) / "checkpoints" / "last.pt").is_file()


def train_command(config: str | os.PathLike | None, run_dir: str | os.PathLike) -> list[str]:
    """``bbem train`` for ``config`` into ``run_dir``, or resuming ``run_dir`` when it can."""
    run = Path(run_dir)
    if can_resume(run):
        return [sys.executable, "-m", "bbem", "train", "--resume", str(run)]
    if config is None or not Path(config).is_file():
        raise UserError(f"config {config} does not exist: choose a YAML config file")
    RunDir.check_new(run)  # bbem train's own rule, said before a process starts
    return [sys.executable, "-m", "bbem", "train", str(config), "--run-dir", str(run)]


def _interruptible() -> None:
    """In the child before exec: SIGINT back to its default, so Python installs its own
    KeyboardInterrupt handler (it keeps an inherited SIG_IGN)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class TrainingProcess:
    """A ``bbem train`` subprocess; its output goes to ``log`` (a temporary file, since a pipe
    nobody reads would stall the run)."""

    run_dir: Path
    command: list[str]
    log: Path
    proc: subprocess.Popen = field(repr=False)

    @classmethod
    def start(cls, config: str | os.PathLike | None, run_dir: str | os.PathLike) -> TrainingProcess:
        command = train_command(config, run_dir)
        fd, log = tempfile.mkstemp(prefix="bbem-train-widget-", suffix=".log")
        with os.fdopen(fd, "wb") as out:
            proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Stop is Ctrl-C: a napari started with SIGINT ignored (a background job of a
                # shell script, nohup ... &) would pass that on, and Stop would do nothing
                preexec_fn=_interruptible if os.name == "posix" else None,
            )
        return cls(Path(run_dir), command, Path(log), proc)

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """Interrupt the run as Ctrl-C would; kill it if it has not exited after ``timeout``
        seconds. Returns the exit code. Either way ``--resume`` continues from the last
        checkpoint."""
        if self.running():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def error_line(self) -> str:
        """The last line the run printed (bbem prints a user error as one line)."""
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""

    def close(self) -> None:
        self.stop()
        self.log.unlink(missing_ok=True)


def read_csv_columns(path: Path) -> dict[str, np.ndarray]:
    """A CSV the trainer is appending to, as numeric columns; a half-written last row is
    left out."""
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    while rows and any(v is None or v == "" for v in rows[-1].values()):
        rows.pop()  # the line the trainer is writing right now
    return csv_columns(rows)


@dataclass(frozen=True)
class Curves:
    """What a run has logged so far: ``loss`` (loss.csv) and ``metrics`` (metrics.csv) columns."""

    loss: dict[str, np.ndarray]
    metrics: dict[str, np.ndarray]

    @property
    def last_step(self) -> int:
        steps = [c["step"][-1] for c in (self.loss, self.metrics) if len(c.get("step", ()))]
        return int(max(steps)) if steps else 0

    def best(self, key: str = "val_pr_auc") -> tuple[float, int] | None:
        """The best value of a validation column and its step, or None before the first."""
        v = self.metrics.get(key)
        if v is None or not len(v) or np.all(np.isnan(v)):
            return None
        i = int(np.nanargmax(v))
        return float(v[i]), int(self.metrics["step"][i])


def read_curves(run_dir: str | os.PathLike) -> Curves:
    run = Path(run_dir)
    return Curves(read_csv_columns(run / "loss.csv"), read_csv_columns(run / "metrics.csv"))


def plot_training(fig: Figure, curves: Curves, title: str = "") -> Figure:
    """Two panels on ``fig``: the training loss (every logged step faint, smoothed on top) and
    the validation PR-AUC and best F1 at each evaluation."""
    fig.clear()
    ax_l, ax_v = fig.subplots(2, 1)
    loss = curves.loss
    if len(loss.get("step", ())):
        y = loss["loss"]
        span = max(5, len(y) // 25)
        ax_l.plot(loss["step"], y, color="#4fc3f7", alpha=0.3, lw=0.8, label="train loss")
        ax_l.plot(loss["step"], smooth(y, span), color="#4fc3f7", lw=1.8, label="smoothed")
        ax_l.legend(fontsize=7)
    ax_l.set(ylabel="loss", title=title or "training")
    m = curves.metrics
    for key, colour in (("val_pr_auc", "#ffb74d"), ("val_f1_best", "#81c784")):
        if len(m.get(key, ())):
            ax_v.plot(m["step"], m[key], marker="o", ms=3, color=colour, label=key[4:])
    if len(m.get("step", ())):
        ax_v.legend(fontsize=7)
    ax_v.set(xlabel="step", ylabel="validation", ylim=(0, 1))
    for ax in (ax_l, ax_v):
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    return dark(fig)
