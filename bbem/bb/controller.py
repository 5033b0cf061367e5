"""The refresh: target degrees under an exact edge budget, and top-k masks. Pure tensor code.

Everything here is vectorised over units (no Python loop over rows or channels); a Conv3d
(256, 256, 3) refreshes in about 2 ms on one CPU thread (``bench/bb_refresh.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

EPS = 1e-4


def solve_budget(base: Tensor, slope: Tensor, lo: Tensor, hi: Tensor, total: int) -> Tensor:
    """Integer degrees ``k_u = clip(base_u + t * slope_u, lo_u, hi_u)`` summing to ``total``.

    ``t`` is found exactly: the sum ``f(t)`` is piecewise linear and increasing, with a knot
    where a unit enters or leaves its clip range. Sorting the ``2U`` knots and taking running
    sums of each knot's change in intercept and slope gives ``f`` at every knot in
    ``O(U log U)``; ``t`` is then interpolated in the right segment. The real-valued degrees
    are floored and the leftover edges go to the units with the largest fractional parts, so
    the sum is exact and the order of units is kept. Shapes: all ``[U]``; returns long ``[U]``.

    The arithmetic runs in NumPy float64: ``U`` is at most a few thousand, where NumPy's
    per-call cost is a tenth of torch's and this keeps a refresh within its 3 ms budget.
    """
    b, s, lo_, hi_ = (_f64(x) for x in (base, slope, lo, hi))
    s = np.maximum(s, 1e-12)
    hi_ = np.maximum(hi_, lo_)
    total = int(min(max(total, int(lo_.sum())), int(hi_.sum())))
    t_lo, t_hi = (lo_ - b) / s, (hi_ - b) / s
    knots = np.concatenate([t_lo, t_hi])
    # Entering at t_lo: the unit's term goes from lo to b + t s; leaving at t_hi: to hi.
    d_icpt = np.concatenate([b - lo_, hi_ - b])
    d_slope = np.concatenate([s, -s])
    order = np.argsort(knots, kind="stable")
    knots = knots[order]
    sums = lo_.sum() + np.cumsum(d_icpt[order]) + knots * np.cumsum(d_slope[order])
    j = int(np.searchsorted(sums, float(total)))
    if j == 0:
        t = knots[0]
    elif j >= len(knots):
        t = knots[-1]
    else:
        s0, s1 = sums[j - 1], sums[j]
        w = 0.0 if s1 <= s0 else (total - s0) / (s1 - s0)
        t = knots[j - 1] + w * (knots[j] - knots[j - 1])
    real = np.clip(b + t * s, lo_, hi_)
    k = _round_to_total(real, lo_, hi_, total)
    return torch.from_numpy(k).to(base.device)


def _f64(x: Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def _round_to_total(real: np.ndarray, lo: np.ndarray, hi: np.ndarray, total: int) -> np.ndarray:
    k = np.clip(np.floor(real), lo, hi)
    short = total - int(k.sum())
    # One edge per unit per pass, in order of fractional part (stable: equal fractions keep
    # the unit order); a second pass only happens when caps bind, and is rare.
    while short > 0:
        frac = np.where(k < hi, real - k, -np.inf)
        order = np.argsort(-frac, kind="stable")[:short]
        order = order[frac[order] > -np.inf]
        if len(order) == 0:
            break
        k[order] += 1
        short -= len(order)
    while short < 0:
        frac = np.where(k > lo, real - k, np.inf)
        order = np.argsort(frac, kind="stable")[:-short]
        order = order[frac[order] < np.inf]
        if len(order) == 0:
            break
        k[order] -= 1
        short += len(order)
    return k.astype(np.int64)


def bb_degrees(
    on_rate: Tensor,
    full_fan: int,
    total: int,
    spread: float,
    k_min: int,
    k_max: Tensor | None,
    allocation: str = "logodds",
) -> Tensor:
    """BB target degrees: ``k_u = clip(kbar (delta + spread * log((1-a)/a)), k_min, K)``, summing
    to ``total``, with ``kbar = total / U`` the layer's mean degree.

    ``spread`` is ``1 / (beta * kbar)``: the law ``log((1-a)/a) = beta k`` with its slope tied to
    the budget (the paper ties beta to a global budget without saying how). METHOD.md scales by
    the full fan ``K`` instead; at density 0.5 the two agree for ``spread_K = spread / 2``. Why
    ``kbar``: with ``K`` a unit of log-odds moves the degree by ``spread / density`` mean degrees,
    so at density 0.1 METHOD.md's 0.5 pushed every unit on more than half the time to one edge
    and BB lost to random pruning on both companions (README, "Companions"); relative to
    ``kbar`` the allocation has the same shape at every density.

    ``k_max`` (``[U]``, optional) caps each unit, e.g. at its current degree when regrowth is off.
    ``allocation="rank"`` (the ablation) puts :func:`rank_logit` in place of the log-odds.
    """
    a = on_rate.double().clamp(EPS, 1 - EPS)
    logit = torch.log((1 - a) / a)
    if allocation == "rank":
        logit = rank_logit(logit)
    K = float(full_fan)
    hi = torch.full_like(a, K) if k_max is None else k_max.double().clamp(max=K)
    lo = torch.full_like(a, float(min(k_min, full_fan)))
    kbar = total / max(a.numel(), 1)
    return solve_budget(kbar * spread * logit, torch.full_like(a, K), lo, hi, total)


def rank_logit(logit: Tensor) -> Tensor:
    """The log-odds ``[U]`` replaced by their ranks, evenly spaced with the same mean and sd.

    Order is kept (a busier unit never gets more edges) and so is the overall strength of the
    allocation; only the law's shape (how far apart two on-rates put two units) is gone. Ties
    keep the unit order; a single unit, or units all alike, keep their values.
    """
    n = logit.numel()
    if n < 2 or float(logit.std()) == 0.0:
        return logit
    ranks = torch.empty_like(logit)
    ranks[torch.argsort(logit, stable=True)] = torch.arange(
        n, dtype=logit.dtype, device=logit.device
    )
    z = (ranks - ranks.mean()) / ranks.std()
    return logit.mean() + logit.std() * z


def tier_degrees(
    on_rate: Tensor,
    full_fan: int,
    total: int,
    high: float,
    low: float,
    dens_busy: float,
    dens_rare: float,
    k_min: int,
    k_max: Tensor | None,
) -> Tensor:
    """The notebooks' tiers (busy keep ``dens_busy``, rare ``dens_rare``, others all), scaled to ``total``.

    The notebooks prune by the tier fractions alone; scaling them by one common factor keeps
    their ratios while matching the density every method is compared at.
    """
    a = on_rate.double()
    frac = torch.ones_like(a)
    frac = torch.where(a > high, torch.full_like(a, dens_busy), frac)
    frac = torch.where(a < low, torch.full_like(a, dens_rare), frac)
    K = float(full_fan)
    hi = torch.full_like(a, K) if k_max is None else k_max.double().clamp(max=K)
    lo = torch.full_like(a, float(min(k_min, full_fan)))
    return solve_budget(torch.zeros_like(a), K * frac, lo, hi, total)


def uniform_degrees(units: int, full_fan: int, total: int, k_max: Tensor | None) -> Tensor:
    """The same degree for every unit (magnitude, random), the remainder spread from unit 0."""
    hi = torch.full((units,), float(full_fan), dtype=torch.float64)
    if k_max is not None:
        hi = torch.minimum(hi, k_max.double())
    return solve_budget(
        torch.zeros(units, dtype=torch.float64),
        torch.ones(units, dtype=torch.float64),
        torch.zeros(units, dtype=torch.float64),
        hi,
        total,
    )


def topk_mask(scores: Tensor, degrees: Tensor) -> Tensor:
    """Keep the ``degrees[u]`` best-scoring edges of each row ``u`` of ``scores`` ``[U, K]``.

    Returns a float ``[U, K]`` mask with exactly ``degrees[u]`` ones in row ``u``; among equal
    scores the lower column index wins, so the result is deterministic.

    On CPU each row's ``degrees[u]``-th largest score is read from NumPy's SIMD row sort
    (about 30x faster than ``torch.sort`` on 256 x 256) and used as a threshold; rows where
    ties at the threshold would keep too many edges fall back to a stable rank.
    """
    if scores.device.type != "cpu":
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        K = scores.shape[1]
        keep = torch.arange(K, device=scores.device)[None, :] < degrees.to(scores.device)[:, None]
        return torch.zeros_like(scores, dtype=torch.float32).scatter_(1, order, keep.float())
    s = scores.detach().float().contiguous().numpy()
    d = degrees.detach().cpu().numpy().astype(np.int64)
    U, K = s.shape
    if U == 0 or K == 0:
        return torch.zeros(U, K)
    thr = np.sort(s, axis=1)[np.arange(U), np.clip(K - d, 0, K - 1)]
    keep = (s >= thr[:, None]) & (d > 0)[:, None]
    bad = np.flatnonzero(keep.sum(1) != d)
    if len(bad):
        rank = np.argsort(-s[bad], axis=1, kind="stable")
        rows = np.zeros((len(bad), K), dtype=bool)
        np.put_along_axis(rows, rank, np.arange(K)[None, :] < d[bad, None], axis=1)
        keep[bad] = rows
    return torch.from_numpy(keep.astype(np.float32))
