"""``bbem report RUN_DIR``: the plots a person would rather look at than read, and a summary.

Reads what training wrote (see :mod:`bbem.rundir`): ``config.yaml``, ``metrics.csv``, ``bb.csv``
and ``checkpoints/best.pt``, and writes into ``RUN_DIR/report/``:

- ``curves.png``: training loss, every validation column, density, against step;
- ``pr_curve.png``: the PR curve of the best checkpoint (EM runs);
- ``on_rates.png``: per-layer on-rate histograms at the first and the last logged step;
- ``balance.png``: log((1-a)/a) against kept degree k/K at the last step, the least-squares line
  and R^2 (the selectivity-audience balance of METHOD.md);
- ``density.png``: kept-edge density per layer over training;
- ``summary.json``: the numbers behind them (and why a plot is missing, e.g. a dense run).

Generic on purpose: companion runs (speech, face identification) have other validation columns
and the same bb.csv, and get the same report.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from bbem.atomic import describe, os_refusals, remove, write_json
from bbem.errors import UserError
from bbem.metrics.plot import plot_pr_curve, save_figure
from bbem.rundir import RunDir, bb_layers, bb_step_rows, read_bb_table

#: Clamp of on-rates before log((1-a)/a), as the BB controller does.


def make_report(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Write ``RUN_DIR/report/`` (PNGs and ``summary.json``); returns the summary.

    A report that fails half-way is removed when this call made its folder, so nothing
    half-written is mistaken for a report (and no --overwrite is needed to retry).
    """
    rd = RunDir.open(run_dir, lock=False)
    out = rd.path / "report"
    created = not out.is_dir()
    _make_folder(out)
    try:
        with os_refusals(out):  # permission, read-only or a full disk: one line, not a traceback
            return _write_report(rd, out)
    except BaseException:
        if created:
            remove(out)
        raise


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:
        if out.is_symlink():  # exists() is False for a dangling link, and mkdir says "exists"
            why = f"it is a link to {os.readlink(out)}, which is not a folder"
        else:
            why = e.strerror or type(e).__name__
        raise UserError(
            f"cannot create the report folder {out}: {why}: make it a writable folder, or copy "
            "the run directory somewhere writable and report that"
        ) from None


def _write_report(rd: RunDir, out: Path) -> dict[str, Any]:
    notes: list[str] = []
    plots: dict[str, str] = {}
    config = rd.config or {}

    rows = rd.read_metrics()
    table = csv_columns(rows)
    loss = csv_columns(rd.read_loss())
    if table:
        plots["curves"] = str(_plot_curves(table, out / "curves.png", _title(rd, config), loss))
    else:
        notes.append("metrics.csv is absent or empty: no training curves")

    best = _best_checkpoint(rd, notes)
    curve = (best.get("metrics") or {}).get("curve") if best else None
    if best is not None and curve and curve.get("precision"):
        step = best.get("step")
        plots["pr_curve"] = str(
            plot_pr_curve(curve, out / "pr_curve.png", title=f"best checkpoint (step {step})")
        )
    elif best is not None:
        notes.append("best.pt holds no PR curve (not a cleft-detection run): no PR plot")

    bb_summary: dict[str, Any] | None = None
    bb = read_bb_table(rd.bb_csv)
    if bb is None:
        notes.append("bb.csv is absent or empty (a dense run): BB plots skipped")
    else:
        bb_summary = _bb_summary(bb)
        plots["on_rates"] = str(_plot_on_rates(bb, out / "on_rates.png"))
        plots["balance"] = str(_plot_balance(bb, bb_summary, out / "balance.png"))
        plots["density"] = str(_plot_density(bb, out / "density.png"))

    summary = {
        "run_dir": str(rd.path),
        "name": config.get("name") or rd.path.name,
        "method": (config.get("bb") or {}).get("method", "dense") if config.get("bb") else "dense",
        "target_density": (config.get("bb") or {}).get("density"),
        "steps": int(table["step"][-1]) if table and "step" in table else None,
        "final": {k: _num(v[-1]) for k, v in table.items()} if table else None,
        "best_of_columns": _best_of(table) if table else None,
        "best_checkpoint": _plain_metrics(best),
        "bb": bb_summary,
        "plots": plots,
        "notes": notes,
    }
    write_json(summary, out / "summary.json")
    return summary


