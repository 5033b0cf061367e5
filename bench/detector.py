"""bbem's detector beside the pixel-classifier baseline, trained and scored in one run.

For each seed: trains the config's U-Net (dense, and BB at the config's density with
``--methods dense,bb``), predicts the validation box with ``bbem.infer.predict_volume`` from
the best checkpoint, and scores it with ``bbem.metrics.evaluate`` at the threshold validation
chose; runs ``bench/baseline_rf.py`` on the same boxes. Prints (and writes as markdown and
JSON) mean +- sd over seeds of voxel PR-AUC, best F1, object F1 at IoU 0.2 and 0.5, CREMI
score and wall time.

    .venv/bin/python bench/detector.py configs/vnc.yaml --seeds 0,1,2 --methods dense,bb

Real-data configs read ../shared/data/vnc-stack1-left.hdf (Gerhard et al. 2013,
doi 10.6084/m9.figshare.856713, CC BY-NC-SA 3.0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline_rf import MIN_SIZE, load_box, run_baseline, split_text

COLUMNS = (
    ("pr_auc", "val PR-AUC"),
    ("f1_best", "best F1"),
    ("obj_f1_02", "object F1 IoU 0.2"),
    ("obj_f1_05", "object F1 IoU 0.5"),
    ("cremi", "CREMI score"),
    ("seconds", "wall time (s)"),
)


def write_val_volume(cfg: Any, path: Path) -> Path:
    """The first validation box as a zarr (``volumes/raw``, ``volumes/labels/clefts``)."""
    from bbem.volumes import write_volumes

    if not path.exists():
        raw, lab, vs = load_box(cfg, "val")[0]
        write_volumes(
            path,
            {"volumes/raw": raw, "volumes/labels/clefts": lab.astype("uint8")},
            voxel_size=vs,
        )
    return path


def scores(result: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The table's columns from a ``bbem.metrics.evaluate`` result."""
    return {
        "pr_auc": result["voxel"]["pr_auc"],
        "f1_best": result["voxel"]["f1_best"],
        "threshold": result["protocol"].get("threshold"),
        "obj_f1_02": result["object"]["iou_0.2"]["f1"],
        "obj_f1_05": result["object"]["iou_0.5"]["f1"],
        "cremi": result["cremi"].get("score"),
        "seconds": round(seconds, 1),
    }


def score_checkpoint(checkpoint: Path, val: Path, threshold: float, pred: Path) -> dict[str, Any]:
    """Predict the validation zarr ``val`` with ``checkpoint`` into ``pred`` and score it with
    ``bbem.metrics.evaluate`` at ``threshold`` (objects of at least MIN_SIZE voxels): the one
    way every U-Net row of the detector and matrix benches is scored."""
    from bbem.infer import predict_volume
    from bbem.metrics import evaluate
    from bbem.volumes import open_volume

    predict_volume(
        checkpoint, val, pred, key="volumes/raw", on_existing="overwrite", progress=False
    )
    r = evaluate(
        open_volume(pred),
        open_volume(val, "volumes/labels/clefts"),
        threshold=threshold,
        min_size=MIN_SIZE,
    )
    r["protocol"]["threshold"] = threshold
    return r


def run_unet(
    config: str, method: str, seed: int, overrides: Sequence[str], out: Path, val: Path
) -> dict[str, Any]:
    """Train one run (resumable: a finished run is read back), predict and score the val box."""
    from bbem.config import load_config
    from bbem.infer import resolve_threshold
    from bbem.model import load_inference_model
    from bbem.train import train

    run_dir = out / f"{method}-s{seed}"
    done = run_dir / "detector.json"
    if done.is_file():
        return json.loads(done.read_text())
    sets = [*overrides, f"bb.method={method}", f"train.seed={seed}"]
    if method != "dense":
        sets.append(f"bb.seed={seed}")
    cfg = load_config(config, sets)
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    train(cfg, run_dir=run_dir, progress=False)
    seconds = time.perf_counter() - t0
    best = run_dir / "checkpoints" / "best.pt"
    _, info = load_inference_model(best)
    t = resolve_threshold("val", info)
    assert t is not None  # "val" gives a number or raises
    r = score_checkpoint(best, val, t, run_dir / "val_prediction.zarr")
    row = {"method": method, "seed": seed, **scores(r, seconds)}
    done.write_text(json.dumps(row, indent=1))
    return row


