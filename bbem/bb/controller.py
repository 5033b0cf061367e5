"""The refresh: target degrees under an exact edge budget, and top-k masks. Pure tensor code.

Everything here is vectorised over units (no Python loop over rows or channels); a Conv3d
(256, 256, 3) refreshes in about a millisecond on a CPU (``bench/bb_refresh.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-4


def solve_budget(base: Tensor, slope: Tensor, lo: Tensor, hi: Tensor, total: int) -> Tensor:
    """Integer degrees ``k_u = clip(base_u + t * slope_u, lo_u, hi_u)`` summing to ``total``.

    ``t`` is found exactly (the sum is piecewise linear and increasing in ``t``: evaluate it
    at every breakpoint, then interpolate in the right segment); the real-valued degrees are
    then floored and the leftover edges go to the units with the largest fractional parts, so
    the sum is exact and the order of units is kept. Shapes: all ``[U]``; returns long ``[U]``.
    """
    base, slope = base.double(), slope.double().clamp_min(1e-12)
    lo, hi = lo.double(), torch.maximum(hi.double(), lo.double())
    total = int(min(max(total, int(lo.sum().item())), int(hi.sum().item())))
    knots = torch.cat([(lo - base) / slope, (hi - base) / slope]).sort().values  # [2U]
    sums = _clip(base[None] + knots[:, None] * slope[None], lo, hi).sum(1)  # [2U]
    j = int(torch.searchsorted(sums, torch.tensor([float(total)], dtype=sums.dtype)).item())
    if j == 0:
        t = knots[0]
    elif j >= len(knots):
        t = knots[-1]
    else:
        s0, s1 = sums[j - 1], sums[j]
        w = 0.0 if s1 <= s0 else (total - s0) / (s1 - s0)
        t = knots[j - 1] + w * (knots[j] - knots[j - 1])
    real = _clip(base + t * slope, lo, hi)
    return _round_to_total(real, lo, hi, total)


def _clip(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    return torch.minimum(torch.maximum(x, lo), hi)


def _round_to_total(real: Tensor, lo: Tensor, hi: Tensor, total: int) -> Tensor:
    k = torch.minimum(torch.maximum(real.floor(), lo), hi)
    short = total - int(k.sum().item())
    if short > 0:
        frac = torch.where(k < hi, real - k, torch.full_like(real, -1.0))
        # Stable order: largest fraction first; equal fractions keep the unit order.
        order = torch.argsort(frac, descending=True, stable=True)
        room = (hi - k)[order].clamp_min(0)
        take = torch.zeros_like(k)
        # One extra edge per unit per pass keeps the rule's order; a second pass is rare.
        while short > 0:
            add = (torch.cumsum((room > 0).double(), 0) <= short) & (room > 0)
            n = int(add.sum().item())
            if n == 0:
                break
            take[order[add]] += 1
            room = room - add.double()
            short -= n
        k = k + take
    elif short < 0:
        frac = torch.where(k > lo, real - k, torch.full_like(real, 2.0))
        order = torch.argsort(frac, stable=True)
        room = (k - lo)[order].clamp_min(0)
        need = -short
        while need > 0:
            drop = (torch.cumsum((room > 0).double(), 0) <= need) & (room > 0)
            n = int(drop.sum().item())
            if n == 0:
                break
            k[order[drop]] -= 1
            room = room - drop.double()
            need -= n
    return k.long()


def bb_degrees(
    on_rate: Tensor, full_fan: int, total: int, spread: float, k_min: int, k_max: Tensor | None
) -> Tensor:
    """BB target degrees: ``k_u = clip(K (delta + spread * log((1-a)/a)), k_min, K)``, summing to ``total``.

    ``k_max`` (``[U]``, optional) caps each unit, e.g. at its current degree when regrowth is off.
    """
    a = on_rate.double().clamp(EPS, 1 - EPS)
    logit = torch.log((1 - a) / a)
    K = float(full_fan)
    hi = torch.full_like(a, K) if k_max is None else k_max.double().clamp(max=K)
    lo = torch.full_like(a, float(min(k_min, full_fan)))
    return solve_budget(K * spread * logit, torch.full_like(a, K), lo, hi, total)


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

    Returns a float ``[U, K]`` mask with exactly ``degrees[u]`` ones in row ``u``.
    """
    K = scores.shape[1]
    order = torch.argsort(scores, dim=1, descending=True)
    keep = torch.arange(K, device=scores.device)[None, :] < degrees.to(scores.device)[:, None]
    return torch.zeros_like(scores, dtype=torch.float32).scatter_(1, order, keep.float())
