"""The CIFAR-10 DCGAN of the ODE-GAN reference code (cs_gan/nets.py in the authors' release), for 32x32 images,
and the same pair at other square power-of-two sizes (one upsampling block, one downsampling pair, per octave)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .init import truncated_normal_init_


def _check(width: int, channels: int, image_size: int) -> int:
    """The number of doublings from G's 4x4 start to ``image_size`` (3 at 32x32, the reference's)."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer (64: the reference's), got {width!r}")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive integer (3: RGB, 1: grayscale), got {channels!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8 or image_size & image_size - 1:
        raise ValueError(f"image_size must be a power of two >= 8 (32: the reference's), got {image_size!r}")
    return int(math.log2(image_size)) - 2


class DCGANGenerator(nn.Module):
    """``width`` scales every layer (64: the reference's 512-256-128-64 at 32x32); ``channels``: the images'
    channels; ``image_size``: a power of two >= 8, one transposed-conv block per doubling from 4x4, the last one
    ``width`` wide (16x16: 256-128-64; 8x8: 128-64)."""

    def __init__(self, z_dim: int = 128, channels: int = 3, width: int = 64, image_size: int = 32) -> None:
        super().__init__()
        ups = _check(width, channels, image_size)
        self.z_dim, self.c0 = z_dim, width * 2**ups
        self.fc = nn.Linear(z_dim, 4 * 4 * self.c0)  # no BN, no activation, as in the reference
        blocks: list[nn.Module] = []
        c_in = self.c0
        for i in range(ups - 1, -1, -1):
            c_out = width * 2**i
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
    """``width`` scales every layer (64: the reference's 64-64-128-128-256-256-512 at 32x32); ``image_size``: a
    power of two >= 8, a (3x3 stride 1, 4x4 stride 2) pair of convs per halving down to 4x4, then a 3x3 conv
    (16x16: 64-64-128-128-256)."""

    def __init__(self, channels: int = 3, width: int = 64, image_size: int = 32) -> None:
        super().__init__()
        downs = _check(width, channels, image_size)
        layers: list[nn.Module] = []
        c_in = channels
        widths = [width * 2 ** (i // 2) for i in range(2 * downs + 1)]  # 1, 1, 2, 2, 4, 4, 8 at 32x32
        kernels, strides = (3, 4) * downs + (3,), (1, 2) * downs + (1,)
        for c_out, k, s in zip(widths, kernels, strides):
            layers += [nn.Conv2d(c_in, c_out, k, s, 1), nn.LeakyReLU(0.1)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(4 * 4 * widths[-1], 1)
        truncated_normal_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1)).squeeze(-1)
