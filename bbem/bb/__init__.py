"""Budgeted Broadcast: an activity-dependent pruning rule, as a module for any torch model.

Imports torch only; knows nothing of EM, MONAI or napari. See METHOD.md for the rule::

    bb = attach_bb(model, BBConfig(mode="in", density=0.5), layers=(torch.nn.Conv3d,))
    ...; opt.step(); bb.step()
"""

from bbem.bb.config import METHODS, MODES, BBConfig
from bbem.bb.core import BudgetedBroadcast, attach_bb
from bbem.bb.diagnostics import balance_fit, binary_entropy, channel_means, decorrelation

__all__ = [
    "METHODS",
    "MODES",
    "BBConfig",
    "BudgetedBroadcast",
    "attach_bb",
    "balance_fit",
    "binary_entropy",
    "channel_means",
    "decorrelation",
]
