"""Throughput and peak memory of ``bbem infer``: threads vs 1 and 2 Dask workers, and a volume vs
one 8 times larger. Goal: peak memory grows by at most 25% for the 8x volume. Run:
    .venv/bin/python bench/infer_throughput.py [--channels 8,16,32,64] [--base 24,144,144]

Input: a crop of the real EM stack ../shared/data/vnc-stack2-raw.tif (mirrored along z where the
larger volume needs more than its 20 sections), or a synthetic volume where that file is absent.
The network is the default bbem U-Net shape (strides 1,2,2 / 1,2,2 / 2,2,2) with random weights:
speed and memory do not depend on the weights. "threads" runs 2 blocks at a time in one process
(the default --workers 2, 1 torch thread each) or 1 block with 2 torch threads; "local" runs a Dask LocalCluster of 1 or 2 worker processes. The base
volume holds 2 blocks, so both memory runs have 2 blocks in flight. By default its channels are halved and the window
is 16,64,64 so the whole benchmark takes minutes on 2 CPU cores; pass --channels 16,32,64,128
--roi 16,128,128 for the full-size network. Each run is a fresh process (peak RSS is per process);
a Dask run's workers report their own peak (the LocalCluster is the one `--scheduler local` makes,
started by the benchmark so it can ask them before it closes). voxels/s counts the block loop (Dask cluster start-up and the model's first load
are in "wall s").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "vnc-stack2-raw.tif"


def _zyx(text: str) -> tuple[int, int, int]:
    z, y, x = (int(v) for v in text.split(","))
    return z, y, x


def make_inputs(tmp: Path, base: tuple[int, int, int]) -> tuple[Path, Path, str]:
    """The base volume and the one twice as large along each axis (8x voxels)."""
    from bbem.volumes import open_volume, write_volume

    big = tuple(2 * s for s in base)
    if REAL.is_file():
        vol = open_volume(REAL)
        raw = vol[:, : big[1], : big[2]]
        reps = -(-big[0] // raw.shape[0])
        # Mirror, not repeat: no seam-free tiling exists, but a reflection keeps sections
        # continuous, so the network sees EM-like data everywhere.
        raw = np.concatenate([raw if i % 2 == 0 else raw[::-1] for i in range(reps)])[: big[0]]
        src, vs = f"real EM crop of {REAL.name}", vol.voxel_size
    else:
        from bbem.synth import write_synthetic

        syn = write_synthetic(tmp / "synth.zarr", big, seed=0)
        raw = open_volume(syn, key="volumes/raw").read()
        src, vs = "synthetic EM (bbem.synth, seed 0)", (40.0, 4.0, 4.0)
    small_p = write_volume(tmp / "base.zarr", raw[: base[0], : base[1], : base[2]], voxel_size=vs)
    big_p = write_volume(tmp / "big.zarr", raw, voxel_size=vs)
    return small_p, big_p, src


def make_export(path: Path, channels: list[int], roi: tuple[int, int, int]) -> Path:
    import torch

    from bbem.model import EXPORT_FORMAT, build_model

    cfg = {"channels": channels}
    torch.manual_seed(0)
    model = build_model(cfg)
    info = {"config": {"data": {"patch_size": list(roi)}, "model": cfg}}
    torch.save(
        {
            "format": EXPORT_FORMAT,
            "model_config": cfg,
            "state_dict": model.state_dict(),
            "info": info,
        },
        path,
    )
    return path


def child(args: dict) -> None:
    """One inference run in this (fresh) process; prints a JSON line of its measures."""
    from bbem.infer import predict_volume

    t0 = time.perf_counter()
    client: Any = None
    cluster: Any = None
    scheduler = args["scheduler"]
    if scheduler == "local":
        # the LocalCluster `--scheduler local` makes (same workers, same preload), started here so
        # that its workers' peak memory can be read before it closes
        from bbem.infer.cluster import _connect

        client, cluster = _connect("local", args["workers"])
        scheduler = cluster.scheduler_address
    try:
        stats = predict_volume(
            args["export"],
            args["input"],
            args["output"],
            block=args["block"],
            scheduler=scheduler,
            workers=args["workers"],
            progress=False,
        )
        workers_mb = []
        if client is not None:
            peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            workers_mb = [v / 1024 for v in peaks.values()]  # Linux: KiB
    finally:
        if client is not None:
            client.close()
            cluster.close()
    wall = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    summary = f"{stats.blocks_done} blocks, {stats.voxels_per_second:,.0f} voxels/s {stats.where}"
    print(
        json.dumps(
            {
                "wall": wall,
                "vps": stats.voxels_per_second,
                "rss_mb": rss_mb,
                "workers_mb": workers_mb,
                "summary": summary,
            }
        )
    )


def run(**kw) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(kw)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if proc.returncode != 0:
        sys.exit(f"run {kw} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--channels", default="8,16,32,64")
    p.add_argument("--roi", type=_zyx, default=(16, 64, 64), help="sliding window z,y,x")
    p.add_argument("--base", type=_zyx, default=(24, 144, 288), help="base volume z,y,x (2 blocks)")
    p.add_argument("--block", type=_zyx, default=(24, 144, 144), help="block z,y,x")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(json.loads(a.child))
        return

    from rich.console import Console
    from rich.table import Table

    channels = [int(c) for c in a.channels.split(",")]
    with tempfile.TemporaryDirectory(prefix="bbem-infer-bench-") as d:
        tmp = Path(d)
        base, big, src = make_inputs(tmp, a.base)
        export = make_export(tmp / "model.pt", channels, a.roi)
        common = {"export": str(export), "block": list(a.block)}
        runs = [
            ("threads", 2, base, "base"),
            ("threads", 2, big, "8x"),
            ("threads", 1, big, "8x"),
            ("local", 1, big, "8x"),
            ("local", 2, base, "base"),
            ("local", 2, big, "8x"),
        ]
        rows = []
        load_start = os.getloadavg()[0]
        for i, (sched, workers, inp, which) in enumerate(runs):
            r = run(
                **common,
                input=str(inp),
                output=str(tmp / f"out{i}.zarr"),
                scheduler=sched,
                workers=workers,
            )
            r.update(scheduler=sched, workers=workers, volume=which)
            rows.append(r)
            print(f"done: {sched} x{workers} on {which}: {r['summary']}", file=sys.stderr)

    shape_b = a.base
    shape_8 = tuple(2 * s for s in a.base)
    t = Table(
        title=f"bbem infer on {src}: U-Net channels {a.channels}, window {a.roi}, "
        f"block {a.block}; base {shape_b}, 8x {shape_8}"
    )
    for col in (
        "scheduler",
        "workers",
        "torch threads",
        "volume",
        "voxels/s",
        "wall s",
        "peak RSS MB",
    ):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            r["scheduler"],
            str(r["workers"]),
            str(
                max(1, (os.cpu_count() or 1) // r["workers"]) if r["scheduler"] == "threads" else 1
            ),
            r["volume"],
            f"{r['vps']:,.0f}",
            f"{r['wall']:.1f}",
            f"{r['rss_mb']:.0f}"
            if r["scheduler"] == "threads"
            else "workers " + ", ".join(f"{m:.0f}" for m in r["workers_mb"]),
        )
    console = Console()
    console.print(t)
    growth = rows[1]["rss_mb"] / rows[0]["rss_mb"] - 1
    verdict = "meets" if growth <= 0.25 else "MISSES"
    console.print(
        f"peak memory 8x volume vs base (threads): {rows[0]['rss_mb']:.0f} -> "
        f"{rows[1]['rss_mb']:.0f} MB, {100 * growth:+.1f}% ({verdict} the goal of <= +25%)"
    )
    by = {(r["scheduler"], r["workers"], r["volume"]): r for r in rows}
    thr, one, two = by["threads", 2, "8x"], by["local", 1, "8x"], by["local", 2, "8x"]
    w_base, w_big = max(by["local", 2, "base"]["workers_mb"]), max(two["workers_mb"])
    console.print(
        f"Dask LocalCluster, 8x volume: 2 workers at {two['vps'] / thr['vps']:.2f}x the threads run "
        f"(goal >= 0.9) and {two['vps'] / one['vps']:.2f}x 1 worker (goal >= 1.8); peak worker "
        f"memory {w_base:.0f} -> {w_big:.0f} MB for base -> 8x ({100 * (w_big / w_base - 1):+.1f}%)"
    )
    load_end = os.getloadavg()[0]
    console.print(
        f"machine: {os.cpu_count()} cores, 1-min load average {load_start:.1f} at the start and "
        f"{load_end:.1f} at the end (other work on the machine slows every row alike only if it "
        "is steady)"
    )
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {
                    "source": src,
                    "args": vars(a) | {"child": None},
                    "load_average": [load_start, load_end],
                    "runs": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
