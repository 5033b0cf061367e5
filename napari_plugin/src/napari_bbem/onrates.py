"""A run's ``bb.csv`` per layer and step, and the figure the "On-rates" widget shows (no Qt).

``bb.csv`` (see :mod:`bbem.rundir`) has one row per controlled unit, layer and logged step:
``step, layer, mode, unit, on_rate, degree, full_fan, traffic``. :func:`read_on_rates` loads it
once into columns; :meth:`OnRates.at` cuts out one layer at one step as arrays ordered by unit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bbem.errors import UserError
from bbem.rundir import bb_layers, bb_step_rows
from napari_bbem.evaluate import DARK_FG as FG
from napari_bbem.evaluate import dark

#: Bar and point colours that read on napari's dark theme.
LAYER_C0 = "#4fc3f7"
LAYER_C1 = "#ffb74d"


@dataclass(frozen=True)
class LayerStep:
    """One layer at one step; every array is ``[units]``, ordered by unit."""

    layer: str
    step: int
    mode: str
    unit: np.ndarray
    on_rate: np.ndarray
    degree: np.ndarray
    full_fan: np.ndarray
    traffic: np.ndarray

    def balance(self) -> dict[str, float]:
        """Least-squares line of log((1-a)/a) on k/K: slope, intercept, r2 (NaN if undefined)."""
        from bbem.bb import balance_fit

        return balance_fit(self.on_rate, self.degree, self.full_fan)


class OnRates:
    """``bb.csv`` as columns; :attr:`layers` in network order, :meth:`steps`, :meth:`at`."""

    def __init__(self, table: dict[str, np.ndarray], source: str = "bb.csv") -> None:
        self.table = table
        self.source = source
        self.layers: list[str] = bb_layers(table)

    def steps(self, layer: str) -> list[int]:
        """The logged steps of ``layer``, ascending."""
        self._check_layer(layer)
        return [int(s) for s in np.unique(self.table["step"][self.table["layer"] == layer])]

    def at(self, layer: str, step: int) -> LayerStep:
        """``layer`` at ``step`` (a UserError names the logged steps if it is not one)."""
        self._check_layer(layer)
        col = bb_step_rows(self.table, step, layer)
        if not col["unit"].size:
            raise UserError(
                f"{self.source} has no step {step} for layer {layer}: logged steps are "
                f"{_short_list(self.steps(layer))}"
            )
        return LayerStep(
            layer=layer,
            step=int(step),
            mode=str(col["mode"][0]),
            unit=col["unit"],
            on_rate=col["on_rate"],
            degree=col["degree"],
            full_fan=col["full_fan"],
            traffic=col["traffic"],
        )

    def _check_layer(self, layer: str) -> None:
        if layer not in self.layers:
            raise UserError(
                f"{self.source} has no layer {layer!r}: it holds {_short_list(self.layers)}"
            )


def read_on_rates(run_dir: str | os.PathLike) -> OnRates:
    """Load ``RUN_DIR/bb.csv`` (or a bb.csv path itself); a UserError if absent or empty."""
    from bbem.rundir import read_bb_table

    p = Path(run_dir)
    path = p / "bb.csv" if p.is_dir() else p
    if not path.is_file():
        raise UserError(
            f"{path} does not exist: choose a run directory of a BB training run (a dense run "
            "writes no bb.csv)"
        )
    table = read_bb_table(path)
    if table is None:
        raise UserError(f"{path} has no rows yet: wait for the run's first BB log")
    return OnRates(table, source=str(path))


def layer_name(path: str) -> str:
    """A short name for a layer's module path, as a person would say it.

    MONAI UNet paths (``bbem.model``) read as encoder / bottom / decoder levels counted from
    the full-resolution level 1: ``model.0.conv.unit0.conv`` is "encoder 1 conv 1",
    ``model.1.submodule.1.submodule.0.conv.unit1.conv`` "encoder 3 conv 2",
    ``model.1.submodule.1.submodule.residual`` "bottom 3 residual", ``model.2.0.conv``
    "decoder 1 up-conv". Anything else is returned as it is.
    """
    rest = path.removeprefix("model.")
    if rest == path:
        return path
    level = 1
    while rest.startswith("1.submodule."):
        level += 1
        rest = rest.removeprefix("1.submodule.")
    head, _, tail = rest.partition(".")
    if head == "0":
        where = f"encoder {level}"
    elif head == "2":
        where = f"decoder {level}"
        up, _, inner = tail.partition(".")
        if up == "0" and inner == "conv":
            return f"{where} up-conv"
        if up != "1":
            return path
        tail = inner
    else:  # right after a submodule: the bottom (deepest) level
        where, tail = f"bottom {level}", rest
    if tail in ("conv", "conv.conv"):
        return f"{where} conv"
    if tail == "residual":
        return f"{where} residual"
    parts = tail.split(".")
    if (
        len(parts) == 3
        and parts[0] == "conv"
        and parts[1].startswith("unit")
        and parts[2] == "conv"
    ):
        unit = parts[1].removeprefix("unit")
        if unit.isdigit():
            return f"{where} conv {int(unit) + 1}"
    return path


def layer_choices(layers: list[str]) -> list[tuple[str, str]]:
    """``(short name, path)`` per layer for a combo box; a short name used twice keeps its path."""
    short = [layer_name(p) for p in layers]
    return [(s if short.count(s) == 1 else p, p) for s, p in zip(short, layers, strict=True)]


def full_fan_of(ls: LayerStep) -> int:
    """K, the layer's full fan (the largest over its units)."""
    return int(ls.full_fan.max())


def beta_of(ls: LayerStep) -> float:
    """beta = slope / K: the fitted slope is beta K because the balance plot's x is k / K."""
    return ls.balance()["slope"] / full_fan_of(ls)


