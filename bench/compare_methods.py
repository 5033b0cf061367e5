"""BB against dense, magnitude and random pruning at matched density, over seeds.

Trains one config per method and seed (only ``bb.method`` and ``train.seed`` differ), then
prints a markdown table of validation PR-AUC and F1 (mean +- std over seeds) and writes a PNG.
Run from the repository root:

    .venv/bin/python bench/compare_methods.py --config configs/bench/real_bb.yaml \
        --methods dense,bb,magnitude,random --seeds 0,1,2 [--set train.steps=300]

Real-data configs read ../shared/data/vnc-stack1-left.hdf (Gerhard et al. 2013,
doi 10.6084/m9.figshare.856713, CC BY-NC-SA 3.0).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

OUT = Path("bench/out")


def method_sets(method: str) -> list[str]:
    """``bb`` -> ``[bb.method=bb]``; a variant ``bb:probe=output:spread=0.2`` adds ``bb.probe=output``..."""
    name, *extra = method.split(":")
    return [f"bb.method={name}", *(f"bb.{kv}" for kv in extra)]


def run_one(config: str, method: str, seed: int, overrides: list[str], out: Path) -> dict:
    from bbem.config import load_config
    from bbem.train import train

    sets = [*overrides, *method_sets(method), f"train.seed={seed}", f"bb.seed={seed}"]
    cfg = load_config(config, sets)
    # The run's name carries a hash of its whole config, so a rerun with other --set values
    # never picks up results of a different experiment.
    # Dense runs ignore the bb section, so one dense run serves every density; the thread
    # count changes speed, not the experiment.
    exclude: dict = {"train": {"threads"}} | ({"bb": True} if method == "dense" else {})
    key = hashlib.sha1(cfg.model_dump_json(exclude=exclude).encode()).hexdigest()[:8]
    run_dir = out / f"{cfg.name}-{method.replace(':', '-').replace('=', '')}-s{seed}-{key}"
    result_file = run_dir / "result.json"
    if result_file.is_file():  # finished earlier: the benchmark can be resumed
        return {**unit_spread(run_dir), **json.loads(result_file.read_text())}
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    t = time.perf_counter()
    r = train(cfg, run_dir=run_dir, progress=False)
    r = {
        "method": method,
        "seed": seed,
        "best_pr_auc": r["best_pr_auc"],
        "final_pr_auc": r["val_pr_auc"],
        "final_f1_best": r["val_f1_best"],
        "final_f1_05": r["val_f1_05"],
        "density": r["density"],
        "bb_param_density": r.get("bb_param_density", 1.0),
        "time_s": time.perf_counter() - t,
        **unit_spread(run_dir),
    }
    result_file.write_text(json.dumps(r))
    return r


def unit_spread(run_dir: Path) -> dict:
    """How much BB differentiates units at the end of a run: the standard deviation over all
    masked units of the on-rate and of the kept fraction (degree / full fan); 0 when dense."""
    from bbem.rundir import read_bb_table

    t = read_bb_table(run_dir / "bb.csv")
    if t is None:
        return {"on_rate_sd": 0.0, "kept_fraction_sd": 0.0}
    last = t["step"] == t["step"].max()
    return {
        "on_rate_sd": float(t["on_rate"][last].std()),
        "kept_fraction_sd": float((t["degree"][last] / t["full_fan"][last]).std()),
    }


def summarise(results: list[dict], methods: list[str]) -> list[str]:
    lines = [
        "| method | density | PR-AUC (final) | F1 best (final) | F1 @0.5 (final) | best PR-AUC "
        "| on-rate sd | kept-fraction sd | runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        rs = [r for r in results if r["method"] == m]

        def ms(key: str, rs=rs) -> str:
            v = [r[key] for r in rs]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            return f"{statistics.mean(v):.3f} ± {sd:.3f}"

        lines.append(
            f"| {m} | {rs[0]['density']:.2f} | {ms('final_pr_auc')} | {ms('final_f1_best')} | "
            f"{ms('final_f1_05')} | {ms('best_pr_auc')} | {ms('on_rate_sd')} | "
            f"{ms('kept_fraction_sd')} | {len(rs)} |"
        )
    return lines


def plot(results: list[dict], methods: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (axes[0], "final_pr_auc", "PR-AUC"),
        (axes[1], "final_f1_best", "F1 (best threshold)"),
    ):
        for i, m in enumerate(methods):
            v = [r[key] for r in results if r["method"] == m]
            ax.scatter([i] * len(v), v, alpha=0.7)
            ax.errorbar(
                [i + 0.15],
                [statistics.mean(v)],
                yerr=[statistics.stdev(v) if len(v) > 1 else 0],
                fmt="o",
                color="k",
            )
        ax.set_xticks(range(len(methods)), methods, rotation=20, ha="right")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/bench/real_bb.yaml")
    ap.add_argument(
        "--methods",
        default="dense,bb,magnitude,random",
        help="comma-separated; a BB variant is method:key=value[:key=value], e.g. bb:probe=output",
    )
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--tag", help="suffix for the table/plot names (compare-<config>-<tag>.*)")
    a = ap.parse_args()
    methods = a.methods.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in seeds:
        for m in methods:
            r = run_one(a.config, m, seed, a.set, out)
            print(
                f"{m} seed {seed}: PR-AUC {r['final_pr_auc']:.3f} F1 {r['final_f1_best']:.3f} ({r['time_s']:.0f} s)",
                flush=True,
            )
            results.append(r)
    lines = summarise(results, methods)
    stem = Path(a.config).stem if a.tag is None else f"{Path(a.config).stem}-{a.tag}"
    print(f"\n{a.config} {' '.join(a.set)}, seeds {seeds}\n")
    print("\n".join(lines))
    (out / f"compare-{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"compare-{stem}.json").write_text(json.dumps(results, indent=1))
    plot(results, methods, out / f"compare-{stem}.png", f"{stem}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
