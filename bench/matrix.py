"""The method x density x seed matrix: BB against dense, magnitude and random, one CSV row a run.

A run is (config, method, density, seed, --set overrides). Each finished run appends one row
to ``--results`` (a CSV under bench/results/, committed): the scores, the achieved density, the
BB diagnostics, seconds per step, the machine, the command and the git commit. A rerun skips
the rows already there (same config hash, method, density and seed), so the matrix can be run
in parts (``--only method=bb_in,density=0.1``) and resumed after a stop. ``bench/table.py``
turns the CSVs into the README's table and plot. Run from the repository root:

    .venv/bin/python bench/matrix.py --config configs/bench/real_bb.yaml \
        --methods dense,bb_in,bb_out,bb_tiers,magnitude,random \
        --densities 0.7,0.5,0.3,0.1,0.05 --seeds 0,1,2 --results bench/results/vnc.csv

Methods: ``dense``, ``bb`` (the config's mode), ``bb_in``, ``bb_out``, ``bb_tiers``,
``magnitude``, ``random``; any of them with extra bb keys, ``bb_in:regrow=false``; and a row
name of one's own, ``noregrow=bb_in:regrow=false``. The evidence issue's ablations are
``noregrow=bb_in:regrow=false``, ``spread025=bb_in:spread=0.25``, ``spread4=bb_in:spread=4``
(a quarter and four times the default spread of 1 mean degree per unit of log-odds),
``output=bb_in:probe=output`` (on-rate read at the conv output) and
``rank=bb_in:allocation=rank`` (degrees from on-rate rank, without the log-odds shape).
Rows named ``*_K`` ran under the first rule, spread a fraction of the full fan K (METHOD.md,
0.5 unless the name says otherwise); bench/results/README.md.

A companion config (``configs/asr_quick.yaml``, ``configs/faceid.yaml``: a top-level ``task``)
runs through the same matrix with the companion's own scores (WER, CER and WER by word
frequency; top-1, ROC AUC and TAR at FAR 1e-2 and 1e-3) and diagnostics, one CSV per config;
use its methods ``dense,bb,magnitude,random`` (``bb``: the config's per-layer modes). The
random-forest baseline is EM's and is left out there.

Dense runs ignore the density: one dense run per seed serves every density, recorded once
(density_target empty). The same holds for
``baseline_rf``, the random-forest pixel classifier of bench/baseline_rf.py on the same boxes
with the run's seed: every matrix has its row (one per seed, first) unless ``--no-baseline``,
so each U-Net figure stands beside the baseline measured in the same matrix. ``--only`` keeps the
runs whose method, density and seed match (a key given twice keeps either value); the dense
run matches every density.

Per run: PR-AUC and best F1 of the voxel validation (final, and the best over the run with its
step: a BB run's best may come from before its masks reached the target density); object F1 at
IoU 0.2 and the CREMI score of the final model (``last.pt``) on the first validation box at the
final validation threshold (``bbem.metrics.evaluate``, as bench/detector.py scores); edge and
parameter density; mean binary entropy of on-rates and the balance R^2 of the masked layers
(BB's own statistics: empty for dense); the decorrelation (mean |r| between the channel means
of every conv layer's units over the validation windows, bbem.bb.decorrelation) for every
method; seconds per training step (wall time of ``train`` including its validations / steps).

``--quick`` is the reduced matrix: methods dense,bb_in,magnitude,random at densities 0.5 and
0.1, seeds 0 and 1 (14 runs: 2 dense + 3 x 2 x 2), 30 steps each (bb warm-up 6, ramp 12,
refresh every 4, one validation at the end). It checks the pipeline on the real data and
gives a first look; 30 steps are far too few to rank the methods. The arithmetic, from
configs/bench/real_bb.yaml measured on this 2-core machine (torch 2.13 CPU): 1.37 s per
training step (steps 10-20 of a run at density 0.1, refreshing every 5 steps), 6 s per
validation, about 7 s to set up a run (data, model), 13.6 s to score one (prediction of the
validation box, evaluate, decorrelation pass), 3.5 s once for the validation zarr. Per run
7 + 30 x 1.37 + 6 + 13.6 = 67.7 s; 14 runs = 948 s, about 16 minutes, under 20.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

OUT = Path("bench/out/matrix")
REPO = Path(__file__).resolve().parents[1]

#: readable method names and the bb keys they set
ALIASES: dict[str, tuple[str, ...]] = {
    "dense": ("method=dense",),
    "bb": ("method=bb",),
    "bb_in": ("method=bb", "mode=in"),
    "bb_out": ("method=bb", "mode=out"),
    "bb_tiers": ("method=bb_tiers",),
    "magnitude": ("method=magnitude",),
    "random": ("method=random",),
}

QUICK_METHODS = "dense,bb_in,magnitude,random"
QUICK_DENSITIES = "0.5,0.1"
QUICK_SEEDS = "0,1"
QUICK_SETS = (
    "train.steps=30",
    "train.eval_every=30",
    "train.checkpoint_every=30",
    "train.log_every=10",
    "bb.warmup_steps=6",
    "bb.ramp_steps=12",
    "bb.refresh_every=4",
)

#: the run's identity, then its scores (per task), then how it ran
ID_COLUMNS = ("config", "config_hash", "method", "density_target", "seed", "steps")
SCORE_COLUMNS: dict[str, tuple[str, ...]] = {
    "em": (
        "density_achieved",
        "param_density",
        "val_pr_auc",
        "val_pr_auc_best",
        "best_step",
        "val_f1_best",
        "val_threshold",
        "object_f1_iou02",
        "object_f1_iou05",
        "cremi_score",
        "entropy_mean",
        "decorrelation",
        "balance_r2",
    ),
    # the companions: their own validation numbers (bbem.companions), same diagnostics
    "asr": (
        "density_achieved",
        "param_density",
        "val_wer",
        "val_cer",
        "val_wer_head",
        "val_wer_middle",
        "val_wer_tail",
        "best_score",
        "best_step",
        "entropy_mean",
        "decorrelation",
        "balance_r2",
    ),
    "faceid": (
        "density_achieved",
        "param_density",
        "val_top1",
        "val_auc",
        "val_tar_far1e-2",
        "val_tar_far1e-3",
        "val_real_auc",
        "best_score",
        "best_step",
        "entropy_mean",
        "decorrelation",
        "balance_r2",
    ),
}
RUN_COLUMNS = (
    "seconds_per_step",
    "train_seconds",
    "score_seconds",
    "overrides",
    "run_dir",
    "machine",
    "torch",
    "command",
    "commit",
)


def columns(task: str) -> tuple[str, ...]:
    """The CSV header of a ``task``'s results (a companion's rows also name their task)."""
    extra = () if task == "em" else ("task",)
    return (*ID_COLUMNS[:1], *extra, *ID_COLUMNS[1:], *SCORE_COLUMNS[task], *RUN_COLUMNS)


#: the EM task's header (the committed CSVs' columns)
COLUMNS = columns("em")


@dataclass(frozen=True)
class Method:
    """A row of the table: its name and the ``bb.*`` overrides it sets."""

    name: str
    sets: tuple[str, ...]

    @property
    def dense(self) -> bool:
        return "bb.method=dense" in self.sets

    @property
    def baseline(self) -> bool:
        return self.name == BASELINE.name and not self.sets

    @property
    def one_per_seed(self) -> bool:
        """Dense and the baseline have no density: one run per seed serves every density."""
        return self.dense or self.baseline


#: the pixel-classifier reference (bench/baseline_rf.py), one row per seed beside the U-Nets
BASELINE = Method("baseline_rf", ())


@dataclass(frozen=True)
class Run:
    config: str
    method: Method
    density: float | None  # None: dense
    seed: int
    overrides: tuple[str, ...]

    def sets(self) -> list[str]:
        s = [*self.overrides, *self.method.sets, f"train.seed={self.seed}"]
        if self.density is not None:
            s += [f"bb.seed={self.seed}", f"bb.density={self.density:g}"]
        return s


def parse_method(spec: str) -> Method:
    """``bb_out`` -> bb.method=bb, bb.mode=out; ``bb_in:regrow=false`` adds bb.regrow=false;
    ``noregrow=bb_in:regrow=false`` names the row ``noregrow``."""
    if spec == BASELINE.name:
        return BASELINE
    name, _, rest = spec.partition("=") if "=" in spec.split(":")[0] else ("", "", spec)
    base, *extra = rest.split(":")
    keys = ALIASES.get(base, (f"method={base}",))
    return Method(name or rest, tuple(f"bb.{kv}" for kv in (*keys, *extra)))


def parse_only(text: str | None) -> dict[str, set[str]]:
    """``method=bb_in,density=0.1`` -> {"method": {"bb_in"}, "density": {"0.1"}}."""
    only: dict[str, set[str]] = {}
    for part in filter(None, (text or "").split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in ("method", "density", "seed"):
            raise SystemExit(f"--only takes method=, density= and seed=, got {part!r}")
        only.setdefault(key, set()).add(value)
    return only


def matches(run: Run, only: Mapping[str, set[str]]) -> bool:
    if "method" in only and run.method.name not in only["method"]:
        return False
    if "seed" in only and str(run.seed) not in only["seed"]:
        return False
    if "density" in only and run.density is not None:
        return any(float(d) == run.density for d in only["density"])
    return True


def plan(
    config: str,
    methods: Sequence[Method],
    densities: Sequence[float],
    seeds: Sequence[int],
    overrides: Sequence[str],
    only: Mapping[str, set[str]],
) -> list[Run]:
    """Every run of the matrix that ``only`` keeps, seed by seed; one dense run per seed."""
    runs = []
    for seed in seeds:
        for m in methods:
            for d in [None] if m.one_per_seed else densities:
                runs.append(Run(config, m, d, seed, tuple(overrides)))
    return [r for r in runs if matches(r, only)]


def task_of(config: str) -> str:
    """``em`` for a bbem train config; a companion's name (``asr``, ``faceid``) for its config,
    whose top-level ``task`` key names it."""
    from bbem.configfile import read_config

    task = read_config(config, example="configs/bench/real_bb.yaml").get("task", "em")
    if task not in SCORE_COLUMNS:
        raise SystemExit(f"{config}: task {task!r} has no matrix columns ({sorted(SCORE_COLUMNS)})")
    return str(task)


def companion(task: str) -> Any:
    """The companion module of ``task`` (its DEFAULTS and run)."""
    import importlib

    return importlib.import_module(f"bbem.companions.{task}")


def load(run: Run) -> Any:
    """The run's config: a RunConfig for EM, a companion's merged dict otherwise."""
    task = task_of(run.config)
    if task != "em":
        from bbem.companions.common import load_config as load_companion

        return load_companion(run.config, companion(task).DEFAULTS, run.sets())
    from bbem.config import load_config

    return load_config(run.config, run.sets())


#: config keys that came after the first committed rows, with their defaults (config_hash)
LATER_DEFAULTS: dict[str, dict[str, Any]] = {
    "bb": {"allocation": "logodds", "edges": "magnitude"},
    "loss": {"near_weight": 1.0, "near_radius": 4},
}


#: bb.spread's default when the first rows were committed (config_hash)
FIRST_SPREAD = 0.5
#: hashed with every bb-rule row since spread became relative to the mean degree: a row of
#: the old rule (spread of the full fan K) is never taken for one of the new, whatever its
#: overrides say (the committed old-rule rows are renamed ``*_K``, bench/results/README.md)
BB_RULE = " bb.spread of the mean degree"


def companion_hash(cfg: Mapping[str, Any], dense: bool) -> str:
    """:func:`config_hash` of a companion's config dict: the same exclusions."""
    import json

    c = {k: dict(v) if isinstance(v, Mapping) else v for k, v in cfg.items()}
    c["train"] = {k: v for k, v in c.get("train", {}).items() if k not in ("threads", "quiet")}
    if dense:
        c.pop("bb", None)
    text = json.dumps(c, sort_keys=True, default=str)
    if not dense and c.get("bb", {}).get("method", "bb") == "bb":
        text += BB_RULE
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def config_hash(cfg: Any, dense: bool) -> str:
    """A hash of the whole resolved config, the resume key of a run: the thread count is
    left out (speed, not the experiment), a dense run's bb section (it is not used), and
    ``data.root``, which load_config makes absolute: the same run from another clone or
    machine must find its committed row."""
    exclude: dict[str, Any] = {"train": {"threads"}, "data": {"root"}}
    # keys added after rows were committed, at their defaults: old rows stay found
    for section, defaults in LATER_DEFAULTS.items():
        part = getattr(cfg, section)
        exclude[section] = {k for k, v in defaults.items() if getattr(part, k, v) == v}
    if dense:
        exclude["bb"] = True
    elif cfg.bb.method != "bb":
        # spread is read by the bb rule alone; magnitude, random and bb_tiers rows were hashed
        # at its first default (0.5, of K), so its move to 1.0 (of the mean degree) leaves
        # rows that never read it found
        cfg = cfg.model_copy(update={"bb": cfg.bb.model_copy(update={"spread": FIRST_SPREAD})})
    text = cfg.model_dump_json(exclude=exclude)
    if not dense and cfg.bb.method == "bb":
        text += BB_RULE
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def run_hash(run: Run) -> str:
    """The resume key of ``run``: :func:`config_hash`, or for the baseline a hash of the data
    section alone (the forest reads nothing else of the config)."""
    cfg = load(run)
    if isinstance(cfg, Mapping):
        return companion_hash(cfg, run.method.dense)
    if run.method.baseline:
        data = cfg.data.model_dump_json(exclude={"root"})
        return hashlib.sha1(f"baseline_rf {data}".encode()).hexdigest()[:10]
    return config_hash(cfg, run.method.dense)


