"""A class-conditional ResNet pair for ImageNet at 128x128 (or any power-of-two size from 32), after
SN-GAN's projection cGAN (Miyato & Koyama 2018), without spectral norm, as ODE-GAN trains it.

G: z -> linear 4x4x(16 ch) -> up-blocks with class-conditional BN (16, 8, 4, 2, 1 times ch at 128x128)
-> BN, ReLU, 3x3 conv -> tanh. D: an optimised first down-block, down-blocks (1, 2, 4, 8, 16 times ch at
128x128) to 4x4, one plain block, ReLU, global mean pooling, then a linear logit plus the projection
<embed(y), h>. As in the CIFAR ResNet (resnet.py), D pools by the mean rather than SN-GAN's sum: without
spectral norm the sum puts the initial logits far from zero. Same initialisation as the other pairs
(truncated normal, sigma = 1/sqrt(fan_in)); the class embedding of D uses sigma = 1/sqrt(width) so the
projection term starts at the linear term's scale.

Depth follows the image size: log2(size / 4) up-blocks in G and down-blocks in D.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .init import truncated_normal_init_
from .resnet import ConditionalBatchNorm2d, DBlock, GBlock


def _levels(image_size: int) -> int:
    n = int(math.log2(image_size)) - 2 if image_size > 0 else 0
    if image_size < 32 or 4 * 2**n != image_size:
        raise ValueError(f"image_size must be a power of two >= 32, got {image_size}")
    return n


def _check_labels(y: torch.Tensor, batch: int, num_classes: int) -> None:
    """Shape and dtype (no host sync: the values' range is the caller's; ImageFolder's and torch.randint's
    labels are in range by construction)."""
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32) or y.shape != (batch,):
        got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(
            f"class labels must be an integer tensor of shape ({batch},) with values in [0, {num_classes}); got {got}"
        )


def _check(num_classes: int, ch: int) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if ch < 1:
        raise ValueError(f"ch (the base width) must be >= 1, got {ch}")


class ConditionalResNetGenerator(nn.Module):
    def __init__(
        self, z_dim: int = 128, num_classes: int = 1000, ch: int = 64, image_size: int = 128, channels: int = 3
    ) -> None:
        super().__init__()
        n = _levels(image_size)
        _check(num_classes, ch)
        self.z_dim, self.num_classes, self.image_size = z_dim, num_classes, image_size
        widths = [16 * ch] + [min(16, 2 ** (n - 1 - i)) * ch for i in range(n)]
        self.fc = nn.Linear(z_dim, 4 * 4 * widths[0])
        self.blocks = nn.ModuleList(GBlock(a, b, num_classes) for a, b in zip(widths, widths[1:]))
        self.bn = nn.BatchNorm2d(widths[-1])
        self.out = nn.Conv2d(widths[-1], channels, 3, 1, 1)
        truncated_normal_init_(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_labels(y, z.shape[0], self.num_classes)
        h = self.fc(z).view(z.shape[0], -1, 4, 4)
        for block in self.blocks:
            h = block(h, y)
        return torch.tanh(self.out(F.relu(self.bn(h))))


class ConditionalResNetDiscriminator(nn.Module):
    def __init__(self, num_classes: int = 1000, ch: int = 64, image_size: int = 128, channels: int = 3) -> None:
        super().__init__()
        n = _levels(image_size)
        _check(num_classes, ch)
        self.num_classes, self.image_size = num_classes, image_size
        widths = [min(16, 2**i) * ch for i in range(n)]
        blocks = [DBlock(channels, widths[0], down=True, first=True)]
        blocks += [DBlock(a, b, down=True) for a, b in zip(widths, widths[1:])]
        blocks.append(DBlock(widths[-1], widths[-1], down=False))
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(widths[-1], 1)
        self.embed = nn.Embedding(num_classes, widths[-1])
        truncated_normal_init_(self)
        std = 1.0 / math.sqrt(widths[-1])
        with torch.no_grad():
            nn.init.trunc_normal_(self.embed.weight, std=std, a=-2 * std, b=2 * std)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_labels(y, x.shape[0], self.num_classes)
        h = F.relu(self.blocks(x)).mean(dim=(2, 3))
        return self.fc(h).squeeze(-1) + (self.embed(y) * h).sum(-1)


__all__ = ["ConditionalBatchNorm2d", "ConditionalResNetDiscriminator", "ConditionalResNetGenerator"]
