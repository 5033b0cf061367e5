"""The run directory every training job writes (EM training and the companion tasks alike).

Layout::

    RUN_DIR/config.yaml          resolved config
    RUN_DIR/train.log            log file
    RUN_DIR/metrics.csv          one row per evaluation (always step, time_s, train_loss, density)
    RUN_DIR/loss.csv             step,loss,lr,time_s every ``train.log_every`` steps
    RUN_DIR/bb.csv               step,layer,mode,unit,on_rate,degree,full_fan,traffic
    RUN_DIR/checkpoints/         last.pt, best.pt (see bbem.model for the format)
    RUN_DIR/report/              made by `bbem report`

CSV rows are appended as they come; ``truncate_after`` makes a resumed run neither lose nor
duplicate rows. Generic on purpose: it knows nothing of EM, only of ``bbem.bb`` stats.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bbem.atomic import WRITE_REFUSALS, atomic_output, check_writable, output_lock, remove
from bbem.errors import UserError

LOSS_COLUMNS = ("step", "loss", "lr", "time_s")
BB_COLUMNS = ("step", "layer", "mode", "unit", "on_rate", "degree", "full_fan", "traffic")
#: ``bb.summary()`` keys logged as ``bb_<key>`` columns of metrics.csv, by every training job.
BB_SUMMARY_KEYS = ("param_density", "on_rate_mean", "entropy_mean", "balance_r2")


class RunDir:
    """A run directory; :meth:`create` for a new run, :meth:`open` to resume one.

    Use it as a context manager: while open it holds the run's lock (a second job into the
    same directory is refused), and a run that fails before its first checkpoint removes what
    it wrote, so the corrected command can use the same ``--run-dir``.
    """

    def __init__(self, path: str | os.PathLike, lock: bool = True):
        self.path = Path(path)
        self.metrics_csv = self.path / "metrics.csv"
        self.bb_csv = self.path / "bb.csv"
        self.loss_csv = self.path / "loss.csv"
        self.checkpoints = self.path / "checkpoints"
        self._stack = contextlib.ExitStack()
        self._created: bool | None = None  # True: made here; False: an empty folder was there
        self._log: logging.Logger | None = None
        if lock:
            self._stack.enter_context(output_lock(self.path))

    @property
    def log(self) -> logging.Logger:
        """The run's ``train.log``, opened on first use and closed with the run."""
        if self._log is None:
            self._log = _file_logger(self.path / "train.log")
            self._stack.callback(_close_logger, self._log)
        return self._log

    @classmethod
    def create(cls, path: str | os.PathLike, config: Mapping[str, Any]) -> RunDir:
        p = cls.check_new(path)
        existed = p.exists()
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"cannot create the run directory {p}: {e.strerror}: choose another --run-dir"
            ) from None
        rd = cls(p)
        rd._created = not existed
        try:
            (p / "checkpoints").mkdir(exist_ok=True)
            with atomic_output(p / "config.yaml", overwrite=True) as tmp:
                tmp.write_text(yaml.safe_dump(_plain(config), sort_keys=False))
        except BaseException:
            rd.__exit__(*sys.exc_info())  # removes what was made; an OSError becomes a UserError
            raise
        return rd

    @staticmethod
    def check_new(path: str | os.PathLike) -> Path:
        """A UserError unless a new run can go to ``path`` (absent, or an empty folder we may
        write); writes nothing."""
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise UserError(f"run directory {p} is a file: choose another --run-dir")
        if p.exists() and any(p.iterdir()):
            raise UserError(
                f"run directory {p} exists and is not empty: choose another --run-dir or resume it with --resume {p}"
            )
        try:
            check_writable(p)  # names the file in the way, or the read-only folder, at once
        except UserError as e:
            raise UserError(f"{e}: choose another --run-dir") from None
        return p

    @classmethod
    def open(cls, path: str | os.PathLike, lock: bool = True) -> RunDir:
        """An earlier run: to resume it (locked), or ``lock=False`` only to read it."""
        p = Path(path)
        if not (p / "config.yaml").is_file():
            raise UserError(
                f"{p} is not a run directory (no config.yaml): pass the --run-dir of an earlier run"
            )
        return cls(p, lock=lock)

    def close(self) -> None:
        """Release the lock and the log file."""
        self._stack.close()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()
        started = self.metrics_csv.exists() or any(self.checkpoints.glob("*.pt"))
        cleaned = exc_type is not None and self._created is not None and not started
        if cleaned:
            # a failed start: nothing worth keeping, and leaving config.yaml would block a retry
            if self._created:
                remove(self.path)
            else:
                for child in self.path.iterdir():
                    remove(child)
        refused = isinstance(exc, OSError) and exc.errno in WRITE_REFUSALS
        if refused and _inside(exc.filename, self.path):
            # The OS refused a write into the run (permissions, read-only, disk full): the user's
            # to fix, so one line instead of a traceback (root passes the os.access checks).
            fix = "choose a writable --run-dir"
            if not cleaned:
                fix = f"fix that and continue the run with --resume {self.path}"
            raise UserError(f"cannot write {exc.filename}: {exc.strerror}: {fix}") from None

    @property
    def config(self) -> dict[str, Any]:
        return yaml.safe_load((self.path / "config.yaml").read_text())

    def checkpoint_path(self, name: str) -> Path:
        """``checkpoints/<name>.pt`` (``name`` is ``last`` or ``best``)."""
        return self.checkpoints / f"{name.removesuffix('.pt')}.pt"

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one evaluation row; a new column rewrites the file with the wider header."""
        _append_rows(self.metrics_csv, [dict(row)])

    def append_bb(self, step: int, bb: Any) -> None:
        """One row per controlled unit of every masked layer, from ``bb.stats()``."""
        rows = bb_rows(step, bb.stats()) if bb is not None else []
        _append_rows(self.bb_csv, rows, header=BB_COLUMNS)

    def truncate_after(self, step: int) -> None:
        """Drop rows with a step larger than ``step`` (the checkpoint a resumed run starts from)."""
        for path in (self.metrics_csv, self.bb_csv, self.loss_csv):
            if not path.is_file():
                continue
            header, rows = _read(path)
            kept = [r for r in rows if r.get("step", "") == "" or int(float(r["step"])) <= step]
            # always rewrite: this also drops a row a kill left half-written
            _write(path, header, kept)

    def append_loss(self, row: Mapping[str, Any]) -> None:
        """Append one training-loss row (``step, loss, lr, time_s``)."""
        _append_rows(self.loss_csv, [dict(row)], header=LOSS_COLUMNS)

    def read_loss(self) -> list[dict[str, str]]:
        return _read(self.loss_csv)[1] if self.loss_csv.is_file() else []

    def read_metrics(self) -> list[dict[str, str]]:
        return _read(self.metrics_csv)[1] if self.metrics_csv.is_file() else []


def _inside(filename: Any, folder: Path) -> bool:
    """Whether an OSError's ``filename`` lies in ``folder`` (False when it names no file)."""
    if not isinstance(filename, (str, bytes, os.PathLike)):
        return False
    try:
        f = Path(os.fsdecode(filename)).absolute()
    except (TypeError, ValueError):
        return False
    return f == folder.absolute() or folder.absolute() in f.parents