def row_key(row: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """What makes a row unique: config hash, method, density and seed, as CSV text."""
    return (
        str(row["config_hash"]),
        str(row["method"]),
        str(row["density_target"]),
        str(row["seed"]),
    )


def density_text(d: float | None) -> str:
    return "" if d is None else f"{d:g}"


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: Mapping[str, Any], header: Sequence[str] = COLUMNS) -> None:
    """Append ``row`` under a lock: read, append, write a temporary, rename (bbem.atomic)."""
    from bbem.atomic import atomic_output, output_lock

    path.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(path):
        rows: list[Mapping[str, Any]] = [*read_rows(path), row]
        with (
            atomic_output(path, overwrite=True, kind="text") as tmp,
            tmp.open("w", newline="") as f,
        ):
            w = csv.DictWriter(f, header, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)


def git_commit() -> str:
    """``git rev-parse HEAD``, with ``-dirty`` when tracked files other than the results
    (bench/results/, which the matrix itself appends to) differ from it."""

    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip()

    head = git("rev-parse", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results")
    return head + ("-dirty" if changed else "")


def machine() -> str:
    return f"{platform.machine()} {platform.system()} {platform.release()}, {os.cpu_count()} cpus"


def decorrelation_of(model: Any, cfg: Any) -> float:
    """Mean over the conv layers (more than one output channel) of the mean |Pearson r|
    between their units' channel means over the validation windows (bbem.bb.decorrelation)."""
    import math

    import numpy as np
    import torch
    from torch import nn

    from bbem.bb import channel_means, decorrelation
    from bbem.data import load_val_volumes
    from bbem.train import validate

    means: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv3d) and m.out_channels > 1:
            means[name] = []

            def hook(_m: Any, _a: Any, out: torch.Tensor, name: str = name) -> None:
                means[name].append(channel_means(out))

            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            validate(model, load_val_volumes(cfg), cfg.data.patch_size, cfg.model.model_dump())
    finally:
        for h in hooks:
            h.remove()
    vals = [decorrelation(torch.cat(v)) for v in means.values() if v]
    vals = [v for v in vals if math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def score(run_dir: Path, cfg: Any, threshold: float, val: Path) -> dict[str, Any]:
    """Object F1 and CREMI score of ``last.pt`` on ``val`` at ``threshold``; decorrelation."""
    from detector import score_checkpoint, scores

    from bbem.model import load_inference_model

    last = run_dir / "checkpoints" / "last.pt"
    s = scores(score_checkpoint(last, val, threshold, run_dir / "val_prediction.zarr"), 0.0)
    model, _ = load_inference_model(last)
    return {
        "object_f1_iou02": s["obj_f1_02"],
        "object_f1_iou05": s["obj_f1_05"],
        "cremi_score": s["cremi"],
        "decorrelation": decorrelation_of(model, cfg),
    }


def val_volume(cfg: Any, out: Path) -> Path:
    """The first validation box as a zarr, one per data section (shared by the runs)."""
    from detector import write_val_volume

    key = hashlib.sha1(cfg.data.model_dump_json().encode()).hexdigest()[:10]
    out.mkdir(parents=True, exist_ok=True)
    return write_val_volume(cfg, out / f"val-{key}.zarr")


def provenance(command: str) -> dict[str, Any]:
    import torch

    return {
        "machine": machine(),
        "torch": torch.__version__,
        "command": command,
        "commit": git_commit(),
    }


def execute_baseline(run: Run, out: Path, command: str) -> dict[str, Any]:
    """Train and score the forest on the config's boxes (bench/baseline_rf.py) with the run's
    seed, and return its CSV row: the same validation scores as a U-Net row."""
    from baseline_rf import run_baseline
    from detector import scores

    key = run_hash(run)
    run_dir = out / f"{load(run).name}-{BASELINE.name}-s{run.seed}-{key}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    r = run_baseline(run.config, run_dir, run.overrides, seed=run.seed)
    s = scores(r, 0.0)
    return {
        "config": run.config,
        "config_hash": key,
        "method": BASELINE.name,
        "density_target": "",
        "seed": run.seed,
        "val_pr_auc": s["pr_auc"],
        "val_f1_best": s["f1_best"],
        "val_threshold": s["threshold"],
        "object_f1_iou02": s["obj_f1_02"],
        "object_f1_iou05": s["obj_f1_05"],
        "cremi_score": s["cremi"],
        "train_seconds": r["seconds"]["fit"],
        "score_seconds": round(time.perf_counter() - t0 - r["seconds"]["fit"], 1),
        "overrides": " ".join(run.overrides),
        "run_dir": str(run_dir),
        **provenance(command),
    }


def fresh_run_dir(run: Run, out: Path, name: str, key: str) -> Path:
    """``out/<name>-<method>[-d<density>]-s<seed>-<key>``, emptied: an unfinished run's folder
    (a finished one has its CSV row and is never run again)."""
    d = "" if run.density is None else f"-d{run.density:g}"
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in run.method.name)
    run_dir = out / f"{name}-{safe}{d}-s{run.seed}-{key}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return run_dir


