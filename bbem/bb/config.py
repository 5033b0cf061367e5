"""``BBConfig``: every knob of the Budgeted Broadcast rule and its baselines (see METHOD.md)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

METHODS = ("bb", "bb_tiers", "magnitude", "random")
MODES = ("in", "out")
RESCALES = ("sqrt", "none")
PROBES = ("act", "output")


@dataclass
class BBConfig:
    """The rule, its schedule and its baselines.

    ``density`` is the kept fraction of channel-pair edges in every masked layer, matched
    exactly (to one edge per unit) by every method, so methods compare at equal sparsity.
    """

    density: float
    method: str = "bb"
    mode: str = "in"
    #: 1 / (beta * K): how strongly the on-rate moves a unit's degree.
    spread: float = 0.5
    #: decay of the on-rate moving average (per ``step()``).
    ema: float = 0.99
    warmup_steps: int = 0
    ramp_steps: int = 0
    refresh_every: int = 50
    #: fewest edges a unit keeps.
    min_fan: int = 1
    regrow: bool = True
    rescale: str = "sqrt"
    seed: int = 0
    #: bb_tiers: relative kept fraction of busy (on-rate > tier_high) and rare (< tier_low) units.
    dens_busy: float = 0.3
    dens_rare: float = 0.9
    tier_high: float = 0.7
    tier_low: float = 0.1
    #: leave layers with a single input or output channel dense (a U-Net's first and last conv).
    skip_unit_fan: bool = True
    #: where fan-in mode reads "on": ``act`` after the following activation (METHOD.md), or
    #: ``output`` on the layer's own output. A norm layer between conv and activation centres
    #: every channel, which narrows act on-rates; ``output`` reads the conv itself.
    probe: str = "act"

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("mode", self.mode, MODES)
        _choice("rescale", self.rescale, RESCALES)
        _choice("probe", self.probe, PROBES)
        if not (isinstance(self.density, (int, float)) and 0 < self.density <= 1):
            raise ValueError(f"BBConfig.density must be in (0, 1], got {self.density!r}")
        if not (0 <= self.ema < 1):
            raise ValueError(f"BBConfig.ema must be in [0, 1), got {self.ema!r}")
        if not (self.spread > 0 and math.isfinite(self.spread)):
            raise ValueError(f"BBConfig.spread must be > 0, got {self.spread!r}")
        for name in ("warmup_steps", "ramp_steps"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"BBConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if int(self.refresh_every) < 1:
            raise ValueError(f"BBConfig.refresh_every must be >= 1, got {self.refresh_every!r}")
        if int(self.min_fan) < 0:
            raise ValueError(f"BBConfig.min_fan must be >= 0, got {self.min_fan!r}")
        for name in ("dens_busy", "dens_rare"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"BBConfig.{name} must be in (0, 1], got {v!r}")
        if not 0 <= self.tier_low <= self.tier_high <= 1:
            raise ValueError(
                f"BBConfig.tier_low/tier_high must satisfy 0 <= low <= high <= 1, "
                f"got {self.tier_low!r}, {self.tier_high!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BBConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"BBConfig has no field {unknown[0]!r}; fields: {sorted(known)}")
        return cls(**d)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"BBConfig.{name} must be one of {list(allowed)}, got {value!r}")
