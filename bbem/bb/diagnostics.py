"""Diagnostics of METHOD.md: coding entropy, the selectivity-audience balance fit, decorrelation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bbem.bb.controller import EPS

if TYPE_CHECKING:
    import numpy as np


def binary_entropy(a: Tensor) -> Tensor:
    """``h(a) = -a log2 a - (1-a) log2 (1-a)`` in bits, elementwise; 0 at a = 0 or 1."""
    a = torch.as_tensor(a).double()
    h = -(torch.xlogy(a, a) + torch.xlogy(1 - a, 1 - a)) / torch.log(
        torch.tensor(2.0, dtype=a.dtype)
    )
    return h.float()


def balance_points(
    on_rate: Tensor | np.ndarray, degree: Tensor | np.ndarray, full_fan: float | Tensor | np.ndarray
) -> tuple[Tensor, Tensor]:
    """``(k / K, log((1-a)/a))`` per unit, float64 ``[units]`` each: the axes of METHOD.md's
    balance line. ``a`` is clamped to ``[EPS, 1 - EPS]`` as the controller does, so a dead or
    saturated unit stays finite. Array-likes (NumPy, from bb.csv) are accepted."""
    a = torch.as_tensor(on_rate).double().clamp(EPS, 1 - EPS)
    x = torch.as_tensor(degree).double() / torch.as_tensor(full_fan, dtype=torch.float64)
    return x, torch.log((1 - a) / a)


def balance_fit(
    on_rate: Tensor | np.ndarray, degree: Tensor | np.ndarray, full_fan: float | Tensor | np.ndarray
) -> dict[str, float]:
    """Least-squares fit of ``log((1-a)/a)`` against ``k / K``: slope (= beta K), intercept, R^2.

    The paper's optimum puts every unit on a line through the origin; BB should move a network
    toward a good fit. With fewer than two distinct degrees the fit is undefined (NaN).
    """
    x, y = balance_points(on_rate, degree, full_fan)
    n = x.numel()
    nan = float("nan")
    if n < 2 or float(x.var(unbiased=False)) < 1e-12:
        return {"slope": nan, "intercept": nan, "r2": nan, "n": n}
    xm, ym = x.mean(), y.mean()
    slope = ((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum()
    intercept = ym - slope * xm
    ss_res = ((y - (slope * x + intercept)) ** 2).sum()
    ss_tot = ((y - ym) ** 2).sum()
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else torch.tensor(nan)
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2), "n": n}


def channel_means(x: Tensor, channel_dim: int = 1) -> Tensor:
    """``[N, C]`` per-sample channel means of activations ``[N, C, *spatial]`` (or ``[N, *, C]``)."""
    x = x.detach().float().movedim(channel_dim, 1)
    return x.reshape(x.shape[0], x.shape[1], -1).mean(-1)


def decorrelation(means: Tensor) -> float:
    """Mean |Pearson r| over pairs of units, from per-sample channel means ``[N, C]``.

    Lower is more decorrelated. Units that never vary (dead or constant) are left out, since
    their correlation is undefined.
    """
    m = means.double()
    m = m[:, m.std(0) > 1e-12]
    c = m.shape[1]
    if m.shape[0] < 2 or c < 2:
        return float("nan")
    r = torch.corrcoef(m.T)
    off = r[~torch.eye(c, dtype=torch.bool)]
    return float(off.abs().mean())
