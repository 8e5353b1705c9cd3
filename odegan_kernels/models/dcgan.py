"""The CIFAR-10 DCGAN of the ODE-GAN reference code (cs_gan/nets.py in the authors' release), for 32x32 images."""

from __future__ import annotations

import torch
from torch import nn

from .init import truncated_normal_init_


def _check(width: int, channels: int) -> None:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer (64: the reference's), got {width!r}")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive integer (3: RGB, 1: grayscale), got {channels!r}")


class DCGANGenerator(nn.Module):
    """``width`` scales every layer (64: the reference's 512-256-128-64); ``channels``: the images' channels."""

    def __init__(self, z_dim: int = 128, channels: int = 3, width: int = 64) -> None:
        super().__init__()
        _check(width, channels)
        self.z_dim, self.c0 = z_dim, 8 * width
        self.fc = nn.Linear(z_dim, 4 * 4 * self.c0)  # no BN, no activation, as in the reference
        blocks: list[nn.Module] = []
        c_in = self.c0
        for c_out in (4 * width, 2 * width, width):
            blocks += [
                nn.ConvTranspose2d(c_in, c_out, 4, 2, 1),
                nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.001),
                nn.ReLU(),
            ]
            c_in = c_out
        blocks += [nn.Conv2d(c_in, channels, 3, 1, 1), nn.Tanh()]
        self.net = nn.Sequential(*blocks)
        truncated_normal_init_(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(-1, self.c0, 4, 4))


class DCGANDiscriminator(nn.Module):
    """``width`` scales every layer (64: the reference's 64-64-128-128-256-256-512)."""

    def __init__(self, channels: int = 3, width: int = 64) -> None:
        super().__init__()
        _check(width, channels)
        layers: list[nn.Module] = []
        c_in = channels
        widths = [m * width for m in (1, 1, 2, 2, 4, 4, 8)]
        for c_out, k, s in zip(widths, (3, 4, 3, 4, 3, 4, 3), (1, 2, 1, 2, 1, 2, 1)):
            layers += [nn.Conv2d(c_in, c_out, k, s, 1), nn.LeakyReLU(0.1)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(4 * 4 * 8 * width, 1)
        truncated_normal_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1)).squeeze(-1)
