"""On-rate probes: per channel, the fraction of positions (batch x space) where a unit is on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

#: Activations after which "on" (output > 0) means "fired". Sigmoid/Softplus are always > 0.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Tanh,
)


def is_activation(m: nn.Module) -> bool:
    return isinstance(m, ACTIVATIONS) or type(m).__name__ in (
        "Swish",
        "MemoryEfficientSwish",
        "Mish",
    )


def on_fraction(x: Tensor, channel_dim: int) -> Tensor:
    """``[C]``: fraction of entries > 0 per channel, reduced over every other dim."""
    x = x.detach()
    dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
    return (x > 0).float().mean(dim=dims) if dims else (x > 0).float()


def following_activation(
    leaves: Sequence[tuple[str, nn.Module]], index: int, stop: tuple[type[nn.Module], ...]
) -> tuple[str, nn.Module] | None:
    """The first activation registered after ``leaves[index]`` and before the next weight layer.

    Registration order follows the forward order in MONAI blocks (Conv -> Norm -> Dropout -> Act)
    and in most hand-written nets; the channel count is checked again at run time.
    """
    for name, m in leaves[index + 1 :]:
        if is_activation(m):
            return name, m
        if isinstance(m, stop):
            return None
    return None


class Probe:
    """Accumulates on-fractions of one unit set between two ``step()`` calls."""

    def __init__(self, units: int, device: torch.device):
        self.units = units
        self.sum = torch.zeros(units, device=device)
        self.count = 0
        self.pending = False
        self.fallback = False

    def add(self, frac: Tensor) -> None:
        self.sum += frac.to(self.sum.device)
        self.count += 1

    def take(self) -> tuple[Tensor, int]:
        out, n = self.sum.clone(), self.count
        self.sum.zero_()
        self.count = 0
        return out, n


# The forward hooks that feed a Probe. They are objects holding their probe, not closures:
# ``copy.deepcopy(model)`` then gives the copy hooks that feed the copy's probes (a closure
# would keep feeding the original's).


class PreHook:
    """Fan-out probe: the layer's input channels are the units."""

    def __init__(self, probe: Probe, channel_dim: int):
        self.probe, self.channel_dim = probe, channel_dim

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module.training:
            frac = on_fraction(args[0], self.channel_dim)
            if frac.numel() == self.probe.units:
                self.probe.add(frac)


class LayerHook:
    """Fan-in probe at the layer's output: measures it (fallback), or arms the activation hook."""

    def __init__(self, probe: Probe, channel_dim: int):
        self.probe, self.channel_dim = probe, channel_dim

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if not module.training:
            return
        if self.probe.fallback:
            self.probe.add(on_fraction(output, self.channel_dim))
        else:
            self.probe.pending = True


class ActHook(LayerHook):
    """Fan-in probe at the following activation, when the layer's hook armed it."""

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        probe = self.probe
        if not probe.pending:
            return
        probe.pending = False
        frac = on_fraction(output, self.channel_dim)
        if frac.numel() == probe.units:
            probe.add(frac)
        else:  # the activation found by registration order is not this layer's: measure the layer
            probe.fallback = True
