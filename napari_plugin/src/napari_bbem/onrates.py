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
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bbem.errors import UserError
from bbem.rundir import bb_layers, bb_step_rows


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


def plot_layer_step(fig: Figure, ls: LayerStep) -> Figure:
    """Draw ``ls`` into ``fig`` (cleared): on-rate and degree per channel, and the balance plot."""
    fig.clear()
    ax_a, ax_k, ax_b = fig.subplots(3, 1)
    what = "output channel" if ls.mode == "in" else "input channel"
    ax_a.bar(ls.unit, ls.on_rate, width=1.0, color="C0")
    ax_a.set(ylim=(0, 1), ylabel="on-rate a", xlim=(ls.unit.min() - 0.5, ls.unit.max() + 0.5))
    ax_a.set_title(f"{ls.layer}, step {ls.step} (mode {ls.mode})", fontsize=9)
    ax_k.bar(ls.unit, ls.degree, width=1.0, color="C1")
    ax_k.axhline(int(ls.full_fan.max()), color="k", lw=1, ls="--", label=f"K = {ls.full_fan.max()}")
    fan = "fan-in" if ls.mode == "in" else "fan-out"
    ax_k.set(
        ylabel=f"kept {fan} k", xlabel=what, xlim=ax_a.get_xlim(), ylim=(0, ls.full_fan.max() * 1.1)
    )
    ax_k.legend(fontsize=7, loc="lower right")

    from bbem.bb import balance_points

    x, y = (t.numpy() for t in balance_points(ls.on_rate, ls.degree, ls.full_fan))
    ax_b.scatter(x, y, s=10, alpha=0.75, color="C0")
    fit = ls.balance()
    if np.isfinite(fit["slope"]):
        xs = np.linspace(x.min(), x.max(), 20)
        r2 = f", R² {fit['r2']:.2f}" if np.isfinite(fit["r2"]) else ""
        ax_b.plot(
            xs,
            fit["slope"] * xs + fit["intercept"],
            "k-",
            lw=1,
            label=f"slope {fit['slope']:.2f}{r2}",
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
    ax_b.set(xlabel="kept degree k / K", ylabel="log((1 - a) / a)")
    ax_b.set_title("selectivity-audience balance", fontsize=9)
    ax_b.grid(alpha=0.3)
    for ax in (ax_a, ax_k):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_a, ax_k, ax_b):
        ax.tick_params(labelsize=7)
        ax.xaxis.label.set_size(8)
        ax.yaxis.label.set_size(8)
    return fig


def _short_list(items: list, n: int = 8) -> str:
    s = ", ".join(str(i) for i in items[:n])
    return s + (f", ... ({len(items)} in all)" if len(items) > n else "")
