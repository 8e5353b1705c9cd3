"""The CIFAR-10 DCGAN of the ODE-GAN reference code (cs_gan/nets.py in the authors' release), for 32x32 images."""

from __future__ import annotations

import torch
from torch import nn

from .init import truncated_normal_init_


class DCGANGenerator(nn.Module):
    def __init__(self, z_dim: int = 128, channels: int = 3) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.fc = nn.Linear(z_dim, 4 * 4 * 512)  # no BN, no activation, as in the reference
        blocks: list[nn.Module] = []
        c_in = 512
        for c_out in (256, 128, 64):
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
        return self.net(self.fc(z).view(-1, 512, 4, 4))


class DCGANDiscriminator(nn.Module):
    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = channels
        for c_out, k, s in zip((64, 64, 128, 128, 256, 256, 512), (3, 4, 3, 4, 3, 4, 3), (1, 2, 1, 2, 1, 2, 1)):
            layers += [nn.Conv2d(c_in, c_out, k, s, 1), nn.LeakyReLU(0.1)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(4 * 4 * 512, 1)
        truncated_normal_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1)).squeeze(-1)
