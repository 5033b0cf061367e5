"""``make demo``: train on the synthetic default, predict a held-out synthetic volume, evaluate.

Everything it needs it makes itself (``bbem.synth``), so it runs on a fresh machine offline::

    python -m bbem.demo [--config configs/demo.yaml] [--run-dir runs/demo] [--set key=value ...]

The held-out test volume is a third synthetic volume (its own seed), never seen in training
or model selection (validation picks ``best.pt``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from bbem.errors import UserError

TEST_VOLUME = Path("data/demo/test.zarr")
TEST_SHAPE = (24, 256, 256)
TEST_SEED = 3


def run(config: str, run_dir: str, overrides: list[str]) -> dict:
    from bbem.config import load_config
    from bbem.infer import predict_volume
    from bbem.metrics.evaluate import evaluate, print_table, write_json
    from bbem.model import load_checkpoint, validation_threshold
    from bbem.synth import write_synthetic
    from bbem.train import train
    from bbem.volumes import open_volume

    cfg = load_config(config, overrides)
    rd = Path(run_dir)
    if rd.exists():
        if not (rd / "config.yaml").is_file() and any(rd.iterdir()):
            raise UserError(
                f"{rd} exists and is not a run directory: choose another --run-dir for the demo"
            )
        shutil.rmtree(rd)  # an earlier demo run: a rerun starts fresh
    t0 = time.perf_counter()
    result = train(cfg, run_dir=rd)
    train_s = time.perf_counter() - t0
    if not TEST_VOLUME.exists():
        write_synthetic(TEST_VOLUME, TEST_SHAPE, TEST_SEED)
    pred = rd / "test_prediction.zarr"
    t1 = time.perf_counter()
    predict_volume(
        rd / "checkpoints/best.pt", TEST_VOLUME, pred, key="volumes/raw", on_existing="overwrite"
    )
    infer_s = time.perf_counter() - t1
    truth = open_volume(TEST_VOLUME, key="volumes/labels/clefts")
    # the threshold is chosen on validation (best.pt) and applied unchanged to the test volume
    ck = load_checkpoint(rd / "checkpoints/best.pt")
    t_val = validation_threshold(ck)
    t_val = 0.5 if t_val is None else t_val
    scores = evaluate(open_volume(pred), truth, voxel_size=truth.voxel_size, threshold=t_val)
    f1_val = f1_at(scores["voxel"]["curve"], t_val)
    write_json(scores, rd / "test_evaluation.json")
    print_table(scores)

    from rich.console import Console
    from rich.table import Table

    v = scores["voxel"]
    t = Table(title=f"bbem demo: {cfg.bb.method} (held-out synthetic volume, seed {TEST_SEED})")
    cols = (f"F1 @val t={t_val:.2f}", "F1 best (oracle)", "PR-AUC", "density", "train s", "infer s")
    for col in cols:
        t.add_column(col, justify="right")
    t.add_row(
        f"{f1_val:.3f}",
        f"{v['f1_best']:.3f}",
        f"{v['pr_auc']:.3f}",
        f"{result['density']:.2f}",
        f"{train_s:.0f}",
        f"{infer_s:.0f}",
    )
    Console().print(t)
    return {
        "voxel": v,
        "f1_val_threshold": f1_val,
        "threshold": t_val,
        "density": result["density"],
        "train_s": train_s,
        "infer_s": infer_s,
    }


def f1_at(curve: dict, threshold: float) -> float:
    """Voxel F1 at ``threshold`` under bbem's one rule (level >= ``threshold_level(t)``), read
    off the exact PR curve (:meth:`bbem.metrics.PRHistogram.result`'s ``curve``)."""
    from bbem.metrics.threshold import threshold_level

    level = threshold_level(threshold)
    ts = curve["thresholds"]  # levels / 255, ascending: only levels some voxel holds
    # the first level present at or above t's level predicts the same voxels as t does
    i = next((j for j, x in enumerate(ts) if round(x * 255) >= level), None)
    if i is None:
        return 0.0
    p, r = curve["precision"][i], curve["recall"][i]
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bbem.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args(argv)
    try:
        run(a.config, a.run_dir, a.set)
    except UserError as e:
        print(f"bbem demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
