"""Budgeted Broadcast: an activity-dependent pruning rule, as a module for any torch model.

Imports torch only; knows nothing of EM, MONAI or napari. See METHOD.md for the rule::

    bb = attach_bb(model, BBConfig(mode="in", density=0.5), layers=(torch.nn.Conv3d,))
    ...; opt.step(); bb.step()

``BBConfig`` is pure Python; the rest loads torch on first use, so a config schema can read
``BBConfig``'s fields without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bbem.bb.config import METHODS, MODES, BBConfig

if TYPE_CHECKING:
    from bbem.bb.core import BudgetedBroadcast, attach_bb
    from bbem.bb.diagnostics import (
        balance_fit,
        balance_points,
        binary_entropy,
        channel_means,
        decorrelation,
    )

_LAZY = {
    "BudgetedBroadcast": "bbem.bb.core",
    "attach_bb": "bbem.bb.core",
    "balance_fit": "bbem.bb.diagnostics",
    "balance_points": "bbem.bb.diagnostics",
    "binary_entropy": "bbem.bb.diagnostics",
    "channel_means": "bbem.bb.diagnostics",
    "decorrelation": "bbem.bb.diagnostics",
}

__all__ = [
    "METHODS",
    "MODES",
    "BBConfig",
    "BudgetedBroadcast",
    "attach_bb",
    "balance_fit",
    "balance_points",
    "binary_entropy",
    "channel_means",
    "decorrelation",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this hook
        return value
    raise AttributeError(f"module 'bbem.bb' has no attribute {name!r}")
