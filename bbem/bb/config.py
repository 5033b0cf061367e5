"""``BBConfig``: every knob of the Budgeted Broadcast rule and its baselines (see METHOD.md).

Each field's type, default, allowed values and meaning are written once, here. ``BBConfig``
checks them, and the YAML schema (``bbem.config.BBSection``) is built from the same fields, so
the two cannot disagree. Pure Python: the schema imports this without loading torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

Method = Literal["bb", "bb_tiers", "magnitude", "random"]
Mode = Literal["in", "out"]
Rescale = Literal["sqrt", "none"]
ProbeSite = Literal["act", "output"]
Allocation = Literal["logodds", "rank"]
EdgeChoice = Literal["magnitude", "random"]
METHODS: tuple[str, ...] = get_args(Method)
MODES: tuple[str, ...] = get_args(Mode)
RESCALES: tuple[str, ...] = get_args(Rescale)
PROBES: tuple[str, ...] = get_args(ProbeSite)


@dataclass(frozen=True)
class Range:
    """The finite numbers a numeric field accepts: ``lo``/``hi`` (None: unbounded), each bound
    open (excluded) or closed (included)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is out of range (``"must be in (0, 1]"``), or None when it is in."""
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        if ok and self.lo is not None:
            ok = value > self.lo if self.lo_open else value >= self.lo
        if ok and self.hi is not None:
            ok = value < self.hi if self.hi_open else value <= self.hi
        return None if ok else f"must be {self}"

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        # one-sided: pydantic's own words, so YAML messages read alike whichever rule fired
        if self.lo is not None:
            return f"greater than {'' if self.lo_open else 'or equal to '}{self.lo:g}"
        if self.hi is not None:
            return f"less than {'' if self.hi_open else 'or equal to '}{self.hi:g}"
        return "a finite number"


FRACTION = Range(0.0, 1.0, lo_open=True)  # (0, 1]: a kept fraction; 0 would keep nothing
RATE = Range(0.0, 1.0)  # [0, 1]: an on-rate
COUNT = Range(lo=0)
POSITIVE_COUNT = Range(lo=1)


def _meta(doc: str, allowed: Range | None = None) -> dict[str, Any]:
    """A field's meaning and allowed range, read by the YAML schema too."""
    return {"doc": doc, "range": allowed}


