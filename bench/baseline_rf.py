"""The reference every detector figure stands beside: an ilastik-style pixel classifier.

Per-section 2D filter features (scikit-image ``multiscale_basic_features``: intensity, edges
and texture at sigma 1-16) and a scikit-learn random forest (100 trees) trained on a balanced
sample of pixels from the training box of a bbem config; the threshold is the one that maximises
voxel F1 on the validation box. The validation prediction is written as an OME-Zarr volume of
uint8 levels, and scored with ``bbem.metrics.evaluate`` into the same JSON as ``bbem evaluate``.
It reads the config's own split, so it always scores on the boxes bbem validates on.

    .venv/bin/python bench/baseline_rf.py configs/vnc.yaml --out bench/out/rf-vnc

Real-data configs read ../shared/data/vnc-stack1-left.hdf (Gerhard et al. 2013,
doi 10.6084/m9.figshare.856713, CC BY-NC-SA 3.0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: Object and CREMI measures (min object size in voxels) the detector bench uses as well.
MIN_SIZE = 100


def features(raw: np.ndarray, sigma_max: float = 16.0) -> np.ndarray:
    """``float32 [Z, Y, X, F]`` filter features of each section of ``raw`` (``[Z, Y, X]``).

    2D per section, as ilastik users do on anisotropic serial-section EM.
    """
    from skimage.feature import multiscale_basic_features

    return np.stack(
        [
            multiscale_basic_features(
                np.asarray(s, np.float32) / 255.0, sigma_min=1.0, sigma_max=sigma_max
            ).astype(np.float32)
            for s in raw
        ]
    )


def balanced_sample(
    labels: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of up to ``n / 2`` cleft and ``n / 2`` background voxels, and their labels."""
    from bbem.errors import UserError

    flat = labels.ravel()
    pos, neg = np.flatnonzero(flat), np.flatnonzero(~flat)
    if not len(pos) or not len(neg):
        raise UserError("a training box holds no cleft (or no background) voxels: widen it")
    k = n // 2
    pick = np.concatenate(
        [
            rng.choice(pos, min(k, len(pos)), replace=False),
            rng.choice(neg, min(k, len(neg)), replace=False),
        ]
    )
    return pick, flat[pick]


def load_box(cfg: Any, split: str) -> list[tuple[np.ndarray, np.ndarray, tuple[float, ...]]]:
    """``(raw uint8, cleft bool, voxel size)`` of each volume of ``cfg.data.<split>``, cropped."""
    from bbem.data import crop_yx
    from bbem.volumes import open_volume

    out = []
    for spec in getattr(cfg.data, split):
        path = cfg.data.resolve(spec.path)
        raw = crop_yx(open_volume(path, spec.raw_key), spec, str(path))
        lab = crop_yx(open_volume(path, spec.label_key), spec, str(path))
        z0, z1 = spec.z_range or (0, raw.shape[0])
        out.append((np.asarray(raw[z0:z1]), lab[z0:z1] != 0, tuple(raw.voxel_size)))
    return out


def run_baseline(
    config: str | Path,
    out: str | Path,
    overrides: Sequence[str] = (),
    samples: int = 200_000,
    trees: int = 100,
    seed: int = 0,
    jobs: int = -1,
) -> dict[str, Any]:
    """Train the forest on the config's training boxes, predict and score its validation boxes.

    Writes ``OUT/prediction.zarr`` (the first validation box) and ``OUT/evaluation.json``;
    returns the evaluation plus ``seconds`` (features, training and prediction).
    """
    from sklearn.ensemble import RandomForestClassifier

    from bbem.config import load_config
    from bbem.data import ensure_volumes
    from bbem.metrics import evaluate, to_uint8, voxel_metrics, write_json
    from bbem.volumes import write_volume

    cfg = load_config(str(config), list(overrides))
    ensure_volumes(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    xs, ys = [], []
    train = load_box(cfg, "train")
    per = samples // len(train)
    for raw, lab, _ in train:
        f = features(raw)
        idx, y = balanced_sample(lab, per, rng)
        xs.append(f.reshape(-1, f.shape[-1])[idx])
        ys.append(y)
        del f
    forest = RandomForestClassifier(
        n_estimators=trees, min_samples_leaf=2, n_jobs=jobs, random_state=seed
    )
    forest.fit(np.concatenate(xs), np.concatenate(ys))
    t_fit = time.perf_counter() - t0
    preds, truths = [], []
    val = load_box(cfg, "val")
    vs = val[0][2]
    for raw, lab, _ in val:
        f = features(raw)
        p = forest.predict_proba(f.reshape(-1, f.shape[-1]))[:, 1].reshape(lab.shape)
        preds.append(to_uint8(p))
        truths.append(lab)
        del f
    seconds = time.perf_counter() - t0
    # The threshold is chosen on the validation voxels, as bbem chooses its own.
    pooled = voxel_metrics(
        np.concatenate([p.ravel() for p in preds]), np.concatenate([t.ravel() for t in truths])
    )
    t_val = float(pooled["threshold_best"])
    result = evaluate(preds[0], truths[0], voxel_size=vs, threshold=t_val, min_size=MIN_SIZE)
    result["voxel"] = {k: v for k, v in pooled.items() if k != "curve"} | {
        "curve": pooled.get("curve")
    }
    result["protocol"].update(
        {
            "method": "random forest on multiscale_basic_features (sigma 1-16), per section",
            "config": str(config),
            "split": split_text(cfg),
            "samples": samples,
            "trees": trees,
            "seed": seed,
            "threshold": t_val,
            "threshold_rule": "best voxel F1 on the validation boxes",
        }
    )
    result["seconds"] = {"fit": round(t_fit, 1), "total": round(seconds, 1)}
    write_volume(out / "prediction.zarr", preds[0], voxel_size=vs, overwrite=True)
    write_json(result, out / "evaluation.json")
    return result


def split_text(cfg: Any) -> str:
    """The boxes a config trains and validates on, e.g. ``train y 0-640 / val y 640-1024``."""

    def box(spec: Any) -> str:
        parts = [
            f"{a} {r[0]}-{r[1]}"
            for a, r in zip("zyx", (spec.z_range, spec.y_range, spec.x_range), strict=True)
            if r is not None
        ]
        return f"{Path(spec.path).name} {' '.join(parts) or 'whole'}"

    return (
        f"train {', '.join(box(s) for s in cfg.data.train)} / "
        f"val {', '.join(box(s) for s in cfg.data.val)}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="a bbem config: its data.train and data.val boxes are used")
    ap.add_argument("--out", default="bench/out/baseline-rf")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--trees", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    r = run_baseline(a.config, a.out, a.set, a.samples, a.trees, a.seed)
    v, o, c = r["voxel"], r["object"], r["cremi"]
    print(json.dumps(r["protocol"]["split"]))
    print(
        f"random forest: val PR-AUC {v['pr_auc']:.3f}, best F1 {v['f1_best']:.3f} at "
        f"{v['threshold_best']:.2f}; object F1 IoU0.2 {o['iou_0.2']['f1']:.3f}, IoU0.5 "
        f"{o['iou_0.5']['f1']:.3f}; CREMI score {c.get('score')}; {r['seconds']['total']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