def bb_summary_columns(summary: Mapping[str, float]) -> dict[str, float]:
    """The ``bb_<key>`` metrics.csv columns of a ``bb.summary()``."""
    return {f"bb_{k}": round(float(summary[k]), 6) for k in BB_SUMMARY_KEYS if k in summary}


def bb_rows(step: int, stats: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Flatten ``bb.stats()`` into bb.csv rows (one per unit the rule controls)."""
    rows: list[dict[str, Any]] = []
    for layer, s in stats.items():
        mode = s.get("mode", "in")
        degrees = s["fan_in"] if mode == "in" else s["fan_out"]
        full = s.get("full_fan", len(s["fan_out"]) if mode == "in" else len(s["fan_in"]))
        on = [float(v) for v in s["on_rate"]]
        deg = [int(v) for v in degrees]
        for u, (a, k) in enumerate(zip(on, deg, strict=True)):
            rows.append(
                {
                    "step": step,
                    "layer": layer,
                    "mode": mode,
                    "unit": u,
                    "on_rate": round(a, 6),
                    "degree": k,
                    "full_fan": int(full),
                    "traffic": round(a * k, 6),
                }
            )
    return rows


#: numeric dtypes of bb.csv's columns (layer and mode are text)
_BB_DTYPES = {
    "step": np.int64,
    "unit": np.int64,
    "on_rate": np.float64,
    "degree": np.int64,
    "full_fan": np.int64,
    "traffic": np.float64,
}


def read_bb_table(path: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """``bb.csv`` as one array per column (``[rows]``), or None when absent or without a row.

    Half-written rows (a run killed mid-write) are dropped; missing columns are a UserError.
    The one reader of bb.csv: ``bbem report`` and the napari plugin both use it.
    """
    p = Path(path)
    if not p.is_file():
        return None
    header, rows = _read(p)
    missing = [c for c in BB_COLUMNS if c not in header]
    if missing:
        raise UserError(f"{p} lacks columns {missing}: was it written by bbem.rundir?")
    rows = [r for r in rows if all(r[c] != "" for c in BB_COLUMNS)]
    if not rows:
        return None
    table = {c: np.array([r[c] for r in rows], dtype=t) for c, t in _BB_DTYPES.items()}
    table["layer"] = np.array([r["layer"] for r in rows], dtype=str)
    table["mode"] = np.array([r["mode"] for r in rows], dtype=str)
    return table


def bb_layers(table: Mapping[str, np.ndarray]) -> list[str]:
    """The layers of a :func:`read_bb_table` table in network order (bb.csv is written layer
    by layer, so first-seen order is the network's)."""
    return list(dict.fromkeys(table["layer"].tolist()))


def bb_step_rows(
    table: Mapping[str, np.ndarray], step: float, layer: str | None = None
) -> dict[str, np.ndarray]:
    """The rows of one logged step (of one ``layer``, ordered by unit), as columns ``[rows]``.
    The one way report and the napari plugin cut bb.csv."""
    sel = table["step"] == step
    if layer is not None:
        sel &= table["layer"] == layer
    cols = {k: v[sel] for k, v in table.items()}
    if layer is not None:
        order = np.argsort(cols["unit"], kind="stable")
        cols = {k: v[order] for k, v in cols.items()}
    return cols


def _append_rows(
    path: Path, rows: list[dict[str, Any]], header: Iterable[str] | None = None
) -> None:
    if path.is_file():
        old_header, _ = _read(path, header_only=True)
        new_keys = [k for r in rows for k in r if k not in old_header]
        if new_keys:
            _, old_rows = _read(path)
            _write(path, list(old_header) + list(dict.fromkeys(new_keys)), old_rows + rows)
            return
        with path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=old_header).writerows(_clean(r) for r in rows)
            f.flush()
            os.fsync(f.fileno())
        return
    cols = list(header) if header is not None else list(dict.fromkeys(k for r in rows for k in r))
    _write(path, cols, rows)


def _read(path: Path, header_only: bool = False) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        # a row cut short by a kill mid-write has fewer fields: drop it rather than keep half a row
        rows = [] if header_only else [r for r in reader if None not in r.values()]
    return header, rows


def _write(path: Path, header: list[str], rows: list[dict[str, Any]]) -> None:
    with atomic_output(path, overwrite=True) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(_clean(r) for r in rows)


def _clean(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def _plain(obj: Any) -> Any:
    """Config values as YAML-safe builtins (tuples -> lists, paths -> str)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def _close_logger(logger: logging.Logger) -> None:
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


def _file_logger(path: Path) -> logging.Logger:
    logger = logging.getLogger(f"bbem.run.{path.resolve()}")
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the console belongs to the progress bar
    if not logger.handlers:
        path.parent.mkdir(parents=True, exist_ok=True)
        h = logging.FileHandler(path)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(h)
    return logger