def trained_row(
    run: Run, key: str, r: Mapping[str, Any], run_dir: Path, seconds: float, command: str
) -> dict[str, Any]:
    """The columns every trained row has, from the engine's last metrics row ``r``: identity,
    density, BB diagnostics (empty for dense), training time and provenance."""
    dense = run.method.dense
    return {
        "config": run.config,
        "config_hash": key,
        "method": run.method.name,
        "density_target": density_text(run.density),
        "seed": run.seed,
        "steps": int(r["step"]),
        "density_achieved": r["density"],
        "param_density": 1.0 if dense else r.get("bb_param_density", ""),
        "entropy_mean": "" if dense else r.get("bb_entropy_mean", ""),
        "balance_r2": "" if dense else r.get("bb_balance_r2", ""),
        "seconds_per_step": round(seconds / max(int(r["step"]), 1), 4),
        "train_seconds": round(seconds, 1),
        "overrides": " ".join(run.overrides),
        "run_dir": str(run_dir),
        **provenance(command),
    }


def execute_companion(run: Run, task: str, out: Path, command: str) -> dict[str, Any]:
    """Train a companion run (``bbem asr`` / ``bbem faceid``) and return its CSV row: the last
    evaluation's numbers, which the companion computes itself."""
    cfg = load(run)
    cfg["train"]["quiet"] = True
    key = run_hash(run)
    run_dir = fresh_run_dir(run, out, Path(run.config).stem, key)
    t0 = time.perf_counter()
    r = companion(task).run(cfg, run_dir)
    seconds = time.perf_counter() - t0
    return {
        **trained_row(run, key, r, run_dir, seconds, command),
        "task": task,
        **{k: r.get(k, "") for k in SCORE_COLUMNS[task] if k.startswith("val_")},
        "best_score": r.get("best_score", ""),
        "best_step": r.get("best_step", ""),
        "decorrelation": r.get("val_decorrelation", ""),
        "score_seconds": 0.0,
    }


