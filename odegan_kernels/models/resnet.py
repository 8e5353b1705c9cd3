"""A CIFAR-10 ResNet pair after SN-GAN's (Miyato et al. 2018), without spectral norm, as ODE-GAN trains it.

The authors' public code has no ResNet (only the DCGAN pair), so this follows SN-GAN's CIFAR ResNet with
one change: D pools globally by the mean, not the sum. Without spectral norm, summing over the 8x8
positions puts D's initial logits near -20 and ||dl_G/dphi||^2 near 2e5, and the first RK4 step at the
CIFAR settings diverges (measured when this was written; tests/test_models.py checks the logits' scale).

G: z -> linear 4x4x256 -> 3 up-blocks (BN, ReLU, 2x nearest upsample, 3x3 convs, 1x1 shortcut) -> BN, ReLU,
3x3 conv -> tanh (32x32). D: an optimised first down-block, a down-block, two plain blocks (128 channels),
ReLU, global mean pooling, linear to one logit. Same initialisation as the DCGAN (truncated normal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .init import truncated_normal_init_


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without its own affine, then a per-class scale (initialised to 1) and shift (to 0)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.scale = nn.Embedding(num_classes, channels)
        self.shift = nn.Embedding(num_classes, channels)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * self.scale(y)[:, :, None, None] + self.shift(y)[:, :, None, None]


class GBlock(nn.Module):
    """BN, ReLU, 2x nearest upsample, 3x3 conv, BN, ReLU, 3x3 conv, plus an upsampled 1x1 shortcut.

    With ``num_classes`` the BNs are class-conditional and ``forward`` takes the labels.
    """

    def __init__(self, c_in: int, c_out: int, num_classes: int = 0) -> None:
        super().__init__()
        norm = (lambda c: ConditionalBatchNorm2d(c, num_classes)) if num_classes else nn.BatchNorm2d
        self.bn1 = norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.bn2 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        cond = () if y is None else (y,)
        h = F.interpolate(F.relu(self.bn1(x, *cond)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), *cond)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class DBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, down: bool, first: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.down, self.first = down, first
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if (down or c_in != c_out) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.relu(x)  # the optimised first block starts with a conv
        h = self.conv2(F.relu(self.conv1(h)))
        if self.down:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.first:  # pool, then project
            s = self.shortcut(F.avg_pool2d(s, 2))
        elif self.shortcut is not None:
            s = self.shortcut(s)
            if self.down:
                s = F.avg_pool2d(s, 2)
        return h + s


class ResNetGenerator(nn.Module):
    def __init__(self, z_dim: int = 128, ch: int = 256, channels: int = 3) -> None:
        super().__init__()
        self.z_dim, self.ch = z_dim, ch
        self.fc = nn.Linear(z_dim, 4 * 4 * ch)
        self.blocks = nn.Sequential(GBlock(ch, ch), GBlock(ch, ch), GBlock(ch, ch))
        self.bn = nn.BatchNorm2d(ch)
        self.out = nn.Conv2d(ch, channels, 3, 1, 1)
        truncated_normal_init_(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.fc(z).view(-1, self.ch, 4, 4))
        return torch.tanh(self.out(F.relu(self.bn(h))))


class ResNetDiscriminator(nn.Module):
    def __init__(self, ch: int = 128, channels: int = 3) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            DBlock(channels, ch, down=True, first=True),
            DBlock(ch, ch, down=True),
            DBlock(ch, ch, down=False),
            DBlock(ch, ch, down=False),
        )
        self.fc = nn.Linear(ch, 1)
        truncated_normal_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.blocks(x)).mean(dim=(2, 3))  # mean, not SN-GAN's sum: see the module docstring
        return self.fc(h).squeeze(-1)