def report_from_cli(run_dir: str, overwrite: bool = False) -> dict[str, Any]:
    """``bbem report RUN_DIR [--overwrite]``: make the report and say where it went."""
    out = Path(run_dir) / "report"
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is {describe(out)}, not a report folder: move it away")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists: pass --overwrite to make the report again")
    summary = make_report(run_dir)
    print_summary(summary)
    print(
        f"wrote {out}/: {', '.join(Path(p).name for p in summary['plots'].values())}, summary.json"
    )
    for n in summary["notes"]:
        print(f"note: {n}")
    return summary


def print_summary(summary: Mapping[str, Any], console: Any = None) -> None:
    """The run at a glance on the terminal: best validation values, and the BB layers."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(
        title=f"{summary['name'] or summary['run_dir']}: {summary['method']}, "
        f"{summary['steps']} steps",
        title_justify="left",
    )
    for col in ("validation", "best", "at step", "final"):
        t.add_column(col, justify="right")
    final = summary.get("final") or {}
    for k, b in (summary.get("best_of_columns") or {}).items():
        t.add_row(k.removeprefix("val_"), _fmt(b["value"]), str(b["step"]), _fmt(final.get(k)))
    console.print(t)
    bb = summary.get("bb")
    if not bb:
        return
    t = Table(title=f"BB layers at step {bb['last_step']}", title_justify="left")
    t.add_column("layer", overflow="fold")
    for col in ("units", "density", "mean on-rate", "entropy bits", "balance R²"):
        t.add_column(col, justify="right")
    for name, lay in bb["layers"].items():
        t.add_row(
            _short(name),
            str(lay["units"]),
            _fmt(lay["density"]),
            _fmt(lay["on_rate_mean"]),
            _fmt(lay["entropy_mean_bits"]),
            _fmt(lay["balance"].get("r2")),
        )
    nb = bb["net_balance"]
    t.add_row(
        "net",
        "",
        _fmt(bb["density"]),
        "",
        "",
        f"{_fmt(nb.get('r2'))} (slope {_fmt(nb.get('slope'))})",
    )
    console.print(t)


def _fmt(v: Any) -> str:
    return "n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


# -- inputs ----------------------------------------------------------------------------------------


def csv_columns(rows: list[dict[str, str]]) -> dict[str, np.ndarray]:
    """Rows of metrics.csv or loss.csv as numeric columns (blank or text -> NaN), sorted by step."""
    if not rows or "step" not in rows[0]:
        return {}
    cols = {k: np.array([_float(r.get(k)) for r in rows]) for k in rows[0]}
    order = np.argsort(cols["step"], kind="stable")
    return {k: v[order] for k, v in cols.items() if not np.all(np.isnan(v))}


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _num(v: float) -> float | int | None:
    if not math.isfinite(v):
        return None
    return int(v) if float(v).is_integer() and abs(v) < 2**53 else float(v)


def _best_checkpoint(rd: RunDir, notes: list[str]) -> dict[str, Any] | None:
    path = rd.checkpoint_path("best")
    if not path.is_file():
        notes.append("checkpoints/best.pt is absent: no PR curve of the best checkpoint")
        return None
    from bbem.checkpoint import load_checkpoint

    try:
        ck = load_checkpoint(path)
    except UserError as e:  # a corrupt or foreign file: report what is there, say why not this
        notes.append(f"checkpoints/best.pt skipped: {e}")
        return None
    return ck if isinstance(ck, dict) else None


def _plain_metrics(ck: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if ck is None:
        return None
    m = {k: v for k, v in (ck.get("metrics") or {}).items() if k != "curve"}
    return {"step": ck.get("step"), **{k: v for k, v in m.items() if _scalarish(v)}}


def _scalarish(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool)) or (
        isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values())
    )


def _balance(
    on_rate: np.ndarray, degree: np.ndarray, full_fan: np.ndarray
) -> dict[str, float | None]:
    from bbem.bb import balance_fit  # torch: loaded only for runs with BB

    fit = balance_fit(on_rate, degree, full_fan)
    return {k: _num(float(v)) for k, v in fit.items()}


def _bb_summary(bb: Mapping[str, np.ndarray]) -> dict[str, Any]:
    from bbem.bb import binary_entropy

    steps = np.unique(bb["step"])
    first, last = bb_step_rows(bb, steps[0]), bb_step_rows(bb, steps[-1])
    layers = {}
    for name in bb_layers(bb):
        s = {k: v[last["layer"] == name] for k, v in last.items()}
        if not s["on_rate"].size:
            continue
        a = np.clip(s["on_rate"], 0, 1)
        h = binary_entropy(a).numpy()
        layers[name] = {
            "mode": str(s["mode"][0]),
            "units": int(a.size),
            "full_fan": int(s["full_fan"][0]),
            "density": float(s["degree"].sum() / s["full_fan"].sum()),
            "on_rate_mean": float(a.mean()),
            "traffic": float((a * s["degree"]).sum()),
            "entropy_mean_bits": float(h.mean()),
            "balance": _balance(s["on_rate"], s["degree"], s["full_fan"]),
        }
    return {
        "first_step": _num(float(steps[0])),
        "last_step": _num(float(steps[-1])),
        "net_balance_first": _balance(first["on_rate"], first["degree"], first["full_fan"]),
        "net_balance": _balance(last["on_rate"], last["degree"], last["full_fan"]),
        "density": float(last["degree"].sum() / last["full_fan"].sum()),
        "layers": layers,
    }


def _best_of(table: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Best value and its step of each validation column (lower is better for loss/error/wer)."""
    out = {}
    for k, v in table.items():
        if not _is_score(k) or np.all(np.isnan(v)):
            continue
        lower = any(w in k for w in ("loss", "wer", "cer", "err", "eer", "decorrelation"))
        i = int(np.nanargmin(v) if lower else np.nanargmax(v))
        out[k] = {
            "value": _num(float(v[i])),
            "step": _num(float(table["step"][i])),
            "higher_is_better": not lower,
        }
    return out


