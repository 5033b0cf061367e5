"""bbem: synaptic cleft detection in EM volumes with Budgeted Broadcast pruning."""

__version__ = "0.1.0"