@dataclass
class BBConfig:
    """The rule, its schedule and its baselines.

    ``density`` is the kept fraction of channel-pair edges in every masked layer, matched
    exactly (to one edge per unit) by every method, so methods compare at equal sparsity.
    """

    density: float = field(metadata=_meta("kept fraction of edges per masked layer", FRACTION))
    method: Method = field(
        default="bb", metadata=_meta("the rule, or a baseline at the same density (METHOD.md)")
    )
    mode: Mode = field(
        default="in", metadata=_meta("prune the fan-in of busy units, or their fan-out")
    )
    # Relative to the mean degree, so one value serves every density (controller.bb_degrees);
    # 1.0 is METHOD.md's 0.5 at density 0.5.
    spread: float = field(
        default=1.0,
        metadata=_meta(
            "1 / (beta * mean degree): how strongly the on-rate moves a unit's degree, "
            "in mean degrees per unit of log-odds",
            Range(0, lo_open=True),
        ),
    )
    ema: float = field(
        default=0.99,
        metadata=_meta(
            "decay of the on-rate moving average (per step())", Range(0, 1, hi_open=True)
        ),
    )
    warmup_steps: int = field(default=0, metadata=_meta("dense steps before the first mask", COUNT))
    ramp_steps: int = field(
        default=0, metadata=_meta("steps over which the density slides from 1 to density", COUNT)
    )
    refresh_every: int = field(
        default=50, metadata=_meta("steps between mask refreshes", POSITIVE_COUNT)
    )
    # At least 1: a unit with no fan-in is cut off from its input (its output is a constant,
    # so its on-rate says nothing about it), its sqrt(K / k) rescale is undefined, and with
    # regrow off it can never come back. METHOD.md's floor k_min is a floor for a live unit.
    min_fan: int = field(default=1, metadata=_meta("fewest edges a unit keeps", POSITIVE_COUNT))
    regrow: bool = field(
        default=True, metadata=_meta("a refresh may bring back an edge pruned earlier")
    )
    rescale: Rescale = field(
        default="sqrt",
        metadata=_meta("scale a unit's input by sqrt(K / kept) to keep its variance"),
    )
    seed: int = field(default=0, metadata=_meta("seed of the random baseline's scores"))
    dens_busy: float = field(
        default=0.3,
        metadata=_meta(
            "bb_tiers: relative kept fraction of busy units (on-rate > tier_high)", FRACTION
        ),
    )
    dens_rare: float = field(
        default=0.9,
        metadata=_meta(
            "bb_tiers: relative kept fraction of rare units (on-rate < tier_low)", FRACTION
        ),
    )
    tier_high: float = field(
        default=0.7, metadata=_meta("bb_tiers: on-rate above which a unit is busy", RATE)
    )
    tier_low: float = field(
        default=0.1, metadata=_meta("bb_tiers: on-rate below which a unit is rare", RATE)
    )
    skip_unit_fan: bool = field(
        default=True,
        metadata=_meta(
            "leave layers with one input or output channel dense (a U-Net's first and last)"
        ),
    )
    # A norm layer between conv and activation centres every channel, which narrows act
    # on-rates; ``output`` reads the conv itself.
    probe: ProbeSite = field(
        default="act",
        metadata=_meta(
            "where fan-in mode reads 'on': after the following activation, or the output"
        ),
    )
    # The ablation of the balance law's shape: "rank" replaces log((1-a)/a) by the units'
    # on-rate ranks, spaced evenly over the same spread (mean and sd) the log-odds have, so
    # busier units still lose more edges but not by the law's curve.
    allocation: Allocation = field(
        default="logodds",
        metadata=_meta(
            "bb: degrees from the log-odds of on-rates (the rule) or from their rank (ablation)"
        ),
    )
    # The ablation that parts BB's two choices: how many edges a unit keeps (the law) and
    # which (the largest weights). "random" keeps BB's degrees but a fixed random draw of
    # edges, as the random baseline does; magnitude and random themselves ignore it.
    edges: EdgeChoice = field(
        default="magnitude",
        metadata=_meta(
            "bb, bb_tiers: a unit keeps its largest-weight edges, or a fixed random draw"
        ),
    )

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"BBConfig.{name} must be one of {list(allowed)}, got {value!r}")
        for name, bounds in RANGES.items():
            problem = bounds.problem(getattr(self, name))
            if problem:
                raise ValueError(f"BBConfig.{name} {problem}, got {getattr(self, name)!r}")
        problem = relation_problem(asdict(self), "BBConfig.")
        if problem:
            raise ValueError(problem)

    @property
    def random_edges(self) -> bool:
        """Whether units keep a fixed random draw of edges (random; bb and bb_tiers with
        ``edges="random"``) rather than their largest weights."""
        return self.method == "random" or (self.edges == "random" and self.method != "magnitude")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BBConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"BBConfig has no field {unknown[0]!r}; fields: {sorted(known)}")
        return cls(**d)


def relation_problem(values: Mapping[str, Any], prefix: str) -> str | None:
    """What is wrong between fields (each already valid alone), naming them ``prefix + name``."""
    low, high = values["tier_low"], values["tier_high"]
    if low > high:
        return f"{prefix}tier_low ({low}) must not exceed {prefix}tier_high ({high})"
    return None


#: The allowed values of each choice field (from its Literal type), and the range of each
#: numeric one.
CHOICES: dict[str, tuple[str, ...]] = {
    name: get_args(tp) for name, tp in get_type_hints(BBConfig).items() if get_origin(tp) is Literal
}
RANGES: dict[str, Range] = {
    f.name: f.metadata["range"] for f in fields(BBConfig) if f.metadata["range"]
}
