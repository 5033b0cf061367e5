"""Benchmark: `bbem.metrics.evaluate` on a CREMI-sized volume (125 x 1250 x 1250) in bounded memory.

Writes a synthetic prediction (uint8) and cleft labels (uint64, CREMI's background convention)
as zarr in a temporary folder, then evaluates them in a fresh process and reports wall time
and the peak resident memory of that process (goal: under 60 s and under 2 GB).

    .venv/bin/python bench/evaluate_memory.py [--shape 125,1250,1250] [--keep DIR]

How the CREMI distances fit: the volume streams through z-slabs of whole sections (~16 M
voxels); distances come from a KD-tree over the boundary voxels of each cleft set (see
bbem/metrics/cremi.py), so no whole-volume distance transform (~1.5 GB per set in float64)
is ever held.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VOXEL_SIZE = (40.0, 4.0, 4.0)
SLAB = 25  # sections per written chunk row


def _clefts(shape: tuple[int, int, int], rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` sheet-like clefts as boxes (z0, z1, y0, y1, x0, x1): 3-8 sections deep, 2-3 px
    thick across one in-plane axis, 40-120 px long along the other."""
    z, y, x = shape
    out = []
    for _ in range(n):
        dz, length, thick = rng.integers(3, 9), rng.integers(40, 121), rng.integers(2, 4)
        dy, dx = (length, thick) if rng.random() < 0.5 else (thick, length)
        z0, y0, x0 = rng.integers(0, z - dz), rng.integers(0, y - dy), rng.integers(0, x - dx)
        out.append((z0, z0 + dz, y0, y0 + dy, x0, x0 + dx))
    return np.array(out)


def make_data(folder: Path, shape: tuple[int, int, int], seed: int = 0) -> None:
    import zarr

    rng = np.random.default_rng(seed)
    clefts = _clefts(shape, rng, n=max(1, int(400 * np.prod(shape) / (125 * 1250 * 1250))))
    spurious = _clefts(shape, rng, n=max(1, len(clefts) // 4))
    missed = rng.random(len(clefts)) < 0.15
    chunks = (SLAB, 256, 256)
    truth = zarr.create_array(
        folder / "truth.zarr", shape=shape, dtype="uint64", chunks=chunks, fill_value=0
    )
    pred = zarr.create_array(
        folder / "pred.zarr", shape=shape, dtype="uint8", chunks=chunks, fill_value=0
    )
    bg = np.iinfo(np.uint64).max
    for z0 in range(0, shape[0], SLAB):
        z1 = min(shape[0], z0 + SLAB)
        t = np.full((z1 - z0, *shape[1:]), bg, np.uint64)
        # low-level noise everywhere, as a network's background output
        p = rng.integers(0, 40, (z1 - z0, *shape[1:]), dtype=np.uint8)
        for i, (a, b, y0, y1, x0, x1) in enumerate(clefts):
            if b <= z0 or a >= z1:
                continue
            sl = slice(max(a, z0) - z0, min(b, z1) - z0)
            t[sl, y0:y1, x0:x1] = i + 1
            if not missed[i]:  # found, one pixel fatter
                p[sl, y0 : y1 + 1, x0 : x1 + 1] = rng.integers(130, 250)
        for a, b, y0, y1, x0, x1 in spurious:
            if b > z0 and a < z1:
                p[max(a, z0) - z0 : min(b, z1) - z0, y0:y1, x0:x1] = rng.integers(100, 220)
        truth[z0:z1] = t
        pred[z0:z1] = p


class _SaltNoise:
    """A prediction volume with a fraction of voxels set to 200 (above 0.5): isolated false
    positives far from clefts, the slow case for CREMI distances."""

    def __init__(self, vol, fraction: float):
        self.vol, self.fraction = vol, fraction
        self.shape, self.dtype, self.chunks, self.name = vol.shape, vol.dtype, vol.chunks, "noisy"

    def __getitem__(self, key):
        block = self.vol[key].copy()
        rng = np.random.default_rng(key.start if isinstance(key, slice) else 0)
        block[rng.random(block.shape, dtype=np.float32) < self.fraction] = 200
        return block


def child(folder: Path, noise: float = 0.0) -> None:
    """Evaluate in this (fresh) process; print time and peak memory as JSON."""
    import resource

    from bbem.metrics import evaluate
    from bbem.volumes import open_volume

    pred = open_volume(folder / "pred.zarr")
    source = _SaltNoise(pred, noise) if noise else pred
    truth = open_volume(folder / "truth.zarr")
    t0 = time.perf_counter()
    r = evaluate(source, truth, voxel_size=VOXEL_SIZE, margin=(2, 16, 16))
    elapsed = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "elapsed_s": elapsed,
                "peak_rss_mb": peak_mb,
                "pr_auc": r["voxel"]["pr_auc"],
                "f1_best": r["voxel"]["f1_best"],
                "object_f1_iou_0.5": r["object"]["iou_0.5"]["f1"],
                "n_true": r["object"]["n_true"],
                "n_pred": r["object"]["n_pred"],
                "cremi_score": r["cremi"]["score"],
                "cremi_fp": r["cremi"]["fp"],
                "cremi_fn": r["cremi"]["fn"],
                "cremi_skipped": r["cremi"].get("skipped"),
            }
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="125,1250,1250")
    ap.add_argument("--keep", help="write the data here and keep it (default: a temp folder)")
    ap.add_argument(
        "--noise",
        type=float,
        default=0.0,
        help="also set this fraction of voxels to 0.78 (salt noise): the slow case for CREMI",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(Path(a.child), a.noise)
        return 0
    z, y, x = (int(v) for v in a.shape.split(","))
    shape = (z, y, x)
    with tempfile.TemporaryDirectory(prefix="bbem-bench-eval-") as tmp:
        folder = Path(a.keep) if a.keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "pred.zarr").exists():
            t0 = time.perf_counter()
            make_data(folder, shape)
            print(f"wrote synthetic data {shape} in {time.perf_counter() - t0:.1f} s")
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(folder), "--noise", str(a.noise)],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return 1
        r = json.loads(out.stdout.strip().splitlines()[-1])
    from rich.console import Console
    from rich.table import Table

    noise = f", salt noise {a.noise:g}" if a.noise else ""
    t = Table(title=f"bbem evaluate, {shape[0]} x {shape[1]} x {shape[2]} (uint8 vs uint64{noise})")
    for col in ("time s", "peak RSS MB", "goal", "PR-AUC", "object F1 @0.5", "CREMI score"):
        t.add_column(col, justify="right")
    ok = r["elapsed_s"] < 60 and r["peak_rss_mb"] < 2048
    t.add_row(
        f"{r['elapsed_s']:.1f}",
        f"{r['peak_rss_mb']:.0f}",
        "met" if ok else "MISSED (<60 s, <2 GB)",
        f"{r['pr_auc']:.4f}",
        f"{r['object_f1_iou_0.5']:.3f}",
        f"{r['cremi_score']:.1f}" if r["cremi_score"] is not None else "skipped",
    )
    Console().print(t)
    print(json.dumps(r))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
