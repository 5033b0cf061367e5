"""Three small nets of the three families BB must work on (shared by the BB tests)."""

from __future__ import annotations

import torch
from torch import nn


def unet3d() -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=(8, 16, 32),
        strides=((1, 2, 2), (1, 2, 2)),
        num_res_units=1,
        norm="instance",
    )


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.act2 = nn.ReLU()

    def forward(self, x):
        return x + self.act2(self.conv2(self.act1(self.conv1(x))))


class ResNet2d(nn.Module):
    def __init__(self, c: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.act = nn.ReLU()
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.blocks(self.act(self.stem(x)))
        return self.head(x.mean((2, 3)))


class FeedForward(nn.Module):
    def __init__(self, d: int = 16, hidden: int = 32):
        super().__init__()
        self.ff1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.ff2 = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.ff2(self.act(self.ff1(x)))


def batch_for(name: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shapes = {"unet3d": (2, 1, 4, 16, 16), "resnet2d": (4, 3, 8, 8), "ffn": (4, 6, 16)}
    return torch.randn(*shapes[name], generator=g)


NETS = {"unet3d": unet3d, "resnet2d": ResNet2d, "ffn": FeedForward}