def execute(run: Run, out: Path, command: str) -> dict[str, Any]:
    """Train ``run`` in a fresh run directory, score it, and return its CSV row."""
    from bbem.train import train

    if run.method.baseline:
        return execute_baseline(run, out, command)
    task = task_of(run.config)
    if task != "em":
        return execute_companion(run, task, out, command)
    cfg = load(run)
    key = run_hash(run)
    run_dir = fresh_run_dir(run, out, cfg.name, key)
    val = val_volume(cfg, out)
    t0 = time.perf_counter()
    r = train(cfg, run_dir=run_dir, progress=False)
    t1 = time.perf_counter()
    s = score(run_dir, cfg, float(r["val_threshold_best"]), val)
    return {
        **trained_row(run, key, r, run_dir, t1 - t0, command),
        "val_pr_auc": r["val_pr_auc"],
        "val_pr_auc_best": r["best_pr_auc"],
        "best_step": r["best_step"],
        "val_f1_best": r["val_f1_best"],
        "val_threshold": r["val_threshold_best"],
        **s,
        "score_seconds": round(time.perf_counter() - t1, 1),
    }


def pending(runs: Iterable[Run], results: Path) -> list[Run]:
    """The runs without a row in ``results`` (resume)."""
    done = {row_key(r) for r in read_rows(results)}
    todo = []
    for run in runs:
        k = (run_hash(run), run.method.name, density_text(run.density), str(run.seed))
        if k not in done:
            todo.append(run)
    return todo


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--config", default="configs/bench/real_bb.yaml")
    ap.add_argument("--methods", default=None, help="comma-separated (see the module docstring)")
    ap.add_argument("--densities", default=None, help="default 0.7,0.5,0.3,0.1,0.05")
    ap.add_argument("--seeds", default=None, help="default 0,1,2")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--only", default=None, help="method=NAME,density=D,seed=S filters")
    ap.add_argument("--quick", action="store_true", help="the reduced matrix (docstring)")
    ap.add_argument("--results", default=None, help="CSV (default bench/results/<config>.csv)")
    ap.add_argument("--out", default=str(OUT), help="run directories")
    ap.add_argument("--dry-run", action="store_true", help="list the pending runs, train none")
    ap.add_argument(
        "--no-baseline",
        action="store_true",
        help="leave out the random-forest baseline row (one run per seed, on by default)",
    )
    a = ap.parse_args(argv)
    q = a.quick
    a.methods = a.methods or (
        QUICK_METHODS if q else "dense,bb_in,bb_out,bb_tiers,magnitude,random"
    )
    a.densities = a.densities or (QUICK_DENSITIES if q else "0.7,0.5,0.3,0.1,0.05")
    a.seeds = a.seeds or (QUICK_SEEDS if q else "0,1,2")
    a.set = [*(QUICK_SETS if q else ()), *a.set]  # a --set of one's own wins
    if a.results is None:
        a.results = f"bench/results/{Path(a.config).stem}{'-quick' if q else ''}.csv"
    return a


