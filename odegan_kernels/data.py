"""Data: the 16-Gaussian mixture, DiracGAN, and image sets (CIFAR-10 via torchvision, ImageFolder)."""

from __future__ import annotations

import torch


class MixtureOfGaussians:
    """16 Gaussians on the grid {-1.5, -0.5, 0.5, 1.5}^2 with std 0.02 (the colab's problem).

    A batch that is a multiple of the mode count holds each mode equally often (512 = 32 per mode).
    """

    def __init__(self, grid: int = 4, spacing: float = 1.0, std: float = 0.02, device="cpu") -> None:
        ticks = (torch.arange(grid, dtype=torch.float32) - (grid - 1) / 2) * spacing
        gx, gy = torch.meshgrid(ticks, ticks, indexing="ij")
        self.centres = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1).to(device)
        self.std = std

    @property
    def modes(self) -> int:
        return self.centres.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = self.modes
        dev = self.centres.device
        if n % k == 0:
            idx = torch.arange(k, device=dev).repeat(n // k)
        else:
            idx = torch.randint(k, (n,), generator=generator, device=dev)
        noise = torch.randn(n, 2, generator=generator, device=dev)
        return self.centres[idx] + self.std * noise


def latents(n: int, dim: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    return torch.randn(n, dim, generator=generator, device=device)