def _title(rd: RunDir, config: Mapping[str, Any]) -> str:
    return str(config.get("name") or rd.path.name)


# -- plots -----------------------------------------------------------------------------------------


def smooth(values: np.ndarray, span: int) -> np.ndarray:
    """Exponential moving average with pandas' ``span`` convention, debiased at the start."""
    alpha = 2.0 / (span + 1.0)
    out = np.empty(len(values))
    num = den = 0.0
    for i, v in enumerate(np.asarray(values, float)):
        num = (1 - alpha) * num + alpha * v
        den = (1 - alpha) * den + alpha
        out[i] = num / den
    return out


def _plot_loss(ax: Any, loss: Mapping[str, np.ndarray]) -> None:
    """loss.csv: every row faint, smoothed on top, learning rate on a second axis."""
    step, y = loss["step"], loss["loss"]
    span = max(5, len(y) // 25)
    ax.plot(step, y, color="C0", alpha=0.25, lw=0.8, label="train loss")
    ax.plot(step, smooth(y, span), color="C0", lw=1.8, label=f"smoothed (EMA, span {span})")
    ax.set(title="training loss", xlabel="step", ylabel="loss")
    if "lr" in loss:
        lr_ax = ax.twinx()
        lr_ax.plot(step, loss["lr"], color="C3", lw=1.0, ls="--", label="learning rate")
        lr_ax.set_ylabel("learning rate", color="C3")
        lr_ax.tick_params(axis="y", colors="C3")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.legend(loc="upper right", fontsize=8)


def _plot_curves(
    table: Mapping[str, np.ndarray],
    path: Path,
    title: str,
    loss: Mapping[str, np.ndarray] | None = None,
) -> Path:
    step = table["step"]
    val = [k for k in table if _is_score(k) and "loss" not in k]
    losses = [k for k in ("train_loss", "val_loss") if k in table]
    panels = [
        p
        for p in ("loss", "val", "density")
        if (p == "loss" and losses)
        or (p == "val" and val)
        or (p == "density" and "density" in table)
    ]
    fig = Figure(figsize=(5.2 * len(panels), 4.0), layout="constrained")
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        if panel == "loss" and loss and len(loss.get("step", ())) > 1:
            _plot_loss(ax, loss)
        elif panel == "loss":
            for k in losses:
                ax.plot(step, table[k], marker="o", ms=3, label=k)
            lo = min(np.nanmin(table[k]) for k in losses)
            hi = max(np.nanmax(table[k]) for k in losses)
            if lo > 0 and hi / lo > 20:  # log only when the loss spans decades
                ax.set_yscale("log")
            ax.set(title="loss", ylabel="loss")
        elif panel == "val":
            for k in val:
                ax.plot(step, table[k], marker="o", ms=3, label=k.removeprefix("val_"))
            ax.set(title="validation")
        else:
            ax.plot(step, table["density"], marker="o", ms=3, color="C2", label="kept edges")
            if "bb_param_density" in table:
                ax.plot(step, table["bb_param_density"], ls="--", color="C2", label="kept params")
            ax.set(title="density", ylim=(0, 1.05))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def _grid(n: int) -> tuple[int, int]:
    cols = min(4, n)
    return math.ceil(n / cols), cols


def _plot_on_rates(bb: Mapping[str, np.ndarray], path: Path) -> Path:
    steps = np.unique(bb["step"])
    first, last = bb_step_rows(bb, steps[0]), bb_step_rows(bb, steps[-1])
    layers = bb_layers(bb)
    r, c = _grid(len(layers))
    fig = Figure(figsize=(max(3.2 * c, 5.5), 2.6 * r + 0.9), layout="constrained")
    bins = np.linspace(0, 1, 26)
    for i, name in enumerate(layers):
        ax = fig.add_subplot(r, c, i + 1)
        for d, label, color in (
            (first, f"step {steps[0]:g}", "0.6"),
            (last, f"step {steps[-1]:g}", "C0"),
        ):
            a = d["on_rate"][d["layer"] == name]
            # matplotlib's stub wants a Sequence[float]; it takes an array
            ax.hist(a, bins=bins, alpha=0.6, color=color, label=label)  # type: ignore[arg-type]
        ax.set_title(_short(name), fontsize=8)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    fig.supxlabel("on-rate a (fraction of positions where the unit is on)")
    fig.supylabel("units")
    fig.suptitle("on-rates per layer: first and last logged step")
    return save_figure(fig, path)


def _plot_balance(bb: Mapping[str, np.ndarray], summary: Mapping[str, Any], path: Path) -> Path:
    last = bb_step_rows(bb, np.unique(bb["step"])[-1])
    from bbem.bb import balance_points

    x, y = (t.numpy() for t in balance_points(last["on_rate"], last["degree"], last["full_fan"]))
    fig = Figure(figsize=(6.4, 5.0), layout="constrained")
    ax = fig.add_subplot()
    for i, name in enumerate(bb_layers(bb)):
        sel = last["layer"] == name
        ax.scatter(x[sel], y[sel], s=9, alpha=0.7, color=f"C{i % 10}", label=_short(name))
    fit = summary["net_balance"]
    if fit.get("slope") is not None and fit.get("intercept") is not None:
        xs = np.linspace(x.min(), x.max(), 50)
        ax.plot(
            xs,
            fit["slope"] * xs + fit["intercept"],
            "k-",
            lw=1.5,
            label=f"fit: slope {fit['slope']:.2f}, R² {fit['r2']:.3f}"
            if fit.get("r2") is not None
            else "fit",
        )
    else:
        ax.text(
            0.5,
            0.03,
            "fit undefined (fewer than two distinct degrees)",
            transform=ax.transAxes,
            ha="center",
            fontsize=8,
        )
    ax.set(
        xlabel="kept degree k / K",
        ylabel="log((1 - a) / a)",
        title=f"selectivity-audience balance, step {summary['last_step']}",
    )
    ax.grid(alpha=0.3)
    if len(bb_layers(bb)) <= 12:
        ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def layer_density(bb: Mapping[str, np.ndarray]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``(steps[S], layers[L] in network order, density[L, S])`` from bb.csv columns: kept edges
    over edges per layer and step, summed in one pass (bb.csv can hold millions of rows)."""
    steps, si = np.unique(bb["step"], return_inverse=True)
    layers = bb_layers(bb)
    names, li = np.unique(bb["layer"], return_inverse=True)
    key = li * len(steps) + si
    n = len(names) * len(steps)
    kept = np.bincount(key, weights=bb["degree"], minlength=n).reshape(len(names), -1)
    full = np.bincount(key, weights=bb["full_fan"], minlength=n).reshape(len(names), -1)
    dens = kept / np.maximum(full, 1)
    return steps, layers, dens[np.searchsorted(names, layers)]


def _plot_density(bb: Mapping[str, np.ndarray], path: Path) -> Path:
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    steps, layers, dens = layer_density(bb)
    for i, (name, d) in enumerate(zip(layers, dens, strict=True)):
        ax.plot(
            steps,
            d,
            marker="o" if len(steps) < 30 else None,
            ms=3,
            color=f"C{i % 10}",
            label=_short(name),
        )
    ax.set(xlabel="step", ylabel="kept edges / edges", ylim=(0, 1.05), title="density per layer")
    ax.grid(alpha=0.3)
    if len(bb_layers(bb)) <= 12:
        ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def _short(name: str, n: int = 34) -> str:
    """A layer name for a legend: MONAI's nested ``submodule.`` shortened to ``s.`` (names stay
    distinct), then the tail if still long."""
    name = name.replace("submodule.", "s.")
    return name if len(name) <= n else "…" + name[-(n - 1) :]


def _is_score(column: str) -> bool:
    """A validation column that measures quality (not the threshold it was taken at)."""
    return column.startswith("val_") and "threshold" not in column