def main(argv: Sequence[str] | None = None) -> int:
    from bbem.errors import UserError

    try:
        return run_matrix(parse_args(argv), argv)
    except UserError as e:  # a bad config or value: one line, as the bbem commands say it
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_matrix(a: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """Plan the matrix, skip the runs with rows, train and append the rest."""
    task = task_of(a.config)
    methods = [parse_method(m) for m in a.methods.split(",")]
    if task == "em" and not a.no_baseline and BASELINE not in methods:
        methods.insert(0, BASELINE)  # the forest reads EM volumes only
    if task != "em" and BASELINE in methods:
        raise SystemExit(f"{BASELINE.name} is the EM pixel classifier: not a {task} method")
    runs = plan(
        a.config,
        methods,
        [float(d) for d in a.densities.split(",")],
        [int(s) for s in a.seeds.split(",")],
        a.set,
        parse_only(a.only),
    )
    results = Path(a.results)
    todo = pending(runs, results)
    print(f"{len(runs)} runs, {len(runs) - len(todo)} done in {results}, {len(todo)} to train")
    command = " ".join(["python", "bench/matrix.py", *(sys.argv[1:] if argv is None else argv)])
    for i, run in enumerate(todo):
        print(
            f"[{i + 1}/{len(todo)}] {run.method.name} {density_text(run.density) or '-'} "
            f"seed {run.seed}",
            flush=True,
        )
        if a.dry_run:
            continue
        row = execute(run, Path(a.out), command)
        append_row(results, row, columns(task))
        score = SCORE_COLUMNS[task][2]  # the headline: PR-AUC, WER, top-1
        print(
            f"  {score} {float(row[score]):.3f}, {row['train_seconds']:.0f} s training", flush=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