def _title(ax: Axes, ls: LayerStep, what: str) -> None:
    name = layer_name(ls.layer)
    second = f"\n{ls.layer}" if name != ls.layer else ""
    ax.set_title(f"{name}, {what}{second}", fontsize=9)


def plot_layer_step(fig: Figure, ls: LayerStep) -> Figure:
    """Draw ``ls`` into ``fig`` (cleared): on-rate and degree per channel, and the balance plot
    (its fitted slope is beta K, since x is k / K; beta = slope / K is printed)."""
    fig.clear()
    ax_a, ax_k, ax_b = fig.subplots(3, 1)
    what = "output channel" if ls.mode == "in" else "input channel"
    ax_a.bar(ls.unit, ls.on_rate, width=1.0, color=LAYER_C0)
    ax_a.set(ylim=(0, 1), ylabel="on-rate a", xlim=(ls.unit.min() - 0.5, ls.unit.max() + 0.5))
    _title(ax_a, ls, f"step {ls.step} (mode {ls.mode})")
    ax_k.bar(ls.unit, ls.degree, width=1.0, color=LAYER_C1)
    big_k = full_fan_of(ls)
    ax_k.axhline(big_k, color=FG, lw=1, ls="--", label=f"K = {big_k}")
    fan = "fan-in" if ls.mode == "in" else "fan-out"
    ax_k.set(
        ylabel=f"kept {fan} k", xlabel=what, xlim=ax_a.get_xlim(), ylim=(0, ls.full_fan.max() * 1.1)
    )
    ax_k.legend(fontsize=7, loc="lower right")

    from bbem.bb import balance_points

    x, y = (t.numpy() for t in balance_points(ls.on_rate, ls.degree, ls.full_fan))
    ax_b.scatter(x, y, s=10, alpha=0.75, color=LAYER_C0)
    fit = ls.balance()
    if np.isfinite(fit["slope"]):
        xs = np.linspace(x.min(), x.max(), 20)
        r2 = f", R² {fit['r2']:.2f}" if np.isfinite(fit["r2"]) else ""
        ax_b.plot(
            xs,
            fit["slope"] * xs + fit["intercept"],
            "-",
            color=FG,
            lw=1,
            label=f"slope = βK = {fit['slope']:.2f}{r2}\nβ = slope / K = {beta_of(ls):.4f} (K = {big_k})",
        )
        ax_b.legend(fontsize=7)
    else:
        ax_b.text(
            0.5,
            0.9,
            "fit undefined (one degree)",
            transform=ax_b.transAxes,
            ha="center",
            fontsize=7,
        )
    ax_b.set(xlabel="kept degree k / K (so the slope is βK)", ylabel="log((1 - a) / a)")
    ax_b.set_title("selectivity-audience balance", fontsize=9)
    ax_b.grid(alpha=0.3)
    for ax in (ax_a, ax_k):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _small(ax_a, ax_k, ax_b)
    return dark(fig)


def plot_all_layers(fig: Figure, data: OnRates, step: int | None = None) -> Figure:
    """The balance relation of every unit of every layer, one series (colour) per layer, at
    ``step`` (default: each layer's last logged step)."""
    from bbem.bb import balance_points

    fig.clear()
    ax = fig.add_subplot()
    cmap = colormaps["turbo"]
    n = len(data.layers)
    for i, layer in enumerate(data.layers):
        steps = data.steps(layer)
        at = step if step in steps else steps[-1]
        ls = data.at(layer, at)
        x, y = (t.numpy() for t in balance_points(ls.on_rate, ls.degree, ls.full_fan))
        colour = cmap(0.1 + 0.8 * i / max(n - 1, 1))
        ax.scatter(x, y, s=8, alpha=0.8, color=colour, label=layer_name(layer))
    ax.set(xlabel="kept degree k / K", ylabel="log((1 - a) / a)")
    shown = f"step {step}" if step is not None else "each layer's last step"
    ax.set_title(f"balance of every unit, all layers ({shown})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best", ncol=1 if n <= 8 else 2, markerscale=1.5)
    _small(ax)
    return dark(fig)


def plot_over_training(fig: Figure, data: OnRates, layer: str) -> Figure:
    """On-rate and kept degree k / K of ``layer`` over its logged steps: median and quartiles."""
    fig.clear()
    ax_a, ax_k = fig.subplots(2, 1, sharex=True)
    steps = data.steps(layer)
    rows = [data.at(layer, s) for s in steps]
    for ax, values, colour, label in (
        (ax_a, [r.on_rate for r in rows], LAYER_C0, "on-rate a"),
        (ax_k, [r.degree / r.full_fan for r in rows], LAYER_C1, "kept degree k / K"),
    ):
        q = np.array([np.percentile(v, (25, 50, 75)) for v in values])
        ax.fill_between(steps, q[:, 0], q[:, 2], color=colour, alpha=0.3, label="quartiles")
        ax.plot(steps, q[:, 1], "o-", color=colour, ms=3, label="median")
        ax.set(ylabel=label, ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    ax_k.set_xlabel("training step")
    ax_k.xaxis.set_major_locator(MaxNLocator(integer=True))
    name = layer_name(layer)
    second = f"\n{layer}" if name != layer else ""
    ax_a.set_title(f"{name} over training ({len(steps)} logged steps){second}", fontsize=9)
    _small(ax_a, ax_k)
    return dark(fig)


def _small(*axes: Axes) -> None:
    for ax in axes:
        ax.tick_params(labelsize=7)
        ax.xaxis.label.set_fontsize(8)
        ax.yaxis.label.set_fontsize(8)


def _short_list(items: list, n: int = 8) -> str:
    s = ", ".join(str(i) for i in items[:n])
    return s + (f", ... ({len(items)} in all)" if len(items) > n else "")