def run_rf(
    config: str, seed: int, overrides: Sequence[str], out: Path, **options: Any
) -> dict[str, Any]:
    done = out / f"rf-s{seed}" / "detector.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    r = run_baseline(config, out / f"rf-s{seed}", overrides, seed=seed, **options)
    row = {
        "method": "random forest (baseline)",
        "seed": seed,
        **scores(r, time.perf_counter() - t0),
    }
    done.write_text(json.dumps(row, indent=1))
    return row


#: decimals per column: scores in [0, 1] to 3, the CREMI score (nm) to 1, seconds to 0
DIGITS = {"cremi": 1, "seconds": 0}


def _mean_sd(values: list[float | None], digits: int = 3) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per method, mean ± sd over seeds."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    head = "| method | " + " | ".join(c[1] for c in COLUMNS) + " | seeds |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        cells = [_mean_sd([r[k] for r in rs], DIGITS.get(k, 3)) for k, _ in COLUMNS]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {len(rs)} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Bars of each score per method (mean over seeds, seeds as dots), the baseline first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(dict.fromkeys(r["method"] for r in rows))
    scores = [c for c in COLUMNS if c[0] not in ("cremi", "seconds")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), width_ratios=(len(scores), 1.3))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        rs = [r for r in rows if r["method"] == m]
        for j, (k, _) in enumerate([*scores, ("cremi", "")]):
            ax, x = (axes[0], j) if k != "cremi" else (axes[1], 0)
            v = [r[k] for r in rs if r[k] is not None]
            xi = x - 0.4 + width * (i + 0.5)
            ax.bar(xi, np.mean(v), width, color=f"C{i}", label=m if j == 0 else None)
            ax.plot([xi] * len(v), v, "k.", ms=4)
    axes[0].set_xticks(range(len(scores)), [c[1] for c in scores], fontsize=8)
    axes[0].set(ylim=(0, 1), ylabel="score (higher is better)")
    axes[0].legend(fontsize=8, loc="upper right")
    axes[1].set_xticks([0], ["CREMI score (nm)"], fontsize=8)
    axes[1].set_ylabel("lower is better")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", default="configs/vnc.yaml")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--methods", default="dense", help="comma-separated bb.method values")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None, help="default bench/out/detector-<config name>")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--rf-samples", type=int, default=200_000, help="baseline training pixels")
    ap.add_argument("--rf-trees", type=int, default=100)
    a = ap.parse_args(argv)
    from bbem.config import load_config
    from bbem.data import ensure_volumes

    cfg = load_config(a.config, a.set)
    ensure_volumes(cfg)
    out = Path(a.out or f"bench/out/detector-{cfg.name}")
    out.mkdir(parents=True, exist_ok=True)
    sets = [*a.set] + ([f"train.threads={a.threads}"] if a.threads else [])
    val = write_val_volume(cfg, out / "val.zarr")
    rows = []
    for seed in (int(s) for s in a.seeds.split(",")):
        rows.append(run_rf(a.config, seed, a.set, out, samples=a.rf_samples, trees=a.rf_trees))
        for method in a.methods.split(","):
            rows.append(run_unet(a.config, method, seed, sets, out, val))
            print(json.dumps(rows[-1]), flush=True)
    md = table(rows)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    cmd = " ".join(["python", "bench/detector.py", *(argv or sys.argv[1:])])
    meta = {
        "split": split_text(cfg),
        "steps": cfg.train.steps,
        "command": cmd,
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    (out / "detector.md").write_text(
        f"{md}\n\nsplit: {meta['split']}; {meta['steps']} steps; `{cmd}` at {commit}\n"
    )
    (out / "detector.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    seeds = len({r["seed"] for r in rows})
    plot(rows, out / "detector.png", f"{meta['split']}; {meta['steps']} steps; {seeds} seed(s)")
    print(md)
    print(f"split: {meta['split']}; {meta['steps']} U-Net steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
