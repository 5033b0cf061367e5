"""Channel-pair masks as a ``torch.nn.utils.parametrize`` parametrization.

``layer.weight`` stays the effective weight (``original * mask * scale``), so optimisers,
checkpoints and code that reads weights see what the network computes, and masked edges get
exactly zero gradient.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class EdgeMask(nn.Module):
    """``W[o, i, ...] -> W[o, i, ...] * mask[o, i] * scale[o]``.

    Buffers: ``mask`` ``[C_out, C_in]`` (0/1) and ``scale`` ``[C_out]`` (the sqrt rescale).
    """

    mask: Tensor
    scale: Tensor

    def __init__(self, c_out: int, c_in: int, kernel_dims: int):
        super().__init__()
        self.kernel_dims = kernel_dims
        self.register_buffer("mask", torch.ones(c_out, c_in))
        self.register_buffer("scale", torch.ones(c_out))

    def forward(self, weight: Tensor) -> Tensor:
        m = (self.mask * self.scale[:, None]).to(weight.dtype)
        return weight * m.view(*m.shape, *([1] * self.kernel_dims))


def check_maskable(name: str, layer: nn.Module) -> None:
    """Raise a ValueError naming the layer when BB cannot mask it."""
    if not isinstance(layer, SUPPORTED) or type(layer).__name__.startswith("ConvTranspose"):
        allowed = [t.__name__ for t in SUPPORTED]
        raise ValueError(
            f"layers: cannot mask {name!r} of type {type(layer).__name__}; "
            f"BB masks {allowed} (channel-pair masks need weight [C_out, C_in, *kernel])"
        )
    if getattr(layer, "groups", 1) != 1:
        raise ValueError(
            f"layers: cannot mask {name!r}: grouped convs (groups > 1) have no channel pairs"
        )
    if is_masked(layer):
        raise ValueError(f"attach_bb: layer {name!r} already has a BB mask (attached twice?)")


def is_masked(layer: nn.Module) -> bool:
    p = getattr(layer, "parametrizations", None)
    return p is not None and "weight" in p and any(isinstance(m, EdgeMask) for m in p["weight"])


def layer_weight(layer: nn.Module) -> Tensor:
    """``layer.weight`` (typed: ``nn.Module`` attributes read as ``Tensor | Module``)."""
    return cast(Tensor, layer.weight)


def add_mask(layer: nn.Module) -> EdgeMask:
    w = layer_weight(layer)
    em = EdgeMask(w.shape[0], w.shape[1], w.dim() - 2).to(w.device)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", em)
    return em


def original_weight(layer: nn.Module) -> nn.Parameter:
    return cast(nn.Parameter, layer.parametrizations.weight.original)  # type: ignore[union-attr]


def edge_scores(layer: nn.Module) -> Tensor:
    """``[C_out, C_in]``: sum of |W[o, i, ...]| of the unmasked weight (so pruned edges compete)."""
    w = original_weight(layer).detach()
    return w.abs().reshape(w.shape[0], w.shape[1], -1).sum(-1)


def remove_mask(layer: nn.Module, bake: bool) -> None:
    """Remove the mask's parametrization: ``bake`` leaves ``original * mask * scale`` as the
    weight, otherwise the unmasked original."""
    _own_class(layer)
    torch.nn.utils.parametrize.remove_parametrizations(layer, "weight", leave_parametrized=bake)


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before its parametrization is removed.

    ``torch.nn.utils.parametrize`` keeps the ``weight`` property on a generated class, and
    ``copy.deepcopy`` shares that class between a model and its copy; removal deletes the
    property from the class, which would break the other model. A sibling class with the same
    namespace keeps the removal local.
    """
    cls = type(module)
    ns = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, ns)
